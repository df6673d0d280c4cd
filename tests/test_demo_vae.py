"""The built-in demo VAE (`builtin:tiny-demo`, trained by jobs/train_demo_vae.py): a diffusers
folder that diffusers itself loads and that reconstructs held-out photos recognisably; and the
diffusers layout it is saved in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from pipeline.transforms import to_model_input
from tests import imagedata
from vae import PRESETS, WeightsError, build_model, inspect_vae, load_vae
from vae.weights import BUILTIN_DIR, builtin_weights, to_diffusers_layout

DEMO = Path(BUILTIN_DIR) / "tiny-demo"


def _centre_crop(img: Image.Image, size: int = 256) -> np.ndarray:
    """As the training script evaluates: short side to `size` (LANCZOS), then the centre square."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.LANCZOS)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def test_diffusers_layout_loads_strictly_into_diffusers_and_gives_the_same_images():
    from diffusers import AutoencoderKL

    preset = PRESETS["tiny"]
    ours = build_model(preset, seed=3).eval()
    theirs = AutoencoderKL(**preset.diffusers_config()).eval()
    theirs.load_state_dict(to_diffusers_layout(ours.state_dict(), len(preset.arch.block_out_channels)), strict=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours.decode(z), theirs.decode(z).sample, atol=1e-5)


def test_builtin_demo_vae_is_a_trained_diffusers_folder_that_reconstructs_held_out_photos():
    from diffusers import AutoencoderKL

    assert "tiny-demo" in builtin_weights()
    assert (DEMO / "diffusion_pytorch_model.safetensors").stat().st_size < 5 * 2**20
    training = json.loads((DEMO / "training.json").read_text())
    config = json.loads((DEMO / "config.json").read_text())
    codec = load_vae("builtin:tiny-demo")
    assert not codec.random_weights and codec.scaling_factor == pytest.approx(config["scaling_factor"])
    assert codec.config == PRESETS["tiny"].arch
    assert inspect_vae("builtin:tiny-demo").fingerprint == codec.fingerprint
    theirs, info = AutoencoderKL.from_pretrained(str(DEMO), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert set(training["held_out_photos"]).isdisjoint(training["training_photos"])
    for name in training["held_out_photos"]:
        pixels = _centre_crop(imagedata.photo(name))
        x = to_model_input([pixels])
        mean, _ = codec.encode(x)
        image = codec.decode(mean)
        recon = ((image[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
        psnr = peak_signal_noise_ratio(pixels, recon, data_range=255)
        assert psnr == pytest.approx(training["held_out_psnr"][name], abs=0.05), name
        with torch.no_grad():
            ref = theirs.decode(theirs.encode(x).latent_dist.mode()).sample
        assert torch.allclose(image, ref, atol=1e-3), name
    assert training["held_out_psnr_mean"] >= 20.0


def test_unknown_builtin_vae_names_the_known_ones():
    with pytest.raises(WeightsError, match="tiny-demo"):
        load_vae("builtin:nope")
