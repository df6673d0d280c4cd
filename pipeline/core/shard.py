"""The shard skeleton every job kind shares: count what is read, prepare in threads, batch, step,
write, reconcile, commit, record. `ShardProcessor` knows nothing of Ray, so tests run it in-process;
`JobActor` is the Ray actor around it.
"""

from __future__ import annotations

from collections import Counter

import collections
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping

from pipeline.core.kind import JobPlan, PermanentShardError, ShardContext, ShardWorker
from pipeline.core.pool import TaskStarted
from pipeline.core.scheduler import ShardResult, ShardTask
from pipeline.core.sink import InvalidRecordError, ShardSink
from pipeline.core.ledger import Ledger, ShardRecord, identity_hash
from pipeline.samples import SampleError

log = logging.getLogger(__name__)


class ReconciliationError(RuntimeError):
    """A shard's written + errored samples do not add up to those read: it is never committed."""


def _prepare_one(worker: ShardWorker, item: Any, task: ShardTask) -> Any:
    try:
        return worker.prepare(item, task)
    except Exception as e:  # a sample the decoders choke on in an unforeseen way is still one sample
        key = worker.key_of(item)
        log.debug("unexpected error preparing %s from %s", key, task.url, exc_info=True)
        return SampleError(key=key, shard=task.url, stage="preprocess", reason=f"{type(e).__name__}: {e}")


def prepare_in_threads(items: Iterable[Any], worker: ShardWorker, task: ShardTask, pool: ThreadPoolExecutor,
                       *, window: int) -> Iterator[Any]:
    """`worker.prepare` in a thread pool (Pillow and numpy release the GIL), in input order, at most
    `window` items in flight so memory stays bounded while the model runs."""
    pending: collections.deque[Future | SampleError] = collections.deque()
    for item in items:
        pending.append(item if isinstance(item, SampleError) else pool.submit(_prepare_one, worker, item, task))
        if len(pending) >= window:
            head = pending.popleft()
            yield head if isinstance(head, SampleError) else head.result()
    while pending:
        head = pending.popleft()
        yield head if isinstance(head, SampleError) else head.result()


class ShardProcessor:
    """Runs shards through one worker and commits them to one output folder."""

    def __init__(self, worker: ShardWorker, *, output: str, identity: Mapping[str, Any],
                 storage_options: Mapping[str, Any] | None = None,
                 before_publish: Callable[[ShardTask], None] | None = None) -> None:
        self.worker = worker
        # Called with the shard complete and nothing published yet: raises to keep it unpublished.
        self.before_publish = before_publish
        self.identity_hash = identity_hash(identity)
        self.ledger = Ledger(output, storage_options)
        self._pool = ThreadPoolExecutor(max_workers=worker.threads, thread_name_prefix="prepare")

    def _add(self, sink: ShardSink, outputs: Iterable[Any], task: ShardTask, errors: list[SampleError]) -> None:
        for out in outputs:
            if isinstance(out, SampleError):
                errors.append(out)
                continue
            try:
                sink.add(out)
            except InvalidRecordError as e:
                errors.append(SampleError(out.key, task.url, "write", str(e)))

    def process(self, task: ShardTask) -> ShardResult:
        """Process and commit one shard. Raises on shard-level failure (nothing is committed then)."""
        start = time.perf_counter()
        worker = self.worker
        ctx = ShardContext(task)
        errors: list[SampleError] = []
        read = 0

        def counted(items: Iterable[Any]) -> Iterator[Any]:
            nonlocal read
            for item in items:
                read += 1
                yield item

        window = max(2 * worker.batch_size, 4 * worker.threads)
        batches: dict[Hashable, list[Any]] = {}
        with worker.open_sink(task) as sink:
            for item in prepare_in_threads(counted(worker.read(task, ctx)), worker, task, self._pool, window=window):
                if isinstance(item, SampleError):
                    errors.append(item)
                    continue
                key = worker.batch_key(item)
                batch = batches.setdefault(key, [])
                batch.append(item)
                if len(batch) >= worker.batch_size:
                    self._add(sink, worker.step(batch, ctx), task, errors)
                    batches[key] = []
            for batch in batches.values():
                if batch:
                    self._add(sink, worker.step(batch, ctx), task, errors)
            if len(sink) + len(errors) != read:
                raise ReconciliationError(
                    f"shard {task.name}: {read} samples read but {len(sink)} written and {len(errors)} errored; "
                    "refusing to commit a shard that loses samples")
            if self.before_publish is not None:
                self.before_publish(task)
            stats = sink.commit()
        seconds = time.perf_counter() - start
        record = ShardRecord.from_stats(stats, input_url=task.url, samples_read=read, errors=errors,
                                        identity_hash=self.identity_hash, attempt=task.attempt, seconds=seconds,
                                        counters=ctx.counters, input_version=dict(task.version))
        record = self.ledger.commit_record(record)
        return ShardResult(name=task.name, samples_read=read, samples_written=stats.samples,
                           samples_errored=len(errors), bytes=stats.bytes, seconds=seconds,
                           attempt=task.attempt, counters=dict(ctx.counters),
                           errors_by_stage=dict(Counter(e.stage for e in errors)), record=record.to_dict())


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class DriverGoneError(PermanentShardError):
    """The driver that owns the job is gone or no longer owns the output: nothing more is published."""


