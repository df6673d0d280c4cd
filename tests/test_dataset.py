"""The training reader: exact split over ranks and workers, seeded shuffles and posterior samples,
values as written, refusal of mixed caches, committed shards only, batches of one shape."""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.dataset import IncompatibleShardsError, LatentDataset, ShapeBatched, batch_by_shape
from pipeline.core.ledger import Ledger, ShardRecord, build_manifest
from pipeline.io.latent_writers import LatentRecord, make_writer

SCALE = 0.18215
META = {"vae_fingerprint": "fp-a", "preset": "tiny", "scaling_factor": repr(SCALE), "shift_factor": "0.0",
        "preprocess": json.dumps({"resolution": 64, "crop": "center"}, sort_keys=True)}


def rec(key: str, shape: tuple[int, int, int] = (4, 4, 4), *, logvar: float | None = None,
        flip: bool = False) -> LatentRecord:
    """A record with values derived from the key; `logvar` fixes the log-variance (else random)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    arr = lambda: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    lv = arr() - 3 if logvar is None else np.full(shape, logvar, np.float32)
    i = int(key.rsplit("/", 1)[-1])
    return LatentRecord(key, arr(), lv, (shape[1] * 8 + i, shape[2] * 8), (i, 2), (shape[1] * 8, shape[2] * 8),
                        latent_flip=arr() if flip else None, logvar_flip=lv.copy() if flip else None,
                        extras={"txt": f"caption {key}".encode(), "json": json.dumps({"i": i}).encode(),
                                "meta.json": b'{"k": [1, 2]}', "bin": bytes([i, 0, 255])})


def write_folder(url: str, shards: dict[str, list[LatentRecord]], *, fmt: str = "parquet",
                 metadata: dict[str, dict[str, str]] | None = None, uncommitted: tuple[str, ...] = ()) -> None:
    """An output folder with a job manifest; each shard written by the project's writer and
    committed with its ledger record, except the `uncommitted` ones (data file only)."""
    ledger = Ledger(url)
    identity = {"vae_fingerprint": META["vae_fingerprint"], "preset": "tiny", "scaling_factor": SCALE,
                "shift_factor": 0.0, "preprocess": {"resolution": 64}, "format": fmt, "latent_dtype": "float16"}
    ledger.open_job(build_manifest(kind="encode", identity=identity, shards={n: f"s3://in/{n}.tar" for n in shards},
                                   data_extension=fmt, code_version="0.1.0"), overwrite=False)
    columns = sorted({ext for records in shards.values() for r in records for ext in r.extras})
    for name, records in shards.items():
        with make_writer(fmt, url, name, (metadata or {}).get(name, META), columns=columns) as w:
            for r in records:
                w.add(r)
            stats = w.commit()
        if name not in uncommitted:
            ledger.commit_record(ShardRecord.from_stats(
                stats, input_url=f"s3://in/{name}.tar", samples_read=len(records), errors=[],
                identity_hash=ledger.identity_hash))


def simple_shards(n_shards: int, per_shard: int, **kw: Any) -> dict[str, list[LatentRecord]]:
    return {f"s{s:03d}": [rec(f"s{s:03d}/{i}", **kw) for i in range(per_shard)] for s in range(n_shards)}


def keys_of(shards: dict[str, list[LatentRecord]]) -> set[str]:
    return {r.key for records in shards.values() for r in records}


def loader_keys(ds: LatentDataset, workers: int = 2) -> list[str]:
    """Keys in the order a real multi-process DataLoader delivers them."""
    return [s["key"] for s in DataLoader(ds, batch_size=None, num_workers=workers)]


@pytest.fixture()
def six(tmp_path) -> tuple[str, dict[str, list[LatentRecord]]]:
    url = str(tmp_path / "out")
    shards = simple_shards(6, 3)
    write_folder(url, shards)
    return url, shards


def test_ranks_and_workers_cover_every_key_once(six) -> None:
    url, shards = six
    per_rank = [loader_keys(LatentDataset(url, rank=r, world_size=2)) for r in range(2)]
    every = per_rank[0] + per_rank[1]
    assert len(every) == 18 and Counter(every).most_common(1)[0][1] == 1
    assert set(every) == keys_of(shards)
    # the documented partition: shard i -> global worker i mod 4, global worker = rank * 2 + worker
    assert {k.split("/")[0] for k in per_rank[0]} == {"s000", "s001", "s004", "s005"}
    assert {k.split("/")[0] for k in per_rank[1]} == {"s002", "s003"}


def test_fewer_shards_than_workers_yields_each_key_once(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    url = str(tmp_path / "out")
    shards = simple_shards(2, 2)
    write_folder(url, shards)
    datasets = [LatentDataset(url, rank=r, world_size=2) for r in range(2)]
    assert [ds.worker_shards(w, 2) for ds in datasets for w in range(2)] == [[f"{url}/s000.parquet"],
                                                                             [f"{url}/s001.parquet"], [], []]
    per_rank = [loader_keys(ds) for ds in datasets]
    assert sorted(per_rank[0]) == sorted(keys_of(shards)) and per_rank[1] == []
    with caplog.at_level("WARNING"):
        assert list(LatentDataset(url, rank=3, world_size=4)) == []
    assert "rank 3 worker 0 has no shards: 2 shard(s) over 4 worker(s)" in caplog.text


def test_shuffle_is_seeded_per_epoch_and_stays_an_exact_cover(six) -> None:
    url, shards = six

    def epoch_keys(epoch: int, seed: int = 7) -> list[list[str]]:
        out = []
        for r in range(2):
            ds = LatentDataset(url, rank=r, world_size=2, shuffle=True, seed=seed, shuffle_buffer=4)
            ds.set_epoch(epoch)
            out.append(loader_keys(ds))
        return out

    e0, e1, e0_again = epoch_keys(0), epoch_keys(1), epoch_keys(0)
    for per_rank in (e0, e1):
        every = per_rank[0] + per_rank[1]
        assert len(every) == 18 and set(every) == keys_of(shards)
    assert e0 == e0_again
    assert e0 != e1
    assert e0 != epoch_keys(0, seed=8)
    plain = [loader_keys(LatentDataset(url, rank=r, world_size=2)) for r in range(2)]
    assert e0 != plain
    # the buffer mixes rows within a shard too: some shard's keys come out in another order than written
    rows = [[int(k[-1]) for k in e0[0] + e0[1] if k.startswith(f"s{s:03d}/")] for s in range(6)]
    assert any(r != [0, 1, 2] for r in rows)


def test_epoch_shard_order_is_shared_by_ranks(six) -> None:
    url, _ = six
    a = LatentDataset(url, rank=0, world_size=2, shuffle=True, seed=3)
    b = LatentDataset(url, rank=1, world_size=2, shuffle=True, seed=3)
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert a.shard_order() == b.shard_order()
        parts = [ds.worker_shards(w, 3) for ds in (a, b) for w in range(3)]
        assert sorted(u for p in parts for u in p) == sorted(a.shards)
    orders = set()
    for epoch in range(5):
        a.set_epoch(epoch)
        orders.add(tuple(a.shard_order()))
    assert len(orders) > 1


@pytest.mark.parametrize("fmt", ["parquet", "safetensors"])
def test_values_sizes_and_passthrough(tmp_path, fmt: str) -> None:
    url = str(tmp_path / "out")
    shards = {"a": [rec("a/0", (4, 6, 8), flip=True), rec("a/1", (4, 6, 8))], "b": [rec("b/2", (8, 4, 4))]}
    write_folder(url, shards, fmt=fmt)
    written = {r.key: r for records in shards.values() for r in records}
    got = {s["key"]: s for s in LatentDataset(url)}
    assert set(got) == set(written)
    for key, s in got.items():
        r = written[key]
        assert s["latent"].dtype == torch.float32 and tuple(s["latent"].shape) == r.latent.shape
        np.testing.assert_array_equal(s["latent"].numpy(), r.latent.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(s["latent"].numpy(), r.latent, rtol=1e-3, atol=1e-3)
        assert s["original_size"] == r.original_size and isinstance(s["original_size"], tuple)
        assert s["crop_top_left"] == r.crop_top_left and s["target_size"] == r.target_size
        assert s["txt"] == f"caption {key}"
        assert s["json"] == {"i": int(key[-1])} and s["meta.json"] == {"k": [1, 2]}
        assert s["bin"] == bytes([int(key[-1]), 0, 255]) and isinstance(s["bin"], bytes)
    assert got["a/0"]["latent_flip"].dtype == torch.float32
    np.testing.assert_allclose(got["a/0"]["latent_flip"].numpy(), written["a/0"].latent_flip, rtol=1e-3, atol=1e-3)
    assert "latent_flip" not in got["a/1"] and "logvar" not in got["a/1"]


def test_posterior_is_seeded_scaled_and_layout_independent(tmp_path) -> None:
    url = str(tmp_path / "out")
    shards = {f"s{s}": [rec(f"s{s}/{i}", (4, 16, 16), logvar=2.0, flip=(i == 0)) for i in range(4)] for s in range(3)}
    write_folder(url, shards)

    def draw(seed: int, epoch: int = 0, workers: int = 0) -> dict[str, dict[str, torch.Tensor]]:
        ds = LatentDataset(url, sample="posterior", seed=seed)
        ds.set_epoch(epoch)
        it = DataLoader(ds, batch_size=None, num_workers=workers) if workers else ds
        return {s["key"]: s for s in it}

    mode = {s["key"]: s for s in LatentDataset(url)}
    a, same, other, later = draw(1), draw(1), draw(2), draw(1, epoch=1)
    two_workers = draw(1, workers=2)
    assert set(a) == set(mode) == set(two_workers)
    for key in a:
        assert torch.equal(a[key]["latent"], same[key]["latent"])
        assert torch.equal(a[key]["latent"], two_workers[key]["latent"])  # eps depends on (seed, epoch, key) only
        assert not torch.equal(a[key]["latent"], other[key]["latent"])
        assert not torch.equal(a[key]["latent"], later[key]["latent"])
        assert not torch.equal(a[key]["latent"], mode[key]["latent"])
    assert "latent_flip" in a["s0/0"] and not torch.equal(a["s0/0"]["latent_flip"], mode["s0/0"]["latent_flip"])
    assert not torch.equal(a["s0/0"]["latent_flip"] - mode["s0/0"]["latent_flip"],
                           a["s0/0"]["latent"] - mode["s0/0"]["latent"])  # its own noise
    # (sample - mean) / (scaling * std) is standard normal: std = exp(2 / 2) = e
    z = torch.cat([((a[k]["latent"] - mode[k]["latent"]) / (SCALE * np.e)).flatten() for k in a])
    assert z.numel() == 12 * 4 * 16 * 16
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.03


def test_refuses_shards_of_another_fingerprint(tmp_path) -> None:
    url = str(tmp_path / "out")
    write_folder(url, simple_shards(2, 1), metadata={"s001": {**META, "vae_fingerprint": "fp-b"}})
    with pytest.raises(IncompatibleShardsError) as info:
        LatentDataset(url)
    message = str(info.value)
    assert "vae_fingerprint" in message and "'fp-a'" in message and "'fp-b'" in message
    assert f"{url}/s000.parquet has 'fp-a'" in message and f"{url}/s001.parquet has 'fp-b'" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("field, value", [("preset", "sdxl"), ("scaling_factor", "0.13025"),
                                          ("shift_factor", "0.1159"),
                                          ("latents_mean", json.dumps([0.1, 0.2, 0.3, 0.4])),
                                          ("preprocess", json.dumps({"resolution": 1024}))])
def test_refuses_shards_that_disagree_on(tmp_path, field: str, value: str) -> None:
    url = str(tmp_path / "out")
    write_folder(url, simple_shards(3, 1), metadata={"s002": {**META, field: value}})
    pattern = rf"{field}: .*s000\.parquet has .*, .*s002\.parquet has {re.escape(repr(value))}"
    with pytest.raises(IncompatibleShardsError, match=pattern):
        LatentDataset(url)


def test_equal_values_in_other_spelling_are_compatible(tmp_path) -> None:
    url = str(tmp_path / "out")
    other = {**META, "scaling_factor": "0.182150", "preprocess": json.dumps({"crop": "center", "resolution": 64})}
    write_folder(url, simple_shards(2, 1), metadata={"s001": other})
    assert len(list(LatentDataset(url))) == 2


def test_expect_fingerprint(six) -> None:
    url, _ = six
    assert len(list(LatentDataset(url, expect_fingerprint="fp-a"))) == 18
    with pytest.raises(IncompatibleShardsError, match=r"s000\.parquet has vae_fingerprint 'fp-a'; expected 'fp-z'"):
        LatentDataset(url, expect_fingerprint="fp-z")


def test_uncommitted_shard_is_not_read(tmp_path) -> None:
    url = str(tmp_path / "out")
    shards = simple_shards(3, 2)
    write_folder(url, shards, uncommitted=("s001",))
    assert (tmp_path / "out" / "s001.parquet").exists()
    ds = LatentDataset(url)
    assert [u.rsplit("/", 1)[-1] for u in ds.shards] == ["s000.parquet", "s002.parquet"]
    assert sorted(s["key"] for s in ds) == ["s000/0", "s000/1", "s002/0", "s002/1"]


def test_shard_file_list_and_empty_folder(six, tmp_path) -> None:
    url, _ = six
    files = [f"{url}/s003.parquet", f"{url}/s000.parquet"]
    assert [s["key"] for s in LatentDataset(files)] == ["s003/0", "s003/1", "s003/2", "s000/0", "s000/1", "s000/2"]
    with pytest.raises(ValueError, match="given more than once"):
        LatentDataset([files[0], files[0]])
    empty = str(tmp_path / "empty")
    write_folder(empty, simple_shards(1, 1), uncommitted=("s000",))
    with pytest.raises(ValueError, match="no committed latent shards"):
        LatentDataset(empty)


def test_argument_checks(six) -> None:
    url, _ = six
    with pytest.raises(ValueError, match=r"rank=2 is not allowed; expected 0 <= rank < world_size=2"):
        LatentDataset(url, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"rank=-1 is not allowed"):
        LatentDataset(url, rank=-1, world_size=2)
    with pytest.raises(ValueError, match=r"world_size=0 is not allowed"):
        LatentDataset(url, rank=0, world_size=0)
    with pytest.raises(ValueError, match=r"rank=1, world_size=None: expected both or neither"):
        LatentDataset(url, rank=1)
    with pytest.raises(ValueError, match=r"sample='mean' is not allowed; expected one of \['mode', 'posterior'\]"):
        LatentDataset(url, sample="mean")
    with pytest.raises(ValueError, match=r"shuffle_buffer=0 is not allowed"):
        LatentDataset(url, shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"epoch=-1 is not allowed"):
        LatentDataset(url).set_epoch(-1)


def test_rank_from_torch_distributed(six, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = six
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    ds = LatentDataset(url)
    assert (ds.rank, ds.world_size) == (1, 2)
    assert {s["key"].split("/")[0] for s in ds} == {"s001", "s003", "s005"}
    with pytest.raises(ValueError, match=r"rank=0 disagrees with torch.distributed \(rank 1 of 2\)"):
        LatentDataset(url, rank=0, world_size=2)


def fake_samples(shapes: list[tuple[int, ...]]) -> list[dict[str, Any]]:
    return [{"key": str(i), "latent": torch.full(shape, float(i)), "txt": f"t{i}"} for i, shape in enumerate(shapes)]


def test_batch_by_shape_mixed_shapes_bounded() -> None:
    shapes = [(4, 8, 8), (4, 6, 10), (4, 10, 6)]
    rng = np.random.default_rng(0)
    samples = fake_samples([shapes[i] for i in rng.integers(0, 3, size=50)])
    consumed = 0

    def counting() -> Iterator[dict[str, Any]]:
        nonlocal consumed
        for s in samples:
            consumed += 1
            yield s

    seen: list[str] = []
    for batch in batch_by_shape(counting(), 4):
        assert len(seen) + len(batch["key"]) <= consumed <= len(seen) + len(batch["key"]) + 3 * 4
        seen += batch["key"]
        assert batch["latent"].shape[0] == len(batch["key"]) == len(batch["txt"]) <= 4
        assert tuple(batch["latent"].shape[1:]) in shapes
        for k, z in zip(batch["key"], batch["latent"]):  # rows stay with their keys
            assert torch.all(z == float(k))
    assert sorted(seen, key=int) == [s["key"] for s in samples]

    full = list(batch_by_shape(samples, 4, drop_last=True))
    assert all(len(b["key"]) == 4 for b in full)
    counts = Counter(tuple(s["latent"].shape) for s in samples)
    assert len(full) == sum(c // 4 for c in counts.values())
    with pytest.raises(ValueError, match="batch_size=0 is not allowed"):
        list(batch_by_shape(samples, 0))


def test_batch_by_shape_flip_and_missing_fields() -> None:
    a, b, c = fake_samples([(2, 2, 2)] * 3)
    a["latent_flip"], b["latent_flip"] = torch.zeros(2, 2, 2), torch.ones(2, 2, 2)
    (both,) = batch_by_shape([a, b], 2)
    assert both["latent_flip"].shape == (2, 2, 2, 2)
    c.pop("txt")
    (mixed,) = batch_by_shape([a, c], 2)
    assert isinstance(mixed["latent_flip"], list) and mixed["latent_flip"][1] is None
    assert mixed["txt"] == ["t0", None]


def test_shape_batched_in_a_dataloader(tmp_path) -> None:
    url = str(tmp_path / "out")
    shapes = [(4, 8, 8), (4, 6, 10), (4, 10, 6)]
    shards = {f"b{s}": [rec(f"b{s}/{i}", shapes[(s + i) % 3]) for i in range(7)] for s in range(4)}
    write_folder(url, shards, fmt="safetensors")
    ds = LatentDataset(url, shuffle=True, shuffle_buffer=5)
    batched = ShapeBatched(ds, 3)
    batched.set_epoch(2)
    assert ds.epoch == 2
    keys: list[str] = []
    for batch in DataLoader(batched, batch_size=None, num_workers=2):
        assert batch["latent"].ndim == 4 and batch["latent"].shape[0] == len(batch["key"]) <= 3
        assert tuple(batch["latent"].shape[1:]) in shapes
        assert all(isinstance(t, str) for t in batch["txt"])
        keys += batch["key"]
    assert sorted(keys) == sorted(keys_of(shards))


@pytest.mark.s3
def test_reads_from_s3(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/latents"
    shards = {"s0": [rec("s0/0", (4, 6, 6)), rec("s0/1", (4, 6, 6))], "s1": [rec("s1/2", (4, 6, 6), flip=True)],
              "s2": [rec("s2/3", (4, 6, 6))]}
    write_folder(url, shards, uncommitted=("s2",))
    ds = LatentDataset(url, expect_fingerprint="fp-a", sample="posterior", seed=5)
    assert ds.shards == [f"{url}/s0.parquet", f"{url}/s1.parquet"]
    got = {s["key"]: s for s in DataLoader(ds, batch_size=None, num_workers=2)}
    assert set(got) == {"s0/0", "s0/1", "s1/2"}
    mode = {s["key"]: s for s in LatentDataset(url)}
    written = {r.key: r for records in shards.values() for r in records}
    for key, s in got.items():
        assert s["txt"] == f"caption {key}" and s["json"] == {"i": int(key[-1])}
        np.testing.assert_allclose(mode[key]["latent"].numpy(), written[key].latent, rtol=1e-3, atol=1e-3)
        assert not torch.equal(s["latent"], mode[key]["latent"])
    assert "latent_flip" in got["s1/2"]
