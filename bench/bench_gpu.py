"""The GPU path in one short run, for the few minutes a GPU machine is lent (issue 11, section 4).

Five tables, each printed as it completes and written with the rest to one JSON record (in the
order below but with the job and jpeg tables before the codec, whose compiles are the long part):

  flops      FLOPs per image of each preset at each size, counted on the meta device (no GPU needed:
             `--only flops` prints the table anywhere)
  conv rate  the device's own rate on the VAE's convolutions: every Conv2d of the sd15 encoder timed
             alone on the input it sees at --conv-size, channels_last, in bfloat16. The FLOPs of all
             of them over their time is the bound the model figures are read against (convolutions
             are almost all of the VAE's work); a large bfloat16 matrix product is shown beside it.
  codec      sd15 and sdxl, encode and decode, at each --sizes, in each --dtypes: our codec eager and,
             where --compile-for names it, compiled, against diffusers' AutoencoderKL as a user
             loads it (float16, NCHW, eager), timed alternately on the same input and weights.
             Achieved TFLOP/s counts the FLOPs of one call (torch.utils.flop_counter) over its
             median time, and "of conv rate" divides that by the first table (goal >= 60 % for
             sd15 encode at 512, >= 1.3x diffusers' float16).
  job        the encode job's own worker in this process (ShardProcessor, two shards at a time, as an
             actor runs them; no Ray, whose wheel is too large to travel to a GPU machine) on shards
             of real photos, against the same codec alone on ready-made batches of the same size:
             job images/s over model images/s (goal >= 0.9 at 512).
  jpeg       the GPU JPEG decoding lever (nvJPEG through torchvision's batched `decode_jpeg`, with the
             resize and crop on the device too) against the job's CPU path (`prepare`: Pillow decode
             with draft, Lanczos cover-resize, crop) on one core, on the same photos: images/s, the
             device's milliseconds per image, the cores per GPU each needs at the model's rate, and
             the PSNR between the two crops (they differ in filter, so latents would too). A
             machine where torchvision does not import says so in the row.

    python bench/bench_gpu.py --out "$OUT"           # on the GPU machine: bench/gpu_check.sh runs it
    python bench/bench_gpu.py --smoke --out /tmp/g   # the same code on a CPU at toy sizes (it is tested)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_codec import _sync  # noqa: E402
from vae import build_model, get_preset, load_vae  # noqa: E402
from vae.codec import resolve_dtype  # noqa: E402


def _per_call_s(fn: Callable[[], Any], device: str, *, iters: int, repeats: int) -> float:
    """Median over `repeats` of the mean time of `iters` back-to-back calls (one sync per repeat)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


# --- conv rate -----------------------------------------------------------------------------------


