"""The first hour as a new user meets it: mistakes caught before Ray starts, one line each with
the right exit status and no traceback; Ctrl-C and SIGTERM stop cleanly and a rerun resumes;
`status` tells running, stopped, failed and complete apart; progress on a non-terminal; help
with defaults and examples; configs that ship with the package."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import imagedata
from drivers import output, start_driver
from pipeline.core.layout import CURRENT

REPO = Path(__file__).resolve().parent.parent
STARTED_RAY = "Started a local Ray instance"


def _user_env() -> dict[str, str]:
    """A new user's shell: no RAY_ADDRESS (the test session's own Ray exports one), so that each
    command starts, and must stop, a Ray of its own."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=_user_env() if env is None else env)


def _one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("latentcache: error: "), last
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return imagedata.photo_shards(tmp_path_factory.mktemp("first-hour") / "shards", 3)


def test_mistakes_are_one_line_with_exit_status_2_and_no_traceback(shards, tmp_path):
    out = str(tmp_path / "out")
    _one_line_error(_cli("encode", "--input", shards, "--output", out, "--config", "no-such.yaml"), 2,
                    "--config no-such.yaml: no such file, and no shipped config of that name", "sd15-512")
    _one_line_error(_cli("encode", "--input", str(tmp_path / "missing"), "--output", out), 2, "do not exist")
    _one_line_error(_cli("encode", "--input", shards, "--output", out, "--set", "batch_size=zero"), 2,
                    "batch_size must be int, got 'zero'")
    # `status` at a file, and at a folder that holds no job: exit 2, one line.
    at_file = _cli("status", str(Path(shards) / "part-000000.tar"))
    assert at_file.returncode == 2 and "is a file, not a job's output folder" in at_file.stdout
    empty = _cli("status", str(tmp_path))
    assert empty.returncode == 2 and "no latentcache job here" in empty.stdout
    # --debug shows the traceback a developer wants.
    debug = _cli("--debug", "encode", "--input", str(tmp_path / "missing"), "--output", out)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not Path(out).exists(), "a refused job must leave nothing behind"


def test_a_wrong_device_or_preset_fails_before_ray_starts(shards, tmp_path):
    import torch
    from safetensors.torch import save_file

    from vae import build_model, get_preset

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(get_preset("tiny"), seed=1).state_dict().items()}, str(weights))
    out = str(tmp_path / "out")
    t0 = time.monotonic()
    proc = _cli("encode", "--input", shards, "--output", out, "--vae", str(weights), "--preset", "sd15")
    took = time.monotonic() - t0
    last = _one_line_error(proc, 2, "do not match the architecture", "(preset sd15)", "missing keys")
    assert STARTED_RAY not in proc.stderr and "JobActor" not in proc.stderr, "an actor started for a wrong preset"
    assert took < 30, f"a wrong preset must fail in seconds, took {took:.0f} s: {last}"
    if not torch.cuda.is_available():
        proc = _cli("encode", "--input", shards, "--output", out, "--vae", "random:tiny", "--device", "cuda")
        _one_line_error(proc, 2, "vae.device=cuda: this machine has no CUDA device", "--device auto or cpu")
        assert STARTED_RAY not in proc.stderr
    assert not Path(out).exists()


