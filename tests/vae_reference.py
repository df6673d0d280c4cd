"""Reference models for parity tests: diffusers' AutoencoderKL with random weights, no download."""

from __future__ import annotations

import torch

from vae import VAEPreset, get_preset


def diffusers_vae(preset: VAEPreset | str, seed: int = 0):
    """diffusers.AutoencoderKL built from the preset's config, seeded random weights, eval mode."""
    from diffusers import AutoencoderKL

    preset = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKL(**preset.diffusers_config())
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of `a` against the reference `b`."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
