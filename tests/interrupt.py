"""Killing a real driver in the middle of a job. Not a test module: job tests import it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence


def kill_driver_after_first_commit(cli_args: Sequence[str], records: Path, *, timeout_s: float = 240) -> int:
    """Run `python -m pipeline.cli ARGS` in its own session, SIGKILL it once a shard record appears
    under `records`, and return how many records there are then. Fails if the job ends first."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *cli_args], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if records.exists() and any(records.glob("*.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the job ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    return len(list(records.glob("*.json")))
