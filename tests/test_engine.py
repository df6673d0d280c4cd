"""The shared engine on a real local Ray: actor pool start-up (replacing constructors that fail,
a start-up timeout), the runner's plan-before-actors order, and errors that carry their cause."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
from pipeline.core import runner
from pipeline.core.ledger import IncompatibleOutputError
from pipeline.core.pool import ActorPool, PoolStartError, error_message
from pipeline.core.runner import SHARDS_PER_ACTOR, JobError, run_job
from tests import imagedata

pytestmark = [pytest.mark.ray]


def _flaky_actor_class(failures: int):
    """An actor class whose constructor fails for the first `failures` instances (counted by a
    named Ray actor, so the count survives across processes)."""
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def next(self) -> int:
            self.n += 1
            return self.n

    counter = Counter.remote()

    class Flaky:
        def __init__(self) -> None:
            if ray.get(counter.next.remote()) <= failures:
                raise ValueError("weights not readable at /nowhere/vae.safetensors")

        def describe(self) -> dict:
            return {"identity": {}, "summary": "ok"}

    return ray.remote(num_cpus=0)(Flaky), counter


def test_pool_replaces_an_actor_whose_constructor_fails(ray_cluster):
    import ray

    cls, counter = _flaky_actor_class(failures=1)
    pool = ActorPool(lambda: cls.remote(), size=1, startup_timeout_s=60, max_start_failures=3)
    try:
        assert pool.start() == [{"identity": {}, "summary": "ok"}]
        assert pool._made == 2 and len(pool.actors) == 1
    finally:
        pool.shutdown()
        ray.kill(counter)


def test_pool_start_fails_with_the_constructors_own_error(ray_cluster):
    import ray

    cls, counter = _flaky_actor_class(failures=99)
    pool = ActorPool(lambda: cls.remote(), size=1, startup_timeout_s=60, max_start_failures=2)
    try:
        with pytest.raises(PoolStartError, match="ValueError: weights not readable at /nowhere/vae.safetensors"):
            pool.start()
        assert pool._made == 2
    finally:
        pool.shutdown()
        ray.kill(counter)


def test_pool_start_times_out_when_no_actor_can_be_placed(ray_cluster):
    import ray

    @ray.remote(resources={"a_resource_no_node_has": 1})
    class Unplaceable:
        def describe(self) -> dict:
            return {}

    pool = ActorPool(lambda: Unplaceable.remote(), size=1, startup_timeout_s=1.5)
    try:
        with pytest.raises(PoolStartError, match="no actor was ready within 2 s"):
            pool.start()
    finally:
        pool.shutdown()


def test_error_message_carries_the_cause_not_rays_header(ray_cluster):
    import ray
    from ray.exceptions import RayError

    @ray.remote
    def fails() -> None:
        raise OSError("cannot read shard s3://b/x.tar: connection reset")

    with pytest.raises(RayError) as info:
        ray.get(fails.remote())
    assert error_message(info.value) == "OSError: cannot read shard s3://b/x.tar: connection reset"


def test_a_finished_job_is_known_before_any_actor_starts(ray_cluster, tmp_path, monkeypatch):
    samples = [{"__key__": f"k{i}", "jpg": imagedata.encode(imagedata.photo(max_side=64), "JPEG"), "txt": "t"}
               for i in range(2)]
    imagedata.write_tar_shard(str(tmp_path / "in" / "p-0.tar"), samples)
    cfg = EncodeConfig(input=(str(tmp_path / "in"),), output=str(tmp_path / "out"),
                       vae=VAEConfig(source="random:tiny", dtype="float32"), preprocess=PreprocessConfig(resolution=64),
                       actors=1, retry=RetryConfig(max_attempts=1))
    first = run_job("encode", cfg, progress=False)
    assert first.samples_written == 2

    def no_actors(*args, **kwargs):
        raise AssertionError("actors were started for a job with nothing to do")

    monkeypatch.setattr(runner, "_start_pool", no_actors)
    again = run_job("encode", cfg, progress=False)
    assert again.skipped_shards == 1 and again.processed_shards == 0
    # And an output of another job is refused before any actor starts, too.
    other = dataclasses.replace(cfg, vae=VAEConfig(source="random:tiny", seed=9, dtype="float32"))
    with pytest.raises(IncompatibleOutputError, match="vae_fingerprint: output has random-"):
        run_job("encode", other, progress=False)


def test_an_actor_with_another_model_stops_the_job():
    from pipeline.core.kind import JobPlan
    from pipeline.jobs import get_kind

    job = JobPlan(inputs={}, identity={"vae_fingerprint": "aaa", "preset": "sd15"}, provenance={}, data_extension="x")
    runner._check_actor(get_kind("encode"), job, {"identity": {"vae_fingerprint": "aaa", "preset": "sd15"}})
    with pytest.raises(JobError, match="vae_fingerprint: plan has aaa, actor has bbb"):
        runner._check_actor(get_kind("encode"), job, {"identity": {"vae_fingerprint": "bbb", "preset": "sd15"}})


def _slow_actor_class():
    import os
    import time

    import ray

    from pipeline.core.pool import TaskStarted
    from pipeline.core.scheduler import ShardResult

    class Slow:
        def __init__(self) -> None:
            time.sleep(0.5)  # a model loading: the actor is unavailable for a while after a restart

        def describe(self) -> dict:
            return {"identity": {}, "summary": "slow", "pid": os.getpid()}

        def process(self, task):
            yield TaskStarted(pid=os.getpid())
            time.sleep(float(task.url))
            yield ShardResult(task.name, 1, 1, 0, 1, 0.0, task.attempt)

    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=2)(Slow)


def _drain(pool: ActorPool, n: int, timeout_s: float = 60) -> list:
    import time

    outcomes: list = []
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < n and time.monotonic() < deadline:
        pool.poll_starting()
        outcomes += pool.wait(timeout=0.5)
    assert len(outcomes) == n, f"only {len(outcomes)} of {n} tasks finished"
    return outcomes


def test_pool_tells_tasks_an_actor_began_from_tasks_lost_before_they_started(ray_cluster):
    """Issue 8, defect 1: a task sent to an actor that is dead or restarting never ran; the pool
    says so (`started=False`), waits for the restarted actor, and sends it work again."""
    import time

    from pipeline.core.scheduler import ShardTask
    from tests.actors import sigkill

    cls = _slow_actor_class()
    pool = ActorPool(lambda: cls.remote(), size=1, slots=2, startup_timeout_s=60)
    try:
        (info,) = pool.start()
        pool.submit(ShardTask("running", "30"), "process", time.monotonic())
        deadline = time.monotonic() + 30
        while not any(f.started_at for f in pool._inflight.values()) and time.monotonic() < deadline:
            assert pool.wait(timeout=0.2) == []
        assert sigkill([info["pid"]]) == 1
        pool.submit(ShardTask("sent-to-the-dead", "0"), "process", time.monotonic())
        outcomes = {o.task.name: o for o in _drain(pool, 2)}
        assert outcomes["running"].error is not None and outcomes["running"].started
        assert outcomes["sent-to-the-dead"].error is not None and not outcomes["sent-to-the-dead"].started
        assert pool.restarts == 1 and pool.free_slots() == 0, "no work goes to an actor that is restarting"
        deadline = time.monotonic() + 60
        while pool.free_slots() == 0 and time.monotonic() < deadline:
            pool.poll_starting(timeout=0.5)
        assert pool.free_slots() == 2 and pool.infos[-1]["pid"] != info["pid"], "the restarted actor rejoins"
        pool.submit(ShardTask("after", "0"), "process", time.monotonic())
        (after,) = _drain(pool, 1)
        assert after.error is None and after.result.name == "after"
    finally:
        pool.shutdown()


def test_actor_deaths_between_tasks_cost_no_attempt(ray_cluster, tmp_path):
    """Issue 8, defect 1, on a real job: the actor is SIGKILLed each time a shard commits, so the
    next shards are sent to an actor that is restarting. Only tasks that began are attempts: a kill
    charges at most the tasks its actor was running, and each shard at most one try per kill."""
    from pipeline.core.ledger import Ledger
    from pipeline.io.latent_reader import read_latents
    from tests.actors import own_actor_pids, sigkill

    for s in range(6):
        samples = [{"__key__": f"s{s}/{i}", "jpg": imagedata.encode(imagedata.photo(max_side=64), "JPEG")}
                   for i in range(2)]
        imagedata.write_tar_shard(str(tmp_path / "in" / f"part-{s:04d}.tar"), samples)
    out = str(tmp_path / "out")
    cfg = EncodeConfig(input=(str(tmp_path / "in"),), output=out, actors=1,
                       vae=VAEConfig(source="random:tiny", dtype="float32"), preprocess=PreprocessConfig(resolution=64),
                       retry=RetryConfig(max_attempts=5, backoff_s=0.05, backoff_max_s=0.1))
    kills = []

    def kill_the_actor(result) -> None:
        if sum(kills) < 3:  # a restarting actor may have no process to kill yet
            kills.append(sigkill(own_actor_pids("JobActor")))

    summary = run_job("encode", cfg, progress=False, on_result=kill_the_actor)
    assert sum(kills) >= 2 and summary.actor_restarts >= 2
    assert summary.processed_shards == 6 and summary.samples_written == 12
    assert summary.lost_unstarted >= 1, "some shard must have been sent to a restarting actor"
    records = Ledger(out).job_records()
    # A shard running when its actor was killed is charged that one try, no more; the tasks lost
    # unstarted are not charged at all. (One shard may be running at two kills: the timing decides.)
    assert sum(r.attempt - 1 for r in records) == summary.attempts_failed
    assert summary.attempts_failed <= sum(kills) * SHARDS_PER_ACTOR
    assert max(r.attempt for r in records) <= 1 + sum(kills)
    keys = [k for k, _, _ in read_latents(out)]
    assert sorted(keys) == sorted(f"s{s}/{i}" for s in range(6) for i in range(2))
    import os

    tmp = os.path.join(out, ".latentcache", "tmp")
    assert not os.path.isdir(tmp) or os.listdir(tmp) == [], "a killed actor's temp file outlived the job"


def test_actors_get_malloc_settings_that_keep_large_blocks_in_the_heap(ray_cluster):
    """glibc reads GLIBC_TUNABLES only at exec: the actors' environment must carry it. In a Ray
    worker started with it, a 48 MiB block allocated on a thread (as the actors' shard threads run
    the model) comes from the main heap, which is kept, not from an mmap unmapped on free or a
    thread arena (the minor faults this saves are measured in BENCHMARKS.md)."""
    import ray

    assert runner.actor_env({})["GLIBC_TUNABLES"] == runner.ACTOR_GLIBC_TUNABLES
    assert runner.actor_env({"GLIBC_TUNABLES": ""})["GLIBC_TUNABLES"] == ""  # the user's own wins
    assert "AWS_SECRET_ACCESS_KEY" not in runner.actor_env({"AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "r"})

    @ray.remote(num_cpus=0)
    def where_a_large_block_lives() -> tuple[str, str]:
        import os
        import threading

        import torch

        found: list[str] = []

        def work() -> None:
            x = torch.empty(12 << 20)  # 48 MiB of float32, an activation's size
            for line in open("/proc/self/maps"):
                fields = line.split()
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= x.data_ptr() < hi:
                    found.append(fields[5] if len(fields) > 5 else "anonymous mapping")

        t = threading.Thread(target=work)
        t.start()
        t.join()
        return os.environ.get("GLIBC_TUNABLES", ""), found[0]

    tuned = where_a_large_block_lives.options(runtime_env={"env_vars": runner.actor_env({})}).remote()
    default = where_a_large_block_lives.options(runtime_env={"env_vars": {"GLIBC_TUNABLES": ""}}).remote()
    (env, tuned_place), (_, default_place) = ray.get([tuned, default], timeout=120)
    assert env == runner.ACTOR_GLIBC_TUNABLES
    assert tuned_place == "[heap]"
    assert default_place != "[heap]"


def test_a_jobs_actors_on_a_ray_it_did_not_start_get_the_malloc_settings(ray_cluster, tmp_path, caplog, monkeypatch):
    """On a Ray the driver joined (here the session's; a cluster alike), the settings go in the
    actors' runtime_env: the actor process's environment holds them while the job runs."""
    import logging
    import re

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    imagedata.photo_shards(tmp_path / "in", 2, per_shard=2, max_side=64)
    cfg = EncodeConfig(input=(str(tmp_path / "in"),), output=str(tmp_path / "out"),
                       vae=VAEConfig(source="random:tiny", dtype="float32"), preprocess=PreprocessConfig(resolution=64),
                       actors=1, retry=RetryConfig(max_attempts=1))
    seen: list[bytes] = []

    def actor_environ(_result) -> None:  # while the job runs, its actor is alive
        pids = {int(m) for r in caplog.records for m in re.findall(r"actor ready on node \S+ \(pid (\d+)\)",
                                                                   r.getMessage())}
        for pid in pids:
            with open(f"/proc/{pid}/environ", "rb") as f:
                seen.extend(e for e in f.read().split(b"\0") if e.startswith(b"GLIBC_TUNABLES="))

    with caplog.at_level(logging.INFO, logger="pipeline.core.runner"):
        assert run_job("encode", cfg, progress=False, on_result=actor_environ).samples_written == 4
    # glibc cuts the variable at its first ':' in place when it parses it: the first setting shows.
    assert seen and all(e.startswith(b"GLIBC_TUNABLES=" + runner.ACTOR_GLIBC_TUNABLES.split(":")[0].encode())
                        for e in seen), seen
    assert runner.actor_runtime_env({}, inherited_env=True) is None  # a Ray the driver started has them


def test_a_local_ray_the_driver_starts_gives_its_workers_the_malloc_settings(tmp_path):
    """Inherited, not through a runtime_env (which would rule out Ray's prestarted workers); the
    driver's own environment is left as it was."""
    import os
    import subprocess
    import sys

    code = """
import os, ray
from pipeline.core import runner
assert runner._ensure_ray(None)
try:
    @ray.remote(num_cpus=0)
    def env():
        return os.environ.get("GLIBC_TUNABLES")
    print(repr(ray.get(env.remote(), timeout=60)), repr(os.environ.get("GLIBC_TUNABLES")))
finally:
    ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [repr(runner.ACTOR_GLIBC_TUNABLES), "None"]
