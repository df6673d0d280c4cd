"""Job metrics through `ray.util.metrics`: they appear in Ray's Prometheus endpoint (each node's
metrics export port, `/metrics`) and its dashboard, prefixed `ray_` by Ray's exporter.

Recorded in the driver, from each committed shard's result, so a shard counts once however many
times it was tried (a retried or abandoned attempt commits nothing). Counters and the histogram
stay in the endpoint after the job ends; the gauges are the live driver's current values and go
with it. Names (tag `kind`: encode,
decode or audit):

| metric | type | what |
|---|---|---|
| latentcache_samples_read | counter | samples read from committed shards |
| latentcache_samples_written | counter | samples written (latents, images or scores) |
| latentcache_sample_errors | counter | samples recorded as errors, tag `stage` (read, decode, encode, ...) |
| latentcache_bytes_written | counter | bytes of committed data files |
| latentcache_fp32_fallbacks | counter | samples recomputed in float32 after a non-finite half-precision result |
| latentcache_shard_seconds | histogram | seconds per committed shard |
| latentcache_shards_committed | gauge | shards committed, this run and earlier ones |
| latentcache_shards_total | gauge | shards of the job |
| latentcache_actors | gauge | actors in the pool |
| latentcache_actor_restarts | counter | actor deaths seen (Ray restarted each) |
"""

from __future__ import annotations

from typing import Any, Mapping

SHARD_SECONDS_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600]
# The job kinds' counter (ShardResult.counters) behind the fallback metric.
FP32_FALLBACK_COUNTERS = ("fp32_fallbacks",)


class JobMetrics:
    """The metrics of one job run, tagged with its kind."""

    def __init__(self, kind: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"kind": kind}
        keys = ("kind",)
        self.read = Counter("latentcache_samples_read", "samples read from committed shards", tag_keys=keys)
        self.written = Counter("latentcache_samples_written", "samples written", tag_keys=keys)
        self.errors = Counter("latentcache_sample_errors", "samples recorded as errors, by stage",
                              tag_keys=("kind", "stage"))
        self.bytes = Counter("latentcache_bytes_written", "bytes of committed data files", tag_keys=keys)
        self.fallbacks = Counter("latentcache_fp32_fallbacks", "samples recomputed in float32", tag_keys=keys)
        self.seconds = Histogram("latentcache_shard_seconds", "seconds per committed shard",
                                 boundaries=SHARD_SECONDS_BOUNDARIES, tag_keys=keys)
        self.committed = Gauge("latentcache_shards_committed", "shards committed", tag_keys=keys)
        self.total = Gauge("latentcache_shards_total", "shards of the job", tag_keys=keys)
        self.actors = Gauge("latentcache_actors", "actors in the pool", tag_keys=keys)
        self.restarts = Counter("latentcache_actor_restarts", "actor deaths seen", tag_keys=keys)
        self._restarts_seen = 0

    def start(self, total_shards: int, committed: int) -> None:
        self.total.set(total_shards, tags=self.tags)
        self.committed.set(committed, tags=self.tags)

    def shard_done(self, result: Any, committed: int) -> None:
        """One committed shard's `ShardResult`."""
        if result.samples_read:
            self.read.inc(result.samples_read, tags=self.tags)
        if result.samples_written:
            self.written.inc(result.samples_written, tags=self.tags)
        for stage, count in dict(getattr(result, "errors_by_stage", {}) or {}).items():
            if count:
                self.errors.inc(count, tags={**self.tags, "stage": stage})
        if result.bytes:
            self.bytes.inc(result.bytes, tags=self.tags)
        fallbacks = sum(int(_get(result.counters, name)) for name in FP32_FALLBACK_COUNTERS)
        if fallbacks:
            self.fallbacks.inc(fallbacks, tags=self.tags)
        self.seconds.observe(result.seconds, tags=self.tags)
        self.committed.set(committed, tags=self.tags)

    def pool(self, actors: int, restarts: int) -> None:
        """The pool's size and its restart count so far (a running total; the counter gets the rise)."""
        self.actors.set(actors, tags=self.tags)
        if restarts > self._restarts_seen:
            self.restarts.inc(restarts - self._restarts_seen, tags=self.tags)
            self._restarts_seen = restarts


def _get(counters: Mapping[str, int], name: str) -> int:
    return counters.get(name, 0) if counters else 0


__all__ = ["JobMetrics", "SHARD_SECONDS_BOUNDARIES"]
