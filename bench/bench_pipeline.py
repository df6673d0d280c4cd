"""End-to-end throughput of the encode, decode and audit jobs, side by side with their baselines, in one run.

Four comparisons (medians over --repeats alternating runs; Ray is started once, before timing):

  model   the encode job (one actor) vs. the model alone on ready-made batches of the same size:
          shows how much of the model's speed survives reading, decoding and writing
          (goal >= 0.9 where the model dominates, e.g. sd15).
  decode  the decode job (one actor) vs. the decoder alone on ready-made latent batches of the
          same size: reading latent shards, PNG encoding and tar writing must cost little
          (goal >= 0.9, sd15 at 256 px on CPU).
  audit   the audit job vs. the decode job (one actor each) on the same latents: what reading the
          source images, preparing them and scoring (PSNR, SSIM, previews) costs beside the model.
  loop    the job (--actors actors, decode threads) vs. a plain single-process loop doing the
          same work with the same building blocks (read tar, decode, resize, encode, write):
          shows what the actors and the threaded decoding buy (goal >= 1.6 on 2 cores, tiny VAE).

"wall" ratios include start-up (actors importing torch and loading the VAE, the baseline loading
its codec); "steady" ratios exclude it, which is what a long job sees.

    python bench/bench_pipeline.py                         # all comparisons, CPU defaults
    python bench/bench_pipeline.py --only model --preset sd15 --resolution 512 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import AuditConfig, DecodeConfig, EncodeConfig, PreprocessConfig, VAEConfig  # noqa: E402
from pipeline.core.kind import PlanContext, shard_metadata  # noqa: E402
from pipeline.demo import bundled_photos, write_tar  # noqa: E402
from pipeline.io.latent_reader import read_latents  # noqa: E402
from pipeline.io.latent_writers import LatentRecord, make_writer  # noqa: E402
from pipeline.io.shards import expand_inputs, shard_name  # noqa: E402
from pipeline.io.tar_reader import iter_shard  # noqa: E402
from pipeline.jobs import run  # noqa: E402
from pipeline.jobs.encode import EncodeJob  # noqa: E402
from pipeline.jobs.vae_worker import build_codec  # noqa: E402
from pipeline.samples import SampleError  # noqa: E402
from pipeline.transforms import prepare, to_model_input  # noqa: E402


def photo_jpegs(side: int) -> list[bytes]:
    """The bundled real photos resized to about `side` px on the long side, as JPEG (quality 90)."""
    photos = []
    for _, path in sorted(bundled_photos().items()):
        img = Image.open(path).convert("RGB")
        scale = side / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        photos.append(buf.getvalue())
    return photos


def make_shards(folder: Path, n_shards: int, per_shard: int, side: int) -> None:
    """Shards of `photo_jpegs(side)`, `per_shard` each, cycled."""
    photos = photo_jpegs(side)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        write_tar(folder / f"bench-{s:05d}.tar",
                  [(f"{s:05d}_{i:05d}.jpg", photos[(s * per_shard + i) % len(photos)]) for i in range(per_shard)])


def run_job(cfg: EncodeConfig | DecodeConfig | AuditConfig) -> dict:
    """The real job; returns images, wall seconds, and seconds after the first actor had its VAE."""
    t0 = time.perf_counter()
    summary = run(cfg, progress=False)
    wall = time.perf_counter() - t0
    return {"images": summary.samples_read, "wall_s": wall, "steady_images": summary.samples_read,
            "steady_s": summary.steady_seconds}


def run_plain_loop(cfg: EncodeConfig) -> dict:
    """The same work in one process, one thing at a time: read, decode, batch, encode, write."""
    t0 = time.perf_counter()
    codec = build_codec(cfg.vae)
    kind = EncodeJob()
    plan = kind.plan(cfg, kind.inputs(cfg), PlanContext(device=str(codec.device.type)))
    meta, columns = shard_metadata(plan), plan.identity["passthrough"]
    t_ready = time.perf_counter()
    images = 0
    for url in expand_inputs(cfg.input):
        writer = make_writer(cfg.format, cfg.output, shard_name(url), meta, latent_dtype=cfg.latent_dtype,
                             columns=columns)
        batch = []

        def flush(batch: list, writer=writer) -> None:
            mean, logvar = codec.encode(to_model_input([p.pixels for p in batch]))
            latent = codec.scale(mean).numpy()
            for i, p in enumerate(batch):
                writer.add(LatentRecord(p.key, latent[i], logvar[i].numpy(), p.original_size, p.crop_top_left,
                                        p.target_size, extras=p.extras))

        for item in iter_shard(url):
            images += 1
            if isinstance(item, SampleError):
                continue
            batch.append(prepare(item, cfg.preprocess))
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        writer.commit()
    end = time.perf_counter()
    return {"images": images, "wall_s": end - t0, "steady_images": images, "steady_s": end - t_ready}


def _time_model(codec, step, x: torch.Tensor, images: int, t_start: float) -> dict:
    """`step(x)` until `images` images are done; wall time from `t_start` (before the codec loaded)."""
    t0 = time.perf_counter()
    done = 0
    while done < images:
        step(x)
        done += x.shape[0]
    if str(codec.device).startswith("cuda"):
        torch.cuda.synchronize()
    end = time.perf_counter()
    return {"images": done, "wall_s": end - t_start, "steady_images": done, "steady_s": end - t0}


def run_model_only(cfg: EncodeConfig, images: int) -> dict:
    """The codec alone on ready-made batches: `images` images at the job's resolution and batch size."""
    t_start = time.perf_counter()
    codec = build_codec(cfg.vae)
    r = cfg.preprocess.resolution
    return _time_model(codec, codec.encode, torch.rand(cfg.batch_size, 3, r, r) * 2 - 1, images, t_start)


