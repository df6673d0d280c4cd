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

    python bench/bench_memory.py                        # full: sizes 150,1500,5000 (several minutes)
    python bench/bench_memory.py --quick                # smoke test: sizes 20,60,150
    python bench/bench_memory.py --cases parquet,safetensors+member --sizes 150,5000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
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
        actors=1, batch_size=16, max_error_rate=1.0)
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
    if proc.pid == child_pid:
        return "driver", "bench_memory.py --child"
    try:
        name = proc.name()
    except Exception:
        name = ""
    try:
        cmd = " ".join(proc.cmdline()).strip()
    except Exception:
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
        "series_s_total_driver_actor_mb": series,
        "child": child,
    }
    if rc != 0 or child is None:
        out["log_tail"] = log_path.read_text(errors="replace")[-4000:]
    return out


def output_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*") if p.suffix in (".parquet", ".safetensors"))


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="150,1500,5000", help="samples per shard, comma-separated")
    ap.add_argument("--quick", action="store_true", help="smoke test: sizes 20,60,150 (overrides --sizes)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
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
        # One input tar per (input kind, N), shared by the cases that read it, removed once they ran.
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
                for case in using:
                    work = Path(tempfile.mkdtemp(prefix=f"{case.replace('+', '_')}-{n}-", dir=work_root))
                    # Ray's own temp dir, short: its unix socket paths must stay under 108 bytes.
                    ray_tmp = Path(tempfile.mkdtemp(prefix="lcr-", dir="/tmp"))
                    spec = {"case": CASES[case], "input": str(tar_path), "output": str(work / "out"),
                            "ray_tmp": str(ray_tmp), "result": str(work / "result.json")}
                    print(f"[{time.perf_counter() - t_start:7.1f}s] {case:<20} N={n:<6} input "
                          f"{in_bytes / MB:8.1f} MB ...", end="", flush=True)
                    try:
                        res = run_child(spec, work, args.interval, args.timeout)
                        out_bytes = output_bytes(work / "out")
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                        shutil.rmtree(ray_tmp, ignore_errors=True)
                    summary = (res["child"] or {}).get("summary", {})
                    row = {"case": case, "samples_per_shard": n, "input_mb": in_bytes / MB,
                           "output_mb": out_bytes / MB, "input_gen_s": gen_s, **res,
                           "samples_written": summary.get("samples_written"),
                           "samples_errored": summary.get("samples_errored")}
                    ok = res["rc"] == 0 and summary.get("samples_written") == n
                    row["ok"] = ok
                    rows.append(row)
                    print(f" peak {res['peak_rss_mb']:8.1f} MB (actor {res['at_peak_mb'].get('actor', 0):7.1f}, "
                          f"driver {res['at_peak_mb'].get('driver', 0):6.1f}), {res['wall_s']:6.1f} s"
                          + ("" if ok else f"  JOB FAILED rc={res['rc']} timed_out={res['timed_out']} "
                                           f"written={summary.get('samples_written')}"), flush=True)
                    if not ok and "log_tail" in res:
                        print(res["log_tail"][-2000:])
                shutil.rmtree(tar_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)

    smallest, largest = sizes[0], sizes[-1]
    base = {r["case"]: r["peak_rss_mb"] for r in rows if r["samples_per_shard"] == smallest}
    base_actor = {r["case"]: r["role_peak_mb"]["actor"] for r in rows if r["samples_per_shard"] == smallest}
    for r in rows:
        r["growth_mb"] = r["peak_rss_mb"] - base[r["case"]] if r["case"] in base else None
        r["actor_growth_mb"] = (r["role_peak_mb"]["actor"] - base_actor[r["case"]]
                                if r["case"] in base_actor else None)

    print(f"\nencode job peak RSS (whole process tree: driver + Ray + 1 actor) vs samples per shard; "
          f"tiny random VAE, batch 16, 2 CPUs, {os.cpu_count()} cores, sampled every {args.interval * 1000:.0f} ms")
    head = (f"{'case':<20}{'samples/shard':>14}{'input MB':>10}{'output MB':>11}{'peak RSS MB':>13}"
            f"{f'growth vs {smallest} MB':>20}{'actor peak MB':>15}{'seconds':>9}")
    print(head)
    print("-" * len(head))
    for case in cases:
        for r in (r for r in rows if r["case"] == case):
            g = r["growth_mb"]
            print(f"{case:<20}{r['samples_per_shard']:>14}{r['input_mb']:>10.1f}{r['output_mb']:>11.2f}"
                  f"{r['peak_rss_mb']:>13.1f}{('' if g is None else f'{g:+.1f}'):>20}"
                  f"{r['role_peak_mb']['actor']:>15.1f}{r['wall_s']:>9.1f}" + ("" if r["ok"] else "  (job failed)"))
    print(f"\ngoal: growth from {smallest:,} to {largest:,} samples per shard under {GOAL_GROWTH_MB:.0f} MB")
    verdicts = {}
    for case in cases:
        big = [r for r in rows if r["case"] == case and r["samples_per_shard"] == largest]
        small = [r for r in rows if r["case"] == case and r["samples_per_shard"] == smallest]
        if not big or not small or not (big[0]["ok"] and small[0]["ok"]):
            verdicts[case] = "FAIL (job failed)"
        else:
            g = big[0]["growth_mb"]
            verdicts[case] = f"{'PASS' if g < GOAL_GROWTH_MB else 'FAIL'} ({g:+.1f} MB)"
        print(f"  {case:<20} {verdicts[case]}")

    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "memory.json"
    import psutil

    out.write_text(json.dumps({
        "bench": "memory", "args": vars(args), "sizes": sizes, "cases": {c: CASES[c] for c in cases},
        "goal_growth_mb": GOAL_GROWTH_MB, "verdicts": verdicts, "rows": rows,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
                    "python": platform.python_version(), "memory_gb": psutil.virtual_memory().total / 2**30},
        "total_s": time.perf_counter() - t_start, "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
