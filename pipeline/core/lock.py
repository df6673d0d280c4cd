"""One driver per output folder: a lock object with its owner and a heartbeat.

`.latentcache/lock.json` holds the owner (a run id), host, pid (and the process's start time, so
a reused pid is not mistaken for the owner), when the run started and its latest heartbeat. It is
created atomically on the store (S3: a conditional PUT, `If-None-Match: *`; a local disk: an
exclusive create), so of two drivers starting together exactly one gets it.

A lock held by another driver is taken over only when that driver is known gone, and always with
a warning naming it (and a record of it in the new lock): its pid is dead on this host, its
heartbeat is older than `stale_after_s`, or the user said so (`break_lock`). Otherwise the second
driver stops with a message naming the first. The owner rewrites its heartbeat every
`interval_s`; when it finds the lock is no longer its own, it says so (`lost`) and the job stops.

Actors call `check_owner` before they publish a shard: a driver that lost its folder (another
driver broke the lock, the folder was overwritten) never writes into it again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Mapping

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.layout import META_DIR
from pipeline.core.storage import ensure_dir, join

log = logging.getLogger(__name__)

LOCK_FILE = f"{META_DIR}/lock.json"
HEARTBEAT_S = 30.0
# A heartbeat older than this many intervals means the driver is gone (clocks may differ by a minute).
STALE_INTERVALS = 4


class LockError(RuntimeError):
    """The output folder is in use by another driver, or this driver lost it."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def process_alive(pid: int, started: float | None) -> bool:
    """Whether process `pid` is the one that started at `started` and still runs (on this host)."""
    now_started = process_started(pid)
    if now_started is None:
        return False
    return started is None or abs(now_started - started) < 1.0


