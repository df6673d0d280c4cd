"""Jobs against an object store that fails (issue 8, faults to inject, item 4): s3fs talks to moto's
server through the fault proxy (tests/faults/s3_proxy.py), in this process and in the Ray actors
a job starts (AWS_ENDPOINT_URL, which the runner forwards).

- At 10 % faults on every request kind, encode, decode and audit complete, and their output is
  that of an undisturbed run of the same job, byte for byte; every input key is written once or
  recorded as an error; nothing is left under `.latentcache/tmp/`, and no multipart upload.
- A LIST that always fails stops the job with an error naming the listing, never a hang.
- A store that loses bytes of an upload, or fails to complete a multipart upload, never gets a
  truncated object published under a data file's name: the output bucket is versioned, and every
  version ever written under a data file's name is checked against its record's sha256.
- AtomicUpload on its own (default suite, no Ray): a failed completion, a lost answer to
  CreateMultipartUpload, a failed abort, and a short upload leave no object and no upload behind.

The job-level runs are marked `chaos` (`make test-chaos`); each prints the faults it met by kind.
Reproduce: `.venv/bin/python -m pytest -m chaos tests/test_chaos_s3.py -s`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from typing import Iterator

import numpy as np
import pandas as pd
import pytest

from pipeline.config import AuditConfig, DecodeConfig, EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
from pipeline.core.layout import CURRENT
from pipeline.core.ledger import READ_ATTEMPTS, LedgerError
from pipeline.core.lock import JobLock
from pipeline.core.storage import AtomicUpload, ShardWriteError, output_fs, write_atomically
from pipeline.io.latent_reader import read_latents
from pipeline.io.shards import ShardListingError
from pipeline.jobs import run
from tests import imagedata
from tests.faults.s3_proxy import FAULTS, FaultPolicy, FaultProxy, Rule, through

pytestmark = [pytest.mark.s3]

MiB = 2**20
# s3fs goes multipart from its block size; 5 MiB is S3's smallest part, so a 5.5 MiB file is two parts.
STORAGE = {"default_block_size": 5 * MiB}
BIG = 5 * MiB + 512 * 1024
RETRY = RetryConfig(max_attempts=4, backoff_s=0.2, backoff_max_s=1.0)
DATA_FILE = r"\.(parquet|safetensors|tar)(\?|$)"  # temp and final names of data files; not records or markers
# Every fault but short_body (a store that loses bytes: its own test below), stalls kept short (a delay,
# not a failure, at this length).
_TEN_FAULTS = tuple(f for f in FAULTS if f != "short_body")
# 10 % of every kind; and since a job sends so few multipart requests that 10 % of them is often
# none, the first of each multipart kind always fails too (a lost CreateMultipartUpload answer
# among them), so that every kind meets a fault whatever the request pattern.
TEN_PERCENT = FaultPolicy({"*": Rule(0.10, _TEN_FAULTS),
                           "CREATE_MPU": Rule(1.0, ("reset_after",), limit=1),
                           "UPLOAD_PART": Rule(1.0, ("reset_before", "error_503"), limit=1),
                           "COMPLETE_MPU": Rule(1.0, ("error_500",), limit=1)}, seed=1575, stall_s=0.3)
_FAULTED_KINDS = {"GET", "HEAD", "PUT", "LIST", "COPY", "DELETE"}
_MULTIPART = {"CREATE_MPU", "UPLOAD_PART", "COMPLETE_MPU"}  # the jobs whose data files go up in parts


# --- plumbing -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(s3_server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"]) as p:
        yield p


@pytest.fixture(scope="module")
def direct(s3_server):
    """A boto3 client straight to moto, for the checks: never through the proxy."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])


def _bucket(direct, versioned: bool = False) -> str:
    name = "chaos-" + os.urandom(5).hex()
    direct.create_bucket(Bucket=name)
    if versioned:
        direct.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def _keys(direct, bucket: str, prefix: str = "") -> list[str]:
    out: list[str] = []
    for page in direct.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def _uploads(direct, bucket: str) -> list[str]:
    return [u["Key"] for u in direct.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def _get(direct, bucket: str, key: str, version: str | None = None) -> bytes:
    kw = {"VersionId": version} if version else {}
    return direct.get_object(Bucket=bucket, Key=key, **kw)["Body"].read()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _report(title: str, proxy: FaultProxy, seconds: float) -> None:
    print(f"\n{title}: {seconds:.1f} s, {sum(proxy.counts().values())} faults in "
          f"{sum(proxy.requests().values())} requests\n{proxy.report()}")


# --- AtomicUpload against a failing store (default suite) ---------------------------------------


def _pieces(data: bytes, piece: int = MiB):
    return lambda f: [f.write(data[i:i + piece]) for i in range(0, len(data), piece)]


def test_a_failed_multipart_completion_leaves_no_upload_and_no_object(proxy, direct):
    bucket = _bucket(direct)
    data = os.urandom(BIG)
    with through(proxy, FaultPolicy({"COMPLETE_MPU": Rule(1.0, ("error_500",))})):
        fs, root = output_fs(f"s3://{bucket}/out", STORAGE)
        with pytest.raises(ShardWriteError, match=rf"writing s3://{bucket}/out/part\.bin failed: .*internal error"):
            write_atomically(fs, f"{root}/.latentcache/tmp", f"{root}/part.bin", _pieces(data))
        counts, seen = proxy.counts(), proxy.requests()
    assert set(counts) == {("COMPLETE_MPU", "error_500")} and counts[("COMPLETE_MPU", "error_500")] >= 2
    assert seen["UPLOAD_PART"] == 2 and seen["ABORT_MPU"] >= 1  # the upload went up, then was aborted
    assert _uploads(direct, bucket) == [] and _keys(direct, bucket) == []


def test_an_upload_the_store_created_for_a_lost_answer_is_aborted(proxy, direct):
    """The store creates the multipart upload but the answer is lost: the client retries and gets
    a second one, completes it, and the first must not be left behind (it is billed, and unseen)."""
    bucket = _bucket(direct)
    data = os.urandom(BIG)
    with through(proxy, FaultPolicy({"CREATE_MPU": Rule(1.0, ("reset_after",), limit=1)})):
        fs, root = output_fs(f"s3://{bucket}/out", STORAGE)
        size, sha = write_atomically(fs, f"{root}/.latentcache/tmp", f"{root}/part.bin", _pieces(data))
        counts, seen = proxy.counts(), proxy.requests()
    assert counts == {("CREATE_MPU", "reset_after"): 1} and seen["CREATE_MPU"] == 2
    assert (size, sha) == (len(data), _sha(data)) and _get(direct, bucket, "out/part.bin") == data
    assert _uploads(direct, bucket) == [] and _keys(direct, bucket) == ["out/part.bin"]


@pytest.mark.parametrize("size, kind, target, landed", [
    (300_000, "PUT", None, 150_000),
    (BIG, "UPLOAD_PART", r"partNumber=2&", 5 * MiB + (BIG - 5 * MiB) // 2),  # parts of 5 MiB and 0.5 MiB
])
def test_a_store_that_loses_bytes_never_gets_them_published(proxy, direct, size, kind, target, landed):
    """The store keeps half of a body and answers 200 (moto does not check the checksum it is
    sent): the size check before the move refuses the temp object, and removes it. For a
    multipart upload, the last part (a short first part is refused at completion: too small)."""
    bucket = _bucket(direct)
    data = os.urandom(size)
    with through(proxy, FaultPolicy({kind: Rule(1.0, ("short_body",), path=target, limit=1)})):
        fs, root = output_fs(f"s3://{bucket}/out", STORAGE)
        with pytest.raises(ShardWriteError, match=r"temp file s3://.*/out/\.latentcache/tmp/part\.[0-9a-f]{16}\.bin "
                                                  rf"has {landed} bytes; expected the {size} bytes written"):
            write_atomically(fs, f"{root}/.latentcache/tmp", f"{root}/part.bin", _pieces(data))
        assert proxy.counts() == {(kind, "short_body"): 1}
    assert _uploads(direct, bucket) == [] and _keys(direct, bucket) == []


def test_an_abort_that_fails_leaves_no_upload_and_nothing_completes_later(proxy, direct):
    """Aborting fails every one of the client's attempts: the stray-upload pass aborts it after,
    and the dropped s3fs file does not complete its upload when it is garbage-collected."""
    bucket = _bucket(direct)
    data = os.urandom(BIG)
    with through(proxy, FaultPolicy({"ABORT_MPU": Rule(1.0, ("error_500",), limit=5)})):
        fs, root = output_fs(f"s3://{bucket}/out", STORAGE)
        upload = AtomicUpload(fs, f"{root}/.latentcache/tmp", f"{root}/part.bin")
        upload.write(data)  # a part goes up: the upload is multipart
        upload.write(b"the rest, still in the buffer")
        raw = upload._raw
        upload.abort()
        raw.close()  # what the s3fs file's __del__ does, whenever the garbage collector gets to it
        counts, seen = proxy.counts(), proxy.requests()
    assert seen.get("COMPLETE_MPU", 0) == 0 and _keys(direct, bucket) == []  # not even by the garbage collector
    assert counts == {("ABORT_MPU", "error_500"): 5} and seen["ABORT_MPU"] == 6
    assert _uploads(direct, bucket) == []


def test_a_lost_answer_to_the_lock_create_is_not_another_driver(proxy, direct):
    """The conditional PUT that creates the lock lands, its answer is lost, and the client's retry
    gets 412: the lock the driver then reads is its own."""
    from pipeline.core.lock import read_lock

    bucket = _bucket(direct)
    with through(proxy, FaultPolicy({"PUT": Rule(1.0, ("reset_after",), path=r"/lock\.json$", limit=1)})):
        fs, root = output_fs(f"s3://{bucket}/out")
        lock = JobLock(fs, root, command="encode")
        lock.acquire()
        assert proxy.counts() == {("PUT", "reset_after"): 1}
        assert read_lock(fs, root)["owner"] == lock.owner
        lock.release()
    assert _keys(direct, bucket, "out/") == []


# --- jobs against a failing store (chaos) -------------------------------------------------------

# Three input shards; the last carries a passthrough member over s3fs's block size, so its data
# files (latents, decoded tar) go up as multipart uploads. A few images are broken: recorded errors.
SHARDS = {
    "train-000000": {"prefix": "a", "n": 4, "bad": 1},
    "train-000001": {"prefix": "b", "n": 4},
    "train-000002": {"prefix": "c", "n": 3, "big": True},
}


def _samples(prefix: str, n: int, bad: int = 0, big: bool = False) -> list[dict]:
    photos = imagedata.real_photos(max_side=96)
    out = []
    for i in range(n):
        sample = {"__key__": f"{prefix}/{i}", "txt": f"caption {prefix} {i}",
                  "jpg": b"not a jpeg" if i < bad else imagedata.encode(photos[i % len(photos)][1], "JPEG")}
        if big:
            sample["bin"] = np.random.default_rng(i).bytes(BIG if i == 0 else 64)
        out.append(sample)
    return out


def _encode_cfg(bucket: str, out: str, **kw) -> EncodeConfig:
    base = dict(input=(f"s3://{bucket}/data/train-{{000000..000002}}.tar",), output=out,
                vae=VAEConfig(source="random:tiny", dtype="float32"), preprocess=PreprocessConfig(resolution=64),
                latent_dtype="float32", passthrough=("txt", "bin"), batch_size=4, actors=1, decode_threads=2,
                max_error_rate=1.0, retry=RETRY, storage_options=STORAGE)
    base.update(kw)
    return EncodeConfig(**base)


def _configs(bucket: str, prefix: str, latents: str = "ref/latents") -> dict:
    """The three jobs, writing under `prefix`; decode and audit read the reference latents."""
    return {
        "encode": _encode_cfg(bucket, f"s3://{bucket}/{prefix}/latents"),
        "decode": DecodeConfig(input=(f"s3://{bucket}/{latents}",), output=f"s3://{bucket}/{prefix}/decoded",
                               batch_size=4, actors=1, decode_threads=2, max_error_rate=1.0, retry=RETRY,
                               storage_options=STORAGE),
        "audit": AuditConfig(input=(f"s3://{bucket}/{latents}",), output=f"s3://{bucket}/{prefix}/audit",
                             batch_size=4, actors=1, decode_threads=2, retry=RETRY, worst=2,
                             storage_options=STORAGE),
    }


@pytest.fixture(scope="module")
def dataset(ray_cluster, s3_server, direct) -> dict:
    """A versioned bucket with the input shards and each job's undisturbed output under ref/."""
    bucket = _bucket(direct, versioned=True)
    keys: set[str] = set()
    bad: set[str] = set()
    for name, spec in SHARDS.items():
        samples = _samples(**spec)
        imagedata.write_tar_shard(f"s3://{bucket}/data/{name}.tar", samples)
        keys |= {x["__key__"] for x in samples}
        bad |= {x["__key__"] for x in samples[: spec.get("bad", 0)]}
    times = {}
    for kind, cfg in _configs(bucket, "ref").items():
        t0 = time.monotonic()
        run(cfg, progress=False)
        times[kind] = time.monotonic() - t0
    return {"bucket": bucket, "keys": keys, "bad": bad, "times": times}


def _records(direct, bucket: str, out: str) -> dict[str, dict]:
    prefix = f"{out}/{CURRENT.records}/"
    return {k[len(prefix):-len(".json")]: json.loads(_get(direct, bucket, k)) for k in _keys(direct, bucket, prefix)}


def _versions(direct, bucket: str, prefix: str) -> dict[str, list[str]]:
    """Every version ever written under each key below `prefix` (the bucket is versioned)."""
    out: dict[str, list[str]] = {}
    for page in direct.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            out.setdefault(v["Key"], []).append(v["VersionId"])
    return out


def _check_output(direct, bucket: str, out: str, ref: str | None, job_files: tuple[str, ...] = ()) -> dict[str, dict]:
    """The output folder `out` is finished and whole: every record's data file matches its sha256,
    every version ever written under a data file's name too (nothing truncated was ever published),
    nothing is left in tmp/, no multipart upload anywhere; and, given `ref`, each data file is the
    reference's byte for byte. `job_files`: outputs of the whole job, not of a shard (the audit's
    metrics.parquet), checked by the caller. Returns the records by shard name."""
    records = _records(direct, bucket, out)
    assert records, f"no records under {out}"
    assert f"{out}/{CURRENT.success}" in _keys(direct, bucket, out)
    assert _keys(direct, bucket, f"{out}/{CURRENT.tmp}/") == []
    assert _uploads(direct, bucket) == []
    by_file = {f"{out}/{r['data_file']}": r for r in records.values()}
    versions = {k: v for k, v in _versions(direct, bucket, f"{out}/").items()
                if re.search(DATA_FILE, k) and "/.latentcache/" not in k and k[len(out) + 1:] not in job_files}
    assert set(versions) == set(by_file), "a data file without a record, or a record without its data file"
    for key, record in by_file.items():
        data = _get(direct, bucket, key)
        assert (len(data), _sha(data)) == (record["bytes"], record["sha256"]), key
        for version in versions[key]:
            assert _sha(_get(direct, bucket, key, version)) == record["sha256"], f"{key} version {version}"
        if ref is not None:
            assert _sha(_get(direct, bucket, key.replace(out, ref, 1))) == record["sha256"], f"{key} differs from {ref}"
    return records


def _check_encode(direct, data: dict, out: str) -> None:
    bucket = data["bucket"]
    records = _check_output(direct, bucket, out, "ref/latents")
    url = f"s3://{bucket}/{out}"
    written = [k for k, _, _ in read_latents(url)]
    errors = [e["key"] for r in records.values() for e in r["errors"]]
    assert len(written) == len(set(written)) and len(errors) == len(set(errors))
    assert set(written) | set(errors) == data["keys"] and not set(written) & set(errors)
    assert set(errors) == data["bad"]
    table = pd.read_parquet(io.BytesIO(_get(direct, bucket, f"{out}/{CURRENT.errors}")))
    assert sorted(table.key) == sorted(errors)
    ref = {k: v for k, v, _ in read_latents(f"s3://{bucket}/ref/latents")}
    assert all(np.array_equal(v, ref[k]) for k, v, _ in read_latents(url))


def _check_decode(direct, data: dict, out: str) -> None:
    import tarfile

    records = _check_output(direct, data["bucket"], out, "ref/decoded")
    keys = []
    for r in records.values():
        with tarfile.open(fileobj=io.BytesIO(_get(direct, data["bucket"], f"{out}/{r['data_file']}"))) as tar:
            keys += [n[: -len(".png")] for n in tar.getnames() if n.endswith(".png")]
    assert len(keys) == len(set(keys)) and set(keys) == data["keys"] - data["bad"]


def _check_audit(direct, data: dict, out: str) -> None:
    bucket = data["bucket"]
    _check_output(direct, bucket, out, "ref/audit", job_files=("metrics.parquet",))
    ref = pd.read_parquet(io.BytesIO(_get(direct, bucket, "ref/audit/metrics.parquet")))
    for version in _versions(direct, bucket, f"{out}/metrics.parquet")[f"{out}/metrics.parquet"]:
        pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(_get(direct, bucket, f"{out}/metrics.parquet",
                                                                      version))), ref)
    got = pd.read_parquet(io.BytesIO(_get(direct, bucket, f"{out}/metrics.parquet")))
    assert set(got.key) == data["keys"] - data["bad"]
    summary = json.loads(_get(direct, bucket, f"{out}/summary.json"))
    expected = json.loads(_get(direct, bucket, "ref/audit/summary.json"))
    for section in ("quality", "completeness", "latents"):
        assert summary[section] == expected[section], section


