"""Time to answer the rerun of a finished job, and to plan the resume of a very large one.

`job`: a real encode job of --shards tiny shards (one 64 px image each) is run once, on a local
folder and on moto's S3 (a loopback server started here), then the same command is timed end to
end, as a person would run it again, and the planning step alone (`Ledger.finished`: read the
records, check every data file's size). A job of COMPACT_MIN shards or more ends with its records
in one compacted table. Goal (issue 11, section 5): under 5 s end to end on both, at 2,000 shards.

`planning`: a finished output of --planning-shards shards is written directly (data files of a few
bytes, their records, the manifest, SUCCESS), and `Ledger.finished` is timed with the records
compacted in one table against one record file per shard (the layout before compaction, at
--files-shards, as reading 100,000 objects from S3 one by one takes minutes). Goal (issue 11,
section 6): under 30 s on moto's S3 at 100,000 shards.

    python bench/bench_resume.py                 # both, local and S3
    python bench/bench_resume.py --only job --shards 500 --stores local
    python bench/bench_resume.py --only planning --planning-shards 100000 --files-shards 10000
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


def _synthetic_output(out: str, n: int, *, compacted: bool) -> None:
    """A finished encode output of `n` shards written straight through the ledger's API: what a job
    leaves, without running one (data files hold a few bytes: planning checks sizes, not contents)."""
    from pipeline.core.ledger import Ledger, ShardRecord, build_manifest
    from pipeline.core.sink import ShardStats
    from pipeline.samples import SampleError

    shards = {f"part-{i:06d}": f"s3://in/part-{i:06d}.tar" for i in range(n)}
    ledger = Ledger(out)
    ledger.open_job(build_manifest(kind="encode", identity={"kind": "encode", "bench": 1}, shards=shards,
                                   data_extension="parquet", code_version="bench"), overwrite=True)
    payload = b"x" * 64
    records = []
    for name, url in shards.items():
        stats = ShardStats(name=name, path=f"{out}/{name}.parquet", samples=1000, bytes=len(payload), sha256="0" * 64)
        records.append(ShardRecord.from_stats(
            stats, input_url=url, samples_read=1001, identity_hash=ledger.identity_hash, seconds=60.0,
            errors=[SampleError(f"{name}/7", url, "decode", "broken JPEG: premature end of data segment")]))
    fs = ledger.fs
    fs.makedirs(ledger._path(ledger.layout.records), exist_ok=True)  # a local folder needs it; S3 has none
    for i in range(0, n, 5000):  # batched PUTs (s3fs sends them concurrently)
        chunk = records[i:i + 5000]
        fs.pipe({ledger._path(f"{r.name}.parquet"): payload for r in chunk})
        if not compacted:
            fs.pipe({ledger._record_path(r.name): json.dumps(r.to_dict()).encode() for r in chunk})
    if compacted:
        for i in range(0, n, 100_000):
            ledger._write_table({r.name: json.dumps(r.to_dict(), sort_keys=True) for r in records[i:i + 100_000]})
    ledger.write_success({})


def bench_planning(name: str, base: str, n: int, n_files: int, repeats: int) -> list[dict]:
    from pipeline.core.ledger import Ledger

    rows = []
    for layout, shards in (("compacted table", n), ("one file per record", n_files)):
        if shards <= 0:
            continue
        out = f"{base}/{'compacted' if layout.startswith('compacted') else 'files'}-{shards}"
        t0 = time.perf_counter()
        _synthetic_output(out, shards, compacted=layout.startswith("compacted"))
        made = time.perf_counter() - t0
        times, listings, whole = [], [], []
        for _ in range(repeats):  # alternating: planning, its listing alone, one listing of the folder
            t0 = time.perf_counter()
            ledger = Ledger(out)
            records = ledger.finished(ledger.read_manifest())
            times.append(time.perf_counter() - t0)
            assert records is not None and len(records) == shards
            t0 = time.perf_counter()
            assert len(ledger._data_sizes()) >= shards  # the listing of the data files, alone
            listings.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # what planning listed before: the folder, one page after another
            assert sum(e["type"] == "file" for e in ledger._ls(ledger.root)) >= shards
            whole.append(time.perf_counter() - t0)
        med, listing, one = statistics.median(times), statistics.median(listings), statistics.median(whole)
        rows.append({"store": name, "layout": layout, "shards": shards, "planning_s": round(med, 2),
                     "listing_s": round(listing, 2), "one_listing_s": round(one, 2),
                     "ms_per_shard": round(1000 * med / shards, 4), "setup_s": round(made, 1)})
        print(f"{name:6s} {layout:20s} {shards:>7,} shards: planning {med:.2f} s, of which listing the data "
              f"files {listing:.2f} s; one listing of the folder {one:.2f} s ({one / listing:.2f}x the listing) "
              f"({1000 * med / shards:.3f} ms/shard; written in {made:.0f} s)", flush=True)
    return rows


def _with_moto(fn):
    """Run fn("s3://bench") against moto's S3 server on loopback, in its own process (in this one it
    would share the GIL with the client it measures); stopped by its pid."""
    import boto3
    import requests

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                requests.get(endpoint, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        boto3.client("s3").create_bucket(Bucket="bench")
        return fn("s3://bench")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--only", choices=["job", "planning"])
    ap.add_argument("--planning-shards", type=int, default=100_000)
    ap.add_argument("--files-shards", type=int, default=10_000,
                    help="shards of the one-file-per-record baseline (0: skip it)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"resume-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    args = ap.parse_args()
    rows, planning = [], []
    for store in args.stores:
        def run(base: str, store: str = store) -> None:
            if args.only in (None, "job"):
                rows.append(bench_store(store, base, args.shards, args.repeats))
            if args.only in (None, "planning"):
                planning.extend(bench_planning(store, base, args.planning_shards, args.files_shards, args.repeats))

        if store == "local":
            with tempfile.TemporaryDirectory() as tmp:
                run(tmp)
        else:
            _with_moto(run)
    if rows:
        print("\n| store | shards | first run s | rerun end to end s (median) | of which planning s |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['store']} | {r['shards']:,} | {r['first_run_s']} | {r['rerun_end_to_end_s']} | "
                  f"{r['planning_s']} |")
    if planning:
        print("\n| store | records | shards | planning s (median) | of which listing data files s | "
              "one listing of the folder s (before) | before / now | ms per shard |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in planning:
            print(f"| {r['store']} | {r['layout']} | {r['shards']:,} | {r['planning_s']} | {r['listing_s']} | "
                  f"{r['one_listing_s']} | {r['one_listing_s'] / r['listing_s']:.2f} | {r['ms_per_shard']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "rows": rows, "planning": planning},
                                         indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
