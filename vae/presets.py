"""Known VAEs: architecture plus latent scaling.

Scaled latent = (mean - shift_factor) * scaling_factor; decoding inverts it. The factors are the
ones each model family was trained with; a wrong one silently degrades training, so they live here
next to the architecture and travel into every output's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .model import VAEArchitecture


@dataclass(frozen=True)
class VAEPreset:
    """A named VAE family. `fp16_overflows` marks VAEs whose activations exceed float16's range."""

    name: str
    arch: VAEArchitecture
    scaling_factor: float
    shift_factor: float = 0.0
    fp16_overflows: bool = False
    description: str = ""

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


def preset_from_diffusers_config(config: Mapping[str, Any], *, name: str = "custom") -> VAEPreset:
    """A preset read from a diffusers `config.json` of an AutoencoderKL."""
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
    for name in ("scaling_factor", "shift_factor"):
        ours, theirs = getattr(preset, name), getattr(other, name)
        if abs(ours - theirs) > 1e-6:
            raise ValueError(f"preset {preset.name!r} has {name}={ours}, but the weights' config.json says "
                             f"{theirs}; pick the matching preset or leave preset unset to use the config's")

