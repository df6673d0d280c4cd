"""Job kinds, by name. Adding one: a module with a `JobKind` subclass, and a line in `_registry`."""

from __future__ import annotations

from typing import Any, Callable

from pipeline.config import RunConfig
from pipeline.core.kind import JobKind


# The kinds' names, known without importing them (the jobs import torch and the VAE): a command
# other than a job kind parses without them. `_registry` holds the same names, in this order.
KIND_NAMES = ("encode", "decode", "audit")


def _registry() -> dict[str, type[JobKind]]:
    # Imported on first use: the jobs import torch and the VAE.
    from pipeline.jobs.audit import AuditJob
    from pipeline.jobs.decode import DecodeJob
    from pipeline.jobs.encode import EncodeJob

    return {job.name: job for job in (EncodeJob, DecodeJob, AuditJob)}


def kinds() -> list[JobKind]:
    """Every job kind, in registration order."""
    return [cls() for cls in _registry().values()]


def get_kind(name: str) -> JobKind:
    """The job kind called `name`; raises ValueError naming the known ones."""
    registry = _registry()
    try:
        return registry[name]()
    except KeyError:
        raise ValueError(f"job kind {name!r} is not known; expected one of {sorted(registry)}") from None


def run(cfg: RunConfig, *, ray_address: str | None = None, progress: bool = True,
        on_result: Callable[[Any], None] | None = None) -> Any:
    """Run the job that `cfg` describes (an EncodeConfig runs an encode job, ...); see `run_job`."""
    from pipeline.core.runner import run_job

    for cls in _registry().values():
        if type(cfg) is cls.config_type:
            return run_job(cls(), cfg, ray_address=ray_address, progress=progress, on_result=on_result)
    raise TypeError(f"{type(cfg).__name__} is not the config of any job kind; expected one of "
                    f"{[c.config_type.__name__ for c in _registry().values()]}")


__all__ = ["KIND_NAMES", "get_kind", "kinds", "run"]
