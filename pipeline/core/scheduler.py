"""Pure policy: which shard runs next, what a failure means, when the job stops.

Takes the time as an argument and never touches Ray, storage or the clock, so it is unit tested on
its own; the runner owns every side effect.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.config import RetryConfig


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: turn input shard `url` into output shard `name`; `attempt` counts from 1."""

    name: str
    url: str
    attempt: int = 1
    # The input's version in the listing the driver planned from (size, ETag or mtime, as sorted
    # items: the task stays hashable); the shard's record keeps it.
    version: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class ShardResult:
    """What a committed shard reports back to the driver. `counters` are the job kind's own
    (float32 fallbacks, members not kept, ...)."""

    name: str
    samples_read: int
    samples_written: int
    samples_errored: int
    bytes: int
    seconds: float
    attempt: int
    counters: Mapping[str, int] = field(default_factory=dict)
    errors_by_stage: Mapping[str, int] = field(default_factory=dict)  # samples recorded as errors, per stage
    record: Mapping[str, Any] = field(default_factory=dict)  # the ledger record it committed (for compaction)


def error_rate_message(read: int, errored: int, max_error_rate: float, min_samples: int) -> str | None:
    """A message when `errored` of `read` samples passes `max_error_rate` (once at least
    `min_samples` were read), else None."""
    if read < max(1, min_samples):
        return None
    rate = errored / read
    if rate > max_error_rate:
        return (f"{errored} of {read} samples failed ({rate:.1%}), above max_error_rate="
                f"{max_error_rate:.1%}; see the errors in the shard records")
    return None


def backoff_delay(attempt: int, retry: RetryConfig) -> float:
    """Seconds to wait before try `attempt + 1` after try `attempt` failed (exponential, capped)."""
    return min(retry.backoff_max_s, retry.backoff_s * 2 ** (attempt - 1))


def pending_shards(names_to_urls: Mapping[str, str], committed: set[str]) -> dict[str, str]:
    """The shards still to do: every input shard whose output is not committed."""
    return {n: u for n, u in names_to_urls.items() if n not in committed}


@dataclass
class Scheduler:
    """Which shard runs next and what a failure means. Times are passed in, so it is deterministic.

    Every operation costs O(1) (O(log n) for a shard backing off), however many shards the job
    has: a deque of shards ready to run, a heap of those backing off, and running sums of what
    finished. At 100,000 shards the driver must not pay per shard for the ones already done.
    """

    shards: Mapping[str, str]
    retry: RetryConfig
    max_error_rate: float = 1.0
    min_samples_for_error_rate: int = 0
    # Samples of the shards committed before this run: the error budget is the whole job's.
    committed_read: int = 0
    committed_errored: int = 0
    _ready: deque[ShardTask] = field(default_factory=deque)
    _waiting: list[tuple[float, int, ShardTask]] = field(default_factory=list)  # heap: (not before, order, task)
    _order: int = 0
    running: dict[str, ShardTask] = field(default_factory=dict)
    done: dict[str, ShardResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    unstarted: Counter[str] = field(default_factory=Counter)  # tasks lost before they began, per shard
    attempts_failed: int = 0  # tries charged to a shard and failed
    _read: int = 0
    _written: int = 0
    _errored: int = 0
    _counters: Counter[str] = field(default_factory=Counter)
    versions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # input versions, by shard

    def __post_init__(self) -> None:
        self._ready = deque(ShardTask(name, url, version=tuple(sorted(self.versions.get(name, {}).items())))
                            for name, url in self.shards.items())

    def _release(self, now: float) -> None:
        """Shards whose backoff has passed join the back of the ready queue, in the order they failed."""
        while self._waiting and self._waiting[0][0] <= now:
            self._ready.append(heapq.heappop(self._waiting)[2])

    def next_task(self, now: float) -> ShardTask | None:
        """The next ready shard (backoff passed), marked running; None if none is ready."""
        self._release(now)
        if not self._ready:
            return None
        task = self._ready.popleft()
        self.running[task.name] = task
        return task

    def next_ready_at(self) -> float | None:
        """When the earliest queued shard becomes ready (0.0 when one is ready now; None if none is queued)."""
        if self._ready:
            return 0.0
        return self._waiting[0][0] if self._waiting else None

    def requeue(self, name: str) -> None:
        """Put a running shard back at the front of the queue without charging it an attempt."""
        self._ready.appendleft(self.running.pop(name))

    def lost_unstarted(self, name: str) -> bool:
        """A running shard's task was lost before its actor began it (the actor was dead or
        restarting): requeued at the back without charging an attempt, up to `retry.max_unstarted`
        times per shard. At the back, so that the losses of a run whose actors keep dying spread over
        the shards instead of piling on the one at the front. Returns False past the limit; the
        caller then charges it (`failed_attempt`)."""
        self.unstarted[name] += 1
        if self.unstarted[name] > self.retry.max_unstarted:
            return False
        self._ready.append(self.running.pop(name))
        return True

    def succeeded(self, result: ShardResult) -> None:
        self.running.pop(result.name)
        self.done[result.name] = result
        self._read += result.samples_read
        self._written += result.samples_written
        self._errored += result.samples_errored
        self._counters.update(result.counters)

    def failed_attempt(self, name: str, reason: str, now: float, *, permanent: bool = False) -> float | None:
        """Record a failed try; returns the time of the retry, or None when the shard is given up
        (out of attempts, or `permanent`: a failure no retry can fix)."""
        task = self.running.pop(name)
        self.attempts_failed += 1
        if permanent or task.attempt >= self.retry.max_attempts:
            why = "cannot succeed" if permanent else f"failed {task.attempt} time(s)"
            self.failed[name] = f"{why}; last error: {reason}"
            return None
        at = now + backoff_delay(task.attempt, self.retry)
        self._order += 1
        heapq.heappush(self._waiting, (at, self._order, dataclasses.replace(task, attempt=task.attempt + 1)))
        return at

    @property
    def finished(self) -> bool:
        return not self._ready and not self._waiting and not self.running

    @property
    def remaining(self) -> int:
        """Shards queued or running: the most actors that could have work."""
        return len(self._ready) + len(self._waiting) + len(self.running)

    def totals(self) -> tuple[int, int, int]:
        """(read, written, errored) over the shards done in this run."""
        return self._read, self._written, self._errored

    def counters(self) -> dict[str, int]:
        """The job kind's counters summed over the shards done in this run."""
        return dict(sorted(self._counters.items()))

    def error_rate_exceeded(self) -> str | None:
        """A message when the job's sample error rate (committed shards of earlier runs included)
        passes the threshold, after enough samples; else None."""
        read, _, errored = self.totals()
        return error_rate_message(read + self.committed_read, errored + self.committed_errored,
                                  self.max_error_rate, self.min_samples_for_error_rate)


__all__ = ["Scheduler", "ShardTask", "ShardResult", "backoff_delay", "error_rate_message", "pending_shards"]
