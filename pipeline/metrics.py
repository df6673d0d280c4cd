"""Reconstruction scores of one image against its source, and the pictures an audit shows.

Pure functions on arrays. PSNR and SSIM are scikit-image's (`skimage.metrics`), computed on the
uint8 images a person would look at (the decoder's output clamped and rounded), data range 255.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Decoder outputs beyond [-1, 1] are clipped when mapped to pixels. A trained VAE overshoots a little
# wherever the image is white or black (a fifth of a dark photo lies just below -1), so only values
# more than CLIP_MARGIN out (32 pixel levels) count; a wrong VAE or scaling puts large areas there.
CLIP_MARGIN = 0.25
SATURATED_FRACTION = 0.05
# Heat maps show |source - reconstruction| on one fixed scale, so that two samples compare by eye.
HEAT_MAX = 64.0
THUMBNAIL_SIDE = 192


@dataclass(frozen=True)
class Scores:
    """How well one reconstruction matches its source (uint8 pixel units)."""

    psnr: float
    ssim: float
    mae: float
    clipped_fraction: float  # share of output values more than CLIP_MARGIN beyond [-1, 1]

    @property
    def saturated(self) -> bool:
        return self.clipped_fraction > SATURATED_FRACTION


def to_pixels(image: np.ndarray) -> np.ndarray:
    """Decoder output (3, H, W) float in [-1, 1] -> uint8 (H, W, 3): clamp, then round (as the decode job)."""
    pixels = np.clip((image.astype(np.float32) + 1.0) * 127.5, 0, 255)
    return np.rint(pixels).astype(np.uint8).transpose(1, 2, 0)


def score(source: np.ndarray, image: np.ndarray) -> Scores:
    """Scores of the decoder output `image` (3, H, W) in [-1, 1] against `source` uint8 (H, W, 3)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    recon = to_pixels(image)
    if recon.shape != source.shape:
        raise ValueError(f"reconstruction is {recon.shape}, source is {source.shape}; expected the same (H, W, 3)")
    psnr = float(peak_signal_noise_ratio(source, recon, data_range=255))
    # win_size 7 (skimage's default) needs both sides >= 7; a smaller image gets the largest odd window.
    win = min(7, min(source.shape[:2]) // 2 * 2 - 1)
    ssim = float(structural_similarity(source, recon, data_range=255, channel_axis=2, win_size=max(win, 3)))
    mae = float(np.abs(source.astype(np.int16) - recon.astype(np.int16)).mean())
    clipped = float((np.abs(image) > 1.0 + CLIP_MARGIN).mean())
    return Scores(psnr=psnr if math.isfinite(psnr) else 100.0, ssim=ssim, mae=mae, clipped_fraction=clipped)


def latent_channel_stats(latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of one (C, h, w) latent, float64 (finite values only)."""
    z = latent.astype(np.float64).reshape(latent.shape[0], -1)
    z = np.where(np.isfinite(z), z, np.nan)
    return np.nanmean(z, axis=1), np.nanstd(z, axis=1)


def _fit(pixels: np.ndarray, side: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale == 1.0:
        return pixels
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))


def heat_map(source: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """|source - recon| averaged over channels, coloured with matplotlib's `inferno` on [0, HEAT_MAX]."""
    from matplotlib import colormaps

    diff = np.abs(source.astype(np.float32) - recon.astype(np.float32)).mean(axis=2)
    rgba = colormaps["inferno"](np.clip(diff / HEAT_MAX, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def triptych(source: np.ndarray, recon: np.ndarray | None, *, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """source | reconstruction | difference heat map, each fitted into `side` px, as one uint8 image.
    Without a reconstruction (a non-finite latent or output) the two right panels are grey."""
    if recon is None:
        grey = np.full_like(source, 96)
        panels = [source, grey, grey]
    else:
        panels = [source, recon, heat_map(source, recon)]
    panels = [_fit(p, side) for p in panels]
    gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


__all__ = ["Scores", "score", "to_pixels", "latent_channel_stats", "heat_map", "triptych", "png_bytes",
           "SATURATED_FRACTION", "CLIP_MARGIN", "HEAT_MAX"]