@pytest.mark.s3
def test_an_output_bucket_that_does_not_exist_or_no_credentials(shards, s3_server, tmp_path):
    proc = _cli("encode", "--input", shards, "--output", "s3://no-such-bucket-latentcache/out", "--vae", "random:tiny")
    _one_line_error(proc, 2, "output s3://no-such-bucket-latentcache/out: cannot write a probe object there",
                    "bucket or folder does not exist")
    assert STARTED_RAY not in proc.stderr
    env = {k: v for k, v in _user_env().items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    proc = _cli("encode", "--input", shards, "--output", "s3://any-bucket/out", "--vae", "random:tiny", env=env)
    _one_line_error(proc, 2, "credentials")


@pytest.mark.driver
@pytest.mark.ray
def test_a_finished_job_says_complete_in_seconds_without_ray(shards, tmp_path):
    out = str(tmp_path / "out")
    first = _cli("encode", "--input", shards, "--output", out, "--vae", "random:tiny", "--resolution", "64")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Token authentication is enabled" not in first.stderr  # explained once in the README instead
    t0 = time.monotonic()
    again = _cli("encode", "--input", shards, "--output", out, "--vae", "random:tiny", "--resolution", "64")
    took = time.monotonic() - t0
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"complete: file://{out} holds this encode job finished (3 shards); nothing to do" in again.stdout
    assert STARTED_RAY not in again.stderr and took < 20, (took, again.stderr[-2000:])
    # Nor does it import Ray (0.4 s of the answer): Python's own import log says which modules loaded.
    traced = _cli("encode", "--input", shards, "--output", out, "--vae", "random:tiny", "--resolution", "64",
                  env={**_user_env(), "PYTHONPROFILEIMPORTTIME": "1"})
    assert "nothing to do" in traced.stdout and re.search(r"\| +torch$", traced.stderr, re.M), "no import log"
    assert not re.search(r"\| +ray$", traced.stderr, re.M), "a finished job's rerun imported Ray"
    status = _cli("status", out, "--json")
    assert status.returncode == 0
    data = json.loads(status.stdout)
    assert data["state"] == "complete" and data["shards"] == {"committed": 3, "total": 3}
    assert data["images_per_second"] and data["images_per_second"] > 0.5  # the run's own rate, never "0.0 img/s"


def _driver(args: list[str]) -> subprocess.Popen:
    return start_driver(args, env=_user_env())


def _wait(proc: subprocess.Popen, ready, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, output(proc)[-3000:]
        assert time.monotonic() < deadline, output(proc)[-3000:]
        time.sleep(0.05)


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.mark.driver
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_stops_cleanly_and_a_rerun_resumes(tmp_path, sig, code, word):
    # Long enough that the signal lands mid-job on a fast machine too: full JPEG decodes at 128 px.
    inputs = imagedata.photo_shards(tmp_path / "shards", 150)
    out = tmp_path / "out"
    args = ["encode", "--input", inputs, "--output", str(out), "--vae", "random:tiny", "--resolution", "128",
            "--batch-size", "2", "--progress-every", "0.5", "--set", "preprocess.jpeg_draft=false"]
    proc = _driver(args)
    records = out / CURRENT.records
    _wait(proc, lambda: records.exists() and len(list(records.glob("*.json"))) >= 2)
    from pipeline.status import format_status, job_status

    running = job_status(str(out))  # in-process: the CLI's start-up would outlast a short job
    assert running["state"] == "running" and running["driver"]["pid"] == proc.pid, running
    assert "RUNNING (driver" in format_status(running)
    ray_pids = _descendants(proc.pid)
    assert ray_pids, "the driver's local Ray should be running"
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code, output(proc)[-3000:]
    text = output(proc)
    assert f"latentcache: {word}; shards in flight were abandoned" in text and "run the same command again" in text
    assert "Traceback" not in text, text[-3000:]
    deadline = time.monotonic() + 30
    while _alive(ray_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ray_pids), f"processes of the job's Ray outlived it: {_alive(ray_pids)}"
    assert not list((out / CURRENT.tmp).glob("*")) if (out / CURRENT.tmp).exists() else True
    # The progress lines of a non-terminal, and no colour codes in a redirected log.
    assert "progress: " in text and " img/s, ETA " in text and "\x1b[" not in text
    stopped = _cli("status", str(out))
    assert stopped.returncode == 3 and "STOPPED (no driver runs)" in stopped.stdout, stopped.stdout
    committed = len(list(records.glob("*.json")))
    assert 2 <= committed < 150
    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{150 - committed} shard(s) processed and {committed} already committed" in again.stdout
    verified = _cli("verify", str(out), "--source", inputs)
    assert verified.returncode == 0, verified.stdout + verified.stderr  # every key once


@pytest.mark.driver
@pytest.mark.ray
@pytest.mark.slow
def test_status_of_a_killed_driver_is_stopped_with_its_last_heartbeat(tmp_path):
    inputs = imagedata.photo_shards(tmp_path / "shards", 100)
    out = tmp_path / "out"
    proc = _driver(["encode", "--input", inputs, "--output", str(out), "--vae", "random:tiny", "--resolution", "128",
                    "--batch-size", "2", "--set", "preprocess.jpeg_draft=false"])
    records = out / CURRENT.records
    _wait(proc, lambda: records.exists() and len(list(records.glob("*.json"))) >= 1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # The lock's heartbeat is fresh for a few intervals after a kill; a status taken later says
    # stopped. Its age is what decides: make it old, as minutes passing would.
    lock_path = out / ".latentcache" / "lock.json"
    lock = json.loads(lock_path.read_text())
    lock["heartbeat_unix"] -= 600
    lock_path.write_text(json.dumps(lock))
    status = _cli("status", str(out), "--json")
    data = json.loads(status.stdout)
    assert status.returncode == 3 and data["state"] == "stopped", status.stdout
    assert data["driver"]["pid"] == proc.pid and data["driver"]["heartbeat_age_s"] >= 600
    assert f"pid {proc.pid} was last heard from" in _cli("status", str(out)).stdout


@pytest.mark.ray
def test_status_of_a_failed_job_says_why_and_counts_errors_by_reason(ray_cluster, tmp_path):
    from pipeline.config import EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
    from pipeline.core.runner import JobError, run_job
    from pipeline.status import job_status

    inputs = imagedata.photo_shards(tmp_path / "shards", 2, per_shard=2, broken=2)
    out = tmp_path / "out"
    cfg = EncodeConfig(input=(inputs,), output=str(out), vae=VAEConfig(source="random:tiny"),
                       preprocess=PreprocessConfig(resolution=64), max_error_rate=0.1, min_samples_for_error_rate=1,
                       retry=RetryConfig(backoff_s=0.0))
    with pytest.raises(JobError, match="max_error_rate"):
        run_job("encode", cfg, progress=False)
    status = job_status(str(out))
    assert status["state"] == "failed" and "above max_error_rate=10.0%" in status["failure"]
    assert sum(status["errors_by_reason"].values()) == status["samples"]["errored"] >= 2
    assert all(reason.startswith("decode") for reason in status["errors_by_reason"]), status["errors_by_reason"]
    cli = _cli("status", str(out), env={**_user_env(), "PYTHONPROFILEIMPORTTIME": "1"})
    assert cli.returncode == 1 and "FAILED: stopping the job:" in cli.stdout
    # Reading a folder needs neither torch nor Ray (2-3 s of a command that takes half a second).
    assert re.search(r"\| +pyarrow$", cli.stderr, re.M), "no import log"
    assert not re.search(r"\| +(torch|ray|vae)$", cli.stderr, re.M), "status imported torch, Ray or the VAE"


def test_help_shows_defaults_and_examples_and_configs_ship():
    helped = _cli("encode", "--help")
    assert helped.returncode == 0
    flat = " ".join(helped.stdout.split())
    assert "--resolution RESOLUTION default: 512" in flat and "--batch-size BATCH_SIZE default: 8" in flat
    assert "examples:" in helped.stdout and helped.stdout.count("latentcache encode ") >= 2
    for command in ("decode", "audit", "run", "submit", "status", "verify"):
        out = _cli(command, "--help").stdout
        assert "examples:" in out and out.count(f"latentcache {command}") >= 2, command
    listed = _cli("configs", env={**_user_env(), "PYTHONPROFILEIMPORTTIME": "1"})
    assert listed.returncode == 0 and "sd15-512" in listed.stdout and "demo-tiny" in listed.stdout
    assert re.search(r"\| +yaml$", listed.stderr, re.M) and not re.search(r"\| +torch$", listed.stderr, re.M)
    from pipeline.config import load_yaml, shipped_configs

    assert load_yaml("demo-tiny")["vae"]["source"] == "random:tiny"
    assert set(shipped_configs()) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
