"""Peak memory of the encode job against samples per shard: the shard writers should stream.

For each case and each shard size N, one input tar of N samples is written to a temp folder
(streamed to disk, one sample at a time), and a fresh encode job runs on it in a child process
(`python bench/bench_memory.py --child SPEC`) that starts its own local Ray (2 CPUs, one actor, tiny
random VAE). The parent samples the RSS of the child's whole process tree (driver, gcs, raylet,
agents, Ray workers and the actor) every --interval seconds and keeps the peak. Growth is
peak(N) - peak(smallest N); Ray's processes cost a constant few hundred MB each, which cancels.

Cases (all one input shard, batch 16, decode threads 4, max_error_rate 1.0):

  parquet             jpg (~96 px JPEG) + txt caption; 64 px, float16 latents
  parquet+member      ... plus a random --member-kb KB binary `npy` member per sample (passthrough npy,txt)
  safetensors+member  the same input, safetensors output
  parquet+flip-f32    jpg + txt; flip=True, float32 latents, 128 px (4 latent arrays of 4 KB per sample)

Goal: growth from the smallest to the largest N (150 -> 5,000 by default) under 250 MB per case.

With --actors K1,K2,... (issue 11, section 5: images/s and peak memory per actor against samples
per shard and number of actors), each (case, N) also runs with k actors on k input shards of N
samples each (hard links to the same tar, so every shard is the same work), for each k listed, and
the table adds images/s (samples / the job's seconds; "steady" from the first actor having its VAE,
as `JobSummary.steady_seconds`), the peak RSS of each actor process and of the whole tree. Growth is
then against the smallest N at the same k. --repeats R runs every (case, N) R times, alternating the
actor counts inside each repeat; the table shows medians (peaks: the median of the per-run peaks).

    python bench/bench_memory.py                        # full: sizes 150,1500,5000 (several minutes)
    python bench/bench_memory.py --quick                # smoke test: sizes 20,60,150
    python bench/bench_memory.py --cases parquet,safetensors+member --sizes 150,5000
    python bench/bench_memory.py --cases parquet --sizes 150,1500 --actors 1,2 --repeats 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
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

MB = 2**20
GOAL_GROWTH_MB = 250.0

CASES: dict[str, dict[str, Any]] = {
    "parquet": {"format": "parquet", "member": False, "flip": False, "latent_dtype": "float16", "resolution": 64},
    "parquet+member": {"format": "parquet", "member": True, "flip": False, "latent_dtype": "float16",
                       "resolution": 64},
    "safetensors+member": {"format": "safetensors", "member": True, "flip": False, "latent_dtype": "float16",
                           "resolution": 64},
    "parquet+flip-f32": {"format": "parquet", "member": False, "flip": True, "latent_dtype": "float32",
                         "resolution": 128},
}


# --- inputs ----------------------------------------------------------------------------------------


def base_photos(side: int) -> list[tuple[str, Any]]:
    """The bundled real photos, downscaled to 4/3 of `side` px on the long side (PIL images)."""
    from PIL import Image

    from pipeline.demo import bundled_photos

    big = round(side * 4 / 3)
    out = []
    for name, path in sorted(bundled_photos().items()):
        img = Image.open(path).convert("RGB")
        scale = big / max(img.size)
        out.append((name, img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                     Image.LANCZOS)))
    return out


def write_input_tar(path: Path, n: int, photos: list[tuple[str, Any]], side: int, member_bytes: int) -> int:
    """A WebDataset tar of n samples, written one member at a time; returns its size in bytes.

    Each sample: `<key>.jpg`, a `side` px crop at a random offset of one of the photos (so every
    latent differs and Parquet's compression cannot fold repeats), JPEG quality 90; `<key>.txt`, a
    caption; with member_bytes > 0, `<key>.npy` of random bytes (random: compression cannot hide it).
    """
    import numpy as np

    rng = np.random.default_rng(0)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{i:06d}"
            name, img = photos[i % len(photos)]
            w, h = min(side, img.width), min(side, img.height)
            x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
            buf = io.BytesIO()
            img.crop((x, y, x + w, y + h)).save(buf, format="JPEG", quality=90)
            add(tar, f"{key}.jpg", buf.getvalue())
            add(tar, f"{key}.txt", f"a photo: {name}, sample {i}, crop at {x},{y}".encode())
            if member_bytes:
                add(tar, f"{key}.npy", rng.bytes(member_bytes))
    return path.stat().st_size


# --- the child: one job in its own process tree ------------------------------------------------------


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import ray

    from pipeline.config import EncodeConfig, PreprocessConfig, VAEConfig
    from pipeline.jobs import run

    case = spec["case"]
    cfg = EncodeConfig(
        input=(spec["input"],), output=spec["output"],
        vae=VAEConfig(source="random:tiny", dtype="float32", device="cpu"),
        preprocess=PreprocessConfig(resolution=case["resolution"], flip=case["flip"]),
        format=case["format"], latent_dtype=case["latent_dtype"],
        passthrough=("npy", "txt") if case["member"] else ("txt",),
        actors=int(spec.get("actors", 1)), batch_size=16, max_error_rate=1.0)
    t_import = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=spec["ray_tmp"])
    t_ray = time.perf_counter()
    try:
        summary = run(cfg, progress=False)
        t_job = time.perf_counter()
    finally:
        ray.shutdown()
    Path(spec["result"]).write_text(json.dumps({
        "summary": summary.to_dict(), "import_s": t_import - t0, "ray_init_s": t_ray - t_import,
        "job_s": t_job - t_ray}))


# --- the parent: run a child, sample its process tree ------------------------------------------------


def role_of(proc: Any, child_pid: int) -> tuple[str, str]:
    """Which part of the job a process of the child's tree is, and its command line (Ray workers
    retitle themselves: `ray::IDLE`, `ray::JobActor.process`); "?" while it cannot be read yet."""
    import psutil

    if proc.pid == child_pid:
        return "driver", "bench_memory.py --child"
    try:
        name = proc.name()
    except psutil.Error:  # gone, or not readable yet: classified on a later sample
        name = ""
    try:
        cmd = " ".join(proc.cmdline()).strip()
    except psutil.Error:
        cmd = ""
    if name.startswith("raylet") or "/raylet/raylet" in cmd.split(" ", 1)[0]:
        return "raylet", cmd[:120] or name
    if name.startswith("gcs_server") or cmd.split(" ", 1)[0].endswith("gcs_server"):
        return "gcs", cmd[:120] or name
    if cmd.startswith("ray::"):
        return ("actor" if "JobActor" in cmd else "ray_worker"), cmd[:120]
    if "default_worker.py" in cmd:
        return "ray_worker", cmd[:120]
    return "other", cmd[:120] or "?"


def tree(proc: Any) -> list[Any]:
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def kill_tree(proc: Any) -> None:
    """Kill the child and every process under it, by pid (they are all this benchmark's)."""
    import psutil

    procs = tree(proc)
    for p in reversed(procs):
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def run_child(spec: dict[str, Any], work: Path, interval: float, timeout: float) -> dict[str, Any]:
    import psutil

    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / "child.log"
    roles = ("driver", "actor", "raylet", "gcs", "ray_worker", "other")
    peak_total = 0
    at_peak: dict[str, int] = {}
    role_peak = {r: 0 for r in roles}
    series: list[tuple[float, int, int, int]] = []  # (s, total, driver, actor) every ~0.5 s
    procs_seen: dict[int, dict[str, Any]] = {}
    samples = 0
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        popen = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        root = psutil.Process(popen.pid)
        timed_out = False
        try:
            while popen.poll() is None:
                now = time.perf_counter() - t0
                if now > timeout:
                    timed_out = True
                    kill_tree(root)
                    break
                by_role = {r: 0 for r in roles}
                for p in tree(root):
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    seen = procs_seen.get(p.pid)
                    # Ray workers retitle themselves (IDLE -> JobActor); a process caught while it
                    # starts may not show its command line yet.
                    if seen is None or seen["role"] == "ray_worker" or seen["cmd"] == "?":
                        role, cmd = role_of(p, popen.pid)
                        if seen is None:
                            seen = procs_seen[p.pid] = {"pid": p.pid, "role": role, "cmd": cmd, "peak_rss_mb": 0.0}
                        seen["role"], seen["cmd"] = role, cmd
                    seen["peak_rss_mb"] = max(seen["peak_rss_mb"], rss / MB)
                    by_role[seen["role"]] += rss
                total = sum(by_role.values())
                samples += 1
                if total > peak_total:
                    peak_total, at_peak = total, dict(by_role)
                for r in roles:
                    role_peak[r] = max(role_peak[r], by_role[r])
                if samples % max(1, round(0.5 / interval)) == 1:
                    series.append((round(now, 2), total // MB, by_role["driver"] // MB, by_role["actor"] // MB))
                time.sleep(interval)
        except BaseException:
            kill_tree(root)
            raise
        rc = popen.wait()
        wall = time.perf_counter() - t0
    result_path = Path(spec["result"])
    child = json.loads(result_path.read_text()) if result_path.exists() else None
    out = {
        "rc": rc, "timed_out": timed_out, "wall_s": wall, "rss_samples": samples,
        "peak_rss_mb": peak_total / MB,
        "at_peak_mb": {r: v / MB for r, v in at_peak.items()},
        "role_peak_mb": {r: v / MB for r, v in role_peak.items()},
        "processes": sorted(procs_seen.values(), key=lambda d: -d["peak_rss_mb"]),
        # Each actor process's own peak (they peak at different moments; their sum is role_peak_mb).
        "actor_peaks_mb": sorted((d["peak_rss_mb"] for d in procs_seen.values() if d["role"] == "actor"),
                                 reverse=True),
        "series_s_total_driver_actor_mb": series,
        "child": child,
    }
    if rc != 0 or child is None:
        out["log_tail"] = log_path.read_text(errors="replace")[-4000:]
    return out


def output_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*") if p.suffix in (".parquet", ".safetensors"))


# --- main -----------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _throughput(res: dict[str, Any], steady: bool) -> float | None:
    """Samples read / the job's seconds (run() from planning to summary; steady: from the first
    actor having its VAE), from the child's JobSummary; None when the job did not finish."""
    summary = (res.get("child") or {}).get("summary") or {}
    seconds = summary.get("steady_seconds" if steady else "seconds") or 0.0
    return summary["samples_read"] / seconds if seconds > 0 else None


def actors_table(rows: list[dict[str, Any]], cases: list[str], sizes: list[int], actors: list[int]) -> list[dict]:
    """One row per (case, actors, N): medians over repeats of img/s, per-actor and tree peaks."""
    table = []
    for case in cases:
        for k in actors:
            for n in sizes:
                runs = [r for r in rows if (r["case"], r["actors"], r["samples_per_shard"]) == (case, k, n)]
                good = [r for r in runs if r["ok"]]
                per_actor = [max(r["actor_peaks_mb"]) for r in good if r["actor_peaks_mb"]]
                table.append({
                    "case": case, "actors": k, "samples_per_shard": n, "shards": k, "samples": k * n,
                    "runs": len(runs), "ok_runs": len(good),
                    "img_s": _median([v for r in good if (v := _throughput(r, False)) is not None]),
                    "steady_img_s": _median([v for r in good if (v := _throughput(r, True)) is not None]),
                    "job_s": _median([r["child"]["summary"]["seconds"] for r in good]),
                    "ray_init_s": _median([r["child"]["ray_init_s"] for r in good]),
                    # the largest actor's peak in each run, median over runs; and every actor's peak per run
                    "actor_peak_mb": _median(per_actor),
                    "actor_peaks_mb_per_run": [r["actor_peaks_mb"] for r in good],
                    "actors_sum_peak_mb": _median([r["role_peak_mb"]["actor"] for r in good]),
                    "tree_peak_mb": _median([r["peak_rss_mb"] for r in good]),
                    "tree_peak_mb_runs": [r["peak_rss_mb"] for r in good],
                })
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="150,1500,5000", help="samples per shard, comma-separated")
    ap.add_argument("--quick", action="store_true", help="smoke test: sizes 20,60,150 (overrides --sizes)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    ap.add_argument("--actors", default="1",
                    help="comma-separated actor counts; k actors run on k shards of N samples each")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (case, N, actors), actor counts alternating")
    ap.add_argument("--member-kb", type=int, default=400, help="size of the binary passthrough member")
    ap.add_argument("--photo-side", type=int, default=96, help="long side of the input JPEGs (crops of the photos)")
    ap.add_argument("--flip-resolution", type=int, default=128, help="preprocess.resolution of parquet+flip-f32")
    ap.add_argument("--interval", type=float, default=0.05, help="RSS sampling period, seconds")
    ap.add_argument("--timeout", type=float, default=900.0, help="per job, seconds; the tree is killed after")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where inputs and outputs go")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return

    sizes = [20, 60, 150] if args.quick else sorted(int(s) for s in args.sizes.split(",") if s.strip())
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    actors = [int(a) for a in args.actors.split(",") if a.strip()]
    if not actors or min(actors) < 1:
        ap.error(f"--actors {args.actors!r}: expected positive integers, e.g. 1,2")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    CASES["parquet+flip-f32"]["resolution"] = args.flip_resolution
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; expected some of {list(CASES)}")
    member_bytes = args.member_kb * 1000
    photos = base_photos(args.photo_side)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    work_root = Path(tempfile.mkdtemp(prefix="lc-mem-", dir=args.tmp))
    try:
        # One input tar per (input kind, N), shared by the cases that read it, removed once they ran;
        # k actors read k hard links to it (k shards of the same N samples).
        for member in (False, True):
            using = [c for c in cases if CASES[c]["member"] == member]
            if not using:
                continue
            for n in sizes:
                tar_dir = work_root / f"in-{'member' if member else 'plain'}-{n}"
                tar_dir.mkdir()
                tar_path = tar_dir / f"mem-{n:06d}.tar"
                t0 = time.perf_counter()
                in_bytes = write_input_tar(tar_path, n, photos, args.photo_side, member_bytes if member else 0)
                gen_s = time.perf_counter() - t0
                inputs: dict[int, Path] = {}
                for k in actors:
                    folder = tar_dir / f"k{k}"
                    folder.mkdir()
                    for j in range(k):
                        os.link(tar_path, folder / f"mem-{n:06d}-{j:03d}.tar")
                    inputs[k] = folder
                for case in using:
                    for rep in range(args.repeats):
                        for k in (actors if rep % 2 == 0 else actors[::-1]):
                            work = Path(tempfile.mkdtemp(prefix=f"{case.replace('+', '_')}-{n}-{k}-", dir=work_root))
                            # Ray's own temp dir, short: its unix socket paths must stay under 108 bytes.
                            ray_tmp = Path(tempfile.mkdtemp(prefix="lcr-", dir="/tmp"))
                            spec = {"case": CASES[case], "input": str(inputs[k]), "output": str(work / "out"),
                                    "actors": k, "ray_tmp": str(ray_tmp), "result": str(work / "result.json")}
                            print(f"[{time.perf_counter() - t_start:7.1f}s] {case:<20} N={n:<6} k={k} rep={rep} "
                                  f"input {k} x {in_bytes / MB:7.1f} MB ...", end="", flush=True)
                            try:
                                res = run_child(spec, work, args.interval, args.timeout)
                                out_bytes = output_bytes(work / "out")
                            finally:
                                shutil.rmtree(work, ignore_errors=True)
                                shutil.rmtree(ray_tmp, ignore_errors=True)
                            summary = (res["child"] or {}).get("summary", {})
                            row = {"case": case, "samples_per_shard": n, "actors": k, "repeat": rep,
                                   "input_mb": k * in_bytes / MB, "output_mb": out_bytes / MB,
                                   "input_gen_s": gen_s, **res,
                                   "samples_written": summary.get("samples_written"),
                                   "samples_errored": summary.get("samples_errored")}
                            ok = res["rc"] == 0 and summary.get("samples_written") == k * n
                            row["ok"] = ok
                            rows.append(row)
                            rate = _throughput(res, False)
                            print(f" peak {res['peak_rss_mb']:8.1f} MB (actors "
                                  f"{'/'.join(f'{a:.0f}' for a in res['actor_peaks_mb']) or '-'}, driver "
                                  f"{res['at_peak_mb'].get('driver', 0):6.1f}), {res['wall_s']:6.1f} s"
                                  + (f", {rate:.1f} img/s" if rate else "")
                                  + ("" if ok else f"  JOB FAILED rc={res['rc']} timed_out={res['timed_out']} "
                                                   f"written={summary.get('samples_written')}"), flush=True)
                            if not ok and "log_tail" in res:
                                print(res["log_tail"][-2000:])
                shutil.rmtree(tar_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)

    smallest, largest = sizes[0], sizes[-1]
    table = actors_table(rows, cases, sizes, actors)
    by_key = {(t["case"], t["actors"], t["samples_per_shard"]): t for t in table}
    for t in table:
        base_t = by_key.get((t["case"], t["actors"], smallest))
        t["growth_mb"] = (t["tree_peak_mb"] - base_t["tree_peak_mb"]
                          if base_t and t["tree_peak_mb"] is not None and base_t["tree_peak_mb"] is not None else None)
        t["actor_growth_mb"] = (t["actor_peak_mb"] - base_t["actor_peak_mb"]
                                if base_t and t["actor_peak_mb"] is not None and base_t["actor_peak_mb"] is not None
                                else None)

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"\nencode job peak RSS (whole process tree: driver + Ray + actors) vs samples per shard and actors; "
          f"tiny random VAE, batch 16, 2 CPUs, {os.cpu_count()} cores, sampled every {args.interval * 1000:.0f} ms, "
          f"medians of {args.repeats}")
    head = (f"{'case':<20}{'actors':>7}{'N/shard':>9}{'img/s':>8}{'steady':>8}{'job s':>7}"
            f"{'actor peak MB':>15}{'actors sum MB':>15}{'tree peak MB':>14}{f'growth vs {smallest}':>17}")
    print(head)
    print("-" * len(head))
    for t in table:
        print(f"{t['case']:<20}{t['actors']:>7}{t['samples_per_shard']:>9}{fmt(t['img_s'], '.1f'):>8}"
              f"{fmt(t['steady_img_s'], '.1f'):>8}{fmt(t['job_s'], '.1f'):>7}{fmt(t['actor_peak_mb'], '.0f'):>15}"
              f"{fmt(t['actors_sum_peak_mb'], '.0f'):>15}{fmt(t['tree_peak_mb'], '.0f'):>14}"
              f"{fmt(t['growth_mb'], '+.0f'):>17}"
              + ("" if t["ok_runs"] == t["runs"] else f"  ({t['runs'] - t['ok_runs']} of {t['runs']} runs failed)"))
    print("img/s: samples / job seconds (planning to summary, actors' start-up included); steady: from the first "
          "actor having its VAE. actor peak: the largest actor process's own peak RSS.")
    print(f"\ngoal: growth from {smallest:,} to {largest:,} samples per shard under {GOAL_GROWTH_MB:.0f} MB")
    verdicts = {}
    for case in cases:
        for k in actors:
            name = case if len(actors) == 1 else f"{case} x{k}"
            big, small = by_key.get((case, k, largest)), by_key.get((case, k, smallest))
            if not big or not small or big["ok_runs"] < big["runs"] or small["ok_runs"] < small["runs"] \
                    or big["growth_mb"] is None:
                verdicts[name] = "FAIL (job failed)"
            else:
                g = big["growth_mb"]
                verdicts[name] = f"{'PASS' if g < GOAL_GROWTH_MB else 'FAIL'} ({g:+.1f} MB)"
            print(f"  {name:<24} {verdicts[name]}")

    Path(args.out).mkdir(parents=True, exist_ok=True)
    # The default run (one actor, one repeat) keeps its historical name; an --actors/--repeats run gets its own.
    plain = actors == [1] and args.repeats == 1
    out = Path(args.out) / ("memory.json" if plain else f"memory-actors-{time.strftime('%Y%m%d-%H%M%S')}.json")
    import psutil

    out.write_text(json.dumps({
        "bench": "memory", "args": vars(args), "sizes": sizes, "actors": actors, "cases": {c: CASES[c] for c in cases},
        "goal_growth_mb": GOAL_GROWTH_MB, "verdicts": verdicts, "table": table, "rows": rows,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
                    "python": platform.python_version(), "memory_gb": psutil.virtual_memory().total / 2**30},
        "total_s": time.perf_counter() - t_start, "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
