"""Listing the data files of a large output: cut by name prefix into one-page listings asked for at
once (S3), with whatever the listing misses looked at again, and every check still applied."""

from __future__ import annotations

import json
import logging
import random
import string

import pytest

from pipeline.core import ledger as ledger_module
from pipeline.core.ledger import Ledger, ShardRecord, build_manifest
from pipeline.core.sink import ShardStats
from pipeline.core.storage import name_prefixes
from tests.faults.s3_proxy import FaultPolicy, FaultProxy, Rule, through
from tests.test_ledger import identity

# --- the cut ---------------------------------------------------------------------------------------


def _check_cut(names: list[str], per_prefix: int) -> tuple[list[str], list[str]]:
    prefixes, exact = name_prefixes(names, per_prefix=per_prefix)
    names = sorted(set(names))  # a name given twice is listed once
    assert prefixes == sorted(prefixes) and exact == sorted(exact)
    for p in prefixes:
        assert not any(q != p and q.startswith(p) for q in prefixes), f"{p!r} starts another prefix"
        assert sum(n.startswith(p) for n in names) <= per_prefix, f"{p!r} covers more than {per_prefix} names"
    for n in names:
        starts = [p for p in prefixes if n.startswith(p)]
        if n in exact:
            assert starts == [], f"{n!r} is looked up alone and also listed under {starts}"
            assert sum(m.startswith(n) for m in names) > per_prefix
        else:
            assert len(starts) == 1, f"{n!r} starts {starts}; expected exactly one prefix"
    return prefixes, exact


def test_numbered_shards_cut_at_the_depth_that_gives_one_page_each() -> None:
    names = [f"part-{i:06d}.parquet" for i in range(10_000)]
    prefixes, exact = _check_cut(names, 1000)
    assert prefixes == [f"part-00{d}" for d in range(10)] and exact == []
    # A job of 2,500: the last prefix holds the 500 left, and a job of one page lists once.
    assert _check_cut(names[:2500], 1000)[0] == ["part-000", "part-001", "part-002"]
    assert _check_cut(names[:1000], 1000) == (["part-000"], [])


@pytest.mark.parametrize("seed", range(40))
def test_any_names_are_covered_once(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = rng.choice(["ab", "abc", "0123456789", "aZ.-_9"])
    names = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 400))]
    _check_cut(names, rng.choice([1, 2, 5, 30, 1000]))


def test_a_name_that_starts_more_than_a_page_of_others_is_looked_up_alone() -> None:
    names = ["a"] + [f"a{i:02d}" for i in range(20)] + ["b"]
    prefixes, exact = _check_cut(names, 5)
    assert exact == ["a"] and "b" in prefixes


def test_the_last_code_point_splits_like_any_other_character() -> None:
    prefixes, exact = _check_cut(["a0", "a1", "a\U0010ffff", "a\U0010ffffz"], 1)
    assert prefixes == ["a0", "a1", "a\U0010ffffz"] and exact == ["a\U0010ffff"]


def test_the_cut_refuses_an_empty_page_and_takes_no_names() -> None:
    assert name_prefixes([]) == ([], [])
    with pytest.raises(ValueError, match="per_prefix is 0; expected at least 1"):
        name_prefixes(["a"], per_prefix=0)


# --- the ledger on S3, through a proxy that counts and breaks requests --------------------------

SHARDS = {f"part-{i:06d}": f"s3://in/part-{i:06d}.tar" for i in range(60)}
PAYLOAD = b"x" * 64


def _finished_output(url: str, shards: dict[str, str]) -> tuple[Ledger, dict]:
    """A finished output written through the ledger's API: data files, one compacted table, SUCCESS."""
    ledger = Ledger(url)
    manifest = build_manifest(kind="encode", identity=identity(), shards=shards, data_extension="parquet",
                              code_version="0.1.0")
    ledger.open_job(manifest, overwrite=False)
    ledger.fs.pipe({ledger._path(f"{name}.parquet"): PAYLOAD for name in shards})
    rows = {}
    for name, input_url in shards.items():
        stats = ShardStats(name=name, path=f"{url}/{name}.parquet", samples=3, bytes=len(PAYLOAD), sha256="0" * 64)
        record = ShardRecord.from_stats(stats, input_url=input_url, samples_read=3, errors=[],
                                        identity_hash=ledger.identity_hash, seconds=1.0)
        rows[name] = json.dumps(record.to_dict(), sort_keys=True)
    ledger._write_table(rows)
    ledger.write_success({})
    return ledger, manifest


@pytest.fixture()
def proxied(s3_server, s3_bucket):
    """s3fs in this process talks to moto through a FaultProxy; yields (proxy, output URL)."""
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"]) as proxy, through(proxy, FaultPolicy()):
        yield proxy, f"s3://{s3_bucket}/out"


def _lists_to_plan(proxy: FaultProxy, url: str, manifest: dict) -> tuple[int, list[ShardRecord] | None]:
    proxy.reset_counts()
    ledger = Ledger(url)
    records = ledger.finished(manifest)
    return proxy.requests().get("LIST", 0), records


@pytest.mark.s3
def test_planning_on_s3_lists_one_page_per_prefix_and_finds_every_shard(proxied, monkeypatch) -> None:
    proxy, url = proxied
    _, manifest = _finished_output(url, SHARDS)
    whole, records = _lists_to_plan(proxy, url, manifest)  # 60 names: one prefix, the whole folder
    assert records is not None and sorted(r.name for r in records) == sorted(SHARDS)

    monkeypatch.setattr(ledger_module, "LIST_PAGE", 10)  # part-00000 ... part-00005: six prefixes
    cut, records = _lists_to_plan(proxy, url, manifest)
    assert records is not None and sorted(r.name for r in records) == sorted(SHARDS)
    assert cut - whole == 5, f"{cut} LIST requests with six prefixes, {whole} with one"


