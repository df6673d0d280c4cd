"""bench/bench_gpu.py runs only where a GPU is lent, for a few minutes: its code is checked here, on the
CPU at toy sizes, without Ray or an S3 client (which a GPU machine does not get), so that it does not
rot between leases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_without_ray_and_accounts_for_every_photo(tmp_path) -> None:
    # In the child these imports fail, as on the GPU machine: Ray's wheel is too large to travel,
    # and it has no S3 client.
    code = ("import runpy, sys; sys.modules.update(dict.fromkeys(['ray', 's3fs', 'boto3', 'moto'])); "
            f"sys.argv = ['bench_gpu.py', '--smoke', '--out', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(ROOT / 'bench' / 'bench_gpu.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-*-smoke.json")
    record = json.loads(path.read_text())

    conv = record["conv"]
    assert conv["convs"] > 10 and conv["conv_tflops"] > 0 and conv["matmul_tflops"] > 0
    rows = record["codec"]
    variants = {"diffusers float32", "ours float32", "ours bfloat16"}
    for direction in ("encode", "decode"):
        mine = {r["variant"]: r for r in rows if r["direction"] == direction}
        assert set(mine) == variants and all(r["img_s"] > 0 for r in mine.values())
        flops = {r["tflop_per_img"] for r in mine.values()}
        assert len(flops) == 1 and flops.pop() > 0, "ours and diffusers' count the same FLOPs per image"
    decode_work = next(r["tflop_per_img"] for r in rows if r["direction"] == "decode")
    encode_work = next(r["tflop_per_img"] for r in rows if r["direction"] == "encode")
    assert decode_work > encode_work, "the decoder is the heavier half of the VAE"

    job = record["job"]
    assert job["images_read"] == job["images_written"] == 2 * 6, "every photo of the timed shards is written"
    assert job["shards"] == 2 and job["job_img_s"] > 0 and job["model_img_s"] > 0
    assert "job vs model" in done.stdout and "| tiny | 64 |" in done.stdout

    jpeg = record["jpeg"]
    assert jpeg["images"] == 8 and jpeg["cpu_img_s_per_core"] > 0
    if "device_img_s" in jpeg:  # torchvision imports (it does on the GPU machine; not in CI)
        # The device's crop is the CPU's up to the resize filter: same geometry, same photo.
        assert jpeg["device_img_s"] > 0 and jpeg["psnr_vs_cpu_db"] > 30, jpeg
        assert jpeg["cpu_cores_per_gpu"] == job["model_img_s"] / jpeg["cpu_img_s_per_core"]
    else:
        assert jpeg["device"].startswith("skipped: torchvision does not import here"), jpeg
