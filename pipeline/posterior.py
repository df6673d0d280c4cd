"""Sampling the stored posterior, the same way wherever it is done (the training reader, decode).

A latent shard stores the scaled mean m' = (mean - shift) * scale and the unscaled log-variance.
A sample z ~ N(mean, exp(logvar)), scaled the same way, is m' + scale * exp(logvar / 2) * eps.
The noise is seeded from its context (seed, key, ...), so a sample does not depend on which worker,
batch or machine drew it.
"""

from __future__ import annotations

import hashlib

import torch


def seed_of(*parts: object) -> int:
    """A 63-bit seed from the sha256 of the parts joined by ':'."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by `seed_of(*parts)`."""
    return torch.Generator().manual_seed(seed_of(*parts))


def sample_scaled(mean: torch.Tensor, logvar: torch.Tensor, scaling_factor: float,
                  gen: torch.Generator) -> torch.Tensor:
    """A posterior sample in the scaled space: mean (already scaled) + scale * std * eps, float32."""
    eps = torch.randn(mean.shape, generator=gen, dtype=torch.float32)
    return mean.float() + scaling_factor * torch.exp(0.5 * logvar.float()) * eps


__all__ = ["generator", "sample_scaled", "seed_of"]
