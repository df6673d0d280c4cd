"""Strict loading, sources, and clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.vae_reference import diffusers_vae
from vae import WeightsError, build_model, load_vae


def _save(state, path) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_missing_key_is_named(tmp_path):
    state = diffusers_vae("tiny").state_dict()
    del state["decoder.conv_out.bias"]
    with pytest.raises(WeightsError, match=r"missing keys: decoder\.conv_out\.bias"):
        load_vae(_save(state, tmp_path / "w.safetensors"), preset="tiny")


def test_unexpected_key_is_named(tmp_path):
    state = build_model("tiny").state_dict()
    state["encoder.extra_layer.weight"] = torch.zeros(2)
    with pytest.raises(WeightsError, match=r"unexpected keys: encoder\.extra_layer\.weight"):
        load_vae(_save(state, tmp_path / "w.safetensors"), preset="tiny")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    # sd15 weights are 4-channel; loading them as a 16-channel preset must fail, naming shapes.
    state = build_model("tiny").state_dict()
    state["quant_conv.weight"] = torch.zeros(6, 6, 1, 1)
    with pytest.raises(WeightsError, match=r"quant_conv\.weight: expected \(8, 8, 1, 1\), got \(6, 6, 1, 1\)"):
        load_vae(_save(state, tmp_path / "w.safetensors"), preset="tiny")


def test_bare_file_without_preset_asks_for_one(tmp_path):
    path = _save(build_model("tiny").state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="pass preset="):
        load_vae(path)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_vae(str(tmp_path / "nope.safetensors"), preset="tiny")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(WeightsError, match="unknown weights suffix"):
        load_vae(str(tmp_path / "weights.txt"), preset="tiny")


def test_corrupt_file_names_it(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(WeightsError, match="broken.safetensors"):
        load_vae(str(path), preset="tiny")


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match=r"unknown VAE preset 'sd9'.*sd15"):
        load_vae("random:sd9")


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": Evil()}}, str(path))
    with pytest.raises(WeightsError, match="evil.pt"):
        load_vae(str(path), preset="tiny")


def test_hub_repo_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=r"stabilityai/sd-vae-ft-mse.*not in the local cache"):
        load_vae("stabilityai/sd-vae-ft-mse", preset="sd15")


def test_random_weights_are_seeded_and_marked():
    a, b, c = load_vae("random:tiny", seed=1), load_vae("random:tiny", seed=1), load_vae("random:tiny", seed=2)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint.startswith("random-") and a.random_weights
    assert "RANDOM WEIGHTS" in repr(a)


def test_hub_repo_is_read_from_the_local_cache_offline(tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache layout without any network."""
    import huggingface_hub.constants as hc

    ref = diffusers_vae("tiny", seed=11)
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-vae" / "snapshots" / ("0" * 40)
    ref.save_pretrained(str(snapshot), safe_serialization=True)
    (cache / "models--acme--tiny-vae" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-vae" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    codec = load_vae("acme/tiny-vae")
    assert codec.preset.name == "custom" and codec.config.block_out_channels == (16, 32, 32, 32)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.mean
    assert torch.allclose(codec.encode(x).mean, expected, atol=1e-5)


@pytest.mark.parametrize("layout", ["diffusers", "compvis-fp16"])
def test_inspect_vae_fingerprints_the_file_as_load_vae_does(tmp_path, layout):
    """The driver plans with the fingerprint read from the file; actors must find the same one."""
    from vae import inspect_vae

    if layout == "diffusers":
        state = diffusers_vae("tiny").state_dict()
    else:
        state = {k: v.half() for k, v in build_model("tiny", seed=3).state_dict().items()}
    path = _save(state, tmp_path / "w.safetensors")
    info = inspect_vae(path, "tiny")
    codec = load_vae(path, preset="tiny")
    assert info.fingerprint == codec.fingerprint and not info.random_weights
    assert info.preset.scaling_factor == codec.scaling_factor
    assert inspect_vae("random:tiny", seed=4).fingerprint == load_vae("random:tiny", seed=4).fingerprint
