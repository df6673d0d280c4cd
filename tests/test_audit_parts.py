"""The audit's parts below the engine: seeded sampling, scores against scikit-image, the part
writer's bounded worst/random picks, the source read beside the latents, and data files in a
subfolder of the output (the ledger's `data_dir`)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.core.layout import CURRENT
from pipeline.core.ledger import Ledger, LedgerError, ShardRecord, build_manifest
from pipeline.io.tar_reader import ShardReadError
from pipeline.jobs import audit
from pipeline.jobs.audit import AuditPartWriter, AuditRecord, AuditRow, SourceStream, pick_value, sample_rows
from pipeline.metrics import Scores, score, to_pixels, triptych
from tests import imagedata


def test_sample_rows_are_n_distinct_rows_fixed_by_the_seed():
    counts = {"a": 50, "b": 0, "c": 7, "d": 120}
    picks = sample_rows(counts, 30, seed=3)
    flat = [(n, i) for n, rows in picks.items() for i in rows]
    assert len(flat) == len(set(flat)) == 30
    assert all(0 <= i < counts[n] for n, i in flat) and picks["b"] == []
    assert all(rows == sorted(rows) for rows in picks.values())
    assert sample_rows(counts, 30, seed=3) == picks
    assert sample_rows(counts, 30, seed=4) != picks
    assert sample_rows(counts, 1000, seed=3) == {n: list(range(c)) for n, c in counts.items()}


def test_pick_values_are_uniform_and_seeded():
    values = [pick_value(0, "s", f"k{i}", False) for i in range(2000)]
    assert 0.0 <= min(values) and max(values) < 1.0
    assert abs(np.mean(values) - 0.5) < 0.03
    assert pick_value(0, "s", "k1", False) == values[1] != pick_value(1, "s", "k1", False)
    assert pick_value(0, "s", "k1", True) != values[1]


def test_scores_are_scikit_images_on_the_clamped_pixels():
    rng = np.random.default_rng(0)
    source = np.asarray(imagedata.photo("chelsea", max_side=96))[:64, :80].copy()
    image = (source.transpose(2, 0, 1) / 127.5 - 1.0 + rng.normal(0, 0.08, (3, 64, 80))).astype(np.float32)
    image[0, :4, :4] = 1.7  # clipped highlights
    s = score(source, image)
    recon = to_pixels(image)
    assert s.psnr == pytest.approx(peak_signal_noise_ratio(source, recon, data_range=255))
    assert s.ssim == pytest.approx(structural_similarity(source, recon, data_range=255, channel_axis=2))
    assert s.mae == pytest.approx(np.abs(source.astype(int) - recon.astype(int)).mean())
    assert s.clipped_fraction > 0 and s.clipped_fraction == pytest.approx((np.abs(image) > 1.25).mean())
    assert not s.saturated and Scores(1, 1, 1, 0.5).saturated
    with pytest.raises(ValueError, match="same"):
        score(source[:32], image)


def _row(psnr: float | None, side: int = 16) -> AuditRow:
    pixels = np.full((side, side, 3), 128, np.uint8)
    scores = None if psnr is None else Scores(psnr, 0.5, 3.0, 0.0)
    return AuditRow(False, scores, psnr is None, False, np.zeros(4), np.ones(4), pixels,
                    None if psnr is None else pixels)


def test_part_writer_keeps_the_worst_and_a_seeded_random_k_and_streams_metrics(tmp_path):
    psnrs = [30.0 - i * 0.1 for i in range(40)] + [None]
    with AuditPartWriter(str(tmp_path), "shard-0", {"kind": "audit"}, worst=5, seed=9) as w:
        for i, p in enumerate(psnrs):
            w.add(AuditRecord(f"k{i:02d}", "src.tar", (_row(p),)))
        stats = w.commit()
    assert stats.data_file == "parts/shard-0.parquet"
    table = pq.read_table(tmp_path / "parts" / "shard-0.parquet").to_pylist()
    metrics = [r for r in table if r["role"] == "metrics"]
    assert [r["key"] for r in metrics] == [f"k{i:02d}" for i in range(41)]
    worst = {r["key"] for r in table if r["role"] == "worst"}
    assert worst == {"k40", "k39", "k38", "k37", "k36"}  # the unscored (non-finite) one is the worst of all
    by_pick = sorted(metrics, key=lambda r: r["pick"])
    assert {r["key"] for r in table if r["role"] == "random"} == {r["key"] for r in by_pick[:5]}
    assert all(r["preview"][:8] == b"\x89PNG\r\n\x1a\n" for r in table if r["role"] != "metrics")
    assert json.loads(pq.read_schema(tmp_path / "parts" / "shard-0.parquet").metadata[b"latentcache"]) == \
        {"kind": "audit"}


def test_triptych_shows_grey_panels_without_a_reconstruction():
    src = np.zeros((20, 30, 3), np.uint8)
    out = triptych(src, None, side=30)
    assert out.shape == (20, 3 * 30 + 8, 3)
    assert (out[:, 34:64] == 96).all()


def _tar(tmp_path, keys: list[str], size: int = 1000) -> str:
    samples = [{"__key__": k, "jpg": bytes([i % 256]) * size} for i, k in enumerate(keys)]
    return imagedata.write_tar_shard(str(tmp_path / "src.tar"), samples)


def test_source_stream_finds_keys_out_of_order_and_sees_every_key(tmp_path):
    url = _tar(tmp_path, ["a", "b", "c", "d", "e"])
    stream = SourceStream(url, None, {"a", "c", "d"})
    assert stream.find("c")["__key__"] == "c"
    assert stream.find("a")["__key__"] == "a"  # held while reading on to c
    assert stream.find("zz") is None  # reads to the end
    assert stream.find("d")["__key__"] == "d"
    stream.drain()
    assert stream.seen == {"a", "b", "c", "d", "e"}


def test_source_stream_fails_loudly_rather_than_hold_a_whole_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "MAX_HELD_BYTES", 2500)
    url = _tar(tmp_path, [f"k{i}" for i in range(6)])
    stream = SourceStream(url, None, {f"k{i}" for i in range(6)})
    with pytest.raises(ShardReadError, match="not hold the latents' samples in their order"):
        stream.find("not-there")


def _ledger(tmp_path, data_dir: str) -> Ledger:
    ledger = Ledger(str(tmp_path))
    ledger.open_job(build_manifest(kind="audit", identity={"kind": "audit"}, shards={"s0": "in0", "s1": "in1"},
                                   data_extension="parquet", code_version="t", data_dir=data_dir), overwrite=False)
    return ledger


def test_ledger_commits_data_files_kept_in_a_subfolder(tmp_path):
    ledger = _ledger(tmp_path, "parts")
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "s0.parquet").write_bytes(b"x" * 10)
    record = ShardRecord(name="s0", input_url="in0", data_file="parts/s0.parquet", samples_read=1, samples_written=1,
                         errors=(), bytes=10, sha256="0", identity_hash=ledger.identity_hash)
    ledger.commit_record(record)
    assert [r.name for r in Ledger(str(tmp_path)).job_records()] == ["s0"]
    (tmp_path / "parts" / "s0.parquet").write_bytes(b"x" * 11)  # damaged: no longer committed
    assert Ledger(str(tmp_path)).job_records() == []
    (tmp_path / "parts" / "s0.parquet").write_bytes(b"x" * 10)
    (tmp_path / "mine.txt").write_text("not latentcache's")
    # --overwrite removes the data files latentcache wrote there, in the subfolder too, and nothing else.
    Ledger(str(tmp_path)).open_job(build_manifest(kind="audit", identity={"kind": "other"}, shards={"s0": "in0"},
                                                  data_extension="parquet", code_version="t", data_dir="parts"),
                                   overwrite=True)
    assert not (tmp_path / "parts" / "s0.parquet").exists() and (tmp_path / "mine.txt").exists()


@pytest.mark.parametrize("bad", ["../s0.parquet", "a/b/s0.parquet", ".hidden/s0.parquet", "parts/", "/abs.parquet"])
def test_ledger_refuses_records_pointing_outside_the_output(tmp_path, bad):
    data = {"name": "s0", "input_url": "in0", "data_file": bad, "samples_read": 0, "samples_written": 0,
            "errors": [], "bytes": 0, "sha256": "0", "identity_hash": "h"}
    with pytest.raises(LedgerError, match="data_file"):
        ShardRecord.from_dict(data, where=str(tmp_path / CURRENT.records / "s0.json"))


def test_reopening_a_job_removes_the_outputs_its_manifest_lists_and_nothing_else(tmp_path):
    def manifest() -> dict:
        return build_manifest(kind="audit", identity={"kind": "audit"}, shards={"s0": "in0"}, data_extension="parquet",
                              code_version="t", data_dir="parts", outputs=["report.html", "images/", "../x"])

    Ledger(str(tmp_path)).open_job(manifest(), overwrite=False)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "worst-000.png").write_bytes(b"png")
    (tmp_path / "report.html").write_text("<html>old</html>")
    (tmp_path / "notes.html").write_text("mine")
    (tmp_path.parent / "x").write_text("outside")
    Ledger(str(tmp_path)).open_job(manifest(), overwrite=False)  # a resume: the old report is stale
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "images" / "worst-000.png").exists()
    assert (tmp_path / "notes.html").read_text() == "mine" and (tmp_path.parent / "x").read_text() == "outside"


def test_lowest_k_keeps_the_k_lowest_ranks_earliest_first_among_ties_and_builds_only_those():
    from pipeline.jobs.audit import LowestK

    built = []
    kept = LowestK(3)
    for i, rank in enumerate([5.0, 1.0, 3.0, 1.0, 9.0, 0.5, 3.0]):
        kept.offer(rank, lambda i=i: built.append(i) or i)
    assert kept.items() == [5, 1, 3]  # ranks 0.5, 1.0 (the first of the two), 1.0
    assert 4 not in built and 6 not in built  # never kept, so never built
