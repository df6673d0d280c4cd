"""An encode job's output folder is read as it is by the tools people use on Parquet: pandas,
pyarrow.dataset, Hugging Face datasets, polars and DuckDB find the data files and only them, with
one schema across shards (a first shard whose samples all failed still has the caption column)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
from pipeline.core.layout import CURRENT
from pipeline.core.ledger import Ledger
from pipeline.core.runner import run_job
from pipeline.io.latent_reader import read_latents
from tests import imagedata

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def output(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    photos = imagedata.real_photos(max_side=96)
    bad = [{"__key__": f"a-bad/{i}", "jpg": b"broken", "txt": "lost"} for i in range(3)]
    good = [{"__key__": f"b/{i}", "jpg": imagedata.encode(photos[i % len(photos)][1], "JPEG"), "txt": f"caption {i}",
             "json": json.dumps({"i": i})} for i in range(5)]
    more = [{"__key__": f"c/{i}", "jpg": imagedata.encode(photos[i][1], "JPEG"), "txt": f"more {i}",
             "cls": str(i)} for i in range(2)]
    imagedata.write_tar_shard(str(root / "in" / "a-0000.tar"), bad)  # sorts first: every sample fails
    imagedata.write_tar_shard(str(root / "in" / "b-0000.tar"), good)
    imagedata.write_tar_shard(str(root / "in" / "c-0000.tar"), more)
    cfg = EncodeConfig(input=(str(root / "in"),), output=str(root / "out"), passthrough=("json", "txt"),
                       vae=VAEConfig(source="random:tiny", dtype="float32"), preprocess=PreprocessConfig(resolution=64),
                       actors=1, batch_size=4, max_error_rate=1.0, retry=RetryConfig(max_attempts=1))
    summary = run_job("encode", cfg, progress=False)
    return root / "out", summary


def test_bookkeeping_is_under_one_hidden_folder(output):
    out, summary = output
    top = sorted(p.name for p in out.iterdir())
    assert top == [".latentcache", "a-0000.parquet", "b-0000.parquet", "c-0000.parquet"]
    assert (out / CURRENT.errors).exists() and (out / CURRENT.success).exists()
    # `cls` is not a passthrough member of this job: counted, not silently dropped
    assert summary.counters["members_not_kept.cls"] == 2
    assert {r.name: r.counters.get("members_not_kept.cls", 0) for r in Ledger(str(out)).job_records()} == \
        {"a-0000": 0, "b-0000": 0, "c-0000": 2}


def test_pandas_and_pyarrow_read_every_latent_with_one_schema(output):
    import pandas as pd
    import pyarrow.dataset as ds

    out, _ = output
    df = pd.read_parquet(out)
    assert len(df) == 7 and {"txt", "json", "latent", "key"} <= set(df.columns)
    assert sorted(df["txt"]) == sorted([f"caption {i}" for i in range(5)] + ["more 0", "more 1"])
    table = ds.dataset(str(out), format="parquet").to_table()
    assert table.num_rows == 7 and table.schema.field("latent").type.value_type.bit_width == 16


def test_hugging_face_datasets_loads_the_folder(output, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    out, _ = output
    loaded = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf"), split="train")
    assert loaded.num_rows == 7
    row = next(r for r in loaded if r["key"] == "b/3")
    assert row["txt"] == "caption 3" and json.loads(row["json"]) == {"i": 3}
    ours = {k: latent for k, latent, _ in read_latents(str(out))}
    np.testing.assert_array_equal(np.asarray(row["latent"], np.float16).reshape(row["latent_shape"]), ours["b/3"])


def test_polars_and_duckdb_count_latents_not_errors(output):
    import duckdb
    import polars as pl

    out, _ = output
    frame = pl.read_parquet(str(out / "*.parquet"))
    assert frame.height == 7 and frame["txt"].null_count() == 0
    db = duckdb.connect()
    try:
        assert db.execute(f"SELECT count(*) FROM read_parquet('{out}/*.parquet')").fetchone()[0] == 7
        assert db.execute(f"SELECT count(*) FROM read_parquet('{out}/{CURRENT.errors}')").fetchone()[0] == 3
    finally:
        db.close()
