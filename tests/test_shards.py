"""Expand brace patterns, globs and folders into shard URLs, on local disk and a moto S3 server."""

from __future__ import annotations

import pickle
from pathlib import Path

import boto3
import pytest

from pipeline.io.shards import (
    DuplicateShardNameError,
    ShardListingError,
    check_unique_names,
    expand_inputs,
    shard_name,
)


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"tar")


# --- local ---------------------------------------------------------------------------------------


def test_braces_expand_in_order_to_absolute_paths(tmp_path: Path) -> None:
    touch(tmp_path, *(f"train-{i:06d}.tar" for i in range(4)))
    got = expand_inputs([f"{tmp_path}/train-{{000002..000000}}.tar", f"{tmp_path}/train-000003.tar"])
    assert got == [f"{tmp_path}/train-{i:06d}.tar" for i in (2, 1, 0, 3)]


def test_missing_brace_shard_is_named(tmp_path: Path) -> None:
    touch(tmp_path, "train-000000.tar", "train-000002.tar")
    with pytest.raises(ShardListingError) as info:
        expand_inputs([f"{tmp_path}/train-{{000000..000002}}.tar"])
    msg = str(info.value)
    assert "1 of 3" in msg and f"{tmp_path}/train-000001.tar" in msg and "train-000000" not in msg.split("exist")[1]


def test_single_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardListingError, match="nothere.tar"):
        expand_inputs([str(tmp_path / "nothere.tar")])


def test_glob_is_sorted_and_keeps_only_tar_files(tmp_path: Path) -> None:
    touch(tmp_path, "b.tar", "a.tar", "c.txt", "d.tar.idx", "sub/e.tar")
    assert expand_inputs([f"{tmp_path}/*.tar"]) == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]
    assert expand_inputs([f"{tmp_path}/*"]) == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]
    assert expand_inputs([f"{tmp_path}/**/*.tar"]) == [f"{tmp_path}/{n}" for n in ("a.tar", "b.tar", "sub/e.tar")]


def test_folder_means_every_tar_beneath_it(tmp_path: Path) -> None:
    touch(tmp_path, "z/b.tar", "z/a.tar", "z/deep/er/c.tar", "z/notes.md", "other.tar")
    assert expand_inputs([str(tmp_path / "z")]) == [f"{tmp_path}/z/{n}" for n in ("a.tar", "b.tar", "deep/er/c.tar")]
    assert expand_inputs([f"{tmp_path}/z/"]) == expand_inputs([str(tmp_path / "z")])


def test_duplicates_removed_keeping_first_position(tmp_path: Path) -> None:
    touch(tmp_path, "a.tar", "b.tar", "c.tar")
    got = expand_inputs([f"{tmp_path}/b.tar", f"{tmp_path}/*.tar", f"{tmp_path}/{{a,b}}.tar"])
    assert got == [f"{tmp_path}/{n}" for n in ("b.tar", "a.tar", "c.tar")]


def test_relative_paths_become_absolute_and_file_urls_keep_their_protocol(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "data/a.tar")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["data/*.tar"]) == [f"{tmp_path}/data/a.tar"]
    assert expand_inputs(["data"]) == [f"{tmp_path}/data/a.tar"]
    assert expand_inputs([f"file://{tmp_path}/data/a.tar"]) == [f"file://{tmp_path}/data/a.tar"]


def test_a_lone_string_is_one_pattern(tmp_path: Path) -> None:
    touch(tmp_path, "a.tar")
    assert expand_inputs(str(tmp_path / "a.tar")) == [str(tmp_path / "a.tar")]


@pytest.mark.parametrize("pattern", ["empty/*.tar", "empty", "nofolder/*.tar"])
def test_matching_nothing_is_an_error(tmp_path: Path, pattern: str) -> None:
    touch(tmp_path, "empty/readme.txt")
    with pytest.raises(ShardListingError, match="matched no .tar shards"):
        expand_inputs([f"{tmp_path}/{pattern}"])


def test_empty_inputs_and_unknown_protocol_are_errors() -> None:
    with pytest.raises(ShardListingError, match="no input patterns"):
        expand_inputs([])
    with pytest.raises(ShardListingError, match="empty pattern"):
        expand_inputs([""])
    with pytest.raises(ShardListingError, match="nosuchproto://b/x.tar") as info:
        expand_inputs(["nosuchproto://b/x.tar"])
    assert info.value.__cause__ is not None  # the filesystem's own error is chained


def test_shard_listing_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(ShardListingError("s3://b/*.tar", "matched no .tar shards")))
    assert err.pattern == "s3://b/*.tar" and str(err) == "input 's3://b/*.tar': matched no .tar shards"


