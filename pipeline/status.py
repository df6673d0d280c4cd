"""`latentcache status`: a job's progress read from its output folder, from any machine."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

from .core.ledger import Ledger


def format_status(output: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Shards and samples done of total, images/s, errors and an ETA, as a few lines of text."""
    ledger = Ledger(output, storage_options)
    manifest = ledger.read_manifest()
    if manifest is None:
        return f"{output}: no latentcache job here (no {ledger.layout.manifest})"
    records = ledger.job_records()
    p = ledger.progress(records)
    identity = manifest["identity"]
    now = datetime.now(timezone.utc)
    # Rates over the latest run only: idle time between a stop and a resume is not the job's speed.
    run_start = datetime.fromisoformat(manifest["updated"]) if manifest.get("updated") else p.started
    this_run = [r for r in records
                if r.committed_at and run_start and datetime.fromisoformat(r.committed_at) >= run_start]
    elapsed = (p.last_update - run_start).total_seconds() if run_start and p.last_update else 0.0
    rate = sum(r.samples_read for r in this_run) / elapsed if elapsed > 0 else 0.0
    shard_rate = len(this_run) / elapsed if elapsed > 0 else 0.0
    remaining = p.total_shards - p.committed_shards
    if p.succeeded:
        state = "SUCCEEDED"
    elif remaining == 0:
        state = "all shards committed, SUCCESS not yet written"
    else:
        state = "running or stopped"
    eta = f"{remaining / shard_rate / 60:.1f} min" if shard_rate > 0 and remaining else "-"
    pct = 100.0 * p.committed_shards / p.total_shards if p.total_shards else 100.0
    err_pct = 100.0 * p.samples_errored / p.samples_read if p.samples_read else 0.0
    age = f"{(now - p.last_update).total_seconds():.0f} s ago" if p.last_update else "never"
    fingerprint = identity.get("vae_fingerprint")
    output_format = identity.get("format") or identity.get("image_format") or manifest.get("data_extension")
    return "\n".join([
        f"job      {manifest.get('kind', 'encode')} {ledger.url}: {state}",
        f"vae      {identity.get('preset')} fingerprint {fingerprint}, format {output_format}",
        f"shards   {p.committed_shards}/{p.total_shards} committed ({pct:.1f}%)",
        f"samples  {p.samples_written} written, {p.samples_errored} errored ({err_pct:.2f}%) "
        f"of {p.samples_read} read",
        f"speed    {rate:.1f} img/s in the latest run; ETA {eta}; last commit {age}",
        f"errors   {ledger.path_of('errors')}",
    ])