_CHECKS = {"encode": _check_encode, "decode": _check_decode, "audit": _check_audit}


@pytest.mark.chaos
@pytest.mark.ray
@pytest.mark.parametrize("kind", ["encode", "decode", "audit"])
def test_every_job_completes_at_ten_percent_faults_with_the_undisturbed_output(proxy, direct, dataset, kind):
    bucket = dataset["bucket"]
    cfg = _configs(bucket, f"ten-{kind}")[kind]
    with through(proxy, TEN_PERCENT):
        t0 = time.monotonic()
        summary = run(cfg, progress=False)
        seconds = time.monotonic() - t0
        counts, seen = proxy.counts(), proxy.requests()
        _report(f"{kind} at 10 % faults (undisturbed: {dataset['times'][kind]:.1f} s)", proxy, seconds)
        assert proxy.internal_errors == 0 and proxy.upstream_errors == 0
    assert summary.total_shards == summary.processed_shards == 3
    # The faults were real and spread: about a tenth of the requests, over every kind, most faults.
    assert 0.05 < sum(counts.values()) / sum(seen.values()) < 0.15
    expected = _FAULTED_KINDS | (_MULTIPART if kind != "audit" else set())
    assert expected <= {k for k, _ in counts}, f"kinds without a fault: {expected - {k for k, _ in counts}}"
    assert len({f for _, f in counts}) >= 6
    _CHECKS[kind](direct, dataset, f"ten-{kind}/" + {"encode": "latents", "decode": "decoded", "audit": "audit"}[kind])