# How often an actor on the driver's host checks that the driver still runs.
DRIVER_CHECK_S = 1.0


class JobActor:
    """The Ray actor of every job kind: builds the kind's worker (the model is loaded here, not
    shipped through the object store) and processes shards. Made remote by the pool.

    `guard` names the driver's run (pipeline.core.lock.JobLock.guard): before it publishes a
    shard, the actor checks that this run still owns the output folder and that the folder still
    holds this job; on the driver's host it also exits within DRIVER_CHECK_S of the driver's death
    (Ray takes longer to reap the actors of a SIGKILLed driver, and they would go on writing).
    """

    def __init__(self, kind: str, cfg: Any, plan: JobPlan, guard: Mapping[str, Any] | None = None) -> None:
        from pipeline.jobs import get_kind

        self._guard = dict(guard or {})
        self._output = cfg.output
        self._identity_hash = identity_hash(plan.identity)
        self._worker = get_kind(kind).worker(cfg, plan)
        self._processor = ShardProcessor(self._worker, output=cfg.output, identity=plan.identity,
                                         storage_options=cfg.storage_options,
                                         before_publish=self._check_owner if self._guard else None)
        self._node = _node_id()
        if self._guard.get("host") == socket.gethostname():
            threading.Thread(target=self._watch_driver, name="latentcache-driver-watch", daemon=True).start()
        log.info("actor %d ready for %s", os.getpid(), kind)

    def _driver_alive(self) -> bool:
        from pipeline.core.lock import process_alive

        if self._guard.get("host") != socket.gethostname():
            return True  # another host: the lock's heartbeat tells (see _check_owner)
        return process_alive(int(self._guard["pid"]), self._guard.get("pid_started"))

    def _watch_driver(self) -> None:
        while True:
            time.sleep(DRIVER_CHECK_S)
            if not self._driver_alive():
                log.error("the driver (pid %s) is gone; this actor exits", self._guard.get("pid"))
                os._exit(1)  # abandons in-flight shards, which the next run redoes; nothing half-published

    def _check_owner(self, task: ShardTask) -> None:
        from pipeline.core.lock import why_not_owner

        if not self._driver_alive():
            raise DriverGoneError(f"shard {task.name} not published: the driver (pid {self._guard.get('pid')}) is gone")
        ledger = self._processor.ledger
        reason = why_not_owner(ledger.fs, ledger.root, self._guard["owner"],
                               stale_after_s=float(self._guard["stale_after_s"]))
        if reason is None:
            manifest = ledger.read_manifest()
            if manifest is None or manifest.get("identity_hash") != self._identity_hash:
                reason = "the output folder no longer holds this job (overwritten by another job)"
        if reason is not None:
            raise DriverGoneError(f"shard {task.name} not published to {self._output}: {reason}")

    def describe(self) -> dict[str, Any]:
        return {**self._worker.describe(), "pid": os.getpid(), "node": self._node}

    def process(self, task: ShardTask) -> Iterator[TaskStarted | ShardResult]:
        """A streaming generator (the pool calls it so): first `TaskStarted`, so the driver knows
        this task began here, then the shard's result."""
        yield TaskStarted(pid=os.getpid(), node=self._node)
        yield self._processor.process(task)


__all__ = ["ShardProcessor", "JobActor", "DriverGoneError", "ReconciliationError", "prepare_in_threads"]