# --- S3 ------------------------------------------------------------------------------------------


def put(bucket: str, *keys: str) -> None:
    client = boto3.client("s3")
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"tar")


@pytest.mark.s3
def test_s3_braces_globs_and_folders(s3_bucket: str) -> None:
    b = s3_bucket
    put(b, "train/train-000001.tar", "train/train-000000.tar", "train/train-000002.tar", "train/notes.txt",
        "train/deep/x.tar", "top.tar")
    assert expand_inputs([f"s3://{b}/train/train-{{000000..000001}}.tar"]) == \
        [f"s3://{b}/train/train-000000.tar", f"s3://{b}/train/train-000001.tar"]
    assert expand_inputs([f"s3://{b}/train/*.tar"]) == [f"s3://{b}/train/train-{i:06d}.tar" for i in range(3)]
    assert expand_inputs([f"s3://{b}/**/*.tar"]) == [
        f"s3://{b}/top.tar", f"s3://{b}/train/deep/x.tar", *(f"s3://{b}/train/train-{i:06d}.tar" for i in range(3))]
    assert expand_inputs([f"s3://{b}/train"]) == [
        f"s3://{b}/train/deep/x.tar", *(f"s3://{b}/train/train-{i:06d}.tar" for i in range(3))]
    assert expand_inputs([f"s3://{b}/top.tar", f"s3://{b}/train/{{train-000002,deep/x}}.tar"]) == \
        [f"s3://{b}/top.tar", f"s3://{b}/train/train-000002.tar", f"s3://{b}/train/deep/x.tar"]


@pytest.mark.s3
def test_s3_missing_shard_and_bucket(s3_bucket: str) -> None:
    put(s3_bucket, "d/a-0.tar")
    with pytest.raises(ShardListingError, match=f"s3://{s3_bucket}/d/a-1.tar"):
        expand_inputs([f"s3://{s3_bucket}/d/a-{{0..1}}.tar"])
    with pytest.raises(ShardListingError, match="matched no .tar shards"):
        expand_inputs([f"s3://{s3_bucket}/e/*.tar"])
    missing = "no-such-bucket-latentcache"
    for pattern in (f"s3://{missing}/*.tar", f"s3://{missing}/x.tar", f"s3://{missing}/x-{{0..1}}.tar",
                    f"s3://{missing}/folder"):
        with pytest.raises(ShardListingError) as info:
            expand_inputs([pattern])
        assert pattern in str(info.value) and f"'s3://{missing}' does not exist" in str(info.value)
    with pytest.raises(ShardListingError) as info:
        expand_inputs([f"s3://{missing}/*.tar"])
    assert isinstance(info.value.__cause__, FileNotFoundError)  # s3fs's own error, chained


@pytest.mark.s3
def test_s3_listing_is_not_stale(s3_bucket: str) -> None:
    put(s3_bucket, "s/a.tar")
    assert expand_inputs([f"s3://{s3_bucket}/s/*.tar"]) == [f"s3://{s3_bucket}/s/a.tar"]
    put(s3_bucket, "s/b.tar")  # behind s3fs's back: its listing cache still says one file
    assert expand_inputs([f"s3://{s3_bucket}/s/*.tar"]) == [f"s3://{s3_bucket}/s/a.tar", f"s3://{s3_bucket}/s/b.tar"]
    assert expand_inputs([f"s3://{s3_bucket}/s/{{a,b}}.tar"]) == [f"s3://{s3_bucket}/s/a.tar",
                                                                    f"s3://{s3_bucket}/s/b.tar"]


# --- names ---------------------------------------------------------------------------------------


def test_shard_name_is_the_basename_without_tar() -> None:
    assert shard_name("s3://bucket/x/train-000001.tar") == "train-000001"
    assert shard_name("/data/shards/part.0.tar") == "part.0"
    assert shard_name("gs://b/top.tar") == "top"
    with pytest.raises(ValueError, match="no file name"):
        shard_name("s3://b/.tar")


def test_check_unique_names() -> None:
    urls = ["s3://b/2023/part-0.tar", "s3://b/2023/part-1.tar"]
    assert check_unique_names(urls) == {"part-0": urls[0], "part-1": urls[1]}
    with pytest.raises(DuplicateShardNameError) as info:
        check_unique_names([*urls, "s3://b/2024/part-0.tar"])
    msg = str(info.value)
    assert "'part-0'" in msg and "s3://b/2023/part-0.tar" in msg and "s3://b/2024/part-0.tar" in msg