def test_a_failing_listing_stops_an_encode_job_before_anything_starts(proxy, direct):
    """The light one, in the default suite: the input listing fails on every try."""
    bucket = _bucket(direct)
    for name, spec in list(SHARDS.items())[2:]:
        imagedata.write_tar_shard(f"s3://{bucket}/data/{name}.tar", _samples(**spec))
    imagedata.write_tar_shard(f"s3://{bucket}/data/train-000003.tar", _samples("d", 2))
    cfg = _encode_cfg(bucket, f"s3://{bucket}/out", input=(f"s3://{bucket}/data/train-{{000002..000003}}.tar",))
    with through(proxy, FaultPolicy({"LIST": Rule(1.0, ("error_500", "error_503"))})):
        t0 = time.monotonic()
        with pytest.raises(ShardListingError, match=rf"input 's3://{bucket}/data/train-\{{000002..000003\}}.tar': "
                                                    rf"listing 's3://{bucket}/data' failed: OSError: "):
            run(cfg, progress=False)
        seconds = time.monotonic() - t0
        _report("encode with every LIST failing", proxy, seconds)
        assert set(proxy.requests()) == {"LIST"}  # it stopped at the listing: no actor, no write
    assert seconds < 60 and _keys(direct, bucket, "out/") == []


@pytest.mark.chaos
@pytest.mark.ray
@pytest.mark.parametrize("kind", ["decode", "audit"])
def test_a_failing_listing_stops_decode_and_audit_with_an_error_naming_it(proxy, direct, dataset, kind):
    bucket = dataset["bucket"]
    cfg = _configs(bucket, f"nolist-{kind}")[kind]
    with through(proxy, FaultPolicy({"LIST": Rule(1.0, ("error_500", "error_503"))})):
        t0 = time.monotonic()
        # Planning lists the latents' records; the ledger retries a failed listing, then names it.
        with pytest.raises(LedgerError, match=rf"listing s3://{bucket}/ref/latents/\.latentcache/records failed "
                                              rf"{READ_ATTEMPTS} times; last: OSError: .*(internal error|unable to "
                                              "handle request)") as caught:
            run(cfg, progress=False)
        seconds = time.monotonic() - t0
        _report(f"{kind} with every LIST failing", proxy, seconds)
        print(f"{type(caught.value).__name__}: {caught.value}")
        assert set(proxy.requests()) <= {"LIST", "GET", "HEAD"}  # it stopped while planning: nothing written
    assert seconds < 120 and _keys(direct, bucket, f"nolist-{kind}/") == []