def run_decoder_only(cfg: DecodeConfig, images: int, latents: str) -> dict:
    """The decoder alone on ready-made batches of the latents' shape and the job's batch size."""
    t_start = time.perf_counter()
    codec = build_codec(VAEConfig(source=cfg.vae.source or "random:sd15", device=cfg.vae.device))
    _, latent, _ = next(read_latents(latents))
    z = codec.unscale(torch.from_numpy(latent.astype("float32"))[None].repeat(cfg.batch_size, 1, 1, 1))
    return _time_model(codec, codec.decode, z, images, t_start)


def ips(r: dict, steady: bool) -> float:
    return (r["steady_images"] / r["steady_s"]) if steady else (r["images"] / r["wall_s"])


def compare(name: str, job_cfg: EncodeConfig | DecodeConfig, baseline, repeats: int, tmp: Path) -> dict:
    job_runs, base_runs = [], []
    for rep in range(repeats):  # alternate, so drift on a shared machine hits both alike
        out = tmp / f"out-{name}-{rep}"
        job_runs.append(run_job(dataclasses.replace(job_cfg, output=str(out))))
        shutil.rmtree(out, ignore_errors=True)
        base_out = tmp / f"base-{name}-{rep}"
        base_out.mkdir()
        base_runs.append(baseline(dataclasses.replace(job_cfg, output=str(base_out)), job_runs[-1]["images"]))
        shutil.rmtree(base_out, ignore_errors=True)
    row = {"comparison": name, "images": job_runs[0]["images"]}
    for kind in ("wall", "steady"):
        job = statistics.median(ips(r, kind == "steady") for r in job_runs)
        base = statistics.median(ips(r, kind == "steady") for r in base_runs)
        row[f"job_{kind}_img_s"], row[f"baseline_{kind}_img_s"], row[f"{kind}_ratio"] = job, base, job / base
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["model", "decode", "audit", "loop"], default=None)
    ap.add_argument("--preset", default="sd15", help="VAE for the model comparison (random weights)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--model-images", type=int, default=48)
    ap.add_argument("--loop-shards", type=int, default=12)
    ap.add_argument("--loop-per-shard", type=int, default=32)
    ap.add_argument("--photo-side", type=int, default=1024, help="long side of the JPEGs in the shards")
    ap.add_argument("--actors", type=int, default=2, help="actors for the loop comparison")
    ap.add_argument("--jpeg-draft", action="store_true", help="preprocess.jpeg_draft for job and baseline")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="latentcache-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.only in (None, "model"):
            per = args.batch_size * 2
            make_shards(tmp / "model-in", max(1, args.model_images // per), per, args.photo_side)
            cfg = EncodeConfig(input=(str(tmp / "model-in"),), output="unused",
                               vae=VAEConfig(source=f"random:{args.preset}", device=args.device),
                               preprocess=PreprocessConfig(resolution=args.resolution, jpeg_draft=args.jpeg_draft),
                               batch_size=args.batch_size, actors=1)
            rows.append(compare("model", cfg, lambda c, n: run_model_only(c, n), args.repeats, tmp))
        if args.only in (None, "decode", "audit"):
            per = args.batch_size * 2
            make_shards(tmp / "decode-in", max(1, args.model_images // per), per, args.photo_side)
            latents = str(tmp / "decode-latents")
            run(EncodeConfig(input=(str(tmp / "decode-in"),), output=latents,
                             vae=VAEConfig(source=f"random:{args.preset}", device=args.device),
                             preprocess=PreprocessConfig(resolution=args.resolution),
                             batch_size=args.batch_size, actors=1), progress=False)
            cfg = DecodeConfig(input=(latents,), output="unused", batch_size=args.batch_size, actors=1,
                               vae=VAEConfig(source=f"random:{args.preset}", device=args.device))
        if args.only in (None, "decode"):
            rows.append(compare("decode", cfg, lambda c, n: run_decoder_only(c, n, latents), args.repeats, tmp))
        if args.only in (None, "audit"):
            audit = AuditConfig(input=(latents,), output="unused", batch_size=args.batch_size, actors=1,
                                vae=VAEConfig(source=f"random:{args.preset}", device=args.device))
            rows.append(compare("audit", audit, lambda c, n: run_job(dataclasses.replace(cfg, output=c.output)),
                                args.repeats, tmp))
        if args.only in (None, "loop"):
            make_shards(tmp / "loop-in", args.loop_shards, args.loop_per_shard, args.photo_side)
            cfg = EncodeConfig(input=(str(tmp / "loop-in"),), output="unused",
                               vae=VAEConfig(source="random:tiny", device=args.device),
                               preprocess=PreprocessConfig(resolution=args.resolution, jpeg_draft=args.jpeg_draft),
                               batch_size=args.batch_size, actors=args.actors, decode_threads=2)
            rows.append(compare("loop", cfg, lambda c, n: run_plain_loop(c), args.repeats, tmp))
    ray.shutdown()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else (
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\npipeline throughput ({device}); resolution {args.resolution}, batch {args.batch_size}, "
          f"JPEG side {args.photo_side}, medians of {args.repeats}")
    print(f"{'comparison':<12}{'images':>8}{'job img/s':>11}{'base img/s':>12}{'wall ratio':>12}"
          f"{'job steady':>12}{'base steady':>13}{'steady ratio':>14}")
    for r in rows:
        print(f"{r['comparison']:<12}{r['images']:>8}{r['job_wall_img_s']:>11.2f}{r['baseline_wall_img_s']:>12.2f}"
              f"{r['wall_ratio']:>12.2f}{r['job_steady_img_s']:>12.2f}{r['baseline_steady_img_s']:>13.2f}"
              f"{r['steady_ratio']:>14.2f}")
    print("model/decode: baseline = the encoder/decoder alone on ready batches (preset %s); audit: baseline = "
          "the decode job on the same latents; loop: baseline = one process, no threads (tiny preset, %d actors "
          "for the job)" % (args.preset, args.actors))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"bench": "pipeline", "args": vars(args), "device": device, "rows": rows,
                               "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
