"""Stable Diffusion VAEs: the AutoencoderKL model, presets, weight loading and a codec to run it.

`load_vae` is the entry point::

    codec = load_vae("stabilityai/sd-vae-ft-mse", preset="sd15", device="cuda", dtype="bfloat16")
    mean, logvar = codec.encode(images)          # images: float (B, 3, H, W) in [-1, 1]
    latents = codec.scale(mean)                  # what a diffusion model trains on
    images = codec.decode(codec.unscale(latents))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .codec import CodecStats, Moments, NonFiniteError, VAECodec, resolve_device
from .model import AutoencoderKL, DiagonalGaussian, VAEArchitecture
from .presets import PRESETS, VAEPreset, check_against_config, get_preset, preset_from_diffusers_config
from .weights import (WeightsError, check_fits, fingerprint, fingerprint_state, load_into, read_state_dict,
                      resolve_source, to_model_layout)

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"

__all__ = [
    "AutoencoderKL", "CodecStats", "DiagonalGaussian", "Moments", "NonFiniteError", "PRESETS",
    "VAEArchitecture", "VAECodec", "VAEInfo", "VAEPreset", "WeightsError", "build_model", "get_preset",
    "inspect_vae", "load_vae",
]


def build_model(preset: VAEPreset | str, *, seed: int | None = None) -> AutoencoderKL:
    """An AutoencoderKL of the preset's architecture, with random weights (seeded when given)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if seed is None:
        return AutoencoderKL(preset.arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(preset.arch)


def _pick_preset(preset: str | None, config: Mapping[str, Any] | None, source: str) -> VAEPreset:
    if preset is not None:
        chosen = get_preset(preset)
        if config is not None:
            check_against_config(chosen, config)
        return chosen
    if config is not None:
        return preset_from_diffusers_config(config, name="custom")
    raise WeightsError(f"cannot tell the VAE family of {source!r} from a bare weights file (sd15 and sdxl, "
                       f"sd3 and flux share architectures but not latent scaling); pass preset= one of "
                       f"{sorted(PRESETS)}")


@dataclass(frozen=True)
class VAEInfo:
    """What a VAE is, known without building it on a device: its fingerprint and preset (scaling)."""

    source: str
    preset: VAEPreset
    fingerprint: str
    random_weights: bool


def _random_preset(source: str, preset: str | None) -> VAEPreset:
    named = source[len(RANDOM_PREFIX):]
    if preset is not None and preset != named:
        raise ValueError(f"source {source!r} names preset {named!r} but preset={preset!r} was given; "
                         "drop one of them")
    return get_preset(named)


def _read_weights(source: str, preset: str | None,
                  storage_options: Mapping[str, Any] | None) -> tuple[VAEPreset, dict[str, torch.Tensor], str]:
    """The preset and the state dict in the model's layout, for a source that is not random."""
    resolved = resolve_source(source, storage_options)
    chosen = _pick_preset(preset, resolved.config, source)
    state = read_state_dict(resolved.weights_url, storage_options)
    return chosen, to_model_layout(state, len(chosen.arch.block_out_channels)), resolved.weights_url


def inspect_vae(source: str, preset: str | None = None, *, seed: int = 0,
                storage_options: Mapping[str, Any] | None = None) -> VAEInfo:
    """The fingerprint and preset `load_vae` would give, from the weights file alone (no device, no
    model; random weights are built on the CPU, since their fingerprint is that of the model)."""
    if source.startswith(RANDOM_PREFIX):
        chosen = _random_preset(source, preset)
        return VAEInfo(source, chosen, f"random-{fingerprint(build_model(chosen, seed=seed))}", True)
    chosen, state, weights_url = _read_weights(source, preset, storage_options)
    with torch.device("meta"):  # shapes only: no memory, no weights initialised
        expected = AutoencoderKL(chosen.arch).state_dict()
    check_fits(expected, state, source=f"{weights_url} (preset {chosen.name})")
    return VAEInfo(source, chosen, fingerprint_state(state), False)


def load_vae(
    source: str,
    preset: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    tile_size: int | None = 1024,
    tile_overlap: int = 128,
    channels_last: bool = True,
    compile: bool = False,
) -> VAECodec:
    """Load a VAE and return a codec for it.

    source: a weights file (local or any fsspec URL; .safetensors, .ckpt, .pt, .pth, .bin), a
      diffusers folder, a Hugging Face repo id, or `random:PRESET` for random weights (tests, demos).
    preset: the VAE family (scaling and architecture); required for bare weights files.
    """
    random_weights = source.startswith(RANDOM_PREFIX)
    if random_weights:
        chosen = _random_preset(source, preset)
        model = build_model(chosen, seed=seed)
        log.warning("VAE %s has RANDOM WEIGHTS (seed %d): latents are for tests and demos only", source, seed)
    else:
        chosen, state, weights_url = _read_weights(source, preset, storage_options)
        model = AutoencoderKL(chosen.arch)
        load_into(model, state, source=weights_url)
    fp = fingerprint(model)
    return VAECodec(
        model,
        chosen,
        fingerprint=f"random-{fp}" if random_weights else fp,
        source=source,
        device=resolve_device(device),
        dtype=dtype,
        random_weights=random_weights,
        tile_size=tile_size,
        tile_overlap=tile_overlap,
        channels_last=channels_last,
        compile=compile,
    )
