"""Running a VAE: device and precision, non-finite fallback, tiling, out-of-memory splitting.

No I/O here: `vae.load_vae` builds a `VAECodec` from weights; the codec only turns image tensors
into latent moments and back.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .model import AutoencoderKL, DiagonalGaussian
from .presets import VAEPreset

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteError(RuntimeError):
    """Some samples stay non-finite even in float32 (the input or the weights are broken)."""

    def __init__(self, indices: list[int], what: str) -> None:
        super().__init__(f"{what} is non-finite even in float32 for batch indices {indices}")
        self.indices = indices


class Moments(NamedTuple):
    """Unscaled posterior moments: `mean` and `logvar`, each (B, latent_channels, H/f, W/f), float32."""

    mean: torch.Tensor
    logvar: torch.Tensor


@dataclass
class CodecStats:
    """Counters a job reports: samples recomputed in float32, and batch splits after out-of-memory."""

    fp32_fallbacks: int = 0
    oom_splits: int = 0


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; expected one of {list(DTYPES)}")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {list(DTYPES)}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def split_on_oom(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, stats: CodecStats) -> torch.Tensor:
    """`fn(x)`, retried on halves of the batch when it runs out of memory (down to one sample)."""
    try:
        return fn(x)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not _is_oom(e) or x.shape[0] <= 1:
            raise
    # Outside the except block, so the failed attempt's tensors are freed before retrying.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    stats.oom_splits += 1
    half = x.shape[0] // 2
    log.warning("out of memory on a batch of %d; retrying as %d + %d", x.shape[0], half, x.shape[0] - half)
    return torch.cat([split_on_oom(fn, x[:half], stats), split_on_oom(fn, x[half:], stats)])


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Weights rising over `overlap` cells at both ends; never zero, so borders keep their values."""
    i = torch.arange(length, device=device, dtype=torch.float32)
    edge = torch.minimum(i + 1, length - i) / (overlap + 1)
    return edge.clamp(max=1.0)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, overlap: int,
          ratio: float) -> torch.Tensor:
    """Apply a spatial `fn` tile by tile and blend the overlaps linearly.

    tile and overlap are in input pixels; `ratio` is output size / input size (1/8 for an encoder,
    8 for a decoder). Tiles are square, `tile` wide, placed every `tile - overlap` pixels with the
    last one flush with the edge.
    """
    _, _, h, w = x.shape
    stride = tile - overlap
    out_overlap = max(1, int(round(overlap * ratio)))
    acc: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    for top in _tile_starts(h, tile, stride):
        for left in _tile_starts(w, tile, stride):
            y = fn(x[:, :, top:top + tile, left:left + tile]).float()
            if acc is None:
                acc = y.new_zeros(y.shape[0], y.shape[1], int(h * ratio), int(w * ratio))
                weight = y.new_zeros(1, 1, int(h * ratio), int(w * ratio))
            th, tw = y.shape[-2:]
            mask = _ramp(th, out_overlap, y.device)[:, None] * _ramp(tw, out_overlap, y.device)[None, :]
            ot, ol = int(top * ratio), int(left * ratio)
            acc[:, :, ot:ot + th, ol:ol + tw] += y * mask
            weight[:, :, ot:ot + th, ol:ol + tw] += mask
    assert acc is not None and weight is not None
    return acc / weight


