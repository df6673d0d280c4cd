"""The WebDataset tar writer: keys that make paths are refused, what it writes webdataset reads
back member for member, a retry writes the same bytes, and an aborted shard leaves nothing."""

from __future__ import annotations

import pytest
import webdataset as wds

from pipeline.core.sink import InvalidRecordError
from pipeline.io.tar_writer import TarSample, TarShardWriter, check_member_key


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../b", "a/./b", "a//b", "a/", "x.y", "dir/x.y", "a\\b",
                                 "tab\there", "nul\x00", ""])
def test_keys_that_make_paths_or_split_wrongly_are_refused(key):
    with pytest.raises(InvalidRecordError, match="cannot name tar members"):
        check_member_key(key)


@pytest.mark.parametrize("key", ["000123", "part/000123", "a.b/c", "日本/写真-1", "with space"])
def test_plain_keys_are_fine(key):
    check_member_key(key)


def test_round_trip_through_webdataset_and_refusals_leave_the_shard_intact(tmp_path):
    w = TarShardWriter(str(tmp_path), "shard")
    w.add(TarSample("part/0", {"png": b"\x89PNG", "txt": "ein Bild 🐈".encode(), "latentcache.json": b"{}"}))
    for bad in (TarSample("../escape", {"png": b"x"}), TarSample("part/0", {"png": b"dup"}),
                TarSample("ok", {"png": "not bytes"}), TarSample("ok", {"a/b": b"x"})):
        with pytest.raises(InvalidRecordError):
            w.add(bad)
    w.add(TarSample("part/1", {"png": b"second"}))
    stats = w.commit()
    assert stats.samples == 2
    got = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "shard.tar"), shardshuffle=False, empty_check=False)}
    assert set(got) == {"part/0", "part/1"}
    assert got["part/0"]["txt"].decode() == "ein Bild 🐈" and got["part/0"]["latentcache.json"] == b"{}"
    assert got["part/1"]["png"] == b"second"


def test_a_retry_writes_the_same_bytes_and_abort_leaves_nothing(tmp_path):
    shas = []
    for _ in range(2):
        with TarShardWriter(str(tmp_path), "s") as w:
            w.add(TarSample("k", {"png": b"data"}))
            shas.append(w.commit().sha256)
    assert shas[0] == shas[1]
    with pytest.raises(RuntimeError, match="boom"):
        with TarShardWriter(str(tmp_path / "other"), "s") as w:
            w.add(TarSample("k", {"png": b"data"}))
            raise RuntimeError("boom")
    assert not [p for p in (tmp_path / "other").rglob("*") if p.is_file()]
