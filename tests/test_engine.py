"""The shared engine on a real local Ray: actor pool start-up (replacing constructors that fail,
a start-up timeout), the runner's plan-before-actors order, and errors that carry their cause."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
from pipeline.core import runner
from pipeline.core.ledger import IncompatibleOutputError
from pipeline.core.pool import ActorPool, PoolStartError, error_message
from pipeline.core.runner import JobError, run_job
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
