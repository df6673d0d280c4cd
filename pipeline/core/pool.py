"""The actor pool: pool bookkeeping and Ray side effects, no retry policy (that is the Scheduler's).

- Start-up with a timeout: the job starts once one actor is ready; actors still starting join as
  they become ready. None ready in time is an error that names what the actors asked for.
- An actor whose constructor fails (weights unreadable, out of memory) is replaced, up to a budget;
  when every try failed, start-up fails with the constructor's own error.
- Tasks go to the least-loaded ready actor, `slots` at a time per actor. Each task is a Ray
  streaming generator whose first item is `TaskStarted`: the driver knows which tasks an actor
  really began, so a task lost to an actor that was dead or restarting is not an attempt.
- An actor that dies (SIGKILL, OOM, node loss) is restarted by Ray; the pool stops sending it
  work until it answers `describe()` again (its model reloaded), then it rejoins.
- The runner grows the pool (`grow`) onto nodes that join, and stops actors whose node left
  when the cluster has no room to restart them (`shrink_unplaced`); how many is placement's call.
- A task past its timeout (counted from its start) has its actor killed (Ray restarts it); the
  actor's other tasks are marked collateral, so the runner requeues them without charging an attempt.
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


# How often an actor that died is asked whether Ray has restarted it.
PROBE_INTERVAL_S = 0.5


@dataclass(frozen=True)
class TaskStarted:
    """The first item a task yields: the actor began it (its process and node, for the log)."""

    pid: int
    node: str = ""


@dataclass
class _Actor:
    handle: Any
    number: int
    waiting_since: float  # spawned, or died and not yet back
    ready: bool = False
    load: int = 0
    killed_at: float = -1.0
    describe_ref: Any = None
    probe_at: float = 0.0


@dataclass
class _Flight:
    task: ShardTask
    actor: _Actor
    submitted: float
    started_at: float | None = None


@dataclass
class Outcome:
    """One finished task: its result, or its error. `started`: the actor began it (else it was lost
    to an actor that was dead or restarting); `collateral`: it died because another task's timeout
    killed its actor."""

    task: ShardTask
    result: ShardResult | None = None
    error: BaseException | None = None
    collateral: bool = False
    started: bool = True


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
    restarts: int = 0  # actor deaths seen (each one restarted by Ray)
    _inflight: dict[Any, _Flight] = field(default_factory=dict)
    _collateral: set[Any] = field(default_factory=set)
    _start_failures: int = 0
    _made: int = 0

    # --- start-up -------------------------------------------------------------------------------

    def _spawn(self) -> None:
        handle = self.make()
        self._made += 1
        actor = _Actor(handle, self._made, time.monotonic())
        actor.describe_ref = handle.describe.remote()
        self.actors.append(actor)

    def _went_down(self, actor: _Actor, now: float) -> None:
        """An actor died: no work goes to it until it answers `describe()` again."""
        if actor.ready:
            actor.ready = False
            actor.waiting_since = now
            actor.probe_at = now + PROBE_INTERVAL_S
            self.restarts += 1
            log.warning("actor %d died; waiting for Ray to restart it", actor.number)

    def start(self) -> list[dict[str, Any]]:
        """Start `size` actors and wait until at least one is ready; returns the ready ones' `describe()`."""
        for _ in range(self.size):
            self._spawn()
        while not any(a.ready for a in self.actors):
            self.poll_starting(timeout=min(1.0, self.startup_timeout_s))  # raises past the start-up timeout
        return self.infos

    def poll_starting(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Check actors starting (or restarting); returns the `describe()` of those that became ready."""
        import ray
        from ray.exceptions import RayActorError, RayError

        now = time.monotonic()
        for actor in self.actors:
            if not actor.ready and actor.describe_ref is None and actor.probe_at <= now:
                actor.describe_ref = actor.handle.describe.remote()
        waiting = [a for a in self.actors if not a.ready]
        if not waiting:
            return []
        if not any(a.ready for a in self.actors) and \
                min(a.waiting_since for a in waiting) + self.startup_timeout_s < now:
            # Replacements and restarts too: a job whose every actor is gone and cannot be placed again must stop.
            raise PoolStartError(f"no actor was ready within {self.startup_timeout_s:.0f} s; the cluster may lack "
                                 "the resources they ask for (a GPU each where GPUs are used)")
        for actor in waiting:
            if actor.waiting_since + self.startup_timeout_s < now and actor in self.actors:
                self._start_failed(actor, f"actor {actor.number} was not ready within {self.startup_timeout_s:.0f} s")
        pending = {a.describe_ref: a for a in self.actors if not a.ready and a.describe_ref is not None}
        if not pending:
            if timeout:
                time.sleep(min(timeout, PROBE_INTERVAL_S))
            return []
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        fresh = []
        for ref in done:
            actor = pending[ref]
            actor.describe_ref = None
            try:
                info = ray.get(ref)
            except RayError as e:
                if isinstance(e, RayActorError) and not e.actor_init_failed:
                    actor.probe_at = time.monotonic() + PROBE_INTERVAL_S  # restarting: ask again shortly
                    continue
                self._start_failed(actor, error_message(e))  # the constructor failed: weights unreadable, OOM
                continue
            actor.ready = True
            self.infos.append(info)
            fresh.append(info)
        return fresh

    def grow(self, count: int) -> None:
        """Start `count` more actors (nodes joined); they take work once they answer `describe()`."""
        for _ in range(count):
            self._spawn()
        self.size += count

    def shrink_unplaced(self, count: int) -> int:
        """Stop up to `count` actors that are not ready and hold no task (their node left, and the
        cluster has no room to restart them): newest first, not counted as start failures.
        Returns how many were stopped."""
        import ray

        idle = [a for a in reversed(self.actors) if not a.ready and a.load == 0][:max(0, count)]
        if len(idle) == len(self.actors):
            idle = idle[:-1]  # keep one, waiting: the job goes on when a node comes back
        for actor in idle:
            self.actors.remove(actor)
            ray.kill(actor.handle, no_restart=True)
            log.info("actor %d stopped: the cluster no longer has room for it", actor.number)
        self.size -= len(idle)
        return len(idle)

    def _start_failed(self, actor: _Actor, message: str) -> None:
        import ray

        self._start_failures += 1
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
        """Send `task` to the least-loaded ready actor (the caller checks `free_slots()` first).
        `method` is a generator method that yields `TaskStarted` and then the result."""
        actor = min((a for a in self.actors if a.ready and a.load < self.slots), key=lambda a: a.load)
        gen = getattr(actor.handle, method).options(num_returns="streaming").remote(task)
        actor.load += 1
        self._inflight[gen] = _Flight(task, actor, now)

    def wait(self, timeout: float) -> list[Outcome]:
        """Tasks that finished within `timeout` seconds (noting, on the way, those that started)."""
        import ray

        if not self._inflight:
            return []
        ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
        outcomes = []
        for gen in ready:
            outcome = self._next_item(gen)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _next_item(self, gen: Any) -> Outcome | None:
        import ray
        from ray.exceptions import RayActorError, RayError

        flight = self._inflight[gen]
        try:
            item = ray.get(next(gen))
        except StopIteration:
            item = None
        except RayError as e:  # task error, actor/worker/node death, lost objects
            self._land(gen)
            actor = flight.actor
            if isinstance(e, RayActorError):
                if e.actor_init_failed and actor in self.actors:
                    # Ray restarted the actor and its constructor failed: it is dead for good.
                    actor.ready = False
                    self._start_failed(actor, error_message(e))
                elif actor in self.actors:
                    self._went_down(actor, time.monotonic())
            return Outcome(flight.task, error=e, collateral=gen in self._collateral,
                           started=flight.started_at is not None)
        if isinstance(item, TaskStarted):
            flight.started_at = time.monotonic()
            return None
        self._land(gen)
        if not isinstance(item, ShardResult):
            return Outcome(flight.task, error=RuntimeError(f"task {flight.task.name} ended without a result "
                                                           f"(got {type(item).__name__})"))
        return Outcome(flight.task, result=item)

    def _land(self, gen: Any) -> None:
        flight = self._inflight.pop(gen)
        flight.actor.load -= 1
        self._collateral.discard(gen)

    def kill_timed_out(self, now: float, timeout_s: float) -> list[ShardTask]:
        """Kill the actor of every task running longer than `timeout_s` since it started (Ray
        restarts it); a task that has not started counts from when it was sent."""
        import ray

        timed_out = []
        for gen, flight in list(self._inflight.items()):
            actor = flight.actor
            began = flight.started_at if flight.started_at is not None else flight.submitted
            if now - began > timeout_s and flight.submitted > actor.killed_at:
                timed_out.append(flight.task)
                actor.killed_at = now
                self._collateral.update(g for g, f in self._inflight.items() if f.actor is actor and g is not gen)
                ray.kill(actor.handle, no_restart=False)
                self._went_down(actor, now)
        return timed_out

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor.handle, no_restart=True)
        self.actors.clear()
        self._inflight.clear()


__all__ = ["ActorPool", "Outcome", "PoolStartError", "TaskStarted", "error_message"]
