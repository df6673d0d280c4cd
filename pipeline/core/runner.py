"""The runner: plan the job, open its output, start the actor pool, run shards with retries,
resume, report progress, and finish the output. One runner for every job kind.

Order matters: the output is opened (identity check, what is committed) before any actor loads a
model, so an incompatible output or a finished job is known at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from pipeline import __version__
from pipeline.config import RunConfig
from pipeline.core.kind import JobKind, JobPlan, PermanentShardError, PlanContext
from pipeline.core.pool import ActorPool, PoolStartError, error_message
from pipeline.core.scheduler import Scheduler, ShardResult, error_rate_message, pending_shards
from pipeline.core.shard import JobActor
from pipeline.core.ledger import COMPACT_EVERY, Ledger, LedgerError, ShardRecord, build_manifest
from pipeline.core.lock import JobLock
from pipeline.core.telemetry import JobMetrics
from pipeline.core.preflight import PreflightError, check_device, check_output_writable, local_nodes
from pipeline.core.placement import (ActorDemand, actor_demand, actors_that_fit, cluster_nodes, infeasible_message,
                                     max_actors, request_nodes, target_actors)
from pipeline.core.storage import ShardWriteError, output_fs
from pipeline.io.shards import version_change

log = logging.getLogger(__name__)

# Forwarded to actors so that workers reach the same object store as the driver. Never secrets:
# runtime_env values are shown by Ray's dashboard and job API to anyone who can read them. Keys
# come from where the nodes already have them (instance roles, Kubernetes secrets, the nodes'
# environment or credentials file); a local Ray started by the driver inherits its environment.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")

# glibc's malloc settings for the actors' processes (glibc reads GLIBC_TUNABLES only when a process
# starts, and Ray sets runtime_env variables before it starts an actor's worker). By default glibc
# unmaps every freed block of 32 MiB or more, and trims the heap top, so each large activation is
# page-faulted in again on every op; a thread other than the main one (the actor's shard threads)
# gets its own arena of at most 64 MiB heaps, which mmaps whatever the threshold, hence arena_max=1.
# Measured on the codec as an actor runs it: 1.09-1.31x (BENCHMARKS.md). The cost: an actor's RSS
# stays at its peak. A GLIBC_TUNABLES in the driver's environment (empty: glibc's defaults) wins.
# A local Ray started by the driver inherits them (with FORWARDED_ENV); only actors on a cluster get
# them through runtime_env, since a runtime_env rules out Ray's prestarted workers (+1.6 s per start).
ACTOR_GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:"
                        "glibc.malloc.arena_max=1")

# Shards in flight per actor: the next shard's reading and decoding overlap this one's model steps.
SHARDS_PER_ACTOR = 2


class JobError(RuntimeError):
    """The job stopped: shards failed for good, too many samples failed, or no actor could start."""


class ErrorRateExceeded(JobError):
    """Too many samples failed; the errors table is written before this is raised."""


@dataclass(frozen=True)
class JobSummary:
    """What one run of a job did. `counters` are the job kind's own, summed over this run's shards."""

    kind: str
    output: str
    total_shards: int
    skipped_shards: int
    processed_shards: int
    samples_read: int
    samples_written: int
    samples_errored: int
    seconds: float
    steady_seconds: float
    random_weights: bool
    counters: Mapping[str, int] = field(default_factory=dict)
    result: Mapping[str, Any] = field(default_factory=dict)  # the job kind's `finish` facts
    attempts_failed: int = 0  # tries charged to a shard that failed (and were retried or given up)
    lost_unstarted: int = 0  # tasks lost to a dead actor before they began (requeued free)
    actor_restarts: int = 0  # actor deaths seen (Ray restarted each)
    inputs_changed: int = 0  # committed shards redone because their input changed since

    @property
    def images_per_second(self) -> float:
        """Over the whole run, start-up (listing, actors loading the model) included."""
        return self.samples_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """From the moment the first actor had its model loaded to the end: what a long job sees."""
        return self.samples_read / self.steady_seconds if self.steady_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "counters": dict(self.counters), "result": dict(self.result)}


class _TokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def _starts_local_ray(address: str | None) -> bool:
    """Whether ray.init(address) starts a Ray of its own rather than joining a cluster."""
    return address is None and not os.environ.get("RAY_ADDRESS")


def _ensure_ray(address: str | None) -> bool:
    """Connect to Ray (or start a local one); returns True when this call started it. A local Ray
    started here has ACTOR_GLIBC_TUNABLES in its environment, so its workers start with them."""
    import ray

    if ray.is_initialized():
        return False
    starts_local = _starts_local_ray(address)
    if address is None:
        # Ray warns on every local start that it turned token authentication on (README explains it once).
        token_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        if not any(isinstance(f, _TokenNotice) for f in token_log.filters):
            token_log.addFilter(_TokenNotice())
    import signal
    import threading

    on_main = threading.current_thread() is threading.main_thread()
    caller_sigterm = signal.getsignal(signal.SIGTERM) if on_main else None
    try:
        # Ray's daemons and workers take the environment of this process as it is at ray.init.
        tunables = starts_local and "GLIBC_TUNABLES" not in os.environ
        if tunables:
            os.environ["GLIBC_TUNABLES"] = ACTOR_GLIBC_TUNABLES
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        finally:
            if tunables:
                del os.environ["GLIBC_TUNABLES"]
        if callable(caller_sigterm):
            # Ray installs its own SIGTERM handler, which exits at once: the caller's (the CLI's clean
            # stop: in-flight shards abandoned, actors and this Ray stopped) must stay in charge.
            signal.signal(signal.SIGTERM, caller_sigterm)
    except ConnectionError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PreflightError(f"--address {address}: no Ray cluster answers there ({first}); start one with "
                             "`ray start --head`, or leave --address (and RAY_ADDRESS) unset for a local Ray") from None
    from pipeline.core.reaper import start_reaper

    # A Ray this driver started must not outlive it (SIGKILL gives no chance to stop it); connected
    # to a cluster, the driver has no Ray processes of its own and the reaper has nothing to do.
    start_reaper()
    return True


class _Compactor:
    """Moves the records this run commits into compacted tables, `every` at a time (see Ledger), so
    that planning a resume reads a few tables instead of one object per shard. A compaction that
    fails loses nothing (the records stay in their files): it is logged, and the job goes on."""

    def __init__(self, ledger: Ledger, every: int) -> None:
        self.ledger, self.every = ledger, every
        self.pending: list[ShardRecord] = []

    def add(self, result: ShardResult) -> None:
        if result.record:
            self.pending.append(ShardRecord.from_dict(dict(result.record), where=f"the result of shard {result.name}"))
        if len(self.pending) >= self.every:
            self._run(f"compacting {len(self.pending)} records", lambda: self.ledger.compact(self.pending))
            self.pending = []

    def finish(self) -> None:
        """At the end of the run: every record into one table, for a job large enough (COMPACT_MIN)."""
        self._run("compacting the job's records", self.ledger.compact_all)
        self.pending = []

    @staticmethod
    def _run(what: str, step: Callable[[], int]) -> None:
        try:
            step()
        except (ShardWriteError, LedgerError, OSError) as e:
            log.warning("%s failed (%s); they stay in their record files", what, error_message(e))


class _Progress:
    """Progress over samples: a tqdm bar on a TTY (`bar`), else one plain log line every
    `every_s` seconds (a cluster job's log, a redirect), with the same figures: samples and
    shards done, errors, img/s over this run, and an ETA."""

    def __init__(self, total_shards: int, done_shards: int, done_samples: int, *, bar: bool, every_s: float) -> None:
        import sys

        from tqdm import tqdm

        self.total_shards = total_shards
        self.done_before = done_shards
        self.samples_before = done_samples
        self.every_s = every_s
        self.start = time.monotonic()
        self.next_line = self.start + every_s
        self.bar = tqdm(total=None, initial=done_samples, unit="img", dynamic_ncols=True,
                        disable=not (bar and sys.stderr.isatty()))
        self.last: tuple[int, int, int, int] = (0, 0, 0, 0)

    def _figures(self, scheduler: Scheduler) -> dict[str, Any]:
        read, written, errored = scheduler.totals()
        shards = len(scheduler.done)
        elapsed = max(1e-9, time.monotonic() - self.start)
        left = self.total_shards - self.done_before - shards
        eta = left * elapsed / shards if shards else None
        per_shard = (read / shards) if shards else None
        total = self.samples_before + read + (per_shard * left if per_shard is not None else 0)
        return {"read": read, "written": written, "errored": errored, "shards": self.done_before + shards,
                "rate": read / elapsed, "eta": eta, "total": int(total) if per_shard is not None else None}

    def update(self, scheduler: Scheduler) -> None:
        """A shard finished."""
        f = self._figures(scheduler)
        if not self.bar.disable:
            self.bar.total = f["total"]
            self.bar.n = self.samples_before + f["read"]
            self.bar.set_postfix(shards=f"{f['shards']}/{self.total_shards}", errors=f["errored"],
                                 eta=_duration(f["eta"]), refresh=False)
            self.bar.refresh()
        self.tick(scheduler)

    def tick(self, scheduler: Scheduler, *, final: bool = False) -> None:
        """A plain line when one is due (non-TTY only)."""
        now = time.monotonic()
        if not self.bar.disable or (now < self.next_line and not final):
            return
        self.next_line = now + self.every_s
        f = self._figures(scheduler)
        log.info("progress: %d/%d shards, %d samples written, %d errored, %.1f img/s, ETA %s", f["shards"],
                 self.total_shards, f["written"], f["errored"], f["rate"], _duration(f["eta"]))

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _manifest(kind: JobKind, job: JobPlan) -> dict[str, Any]:
    extra: dict[str, Any] = {"data_dir": job.data_dir} if job.data_dir else {}
    if job.outputs:
        extra["outputs"] = list(job.outputs)
    return build_manifest(kind=kind.name, identity=job.identity, shards=job.inputs, data_extension=job.data_extension,
                          code_version=__version__, provenance=dict(job.provenance), **extra)


class ChangedInputError(JobError):
    """Input shards changed since their output was committed, and `changed_inputs: error` was asked."""


def changed_inputs(records: Sequence[ShardRecord], versions: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Committed shards whose input the fresh listing gives in another version: name -> how."""
    out = {}
    for r in records:
        how = version_change(r.input_version, versions.get(r.name, {}))
        if how is not None:
            out[r.name] = how
    return out


def _check_changed(cfg: RunConfig, changed: Mapping[str, str]) -> None:
    """Report the inputs that changed since they were cached; raise when the config says so."""
    if not changed:
        return
    named = "; ".join(f"{n} ({how})" for n, how in sorted(changed.items())[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    if cfg.changed_inputs == "error":
        raise ChangedInputError(f"{len(changed)} input shard(s) changed since their output was committed: "
                                f"{named}{more}. A dataset tool may still be writing them; run again with "
                                "--set changed_inputs=redo to redo them")
    log.warning("%d input shard(s) changed since their output was committed; redoing them: %s%s",
                len(changed), named, more)


def _open_output(kind: JobKind, cfg: RunConfig, job: JobPlan
                 ) -> tuple[Ledger, list[ShardRecord], dict[str, str], int]:
    """Open (or resume) the job in its output folder; returns the ledger, committed records, to-do
    shards, and how many committed shards are redone because their input changed."""
    ledger = Ledger(cfg.output, cfg.storage_options)
    ledger.open_job(_manifest(kind, job), overwrite=cfg.overwrite)
    records = ledger.job_records(verify_checksum=cfg.recheck)
    changed = changed_inputs(records, job.input_versions)
    _check_changed(cfg, changed)
    records = [r for r in records if r.name not in changed]
    todo = pending_shards(job.inputs, {r.name for r in records})
    ledger.discard_all(todo)  # a stale record must never vouch for data being rewritten
    log.info("%d shard(s): %d committed already, %d to do", len(job.inputs), len(records), len(todo))
    return ledger, records, todo, len(changed)


def _finished(kind: JobKind, cfg: RunConfig, job: JobPlan, t0: float, random_weights: bool) -> JobSummary | None:
    """The summary of a run with nothing to do, when the output holds this very job finished (and
    within its error budget): such a run writes nothing, not even the manifest."""
    ledger = Ledger(cfg.output, cfg.storage_options)
    done = ledger.finished(_manifest(kind, job), verify_checksum=cfg.recheck)
    if done is None:
        return None
    changed = changed_inputs(done, job.input_versions)
    if changed:
        if cfg.changed_inputs == "error":
            _check_changed(cfg, changed)  # raises, before Ray starts
        return None  # redone by the normal path, which reports them
    if error_rate_message(sum(r.samples_read for r in done), sum(len(r.errors) for r in done),
                          cfg.max_error_rate, cfg.min_samples_for_error_rate) is not None:
        return None  # the normal path reports it, and takes SUCCESS away
    log.info("%s: the job finished already (%d shards); nothing to do", ledger.url, len(done))
    last_run = (ledger.read_success() or {}).get("this_run") or {}
    return JobSummary(kind=kind.name, output=ledger.url, total_shards=len(job.inputs), skipped_shards=len(done),
                      processed_shards=0, samples_read=0, samples_written=0, samples_errored=0,
                      seconds=time.monotonic() - t0, steady_seconds=0.0, random_weights=random_weights,
                      result=dict(last_run.get("result") or {}))


def actor_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables the actors get from the driver's `environ` (never secrets)."""
    env = {k: environ[k] for k in FORWARDED_ENV if k in environ}
    env["GLIBC_TUNABLES"] = environ.get("GLIBC_TUNABLES", ACTOR_GLIBC_TUNABLES)
    return env


def actor_runtime_env(environ: Mapping[str, str], *, inherited_env: bool) -> dict[str, Any] | None:
    """The actors' runtime_env: none when they run in a local Ray this driver started (`inherited_env`),
    which has what actor_env gives already and keeps Ray's prestarted workers usable."""
    return None if inherited_env else {"env_vars": actor_env(environ)}


def _start_pool(kind: JobKind, cfg: RunConfig, job: JobPlan, n_actors: int, demand: ActorDemand,
                guard: Mapping[str, Any], *, inherited_env: bool) -> ActorPool:
    import ray

    remote = ray.remote(JobActor).options(
        max_concurrency=SHARDS_PER_ACTOR,
        max_restarts=-1, max_task_retries=0,  # retries are the scheduler's decision, not Ray's
        runtime_env=actor_runtime_env(os.environ, inherited_env=inherited_env), **demand.ray_options())
    pool = ActorPool(lambda: remote.remote(kind.name, cfg, job, dict(guard)), size=n_actors,
                     slots=SHARDS_PER_ACTOR, startup_timeout_s=cfg.retry.actor_start_timeout_s)
    try:
        pool.start()
    except PoolStartError as e:
        pool.shutdown()
        raise JobError(f"the {kind.name} actors could not start: {e}") from e
    return pool


def _plan_demand(kind: JobKind, cfg: RunConfig, nodes: list[dict[str, float]], *, on_cluster: bool) -> ActorDemand:
    """What each actor asks for, from the config and the nodes as they are now."""
    demand = actor_demand(cfg.resources, requested=cfg.actors, wants_gpu=kind.wants_gpu(cfg),
                          force_gpu=kind.needs_gpu(cfg), nodes=nodes)
    if demand.device == "cpu" and kind.wants_gpu(cfg) and on_cluster:
        log.warning("the cluster has no GPU now, so the %s actors run on CPU in float32; on an autoscaling "
                    "cluster set resources.num_gpus=1 to wait for GPU nodes instead", kind.name)
    return demand


def _wait_for_room(cfg: RunConfig, demand: ActorDemand) -> int:
    """How many actors fit the cluster; waits up to resources.wait_for_nodes_s for the first room
    (an autoscaling cluster launching a node), else raises JobError saying why none fits."""
    deadline = time.monotonic() + cfg.resources.wait_for_nodes_s
    next_note = 0.0
    while True:
        nodes = cluster_nodes()
        fit = actors_that_fit(nodes, demand)
        now = time.monotonic()
        if fit > 0:
            return fit
        if now >= deadline:
            waited = f" after waiting {cfg.resources.wait_for_nodes_s:.0f} s" if cfg.resources.wait_for_nodes_s else ""
            raise JobError(f"{infeasible_message(demand, nodes)}{waited}")
        if now >= next_note:
            log.info("waiting up to %.0f s more for a node with room for one actor (%s)", deadline - now,
                     demand.describe())
            next_note = now + 30.0
        time.sleep(min(2.0, max(0.0, deadline - now)))


def _rescale(pool: ActorPool, cfg: RunConfig, demand: ActorDemand, work: int) -> None:
    """Grow the pool onto nodes that joined (up to the cap and the shards left); stop actors
    that lost their node when the cluster has no room to restart them."""
    fit = actors_that_fit(cluster_nodes(), demand)
    target = target_actors(cfg.resources, cfg.actors, fit, work)
    have = len(pool.actors)
    if target > have:
        log.info("the cluster has room for %d actor(s) now; growing the pool from %d to %d", fit, have, target)
        pool.grow(target - have)
    elif fit < have:
        pool.shrink_unplaced(have - fit)


def _note_ready(info: Mapping[str, Any]) -> None:
    log.info("actor ready on node %s (pid %s)", info.get("node", "?"), info.get("pid", "?"))


def _check_actor(kind: JobKind, job: JobPlan, info: Mapping[str, Any]) -> None:
    """An actor's model must be the one the job was planned with (same fingerprint, same scaling)."""
    if dict(info["identity"]) != dict(job.identity):
        from pipeline.core.ledger import identity_differences

        diffs = identity_differences(job.identity, info["identity"], labels=("plan has", "actor has"))
        raise JobError(f"an actor loaded another model than the {kind.name} job was planned with "
                       f"({'; '.join(diffs) or 'identity differs'}); "
                       "check that the weights did not change while the job started")


def run_job(kind: JobKind | str, cfg: RunConfig, *, ray_address: str | None = None, progress: bool = True,
            progress_every_s: float = 30.0, on_result: Callable[[ShardResult], None] | None = None) -> JobSummary:
    """Run (or resume) a job of `kind` (a JobKind or its name) on Ray; returns the summary or raises JobError.

    Everything that can be checked without Ray is checked before it starts: the inputs list, the
    device exists, the weights resolve and fit the preset, the output is writable. A job whose
    output holds it finished returns at once, without starting Ray. `progress`: a bar on a TTY;
    a plain line every `progress_every_s` otherwise."""
    if isinstance(kind, str):
        from pipeline.jobs import get_kind

        kind = get_kind(kind)
    t0 = time.monotonic()
    inputs = kind.inputs(cfg)  # a typo in an input fails here, before Ray starts
    local = ray_address is None and not _ray_connected()  # this command will start a local Ray
    check_device(kind.requested_device(cfg), local=local)
    started_ray = False if local else _ensure_ray(ray_address)
    try:
        demand = _plan_demand(kind, cfg, local_nodes() if local else cluster_nodes(),
                              on_cluster=ray_address is not None)
        job = kind.plan(cfg, inputs, PlanContext(device=demand.device))  # the weights resolve and fit the preset
        random_weights = bool(job.provenance.get("vae_random_weights", False))
        check_output_writable(cfg.output, cfg.storage_options)  # the folder exists, credentials resolve
        finished = None if cfg.overwrite else _finished(kind, cfg, job, t0, random_weights)
        if finished is not None:
            return finished
        # Before Ray starts: a name this job would write must not be a file someone else wrote.
        Ledger(cfg.output, cfg.storage_options).refuse_foreign_objects(_manifest(kind, job))
        if local:
            started_ray = _ensure_ray(None)
        requested_nodes = False
        try:
            if cfg.resources.autoscale:
                cap = max_actors(cfg.resources, cfg.actors)
                request_nodes(demand, len(job.inputs) if cap is None else min(cap, len(job.inputs)))
                requested_nodes = True
            fit = _wait_for_room(cfg, demand)  # an actor no node can hold is refused before the output is touched
            lock = JobLock(*output_fs(cfg.output, cfg.storage_options), command=kind.name)
            lock.acquire(break_lock=cfg.break_lock)  # before anything is written: one driver per folder
            lock.start_heartbeat()
            try:
                return _run_locked(kind, cfg, job, lock, demand, fit, random_weights, t0, progress,
                                   progress_every_s, on_result,
                                   inherited_env=started_ray and _starts_local_ray(ray_address))
            finally:
                lock.release()
        finally:
            if requested_nodes:
                request_nodes(demand, 0)  # the autoscaler may let the nodes go
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _ray_connected() -> bool:
    """Whether this process is connected to Ray. Ray that was never imported is not: a finished
    job's rerun answers without importing it (0.4 s of a 3 s command)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _run_locked(kind: JobKind, cfg: RunConfig, job: JobPlan, lock: JobLock, demand: ActorDemand, fit: int,
                random_weights: bool, t0: float, progress: bool, progress_every_s: float,
                on_result: Callable[[ShardResult], None] | None, *, inherited_env: bool) -> JobSummary:
    """The job, once this driver holds the output's lock; `fit`: actors the cluster has room for;
    `inherited_env`: the actors run in a local Ray this driver started (see _start_pool)."""
    ledger, committed, todo, changed = _open_output(kind, cfg, job)
    try:
        return _run_opened(kind, cfg, job, lock, demand, fit, random_weights, t0, progress, progress_every_s,
                           on_result, ledger, committed, todo, changed, inherited_env=inherited_env)
    except JobError as e:
        if lock.lost is None:  # a driver that lost the folder must not write to it
            ledger.write_failure(str(e))
        raise


def _run_opened(kind: JobKind, cfg: RunConfig, job: JobPlan, lock: JobLock, demand: ActorDemand, fit: int,
                random_weights: bool, t0: float, progress: bool, progress_every_s: float,
                on_result: Callable[[ShardResult], None] | None, ledger: Ledger, committed: list[ShardRecord],
                todo: dict[str, str], changed: int, *, inherited_env: bool) -> JobSummary:
    pool: ActorPool | None = None
    try:
        if random_weights:
            log.warning("%s job with RANDOM WEIGHTS: its output is for tests and demos only", kind.name)
        sched = Scheduler(todo, cfg.retry, cfg.max_error_rate, cfg.min_samples_for_error_rate,
                          committed_read=sum(r.samples_read for r in committed),
                          committed_errored=sum(len(r.errors) for r in committed), versions=job.input_versions)
        t_ready = time.monotonic()
        restarts = 0
        try:
            if todo:
                n_actors = target_actors(cfg.resources, cfg.actors, fit, len(todo))
                if cfg.actors is not None and n_actors < min(cfg.actors, len(todo)):
                    log.warning("%d actors asked for, but the cluster has room for %d now (%s each); starting "
                                "%d, more as nodes join", cfg.actors, fit, demand.describe(), n_actors)
                pool = _start_pool(kind, cfg, job, n_actors, demand, lock.guard(),
                                   inherited_env=inherited_env)
                for info in pool.infos:
                    _check_actor(kind, job, info)
                    _note_ready(info)
                log.info("%d actor(s) starting; first ready: %s", len(pool.actors), pool.infos[0]["summary"])
                t_ready = time.monotonic()
                bar = _Progress(len(job.inputs), len(committed), sum(r.samples_read for r in committed),
                                bar=progress, every_s=progress_every_s)
                metrics = JobMetrics(kind.name)
                metrics.start(len(job.inputs), len(committed))
                compactor = _Compactor(ledger, COMPACT_EVERY)

                def record(result: ShardResult) -> None:
                    metrics.shard_done(result, len(committed) + len(sched.done))
                    compactor.add(result)

                _run_loop(kind, cfg, job, pool, sched, bar, on_result, lock, demand, record, metrics)
                restarts = pool.restarts
                pool.shutdown()  # no task is in flight now; an actor killed mid-write left its temp file
                pool = None
                ledger.cleanup_tmp()
                compactor.finish()
            message = sched.error_rate_exceeded()
            if message:  # also when nothing was left to do: shards committed by earlier runs count
                raise ErrorRateExceeded(f"stopping the job: {message}")
        except ErrorRateExceeded:
            ledger.write_errors_table()  # the samples behind the stop are what a person looks at next
            raise
        if sched.failed:
            details = "; ".join(f"{n}: {r}" for n, r in sorted(sched.failed.items())[:10])
            ledger.write_errors_table()
            raise JobError(f"{len(sched.failed)} shard(s) failed after retries: {details}. "
                           "Run the same command again to retry them; committed shards are kept.")
        _check_lock(lock)
        ledger.write_errors_table()
        result = kind.finish(cfg, job, ledger) or {}
        read, written, errored = sched.totals()
        now = time.monotonic()
        summary = JobSummary(
            kind=kind.name, output=ledger.url, total_shards=len(job.inputs), skipped_shards=len(committed),
            processed_shards=len(sched.done), samples_read=read, samples_written=written,
            samples_errored=errored, counters=sched.counters(), seconds=now - t0,
            steady_seconds=now - t_ready, random_weights=random_weights, result=result,
            attempts_failed=sched.attempts_failed, lost_unstarted=sum(sched.unstarted.values()),
            actor_restarts=restarts, inputs_changed=changed)
        _check_lock(lock)
        ledger.write_success({"this_run": summary.to_dict()})
        ledger.remove_tmp_dir()
        return summary
    finally:
        if pool is not None:
            pool.shutdown()


def _check_lock(lock: JobLock, *, fresh: bool = True) -> None:
    """Raise JobError when this driver lost the output's lock; `fresh` looks again (one beat) first,
    as another driver may have taken the folder since the last beat."""
    if fresh and lock.lost is None:
        lock.heartbeat()
    if lock.lost is not None:
        raise JobError(f"{lock.lost}; stopping without writing more")


def _run_loop(kind: JobKind, cfg: RunConfig, job: JobPlan, pool: ActorPool, sched: Scheduler,
              bar: _Progress, on_result: Callable[[ShardResult], None] | None, lock: JobLock,
              demand: ActorDemand, record: Callable[[ShardResult], None], metrics: JobMetrics) -> None:
    next_rescale = time.monotonic() + cfg.resources.rescale_interval_s
    try:
        while not sched.finished:
            _check_lock(lock, fresh=False)  # the heartbeat thread looks every interval
            now = time.monotonic()
            bar.tick(sched)
            if now >= next_rescale:
                _rescale(pool, cfg, demand, sched.remaining)
                metrics.pool(len(pool.actors), pool.restarts)
                next_rescale = now + cfg.resources.rescale_interval_s
            for info in pool.poll_starting():
                _check_actor(kind, job, info)
                _note_ready(info)
            while pool.free_slots() > 0:
                task = sched.next_task(now)
                if task is None:
                    break
                pool.submit(task, "process", now)
            if not pool.busy:
                # Either every queued shard is backing off, or no actor is ready to take one.
                ready_at = sched.next_ready_at()
                time.sleep(0.5 if ready_at is None or ready_at <= now else min(1.0, ready_at - now))
                continue
            for outcome in pool.wait(timeout=1.0):
                now = time.monotonic()
                name = outcome.task.name
                if outcome.error is None:
                    assert outcome.result is not None
                    # The Scheduler keeps the counts only; the ledger record goes to the compactor.
                    result = dataclasses.replace(outcome.result, record={})
                    sched.succeeded(result)
                    record(outcome.result)
                    kind.shard_done(result)
                    bar.update(sched)
                    if on_result is not None:
                        on_result(result)
                elif outcome.collateral:
                    sched.requeue(name)  # not its fault: another shard's timeout killed the actor
                elif not outcome.started and sched.lost_unstarted(name):
                    # Sent to an actor that was dead or restarting, which never began it: not an attempt.
                    log.info("shard %s was lost before it started (its actor died); requeued", name)
                else:
                    reason = error_message(outcome.error)
                    if not outcome.started:
                        reason += f" (lost {sched.unstarted[name]} times before it started)"
                    permanent = isinstance(getattr(outcome.error, "cause", None), PermanentShardError)
                    at = sched.failed_attempt(name, reason, now, permanent=permanent)
                    log.warning("shard %s failed (%s); %s", name, reason[:300],
                                "retrying" if at is not None else "giving up")
            for task in pool.kill_timed_out(time.monotonic(), cfg.retry.shard_timeout_s):
                log.warning("shard %s timed out after %.0f s; restarting its actor", task.name,
                            cfg.retry.shard_timeout_s)
            message = sched.error_rate_exceeded()
            if message:
                raise ErrorRateExceeded(f"stopping the job: {message}")
    except PoolStartError as e:
        raise JobError(f"the {kind.name} actors could not be replaced: {e}") from e
    finally:
        metrics.pool(len(pool.actors), pool.restarts)
        bar.tick(sched, final=True)
        bar.close()


__all__ = ["JobError", "ChangedInputError", "JobSummary", "run_job", "changed_inputs", "FORWARDED_ENV",
           "SHARDS_PER_ACTOR"]
