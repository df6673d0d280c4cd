"""Compacted records (issue 11, "costs that stay flat at scale"): a large job keeps its shard records
in a few Parquet tables instead of one object per shard, so that planning its resume reads a few
objects. Every reader of the ledger (planning, status, verify, the latent reader's checksum) sees
the same records whether they are in files or tables."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest

from pipeline.core import ledger as ledger_module
from pipeline.core import runner
from pipeline.core.layout import CURRENT
from pipeline.core.ledger import Ledger, build_manifest
from pipeline.verify import format_report, verify_output
from tests.test_ledger import SHARDS, files, identity, write_shard
from tests.test_verify import PER_SHARD, _synthesise

MANY = {f"train-{i:06d}": f"s3://in/train-{i:06d}.tar" for i in range(12)}


def _job(out_url: str, shards: dict[str, str] = MANY) -> Ledger:
    ledger = Ledger(out_url)
    ledger.open_job(build_manifest(kind="encode", identity=identity(), shards=shards, data_extension="parquet",
                                   code_version="0.1.0"), overwrite=False)
    return ledger


def _tables(ledger: Ledger) -> list[str]:
    return sorted(f for f in files(ledger) if f.startswith(CURRENT.compacted + "/"))


def _record_files(ledger: Ledger) -> list[str]:
    return sorted(f for f in files(ledger) if f.startswith(CURRENT.records + "/"))


@pytest.fixture(autouse=True)
def _input_urls(monkeypatch) -> None:
    monkeypatch.setattr("tests.test_ledger.SHARDS", MANY)  # the input URLs write_shard records


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def out_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/compacted"
    return str(tmp_path / "latents")


def test_compacted_records_read_as_the_files_did(out_url) -> None:
    ledger = _job(out_url)
    written = [write_shard(ledger, name, 2, errors=i % 2) for i, name in enumerate(MANY)]
    before = {r.name: r for r in Ledger(out_url).job_records()}
    assert len(before) == 12

    assert ledger.compact([r for r in before.values() if r.name < "train-000006"]) == 6
    assert len(_record_files(ledger)) == 6 and len(_tables(ledger)) == 1
    fresh = Ledger(out_url)
    assert {r.name: r for r in fresh.job_records()} == before
    # One shard's lookup (the latent reader's checksum, the audit's error keys) finds it in the table.
    got = Ledger(out_url).committed("train-000003", verify_checksum=True)
    assert got == before["train-000003"] and got.sha256 == written[3].sha256
    assert Ledger(out_url).committed("train-000011") == before["train-000011"]  # still a file

    # The table is Parquet a person can read: one row per shard, the record's JSON.
    table = pq.read_table(ledger.fs.open(f"{ledger.root}/{_tables(ledger)[0]}"))
    assert table.column_names == ["name", "record"] and table.num_rows == 6
    assert json.loads(table.column("record")[0].as_py())["name"] == "train-000000"

    # At the end of a run, all into one table (a job at least min_records large).
    assert ledger.compact_all(min_records=13) == 0 and len(_record_files(ledger)) == 6
    assert ledger.compact_all(min_records=12) == 12
    assert _record_files(ledger) == [] and len(_tables(ledger)) == 1
    assert {r.name: r for r in Ledger(out_url).job_records()} == before
    assert ledger.compact_all(min_records=1) == 0, "one table and no files: nothing to do"
    ledger.write_errors_table()
    ledger.write_success({})
    assert Ledger(out_url).progress().succeeded


def test_a_crash_between_table_and_file_removal_reads_each_record_once(tmp_path, monkeypatch) -> None:
    out = _synthesise(tmp_path / "out", 5)
    ledger = Ledger(str(out))
    records = ledger.job_records()
    monkeypatch.setattr(Ledger, "_rm_files", lambda self, paths: None)  # the driver dies right after the table
    ledger.compact(records)
    monkeypatch.undo()
    assert len(_record_files(ledger)) == 5 and len(_tables(ledger)) == 1
    assert Ledger(ledger.url).job_records() == records
    report = verify_output(ledger.url)
    assert report.ok, format_report(report)
    assert (report.shards_checked, report.samples) == (5, 5 * PER_SHARD)


def test_discarded_shards_leave_the_tables_and_a_redone_shard_is_read_from_its_file(tmp_path) -> None:
    ledger = _job(str(tmp_path / "out"))
    for name in MANY:
        write_shard(ledger, name, 2)
    ledger.compact(Ledger(ledger.url).job_records())
    old = Ledger(ledger.url).committed("train-000004")

    # Planning a resume discards what it will redo: the rows go, the table is rewritten without them.
    assert ledger.discard_all({"train-000004", "train-000007", "not-a-shard"}) == 2
    fresh = Ledger(ledger.url)
    assert {r.name for r in fresh.job_records()} == set(MANY) - {"train-000004", "train-000007"}
    assert len(_tables(ledger)) == 1
    # A table whose every row is discarded is removed.
    assert ledger.discard_all(set(MANY)) == 10 and _tables(ledger) == []

    # Redone after compaction: the new record file is what counts, not a stale row.
    ledger2 = _job(ledger.url)
    for name in MANY:
        write_shard(ledger2, name, 2)
    ledger2.compact(Ledger(ledger.url).job_records())
    ledger2.discard_all({"train-000004"})
    redone = write_shard(ledger2, "train-000004", 5)
    got = Ledger(ledger.url).committed("train-000004")
    assert got is not None and got.samples_written == 5 and got.sha256 == redone.sha256 != old.sha256
    assert {r.name: r.samples_written for r in Ledger(ledger.url).job_records()}["train-000004"] == 5


def test_a_table_that_does_not_read_commits_nothing_and_verify_names_it(tmp_path, caplog) -> None:
    out = _synthesise(tmp_path / "out", 3)
    ledger = Ledger(str(out))
    ledger.compact_all(min_records=1)
    (table,) = _tables(ledger)
    blob = (out / table).read_bytes()
    (out / table).write_bytes(blob[: len(blob) // 2])
    with caplog.at_level(logging.WARNING, logger="pipeline.core.ledger"):
        assert Ledger(ledger.url).job_records() == []
    assert "is not a table of latentcache records" in caplog.text and table.split("/")[-1] in caplog.text
    report = verify_output(ledger.url)
    assert ("record", table) in {(v.kind, v.file) for v in report.violations}
    assert {v.shard for v in report.violations if v.kind == "uncommitted"} == {f"s-{i:05d}" for i in range(3)}


def test_verify_checks_compacted_records_against_their_data(tmp_path) -> None:
    out = _synthesise(tmp_path / "out", 12)
    Ledger(str(out)).compact_all(min_records=1)
    assert list((out / CURRENT.records).iterdir()) == []
    report = verify_output(str(out))
    assert report.ok, format_report(report)
    assert (report.shards_checked, report.samples) == (12, 12 * PER_SHARD)
    (out / "s-00005.parquet").write_bytes(b"PAR1 not what the record says PAR1")
    bad = verify_output(str(out))
    assert not bad.ok and "s-00005" in {v.shard for v in bad.violations}


def test_overwrite_removes_the_tables_with_the_rest(tmp_path) -> None:
    ledger = _job(str(tmp_path / "out"))
    for name in MANY:
        write_shard(ledger, name, 1)
    ledger.compact_all(min_records=1)
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    other = build_manifest(kind="encode", identity=identity(fingerprint="other"), shards=SHARDS,
                           data_extension="parquet", code_version="0.1.0")
    Ledger(ledger.url).open_job(other, overwrite=True)
    left = files(ledger)
    assert not any(f.startswith(CURRENT.compacted) or f.endswith(".parquet") for f in left), left
    assert "notes.txt" in left


def test_a_job_compacts_as_it_goes_and_resumes_from_its_tables(ray_cluster, tmp_path, monkeypatch) -> None:
    """The driver compacts every COMPACT_EVERY commits and once at the end; a rerun of the finished
    job is complete from the one table; a shard whose data went missing is redone, alone."""
    from pipeline.config import EncodeConfig, PreprocessConfig, VAEConfig
    from pipeline.core.runner import run_job
    from pipeline.io.latent_reader import read_latents
    from tests import imagedata

    for s in range(7):
        samples = [{"__key__": f"s{s}/{i}", "jpg": imagedata.encode(imagedata.photo(max_side=64), "JPEG")}
                   for i in range(2)]
        imagedata.write_tar_shard(str(tmp_path / "in" / f"part-{s:04d}.tar"), samples)
    out = tmp_path / "out"
    cfg = EncodeConfig(input=(str(tmp_path / "in"),), output=str(out), actors=1,
                       vae=VAEConfig(source="random:tiny", dtype="float32"), preprocess=PreprocessConfig(resolution=64))
    tables_during: list[int] = []
    monkeypatch.setattr(runner, "COMPACT_EVERY", 3)
    monkeypatch.setattr(ledger_module, "COMPACT_MIN", 5)

    def seen(result) -> None:
        tables_during.append(len(list((out / CURRENT.compacted).glob("*.parquet"))))

    summary = run_job("encode", cfg, progress=False, on_result=seen)
    assert summary.processed_shards == 7 and summary.samples_written == 14
    # A table every third commit (on_result runs after the driver compacted), then one at the end.
    assert tables_during == [0, 0, 1, 1, 1, 2, 2]
    assert list((out / CURRENT.records).glob("*.json")) == []
    assert len(list((out / CURRENT.compacted).glob("*.parquet"))) == 1
    assert not (out / CURRENT.tmp).exists(), "a finished local output keeps an empty tmp folder"
    assert verify_output(str(out), source=[str(tmp_path / "in")]).ok

    again = run_job("encode", cfg, progress=False)
    assert again.processed_shards == 0 and again.skipped_shards == 7

    (out / "part-0003.parquet").unlink()
    redo = run_job("encode", cfg, progress=False)
    assert redo.processed_shards == 1 and redo.skipped_shards == 6
    assert len(list((out / CURRENT.compacted).glob("*.parquet"))) == 1 and not list((out / CURRENT.records).iterdir())
    keys = sorted(k for k, _, _ in read_latents(str(out)))
    assert keys == sorted(f"s{s}/{i}" for s in range(7) for i in range(2))
    assert verify_output(str(out), source=[str(tmp_path / "in")]).ok
