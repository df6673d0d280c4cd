"""`latentcache verify`: real outputs of the encode (Parquet, safetensors), decode and audit jobs,
made once per module on a real local Ray, verify clean, also against their sources and with
checksums; each tampering after the fact is named (deleted, truncated, byte-flipped, copied data
file, stray temp file, deleted or edited record, data of another VAE, a source key lost); verify
runs on S3 (moto on loopback); and a synthetic folder of 2,000 shards verifies in bounded memory."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.verify as verify_module
from pipeline.cli import main
from pipeline.config import (AuditConfig, DecodeConfig, EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig,
                             to_dict)
from pipeline.core.kind import JobPlan, shard_metadata
from pipeline.core.layout import CURRENT
from pipeline.core.ledger import Ledger, ShardRecord, build_manifest
from pipeline.io.latent_writers import LatentRecord, make_writer
from pipeline.jobs import run
from pipeline.samples import SampleError
from pipeline.verify import VerifyReport, format_report, verify_output
from tests import imagedata

RES = 64
RETRY = RetryConfig(max_attempts=2, backoff_s=0.1, backoff_max_s=0.2)
SHARDS = ("part-0000", "part-0001", "part-0002")
COMMON = dict(actors=1, batch_size=4, decode_threads=2, retry=RETRY)


def _samples(prefix: str, n: int) -> list[dict]:
    photos = imagedata.real_photos(max_side=96)
    return [{"__key__": f"{prefix}/{i:03d}", "jpg": imagedata.encode(photos[i % len(photos)][1], "JPEG", quality=90),
             "txt": f"caption {prefix} {i}"} for i in range(n)]


def _source_samples() -> list[list[dict]]:
    """Three source shards of 3, 3 and 2 photos; the last one also holds an image that does not decode."""
    return [_samples("a", 3), _samples("b", 3), _samples("c", 2) + [{"__key__": "c/bad", "jpg": b"not a jpeg"}]]


def _encode(src: Path, out: Path, **kw) -> None:
    cfg = dict(input=(str(src),), output=str(out), vae=VAEConfig(source="random:tiny", seed=0, dtype="float32"),
               preprocess=PreprocessConfig(resolution=RES), latent_dtype="float32", max_error_rate=1.0, **COMMON)
    cfg.update(kw)
    run(EncodeConfig(**cfg), progress=False)


@pytest.fixture(scope="module")
def outputs(ray_cluster, tmp_path_factory) -> Path:
    """src/ (three tar shards), latents/ (Parquet), latents_st/ (safetensors, flipped latents too),
    decoded/ (decode of latents/) and audit/ (audit of latents/): one real job each."""
    root = tmp_path_factory.mktemp("verify")
    for i, samples in enumerate(_source_samples()):
        imagedata.write_tar_shard(str(root / "src" / f"{SHARDS[i]}.tar"), samples)
    _encode(root / "src", root / "latents")
    _encode(root / "src", root / "latents_st", format="safetensors",
            preprocess=PreprocessConfig(resolution=RES, flip=True))
    run(DecodeConfig(input=(str(root / "latents"),), output=str(root / "decoded"), max_error_rate=1.0, **COMMON),
        progress=False)
    run(AuditConfig(input=(str(root / "latents"),), output=str(root / "audit"), worst=2, **COMMON), progress=False)
    return root


# What each output holds and where its data files are: (data file of a shard, source patterns).
OUTPUTS = {
    "latents": ("{}.parquet", "src"),
    "latents_st": ("{}.safetensors", "src"),
    "decoded": ("{}.tar", "latents"),
    "audit": ("parts/{}.parquet", "latents"),
}
KINDS = {"latents": "encode", "latents_st": "encode", "decoded": "decode", "audit": "audit"}


def _copy(outputs: Path, tmp_path: Path, which: str = "latents") -> Path:
    """A copy of one job's output to tamper with (records name data files relative to the folder)."""
    return Path(shutil.copytree(outputs / which, tmp_path / which))


def _found(report: VerifyReport) -> set[tuple[str, str, str]]:
    return {(v.kind, v.shard, v.file) for v in report.violations}


def _record_path(out: Path, name: str) -> Path:
    return out / CURRENT.records / f"{name}.json"


