"""`latentcache status`: a job's progress read from its output folder, from any machine."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

from .ledger import Ledger


def format_status(output: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Shards and samples done of total, images/s, errors and an ETA, as a few lines of text."""
    ledger = Ledger(output, storage_options)
    if ledger.read_manifest() is None:
        return f"{output}: no latentcache job here (no _latentcache.json)"
    p = ledger.progress()
    identity = ledger.read_manifest()["identity"]
    now = datetime.now(timezone.utc)
    elapsed = (p.last_update - p.started).total_seconds() if p.started and p.last_update else 0.0
    rate = p.samples_read / elapsed if elapsed > 0 else 0.0
    shard_rate = p.committed_shards / elapsed if elapsed > 0 else 0.0
    remaining = p.total_shards - p.committed_shards
    if p.succeeded:
        state = "SUCCEEDED"
    elif remaining == 0:
        state = "all shards committed, _SUCCESS not yet written"
    else:
        state = "running or stopped"
    eta = f"{remaining / shard_rate / 60:.1f} min" if shard_rate > 0 and remaining else "-"
    pct = 100.0 * p.committed_shards / p.total_shards if p.total_shards else 100.0
    err_pct = 100.0 * p.samples_errored / p.samples_read if p.samples_read else 0.0
    age = f"{(now - p.last_update).total_seconds():.0f} s ago" if p.last_update else "never"
    return "\n".join([
        f"job      {ledger.url}: {state}",
        f"vae      {identity.get('preset')} fingerprint {identity.get('fingerprint')}, "
        f"format {identity.get('format')}",
        f"shards   {p.committed_shards}/{p.total_shards} committed ({pct:.1f}%)",
        f"samples  {p.samples_written} written, {p.samples_errored} errored ({err_pct:.2f}%) "
        f"of {p.samples_read} read",
        f"speed    {rate:.1f} img/s over the job so far; ETA {eta}; last commit {age}",
    ])
