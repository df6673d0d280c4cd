"""Finding and killing this test process's own Ray actors. Not a test module: tests import it.

Only processes under this Python process are touched (the local Ray the tests started is its
child), never another session's Ray on the same machine.
"""

from __future__ import annotations

import os
import signal

import psutil


def own_actor_pids(class_name: str, *, started: bool = False) -> list[int]:
    """Pids of the live worker processes of actor class `class_name` under this process (with
    `started`, only those past their constructor, i.e. with the model loaded)."""
    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if f"ray::{class_name}" in cmdline and not (started and "__init__" in cmdline):
            pids.append(proc.pid)
    return pids


def sigkill(pids: list[int]) -> int:
    """SIGKILL each pid still alive; returns how many were killed."""
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed
