"""A `latentcache` command run as a separate process, as a person would start it, with its output
kept in a file to read while or after it runs. Not a test module: tests import it."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parent.parent


def _as_at_a_terminal() -> None:
    """SIGINT as a person's shell gives it: a test run in the background of a non-interactive
    shell (`make test-driver &`) inherits it ignored, and Python then installs no Ctrl-C handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_driver(args: list[str], *, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """`python -m pipeline.cli ARGS`, stdout and stderr into one temp file (a pipe nobody reads
    while the driver runs could fill up and stall it); in its own session, so that a signal sent
    to it reaches it alone."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=None if env is None else dict(env), preexec_fn=_as_at_a_terminal)
    proc.stdout = log
    return proc


def output(proc: subprocess.Popen) -> str:
    """All the driver wrote so far."""
    proc.stdout.seek(0)
    return proc.stdout.read()
