"""Our AutoencoderKL equals diffusers' on the same weights, in both key layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.vae_reference import diffusers_vae, rel_err
from vae import load_vae
from vae.weights import to_compvis_layout, to_model_layout

TOL = 1e-4


def _reference_outputs(ref, x: torch.Tensor, z: torch.Tensor):
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        return dist.mean, dist.logvar, ref.decode(z).sample


def _assert_parity(codec, ref, x, z):
    mean_ref, logvar_ref, image_ref = _reference_outputs(ref, x, z)
    mean, logvar = codec.encode(x)
    image = codec.decode(z)
    assert mean.shape == mean_ref.shape and image.shape == image_ref.shape
    assert rel_err(mean, mean_ref) < TOL
    assert rel_err(logvar, logvar_ref) < TOL
    assert rel_err(image, image_ref) < TOL


def _diffusers_file(ref, tmp_path) -> str:
    path = tmp_path / "vae_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return str(path)


def _compvis_checkpoint(ref, preset: str, tmp_path) -> str:
    """A full-SD-style .ckpt: CompVis names under first_stage_model., conv-shaped attention, plus
    unrelated UNet keys that loading must ignore."""
    levels = len(ref.config.block_out_channels)
    compvis = to_compvis_layout(to_model_layout(ref.state_dict(), levels))
    assert compvis["encoder.mid.attn_1.q.weight"].ndim == 4
    state = {f"first_stage_model.{k}": v for k, v in compvis.items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    path = tmp_path / f"{preset}.ckpt"
    torch.save({"state_dict": state}, str(path))
    return str(path)


@pytest.mark.parametrize(
    "preset, size",
    [("sd15", (64, 64)), ("sdxl", (64, 64)), ("flux", (64, 64)), ("sd3", (48, 80)), ("tiny", (40, 72))],
)
def test_parity_diffusers_layout(preset, size, tmp_path):
    ref = diffusers_vae(preset, seed=1)
    codec = load_vae(_diffusers_file(ref, tmp_path), preset=preset)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    z = torch.randn(2, codec.config.latent_channels, size[0] // 8, size[1] // 8, generator=g)
    _assert_parity(codec, ref, x, z)


@pytest.mark.parametrize("preset, size", [("sd15", (64, 96)), ("flux", (64, 64))])
def test_parity_compvis_layout(preset, size, tmp_path):
    ref = diffusers_vae(preset, seed=3)
    codec = load_vae(_compvis_checkpoint(ref, preset, tmp_path), preset=preset)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, *size, generator=g) * 2 - 1
    z = torch.randn(1, codec.config.latent_channels, size[0] // 8, size[1] // 8, generator=g)
    _assert_parity(codec, ref, x, z)


def test_both_layouts_give_the_same_fingerprint(tmp_path):
    ref = diffusers_vae("tiny", seed=5)
    a = load_vae(_diffusers_file(ref, tmp_path), preset="tiny")
    b = load_vae(_compvis_checkpoint(ref, "tiny", tmp_path), preset="tiny")
    assert a.fingerprint == b.fingerprint
    other = load_vae(_diffusers_file(diffusers_vae("tiny", seed=6), tmp_path / ".."), preset="tiny")
    assert other.fingerprint != a.fingerprint


def test_diffusers_folder_reads_config_and_scaling(tmp_path):
    ref = diffusers_vae("flux", seed=7)
    ref.save_pretrained(str(tmp_path / "flux-vae"), safe_serialization=True)
    codec = load_vae(str(tmp_path / "flux-vae"))
    assert codec.config.latent_channels == 16
    assert codec.scaling_factor == pytest.approx(0.3611)
    assert codec.shift_factor == pytest.approx(0.1159)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = torch.randn(1, 16, 4, 4)
    _assert_parity(codec, ref, x, z)


def test_pipeline_folder_with_vae_subfolder(tmp_path):
    ref = diffusers_vae("tiny", seed=8)
    ref.save_pretrained(str(tmp_path / "pipe" / "vae"), safe_serialization=True)
    codec = load_vae(str(tmp_path / "pipe"), preset="tiny")
    assert codec.preset.name == "tiny"
    _assert_parity(codec, ref, torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 4, 4))


def test_old_diffusers_attention_names(tmp_path):
    ref = diffusers_vae("tiny", seed=9)
    renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    old = {}
    for k, v in ref.state_dict().items():
        for new, legacy in renames.items():
            k = k.replace(f"attentions.0.{new}", f"attentions.0.{legacy}")
        old[k] = v.contiguous()
    assert any(".query." in k for k in old)
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    _assert_parity(load_vae(str(path), preset="tiny"), ref,
                   torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 4, 4))


@pytest.mark.s3
def test_load_from_s3_url(s3_bucket, tmp_path):
    import fsspec

    ref = diffusers_vae("tiny", seed=10)
    local = _diffusers_file(ref, tmp_path)
    url = f"s3://{s3_bucket}/weights/vae.safetensors"
    fsspec.filesystem("s3").put(local, url)
    codec = load_vae(url, preset="tiny")
    assert codec.fingerprint == load_vae(local, preset="tiny").fingerprint


@pytest.mark.parametrize("preset", ["sd15", "flux"])
def test_our_compvis_layout_is_what_diffusers_single_file_loader_expects(preset):
    """Independent check of the key mapping: diffusers' own CompVis->diffusers converter, applied
    to our CompVis layout, gives back exactly the diffusers state dict we started from."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref = diffusers_vae(preset, seed=12)
    levels = len(ref.config.block_out_channels)
    compvis = to_compvis_layout(to_model_layout(ref.state_dict(), levels))
    converted = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in compvis.items()},
                                           dict(ref.config))
    expected = ref.state_dict()
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key].reshape(value.shape), value), key


def test_full_checkpoint_in_safetensors_reads_only_the_vae(tmp_path):
    from vae.weights import read_state_dict

    ref = diffusers_vae("tiny", seed=13)
    compvis = to_compvis_layout(to_model_layout(ref.state_dict(), 4))
    state = {f"first_stage_model.{k}": v.contiguous() for k, v in compvis.items()}
    state["model.diffusion_model.out.0.weight"] = torch.zeros(64, 64)
    state["cond_stage_model.transformer.embeddings.weight"] = torch.zeros(32, 8)
    path = tmp_path / "sd-full.safetensors"
    save_file(state, str(path))
    assert all(k.startswith("first_stage_model.") for k in read_state_dict(str(path)))
    _assert_parity(load_vae(str(path), preset="tiny"), ref, torch.rand(1, 3, 32, 32) * 2 - 1,
                   torch.randn(1, 4, 4, 4))
