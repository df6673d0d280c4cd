"""The ledger: what "committed" means, job identity checks, progress, end-of-job files, readback."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import PreprocessConfig, to_dict
from pipeline.core.layout import CURRENT, LEGACY
from pipeline.core.ledger import IncompatibleOutputError, Ledger, LedgerError, ShardRecord, build_manifest
from pipeline.core.storage import output_fs
from pipeline.io.latent_reader import read_latents
from pipeline.io.latent_writers import LatentRecord, make_writer
from pipeline.samples import SampleError

MANIFEST, SUCCESS, ERRORS_TABLE = CURRENT.manifest, CURRENT.success, CURRENT.errors
RECORD0 = f"{CURRENT.records}/train-000000.json"

SHARDS = {f"train-{i:06d}": f"s3://in/train-{i:06d}.tar" for i in range(3)}


def identity(fingerprint: str = "abc123", resolution: int = 512, fmt: str = "parquet") -> dict:
    return {"kind": "encode", "vae_fingerprint": fingerprint, "preset": "tiny", "scaling_factor": 0.18215,
            "shift_factor": 0.0, "preprocess": to_dict(PreprocessConfig(resolution=resolution)), "format": fmt,
            "latent_dtype": "float16", "passthrough": ["txt"]}


def manifest(fmt: str = "parquet", **kw) -> dict:
    return build_manifest(kind="encode", identity=identity(fmt=fmt, **kw), shards=SHARDS, data_extension=fmt,
                          code_version="0.1.0")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def out_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/latents"
    return str(tmp_path / "latents")


def write_shard(ledger: Ledger, name: str, n: int, *, errors: int = 0, fmt: str = "parquet",
                record: bool = True) -> ShardRecord:
    """Write shard `name` with n samples (keys `<name>/<i>`) and, unless told not to, its record."""
    with make_writer(fmt, ledger.url, name, {"vae_fingerprint": "abc123"}, columns=("txt",)) as w:
        for i in range(n):
            z = np.full((4, 2, 2), i, dtype=np.float32)
            w.add(LatentRecord(f"{name}/{i}", z, z, (16, 16), (0, 0), (16, 16), extras={"txt": b"t"}))
        stats = w.commit()
    rec = ShardRecord.from_stats(
        stats, input_url=SHARDS.get(name, "?"), samples_read=n + errors,
        errors=[SampleError(f"{name}/bad{i}", name, "decode", "truncated JPEG") for i in range(errors)],
        identity_hash=ledger.identity_hash, attempt=1, seconds=0.5)
    if record:
        ledger.commit_record(rec)
    return rec


def files(ledger: Ledger) -> set[str]:
    ledger.fs.invalidate_cache()
    prefix = ledger.root.rstrip("/") + "/"
    return {p[len(prefix):] for p in ledger.fs.find(ledger.root)}


def put(ledger: Ledger, rel: str, data: bytes) -> None:
    ledger.fs.pipe_file(f"{ledger.root}/{rel}", data)


def test_commit_and_check(out_url: str) -> None:
    ledger = Ledger(out_url)
    ledger.open_job(manifest(), overwrite=False)
    assert ledger.read_manifest()["total_shards"] == 3
    assert ledger.committed("train-000000") is None
    rec = write_shard(ledger, "train-000000", 3, errors=1)
    got = Ledger(out_url).committed("train-000000", verify_checksum=True)  # a fresh reader, e.g. another host
    assert got is not None and got.sha256 == rec.sha256 and got.errors == rec.errors and got.committed_at
    assert files(ledger) == {MANIFEST, "train-000000.parquet", RECORD0}


def test_not_committed_when_data_is_missing_or_wrong(out_url: str, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(out_url)
    ledger.open_job(manifest(), overwrite=False)
    path = f"{ledger.root}/train-000000.parquet"

    write_shard(ledger, "train-000000", 2)
    data = ledger.fs.cat_file(path)
    ledger.fs.rm(path)
    with caplog.at_level(logging.WARNING):
        assert ledger.committed("train-000000") is None
    assert "train-000000.parquet is missing" in caplog.text

    ledger.fs.pipe_file(path, data[:-10])  # truncated
    assert ledger.committed("train-000000") is None

    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size, other bytes
    ledger.fs.pipe_file(path, bytes(corrupt))
    assert ledger.committed("train-000000") is not None  # the cheap check sees only the size
    assert ledger.committed("train-000000", verify_checksum=True) is None

    put(ledger, RECORD0, b"{not json")
    assert ledger.committed("train-000000") is None


def test_not_committed_under_another_identity(tmp_path) -> None:
    ledger = Ledger(str(tmp_path))
    ledger.open_job(manifest(), overwrite=False)
    rec = write_shard(ledger, "train-000000", 1)
    other = {**rec.to_dict(), "identity_hash": "0" * 64}
    put(ledger, RECORD0, json.dumps(other).encode())
    assert ledger.committed("train-000000") is None
    with pytest.raises(LedgerError, match="has identity 000000000000; the job at .* has"):
        ledger.commit_record(ShardRecord.from_dict(other, where="test"))


def test_commit_record_refuses_missing_data(tmp_path) -> None:
    ledger = Ledger(str(tmp_path))
    ledger.open_job(manifest(), overwrite=False)
    rec = write_shard(ledger, "train-000000", 1, record=False)
    ledger.fs.rm(f"{ledger.root}/{rec.data_file}")
    with pytest.raises(LedgerError, match="cannot commit shard train-000000 .* is missing"):
        ledger.commit_record(rec)
    assert ledger.committed("train-000000") is None


def test_open_job_refuses_another_identity(out_url: str) -> None:
    Ledger(out_url).open_job(manifest(), overwrite=False)
    with pytest.raises(IncompatibleOutputError) as info:
        Ledger(out_url).open_job(manifest(fingerprint="def456", resolution=1024), overwrite=False)
    message = str(info.value)
    assert "vae_fingerprint: output has abc123, this job has def456" in message
    assert "preprocess.resolution: output has 512, this job has 1024" in message
    assert "--overwrite" in message and "scaling_factor" not in message
    assert "to resume it as it was made" not in message  # a VAE differs: no flag makes it this job


def test_an_output_made_under_another_preprocessing_default_names_the_flags_that_resume_it(tmp_path) -> None:
    """jpeg_draft was off by default until 2026-12-01: the refusal says how to resume such an output."""
    old = identity()
    old["preprocess"] = {**old["preprocess"], "jpeg_draft": False}
    Ledger(str(tmp_path)).open_job(build_manifest(kind="encode", identity=old, shards=SHARDS,
                                                  data_extension="parquet", code_version="0"), overwrite=False)
    assert identity()["preprocess"]["jpeg_draft"] is True  # today's default
    with pytest.raises(IncompatibleOutputError) as info:
        Ledger(str(tmp_path)).open_job(manifest(resolution=1024), overwrite=False)
    assert str(info.value).endswith("; to resume it as it was made: --set preprocess.jpeg_draft=false "
                                    "--set preprocess.resolution=512")


def test_resume_keeps_committed_shards_and_clears_stale_files(out_url: str) -> None:
    ledger = Ledger(out_url)
    ledger.open_job(manifest(), overwrite=False)
    created = ledger.read_manifest()["created"]
    write_shard(ledger, "train-000000", 2)
    put(ledger, f"{CURRENT.tmp}/train-000001.deadbeef.parquet", b"partial")
    put(ledger, SUCCESS, b"{}")

    again = Ledger(out_url)
    again.open_job(manifest(), overwrite=False)
    assert again.committed("train-000000") is not None
    assert again.read_manifest()["created"] == created
    assert files(again) == {MANIFEST, "train-000000.parquet", RECORD0}


def test_overwrite_wipes_only_latentcache_files(out_url: str) -> None:
    ledger = Ledger(out_url)
    ledger.open_job(manifest(), overwrite=False)
    write_shard(ledger, "train-000000", 2, errors=1)
    write_shard(ledger, "train-000001", 2)
    ledger.write_errors_table()
    put(ledger, "README.md", b"not ours")

    fresh = Ledger(out_url)
    fresh.open_job(manifest(fingerprint="def456"), overwrite=True)
    assert files(fresh) == {MANIFEST, "README.md"}
    assert fresh.read_manifest()["identity"]["vae_fingerprint"] == "def456"
    assert fresh.progress().committed_shards == 0


def test_progress_errors_table_and_success(out_url: str) -> None:
    ledger = Ledger(out_url)
    ledger.open_job(manifest(), overwrite=False)
    write_shard(ledger, "train-000000", 3, errors=2)
    write_shard(ledger, "train-000001", 4)
    write_shard(ledger, "train-000002", 5, record=False)  # data written, record not yet: not committed

    p = Ledger(out_url).progress()
    assert (p.total_shards, p.committed_shards) == (3, 2)
    assert (p.samples_read, p.samples_written, p.samples_errored) == (9, 7, 2)
    assert p.started is not None and p.last_update is not None and not p.done and not p.succeeded
    with pytest.raises(LedgerError, match=r"1 shard\(s\) not committed, e.g. \['train-000002'\]"):
        ledger.write_success({"wall_seconds": 1.0})

    ledger.commit_record(write_shard(ledger, "train-000002", 5, record=False))
    assert ledger.write_errors_table() == 2
    fs, root = output_fs(out_url)
    with fs.open(f"{root}/{ERRORS_TABLE}", "rb") as f:
        table = pq.read_table(f)
    assert table.column_names == ["key", "shard", "stage", "reason"]
    assert table.column("key").to_pylist() == ["train-000000/bad0", "train-000000/bad1"]

    ledger.write_success({"wall_seconds": 1.0})
    summary = json.loads(fs.cat_file(f"{root}/{SUCCESS}"))
    assert summary["wall_seconds"] == 1.0 and summary["samples_written"] == 12
    p = Ledger(out_url).progress()
    assert p.done and p.succeeded and p.committed_shards == 3


def test_progress_without_a_job_raises(tmp_path) -> None:
    with pytest.raises(LedgerError, match="no latentcache job at .*.latentcache/manifest.json is missing"):
        Ledger(str(tmp_path / "nothing")).progress()


@pytest.mark.parametrize("fmt", ["parquet", "safetensors"])
def test_read_latents_over_a_folder(out_url: str, fmt: str) -> None:
    ledger = Ledger(out_url)
    ledger.open_job(manifest(fmt=fmt), overwrite=False)
    write_shard(ledger, "train-000001", 3, fmt=fmt)
    write_shard(ledger, "train-000000", 2, fmt=fmt, errors=1)
    write_shard(ledger, "train-000002", 4, fmt=fmt, record=False)  # not committed: skipped
    ledger.write_errors_table()

    got = list(read_latents(out_url))
    keys = [k for k, _, _ in got]
    assert keys == ["train-000000/0", "train-000000/1", "train-000001/0", "train-000001/1", "train-000001/2"]
    assert all(latent.shape == (4, 2, 2) and meta["extras"] == {"txt": "t"} for _, latent, meta in got)
    assert float(got[3][1][0, 0, 0]) == 1.0


def test_read_latents_without_manifest_reads_all_data_files(tmp_path) -> None:
    for name in ("b", "a"):
        with make_writer("safetensors", str(tmp_path), name, {}) as w:
            z = np.zeros((4, 2, 2), np.float32)
            w.add(LatentRecord(f"{name}-key", z, z, (16, 16), (0, 0), (16, 16)))
            w.commit()
    (tmp_path / "_stray.parquet").write_bytes(b"ignored")
    (tmp_path / ".hidden.parquet").write_bytes(b"ignored")
    assert [k for k, _, _ in read_latents(str(tmp_path))] == ["a-key", "b-key"]


def test_discard_all_removes_only_the_named_records(tmp_path):
    records = tmp_path / CURRENT.records
    records.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (records / f"{name}.json").write_text("{}")
    ledger = Ledger(str(tmp_path))
    assert ledger.discard_all({"a", "c", "zzz"}) == 2
    assert sorted(p.name for p in records.iterdir()) == ["b.json"]


def _legacy_folder(root, n: int = 2) -> None:
    """An output as latentcache 0.1 laid it out: bookkeeping at the top level, identity key
    `fingerprint`, manifest version 1."""
    from pipeline.core.ledger import identity_hash

    old_identity = {"fingerprint": "abc123", "preset": "tiny", "scaling_factor": 0.18215, "shift_factor": 0.0,
                    "preprocess": to_dict(PreprocessConfig()), "format": "parquet", "latent_dtype": "float16"}
    h = identity_hash(old_identity)
    shards = {f"train-{i:06d}": f"s3://in/train-{i:06d}.tar" for i in range(n)}
    (root / "_records").mkdir(parents=True)
    for name in shards:
        with make_writer("parquet", str(root), name, {"fingerprint": "abc123"}, columns=("txt",)) as w:
            z = np.ones((4, 2, 2), np.float32)
            w.add(LatentRecord(f"{name}/0", z, z, (16, 16), (0, 0), (16, 16), extras={"txt": b"t"}))
            stats = w.commit()
        rec = ShardRecord.from_stats(stats, input_url=shards[name], samples_read=1, errors=[], identity_hash=h)
        (root / "_records" / f"{name}.json").write_text(json.dumps({k: v for k, v in rec.to_dict().items()
                                                                     if k != "counters"}))
    (root / "_latentcache.json").write_text(json.dumps({
        "version": 1, "identity": old_identity, "identity_hash": h, "shards": shards, "total_shards": n,
        "code_version": "0.1.0", "created": "2026-11-01T00:00:00+00:00", "updated": "2026-11-01T00:00:00+00:00"}))
    (root / "_SUCCESS").write_text("{}")


def test_a_0_1_output_is_still_read_and_reported(tmp_path) -> None:
    from pipeline.status import format_status, job_status

    _legacy_folder(tmp_path)
    ledger = Ledger(str(tmp_path))
    assert ledger.legacy and ledger.layout is LEGACY
    assert [r.name for r in ledger.job_records()] == ["train-000000", "train-000001"]
    assert [k for k, _, _ in read_latents(str(tmp_path))] == ["train-000000/0", "train-000001/0"]
    status = format_status(job_status(str(tmp_path)))
    assert "COMPLETE" in status and "fingerprint abc123" in status and "2/2 committed" in status


def test_a_0_1_output_is_not_resumed_into_unless_overwrite(tmp_path) -> None:
    _legacy_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("the user's")
    with pytest.raises(IncompatibleOutputError, match="written by latentcache 0.1 .*--overwrite"):
        Ledger(str(tmp_path)).open_job(manifest(), overwrite=False)
    fresh = Ledger(str(tmp_path))
    fresh.open_job(manifest(), overwrite=True)
    assert not fresh.legacy
    assert files(fresh) == {MANIFEST, "notes.txt"}


def test_success_marker_beside_an_uncommitted_shard_is_not_success(tmp_path) -> None:
    """`status` must not say complete over a shard that is no longer committed (issue 8, defect 10)."""
    from pipeline.status import format_status, job_status

    ledger = Ledger(str(tmp_path))
    ledger.open_job(manifest(), overwrite=False)
    for name in SHARDS:
        write_shard(ledger, name, 2)
    ledger.write_success({})
    assert Ledger(str(tmp_path)).progress().succeeded
    (tmp_path / "train-000001.parquet").unlink()  # damaged after the fact
    p = Ledger(str(tmp_path)).progress()
    assert not p.succeeded and p.committed_shards == 2
    status = job_status(str(tmp_path))
    assert status["state"] == "stopped" and "COMPLETE" not in format_status(status)


class _Flaky:
    """Wraps one filesystem method: raises `error` the first `fails` calls, then calls through."""

    def __init__(self, fn, fails: int, error: BaseException) -> None:
        self.fn, self.fails, self.error, self.calls = fn, fails, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("method", ["ls", "cat_file", "cat"])
def test_transient_read_errors_are_retried(tmp_path, monkeypatch, caplog, method) -> None:
    """Issue 8 defect 7: a flaky LIST or GET in the ledger's reads is retried with backoff."""
    from pipeline.core import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "READ_BACKOFF_S", 0.0)
    ledger = Ledger(str(tmp_path / "latents"))
    ledger.open_job(manifest(), overwrite=False)
    write_shard(ledger, "train-000000", 3)
    fresh = Ledger(str(tmp_path / "latents"))
    flaky = _Flaky(getattr(fresh.fs, method), 2, ConnectionResetError("connection reset by peer"))
    monkeypatch.setattr(fresh.fs, method, flaky)
    with caplog.at_level(logging.WARNING):
        assert [r.name for r in fresh.job_records()] == ["train-000000"]
    assert flaky.calls >= 3
    assert "retrying" in caplog.text and "connection reset by peer" in caplog.text


def test_persistent_read_errors_end_in_a_named_ledger_error(tmp_path, monkeypatch) -> None:
    from pipeline.core import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "READ_BACKOFF_S", 0.0)
    ledger = Ledger(str(tmp_path / "latents"))
    ledger.open_job(manifest(), overwrite=False)
    flaky = _Flaky(ledger.fs.ls, 10**6, TimeoutError("read timed out"))
    monkeypatch.setattr(ledger.fs, "ls", flaky)
    with pytest.raises(LedgerError, match=r"listing .*records failed \d+ times.*TimeoutError: read timed out"):
        ledger.job_records()
    assert flaky.calls == ledger_module.READ_ATTEMPTS
    # A refused read is an answer, not a fault: never retried.
    refused = _Flaky(ledger.fs.cat_file, 10**6, PermissionError("access denied"))
    monkeypatch.setattr(ledger.fs, "cat_file", refused)
    with pytest.raises(PermissionError):
        ledger._read_json(ledger._record_path("x"))
    assert refused.calls == 1
