"""What a user would write instead of `latentcache encode`, on the same shards (issue 11, section 1).

Three variants do the same work on the same WebDataset shards of JPEGs (about 640x480, crops of the
bundled real photos), with the same preprocessing (`pipeline.transforms.prepare` with the job's
`PreprocessConfig`, its defaults included: `jpeg_draft` on) and the same codec
(`vae.load_vae("random:tiny")`, random weights, so that the data path dominates); only the
orchestration differs:

  loop         a plain single-process loop: `webdataset.WebDataset` over each tar (raw bytes),
               prepare, batch, encode, one Parquet file per shard with pyarrow
  raydata      Ray Data as its docs advise for batch inference: `ray.data.read_webdataset`
               (decoder=None) -> `map_batches(prepare)` as tasks (fused into the reads) ->
               `map_batches(Encoder class, concurrency=K, num_cpus=C)` on an actor pool holding the
               codec -> `write_parquet`
  latentcache  the real job (`pipeline.jobs.run`, what `latentcache encode` runs), K actors

Each run is one child process (`--child SPEC`) that starts what it needs: the loop imports torch and
loads the codec; raydata starts its own local Ray on all the machine's cores (`ray.init(address="local",
num_cpus=os.cpu_count())`) and latentcache's job starts one as `latentcache encode` does (on all the
cores too), both inside the timed span, so start-up is counted alike. The parent samples the child's
whole process tree (driver, Ray's daemons, workers, actors) every --interval seconds: peak RSS of
the tree, and CPU seconds (user + system, the last value seen per process, summed). Every variant
runs at 1x and 4x the input (--sizes), alternating the variants across repeats; the table shows
medians. The marginal rate between the two sizes, 3N / (T(4x) - T(1x)), is the steady state, and
T(1x) - N / marginal the start-up.

Goals (2 cores): latentcache >= 1.8x the loop and >= 1.3x Ray Data in wall img/s, at both sizes.

    python bench/bench_alternatives.py                            # 800 and 3,200 JPEGs, 2 repeats (~14 min)
    python bench/bench_alternatives.py --sizes 400,1600 --repeats 1 --variants loop,latentcache
    python bench/bench_alternatives.py --rd-actor-cpus 1 --rd-task-cpus 1   # Ray Data's defaults per op
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import kill_tree, tree  # the process-tree helpers of the memory bench
from pipeline.core.runner import ACTOR_GLIBC_TUNABLES

MB = 2**20
VARIANTS = ("loop", "raydata", "latentcache")
GOALS = {"loop": 1.8, "raydata": 1.3}


# --- inputs ----------------------------------------------------------------------------------------


def distinct_jpegs(count: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """`count` different JPEGs (quality 90) of width x height: random crops of the bundled photos,
    each first scaled to cover 1.25x the crop."""
    import numpy as np
    from PIL import Image

    from pipeline.demo import bundled_photos

    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for _, p in sorted(bundled_photos().items())]
    out = []
    for i in range(count):
        img = photos[i % len(photos)]
        scale = 1.25 * max(width / img.width, height / img.height)
        big = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                         Image.LANCZOS)
        x, y = int(rng.integers(0, big.width - width + 1)), int(rng.integers(0, big.height - height + 1))
        buf = io.BytesIO()
        big.crop((x, y, x + width, y + height)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_shards(folder: Path, images: int, per_shard: int, jpegs: list[bytes]) -> int:
    """WebDataset tars of `images` samples (`<key>.jpg`, `<key>.txt`), `per_shard` each; returns bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for s in range((images + per_shard - 1) // per_shard):
        path = folder / f"alt-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                key = f"{s:05d}_{i:06d}"
                for name, data in ((f"{key}.jpg", jpegs[i % len(jpegs)]), (f"{key}.txt", f"photo {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        total += path.stat().st_size
    return total


# --- the shared work: the same prepare and codec in every variant ----------------------------------



def _size_columns(prepared: list) -> dict:
    """SDXL's size conditioning per sample, as the job's Parquet writer stores it."""
    import numpy as np

    return {
        "original_height": np.array([p.original_size[0] for p in prepared], dtype=np.int32),
        "original_width": np.array([p.original_size[1] for p in prepared], dtype=np.int32),
        "crop_top": np.array([p.crop_top_left[0] for p in prepared], dtype=np.int32),
        "crop_left": np.array([p.crop_top_left[1] for p in prepared], dtype=np.int32),
        "target_height": np.array([p.target_size[0] for p in prepared], dtype=np.int32),
        "target_width": np.array([p.target_size[1] for p in prepared], dtype=np.int32),
    }


def encode_prepared(codec: Any, prepared: list[Any], txt: list[str]) -> dict[str, Any]:
    """A batch of PreparedSample -> the columns every variant writes (as latentcache's Parquet: scaled
    mean and unscaled log-variance in float16, SDXL size conditioning, the caption)."""
    import numpy as np

    from pipeline.transforms import to_model_input

    mean, logvar = codec.encode(to_model_input([p.pixels for p in prepared]))
    latent = codec.scale(mean).numpy().astype(np.float16)
    return {
        "key": np.array([p.key for p in prepared], dtype=object),
        "latent": latent, "logvar": logvar.numpy().astype(np.float16),
        **_size_columns(prepared),
        "txt": np.array(txt, dtype=object),
    }


def to_arrow(batches: list[dict[str, Any]]) -> Any:
    """Encoded batches -> one Arrow table (latents as fixed-size lists of float16)."""
    import numpy as np
    import pyarrow as pa

    cols: dict[str, Any] = {}
    for name in batches[0]:
        values = np.concatenate([b[name] for b in batches])
        if values.ndim > 1:
            flat = values.reshape(len(values), -1)
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
            if name == "latent":
                cols["latent_shape"] = pa.array([list(values.shape[1:])] * len(values), type=pa.list_(pa.int32()))
        else:
            cols[name] = pa.array(values.tolist())
    return pa.table(cols)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


# --- the children: one variant, one run ------------------------------------------------------------


def child_loop(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """(a) One process, one thing at a time, timing each stage."""
    import pyarrow.parquet as pq
    import webdataset as wds

    from pipeline.config import PreprocessConfig
    from pipeline.transforms import prepare
    from vae import load_vae

    pre = PreprocessConfig(resolution=spec["resolution"])
    if spec.get("loop_threads"):
        import torch

        torch.set_num_threads(spec["loop_threads"])
    t_import = time.perf_counter()
    codec = load_vae("random:tiny", device="cpu", dtype="float32")
    t_ready = time.perf_counter()
    stages = {"read": 0.0, "prepare": 0.0, "model": 0.0, "write": 0.0}
    images = 0
    out = Path(spec["output"])
    out.mkdir(parents=True, exist_ok=True)
    for url in sorted(Path(spec["input"]).glob("*.tar")):
        batches: list[dict[str, Any]] = []
        pending: list[Any] = []
        txt: list[str] = []
        it = iter(wds.WebDataset(str(url), shardshuffle=False))
        while True:
            a = time.perf_counter()
            sample = next(it, None)
            b = time.perf_counter()
            stages["read"] += b - a
            if sample is not None:
                pending.append(prepare(sample, pre))
                txt.append(_text(sample.get("txt", b"")))
                images += 1
                stages["prepare"] += time.perf_counter() - b
            if pending and (len(pending) == spec["batch_size"] or sample is None):
                c = time.perf_counter()
                batches.append(encode_prepared(codec, pending, txt))
                stages["model"] += time.perf_counter() - c
                pending, txt = [], []
            if sample is None:
                break
        c = time.perf_counter()
        pq.write_table(to_arrow(batches), out / f"{url.stem}.parquet")
        stages["write"] += time.perf_counter() - c
    t_done = time.perf_counter()
    return {"images": images, "import_s": t_import - t0, "vae_load_s": t_ready - t_import,
            "startup_s": t_ready - t0, "done_s": t_done - t0, "stages_s": stages}


class Encoder:
    """The Ray Data actor: holds the codec, encodes prepared batches (and prepares them itself when
    the rows still carry JPEG bytes, with --rd-prepare actor)."""

    def __init__(self, resolution: int, marks: str) -> None:
        from pipeline.config import PreprocessConfig
        from vae import load_vae

        self.pre = PreprocessConfig(resolution=resolution)
        self.codec = load_vae("random:tiny", device="cpu", dtype="float32")
        Path(marks, f"actor-ready-{os.getpid()}").write_text(str(time.time()))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pipeline.samples import PreparedSample

        if "jpg" in batch:
            prepared = _prepare_rows(batch, self.pre)
        else:
            prepared = [PreparedSample(key=str(batch["key"][i]), pixels=batch["pixels"][i],
                                       original_size=(int(batch["original_height"][i]), int(batch["original_width"][i])),
                                       crop_top_left=(int(batch["crop_top"][i]), int(batch["crop_left"][i])),
                                       target_size=(int(batch["target_height"][i]), int(batch["target_width"][i])),
                                       extras={}) for i in range(len(batch["key"]))]
        return encode_prepared(self.codec, prepared, [_text(t) for t in batch["txt"]])


def _prepare_rows(batch: dict[str, Any], pre: Any) -> list[Any]:
    from pipeline.transforms import prepare

    return [prepare({"__key__": str(batch["__key__"][i]), "jpg": batch["jpg"][i]}, pre)
            for i in range(len(batch["__key__"]))]


def prepare_batch(batch: dict[str, Any], resolution: int) -> dict[str, Any]:
    """Ray Data task: JPEG bytes -> the prepared pixels and their size fields (a stateless map)."""
    import numpy as np

    from pipeline.config import PreprocessConfig

    prepared = _prepare_rows(batch, PreprocessConfig(resolution=resolution))
    return {
        "key": np.array([p.key for p in prepared], dtype=object),
        "pixels": np.stack([p.pixels for p in prepared]),
        **_size_columns(prepared),
        "txt": np.array([_text(t) for t in batch["txt"]], dtype=object),
    }


def child_raydata(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """(b) Ray Data: read_webdataset -> map_batches(prepare) tasks -> map_batches(Encoder) actors -> write_parquet."""
    import ray
    import ray.data

    t_import = time.perf_counter()
    t_wall0 = time.time() - (t_import - t0)
    # All the cores, as the latentcache job's own local Ray has them (2 on the machine of BENCHMARKS.md).
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             _temp_dir=spec["ray_tmp"])
    t_ray = time.perf_counter()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        marks = Path(spec["marks"])
        marks.mkdir(parents=True, exist_ok=True)
        shards = sorted(str(p) for p in Path(spec["input"]).glob("*.tar"))
        # The reads ask for what the prepare tasks ask for, so that Ray Data fuses the two into one task.
        ds = ray.data.read_webdataset(shards, decoder=None, override_num_blocks=len(shards),
                                      num_cpus=spec["rd_task_cpus"])
        if spec["rd_prepare"] == "task":
            ds = ds.map_batches(prepare_batch, fn_kwargs={"resolution": spec["resolution"]},
                                batch_size=spec["batch_size"], batch_format="numpy", num_cpus=spec["rd_task_cpus"])
        ds = ds.map_batches(Encoder, fn_constructor_kwargs={"resolution": spec["resolution"], "marks": str(marks)},
                            batch_size=spec["batch_size"], batch_format="numpy",
                            concurrency=spec["rd_actors"], num_cpus=spec["rd_actor_cpus"])
        ds.write_parquet(spec["output"])
        t_done = time.perf_counter()
    finally:
        ray.shutdown()
    import pyarrow.dataset as pads

    images = pads.dataset(spec["output"], format="parquet").count_rows()
    ready = sorted(float(p.read_text()) for p in Path(spec["marks"]).glob("actor-ready-*"))
    return {"images": images, "import_s": t_import - t0, "ray_init_s": t_ray - t_import,
            "first_actor_ready_s": (ready[0] - t_wall0) if ready else None,
            "startup_s": (ready[0] - t_wall0) if ready else None, "done_s": t_done - t0}


def child_latentcache(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """(c) The real job, as `latentcache encode` runs it: it starts its own local Ray (on all the
    machine's cores, as raydata's), whose workers inherit the actors' malloc settings. The job's own clock (`summary.seconds`) ends at its last commit, before it
    stops that Ray, as raydata's ends before `ray.shutdown`."""
    from pipeline.config import EncodeConfig, PreprocessConfig, VAEConfig
    from pipeline.jobs import run

    cfg = EncodeConfig(input=(spec["input"],), output=spec["output"],
                       vae=VAEConfig(source="random:tiny", device="cpu"),
                       preprocess=PreprocessConfig(resolution=spec["resolution"]),
                       batch_size=spec["batch_size"], actors=spec["lc_actors"])
    t_call = time.perf_counter()
    summary = run(cfg, progress=False)
    return {"images": summary.samples_written, "import_s": t_call - t0,
            "job_s": summary.seconds, "steady_s": summary.steady_seconds,
            "startup_s": (t_call - t0) + summary.seconds - summary.steady_seconds,
            "done_s": (t_call - t0) + summary.seconds, "samples_errored": summary.samples_errored}


def child_main(spec_path: str) -> None:
    t0 = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    fn = {"loop": child_loop, "raydata": child_raydata, "latentcache": child_latentcache}[spec["variant"]]
    Path(spec["result"]).write_text(json.dumps(fn(spec, t0)))


# --- the parent: run a child, sample its process tree ------------------------------------------------


def run_child(spec: dict[str, Any], work: Path, interval: float, timeout: float) -> dict[str, Any]:
    """Run one child; peak RSS of its tree, CPU seconds of its tree, wall seconds."""
    import psutil

    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / "child.log"
    cpu_seen: dict[tuple[int, float], float] = {}  # (pid, create_time) -> last user+system seen
    peak = 0
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        popen = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                 env={**os.environ, **spec.get("child_env", {})})
        root = psutil.Process(popen.pid)
        timed_out = False
        try:
            while popen.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    timed_out = True
                    kill_tree(root)
                    break
                total = 0
                for p in tree(root):
                    try:
                        with p.oneshot():
                            total += p.memory_info().rss
                            c = p.cpu_times()
                            cpu_seen[(p.pid, p.create_time())] = c.user + c.system
                    except psutil.Error:
                        continue
                peak = max(peak, total)
                time.sleep(interval)
        except BaseException:
            kill_tree(root)
            raise
        rc = popen.wait()
        wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result_path = Path(spec["result"])
    child = json.loads(result_path.read_text()) if result_path.exists() else None
    out = {"rc": rc, "timed_out": timed_out, "process_wall_s": wall, "peak_rss_mb": peak / MB,
           "cpu_s": sum(cpu_seen.values()), "processes": len(cpu_seen),
           # CPU of the reaped descendants (those whose parents waited for them), a cross-check
           "rusage_children_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
           "child": child}
    if rc != 0 or child is None:
        out["log_tail"] = log_path.read_text(errors="replace")[-4000:]
    return out


# --- main -----------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="800,3200", help="images at 1x and 4x (two sizes, comma-separated)")
    ap.add_argument("--per-shard", type=int, default=100, help="samples per input shard")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="the same in every variant")
    ap.add_argument("--jpeg-width", type=int, default=640)
    ap.add_argument("--jpeg-height", type=int, default=480)
    ap.add_argument("--distinct", type=int, default=97, help="distinct JPEGs, cycled through the shards")
    ap.add_argument("--lc-actors", type=int, default=2, help="latentcache actors")
    ap.add_argument("--loop-threads", type=int, default=0,
                    help="torch threads of the loop (0: torch's default); with 1 the loop's stage times are "
                         "the work per image without orchestration, and the bound on the cores is printed")
    ap.add_argument("--loop-malloc", choices=["default", "tuned"], default="default",
                    help="tuned: the loop runs with the actors' glibc malloc settings (runner.ACTOR_GLIBC_TUNABLES), "
                         "so that its work per image is that of an actor")
    ap.add_argument("--rd-actors", type=int, default=2, help="Ray Data map_batches concurrency (actor pool size)")
    ap.add_argument("--rd-actor-cpus", type=float, default=0.5, help="num_cpus of each Ray Data actor")
    ap.add_argument("--rd-task-cpus", type=float, default=0.5, help="num_cpus of Ray Data's prepare tasks")
    ap.add_argument("--rd-prepare", choices=["task", "actor"], default="task",
                    help="where Ray Data decodes and resizes: a task map fused into the reads, or in the actor")
    ap.add_argument("--interval", type=float, default=0.1, help="process-tree sampling period, seconds")
    ap.add_argument("--timeout", type=float, default=600.0, help="per run, seconds; the tree is killed after")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if len(sizes) != 2 or sizes[0] <= 0 or sizes[1] <= sizes[0]:
        ap.error(f"--sizes {args.sizes!r}: expected two sizes, 1x and a larger one (e.g. 1600,6400)")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; expected some of {list(VARIANTS)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    t_start = time.perf_counter()
    work_root = Path(tempfile.mkdtemp(prefix="lc-alt-", dir=args.tmp))
    runs: list[dict[str, Any]] = []
    try:
        jpegs = distinct_jpegs(args.distinct, args.jpeg_width, args.jpeg_height)
        inputs = {}
        for n in sizes:
            inputs[n] = work_root / f"in-{n}"
            mb = make_shards(inputs[n], n, args.per_shard, jpegs) / MB
            print(f"input {n} images: {len(list(inputs[n].glob('*.tar')))} shards, {mb:.1f} MB", flush=True)
        for rep in range(args.repeats):
            for n in sizes:
                order = variants[rep % len(variants):] + variants[:rep % len(variants)]  # rotate per repeat
                for variant in order:
                    work = Path(tempfile.mkdtemp(prefix=f"{variant}-{n}-", dir=work_root))
                    ray_tmp = Path(tempfile.mkdtemp(prefix="lca-", dir="/tmp"))  # short: unix socket paths
                    spec = {"variant": variant, "input": str(inputs[n]), "output": str(work / "out"),
                            "result": str(work / "result.json"), "marks": str(work / "marks"),
                            "ray_tmp": str(ray_tmp), "resolution": args.resolution, "batch_size": args.batch_size,
                            "lc_actors": args.lc_actors, "rd_actors": args.rd_actors,
                            "rd_actor_cpus": args.rd_actor_cpus, "rd_task_cpus": args.rd_task_cpus,
                            "rd_prepare": args.rd_prepare, "loop_threads": args.loop_threads,
                            "child_env": ({"GLIBC_TUNABLES": ACTOR_GLIBC_TUNABLES}
                                          if variant == "loop" and args.loop_malloc == "tuned" else {})}
                    print(f"[{time.perf_counter() - t_start:7.1f}s] rep {rep} {variant:<12} {n:>6} images ...",
                          end="", flush=True)
                    try:
                        res = run_child(spec, work, args.interval, args.timeout)
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                        shutil.rmtree(ray_tmp, ignore_errors=True)
                    child = res["child"] or {}
                    ok = res["rc"] == 0 and child.get("images") == n
                    run = {"variant": variant, "images": n, "repeat": rep, "ok": ok, **res}
                    if ok:
                        run["img_s"] = n / child["done_s"]
                        run["img_per_cpu_s"] = n / res["cpu_s"] if res["cpu_s"] > 0 else None
                    runs.append(run)
                    print(f" {child.get('done_s', float('nan')):6.1f} s" + (
                        f", {run['img_s']:6.1f} img/s, {res['cpu_s']:6.1f} CPU s, peak {res['peak_rss_mb']:6.0f} MB"
                        if ok else f"  FAILED rc={res['rc']} timed_out={res['timed_out']} images={child.get('images')}"),
                        flush=True)
                    if not ok and "log_tail" in res:
                        print(res["log_tail"][-3000:], flush=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)

    rows = []
    for variant in variants:
        for n in sizes:
            good = [r for r in runs if r["variant"] == variant and r["images"] == n and r["ok"]]
            total = [r for r in runs if r["variant"] == variant and r["images"] == n]
            rows.append({
                "variant": variant, "images": n, "runs": len(total), "ok_runs": len(good),
                "done_s": _median([r["child"]["done_s"] for r in good]),
                "img_s": _median([r["img_s"] for r in good]),
                "img_per_cpu_s": _median([r["img_per_cpu_s"] for r in good if r["img_per_cpu_s"]]),
                "cpu_s": _median([r["cpu_s"] for r in good]),
                "peak_rss_mb": _median([r["peak_rss_mb"] for r in good]),
                "startup_s": _median([r["child"]["startup_s"] for r in good if r["child"].get("startup_s") is not None]),
                "img_s_runs": [round(r["img_s"], 2) for r in good],
            })
    by = {(r["variant"], r["images"]): r for r in rows}
    small, big = sizes
    marginal = {}
    for variant in variants:
        a, b = by[(variant, small)], by[(variant, big)]
        if a["done_s"] and b["done_s"] and b["done_s"] > a["done_s"]:
            rate = (big - small) / (b["done_s"] - a["done_s"])
            marginal[variant] = {"steady_img_s": rate, "startup_est_s": a["done_s"] - small / rate}
    ratios = {}
    if "latentcache" in variants:
        for other in (v for v in variants if v != "latentcache"):
            for n in sizes:
                lc, ot = by[("latentcache", n)], by[(other, n)]
                if lc["img_s"] and ot["img_s"]:
                    ratios[f"latentcache/{other}@{n}"] = {
                        "wall": lc["img_s"] / ot["img_s"],
                        "per_cpu_s": (lc["img_per_cpu_s"] / ot["img_per_cpu_s"]
                                      if lc["img_per_cpu_s"] and ot["img_per_cpu_s"] else None),
                        "goal": GOALS.get(other)}
            if other in marginal and "latentcache" in marginal:
                ratios[f"latentcache/{other}@steady"] = {
                    "wall": marginal["latentcache"]["steady_img_s"] / marginal[other]["steady_img_s"],
                    "per_cpu_s": None, "goal": GOALS.get(other)}

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"\nalternatives: tiny random VAE, {args.resolution} px, batch {args.batch_size}, "
          f"{args.jpeg_width}x{args.jpeg_height} JPEGs, {args.per_shard}/shard, {os.cpu_count()} cores, "
          f"medians of {args.repeats}")
    head = (f"{'variant':<13}{'images':>8}{'seconds':>9}{'img/s':>8}{'img/CPU-s':>11}{'CPU s':>8}"
            f"{'peak RSS MB':>13}{'start-up s':>12}{'steady img/s':>14}")
    print(head)
    print("-" * len(head))
    for r in rows:
        m = marginal.get(r["variant"], {})
        print(f"{r['variant']:<13}{r['images']:>8}{fmt(r['done_s'], '.1f'):>9}{fmt(r['img_s'], '.1f'):>8}"
              f"{fmt(r['img_per_cpu_s'], '.2f'):>11}{fmt(r['cpu_s'], '.1f'):>8}{fmt(r['peak_rss_mb'], '.0f'):>13}"
              f"{fmt(r['startup_s'], '.1f'):>12}{fmt(m.get('steady_img_s'), '.1f'):>14}"
              + ("" if r["ok_runs"] == r["runs"] else f"  ({r['runs'] - r['ok_runs']} of {r['runs']} failed)"))
    print("start-up s: loop = imports + VAE load; raydata = until its first actor had the codec; latentcache = "
          "until its first actor had the VAE. steady img/s: marginal rate between the two sizes.")
    for name, r in ratios.items():
        goal = r["goal"]
        print(f"  {name:<32} wall {r['wall']:.2f}x" + (f", per CPU-s {r['per_cpu_s']:.2f}x" if r["per_cpu_s"] else "")
              + (f"  (goal >= {goal}x: {'met' if r['wall'] >= goal else 'NOT met'})" if goal else ""))

    bound = None
    loop_runs = [r for r in runs if r["variant"] == "loop" and r["ok"] and r["images"] == big]
    if loop_runs:
        per_image = {k: _median([r["child"]["stages_s"][k] / big for r in loop_runs]) for k in
                     loop_runs[0]["child"]["stages_s"]}
        total = sum(per_image.values())
        bound = {"per_image_ms": {k: v * 1e3 for k, v in per_image.items()}, "cores": os.cpu_count(),
                 "img_s": os.cpu_count() / total, "loop_threads": args.loop_threads}
        print(f"  the loop's work per image at {big}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in per_image.items())
              + f"; {os.cpu_count()} cores at that rate: {bound['img_s']:.0f} img/s"
              + ("" if args.loop_threads == 1 and args.loop_malloc == "tuned"
                 else " (a bound only with --loop-threads 1 --loop-malloc tuned)"))
        for variant, m in marginal.items():
            if variant != "loop":
                print(f"  {variant} steady / that bound: {m['steady_img_s'] / bound['img_s']:.2f}")

    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"alternatives-{time.strftime('%Y%m%d-%H%M%S')}.json"
    import psutil
    import ray
    import torch

    out.write_text(json.dumps({
        "bench": "alternatives", "args": vars(args), "rows": rows, "marginal": marginal, "ratios": ratios,
        "runs": runs, "goals": GOALS, "bound": bound,
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "memory_gb": psutil.virtual_memory().total / 2**30},
        "total_s": time.perf_counter() - t_start, "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
