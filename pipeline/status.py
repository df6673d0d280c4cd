"""`latentcache status`: a job's state and progress read from its output folder, from any machine.

States are facts, not guesses:
- complete: every shard committed and SUCCESS written;
- running: a driver holds the folder's lock and refreshed its heartbeat within the last few
  intervals (30 s each);
- failed: the latest run stopped for good (shards out of retries, too many errors) and no driver
  runs now; the reason is the driver's own;
- stopped: none of these (the driver was stopped or killed; its heartbeat is stale or gone). A
  rerun resumes it.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from typing import Any, Mapping

from .core.ledger import Ledger
from .core.lock import STALE_INTERVALS, read_lock

# `status` exits with these, so that a script can tell them apart without parsing.
EXIT_CODES = {"complete": 0, "running": 0, "stopped": 3, "failed": 1, "none": 2}


def _error_reason(stage: str, reason: str) -> str:
    head = reason.split(":", 1)[0].split("(", 1)[0].strip()
    return f"{stage}: {head[:80]}" if head else stage


def job_status(output: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The job in `output` as plain data (what `status --json` prints); `state` is `none` when the
    folder holds no job."""
    ledger = Ledger(output, storage_options)
    if ledger.fs.isfile(ledger.root):
        return {"state": "none", "output": ledger.url,
                "message": "is a file, not a job's output folder (give the folder the job's --output named)"}
    manifest = ledger.read_manifest()
    if manifest is None:
        return {"state": "none", "output": ledger.url,
                "message": f"no latentcache job here (no {ledger.layout.manifest})"}
    records = ledger.job_records()
    p = ledger.progress(records)
    lock = read_lock(ledger.fs, ledger.root)
    now = time.time()
    driver = None
    if lock is not None:
        age = now - float(lock.get("heartbeat_unix", 0))
        interval = float(lock.get("heartbeat_interval_s", 30))
        driver = {"host": lock.get("host"), "pid": lock.get("pid"), "command": lock.get("command"),
                  "heartbeat_age_s": round(age, 1), "fresh": age <= STALE_INTERVALS * interval,
                  "started_unix": lock.get("started_unix")}
    failure = ledger.read_failure()
    success = ledger.read_success()
    if p.succeeded and p.done:
        state = "complete"
    elif driver is not None and driver["fresh"]:
        state = "running"
    elif failure is not None:
        state = "failed"
    else:
        state = "stopped"
    # Rates over the latest run only: idle time between a stop and a resume is not the job's speed.
    rate, eta = _rate(state, records, manifest, driver, success, p, now)
    reasons: Counter[str] = Counter()
    for r in records:
        for e in r.errors:
            reasons[_error_reason(e.stage, e.reason)] += 1
    identity = manifest["identity"]
    return {
        "state": state, "output": ledger.url, "kind": manifest.get("kind", "encode"),
        "vae": {"preset": identity.get("preset"), "fingerprint": identity.get("vae_fingerprint")},
        "format": identity.get("format") or identity.get("image_format") or manifest.get("data_extension"),
        "shards": {"committed": p.committed_shards, "total": p.total_shards},
        "samples": {"read": p.samples_read, "written": p.samples_written, "errored": p.samples_errored},
        "errors_by_reason": dict(reasons.most_common()),
        "images_per_second": rate, "eta_s": eta,
        "last_commit": p.last_update.isoformat() if p.last_update else None,
        "driver": driver, "failure": failure.get("reason") if failure else None,
        "errors_table": ledger.path_of("errors"),
    }


def _rate(state: str, records: list, manifest: Mapping[str, Any], driver: Mapping[str, Any] | None,
          success: Mapping[str, Any] | None, p: Any, now: float) -> tuple[float | None, float | None]:
    if state == "complete" and success:
        run = success.get("this_run") or {}
        seconds, read = run.get("seconds") or 0, run.get("samples_read") or 0
        return (read / seconds if seconds and read else None), None
    start = None
    if driver is not None and driver.get("started_unix"):
        start = float(driver["started_unix"])
    elif manifest.get("updated"):
        start = datetime.fromisoformat(manifest["updated"]).timestamp()
    if start is None:
        return None, None
    this_run = [r for r in records if r.committed_at and datetime.fromisoformat(r.committed_at).timestamp() >= start]
    if not this_run:
        return None, None
    end = now if state == "running" else max(datetime.fromisoformat(r.committed_at).timestamp() for r in this_run)
    elapsed = end - start
    if elapsed <= 0:
        return None, None
    rate = sum(r.samples_read for r in this_run) / elapsed
    left = p.total_shards - p.committed_shards
    eta = left * elapsed / len(this_run) if state == "running" and left else None
    return rate, eta


def format_status(status: Mapping[str, Any]) -> str:
    """A few lines of text for a person."""
    if status["state"] == "none":
        return f"{status['output']}: {status['message']}"
    s, n = status["samples"], status["shards"]
    pct = 100.0 * n["committed"] / n["total"] if n["total"] else 100.0
    err_pct = 100.0 * s["errored"] / s["read"] if s["read"] else 0.0
    state = status["state"].upper()
    d = status.get("driver")
    if status["state"] == "running" and d:
        state += f" (driver {d['host']} pid {d['pid']}, heartbeat {d['heartbeat_age_s']:.0f} s ago)"
    elif status["state"] == "stopped":
        seen = f"; its driver {d['host']} pid {d['pid']} was last heard from {d['heartbeat_age_s']:.0f} s ago" if d else ""
        state += f" (no driver runs{seen}); the same command resumes it"
    elif status["state"] == "failed":
        state += f": {status['failure']}"
    rate = status["images_per_second"]
    speed = f"{rate:.1f} img/s in the latest run" if rate is not None else "img/s: - (no shard committed in the latest run)"
    eta = status["eta_s"]
    lines = [
        f"job      {status['kind']} {status['output']}: {state}",
        f"vae      {status['vae']['preset']} fingerprint {status['vae']['fingerprint']}, format {status['format']}",
        f"shards   {n['committed']}/{n['total']} committed ({pct:.1f}%)",
        f"samples  {s['written']} written, {s['errored']} errored ({err_pct:.2f}%) of {s['read']} read",
        f"speed    {speed}" + (f"; ETA {eta / 60:.1f} min" if eta else ""),
    ]
    if status["errors_by_reason"]:
        top = list(status["errors_by_reason"].items())
        shown = ", ".join(f"{count} {reason}" for reason, count in top[:8])
        lines.append(f"errors   {shown}{', ...' if len(top) > 8 else ''} (all in {status['errors_table']})")
    else:
        lines.append("errors   none")
    return "\n".join(lines)


__all__ = ["EXIT_CODES", "format_status", "job_status"]