class VAECodec:
    """Encodes images to unscaled latent moments and decodes unscaled latents to images.

    Images are float NCHW in [-1, 1]; height and width are multiples of the downsampling factor.
    `scale`/`unscale` convert between the posterior mean and the latent a diffusion model trains on.
    """

    def __init__(
        self,
        model: AutoencoderKL,
        preset: VAEPreset,
        *,
        fingerprint: str,
        source: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        random_weights: bool = False,
        tile_size: int | None = 1024,
        tile_overlap: int = 128,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        self.preset = preset
        self.config = preset.arch
        self.scaling = preset.scaling  # checked against the latent channels by VAEPreset
        self.scaling_factor = preset.scaling_factor
        self.shift_factor = preset.shift_factor
        self.fingerprint = fingerprint
        self.source = source
        self.random_weights = random_weights
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        f = preset.arch.downsample_factor
        if tile_size is not None and (tile_size % f or tile_overlap % f or not 0 <= tile_overlap < tile_size):
            raise ValueError(f"tile_size={tile_size} and tile_overlap={tile_overlap} must be multiples of "
                             f"{f} with 0 <= overlap < tile_size")
        if preset.fp16_overflows and self.dtype == torch.float16:
            log.warning("the %s VAE overflows in float16: most batches will be recomputed in float32; "
                        "bfloat16 avoids that", preset.name)
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.stats = CodecStats()
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.eval().requires_grad_(False)
        # A float32 copy on the CPU stays behind for the non-finite fallback; it is moved to the
        # device only the first time a sample needs it.
        self._reference: AutoencoderKL | None = copy.deepcopy(model) if self.dtype != torch.float32 else None
        self.model = model.to(device=self.device, dtype=self.dtype, memory_format=self._memory_format)
        if compile:
            self.model.encoder = torch.compile(self.model.encoder, dynamic=True)  # type: ignore[assignment]
            self.model.decoder = torch.compile(self.model.decoder, dynamic=True)  # type: ignore[assignment]

    def __repr__(self) -> str:
        weights = "RANDOM WEIGHTS" if self.random_weights else self.source
        return (f"VAECodec(preset={self.preset.name}, weights={weights}, fingerprint={self.fingerprint}, "
                f"device={self.device}, dtype={str(self.dtype).removeprefix('torch.')})")

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # --- scaling -------------------------------------------------------------------------------

    def scale(self, mean: torch.Tensor) -> torch.Tensor:
        """Posterior mean -> the latent a diffusion model trains on: (mean - shift) * scale, or per
        channel (mean - latents_mean) * scale / latents_std (see LatentScaling)."""
        return self.scaling.scale(mean)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale`."""
        return self.scaling.unscale(latents)

    # --- encode / decode ----------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels or not x.is_floating_point():
            raise ValueError(f"{what} must be a float tensor (B, {channels}, H, W), got "
                             f"{x.dtype} {tuple(x.shape)}")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"{what} height and width must be multiples of {multiple}, got "
                             f"{tuple(x.shape[-2:])}")

    def _run(self, model: AutoencoderKL, part: str, x: torch.Tensor) -> torch.Tensor:
        """One forward pass of `part` ("encode" -> moments, "decode" -> image), tiled when large."""
        dtype = next(model.parameters()).dtype

        def forward(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.device, dtype).contiguous(memory_format=self._memory_format)
            return model.moments(t) if part == "encode" else model.decode(t)

        f = self.downsample_factor
        tile = self.tile_size if part == "encode" else (self.tile_size // f if self.tile_size else None)
        overlap = self.tile_overlap if part == "encode" else self.tile_overlap // f
        ratio = 1 / f if part == "encode" else f

        def run(t: torch.Tensor) -> torch.Tensor:
            return split_on_oom(forward, t, self.stats)

        if tile is not None and max(x.shape[-2:]) > tile:
            return tiled(run, x, tile=tile, overlap=overlap, ratio=ratio)
        return run(x).float()

    def _reference_model(self) -> AutoencoderKL:
        assert self._reference is not None
        if next(self._reference.parameters()).device != self.device:
            self._reference = self._reference.to(self.device, memory_format=self._memory_format)
        return self._reference

    def _finite(self, part: str, x: torch.Tensor) -> torch.Tensor:
        out = self._run(self.model, part, x)
        bad = ~torch.isfinite(out).flatten(1).all(dim=1)
        if bad.any() and self._reference is not None:
            idx = bad.nonzero().flatten()
            log.warning("%s: %d sample(s) non-finite in %s; recomputing in float32", part, len(idx), self.dtype)
            out[idx] = self._run(self._reference_model(), part, x[idx.to(x.device)])
            self.stats.fp32_fallbacks += len(idx)
            bad = ~torch.isfinite(out).flatten(1).all(dim=1)
        if bad.any():
            raise NonFiniteError(bad.nonzero().flatten().tolist(), "latent" if part == "encode" else "image")
        return out

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> Moments:
        """Images (B, 3, H, W) in [-1, 1] -> unscaled posterior `Moments(mean, logvar)` in float32."""
        self._check_input(x, self.config.in_channels, "images", self.downsample_factor)
        posterior = DiagonalGaussian.from_moments(self._finite("encode", x))
        return Moments(mean=posterior.mean, logvar=posterior.logvar)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f), float32, nominally in [-1, 1]."""
        self._check_input(z, self.config.latent_channels, "latents", 1)
        return self._finite("decode", z)
