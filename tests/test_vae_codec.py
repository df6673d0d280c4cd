"""The codec's behaviour: tiling, non-finite fallback, out-of-memory splitting, scaling, checks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.vae_reference import rel_err
from vae import load_vae
from vae.codec import CodecStats, split_on_oom, tiled


def _photo(size: int) -> torch.Tensor:
    import skimage

    path = os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")
    img = Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_tiler_is_exact_for_local_functions():
    x = torch.randn(2, 3, 200, 264)
    pool = lambda t: F.avg_pool2d(t, 8)  # noqa: E731
    assert rel_err(tiled(pool, x, tile=64, overlap=16, ratio=1 / 8), pool(x)) < 1e-6
    z = torch.randn(2, 4, 25, 33)
    up = lambda t: F.interpolate(t, scale_factor=8, mode="nearest")  # noqa: E731
    assert rel_err(tiled(up, z, tile=8, overlap=2, ratio=8), up(z)) < 1e-6


def test_tiled_decode_approaches_untiled_and_blending_helps():
    """Random tiny weights are far less local than a trained VAE, so the bounds are loose; what must
    hold is that larger tiles and blended overlaps bring the result closer to the untiled one."""
    x = _photo(512)
    full = load_vae("random:tiny", seed=0, tile_size=None)
    z = full.encode(x).mean
    reference = full.decode(z)
    errors = {}
    for tile in (128, 256, 384):
        out = load_vae("random:tiny", seed=0, tile_size=tile, tile_overlap=tile // 4).decode(z)
        assert out.shape == reference.shape == (1, 3, 512, 512)
        errors[tile] = rel_err(out, reference)
    hard = rel_err(load_vae("random:tiny", seed=0, tile_size=256, tile_overlap=0).decode(z), reference)
    assert errors[128] > errors[256] > errors[384]
    assert errors[384] < 0.45, errors
    assert errors[256] < hard


def test_tiled_encode_approaches_untiled():
    x = _photo(512)
    reference = load_vae("random:tiny", seed=0, tile_size=None).encode(x).mean
    err = {t: rel_err(load_vae("random:tiny", seed=0, tile_size=t, tile_overlap=t // 4).encode(x).mean,
                      reference) for t in (256, 384)}
    assert err[384] < err[256] and err[384] < 0.25, err
    # An image no larger than a tile is never tiled: bit-identical.
    small = load_vae("random:tiny", seed=0, tile_size=512, tile_overlap=128).encode(x).mean
    assert torch.equal(small, reference)


def _overflowing_codec(dtype: str, part: str = "encoder"):
    """A reduced-precision codec and a float32 one, with the first conv of `part` scaled up so its
    activations exceed float16's range (65504) but not float32's; the weights (|w| < 0.2) still fit."""
    codec = load_vae("random:tiny", seed=0, dtype=dtype, tile_size=None)
    reference = load_vae("random:tiny", seed=0, tile_size=None)
    for model in (codec._reference, reference.model):
        getattr(model, part).conv_in.weight.data.mul_(1e5)
    inflated = getattr(codec._reference, part).conv_in.weight.data
    getattr(codec.model, part).conv_in.weight.data.copy_(inflated.to(codec.dtype))
    return codec, reference


def test_float16_overflow_falls_back_to_float32():
    codec, reference = _overflowing_codec("float16")
    x = _photo(64).repeat(3, 1, 1, 1)
    with torch.no_grad():
        raw = codec.model.encoder(x.half().contiguous(memory_format=torch.channels_last))
    assert not torch.isfinite(raw).all(), "the test setup must overflow in float16"
    mean, logvar = codec.encode(x)
    assert torch.isfinite(mean).all() and torch.isfinite(logvar).all()
    assert codec.stats.fp32_fallbacks == 3
    assert rel_err(mean, reference.encode(x).mean) < 1e-4


def test_only_the_overflowing_sample_is_recomputed():
    codec, reference = _overflowing_codec("float16")
    x = _photo(64).repeat(2, 1, 1, 1)
    x[1] *= 1e-3  # tiny input: stays in range even with the inflated weights
    with torch.no_grad():
        raw = codec.model.encoder(x.half().contiguous(memory_format=torch.channels_last))
    finite = torch.isfinite(raw).flatten(1).all(1).tolist()
    assert finite == [False, True], "setup: sample 0 overflows, sample 1 does not"
    mean, _ = codec.encode(x)
    assert torch.isfinite(mean).all()
    assert codec.stats.fp32_fallbacks == 1


def test_split_on_oom_halves_until_it_fits():
    calls = []

    def fn(t):
        calls.append(t.shape[0])
        if t.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return t * 2

    stats = CodecStats()
    x = torch.arange(7.0).reshape(7, 1)
    out = split_on_oom(fn, x, stats)
    assert torch.equal(out, x * 2)
    assert calls[0] == 7 and max(calls[1:]) <= 4
    assert stats.oom_splits >= 2


def test_split_on_oom_reraises_other_errors_and_single_samples():
    def bad(t):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        split_on_oom(bad, torch.zeros(4, 1), CodecStats())

    def oom(t):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        split_on_oom(oom, torch.zeros(1, 1), CodecStats())


def test_scale_and_unscale_use_shift_and_scaling():
    flux = load_vae("random:flux", seed=0)
    mean = torch.randn(1, 16, 2, 2)
    scaled = flux.scale(mean)
    assert torch.allclose(scaled, (mean - 0.1159) * 0.3611)
    assert torch.allclose(flux.unscale(scaled), mean, atol=1e-6)
    sd = load_vae("random:tiny", seed=0)
    assert sd.shift_factor == 0.0


def test_bfloat16_is_close_to_float32():
    x = _photo(64)
    fp32 = load_vae("random:tiny", seed=0).encode(x).mean
    bf16 = load_vae("random:tiny", seed=0, dtype="bfloat16")
    mean = bf16.encode(x).mean
    assert mean.dtype == torch.float32
    assert rel_err(mean, fp32) < 0.05


def test_bad_inputs_are_named():
    codec = load_vae("random:tiny", seed=0)
    with pytest.raises(ValueError, match=r"images must be a float tensor \(B, 3, H, W\)"):
        codec.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match="multiples of 8, got \\(60, 64\\)"):
        codec.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_vae("random:tiny", dtype="float8")


def test_decode_overflow_falls_back_to_float32():
    codec, reference = _overflowing_codec("float16", part="decoder")
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        raw = codec.model.decode(z.half().contiguous(memory_format=torch.channels_last))
    assert not torch.isfinite(raw).all(), "the test setup must overflow in float16"
    image = codec.decode(z)
    assert torch.isfinite(image).all() and codec.stats.fp32_fallbacks == 2
    assert rel_err(image, reference.decode(z)) < 1e-4


def test_preset_that_contradicts_the_config_scaling_is_refused(tmp_path):
    from tests.vae_reference import diffusers_vae

    diffusers_vae("sdxl", seed=0).save_pretrained(str(tmp_path / "sdxl"), safe_serialization=True)
    with pytest.raises(ValueError, match=r"preset 'sd15' has scaling_factor=0.18215, but .* says 0.13025"):
        load_vae(str(tmp_path / "sdxl"), preset="sd15")
    assert load_vae(str(tmp_path / "sdxl"), preset="sdxl").scaling_factor == 0.13025


def test_group_norm_op_matches_group_norm_and_passes_opcheck():
    """The op torch.compile sees instead of GroupNorm(+SiLU): same values, a valid schema and fake."""
    from vae.model import _group_norm_op

    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    plain = F.group_norm(x, 8, w, b, 1e-6)
    assert torch.equal(_group_norm_op(x, w, b, 8, 1e-6, False), plain)
    fused = _group_norm_op(x, w, b, 8, 1e-6, True)
    assert torch.equal(fused, F.silu(plain))
    assert fused.is_contiguous(memory_format=torch.channels_last)
    for silu in (False, True):
        torch.library.opcheck(_group_norm_op, (x, w, b, 8, 1e-6, silu),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_compiled_codec_matches_eager():
    x = _photo(64).repeat(2, 1, 1, 1)
    eager = load_vae("random:tiny", seed=0, tile_size=None)
    compiled = load_vae("random:tiny", seed=0, tile_size=None, compile=True)
    mean = eager.encode(x).mean
    assert rel_err(compiled.encode(x).mean, mean) < 1e-5
    assert rel_err(compiled.decode(mean), eager.decode(mean)) < 1e-5