def _edit_record(out: Path, name: str, **changes) -> None:
    path = _record_path(out, name)
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _rerecord(out: Path, name: str, data_file: str) -> None:
    """Make the record agree with its data file's new bytes, so only what is inside them is wrong."""
    raw = (out / data_file).read_bytes()
    _edit_record(out, name, bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())


# --- clean outputs ------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("which", list(OUTPUTS))
def test_clean_outputs_verify_clean_with_sources_and_checksums(outputs, which):
    data_file, source = OUTPUTS[which]
    out = outputs / which
    sizes = sum((out / data_file.format(n)).stat().st_size for n in SHARDS)
    records = Ledger(str(out)).job_records()
    written = sum(r.samples_written for r in records)
    # 8 photos decode; the broken image is an encode error, so later jobs never see it.
    assert written == 8 and sum(r.samples_read for r in records) == (9 if KINDS[which] == "encode" else 8)

    plain = verify_output(str(out))
    assert plain.ok and plain.violations == () and plain.notes == ()
    assert (plain.job_kind, plain.shards_checked, plain.samples, plain.bytes) == (KINDS[which], 3, 8, sizes)
    assert plain.source_shards == 0 and plain.checksums is False

    full = verify_output(str(out), source=[str(outputs / source)], checksums=True, workers=2)
    assert full.ok, format_report(full)
    assert (full.shards_checked, full.samples, full.bytes, full.source_shards, full.checksums) == (3, 8, sizes, 3, True)
    assert format_report(full).splitlines()[-1].startswith(f"OK: {KINDS[which]} output file://")


