"""Sampling the stored posterior, the same way wherever it is done (the training reader, decode).

A latent shard stores the scaled mean m' = scale(mean) and the unscaled log-variance. The scaling
is affine per channel (see vae.presets.LatentScaling), so a sample z ~ N(mean, exp(logvar)), scaled
the same way, is m' + gain * exp(logvar / 2) * eps, with gain = scaling_factor (/ latents_std).
The noise is seeded from its context (seed, key, ...), so a sample does not depend on which worker,
batch or machine drew it.
"""

from __future__ import annotations

import hashlib

import torch

from vae.presets import LatentScaling


def seed_of(*parts: object) -> int:
    """A 63-bit seed from the sha256 of the parts joined by ':'."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by `seed_of(*parts)`."""
    return torch.Generator().manual_seed(seed_of(*parts))


def sample_scaled(mean: torch.Tensor, logvar: torch.Tensor, scaling: LatentScaling,
                  gen: torch.Generator) -> torch.Tensor:
    """A posterior sample in the scaled space: mean (already scaled) + gain * std * eps, float32;
    `mean` and `logvar` are (C, h, w) or (B, C, h, w)."""
    mean = mean.float()
    eps = torch.randn(mean.shape, generator=gen, dtype=torch.float32)
    return mean + scaling.gain(mean) * torch.exp(0.5 * logvar.float()) * eps


__all__ = ["generator", "sample_scaled", "seed_of"]
