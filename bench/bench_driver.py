"""Driver CPU per shard at scale: the runner's loop (`_run_loop`: the Scheduler, progress lines,
the error budget, result handling) with a stand-in pool whose tasks finish at once, so that only
the driver's own work is timed. No Ray, no cluster.

Side by side in one run: this tree's Scheduler, and (with --baseline REV, default the commit
before the O(1) Scheduler) that revision's, at each size. The goal is driver CPU per shard under
1 ms and flat from 1,000 to 100,000 shards. The baseline is quadratic: it runs only up to
--baseline-max shards.

    python bench/bench_driver.py                       # 1k, 10k, 100k shards; baseline to 16k
    python bench/bench_driver.py --sizes 1000 16000 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import EncodeConfig, ResourcesConfig, VAEConfig  # noqa: E402
from pipeline.core import runner  # noqa: E402
from pipeline.core.pool import Outcome  # noqa: E402
from pipeline.core.scheduler import Scheduler, ShardResult  # noqa: E402

BASELINE_REV = "0c53332"  # the last commit with the list-based Scheduler


@dataclass
class InstantPool:
    """The pool's interface; every task submitted finishes by the next `wait` with a result."""

    slots: int
    actors: list[Any] = field(default_factory=lambda: [object()])
    restarts: int = 0
    pending: list[Any] = field(default_factory=list)

    def poll_starting(self, timeout: float = 0.0) -> list:
        return []

    def free_slots(self) -> int:
        return self.slots - len(self.pending)

    def submit(self, task: Any, method: str, now: float) -> None:
        self.pending.append(task)

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def wait(self, timeout: float) -> list[Outcome]:
        done = [Outcome(t, result=ShardResult(name=t.name, samples_read=10_000, samples_written=9_990,
                                              samples_errored=10, bytes=300 << 20, seconds=60.0, attempt=t.attempt,
                                              counters={"members_not_kept.jpg": 0}, errors_by_stage={"decode": 10}))
                for t in self.pending]
        self.pending.clear()
        return done

    def kill_timed_out(self, now: float, timeout_s: float) -> list:
        return []


class _NoLock:
    lost = None


class _NoMetrics:
    def shard_done(self, result: Any, committed: int) -> None:
        pass

    def pool(self, actors: int, restarts: int) -> None:
        pass


class _Kind:
    name = "encode"

    def shard_done(self, result: Any) -> None:
        pass


def _scheduler_class(rev: str) -> type | None:
    """The Scheduler of revision `rev` (git), imported from a temporary copy of its file."""
    try:
        text = subprocess.run(["git", "show", f"{rev}:pipeline/core/scheduler.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    path = Path(tempfile.mkdtemp()) / "baseline_scheduler.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_scheduler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Scheduler


def run_once(scheduler_cls: type, n: int, slots: int) -> float:
    """Driver CPU seconds for a job of `n` shards."""
    cfg = EncodeConfig(input=("bench",), output="bench", vae=VAEConfig(),
                       resources=ResourcesConfig(rescale_interval_s=1e9))
    shards = {f"part-{i:07d}": f"s3://bench/part-{i:07d}.tar" for i in range(n)}
    sched = scheduler_cls(shards, cfg.retry, cfg.max_error_rate, cfg.min_samples_for_error_rate)
    pool = InstantPool(slots)
    bar = runner._Progress(n, 0, 0, bar=False, every_s=30.0)
    t0 = time.process_time()
    runner._run_loop(_Kind(), cfg, None, pool, sched, bar, None, _NoLock(), None,
                     lambda result: None, _NoMetrics())
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slots", type=int, default=128, help="tasks in flight (64 actors x 2)")
    ap.add_argument("--baseline", default=BASELINE_REV, help="git revision whose Scheduler to compare ('' for none)")
    ap.add_argument("--baseline-max", type=int, default=16_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"driver-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    args = ap.parse_args()
    baseline = _scheduler_class(args.baseline) if args.baseline else None
    sizes = sorted(set(args.sizes) | ({args.baseline_max} if baseline else set()))
    rows = []
    for n in sizes:
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternating, so that machine noise hits both alike
            ours.append(run_once(Scheduler, n, args.slots))
            if baseline is not None and n <= args.baseline_max:
                theirs.append(run_once(baseline, n, args.slots))
        row = {"shards": n, "ms_per_shard": 1000 * statistics.median(ours) / n,
               "baseline_ms_per_shard": 1000 * statistics.median(theirs) / n if theirs else None}
        row["speedup"] = row["baseline_ms_per_shard"] / row["ms_per_shard"] if theirs else None
        rows.append(row)
        print(f"{n:>8} shards: {row['ms_per_shard']:.4f} ms/shard" + (
            f"   baseline {row['baseline_ms_per_shard']:.4f} ms/shard ({row['speedup']:.1f}x)" if theirs else ""),
            flush=True)
    flat = rows[-1]["ms_per_shard"] / rows[0]["ms_per_shard"]
    print(f"\n| shards | driver CPU ms/shard | baseline ({args.baseline}) ms/shard | speed-up |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        base = f"{r['baseline_ms_per_shard']:.4f}" if r["baseline_ms_per_shard"] is not None else "-"
        speed = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "-"
        print(f"| {r['shards']:,} | {r['ms_per_shard']:.4f} | {base} | {speed} |")
    print(f"\nper-shard cost at {rows[-1]['shards']:,} over {rows[0]['shards']:,} shards: {flat:.2f}x (flat is 1.0)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                          "repeats": args.repeats, "slots": args.slots, "baseline": args.baseline,
                                          "rows": rows, "flatness": flat}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