@pytest.mark.ray
@pytest.mark.slow
def test_cli_exit_codes_lines_and_json(outputs, tmp_path, capsys):
    out = _copy(outputs, tmp_path)
    assert main(["verify", str(out), "--checksums", "--source", str(outputs / "src")]) == 0
    assert capsys.readouterr().out.strip().startswith("OK: encode output")

    assert main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["job_kind"], report["shards_checked"], report["samples"]) == (True, "encode", 3, 8)
    assert report["violations"] == []

    (out / "part-0001.parquet").unlink()
    assert main(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("missing_data: part-0001.parquet: data file is missing; its record says "
                        f"{json.loads(_record_path(out, 'part-0001').read_text())['bytes']} bytes were written")
    assert lines[-1].startswith("FAILED: 1 violation(s) (missing_data 1): encode output")
    assert main(["verify", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [(v["kind"], v["shard"], v["file"]) for v in report["violations"]] == [
        ("missing_data", "part-0001", "part-0001.parquet")]

    # Usage errors: no job at the URL, a --source that lists nothing.
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "no latentcache job at" in capsys.readouterr().err
    assert main(["verify", str(out), "--source", str(tmp_path / "no-such-folder")]) == 2
    assert "no-such-folder" in capsys.readouterr().err


# --- tampering, each named ------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_deleted_data_file_is_named(outputs, tmp_path):
    out = _copy(outputs, tmp_path)
    (out / "part-0001.parquet").unlink()
    report = verify_output(str(out))
    assert _found(report) == {("missing_data", "part-0001", "part-0001.parquet")}
    assert report.shards_checked == 3 and report.samples == 5  # the other two shards' 3 + 2 samples


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("which", list(OUTPUTS))
def test_truncated_data_file_is_named_as_a_size_and_content_problem(outputs, tmp_path, which):
    out = _copy(outputs, tmp_path, which)
    rel = OUTPUTS[which][0].format("part-0001")
    path = out / rel
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    report = verify_output(str(out))
    found = _found(report)
    assert ("size", "part-0001", rel) in found
    size = next(v for v in report.violations if v.kind == "size")
    assert size.message == f"data file has {len(whole) // 2} bytes; its record says {len(whole)}"
    # Opening it fails too: the footer (Parquet), the tensor data (safetensors) or a member (tar) is gone.
    content = found - {("size", "part-0001", rel)}
    assert content and {(s, f) for _, s, f in content} == {("part-0001", rel)}
    assert {k for k, _, _ in content} <= {"unreadable", "schema"}


@pytest.mark.ray
@pytest.mark.slow
def test_byte_flip_in_the_data_is_caught_only_by_checksums(outputs, tmp_path):
    out = _copy(outputs, tmp_path)
    path = out / "part-0001.parquet"
    meta = pq.ParquetFile(path).metadata
    latent = meta.row_group(0).column(meta.schema.to_arrow_schema().get_field_index("latent"))
    at = latent.data_page_offset + latent.total_compressed_size // 2  # inside the latent column's pages
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))

    plain = verify_output(str(out))
    assert not any(v.kind == "size" for v in plain.violations)
    assert plain.ok  # same size, footer and keys intact: only the bytes' checksum can tell
    checked = verify_output(str(out), checksums=True)
    assert _found(checked) == {("checksum", "part-0001", "part-0001.parquet")}
    assert checked.violations[0].message.startswith("data file has sha256 ")


@pytest.mark.ray
@pytest.mark.slow
def test_copied_data_file_is_unrecorded_and_duplicates_keys(outputs, tmp_path):
    out = _copy(outputs, tmp_path)
    shutil.copyfile(out / "part-0000.parquet", out / "part-0099.parquet")
    report = verify_output(str(out))
    assert _found(report) == {("unrecorded_data", "part-0099", "part-0099.parquet"),
                              ("duplicate_key", "part-0000", "part-0000.parquet, part-0099.parquet")}
    dup = next(v for v in report.violations if v.kind == "duplicate_key")
    assert dup.message == ("3 key(s) in 2 data files: part-0000.parquet, part-0099.parquet; expected each key "
                           "once: 'a/000', 'a/001', 'a/002'")


@pytest.mark.ray
@pytest.mark.slow
def test_stray_temp_file_is_named(outputs, tmp_path):
    out = _copy(outputs, tmp_path)
    stray = f"{CURRENT.tmp}/part-0000.0123456789abcdef.parquet"
    (out / stray).parent.mkdir(parents=True, exist_ok=True)
    (out / stray).write_bytes(b"PAR1 half an upload")
    assert _found(verify_output(str(out))) == {("stray_temp", "", stray)}


@pytest.mark.ray
@pytest.mark.slow
def test_deleted_record_leaves_data_without_record(outputs, tmp_path):
    out = _copy(outputs, tmp_path)
    _record_path(out, "part-0002").unlink()
    report = verify_output(str(out))
    record = f"{CURRENT.records}/part-0002.json"
    assert _found(report) == {
        ("unrecorded_data", "part-0002", "part-0002.parquet"),
        ("uncommitted", "part-0002", record),
        # SUCCESS and the errors table still count the shard (its 2 + 1 samples, its 1 error).
        ("marker", "", CURRENT.success),
        ("errors_table", "", CURRENT.errors),
    }
    marker = sorted(v.message for v in report.violations if v.kind == "marker")
    assert any("1 shard(s) have no valid record" in m for m in marker)
    assert any("samples_read 9 (records: 6)" in m for m in marker)


@pytest.mark.ray
@pytest.mark.slow
def test_record_claiming_another_sample_count_is_named(outputs, tmp_path):
    out = _copy(outputs, tmp_path)
    _edit_record(out, "part-0000", samples_written=4)  # 4 written + 0 errored of 3 read, and the file holds 3
    report = verify_output(str(out))
    assert {(k, s) for k, s, _ in _found(report)} == {("reconcile", "part-0000"), ("count", "part-0000"),
                                                     ("marker", "")}
    messages = {v.kind: v.message for v in report.violations}
    assert messages["reconcile"] == "record says 3 read but 4 written + 0 errored = 4"
    assert messages["count"] == "data file holds 3 sample(s); its record says 4 were written"

    _edit_record(out, "part-0000", samples_read=4)  # adds up now, but still not what the file holds
    assert {(k, s) for k, s, _ in _found(verify_output(str(out)))} == {("count", "part-0000"), ("marker", "")}


@pytest.mark.ray
@pytest.mark.slow
def test_data_of_another_vae_is_named(outputs, tmp_path):
    out = _copy(outputs, tmp_path)
    path = out / "part-0001.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"latentcache"])
    good = meta["vae_fingerprint"]
    meta["vae_fingerprint"] = "random-other"
    pq.write_table(table.replace_schema_metadata({"latentcache": json.dumps(meta)}), path)
    _rerecord(out, "part-0001", "part-0001.parquet")
    report = verify_output(str(out), checksums=True)
    assert _found(report) == {("identity", "part-0001", "part-0001.parquet")}
    assert report.violations[0].message == (f"metadata differs from the job's identity: vae_fingerprint is "
                                            f"random-other; the manifest has {good}")


@pytest.mark.ray
@pytest.mark.slow
def test_decoded_sample_missing_its_image_is_named(outputs, tmp_path):
    out = _copy(outputs, tmp_path, "decoded")
    path = out / "part-0001.tar"
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for info in src.getmembers():
            if info.name != "b/001.png":
                dst.addfile(info, src.extractfile(info))
    path.write_bytes(buf.getvalue())
    _rerecord(out, "part-0001", "part-0001.tar")
    report = verify_output(str(out), checksums=True)
    assert _found(report) == {("schema", "part-0001", "part-0001.tar")}
    assert report.violations[0].message == "members differ from the job's: sample 'b/001' lacks member(s) ['png']"


@pytest.mark.ray
@pytest.mark.slow
def test_source_key_missing_from_output_and_errors_is_named(outputs, tmp_path):
    src = Path(shutil.copytree(outputs / "src", tmp_path / "src"))
    late = _samples("a", 4)[3:]
    late[0]["__key__"] = "a/late"
    imagedata.write_tar_shard(str(src / "part-0000.tar"), _source_samples()[0] + late)
    report = verify_output(str(outputs / "latents"), source=[str(src)])
    # The shard grew after it was committed: verify says both that it changed and which key is missing.
    assert _found(report) == {("source_missing", "part-0000", str(src / "part-0000.tar")),
                              ("source_changed", "part-0000", str(src / "part-0000.tar"))}
    missing = [v for v in report.violations if v.kind == "source_missing"]
    assert missing[0].message == "1 key(s) of the source shard are neither written nor recorded as errors: 'a/late'"
    # A source shard with no output shard at all is named too.
    imagedata.write_tar_shard(str(src / "part-0003.tar"), _samples("d", 1))
    assert ("source_missing", "part-0003", str(src / "part-0003.tar")) in _found(
        verify_output(str(outputs / "latents"), source=[str(src)]))


# --- S3 ------------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.s3
def test_verify_on_s3(outputs, s3_bucket):
    import boto3

    fs = fsspec.filesystem("s3")
    base = f"{s3_bucket}/latents"
    for path in sorted(p for p in (outputs / "latents").rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{base}/{path.relative_to(outputs / 'latents').as_posix()}")
    url = f"s3://{base}"
    report = verify_output(url, checksums=True, source=[str(outputs / "src")])
    assert report.ok, format_report(report)
    assert (report.url, report.shards_checked, report.samples, report.source_shards) == (url, 3, 8, 3)

    fs.rm_file(f"{base}/part-0001.parquet")
    fs.pipe_file(f"{base}/{CURRENT.tmp}/part-0002.0123456789abcdef.parquet", b"half")
    client = boto3.client("s3")
    client.create_multipart_upload(Bucket=s3_bucket, Key=f"latents/{CURRENT.tmp}/part-0000.fedcba9876543210.parquet")
    fs.invalidate_cache()
    assert _found(verify_output(url)) == {
        ("missing_data", "part-0001", "part-0001.parquet"),
        ("stray_temp", "", f"{CURRENT.tmp}/part-0002.0123456789abcdef.parquet"),
        ("stray_temp", "", f"{CURRENT.tmp}/part-0000.fedcba9876543210.parquet"),
    }
    assert main(["verify", url]) == 1


# --- scale, without Ray ---------------------------------------------------------------------------------

PER_SHARD = 4
ERRORS_PER_SHARD = 60  # fat records (about 24 KB each): holding them all would show in the peak
IDENTITY = {"kind": "encode", "vae_fingerprint": "random-tiny-0", "preset": "tiny", "scaling_factor": 0.18215,
            "shift_factor": 0.0, "compute_dtype": "float32", "preprocess": to_dict(PreprocessConfig(resolution=64)),
            "format": "parquet", "latent_dtype": "float16", "passthrough": ["txt"]}


def _write_shard(ledger: Ledger, name: str, keys: list[str], url: str) -> None:
    """A real Parquet latent shard (the job's writer) and its record, as a job would commit them."""
    metadata = shard_metadata(JobPlan(inputs={}, identity=IDENTITY, provenance={"code_version": "0"},
                                      data_extension="parquet"))
    z = np.zeros((4, 2, 2), np.float32)
    with make_writer("parquet", ledger.url, name, metadata, columns=("txt",)) as w:
        for key in keys:
            w.add(LatentRecord(key, z, z, (16, 16), (0, 0), (16, 16), extras={"txt": b"t"}))
        stats = w.commit()
    errors = [SampleError(f"{name}/bad{i}", url, "decode", f"broken JPEG {i}: " + "x" * 300)
              for i in range(ERRORS_PER_SHARD)]
    record = ShardRecord.from_stats(stats, input_url=url, samples_read=len(keys) + len(errors), errors=errors,
                                    identity_hash=ledger.identity_hash)
    ledger.fs.pipe_file(ledger._record_path(name), json.dumps(record.to_dict()).encode())


def _synthesise(root: Path, n_shards: int) -> Path:
    """An encode job's output folder of n_shards tiny shards, finished (errors table, SUCCESS)."""
    shards = {f"s-{i:05d}": f"/src/s-{i:05d}.tar" for i in range(n_shards)}
    ledger = Ledger(str(root))
    ledger.open_job(build_manifest(kind="encode", identity=IDENTITY, shards=shards, data_extension="parquet",
                                   code_version="0"), overwrite=False)
    (root / CURRENT.records).mkdir(parents=True, exist_ok=True)
    for name, url in shards.items():
        _write_shard(ledger, name, [f"{name}/{i}" for i in range(PER_SHARD)], url)
    ledger.write_errors_table()
    ledger.write_success({})
    return root


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    return _synthesise(tmp_path_factory.mktemp("many") / "out", 2000)


def test_two_thousand_shards_verify_in_bounded_memory(many_shards):
    records = sum(p.stat().st_size for p in (many_shards / CURRENT.records).iterdir())
    assert records > 40 * 2**20  # what holding every record would cost, before parsing
    t0 = time.perf_counter()
    report = verify_output(str(many_shards))
    seconds = time.perf_counter() - t0
    assert report.ok, format_report(report)
    assert (report.shards_checked, report.samples) == (2000, 2000 * PER_SHARD)
    assert seconds < 60, f"verify took {seconds:.1f} s for 2000 shards"

    tracemalloc.start()
    try:
        traced = verify_output(str(many_shards))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert traced.ok
    # Records are read a batch at a time: the peak is a few batches' worth, far below all of them
    # (Ledger.records(), which holds every record, peaks at several times their size on disk).
    assert peak < records / 4, f"peak {peak / 2**20:.1f} MiB for {records / 2**20:.1f} MiB of records"
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_the_memory_bound_fails_a_verify_that_holds_every_record(many_shards, monkeypatch):
    """The control for the test above: one batch of all 2,000 records breaks its bound."""
    records = sum(p.stat().st_size for p in (many_shards / CURRENT.records).iterdir())
    monkeypatch.setattr(verify_module, "RECORD_BATCH", 10**6)
    tracemalloc.start()
    try:
        assert verify_output(str(many_shards)).ok
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak > records / 4, f"peak {peak / 2**20:.1f} MiB for {records / 2**20:.1f} MiB of records"


def test_duplicate_key_at_scale_is_resolved_to_its_two_shards(many_shards, tmp_path):
    out = Path(shutil.copytree(many_shards, tmp_path / "out"))
    ledger = Ledger(str(out))
    _write_shard(ledger, "s-01999", ["s-01999/0", "s-01999/1", "s-00017/2", "s-01999/3"], "/src/s-01999.tar")
    report = verify_output(str(out), checksums=True)
    assert _found(report) == {("duplicate_key", "s-00017", "s-00017.parquet, s-01999.parquet")}
    assert report.violations[0].message == ("1 key(s) in 2 data files: s-00017.parquet, s-01999.parquet; "
                                            "expected each key once: 's-00017/2'")


def test_hash_collisions_of_distinct_keys_are_not_duplicates(tmp_path, monkeypatch):
    out = _synthesise(tmp_path / "out", 12)
    real = verify_module.key_hashes
    # A 2-bit hash: nearly every key collides with another; the second pass must tell them apart.
    monkeypatch.setattr(verify_module, "key_hashes", lambda keys: real(keys) % np.uint64(4))
    report = verify_output(str(out))
    assert report.ok, format_report(report)
    assert report.samples == 12 * PER_SHARD
    _write_shard(Ledger(str(out)), "s-00011", ["s-00011/0", "s-00003/1", "s-00011/2", "s-00011/3"], "/src/s-00011.tar")
    assert _found(verify_output(str(out))) == {("duplicate_key", "s-00003", "s-00003.parquet, s-00011.parquet")}
