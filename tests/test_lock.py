"""One driver per output folder (issue 8, defect 4): the lock on a local disk and on S3 (moto),
taking over only a driver known gone, the heartbeat, and actors that stop publishing once their
run lost the folder."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time

import fsspec
import pytest

from pipeline.core import lock as lockmod
from pipeline.core.lock import LOCK_FILE, JobLock, LockError, create_exclusive, read_lock, why_not_owner


def _lock(tmp_path, **kw) -> JobLock:
    return JobLock(fsspec.filesystem("file"), str(tmp_path), command="encode", **kw)


def test_a_second_driver_is_refused_with_the_first_ones_name(tmp_path):
    first = _lock(tmp_path)
    first.acquire()
    held = json.loads((tmp_path / LOCK_FILE).read_text())
    assert held["owner"] == first.owner and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    second = _lock(tmp_path)
    with pytest.raises(LockError, match=rf"in use by another latentcache driver: host {socket.gethostname()} "
                                        rf"pid {os.getpid()} \(encode, started .*last heartbeat \d+ s ago\).*--break-lock"):
        second.acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second.acquire()
    assert read_lock(fsspec.filesystem("file"), str(tmp_path))["owner"] == second.owner


def test_a_dead_drivers_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    first = _lock(tmp_path)
    first.pid, first.pid_started = dead_pid, None  # as if a driver with that pid wrote it, then died
    first.acquire()
    second = _lock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.core.lock"):
        second.acquire()
    assert f"process {dead_pid} no longer runs on this host" in caplog.text
    held = read_lock(fsspec.filesystem("file"), str(tmp_path))
    assert held["owner"] == second.owner and held["took_over_from"]["owner"] == first.owner
    first.heartbeat()
    assert first.lost is not None and "now held by" in first.lost, "the old owner learns it lost the folder"


def test_a_stale_heartbeat_is_taken_over_and_a_fresh_one_only_with_break_lock(tmp_path, monkeypatch):
    other_host = _lock(tmp_path)
    other_host.host = "another-host"  # its pid cannot be checked from here
    other_host.acquire()
    with pytest.raises(LockError, match="host another-host"):
        _lock(tmp_path).acquire()
    forced = _lock(tmp_path)
    forced.acquire(break_lock=True)
    assert read_lock(forced.fs, forced.root)["took_over_from"]["reason"] == "--break-lock was given"
    forced.release()

    other_host = _lock(tmp_path)
    other_host.host = "another-host"
    other_host.acquire()
    later = time.time() + lockmod.STALE_INTERVALS * other_host.interval_s + 5
    monkeypatch.setattr(lockmod, "_now", lambda: later)
    taker = _lock(tmp_path)
    taker.acquire()
    assert "heartbeat is" in read_lock(taker.fs, taker.root)["took_over_from"]["reason"]


def test_why_not_owner_names_each_reason(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    lock = _lock(tmp_path, interval_s=1.0)
    assert why_not_owner(fs, str(tmp_path), lock.owner, stale_after_s=4) .startswith("the lock")
    lock.acquire()
    assert why_not_owner(fs, str(tmp_path), lock.owner, stale_after_s=4) is None
    assert "now held by" in why_not_owner(fs, str(tmp_path), "someone-else", stale_after_s=4)
    later = time.time() + 10
    monkeypatch.setattr(lockmod, "_now", lambda: later)
    assert "heartbeat stopped" in why_not_owner(fs, str(tmp_path), lock.owner, stale_after_s=4)


def test_the_heartbeat_thread_refreshes_the_lock(tmp_path):
    lock = _lock(tmp_path, interval_s=0.2)
    lock.acquire()
    first = read_lock(lock.fs, lock.root)["heartbeat_unix"]
    lock.start_heartbeat()
    time.sleep(0.7)
    assert read_lock(lock.fs, lock.root)["heartbeat_unix"] > first
    lock.release()
    assert read_lock(lock.fs, lock.root) is None


@pytest.mark.s3
def test_exclusive_create_on_s3_is_atomic(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    path = f"{s3_bucket}/out/{LOCK_FILE}"
    create_exclusive(fs, path, b'{"owner": "a"}')
    with pytest.raises(FileExistsError):
        create_exclusive(fs, path, b'{"owner": "b"}')
    assert json.loads(fs.cat_file(path)) == {"owner": "a"}
    first = JobLock(fs, f"{s3_bucket}/out2", command="encode")
    first.acquire()
    with pytest.raises(LockError, match="in use by another latentcache driver"):
        JobLock(fs, f"{s3_bucket}/out2", command="encode").acquire()
    first.release()
    assert not fs.exists(f"{s3_bucket}/out2/{LOCK_FILE}")


def _start_driver(args: list[str]) -> subprocess.Popen:
    # stderr to a file: a pipe nobody reads while the driver runs could fill up and stall it.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=os.path.dirname(os.path.dirname(__file__)),
                            stdout=subprocess.DEVNULL, stderr=log, text=True, start_new_session=True)
    proc.stderr = log  # read with log.seek(0) once it ended: see _stderr
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    proc.stderr.seek(0)
    return proc.stderr.read()


def _wait_for_records(proc: subprocess.Popen, out, timeout_s: float = 180) -> None:
    """Until driver `proc` holds the lock of `out` and has committed a shard of its own."""
    from pipeline.core.layout import CURRENT

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            held = json.loads((out / LOCK_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            held = {}
        if held.get("pid") == proc.pid:
            records = out / CURRENT.records
            if records.exists() and any(p.stat().st_mtime >= held.get("started_unix", 0) for p in records.glob("*.json")):
                return
        time.sleep(0.05)
    raise AssertionError(f"the first driver ended or stalled before committing: {_stderr(proc)[-2000:]}")


@pytest.mark.driver
@pytest.mark.ray
@pytest.mark.slow
def test_two_drivers_on_one_folder_never_mix(ray_cluster, tmp_path):
    """Fault 6 / defect 4: while one driver runs, a second one (with or without --overwrite) is
    refused and the first finishes alone; with --break-lock the second takes the folder over and
    the first one's actors publish nothing more. Either way, one job's shards only."""
    import ray

    from pipeline.config import EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
    from pipeline.core.layout import CURRENT
    from pipeline.core.ledger import Ledger
    from pipeline.core.runner import JobError, run_job
    from pipeline.io.latent_reader import read_latents
    from tests import imagedata

    photo = imagedata.encode(imagedata.photo(max_side=160), "JPEG")
    for s in range(10):
        imagedata.write_tar_shard(str(tmp_path / "in" / f"part-{s:04d}.tar"),
                                  [{"__key__": f"s{s}/{i}", "jpg": photo} for i in range(6)])
    out = tmp_path / "out"
    args = ["encode", "--input", str(tmp_path / "in"), "--output", str(out), "--vae", "random:tiny", "--batch-size",
            "2", "--actors", "1", "--dtype", "float32", "--address", ray.get_runtime_context().gcs_address,
            "--no-progress"]
    second = EncodeConfig(input=(str(tmp_path / "in"),), output=str(out), actors=1, overwrite=True,
                          vae=VAEConfig(source="random:tiny", dtype="float32"),
                          preprocess=PreprocessConfig(resolution=128), retry=RetryConfig(max_attempts=1))

    first = _start_driver([*args, "--resolution", "256"])
    try:
        _wait_for_records(first, out)
        with pytest.raises(LockError, match=r"in use by another latentcache driver: host .* pid \d+ \(encode"):
            run_job("encode", second, progress=False)
        with pytest.raises(LockError):
            run_job("encode", dataclasses_replace(second, overwrite=False), progress=False)
        assert first.wait(timeout=300) == 0, _stderr(first)[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    sizes = {m["shard_metadata"]["resolution"] for _, _, m in read_latents(str(out))}
    assert sizes == {"256"} and Ledger(str(out)).progress().succeeded

    first = _start_driver([*args, "--resolution", "256", "--overwrite"])
    try:
        _wait_for_records(first, out)
        taken = run_job("encode", dataclasses_replace(second, break_lock=True), progress=False)
        assert taken.processed_shards == 10
        code = first.wait(timeout=300)
        stderr = _stderr(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert code != 0 and ("lost the output" in stderr or "not published" in stderr), stderr[-2000:]
    latents = list(read_latents(str(out)))
    assert {m["shard_metadata"]["resolution"] for _, _, m in latents} == {"128"}
    assert sorted(k for k, _, _ in latents) == sorted(f"s{s}/{i}" for s in range(10) for i in range(6))
    assert Ledger(str(out)).progress().succeeded


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
