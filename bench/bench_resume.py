"""Time to answer the rerun of a finished job: a real encode job of --shards tiny shards (one
64 px image each) is run once, on a local folder and on moto's S3 (a loopback server started here),
then the same command is timed end to end, as a person would run it again, and the planning step
alone (`Ledger.finished`: list and read every record, check every data file's size).

Goal (issue 11, section 5): under 5 s end to end on both, at 2,000 shards.

    python bench/bench_resume.py                 # 2,000 shards, local and S3, medians of 3
    python bench/bench_resume.py --shards 500 --stores local
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_shards(base: str, n: int) -> None:
    import imagedata

    jpg = imagedata.encode(imagedata.photo("chelsea", max_side=64), "JPEG")
    for i in range(n):
        imagedata.write_tar_shard(f"{base}/part-{i:06d}.tar", [{"__key__": f"p{i}", "jpg": jpg, "txt": str(i)}])


def _cli(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def bench_store(name: str, base: str, n: int, repeats: int) -> dict:
    from pipeline.core.ledger import Ledger

    _make_shards(f"{base}/in", n)
    args = ["encode", "--input", f"{base}/in", "--output", f"{base}/out", "--vae", "random:tiny",
            "--resolution", "64", "--batch-size", "1", "--no-progress", "--set", "decode_threads=1"]
    first_s, proc = _cli(args)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the first run failed:\n{proc.stderr[-3000:]}")
    ends, plans = [], []
    for _ in range(repeats):
        seconds, proc = _cli(args)
        assert proc.returncode == 0 and "complete:" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        assert "Started a local Ray" not in proc.stderr
        ends.append(seconds)
        t0 = time.perf_counter()
        records = Ledger(f"{base}/out").finished(Ledger(f"{base}/out").read_manifest())
        plans.append(time.perf_counter() - t0)
        assert records is not None and len(records) == n
    row = {"store": name, "shards": n, "first_run_s": round(first_s, 1),
           "rerun_end_to_end_s": round(statistics.median(ends), 2), "planning_s": round(statistics.median(plans), 2)}
    print(f"{name:6s} {n} shards: first run {first_s:.1f} s; rerun {row['rerun_end_to_end_s']:.2f} s end to end, "
          f"of which planning {row['planning_s']:.2f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"resume-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    args = ap.parse_args()
    rows = []
    if "local" in args.stores:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(bench_store("local", tmp, args.shards, args.repeats))
    if "s3" in args.stores:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                              AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
            boto3.client("s3").create_bucket(Bucket="bench")
            rows.append(bench_store("s3", "s3://bench", args.shards, args.repeats))
        finally:
            server.stop()
    print("\n| store | shards | first run s | rerun end to end s (median) | of which planning s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['store']} | {r['shards']:,} | {r['first_run_s']} | {r['rerun_end_to_end_s']} | {r['planning_s']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