@pytest.mark.s3
def test_planning_on_s3_still_refuses_missing_and_resized_data(proxied, monkeypatch, caplog) -> None:
    proxy, url = proxied
    ledger, manifest = _finished_output(url, SHARDS)
    monkeypatch.setattr(ledger_module, "LIST_PAGE", 10)
    ledger.fs.rm(ledger._path("part-000013.parquet"))
    ledger.fs.pipe_file(ledger._path("part-000042.parquet"), b"y" * 10)
    # A record of a shard the manifest does not hold: no prefix covers its data file, looked up alone.
    stats = ShardStats(name="extra", path=f"{url}/extra.parquet", samples=1, bytes=len(PAYLOAD), sha256="0" * 64)
    ledger.fs.pipe_file(ledger._path("extra.parquet"), PAYLOAD)
    ledger.commit_record(ShardRecord.from_stats(stats, input_url="s3://in/extra.tar", samples_read=1, errors=[],
                                                identity_hash=ledger.identity_hash, seconds=1.0))
    with caplog.at_level(logging.WARNING, logger="pipeline.core.ledger"):
        records = Ledger(url).records()
    names = {r.name for r in records}
    assert names == (set(SHARDS) | {"extra"}) - {"part-000013", "part-000042"}
    assert "shard part-000013 is not committed: data file part-000013.parquet is missing" in caplog.text
    assert "part-000042.parquet has 10 bytes; the record says 64" in caplog.text
    assert Ledger(url).finished(manifest) is None, "a finished job whose data went missing is not finished"


@pytest.mark.s3
def test_planning_on_s3_retries_failed_listing_pages(proxied, monkeypatch) -> None:
    proxy, url = proxied
    _, manifest = _finished_output(url, SHARDS)
    monkeypatch.setattr(ledger_module, "LIST_PAGE", 10)
    monkeypatch.setattr(ledger_module, "READ_BACKOFF_S", 0.01)
    # Only the prefix pages of the data files break (not the bookkeeping's listings).
    proxy.set_policy(FaultPolicy({"LIST": Rule(1.0, ("error_503", "reset_before"), path=r"prefix=out/part-",
                                               limit=4)}, seed=3))
    _, records = _lists_to_plan(proxy, url, manifest)
    assert records is not None and sorted(r.name for r in records) == sorted(SHARDS)
    broken = [e for e in proxy.events() if e.kind == "LIST"]
    assert len(broken) == 4, proxy.report()


def test_what_a_listing_made_before_the_records_misses_is_listed_again(tmp_path, monkeypatch) -> None:
    """The data listing runs while the records are read, so a shard committed in between (a job
    running while `status` reads) has a record the listing predates: it is looked at again."""
    url = str(tmp_path / "out")
    _finished_output(url, dict(list(SHARDS.items())[:5]))
    calls = []
    real = Ledger._data_sizes

    def stale_first(self, only=None):
        calls.append(None if only is None else sorted(only))
        return {} if only is None else real(self, only)  # the first listing saw no data file yet

    monkeypatch.setattr(Ledger, "_data_sizes", stale_first)
    records = Ledger(url).records()
    assert sorted(r.name for r in records) == sorted(SHARDS)[:5]
    assert calls == [None, [f"part-00000{i}.parquet" for i in range(5)]]


@pytest.mark.s3
def test_names_without_a_shared_stem_are_listed_once_not_cut_into_many_prefixes(proxied, monkeypatch) -> None:
    proxy, url = proxied
    rng = random.Random(7)
    hashed = {"".join(rng.choice(string.ascii_letters + string.digits) for _ in range(12)): f"s3://in/{i}.tar"
              for i in range(60)}
    _, manifest = _finished_output(url, hashed)
    whole, records = _lists_to_plan(proxy, url, manifest)
    monkeypatch.setattr(ledger_module, "LIST_PAGE", 10)  # 60 random names: some 40 prefixes for 6 pages' worth
    assert len(name_prefixes([f"{n}.parquet" for n in hashed], per_prefix=10)[0]) > 4 * 6
    cut, records = _lists_to_plan(proxy, url, manifest)
    assert records is not None and sorted(r.name for r in records) == sorted(hashed)
    assert cut == whole, "one listing of the folder, as with one page of names"


@pytest.mark.s3
def test_many_records_of_dropped_shards_are_answered_by_one_listing_not_one_lookup_each(proxied, monkeypatch) -> None:
    proxy, url = proxied
    ledger, _ = _finished_output(url, SHARDS)
    monkeypatch.setattr(ledger_module, "LIST_PAGE", 10)
    # The job now holds 6 of its 60 shards: 54 records name data files no prefix of the cut covers.
    kept = dict(list(SHARDS.items())[:6])
    manifest = {**ledger.read_manifest(), "shards": kept}
    ledger._write_json(ledger._path(ledger.layout.manifest), manifest)
    proxy.reset_counts()
    records = Ledger(url).records()
    assert sorted(r.name for r in records) == sorted(SHARDS), "every record is still checked against its data"
    assert proxy.requests().get("HEAD", 0) < 10, proxy.report()
