"""Read WebDataset shards from local disk and a moto S3 server: keys, members, order, and damage."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import boto3
import pytest

from pipeline.io.tar_reader import ShardReadError, iter_shard
from pipeline.samples import SampleError
from tests.imagedata import (
    encode,
    real_photos,
    sample_members,
    tar_bytes,
    write_bytes,
    write_tar_members,
    write_tar_shard,
    write_truncated_tar,
)


def make_samples(n: int, prefix: str = "") -> list[dict]:
    photos = real_photos(max_side=48)
    return [{"__key__": f"{prefix}{i:06d}", "jpg": encode(photos[i % len(photos)][1], "JPEG", quality=80),
             "txt": f"caption {i}".encode(), "json": json.dumps({"i": i}).encode()} for i in range(n)]


def expected(samples: list[dict], url: str) -> list[dict]:
    return [{**s, "__url__": url} for s in samples]


def read_all(url: str, **kw) -> list:
    return list(iter_shard(url, **kw))


def member_offsets(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


# --- round trips ---------------------------------------------------------------------------------


def test_local_round_trip_keeps_keys_members_and_order(tmp_path: Path) -> None:
    samples = make_samples(5, prefix="a/b/")
    url = write_tar_shard(str(tmp_path / "train-000000.tar"), samples)
    got = read_all(url)
    assert got == expected(samples, url)
    assert [s["__key__"] for s in got] == [f"a/b/{i:06d}" for i in range(5)]


def test_extensions_are_lower_cased_and_multi_dot_extensions_kept(tmp_path: Path) -> None:
    members = [("x/000001.JPG", b"J"), ("x/000001.Seg.PNG", b"S"), ("x/000001.txt", b"T"),
               ("__meta__", b"skipped"), ("README", b"no extension"), ("x/000002.jpg", b"J2")]
    url = write_tar_members(str(tmp_path / "s.tar"), members)
    assert read_all(url) == [
        {"__key__": "x/000001", "__url__": url, "jpg": b"J", "seg.png": b"S", "txt": b"T"},
        {"__key__": "x/000002", "__url__": url, "jpg": b"J2"},
    ]


@pytest.mark.s3
def test_s3_round_trip(s3_bucket: str) -> None:
    samples = make_samples(4, prefix="shard/")
    url = write_tar_shard(f"s3://{s3_bucket}/data/train-000003.tar", samples)
    assert read_all(url) == expected(samples, url)


# --- damaged tars: samples before the damage, then one SampleError -------------------------------


def only_errors(items: list) -> list[SampleError]:
    return [x for x in items if isinstance(x, SampleError)]


def test_truncated_inside_a_member_yields_earlier_samples_then_one_error(tmp_path: Path) -> None:
    samples = make_samples(5)
    url = write_truncated_tar(str(tmp_path / "t-000007.tar"), samples, cut_sample=3)
    got = read_all(url)
    assert got[:-1] == expected(samples[:3], url)
    err = got[-1]
    assert isinstance(err, SampleError) and len(only_errors(got)) == 1
    assert (err.key, err.shard, err.stage) == ("000003", url, "read")
    assert err.reason.startswith("truncated or corrupt tar after 3 samples:")
    assert "unexpected end of data" in err.reason


def test_truncated_in_the_first_member_of_a_sample_keeps_the_sample_before(tmp_path: Path) -> None:
    samples = make_samples(3)
    data = tar_bytes(sample_members(samples))
    first_of_last = member_offsets(data)[6]  # 2.jpg
    url = write_bytes(str(tmp_path / "t.tar"), data[: first_of_last.offset_data + 10])
    got = read_all(url)
    assert got[:-1] == expected(samples[:2], url)  # sample 1 is whole: the next key had begun
    assert got[-1].key == "000002" and "after 2 samples" in got[-1].reason


def test_tar_without_end_marker_is_reported(tmp_path: Path) -> None:
    # webdataset (through tarfile) would read this as a complete shard of 3 samples.
    samples = make_samples(3)
    data = tar_bytes(sample_members(samples))
    last = member_offsets(data)[-1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    url = write_bytes(str(tmp_path / "t.tar"), data[:end])
    got = read_all(url)
    # The last sample may be missing members, so it is the error, not a sample.
    assert got[:-1] == expected(samples[:2], url)
    assert got[-1].key == "000002" and "no end-of-archive marker" in got[-1].reason


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_damaged_header_is_reported_not_taken_as_the_end(tmp_path: Path, damage: str) -> None:
    samples = make_samples(4)
    data = tar_bytes(sample_members(samples))
    header_at = member_offsets(data)[6].offset  # the header of 2.jpg
    if damage == "cut":
        data = data[: header_at + 100]
    else:
        data = data[:header_at] + b"\x17" * 512 + data[header_at + 512:]
    url = write_bytes(str(tmp_path / "t.tar"), data)
    got = read_all(url)
    assert got[:-1] == expected(samples[:1], url)
    err = got[-1]
    assert isinstance(err, SampleError) and err.key == "000001"  # the sample that may be incomplete
    reasons = ["truncated header"] if damage == "cut" else ["invalid header", "bad checksum"]
    assert any(r in err.reason for r in reasons), err.reason
    assert f"at byte {header_at}" in err.reason


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive" * 40])
def test_empty_or_non_tar_object_is_one_error(tmp_path: Path, content: bytes) -> None:
    url = write_bytes(str(tmp_path / "shard-000009.tar"), content)
    got = read_all(url)
    assert len(got) == 1 and isinstance(got[0], SampleError)
    assert got[0].key == "shard-000009:<truncated>" and got[0].stage == "read"
    assert "after 0 samples" in got[0].reason


# --- duplicates ----------------------------------------------------------------------------------


def test_duplicate_member_in_a_sample_is_an_error_for_that_sample(tmp_path: Path) -> None:
    members = [("000.jpg", b"a"), ("000.txt", b"a"),
               ("001.jpg", b"b"), ("001.txt", b"b1"), ("001.txt", b"b2"),
               ("002.JPG", b"c1"), ("002.jpg", b"c2"),
               ("003.jpg", b"d")]
    url = write_tar_members(str(tmp_path / "d.tar"), members)
    got = read_all(url)
    assert got[0] == {"__key__": "000", "__url__": url, "jpg": b"a", "txt": b"a"}
    assert isinstance(got[1], SampleError) and got[1].key == "001" and "'001.txt'" in got[1].reason
    assert isinstance(got[2], SampleError) and got[2].key == "002" and "'jpg'" in got[2].reason
    assert got[3] == {"__key__": "003", "__url__": url, "jpg": b"d"}
    assert len(got) == 4


def test_key_repeated_after_other_samples_is_an_error_for_the_repeat(tmp_path: Path) -> None:
    members = [("k0.jpg", b"first"), ("k1.jpg", b"b"), ("k0.txt", b"late")]
    url = write_tar_members(str(tmp_path / "r.tar"), members)
    got = read_all(url)
    assert got[0] == {"__key__": "k0", "__url__": url, "jpg": b"first"}
    assert got[1] == {"__key__": "k1", "__url__": url, "jpg": b"b"}
    assert isinstance(got[2], SampleError) and got[2].key == "k0" and "adjacent" in got[2].reason


# --- failures a retry may fix --------------------------------------------------------------------


def test_missing_local_file_raises_shard_read_error(tmp_path: Path) -> None:
    url = str(tmp_path / "nope-000001.tar")
    with pytest.raises(ShardReadError, match="nope-000001.tar") as info:
        read_all(url)
    assert info.value.url == url and isinstance(info.value.cause, FileNotFoundError)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_shard_read_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(ShardReadError("s3://b/x.tar", FileNotFoundError("gone"))))
    assert err.url == "s3://b/x.tar" and isinstance(err.cause, FileNotFoundError) and "gone" in str(err)


@pytest.mark.s3
def test_missing_s3_object_and_bucket_raise_shard_read_error(s3_bucket: str) -> None:
    for url in (f"s3://{s3_bucket}/missing-000001.tar", "s3://no-such-bucket-for-latentcache/x.tar"):
        with pytest.raises(ShardReadError) as info:
            read_all(url)
        assert url in str(info.value) and isinstance(info.value.cause, FileNotFoundError)


@pytest.mark.s3
def test_object_vanishing_mid_read_raises_shard_read_error(s3_server: dict, s3_bucket: str) -> None:
    samples = [{"__key__": f"{i:04d}", "bin": bytes([i]) * 40_000} for i in range(12)]
    url = write_tar_shard(f"s3://{s3_bucket}/v.tar", samples)
    # Small read blocks so that the tar is fetched piece by piece while it is read.
    it = iter_shard(url, storage_options={"default_block_size": 64 * 1024})
    first = next(it)
    assert first["__key__"] == "0000"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).delete_object(Bucket=s3_bucket, Key="v.tar")
    with pytest.raises(ShardReadError) as info:
        list(it)
    assert url in str(info.value)


def test_link_members_are_recorded_not_dropped(tmp_path: Path) -> None:
    """A sample whose members are symlinks or hardlinks is neither read through the link nor lost:
    it comes out as one SampleError naming the link (issue 8, defect 6)."""
    photo = encode(real_photos(max_side=32)[0][1], "JPEG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def regular(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        def link(name: str, target: str, kind: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)

        regular("ok.jpg", photo)
        link("sym.jpg", "ok.jpg", tarfile.SYMTYPE)
        link("hard.jpg", "ok.jpg", tarfile.LNKTYPE)
        regular("half.jpg", photo)
        link("half.txt", "/etc/passwd", tarfile.SYMTYPE)
        regular("after.jpg", photo)
    url = write_bytes(str(tmp_path / "links.tar"), buf.getvalue())
    got = read_all(url)
    samples = {s["__key__"]: s for s in got if not isinstance(s, SampleError)}
    errors = {e.key: e for e in got if isinstance(e, SampleError)}
    assert set(samples) == {"ok", "after"} and set(errors) == {"sym", "hard", "half"}
    assert len(got) == 5
    assert "symbolic link" in errors["sym"].reason and "'sym.jpg'" in errors["sym"].reason
    assert "hard link" in errors["hard"].reason
    assert "'half.txt'" in errors["half"].reason and all(e.stage == "read" for e in errors.values())
