"""The codec in a Ray actor as the job starts it, with and without the actors' glibc malloc settings.

Actors are started the way `pipeline.core.runner` starts them (`max_concurrency=2`, their
environment from `runner.actor_env`), alternately with `ACTOR_GLIBC_TUNABLES` and with glibc's
defaults (`GLIBC_TUNABLES=` empty), --repeats times each. Each actor warms up with one encode, then
times --calls encodes of a --batch x --size px batch of --preset (random weights) on a shard thread
of the actor. Printed: medians of wall and CPU seconds per call and of minor page faults per call,
and the ratios default / tuned.

    python bench/bench_actor_malloc.py                          # sd15, 1 x 256 px, float32
    python bench/bench_actor_malloc.py --dtype bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class CodecActor:
    """Holds one codec; `run` times encodes and counts this process's minor page faults."""

    def __init__(self, preset: str, dtype: str, batch: int, size: int, threads: int) -> None:
        import torch

        from vae import load_vae

        torch.set_num_threads(threads)
        self.codec = load_vae(f"random:{preset}", dtype=dtype)
        self.x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run(self, calls: int) -> dict[str, float]:
        import resource

        self.codec.encode(self.x)  # warm-up: the heap settles
        faults, cpu, wall = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
        for _ in range(calls):
            self.codec.encode(self.x)
        return {"wall_s": (time.perf_counter() - wall) / calls, "cpu_s": (time.process_time() - cpu) / calls,
                "minor_faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" /
                                       f"actor-malloc-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    args = p.parse_args()

    import ray

    from pipeline.core import runner

    settings = {"tuned": runner.actor_env({}), "default": {"GLIBC_TUNABLES": ""}}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in settings}
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(CodecActor)
        for _ in range(args.repeats):
            for name, env in settings.items():  # alternating, so drift in the machine's load hits both
                actor = remote.options(num_cpus=args.cpus, max_concurrency=runner.SHARDS_PER_ACTOR,
                                       runtime_env={"env_vars": env}).remote(
                    args.preset, args.dtype, args.batch, args.size, args.cpus)
                runs[name].append(ray.get(actor.run.remote(args.calls)))
                ray.kill(actor)
    finally:
        ray.shutdown()

    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"{args.preset} encode, {args.batch} x {args.size} px, {args.dtype}, in a Ray actor; "
          f"medians of {args.repeats} actors x {args.calls} calls")
    print(f"{'malloc':<8} {'wall s/call':>12} {'CPU s/call':>11} {'minor faults/call':>18}")
    for name, m in med.items():
        print(f"{name:<8} {m['wall_s']:>12.3f} {m['cpu_s']:>11.3f} {m['minor_faults']:>18,.0f}")
    ratios = {k: med["default"][k] / med["tuned"][k] if med["tuned"][k] else float("inf") for k in med["tuned"]}
    faults = med["tuned"]["minor_faults"]  # about none once the heap has settled: a ratio would mean nothing
    faults_said = f"{ratios['minor_faults']:.1f}x" if faults >= 10 else \
        f"{med['default']['minor_faults']:,.0f} -> {faults:.1f} per call"
    print(f"{'default/tuned':<14} wall {ratios['wall_s']:.2f}x  CPU {ratios['cpu_s']:.2f}x  faults {faults_said}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "tunables": runner.ACTOR_GLIBC_TUNABLES, "runs": runs,
                                          "medians": med, "ratios": ratios, "machine": platform.platform()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
