"""The driver: plan the job, run shards on actors, retry with backoff, resume, report progress.

Policy is pure and lives in `Scheduler` (which shard next, when to retry, when to give up, when the
error rate stops the job); it takes the time as an argument and never touches Ray, so it is unit
tested on its own. `run_encode` owns the side effects: listing inputs, the ledger, Ray actors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import __version__
from .config import EncodeConfig, RetryConfig
from .ledger import Ledger, build_manifest
from .shards import check_unique_names, expand_inputs
from .worker import EncodeActor, ShardResult, ShardTask

log = logging.getLogger(__name__)

# Forwarded to actors so that workers reach the same object store as the driver.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "HF_HUB_OFFLINE",
                 "HF_HOME", "HF_HUB_CACHE")


# Shards in flight per actor: the next shard's reading and decoding overlap this one's encoding.
SHARDS_PER_ACTOR = 2


class JobError(RuntimeError):
    """The job stopped: shards failed for good, or too many samples failed."""


# --- pure policy ---------------------------------------------------------------------------------


def backoff_delay(attempt: int, retry: RetryConfig) -> float:
    """Seconds to wait before try `attempt + 1` after try `attempt` failed (exponential, capped)."""
    return min(retry.backoff_max_s, retry.backoff_s * 2 ** (attempt - 1))


@dataclass
class Scheduler:
    """Which shard runs next and what a failure means. Times are passed in, so it is deterministic."""

    shards: dict[str, str]
    retry: RetryConfig
    max_error_rate: float = 1.0
    min_samples_for_error_rate: int = 0
    _queue: list[ShardTask] = field(default_factory=list)
    _not_before: dict[str, float] = field(default_factory=dict)
    running: dict[str, ShardTask] = field(default_factory=dict)
    done: dict[str, ShardResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

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

    def succeeded(self, result: ShardResult) -> None:
        self.running.pop(result.name)
        self.done[result.name] = result

    def failed_attempt(self, name: str, reason: str, now: float) -> float | None:
        """Record a failed try; returns the time of the retry, or None when the shard is given up."""
        task = self.running.pop(name)
        if task.attempt >= self.retry.max_attempts:
            self.failed[name] = f"failed {task.attempt} time(s); last error: {reason}"
            return None
        at = now + backoff_delay(task.attempt, self.retry)
        self._queue.append(dataclasses.replace(task, attempt=task.attempt + 1))
        self._not_before[name] = at
        return at

    @property
    def finished(self) -> bool:
        return not self._queue and not self.running

    def totals(self) -> tuple[int, int, int]:
        """(read, written, errored) over the shards done in this run."""
        r = self.done.values()
        return (sum(x.samples_read for x in r), sum(x.samples_written for x in r),
                sum(x.samples_errored for x in r))

    def error_rate_exceeded(self) -> str | None:
        """A message when the sample error rate passes the threshold (after enough samples), else None."""
        read, _, errored = self.totals()
        if read < max(1, self.min_samples_for_error_rate):
            return None
        rate = errored / read
        if rate > self.max_error_rate:
            return (f"{errored} of {read} samples failed ({rate:.1%}), above max_error_rate="
                    f"{self.max_error_rate:.1%}; see the errors in the shard records under _records/")
        return None


def plan(names_to_urls: dict[str, str], committed: set[str]) -> dict[str, str]:
    """The shards still to do: every input shard whose output is not committed."""
    return {n: u for n, u in names_to_urls.items() if n not in committed}


# --- side effects --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSummary:
    output: str
    total_shards: int
    skipped_shards: int
    processed_shards: int
    samples_read: int
    samples_written: int
    samples_errored: int
    fp32_fallbacks: int
    seconds: float
    encode_seconds: float
    random_weights: bool

    @property
    def images_per_second(self) -> float:
        """Over the whole run, start-up (listing, actors loading the VAE) included."""
        return self.samples_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """From the moment every actor had its VAE loaded to the end: what a long job sees."""
        return self.samples_read / self.encode_seconds if self.encode_seconds > 0 else 0.0


def _actor_count(cfg: EncodeConfig) -> tuple[int, dict[str, float]]:
    """How many actors, and what each asks Ray for: one GPU each where there are GPUs, else a
    share of the CPUs (fractional, so asking for more actors than cores never waits forever)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if cfg.vae.device != "cpu" and gpus > 0:
        n = cfg.actors or gpus
        if n > gpus:
            log.warning("%d actors asked for but the cluster has %d GPU(s); using %d", n, gpus, gpus)
            n = gpus
        return n, {"num_gpus": 1, "num_cpus": 1}
    cpus = float(resources.get("CPU", 1))
    n = cfg.actors or 1
    return n, {"num_cpus": max(0.01, cpus / n) if n > cpus else float(int(cpus // n))}


def _ensure_ray(address: str | None) -> bool:
    """Connect to Ray (or start a local one); returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    return True


class _Progress:
    """A tqdm bar over shards with samples, images/s and errors in the postfix."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="shard", disable=not enabled, dynamic_ncols=True)
        self.start = time.monotonic()

    def update(self, scheduler: Scheduler) -> None:
        read, written, errored = scheduler.totals()
        elapsed = max(1e-9, time.monotonic() - self.start)
        self.bar.set_postfix(samples=written, errors=errored, img_s=f"{read / elapsed:.1f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_encode(cfg: EncodeConfig, *, ray_address: str | None = None, progress: bool = True,
               on_result: Callable[[ShardResult], None] | None = None) -> JobSummary:
    """Run (or resume) the encode job `cfg` on Ray; returns the summary or raises JobError."""
    import ray
    from ray.exceptions import RayError

    t0 = time.monotonic()
    urls = expand_inputs(cfg.input, cfg.storage_options)
    shards = check_unique_names(urls)
    started_ray = _ensure_ray(ray_address)
    actors: list[Any] = []
    try:
        n_actors, resources = _actor_count(cfg)
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        remote = ray.remote(EncodeActor).options(
            max_concurrency=SHARDS_PER_ACTOR,
            max_restarts=-1, max_task_retries=0,  # retries are the driver's decision, not Ray's
            runtime_env={"env_vars": env} if env else None, **resources)
        actors = [remote.remote(cfg) for _ in range(min(n_actors, len(shards)))]
        try:
            infos = ray.get([a.describe.remote() for a in actors])
        except RayError as e:  # the actor's constructor failed: weights missing, unreadable, mismatched
            raise JobError(f"the encode actors could not load the VAE {cfg.vae.source!r}: "
                           f"{str(e).strip().splitlines()[-1][:1000]}") from e
        identity = infos[0]["identity"]
        if any(i["identity"] != identity for i in infos):
            raise JobError("actors loaded different VAEs (fingerprints differ); check the weights source")
        if infos[0]["random_weights"]:
            log.warning("encoding with RANDOM WEIGHTS (%s): these latents are for tests and demos only",
                        cfg.vae.source)
        log.info("%d actor(s): %s", len(actors), infos[0]["codec"])

        ledger = Ledger(cfg.output, cfg.storage_options)
        ledger.open_job(build_manifest(identity=identity, shards=shards, code_version=__version__,
                                       total_shards=len(shards)), overwrite=cfg.overwrite)
        committed = {r.name for r in ledger.job_records()}
        todo = plan(shards, committed)
        ledger.discard_all(todo)  # a stale record must never vouch for data being rewritten
        log.info("%d shard(s): %d committed already, %d to do", len(shards), len(committed), len(todo))

        t_ready = time.monotonic()
        sched = Scheduler(todo, cfg.retry, cfg.max_error_rate, cfg.min_samples_for_error_rate)
        bar = _Progress(len(shards), len(committed), progress)
        inflight: dict[Any, tuple[str, Any, float]] = {}  # ref -> (shard name, actor, submitted at)
        killed_at: dict[int, float] = {}  # actor -> when it was last killed for a timeout
        collateral: set[Any] = set()  # refs that died only because their actor was killed
        try:
            while not sched.finished:
                now = time.monotonic()
                for actor in actors:
                    busy = sum(1 for _, a, _ in inflight.values() if a is actor)
                    for _ in range(SHARDS_PER_ACTOR - busy):
                        task = sched.next_task(now)
                        if task is None:
                            break
                        inflight[actor.process.remote(task)] = (task.name, actor, now)
                if not inflight:
                    ready_at = sched.next_ready_at()
                    time.sleep(max(0.0, min(1.0, (ready_at or now) - now)))
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                now = time.monotonic()
                for ref in ready:
                    name, _, _ = inflight.pop(ref)
                    try:
                        result: ShardResult = ray.get(ref)
                    except RayError as e:  # task error, actor/worker/node death, lost objects
                        if ref in collateral:
                            collateral.discard(ref)
                            sched.requeue(name)  # not its fault: another shard's timeout killed the actor
                            continue
                        at = sched.failed_attempt(name, f"{type(e).__name__}: {e}".splitlines()[0][:500], now)
                        log.warning("shard %s failed (%s); %s", name, str(e).splitlines()[0][:200],
                                    "retrying" if at is not None else "giving up")
                        continue
                    collateral.discard(ref)
                    sched.succeeded(result)
                    bar.update(sched)
                    if on_result is not None:
                        on_result(result)
                for ref, (name, actor, submitted) in list(inflight.items()):
                    if now - submitted > cfg.retry.shard_timeout_s and submitted > killed_at.get(id(actor), -1.0):
                        # A hung read or kernel: kill the actor (Ray restarts it) and retry the shard.
                        log.warning("shard %s timed out after %.0f s; restarting its actor", name, now - submitted)
                        killed_at[id(actor)] = now
                        collateral.update(r for r, (_, a, _) in inflight.items() if a is actor and r is not ref)
                        ray.kill(actor, no_restart=False)
                message = sched.error_rate_exceeded()
                if message:
                    raise JobError(f"stopping the job: {message}")
        finally:
            bar.close()

        if sched.failed:
            details = "; ".join(f"{n}: {r}" for n, r in sorted(sched.failed.items())[:10])
            ledger.write_errors_table()
            raise JobError(f"{len(sched.failed)} shard(s) failed after retries: {details}. "
                           "Run the same command again to retry them; committed shards are kept.")
        ledger.write_errors_table()
        read, written, errored = sched.totals()
        summary = JobSummary(
            output=ledger.url, total_shards=len(shards), skipped_shards=len(committed),
            processed_shards=len(sched.done), samples_read=read, samples_written=written,
            samples_errored=errored, fp32_fallbacks=sum(r.fp32_fallbacks for r in sched.done.values()),
            seconds=time.monotonic() - t0, encode_seconds=time.monotonic() - t_ready,
            random_weights=bool(infos[0]["random_weights"]))
        ledger.write_success({"this_run": dataclasses.asdict(summary)})
        return summary
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started_ray:
            ray.shutdown()
