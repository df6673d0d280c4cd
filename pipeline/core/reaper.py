"""Stops the local Ray a driver started, when that driver dies without stopping it (SIGKILL, OOM).

A driver that starts its own Ray (`ray.init()` with no cluster) owns those processes: GCS, raylet,
agents, workers. Killed without a chance to call `ray.shutdown()`, it leaves them running for a
minute or more (about 200 MiB), and its actors go on working. The reaper is a small process the
driver starts beside that Ray: it keeps a list of the driver's descendants, and once the driver is
gone it stops exactly those (SIGTERM, then SIGKILL), then exits. Processes that are not the
driver's descendants (another user's Ray, a cluster's) are never touched.

    python -m pipeline.core.reaper DRIVER_PID DRIVER_START_TIME
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 3.0

_started: subprocess.Popen | None = None


# What Ray's processes have in their command line (GCS, raylet, agents, workers): other children of
# the driver (a notebook's own subprocesses, say) are left alone.
_RAY_MARKS = ("/ray/", "ray::", "gcs_server", "raylet", "default_worker.py")


def _descendants(driver: psutil.Process) -> dict[int, float]:
    """The driver's descendant Ray processes: pid -> start time (so a reused pid is not mistaken)."""
    out = {}
    for proc in driver.children(recursive=True):
        if proc.pid == os.getpid():
            continue
        try:
            if any(mark in " ".join(proc.cmdline()) for mark in _RAY_MARKS):
                out[proc.pid] = proc.create_time()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return out


def _same(pid: int, created: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        return proc if abs(proc.create_time() - created) < 1.0 else None
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def reap(driver_pid: int, driver_started: float) -> int:
    """Watch the driver; when it is gone stop its last known descendants. Returns how many."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    if abs(driver.create_time() - driver_started) >= 1.0:
        return 0  # the pid was reused: the driver is long gone and these are not its processes
    known: dict[int, float] = {}
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        known.update(_descendants(driver))
        known = {pid: t for pid, t in known.items() if _same(pid, t) is not None}
        time.sleep(POLL_S)
    alive = [p for p in (_same(pid, t) for pid, t in known.items()) if p is not None]
    for proc in alive:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=GRACE_S)
    for proc in still:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return len(alive)


def start_reaper() -> None:
    """Start one reaper for this process (idempotent); call right after starting a local Ray."""
    global _started
    if _started is not None and _started.poll() is None:
        return
    me = psutil.Process(os.getpid())
    _started = subprocess.Popen([sys.executable, "-m", "pipeline.core.reaper", str(me.pid), repr(me.create_time())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # Ctrl-C in the terminal must not stop it first


if __name__ == "__main__":
    reap(int(sys.argv[1]), float(sys.argv[2]))
