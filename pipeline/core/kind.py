"""The contract a job kind fulfils. See ARCHITECTURE.md.

A job kind states only what is its own:
- `inputs(cfg)`: its input shards (output name -> URL).
- `plan(cfg, inputs, ctx)`, in the driver before any actor starts: its
  identity (the one source of truth for the manifest, every shard's metadata and resume), what it
  records for provenance, and the extension of its data files. Cheap: it may read a weights file
  to fingerprint it, never build the model on a device.
- `worker(cfg, plan)`, inside the actor: a `ShardWorker` holding the model.
Everything else (scheduling, the actor pool, the shard skeleton, the ledger, resume, progress,
status, the summary, the CLI's common flags) is shared.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Hashable, Iterable, Mapping

from pipeline.config import RunConfig
from pipeline.core.scheduler import ShardTask
from pipeline.core.sink import ShardSink
from pipeline.samples import SampleError


class PlanError(ValueError):
    """The job cannot be planned as asked: inputs that do not fit together, a VAE that does not
    match the latents. Raised in the driver before any actor starts."""


class PermanentShardError(Exception):
    """A shard failure that no retry can fix (the shard was made with another VAE, say): the
    runner gives the shard up at once, with this message."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


@dataclass(frozen=True)
class PlanContext:
    """What the runner knows before actors start: where they will run."""

    device: str  # "cuda" or "cpu"


@dataclass(frozen=True)
class JobPlan:
    """A job kind's plan: inputs, identity, provenance, and what its workers need besides the config.

    identity: every value that changes the bytes of an output shard; a resumed job must match it.
    provenance: facts recorded beside it (the VAE's source, the code version), not compared.
    worker_args: plain data the workers need (the passthrough columns, the VAE to load, ...).
    data_dir: the subfolder of the output that holds the data files ("" for the folder itself), for
      a kind whose output folder is a report with its per-shard parts beside it.
    outputs: what `finish` writes over the whole job (relative names; a trailing '/' for a folder of
      them): removed when the job is opened again, so a stale one is never read as this run's.
    input_versions: input shard name -> its version in the listing (size, ETag or mtime; see
      `pipeline.io.shards.input_version`), recorded with each shard so that a resume tells an input
      that changed since; empty for a kind whose listing gives none.
    """

    inputs: Mapping[str, str]
    identity: Mapping[str, Any]
    provenance: Mapping[str, Any]
    data_extension: str
    worker_args: Mapping[str, Any] = field(default_factory=dict)
    data_dir: str = ""
    outputs: tuple[str, ...] = ()
    input_versions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def shard_metadata(plan: JobPlan) -> dict[str, str]:
    """The metadata stamped into every output shard: identity and provenance, as strings (nested
    values as JSON), so a shard read on its own still says which VAE and preprocessing made it."""
    out: dict[str, str] = {}
    for key, value in {**plan.provenance, **plan.identity}.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, bool):
            out[key] = str(value).lower()
        elif isinstance(value, (int, float)):
            out[key] = repr(value)
        else:
            out[key] = json.dumps(value, sort_keys=True)
    return out


@dataclass
class ShardContext:
    """Per-shard state a worker's `step` may use: the task, and counters to add to."""

    task: ShardTask
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class ShardWorker(ABC):
    """The job kind's part of processing one shard: read -> prepare (threads) -> batch -> step -> sink.

    Built inside the actor (it holds the model). Thread-safe: two shards run at once per actor, so
    `step` serialises its model calls itself and does CPU work (encoding images, say) outside that.
    """

    batch_size: int = 8
    threads: int = 4

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """`identity` as the loaded model sees it (the runner compares it with the plan's), plus
        `summary` (one line naming the model)."""

    @abstractmethod
    def read(self, task: ShardTask, ctx: ShardContext) -> Iterable[Any | SampleError]:
        """The input shard's items in order, with SampleErrors for unreadable ones; raises for
        failures a retry may fix (and PermanentShardError for those it cannot). `ctx` takes counters."""

    @abstractmethod
    def prepare(self, item: Any, task: ShardTask) -> Any | SampleError:
        """Turn one item into model input (decode an image, check a latent), in a thread pool."""

    @abstractmethod
    def key_of(self, item: Any) -> str:
        """The sample key of a read item, for errors."""

    def batch_key(self, prepared: Any) -> Hashable:
        """Items of one batch share this (their tensor shape, say)."""
        return None

    @abstractmethod
    def step(self, batch: list[Any], ctx: ShardContext) -> Iterable[Any | SampleError]:
        """Run the model on one batch; yields one output record or SampleError per item."""

    @abstractmethod
    def open_sink(self, task: ShardTask) -> ShardSink:
        """The writer for this shard's output file."""


class JobKind(ABC):
    """A kind of job (encode, decode, ...). Stateless: its methods take the config."""

    name: ClassVar[str]
    config_type: ClassVar[type[RunConfig]]
    help: ClassVar[str] = ""
    input_help: ClassVar[str] = "input shard URLs"
    # CLI flag (argparse dest) -> config key, for this kind's own flags; the common ones are the CLI's.
    flags: ClassVar[Mapping[str, str]] = {}

    def add_arguments(self, parser: Any) -> None:
        """Add this kind's own flags (those named in `flags`) to its argparse subcommand."""

    @abstractmethod
    def inputs(self, cfg: RunConfig) -> dict[str, str]:
        """The input shards, output name -> URL (listed before Ray starts, so a typo fails at once)."""

    @abstractmethod
    def plan(self, cfg: RunConfig, inputs: Mapping[str, str], ctx: PlanContext) -> JobPlan:
        """Identity, provenance and what the workers need, before any actor starts."""

    @abstractmethod
    def worker(self, cfg: RunConfig, plan: JobPlan) -> ShardWorker:
        """The shard worker, built inside an actor."""

    def wants_gpu(self, cfg: RunConfig) -> bool:
        """Whether the job's actors take a GPU where the cluster has them."""
        return True

    def requested_device(self, cfg: RunConfig) -> str:
        """The device the config names for the actors: auto, cpu, cuda or cuda:N."""
        return "auto"

    def needs_gpu(self, cfg: RunConfig) -> bool:
        """Whether the config names a CUDA device: the actors ask for a GPU even where the cluster has none yet."""
        return self.requested_device(cfg).startswith("cuda")

    def shard_done(self, result: Any) -> None:
        """Called in the driver for each committed shard (`ShardResult`): say what a person should know."""

    def finish(self, cfg: RunConfig, plan: JobPlan, ledger: Any) -> Mapping[str, Any] | None:
        """Called in the driver once every shard is committed, before SUCCESS: write what spans the
        whole job (a report, say) from the committed shards; returns facts for the summary."""
        return None

    def verdict(self, cfg: RunConfig, summary: Any) -> str | None:
        """Why a finished job's result fails the gate its config sets (a quality threshold), or
        None; the command exits non-zero with this message."""
        return None

    def describe_summary(self, counters: Mapping[str, int]) -> str:
        """Extra words for the end-of-job line (the kind's counters)."""
        return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counters.items() if v)


__all__ = ["JobKind", "JobPlan", "PlanContext", "PlanError", "ShardContext", "ShardWorker", "PermanentShardError",
           "shard_metadata"]
