"""Our VAE codec against diffusers' AutoencoderKL: same weights, same input, one process, alternating.

Prints images/s for both and the ratio (ours / diffusers) per direction, and writes a JSON record to
bench/results/. On CUDA it also compares our bfloat16/float16 codec with diffusers' float16 default.

    python bench/bench_codec.py                      # CPU, float32, sd15, batch 4, 256x256
    python bench/bench_codec.py --device cuda --size 512 --batch 8 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae import get_preset, load_vae  # noqa: E402
from vae.codec import resolve_dtype  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="our codec's dtype")
    ap.add_argument("--ref-dtype", default=None, help="diffusers' dtype (default: same as --dtype)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL as DiffusersVAE

    preset = get_preset(args.preset)
    ref_dtype = resolve_dtype(args.ref_dtype or args.dtype)
    torch.manual_seed(0)
    ref = DiffusersVAE(**preset.diffusers_config()).eval()
    ours_path = Path(args.out) / "_bench_weights.safetensors"
    ours_path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ours_path))
    codec = load_vae(str(ours_path), preset=args.preset, device=args.device, dtype=args.dtype, tile_size=None)
    ours_path.unlink()
    ref = ref.to(args.device, ref_dtype)

    x = torch.rand(args.batch, 3, args.size, args.size, device=args.device) * 2 - 1
    lat = args.size // 8
    z = torch.randn(args.batch, preset.arch.latent_channels, lat, lat, device=args.device)

    def ours_encode():
        codec.encode(x)

    def ref_encode():
        with torch.no_grad():
            ref.encode(x.to(ref_dtype)).latent_dist.mean.float()

    def ours_decode():
        codec.decode(z)

    def ref_decode():
        with torch.no_grad():
            ref.decode(z.to(ref_dtype)).sample.float()

    rows = []
    for direction, ours_fn, ref_fn in (("encode", ours_encode, ref_encode), ("decode", ours_decode, ref_decode)):
        ours_fn(), ref_fn()  # warm-up
        t_ours, t_ref = [], []
        for _ in range(args.repeats):  # alternate so drift on a shared machine hits both alike
            t_ours.append(_time(ours_fn, args.device))
            t_ref.append(_time(ref_fn, args.device))
        ips_ours = args.batch / statistics.median(t_ours)
        ips_ref = args.batch / statistics.median(t_ref)
        rows.append({"direction": direction, "ours_img_s": ips_ours, "diffusers_img_s": ips_ref,
                     "ratio": ips_ours / ips_ref})

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\nVAE codec vs diffusers: preset={args.preset} device={args.device} ({device_name}) "
          f"ours={args.dtype} diffusers={str(ref_dtype).removeprefix('torch.')} batch={args.batch} "
          f"size={args.size} repeats={args.repeats} (medians)")
    print(f"{'direction':<10}{'ours img/s':>14}{'diffusers img/s':>18}{'ratio':>9}")
    for r in rows:
        print(f"{r['direction']:<10}{r['ours_img_s']:>14.2f}{r['diffusers_img_s']:>18.2f}{r['ratio']:>9.2f}")
    record = {"bench": "codec", "args": vars(args), "device_name": device_name,
              "torch": torch.__version__, "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = Path(args.out) / f"codec-{args.preset}-{args.device.replace(':', '')}-{args.dtype}-b{args.batch}-{args.size}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