@pytest.mark.chaos
@pytest.mark.ray
@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_lost_bytes_and_failed_completions_never_publish_a_truncated_data_file(proxy, direct, dataset, kind):
    """Every data file's first upload loses half its bytes (one PUT, one part), and one multipart
    completion fails all the client's attempts: the shards are redone, and no version of any data
    file in the (versioned) bucket is anything but the recorded, whole file."""
    bucket = dataset["bucket"]
    cfg = _configs(bucket, f"short-{kind}")[kind]
    # The last part: a short first part the store itself refuses at completion (too small).
    policy = FaultPolicy({"PUT": Rule(1.0, ("short_body",), path=DATA_FILE, limit=1),
                          "UPLOAD_PART": Rule(1.0, ("short_body",), path=r"\.(parquet|tar)\?partNumber=2&", limit=1),
                          "COMPLETE_MPU": Rule(1.0, ("error_500",), limit=5)})
    with through(proxy, policy):
        t0 = time.monotonic()
        summary = run(cfg, progress=False)
        _report(f"{kind} with lost bytes and failed completions", proxy, time.monotonic() - t0)
        counts = proxy.counts()
    assert counts == {("PUT", "short_body"): 1, ("UPLOAD_PART", "short_body"): 1, ("COMPLETE_MPU", "error_500"): 5}
    out = f"short-{kind}/" + {"encode": "latents", "decode": "decoded"}[kind]
    _CHECKS[kind](direct, dataset, out)
    records = _records(direct, bucket, out)
    # Three uploads failed (two short, one not completed): at least two shards were redone.
    assert summary.processed_shards == 3 and sum(r["attempt"] > 1 for r in records.values()) >= 2
