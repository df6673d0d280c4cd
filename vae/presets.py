"""Known VAEs: architecture plus latent scaling.

The latent a diffusion model trains on is the posterior mean, scaled (see `LatentScaling`): either
(mean - shift_factor) * scaling_factor, or per channel (mean - latents_mean) * scaling_factor /
latents_std where the VAE's config gives those statistics. The factors are the ones each model
family was trained with; a wrong one silently degrades training, so they live here next to the
architecture and travel into every output's identity and metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .model import VAEArchitecture

if TYPE_CHECKING:
    import torch


def _floats(name: str, values: Sequence[Any] | None) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name}={values!r} is not allowed; expected a non-empty list of numbers, one per "
                         "latent channel (or null)")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}={list(values)!r} holds {v!r}; expected finite numbers")
        out.append(float(v))
    return tuple(out)


@dataclass(frozen=True)
class LatentScaling:
    """How a posterior mean becomes the latent a diffusion model trains on, and back.

    Without per-channel statistics (SD 1.x/2.x, SDXL, SD3, FLUX):
        z = (mean - shift_factor) * scaling_factor
    With diffusers' `latents_mean` / `latents_std` (e.g. Playground v2.5), per channel c:
        z_c = (mean_c - latents_mean_c) * scaling_factor / latents_std_c
    which is what diffusers' pipelines invert before decoding (latents * std / scale + mean).
    """

    scaling_factor: float
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scaling_factor, bool) or not isinstance(self.scaling_factor, (int, float)) \
                or not math.isfinite(self.scaling_factor) or self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor={self.scaling_factor!r} is not allowed; expected a finite number > 0")
        if not math.isfinite(self.shift_factor):
            raise ValueError(f"shift_factor={self.shift_factor!r} is not allowed; expected a finite number")
        object.__setattr__(self, "latents_mean", _floats("latents_mean", self.latents_mean))
        object.__setattr__(self, "latents_std", _floats("latents_std", self.latents_std))
        mean, std = self.latents_mean, self.latents_std
        if (mean is None) != (std is None):
            given, missing = ("latents_mean", "latents_std") if std is None else ("latents_std", "latents_mean")
            raise ValueError(f"{given} is given without {missing}; expected both (per-channel normalisation) "
                             "or neither")
        if mean is not None and std is not None:
            if len(mean) != len(std):
                raise ValueError(f"latents_mean has {len(mean)} values and latents_std {len(std)}; expected "
                                 "one of each per latent channel")
            if min(std) <= 0:
                raise ValueError(f"latents_std={list(std)} is not allowed; expected every value > 0")
            if self.shift_factor:
                raise ValueError(f"shift_factor={self.shift_factor} and latents_mean are both given; expected "
                                 "one of them (diffusers applies latents_mean and ignores shift_factor)")

    @property
    def per_channel(self) -> bool:
        return self.latents_mean is not None

    def check_channels(self, channels: int, what: str = "the VAE") -> None:
        """Raise unless the per-channel statistics (if any) have one value per latent channel."""
        if self.latents_mean is not None and len(self.latents_mean) != channels:
            raise ValueError(f"latents_mean/latents_std have {len(self.latents_mean)} values, but {what} has "
                             f"{channels} latent channels; expected one value per channel")

    def _per_channel(self, like: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
        import torch

        # (C, 1, 1) broadcasts over one latent (C, h, w) and over a batch (B, C, h, w).
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def gain(self, like: torch.Tensor) -> torch.Tensor | float:
        """The factor from the unscaled latent space to the scaled one: scaling_factor, or
        scaling_factor / latents_std per channel. Posterior noise is scaled by it too."""
        if self.latents_std is None:
            return self.scaling_factor
        return self.scaling_factor / self._per_channel(like, self.latents_std)

    def scale(self, mean: torch.Tensor) -> torch.Tensor:
        """Posterior mean (unscaled) -> the latent a diffusion model trains on."""
        if self.latents_mean is None:
            return (mean - self.shift_factor) * self.scaling_factor
        return (mean - self._per_channel(mean, self.latents_mean)) * self.gain(mean)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale`."""
        if self.latents_mean is None:
            return latents / self.scaling_factor + self.shift_factor
        return latents / self.gain(latents) + self._per_channel(latents, self.latents_mean)

    def identity(self) -> dict[str, Any]:
        """The scaling as a job identity and shard metadata record it. The per-channel statistics
        appear only when set, so outputs written before they existed keep their identity."""
        out: dict[str, Any] = {"scaling_factor": float(self.scaling_factor), "shift_factor": float(self.shift_factor)}
        if self.latents_mean is not None:
            out["latents_mean"] = list(self.latents_mean)
            out["latents_std"] = list(self.latents_std or ())
        return out

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], *, where: str = "the metadata") -> LatentScaling:
        """The scaling an identity or a shard's metadata records (values as numbers and lists, or as
        the strings and JSON of shard metadata); ValueError naming `where` when it records none."""
        def parsed(key: str) -> Any:
            value = meta.get(key)
            if isinstance(value, (str, bytes)):
                try:
                    return json.loads(value)
                except ValueError:
                    raise ValueError(f"{where} has {key}={value!r}; expected a number or a JSON list") from None
            return value

        factor = parsed("scaling_factor")
        if factor is None:
            raise ValueError(f"{where} records no scaling_factor; expected the latent scaling of the VAE that made it")
        shift = parsed("shift_factor")
        try:
            return cls(scaling_factor=factor, shift_factor=float(shift or 0.0),
                       latents_mean=parsed("latents_mean"), latents_std=parsed("latents_std"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.latents_mean is None:
            return f"factor {self.scaling_factor}, shift {self.shift_factor}"
        return (f"factor {self.scaling_factor}, per-channel mean {list(self.latents_mean)}, "
                f"std {list(self.latents_std or ())}")


@dataclass(frozen=True)
class VAEPreset:
    """A named VAE family. `fp16_overflows` marks VAEs whose activations exceed float16's range."""

    name: str
    arch: VAEArchitecture
    scaling_factor: float
    shift_factor: float = 0.0
    fp16_overflows: bool = False
    description: str = ""
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        try:
            self.scaling.check_channels(self.arch.latent_channels, f"preset {self.name!r}")
        except ValueError as e:
            raise ValueError(f"preset {self.name!r}: {e}") from None

    @property
    def scaling(self) -> LatentScaling:
        """The preset's latent scaling (checked: building it raises on inconsistent values)."""
        return LatentScaling(self.scaling_factor, self.shift_factor, self.latents_mean, self.latents_std)

    def diffusers_config(self) -> dict[str, Any]:
        """The equivalent `diffusers.AutoencoderKL` config (for reference tests and exports)."""
        a = self.arch
        n = len(a.block_out_channels)
        return {
            "in_channels": a.in_channels,
            "out_channels": a.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(a.block_out_channels),
            "layers_per_block": a.layers_per_block,
            "latent_channels": a.latent_channels,
            "norm_num_groups": a.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor or None,
            "latents_mean": list(self.latents_mean) if self.latents_mean is not None else None,
            "latents_std": list(self.latents_std) if self.latents_std is not None else None,
            "force_upcast": self.fp16_overflows,
            "use_quant_conv": a.use_quant_conv,
            "use_post_quant_conv": a.use_post_quant_conv,
            "mid_block_add_attention": a.mid_block_attention,
        }


_SD = VAEArchitecture(latent_channels=4, block_out_channels=(128, 256, 512, 512))
_SD3 = VAEArchitecture(
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    use_quant_conv=False,
    use_post_quant_conv=False,
)

PRESETS: Mapping[str, VAEPreset] = {
    p.name: p
    for p in (
        VAEPreset("sd15", _SD, 0.18215, description="Stable Diffusion 1.x/2.x VAE (e.g. sd-vae-ft-mse)"),
        VAEPreset("sdxl", _SD, 0.13025, fp16_overflows=True, description="SDXL VAE"),
        VAEPreset("sd3", _SD3, 1.5305, 0.0609, description="Stable Diffusion 3 VAE (16 channels)"),
        VAEPreset("flux", _SD3, 0.3611, 0.1159, description="FLUX.1 VAE (16 channels)"),
        # The statistics of playgroundai/playground-v2.5-1024px-aesthetic's vae/config.json. Loading
        # that folder with this preset checks them against its config (check_against_config).
        VAEPreset("playground-v2.5", _SD, 0.5, fp16_overflows=True,
                  latents_mean=(-1.6574, 1.886, -1.383, 2.5155), latents_std=(8.4927, 5.9022, 6.5498, 5.2299),
                  description="Playground v2.5 VAE (SDXL architecture, per-channel latent normalisation)"),
        VAEPreset(
            "tiny",
            VAEArchitecture(latent_channels=4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                            norm_num_groups=8),
            0.5,
            description="a few channels, same 8x downsampling: tests and demos only",
        ),
    )
}


def get_preset(name: str) -> VAEPreset:
    """The preset called `name`, or a ValueError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown VAE preset {name!r}; expected one of {sorted(PRESETS)}") from None


# Every field of diffusers' AutoencoderKL config (0.42) and what we do with it. A field outside this
# set may change the latents (a new norm epsilon, another block type), so it is refused by name
# rather than ignored. `sample_size` only sets the tile size of diffusers' own tiled mode.
_CONFIG_FIELDS = frozenset({
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
    "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
    "mid_block_add_attention",
})


def preset_from_diffusers_config(config: Mapping[str, Any], *, name: str = "custom") -> VAEPreset:
    """A preset read from a diffusers `config.json` of an AutoencoderKL. Fields that start with `_`
    are diffusers' bookkeeping; any other field not understood is refused by name."""
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"the config describes a {class_name}; expected an AutoencoderKL (the Stable "
                         "Diffusion VAE family)")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"the VAE config has field(s) {unknown} that latentcache does not understand and that "
                         f"may change the latents; expected only {sorted(_CONFIG_FIELDS)}")
    blocks = set(config.get("down_block_types", ["DownEncoderBlock2D"])) | set(
        config.get("up_block_types", ["UpDecoderBlock2D"]))
    if blocks - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise ValueError(f"unsupported diffusers block types {sorted(blocks)}; "
                         "expected DownEncoderBlock2D/UpDecoderBlock2D (AutoencoderKL)")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported act_fn={config['act_fn']!r}; expected 'silu'")
    arch = VAEArchitecture(
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        latent_channels=int(config.get("latent_channels", 4)),
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=int(config.get("layers_per_block", 1)),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        mid_block_attention=bool(config.get("mid_block_add_attention", True)),
    )
    shift = config.get("shift_factor")
    return VAEPreset(
        name=name,
        arch=arch,
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=float(shift) if shift is not None else 0.0,
        latents_mean=_floats("latents_mean", config.get("latents_mean")),
        latents_std=_floats("latents_std", config.get("latents_std")),
        fp16_overflows=bool(config.get("force_upcast", False)),
        description="read from a diffusers config.json",
    )


def check_against_config(preset: VAEPreset, config: Mapping[str, Any]) -> None:
    """Raise if a diffusers config describes another architecture or latent scaling than `preset`:
    a wrong scaling factor silently degrades every latent written with it."""
    other = preset_from_diffusers_config(config)
    if other.arch != preset.arch:
        raise ValueError(f"preset {preset.name!r} has architecture {preset.arch}, but the weights' "
                         f"config.json describes {other.arch}")
    for name in ("scaling_factor", "shift_factor", "latents_mean", "latents_std"):
        ours, theirs = getattr(preset, name), getattr(other, name)
        if not _close(ours, theirs):
            raise ValueError(f"preset {preset.name!r} has {name}={_shown(ours)}, but the weights' config.json says "
                             f"{_shown(theirs)}; pick the matching preset or leave preset unset to use the config's")


def _close(a: float | tuple[float, ...] | None, b: float | tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, tuple) or isinstance(b, tuple):
        return isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and all(
            abs(x - y) <= 1e-6 for x, y in zip(a, b))
    return abs(a - b) <= 1e-6


def _shown(value: float | tuple[float, ...] | None) -> str:
    return "null" if value is None else str(list(value)) if isinstance(value, tuple) else str(value)

