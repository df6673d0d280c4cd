"""Checks that need CUDA (skipped elsewhere): parity and precision fallback on the GPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.vae_reference import diffusers_vae, rel_err
from vae import load_vae

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-3), ("bfloat16", 3e-2), ("float16", 1e-2)])
def test_cuda_matches_diffusers(dtype, tol, tmp_path):
    ref = diffusers_vae("sd15", seed=0)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    codec = load_vae(str(path), preset="sd15", device="cuda", dtype=dtype)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.mean
    assert rel_err(codec.encode(x).mean.cpu(), expected) < tol


def test_cuda_float16_overflow_falls_back():
    codec = load_vae("random:tiny", seed=0, device="cuda", dtype="float16")
    codec._reference.encoder.conv_in.weight.data.mul_(1e5)
    codec.model.encoder.conv_in.weight.data.copy_(codec._reference.encoder.conv_in.weight.data.half().cuda())
    mean, _ = codec.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert torch.isfinite(mean).all() and codec.stats.fp32_fallbacks == 2


def test_images_cross_to_the_gpu_as_uint8_and_are_normalised_there():
    import numpy as np

    from pipeline.transforms import to_model_input

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(3)]
    on_gpu = to_model_input(pixels, "cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32 and on_gpu.shape == (3, 3, 64, 48)
    assert torch.equal(on_gpu.cpu(), to_model_input(pixels))


def test_an_upload_proceeds_while_the_model_stream_is_busy():
    """One shard's batch crosses on the copy stream while the other shard's model holds the current
    stream: here a kernel that spins for about a second stands in for the model."""
    import time

    import numpy as np

    from pipeline.transforms import _upload, copy_stream, to_model_input

    device = torch.device("cuda", torch.cuda.current_device())
    pixels = [np.full((512, 512, 3), i, dtype=np.uint8) for i in range(16)]
    host = torch.from_numpy(np.stack(pixels))
    # Warm-up (the streams, the pinned pool) with other values: the batch's device block is then
    # likely this one reused, so a read that overtakes the copy sees these, not the batch.
    _upload(255 - host, device)
    torch.cuda.synchronize()
    busy = torch.cuda.current_stream(device)
    torch.cuda._sleep(int(2e9))  # about a second of the SMs' clock, on the current stream
    uploaded = _upload(host, device)
    # Read it back on a third stream that waits for the copy stream only: had the copy been queued
    # on the busy stream, this read would wait a second for it, or return what is not the batch.
    reader = torch.cuda.Stream(device=device)
    reader.wait_stream(copy_stream(device))
    t0 = time.perf_counter()
    with torch.cuda.stream(reader):
        back = uploaded.cpu()
    uploaded_s = time.perf_counter() - t0
    assert torch.equal(back, host), "the copy was not done when the copy stream said so"
    assert uploaded_s < 0.2, f"the upload waited {uploaded_s:.2f} s for the model's stream"
    assert not busy.query(), "the stand-in model ended before the upload was checked: make it spin longer"
    # The normalisation runs on the current stream, after the copy: the values are the host's.
    assert torch.equal(to_model_input(pixels, device).cpu(), to_model_input(pixels))
