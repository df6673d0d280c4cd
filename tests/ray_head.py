"""A real Ray head for tests, started with `ray start --head` on loopback in its own temp dir and
ports, and stopped by the ids of exactly its processes (never `ray stop`, which stops every Ray on
the machine). Not a test module: tests import it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    metrics_port: int = 0  # Prometheus text at http://127.0.0.1:PORT/metrics
    seen: set[int] = field(default_factory=set)

    def pids(self) -> set[int]:
        """The head's processes (their command lines name its temp dir) and all their descendants:
        the job drivers, actors and workers it started."""
        marker = str(self.temp_dir)
        roots = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or ()):
                    roots.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found = {p.pid for p in roots}
        for proc in roots:
            try:
                found.update(c.pid for c in proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.discard(os.getpid())
        self.seen |= found
        return found

    def stop(self) -> None:
        """SIGTERM the head's processes, then SIGKILL what is left after 10 s."""
        pids = self.pids()
        procs = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                proc.send_signal(signal.SIGTERM)
                procs.append(proc)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)

    def alive(self) -> list[int]:
        """Pids ever seen of this head that still run."""
        return [p for p in self.seen | self.pids() if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def start_head(env: Mapping[str, str], *, num_cpus: int = 2, timeout_s: float = 60.0) -> RayHead:
    """`ray start --head` with every port chosen here (so it never collides with another Ray on
    the machine) and a short temp dir (Ray's socket paths must stay under 108 bytes)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="lch-", dir="/tmp"))
    gcs, dash = free_port(), free_port()
    ports = {"--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--node-manager-port": free_port(),
             "--object-manager-port": free_port()}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--temp-dir", str(temp_dir), "--num-cpus", str(num_cpus), "--num-gpus", "0", "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    full_env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "RAY_USAGE_STATS_ENABLED": "0",
                # Metrics reach the export port within a second, not ten: a test reads them back.
                "RAY_metrics_report_interval_ms": "500"}
    head = RayHead(temp_dir, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", full_env,
                   metrics_port=ports["--metrics-export-port"])
    try:
        subprocess.run(cmd, env=full_env, check=True, capture_output=True, text=True, timeout=timeout_s)
        _wait_for_dashboard(head, timeout_s)
    except BaseException:
        head.stop()
        raise
    head.pids()
    return head


def _wait_for_dashboard(head: RayHead, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token): up
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray dashboard at {head.dashboard_url} did not answer in {timeout_s:.0f} s")
            time.sleep(0.5)