def create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` only if it does not exist, atomically; FileExistsError otherwise."""
    if isinstance(fs, LocalFileSystem):
        ensure_dir(fs, os.path.dirname(path))
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if not {"s3", "s3a"} & set(protocols):
        log.warning("%s has no atomic create-if-absent that latentcache knows; the lock is best effort",
                    fs.unstrip_protocol(path))
    fs.pipe_file(path, data, mode="create")  # s3fs: a PUT with If-None-Match: *
    fs.invalidate_cache(path)


def read_lock(fs: AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """The lock of the folder at `root`, None when there is none; an unreadable lock is returned as
    `{"unreadable": reason}` (it still blocks: only `break_lock` removes it)."""
    from pipeline.core.ledger import _retried

    path = join(root, LOCK_FILE)

    def get() -> bytes:
        fs.invalidate_cache(path)
        return fs.cat_file(path)

    try:
        raw = _retried(f"reading {fs.unstrip_protocol(path)}", get)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return {"unreadable": f"not JSON: {e}"}
    if not isinstance(data, dict) or not isinstance(data.get("owner"), str):
        return {"unreadable": "no owner"}
    return data


def describe_lock(lock: Mapping[str, Any], now: float | None = None) -> str:
    """`host H pid P, started T, last heartbeat N s ago` for messages."""
    if "unreadable" in lock:
        return f"an unreadable lock ({lock['unreadable']})"
    now = _now() if now is None else now
    beat = lock.get("heartbeat_unix")
    age = f"{now - beat:.0f} s ago" if isinstance(beat, (int, float)) else "never"
    return (f"host {lock.get('host')} pid {lock.get('pid')} ({lock.get('command', 'a job')}, started "
            f"{lock.get('started')}, last heartbeat {age})")


def why_not_owner(fs: AbstractFileSystem, root: str, owner: str, *, stale_after_s: float) -> str | None:
    """Why run `owner` may not write into the folder at `root` now (its lock is gone, another run
    holds it, or its own heartbeat stopped), or None when it may."""
    lock = read_lock(fs, root)
    if lock is None:
        return f"the lock {fs.unstrip_protocol(join(root, LOCK_FILE))} is gone"
    if lock.get("owner") != owner:
        return f"the output is now held by {describe_lock(lock)}"
    beat = lock.get("heartbeat_unix")
    if isinstance(beat, (int, float)) and _now() - beat > stale_after_s:
        return f"the driver's heartbeat stopped {_now() - beat:.0f} s ago (the driver is gone)"
    return None


class JobLock:
    """The lock of one output folder for one run of a driver (see the module docstring)."""

    def __init__(self, fs: AbstractFileSystem, root: str, *, command: str, interval_s: float | None = None) -> None:
        self.fs = fs
        self.root = root
        self.path = join(root, LOCK_FILE)
        self.owner = uuid.uuid4().hex
        self.command = command
        self.interval_s = HEARTBEAT_S if interval_s is None else interval_s
        self.stale_after_s = STALE_INTERVALS * self.interval_s
        self.pid = os.getpid()
        self.pid_started = process_started(self.pid)
        self.host = socket.gethostname()
        self.started = _now()
        self.took_over: dict[str, Any] | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def _payload(self) -> bytes:
        now = _now()
        data = {"owner": self.owner, "host": self.host, "pid": self.pid, "pid_started": self.pid_started,
                "command": self.command, "started": _iso(self.started), "started_unix": self.started,
                "heartbeat": _iso(now),
                "heartbeat_unix": now, "heartbeat_interval_s": self.interval_s}
        if self.took_over is not None:
            data["took_over_from"] = self.took_over
        return json.dumps(data, indent=1, sort_keys=True).encode()

    def _gone_reason(self, lock: Mapping[str, Any], break_lock: bool) -> str | None:
        """Why the holder of `lock` is known gone (so its lock may be taken over), or None."""
        if break_lock:
            return "--break-lock was given"
        if "unreadable" in lock:
            return None
        if lock.get("host") == self.host and isinstance(lock.get("pid"), int) \
                and not process_alive(lock["pid"], lock.get("pid_started")):
            return f"its process {lock['pid']} no longer runs on this host"
        beat = lock.get("heartbeat_unix")
        interval = lock.get("heartbeat_interval_s", self.interval_s)
        if isinstance(beat, (int, float)) and isinstance(interval, (int, float)) \
                and _now() - beat > STALE_INTERVALS * interval:
            return f"its heartbeat is {_now() - beat:.0f} s old (stale after {STALE_INTERVALS * interval:.0f} s)"
        return None

    def acquire(self, *, break_lock: bool = False) -> None:
        """Take the lock; raises LockError naming the driver that holds it."""
        for _ in range(2):
            try:
                create_exclusive(self.fs, self.path, self._payload())
            except FileExistsError:
                pass
            else:
                held = read_lock(self.fs, self.root)
                if held is not None and held.get("owner") == self.owner:
                    return
                raise LockError(f"{self.url}: another driver took the lock at the same moment "
                                f"({describe_lock(held or {'unreadable': 'vanished'})})")
            held = read_lock(self.fs, self.root)
            if held is None:
                continue  # released meanwhile: try again
            if held.get("owner") == self.owner:
                return  # our own create landed, its answer was lost, and the client's retry met it
            reason = self._gone_reason(held, break_lock)
            if reason is None:
                raise LockError(
                    f"output {self.fs.unstrip_protocol(self.root)} is in use by another latentcache driver: "
                    f"{describe_lock(held)}. Wait for it to finish or stop it; if it is gone, its lock goes "
                    f"stale {self.stale_after_s:.0f} s after its last heartbeat, or pass --break-lock "
                    "(config break_lock) to take it over now")
            log.warning("taking over the lock %s from %s: %s", self.url, describe_lock(held), reason)
            self.took_over = {**{k: held.get(k) for k in ("owner", "host", "pid", "started", "heartbeat")},
                              "reason": reason}
            self.fs.rm_file(self.path)
            self.fs.invalidate_cache(self.path)
        raise LockError(f"{self.url}: could not take the lock; another driver is taking it too")

    def heartbeat(self) -> None:
        """Rewrite the heartbeat if the lock is still ours; else set `lost`."""
        held = read_lock(self.fs, self.root)
        if held is None or held.get("owner") != self.owner:
            self.lost = (f"this driver lost the output {self.fs.unstrip_protocol(self.root)}: "
                         + ("its lock was removed" if held is None else f"it is now held by {describe_lock(held)}"))
            return
        from pipeline.core.ledger import _retried

        _retried(f"writing {self.url}", lambda: self.fs.pipe_file(self.path, self._payload()))
        self.fs.invalidate_cache(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.heartbeat()
            except (OSError, RuntimeError) as e:  # a flaky store (LedgerError after retries): the next beat tries again
                log.warning("heartbeat of %s failed: %s: %s", self.url, type(e).__name__, e)
            if self.lost:
                log.error("%s", self.lost)
                return

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="latentcache-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            held = read_lock(self.fs, self.root)
            if held is not None and held.get("owner") == self.owner:
                self.fs.rm_file(self.path)
                self.fs.invalidate_cache(self.path)
        except OSError as e:  # left behind: the next driver sees this pid gone (or a stale heartbeat)
            log.warning("could not remove the lock %s: %s: %s", self.url, type(e).__name__, e)

    def guard(self) -> dict[str, Any]:
        """What an actor needs to check this run still owns the folder (see `why_not_owner`)."""
        return {"owner": self.owner, "host": self.host, "pid": self.pid, "pid_started": self.pid_started,
                "stale_after_s": self.stale_after_s}


__all__ = ["JobLock", "LockError", "LOCK_FILE", "read_lock", "why_not_owner", "describe_lock", "process_alive",
           "create_exclusive"]
