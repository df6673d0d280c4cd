"""The actor pool: pool bookkeeping and Ray side effects, no retry policy (that is the Scheduler's).

- Start-up with a timeout: the job starts once one actor is ready; actors still starting join as
  they become ready. None ready in time is an error that names what the actors asked for.
- An actor whose constructor fails (weights unreadable, out of memory) is replaced, up to a budget;
  when every try failed, start-up fails with the constructor's own error.
- Tasks go to the least-loaded ready actor, `slots` at a time per actor.
- A task past its timeout has its actor killed (Ray restarts it); the actor's other tasks are
  marked collateral, so the runner requeues them without charging an attempt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.core.scheduler import ShardResult, ShardTask

log = logging.getLogger(__name__)


class PoolStartError(RuntimeError):
    """No actor could be started: the message carries the constructor's error or the timeout."""


def error_message(e: BaseException) -> str:
    """The underlying error of a Ray failure as one line: `ShardReadError: cannot read ...`, not
    Ray's header (`RayTaskError(ShardReadError): ray::JobActor.process() (pid=...)`)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        return " ".join(f"{type(cause).__name__}: {cause}".split())[:1000]
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    # A failed constructor comes as a traceback whose last line is the error itself.
    line = lines[-1] if getattr(e, "actor_init_failed", False) else lines[0]
    return f"{type(e).__name__}: {line}"[:1000]


@dataclass
class _Actor:
    handle: Any
    number: int
    spawned_at: float
    ready: bool = False
    load: int = 0
    killed_at: float = -1.0
    describe_ref: Any = None


@dataclass
class Outcome:
    """One finished task: its result, or its error (collateral: it died because another task's
    timeout killed its actor)."""

    task: ShardTask
    result: ShardResult | None = None
    error: BaseException | None = None
    collateral: bool = False


@dataclass
class ActorPool:
    """Actors made by `make()` (a Ray actor handle each), `slots` tasks in flight per actor."""

    make: Callable[[], Any]
    size: int
    slots: int = 2
    startup_timeout_s: float = 600.0
    max_start_failures: int = 3
    actors: list[_Actor] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    _inflight: dict[Any, tuple[ShardTask, _Actor, float]] = field(default_factory=dict)
    _collateral: set[Any] = field(default_factory=set)
    _start_failures: int = 0
    _last_start_error: str = ""
    _made: int = 0

    # --- start-up -------------------------------------------------------------------------------

    def _spawn(self) -> None:
        handle = self.make()
        self._made += 1
        actor = _Actor(handle, self._made, time.monotonic())
        actor.describe_ref = handle.describe.remote()
        self.actors.append(actor)

    def start(self) -> list[dict[str, Any]]:
        """Start `size` actors and wait until at least one is ready; returns the ready ones' `describe()`."""
        for _ in range(self.size):
            self._spawn()
        while not any(a.ready for a in self.actors):
            self.poll_starting(timeout=min(1.0, self.startup_timeout_s))  # raises past the start-up timeout
        return self.infos

    def poll_starting(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Check actors still starting; returns the `describe()` of those that became ready."""
        import ray
        from ray.exceptions import RayError

        pending = {a.describe_ref: a for a in self.actors if not a.ready and a.describe_ref is not None}
        if not pending:
            return []
        if not any(a.ready for a in self.actors) and \
                min(a.spawned_at for a in pending.values()) + self.startup_timeout_s < time.monotonic():
            # Replacements too: a job whose every actor is gone and cannot be placed again must stop.
            raise PoolStartError(f"no actor was ready within {self.startup_timeout_s:.0f} s; the cluster may lack "
                                 "the resources they ask for (a GPU each where GPUs are used)")
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        fresh = []
        for ref in done:
            actor = pending[ref]
            actor.describe_ref = None
            try:
                info = ray.get(ref)
            except RayError as e:  # the constructor failed: weights missing or unreadable, OOM
                self._start_failed(actor, error_message(e))
                continue
            actor.ready = True
            self.infos.append(info)
            fresh.append(info)
        return fresh

    def _start_failed(self, actor: _Actor, message: str) -> None:
        import ray

        self._start_failures += 1
        self._last_start_error = message
        self.actors.remove(actor)
        ray.kill(actor.handle, no_restart=True)
        log.warning("actor %d failed to start (%d of %d allowed): %s", actor.number, self._start_failures,
                    self.max_start_failures, message)
        if self._start_failures >= self.max_start_failures and not any(a.ready for a in self.actors):
            raise PoolStartError(message)
        if self._start_failures < self.max_start_failures:
            self._spawn()

    # --- tasks ----------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    def free_slots(self) -> int:
        return sum(self.slots - a.load for a in self.actors if a.ready)

    def submit(self, task: ShardTask, method: str, now: float) -> None:
        """Send `task` to the least-loaded ready actor (the caller checks `free_slots()` first)."""
        actor = min((a for a in self.actors if a.ready and a.load < self.slots), key=lambda a: a.load)
        ref = getattr(actor.handle, method).remote(task)
        actor.load += 1
        self._inflight[ref] = (task, actor, now)

    def wait(self, timeout: float) -> list[Outcome]:
        """Tasks that finished within `timeout` seconds."""
        import ray
        from ray.exceptions import RayActorError, RayError

        if not self._inflight:
            return []
        ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=timeout)
        outcomes = []
        for ref in ready:
            task, actor, _ = self._inflight.pop(ref)
            actor.load -= 1
            collateral = ref in self._collateral
            self._collateral.discard(ref)
            try:
                outcomes.append(Outcome(task, result=ray.get(ref)))
            except RayError as e:  # task error, actor/worker/node death, lost objects
                outcomes.append(Outcome(task, error=e, collateral=collateral))
                if isinstance(e, RayActorError) and e.actor_init_failed and actor in self.actors:
                    # Ray restarted the actor and its constructor failed: it is dead for good.
                    actor.ready = False
                    self._start_failed(actor, error_message(e))
        return outcomes

    def kill_timed_out(self, now: float, timeout_s: float) -> list[ShardTask]:
        """Kill the actor of every task running longer than `timeout_s` (Ray restarts it)."""
        import ray

        timed_out = []
        for ref, (task, actor, submitted) in list(self._inflight.items()):
            if now - submitted > timeout_s and submitted > actor.killed_at:
                timed_out.append(task)
                actor.killed_at = now
                self._collateral.update(r for r, (_, a, _) in self._inflight.items() if a is actor and r is not ref)
                ray.kill(actor.handle, no_restart=False)
        return timed_out

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor.handle, no_restart=True)
        self.actors.clear()
        self._inflight.clear()


__all__ = ["ActorPool", "Outcome", "PoolStartError", "error_message"]
