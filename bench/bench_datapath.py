"""The data path per CPU core: JPEG bytes -> the crop the encode job hands the VAE, single-threaded.

For each JPEG size (640x480, 1024x768, 2048x1536; real photos bundled with scikit-image, cover-resized
and saved at quality 90 via tests/imagedata.py) and each target (256 and 512 px), three variants:

  pillow      Image.open(BytesIO(jpg)).convert("RGB").resize((t, t))  (plain Pillow, default filter)
  ours        pipeline.transforms.prepare with PreprocessConfig(resolution=t): decode, EXIF orientation,
              RGB, cover-resize (lanczos), centre crop, uint8 array
  ours+draft  the same with jpeg_draft=True: libjpeg decodes at 1/2, 1/4 or 1/8 scale where the
              JPEG is at least 2x the size the resize needs (transforms._decode: cover <= 0.5);
              elsewhere it is the same work as "ours" (shown as "no" in the draft column)

Everything runs in this one thread (torch.set_num_threads(1); Pillow decodes and resizes in the
calling thread). "img/s/core" is images per second of process CPU time, "wall" per wall second.
Medians of --repeats samples; within each repeat the variants alternate (rotating order), so drift
on a shared machine hits all alike. "PSNR" compares ours+draft with ours (full decode), in dB.
"cores/GPU" = GPU encode rate / img/s/core. The GPU rate is an ESTIMATE (--gpu-rate at 512 px,
default 700 img/s: the FLOP bound of sd15 encode on an H100 from BENCHMARKS.md), scaled by pixel
count to other targets unless --flat-gpu-rate; nothing here runs on a GPU.

    python bench/bench_datapath.py                        # defaults, about 1-2 min of CPU
    python bench/bench_datapath.py --repeats 9 --images 6 --markdown
    PYTHONPATH=/tmp/simd-venv/lib/python3.11/site-packages python bench/bench_datapath.py  # pillow-simd

The last form runs the same code with pillow-simd's PIL ahead of the project's Pillow (numpy, torch,
scikit-image still come from the project's venv). pillow-simd builds from source and needs the
libjpeg, zlib and lcms2 headers (Debian: libjpeg-dev zlib1g-dev liblcms2-dev; without lcms2,
pipeline.transforms fails to import ImageCms); it compiles SSE4 code unless built with AVX2:

    python -m venv /tmp/simd-venv && CC="cc -mavx2" /tmp/simd-venv/bin/pip install pillow-simd

The label is detected from PIL.__version__ (".postN" = pillow-simd) or given with --label.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps, features

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from imagedata import encode, photo

from pipeline.config import PreprocessConfig
from pipeline.transforms import prepare, to_model_input

SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1024, 768), (2048, 1536))
VARIANTS: tuple[str, ...] = ("pillow", "ours", "ours+draft")
Step = Callable[[bytes], object]


def make_jpegs(size: tuple[int, int], names: list[str], quality: int) -> list[bytes]:
    """Each photo cover-resized and centre-cropped to `size` (w, h), saved as JPEG (4:2:0)."""
    return [encode(ImageOps.fit(photo(n), size, Image.Resampling.LANCZOS), "JPEG", quality=quality)
            for n in names]


def steps(target: int) -> dict[str, Step]:
    full = PreprocessConfig(resolution=target)
    draft = PreprocessConfig(resolution=target, jpeg_draft=True)
    return {
        "pillow": lambda b: Image.open(io.BytesIO(b)).convert("RGB").resize((target, target)),
        "ours": lambda b: prepare({"__key__": "k", "jpg": b}, full),
        "ours+draft": lambda b: prepare({"__key__": "k", "jpg": b}, draft),
    }


def timed(step: Step, jpegs: list[bytes], passes: int) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) for `passes` passes over `jpegs`."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(passes):
        for b in jpegs:
            step(b)
    return time.process_time() - c0, time.perf_counter() - w0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def tensor_ms(target: int, batch: int, repeats: int) -> float:
    """CPU ms per image of to_model_input (uint8 HWC -> float32 NCHW in [-1, 1]) on a batch."""
    pixels = [np.full((target, target, 3), i, np.uint8) for i in range(batch)]
    runs = []
    for _ in range(repeats):
        c0 = time.process_time()
        to_model_input(pixels)
        runs.append(time.process_time() - c0)
    return 1000 * statistics.median(runs) / batch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError as exc:
        return f"{platform.processor() or platform.machine()} (/proc/cpuinfo: {exc.strerror})"
    return platform.processor() or platform.machine()


def bench_cell(size: tuple[int, int], target: int, jpegs: list[bytes], args: argparse.Namespace) -> list[dict]:
    fns = steps(target)
    outs = {v: [fns[v](b) for b in jpegs] for v in VARIANTS}  # warm-up, and the outputs to compare
    full_px = [p.pixels for p in outs["ours"]]
    draft_px = [p.pixels for p in outs["ours+draft"]]
    applied = any(not np.array_equal(a, b) for a, b in zip(full_px, draft_px))
    scores = [min(psnr(a, b), 99.0) for a, b in zip(draft_px, full_px)]  # 99: identical (JSON has no inf)
    once = timed(fns["ours"], jpegs, 1)[0]
    passes = max(1, math.ceil(args.sample_seconds / max(once, 1e-6)))
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        for v in VARIANTS[rep % 3:] + VARIANTS[:rep % 3]:
            c, w = timed(fns[v], jpegs, passes)
            cpu[v].append(c)
            wall[v].append(w)
    n = passes * len(jpegs)
    gpu = args.gpu_rate if args.flat_gpu_rate else args.gpu_rate * (args.gpu_rate_res / target) ** 2
    rows = []
    for v in VARIANTS:
        ips = n / statistics.median(cpu[v])
        rows.append({
            "jpeg": f"{size[0]}x{size[1]}", "target": target, "variant": v, "images_per_sample": n,
            "jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1024,
            "draft_applied": applied if v == "ours+draft" else None,
            "cpu_ms_per_image": 1000 / ips, "img_s_per_core": ips,
            "img_s_wall": n / statistics.median(wall[v]),
            "psnr_draft_vs_full_db_mean": statistics.mean(scores) if v == "ours+draft" and applied else None,
            "psnr_draft_vs_full_db_min": min(scores) if v == "ours+draft" and applied else None,
            "gpu_rate_estimate": gpu, "cores_per_gpu": gpu / ips,
        })
    base = rows[0]["img_s_per_core"]
    for r in rows:
        r["vs_pillow"] = r["img_s_per_core"] / base
    return rows


def print_table(rows: list[dict], markdown: bool) -> None:
    head = ["JPEG", "target", "variant", "KB", "draft", "CPU ms/img", "img/s/core", "img/s wall",
            "vs pillow", "PSNR dB", "GPU img/s (est.)", "cores/GPU"]
    table = []
    for r in rows:
        draft = "" if r["draft_applied"] is None else ("yes" if r["draft_applied"] else "no")
        score = "" if r["psnr_draft_vs_full_db_mean"] is None else (
            f"{r['psnr_draft_vs_full_db_mean']:.1f} (min {r['psnr_draft_vs_full_db_min']:.1f})")
        table.append([r["jpeg"], str(r["target"]), r["variant"], f"{r['jpeg_kb']:.0f}", draft,
                      f"{r['cpu_ms_per_image']:.2f}", f"{r['img_s_per_core']:.1f}", f"{r['img_s_wall']:.1f}",
                      f"{r['vs_pillow']:.2f}", score, f"{r['gpu_rate_estimate']:.0f}", f"{r['cores_per_gpu']:.1f}"])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|")
        for t in table:
            print("| " + " | ".join(t) + " |")
        return
    widths = [max(len(h), *(len(t[i]) for t in table)) + 2 for i, h in enumerate(head)]
    print("".join(h.rjust(w) if i >= 3 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for t in table:
        print("".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(t, widths))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="astronaut,coffee,chelsea,rocket,motorcycle_left,grace_hopper",
                    help="bundled photos (tests/imagedata.py names), comma-separated")
    ap.add_argument("--images", type=int, default=4, help="distinct JPEGs per size (the first N photos)")
    ap.add_argument("--targets", default="256,512")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=7, help="samples per variant (median)")
    ap.add_argument("--sample-seconds", type=float, default=0.25, help="about this much CPU per sample")
    ap.add_argument("--gpu-rate", type=float, default=700.0,
                    help="GPU encode img/s at --gpu-rate-res (an estimate: H100 FLOP bound, sd15)")
    ap.add_argument("--gpu-rate-res", type=int, default=512)
    ap.add_argument("--flat-gpu-rate", action="store_true", help="same GPU rate at every target")
    ap.add_argument("--label", default=None, help="default: pillow-simd if PIL.__version__ has .post, else pillow")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.photos.split(",")[: args.images]
    if len(names) < args.images:
        ap.error(f"--images {args.images} but only {len(names)} photos in --photos")
    targets = [int(t) for t in args.targets.split(",")]
    label = args.label or ("pillow-simd" if ".post" in PIL.__version__ else "pillow")

    t0, c0 = time.perf_counter(), time.process_time()
    rows = []
    for size in SIZES:
        jpegs = make_jpegs(size, names, args.quality)
        for target in targets:
            rows.extend(bench_cell(size, target, jpegs, args))
    tensor = {t: tensor_ms(t, 8, args.repeats) for t in targets}
    elapsed = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    machine = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
               "python": platform.python_version(), "pil": PIL.__version__, "pil_path": str(Path(PIL.__file__).parent),
               "libjpeg": features.version("jpg"), "libjpeg_turbo": features.version("libjpeg_turbo"),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(f"\ndata path per core [{label}]: PIL {PIL.__version__}, libjpeg-turbo {machine['libjpeg_turbo']}, "
          f"{machine['cpu']}, 1 thread; {len(names)} JPEGs per size (q{args.quality}: {', '.join(names)}), "
          f"medians of {args.repeats} alternating samples")
    print_table(rows, args.markdown)
    print("to_model_input (batch 8, CPU ms/img, not in the rows above): "
          + ", ".join(f"{t} px {ms:.2f}" for t, ms in tensor.items()))
    print(f"GPU img/s is an ESTIMATE, not a measurement (no GPU here): {args.gpu_rate:g} img/s at "
          f"{args.gpu_rate_res} px = sd15 encode FLOP bound on an H100 (BENCHMARKS.md)"
          + ("" if args.flat_gpu_rate else ", scaled by pixel count to other targets")
          + ". cores/GPU = that rate / img/s/core; tar reading, batching and writing are not included.")
    print(f"took {elapsed['wall_s']:.0f} s wall, {elapsed['cpu_s']:.0f} s CPU")
    record = {"bench": "datapath", "label": label, "args": vars(args), "machine": machine, "rows": rows,
              "to_model_input_ms_per_image": tensor, "elapsed": elapsed, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"datapath-{label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
