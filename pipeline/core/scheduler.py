"""Pure policy: which shard runs next, what a failure means, when the job stops.

Takes the time as an argument and never touches Ray, storage or the clock, so it is unit tested on
its own; the runner owns every side effect.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

from pipeline.config import RetryConfig


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: turn input shard `url` into output shard `name`; `attempt` counts from 1."""

    name: str
    url: str
    attempt: int = 1


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
    """Which shard runs next and what a failure means. Times are passed in, so it is deterministic."""

    shards: Mapping[str, str]
    retry: RetryConfig
    max_error_rate: float = 1.0
    min_samples_for_error_rate: int = 0
    # Samples of the shards committed before this run: the error budget is the whole job's.
    committed_read: int = 0
    committed_errored: int = 0
    _queue: list[ShardTask] = field(default_factory=list)
    _not_before: dict[str, float] = field(default_factory=dict)
    running: dict[str, ShardTask] = field(default_factory=dict)
    done: dict[str, ShardResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    unstarted: Counter[str] = field(default_factory=Counter)  # tasks lost before they began, per shard
    attempts_failed: int = 0  # tries charged to a shard and failed

    def __post_init__(self) -> None:
        self._queue = [ShardTask(name, url) for name, url in self.shards.items()]

    def next_task(self, now: float) -> ShardTask | None:
        """The first queued shard whose backoff has passed, marked running; None if none is ready."""
        for i, task in enumerate(self._queue):
            if self._not_before.get(task.name, 0.0) <= now:
                del self._queue[i]
                self.running[task.name] = task
                return task
        return None

    def next_ready_at(self) -> float | None:
        """When the earliest queued shard becomes ready (None if the queue is empty)."""
        return min((self._not_before.get(t.name, 0.0) for t in self._queue), default=None)

    def requeue(self, name: str) -> None:
        """Put a running shard back at the front of the queue without charging it an attempt."""
        self._queue.insert(0, self.running.pop(name))

    def lost_unstarted(self, name: str) -> bool:
        """A running shard's task was lost before its actor began it (the actor was dead or
        restarting): requeued at the back without charging an attempt, up to `retry.max_unstarted`
        times per shard. At the back, so that the losses of a run whose actors keep dying spread over
        the shards instead of piling on the one at the front. Returns False past the limit; the
        caller then charges it (`failed_attempt`)."""
        self.unstarted[name] += 1
        if self.unstarted[name] > self.retry.max_unstarted:
            return False
        self._queue.append(self.running.pop(name))
        return True

    def succeeded(self, result: ShardResult) -> None:
        self.running.pop(result.name)
        self.done[result.name] = result

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
        self._queue.append(dataclasses.replace(task, attempt=task.attempt + 1))
        self._not_before[name] = at
        return at

    @property
    def finished(self) -> bool:
        return not self._queue and not self.running

    @property
    def remaining(self) -> int:
        """Shards queued or running: the most actors that could have work."""
        return len(self._queue) + len(self.running)

    def totals(self) -> tuple[int, int, int]:
        """(read, written, errored) over the shards done in this run."""
        r = self.done.values()
        return (sum(x.samples_read for x in r), sum(x.samples_written for x in r),
                sum(x.samples_errored for x in r))

    def counters(self) -> dict[str, int]:
        """The job kind's counters summed over the shards done in this run."""
        total: Counter[str] = Counter()
        for result in self.done.values():
            total.update(result.counters)
        return dict(sorted(total.items()))

    def error_rate_exceeded(self) -> str | None:
        """A message when the job's sample error rate (committed shards of earlier runs included)
        passes the threshold, after enough samples; else None."""
        read, _, errored = self.totals()
        return error_rate_message(read + self.committed_read, errored + self.committed_errored,
                                  self.max_error_rate, self.min_samples_for_error_rate)


__all__ = ["Scheduler", "ShardTask", "ShardResult", "backoff_delay", "error_rate_message", "pending_shards"]