def conv_rate(args: argparse.Namespace) -> dict[str, Any]:
    """TFLOP/s of the device on the sd15 (or --conv-preset) encoder's convolutions, each timed alone."""
    device, dtype = args.device, resolve_dtype(args.conv_dtype)
    model = build_model(get_preset(args.conv_preset), seed=0).encoder.to(device, dtype)
    model = model.to(memory_format=torch.channels_last).eval()
    shapes: list[tuple[torch.nn.Conv2d, tuple[int, ...]]] = []
    hooks = [m.register_forward_pre_hook(lambda m, inp: shapes.append((m, tuple(inp[0].shape))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    x = torch.randn(args.conv_batch, 3, args.conv_size, args.conv_size, device=device, dtype=dtype)
    with torch.inference_mode():
        model(x.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    total_flops = total_s = 0.0
    with torch.inference_mode():
        for conv, shape in shapes:
            inp = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            out = conv(inp)
            flops = 2 * out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
            conv(inp)  # warm: cuDNN picks its algorithm on the first call
            total_s += _per_call_s(lambda c=conv, i=inp: c(i), device, iters=args.iters, repeats=args.repeats)
            total_flops += flops
    row = {"preset": args.conv_preset, "size": args.conv_size, "batch": args.conv_batch, "dtype": args.conv_dtype,
           "convs": len(shapes), "gflop_per_call": total_flops / 1e9, "conv_tflops": total_flops / total_s / 1e12}
    n = args.matmul_n
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    row["matmul_n"] = n
    row["matmul_tflops"] = 2 * n ** 3 / _per_call_s(lambda: a @ a, device, iters=args.iters, repeats=args.repeats) / 1e12
    print(f"\nconv rate: {row['convs']} convolutions of the {args.conv_preset} encoder at {args.conv_size} px, "
          f"batch {args.conv_batch}, {args.conv_dtype}, channels_last: {row['conv_tflops']:.1f} TFLOP/s "
          f"({row['gflop_per_call']:.0f} GFLOP per pass); {n}x{n} matrix product {row['matmul_tflops']:.1f} TFLOP/s",
          flush=True)
    return row


# --- codec ---------------------------------------------------------------------------------------


def _flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def flop_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """FLOPs per image of our model at each preset and size, counted on the meta device (no compute)."""
    rows = []
    for preset_name in args.presets:
        preset = get_preset(preset_name)
        model = build_model(preset).to("meta").eval()
        for size in args.sizes:
            x = torch.empty(1, 3, size, size, device="meta")
            z = torch.empty(1, preset.arch.latent_channels, size // 8, size // 8, device="meta")
            with torch.no_grad():
                rows.append({"preset": preset_name, "size": size, "encode_tflop": _flops(lambda: model.moments(x)) / 1e12,
                             "decode_tflop": _flops(lambda: model.decode(z)) / 1e12})
    print("\n| preset | size | encode TFLOP/img | decode TFLOP/img |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['size']} | {r['encode_tflop']:.3f} | {r['decode_tflop']:.3f} |", flush=True)
    return rows


@torch.no_grad()  # diffusers is called as a user calls it; our codec has inference_mode of its own
def codec_rows(args: argparse.Namespace, conv_tflops: float | None, emit: Callable[[dict], None]) -> None:
    """One row per (preset, size, direction, variant); see the module docstring."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from safetensors.torch import save_file

    device = args.device
    ref_dt = resolve_dtype(args.ref_dtype)
    for preset_name in args.presets:
        preset = get_preset(preset_name)
        torch.manual_seed(0)
        ref = DiffusersVAE(**preset.diffusers_config()).eval()
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "w.safetensors"
            save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
            ref = ref.to(device, ref_dt)
            codecs = {}
            for dtype in args.dtypes:  # the same weights in every variant
                codecs[f"ours {dtype}"] = load_vae(str(weights), preset=preset_name, device=device, dtype=dtype,
                                                   tile_size=None)
                if dtype == args.dtypes[0] and any(c.startswith(f"{preset_name}-") for c in args.compile_for):
                    codecs[f"ours {dtype} +compile"] = load_vae(str(weights), preset=preset_name, device=device,
                                                                dtype=dtype, tile_size=None, compile=True)
        for size in args.sizes:
            batch = max(1, args.pixels // (size * size))
            g = torch.Generator().manual_seed(1)
            x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
            z = torch.randn(batch, preset.arch.latent_channels, size // 8, size // 8, generator=g).to(device)
            for direction in args.directions:
                reference = (lambda: ref.encode(x.to(ref_dt)).latent_dist.mean) if direction == "encode" \
                    else (lambda: ref.decode(z.to(ref_dt)).sample)
                calls: dict[str, Callable[[], Any]] = {f"diffusers {args.ref_dtype}": reference}
                for name, codec in codecs.items():
                    if name.endswith("+compile") and f"{preset_name}-{size}" not in args.compile_for:
                        continue
                    calls[name] = (lambda c=codec: c.encode(x).mean) if direction == "encode" \
                        else (lambda c=codec: c.decode(z))
                warm = {}
                for name, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()  # the first call compiles, where compiled; cuDNN picks its algorithms
                    fn()
                    _sync(device)
                    warm[name] = time.perf_counter() - t0
                # Each eager variant's own count (diffusers' too: the same architecture must do the same
                # work); a compiled one is counted as its eager twin, which runs the same ops.
                flops = {name: _flops(fn) / batch for name, fn in calls.items() if not name.endswith("+compile")}
                flops.update({name: flops[name.removesuffix(" +compile")] for name in calls if name not in flops})
                times: dict[str, list[float]] = {name: [] for name in calls}
                for _ in range(args.repeats):  # alternate: drift hits every variant alike
                    for name, fn in calls.items():
                        times[name].append(_per_call_s(fn, device, iters=args.iters, repeats=1))
                base = batch / statistics.median(times[f"diffusers {args.ref_dtype}"])
                for name, t in times.items():
                    img_s = batch / statistics.median(t)
                    tflops = flops[name] * img_s / 1e12
                    emit({"preset": preset_name, "size": size, "batch": batch, "direction": direction,
                          "variant": name, "img_s": img_s, "vs_diffusers": img_s / base,
                          "tflop_per_img": flops[name] / 1e12, "tflops": tflops,
                          "of_conv_rate": tflops / conv_tflops if conv_tflops else None,
                          "warmup_s": warm[name], "times_s": t})


# --- job -----------------------------------------------------------------------------------------


def job_vs_model(args: argparse.Namespace) -> dict[str, Any]:
    """The encode worker on real photos (two shards at a time, as an actor) against its codec alone."""
    from bench_pipeline import make_shards

    from pipeline.config import EncodeConfig, PreprocessConfig, VAEConfig
    from pipeline.core.kind import PlanContext
    from pipeline.core.ledger import Ledger, build_manifest
    from pipeline.core.scheduler import ShardTask
    from pipeline.core.shard import ShardProcessor
    from pipeline.jobs.encode import EncodeJob

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        make_shards(folder, args.job_shards + 1, args.job_per_shard, args.photo_side)  # +1: warm-up
        cfg = EncodeConfig(input=(str(folder),), output=str(Path(tmp) / "out"),
                           vae=VAEConfig(source=f"random:{args.job_preset}", dtype=args.job_dtype,
                                         device=args.device),
                           preprocess=PreprocessConfig(resolution=args.job_size), batch_size=args.job_batch,
                           decode_threads=args.decode_threads)
        kind = EncodeJob()
        plan = kind.plan(cfg, kind.inputs(cfg), PlanContext(device="cuda" if args.device.startswith("cuda") else "cpu"))
        Ledger(cfg.output).open_job(build_manifest(kind="encode", identity=plan.identity, shards=plan.inputs,
                                                   data_extension=cfg.format, code_version="bench"), overwrite=False)
        worker = kind.worker(cfg, plan)
        processor = ShardProcessor(worker, output=cfg.output, identity=plan.identity)
        tasks = [ShardTask(name, url) for name, url in sorted(plan.inputs.items())]
        processor.process(tasks[0])  # warm-up: cuDNN's algorithms, the threads, lazy imports
        _sync(args.device)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=2) as shards:  # an actor's two shards at a time
            results = list(shards.map(processor.process, tasks[1:]))
        job_s = time.perf_counter() - t0
        images = sum(r.samples_written for r in results)
        read = sum(r.samples_read for r in results)
        codec = worker.codec
        # On the device already, as the job's batches are when the model starts (uint8 crossed, normalised there).
        x = (torch.rand(args.job_batch, 3, args.job_size, args.job_size) * 2 - 1).to(args.device)
        model_s = _per_call_s(lambda: codec.encode(x), args.device, iters=max(1, images // args.job_batch),
                              repeats=args.repeats)
    row = {"preset": args.job_preset, "size": args.job_size, "dtype": args.job_dtype, "batch": args.job_batch,
           "decode_threads": args.decode_threads, "photo_side": args.photo_side, "shards": len(results),
           "images_read": read, "images_written": images, "job_img_s": images / job_s,
           "model_img_s": args.job_batch / model_s}
    row["ratio"] = row["job_img_s"] / row["model_img_s"]
    print(f"\njob vs model: {args.job_preset} {args.job_size} px {args.job_dtype}, batch {args.job_batch}, "
          f"{args.decode_threads} decode threads, {images} photos of {args.photo_side} px in {len(results)} shards: "
          f"job {row['job_img_s']:.1f} img/s, model alone {row['model_img_s']:.1f} img/s, ratio {row['ratio']:.2f}",
          flush=True)
    return row


def jpeg_decode(args: argparse.Namespace) -> dict[str, Any]:
    """The job's CPU decode of JPEGs (one core) against torchvision's nvJPEG decode on the device."""
    import numpy as np
    import torch.nn.functional as F
    from bench_pipeline import photo_jpegs

    from pipeline.config import PreprocessConfig
    from pipeline.transforms import prepare

    size = args.job_size
    photos = photo_jpegs(args.photo_side)
    jpegs = (photos * -(-args.jpeg_images // len(photos)))[:args.jpeg_images]
    cfg = PreprocessConfig(resolution=size)
    cpu0, t0 = time.process_time(), time.perf_counter()
    cpu = [prepare({"__key__": str(i), "jpg": data}, cfg).pixels for i, data in enumerate(jpegs)]
    row: dict[str, Any] = {"images": len(jpegs), "photo_side": args.photo_side, "size": size,
                           "cpu_img_s_per_core": len(jpegs) / (time.process_time() - cpu0),
                           "cpu_img_s_wall_one_thread": len(jpegs) / (time.perf_counter() - t0)}
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, OSError, RuntimeError) as e:  # a torchvision built for another torch fails to load
        row["device"] = f"skipped: torchvision does not import here ({type(e).__name__}: {e})"
        print(f"\njpeg: CPU {row['cpu_img_s_per_core']:.1f} img/s per core; {row['device']}", flush=True)
        return row
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]

    def on_device(chunk: list[torch.Tensor]) -> torch.Tensor:
        crops = []
        for img in decode_jpeg(chunk, mode=ImageReadMode.RGB, device=args.device):
            h, w = img.shape[-2:]
            scale = size / min(h, w)
            rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
            resized = F.interpolate(img[None].float(), size=(rh, rw), mode="bicubic", antialias=True)
            top, left = (rh - size) // 2, (rw - size) // 2
            crops.append(resized[..., top:top + size, left:left + size])
        return torch.cat(crops).clamp_(0, 255).round_().to(torch.uint8)

    batches = [encoded[i:i + args.job_batch] for i in range(0, len(encoded), args.job_batch)]
    device = torch.cat([on_device(b) for b in batches])  # warm-up, and the crops compared below
    per_pass = _per_call_s(lambda: [on_device(b) for b in batches], args.device, iters=1, repeats=args.repeats)
    diffs = [float(np.mean((c.astype(np.float64) - d.permute(1, 2, 0).cpu().numpy()) ** 2))
             for c, d in zip(cpu, device)]
    row.update(device_img_s=len(jpegs) / per_pass, device_ms_per_img=1000 * per_pass / len(jpegs),
               psnr_vs_cpu_db=float(np.median([10 * np.log10(255 ** 2 / max(d, 1e-12)) for d in diffs])))
    print(f"\njpeg: {len(jpegs)} photos of {args.photo_side} px to {size} px: CPU {row['cpu_img_s_per_core']:.1f} "
          f"img/s per core; {args.device} decode_jpeg + resize {row['device_img_s']:.1f} img/s "
          f"({row['device_ms_per_img']:.2f} ms per image); PSNR device vs CPU crop {row['psnr_vs_cpu_db']:.1f} dB",
          flush=True)
    return row


# --- main ----------------------------------------------------------------------------------------

SMOKE = {"presets": "tiny", "sizes": "64", "dtypes": "float32,bfloat16", "ref_dtype": "float32", "pixels": 2 * 64 * 64,
         "compile_for": "", "conv_preset": "tiny", "conv_size": 64, "conv_batch": 1, "conv_dtype": "float32",
         "matmul_n": 256, "job_preset": "tiny", "job_size": 64, "job_dtype": "float32", "job_batch": 4,
         "job_shards": 2, "job_per_shard": 6, "photo_side": 128, "decode_threads": 2, "jpeg_images": 8, "iters": 1,
         "repeats": 2}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="+", choices=["flops", "conv", "codec", "job", "jpeg"],
                    default=["flops", "conv", "codec", "job", "jpeg"])
    ap.add_argument("--presets", default="sd15,sdxl")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--directions", default="encode,decode")
    ap.add_argument("--dtypes", default="bfloat16,float16", help="our codec's dtypes")
    ap.add_argument("--ref-dtype", default="float16", help="diffusers' dtype (its usual GPU default)")
    ap.add_argument("--pixels", type=int, default=16 * 512 * 512, help="pixels per call: batch = pixels / size^2")
    ap.add_argument("--compile-for", default="sd15-512",
                    help="preset-size pairs that also run compiled, in the first of --dtypes (a compile takes a minute)")
    ap.add_argument("--conv-preset", default="sd15")
    ap.add_argument("--conv-size", type=int, default=512)
    ap.add_argument("--conv-batch", type=int, default=16)
    ap.add_argument("--conv-dtype", default="bfloat16")
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--job-preset", default="sd15")
    ap.add_argument("--job-size", type=int, default=512)
    ap.add_argument("--job-dtype", default="bfloat16")
    ap.add_argument("--job-batch", type=int, default=16)
    ap.add_argument("--job-shards", type=int, default=8)
    ap.add_argument("--job-per-shard", type=int, default=128)
    ap.add_argument("--photo-side", type=int, default=1024, help="long side of the JPEGs in the job's shards")
    ap.add_argument("--decode-threads", type=int, default=12)
    ap.add_argument("--jpeg-images", type=int, default=256, help="photos the jpeg table decodes each way")
    ap.add_argument("--iters", type=int, default=5, help="calls per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on any device: checks the script, measures nothing")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if args.smoke:
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    for name in ("presets", "sizes", "directions", "dtypes", "compile_for"):
        value = [v for v in getattr(args, name).split(",") if v]
        setattr(args, name, [int(v) for v in value] if name == "sizes" else value)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}{'-smoke' if args.smoke else ''}.json"
    record: dict[str, Any] = {"bench": "gpu", "args": vars(args), "device_name": device_name,
                              "torch": torch.__version__, "flops": None, "conv": None, "codec": [], "job": None,
                              "jpeg": None}

    def save() -> None:  # after every row: a run cut short by its time limit still leaves its figures
        path.write_text(json.dumps(record, indent=2))

    print(f"GPU path: {device_name}, torch {torch.__version__}" + (" (smoke: toy sizes)" if args.smoke else ""),
          flush=True)
    t0 = time.perf_counter()
    if "flops" in args.only:
        record["flops"] = flop_table(args)
        save()
    if "conv" in args.only:
        record["conv"] = conv_rate(args)
        save()
    if "job" in args.only:
        record["job"] = job_vs_model(args)
        save()
    if "jpeg" in args.only:
        jpeg = record["jpeg"] = jpeg_decode(args)
        if record["job"] and "device_img_s" in jpeg:  # cores per GPU to feed the model, each way
            model = record["job"]["model_img_s"]
            jpeg["cpu_cores_per_gpu"] = model / jpeg["cpu_img_s_per_core"]
            jpeg["device_share_of_model_time"] = model / jpeg["device_img_s"]
            print(f"jpeg: at the model's {model:.0f} img/s, CPU decoding needs {jpeg['cpu_cores_per_gpu']:.1f} "
                  f"cores; decoding on the device takes {100 * jpeg['device_share_of_model_time']:.0f} % of its "
                  "time on top of the model's", flush=True)
        save()
    if "codec" in args.only:
        conv_tflops = record["conv"]["conv_tflops"] if record["conv"] else None
        print("\n| preset | size | batch | direction | variant | img/s | vs diffusers | GFLOP/img | TFLOP/s | "
              "of conv rate | warm-up s |\n|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|", flush=True)

        def emit(row: dict) -> None:
            record["codec"].append(row)
            save()
            share = "—" if row["of_conv_rate"] is None else f"{100 * row['of_conv_rate']:.0f} %"
            print(f"| {row['preset']} | {row['size']} | {row['batch']} | {row['direction']} | {row['variant']} | "
                  f"{row['img_s']:.1f} | {row['vs_diffusers']:.2f} | {1000 * row['tflop_per_img']:.1f} | "
                  f"{row['tflops']:.1f} | {share} | {row['warmup_s']:.1f} |", flush=True)

        codec_rows(args, conv_tflops, emit)
    record["wall_s"] = time.perf_counter() - t0
    save()
    print(f"\nwrote {path} ({record['wall_s']:.0f} s)")
    return record


if __name__ == "__main__":
    main()
