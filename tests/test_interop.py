"""Interop with the real tools (issue 13): img2dataset builds a dataset from a loopback HTTP server
(real photos, odd modes, broken images, 404s, captions in CJK, emoji and Arabic); latentcache
encodes its folder and the same files on moto's S3; every sample img2dataset counts as a success
is written or recorded under its key, once, with its caption and json as img2dataset wrote them;
an output set to img2dataset's folder is refused and leaves its files as they were; a tar completed
after its shard was committed is redone; pandas, pyarrow, polars, DuckDB and HF datasets read the
output folder as it is, and so does latentcache's own training reader.

Behind the `interop` marker: `make test-interop` installs img2dataset (the `interop` extra) and
runs it; CI runs it after the default suite. The VAE is `random:tiny` and images are 64 px."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.core.layout import CURRENT
from pipeline.core.ledger import Ledger
from pipeline.io.latent_reader import read_latents
from pipeline.verify import verify_output
from tests.img2dataset_data import I2DFolder, ImageServer, run_img2dataset, tar_members, url_list, write_url_list

pytestmark = [pytest.mark.interop, pytest.mark.ray]

REPO = Path(__file__).resolve().parent.parent
# img2dataset's two ways: resized and re-encoded by OpenCV (its default), or the served bytes as
# they are (`disable_all_reencoding`), where broken images count as successes and reach the tars.
RUNS = {"resized": {}, "originals": {"disable_all_reencoding": True}}
# Broken images are a tenth of the originals; the default max_error_rate (5 %) would fail the job.
ENCODE = ["--vae", "random:tiny", "--resolution", "64", "--batch-size", "4", "--no-progress",
          "--set", "max_error_rate=0.5"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """img2dataset run twice (RUNS) on one url list served from 127.0.0.1; the server is stopped
    before any test runs. Returns (folders by run name, url-list rows, the server's request counts)."""
    root = tmp_path_factory.mktemp("img2dataset")
    routes, rows = url_list()
    with ImageServer(routes) as server:
        urls = write_url_list(root / "urls.parquet", server.base, rows)
        for name, options in RUNS.items():
            run_img2dataset(urls, root / name, log=root / f"{name}.log", **options)
        requests = dict(server.requests)
    return {name: I2DFolder(root / name) for name in RUNS}, rows, requests


def _encode(inputs: str, output: str, *extra: str) -> int:
    """`latentcache encode` in this process, on the session's Ray (conftest's ray_cluster)."""
    return main(["encode", "--input", inputs, "--output", output, *ENCODE, *extra])


@pytest.fixture(scope="module")
def encoded(made, ray_cluster, tmp_path_factory):
    """Each img2dataset folder encoded from the folder itself; returns {run name: output path}."""
    folders, _, _ = made
    root = tmp_path_factory.mktemp("latents")
    outputs = {}
    for name, folder in folders.items():
        outputs[name] = str(root / name)
        assert _encode(str(folder.root), outputs[name]) == 0, name
    return outputs


def _errors_table(output: str) -> list[dict]:
    with fsspec.open(f"{output}/{CURRENT.errors}", "rb") as f:
        return pq.read_table(f).to_pylist()


def _assert_accounts_for_every_success(folder: I2DFolder, output: str, source: str) -> tuple[dict, dict]:
    """Every success of img2dataset (its stats files and its Parquet `status`) is written or in the
    errors table under the same key, once; the written ones carry its txt and json as they are in
    its tars; `verify --source` agrees. Returns (written {key: meta}, errors {key: row})."""
    successes = folder.successes()
    stats = folder.stats()
    assert set(stats) == set(folder.shards)
    assert sum(s["successes"] for s in stats.values()) == len(successes)
    samples = folder.samples()
    assert set(samples) == set(successes), "img2dataset's tars hold its successes and nothing else"

    rows = list(read_latents(output))
    written = {key: meta for key, _, meta in rows}
    assert len(written) == len(rows), "a key was written twice"
    error_rows = _errors_table(output)
    errors = {r["key"]: r for r in error_rows}
    assert len(errors) == len(error_rows), "a key was recorded as an error twice"
    assert not set(written) & set(errors), "a key both written and recorded as an error"
    assert set(written) | set(errors) == set(successes)
    assert len(written) + len(errors) == sum(s["successes"] for s in stats.values())

    for key, meta in written.items():
        members = samples[key]
        assert meta["extras"]["txt"] == members["txt"].decode("utf-8") == successes[key]["caption"], key
        assert meta["extras"]["json"] == members["json"].decode("utf-8"), key
        assert json.loads(meta["extras"]["json"])["key"] == key
    for key, row in errors.items():
        assert row["shard"].endswith(f"/{successes[key]['shard']}.tar") and row["reason"], row
    # Only the tars were read: one shard (and one data file) per tar, named after it.
    assert sorted(r.name for r in Ledger(output).job_records()) == folder.shards
    fs, path = fsspec.core.url_to_fs(output)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(".parquet")) == \
        [f"{s}.parquet" for s in folder.shards]
    report = verify_output(output, source=[source])
    assert report.ok, report.violations
    return written, errors


def test_img2dataset_made_its_dataset_from_the_loopback_server(made):
    folders, rows, requests = made
    assert set(requests) == {r["url"] for r in rows}, "every url was asked of the loopback server"
    for name, folder in folders.items():
        assert folder.shards == ["00000", "00001", "00002", "00003"]
        table = folder.rows()
        assert len(table) == len(rows) and sorted(r["caption"] for r in table) == sorted(r["caption"] for r in rows)
        by_path = {r["url"].split("/", 3)[3]: r for r in table}
        for path, row in by_path.items():
            if path.startswith("missing/"):
                assert row["status"] == "failed_to_download" and "404" in row["error_message"], row
            elif path.startswith("broken/") and name == "resized":
                assert row["status"] == "failed_to_resize", row  # OpenCV could not decode it
            else:
                assert row["status"] == "success", row


@pytest.mark.parametrize("run", list(RUNS))
def test_every_img2dataset_success_is_written_or_recorded_with_its_caption_and_json(made, encoded, run, capsys):
    folders, rows, _ = made
    written, errors = _assert_accounts_for_every_success(folders[run], encoded[run], str(folders[run].root))
    urls = {k: r["url"] for k, r in folders[run].successes().items()}
    broken = {k for k, url in urls.items() if "/broken/" in url}
    assert set(errors) == broken, {k: errors[k]["reason"] for k in errors}
    assert all(e["stage"] == "decode" for e in errors.values())
    assert len(written) == 27  # 18 photos and 9 images in odd modes
    captions = {r["caption"] for r in rows}
    written_captions = {m["extras"]["txt"] for m in written.values()}
    assert any(len(t) > 20_000 for t in written_captions) and "" in written_captions
    assert written_captions <= captions
    capsys.readouterr()
    assert _encode(str(folders[run].root), encoded[run]) == 0  # the rerun of a finished job
    assert "(4 shards); nothing to do" in capsys.readouterr().out


@pytest.mark.s3
def test_the_same_files_on_s3_encode_alike(made, encoded, s3_bucket):
    folders, _, _ = made
    folder = folders["originals"]
    fs = fsspec.filesystem("s3")
    fs.put(str(folder.root) + "/", f"{s3_bucket}/laion-subset/", recursive=True)  # tars, Parquet and stats files
    out = f"s3://{s3_bucket}/latents"
    assert _encode(f"s3://{s3_bucket}/laion-subset/", out) == 0
    written, errors = _assert_accounts_for_every_success(folder, out, f"s3://{s3_bucket}/laion-subset/")
    local = {k: (latent, meta) for k, latent, meta in read_latents(encoded["originals"])}
    assert set(written) == set(local) and set(errors) == {r["key"] for r in _errors_table(encoded["originals"])}
    for key, latent, meta in read_latents(out):
        np.testing.assert_allclose(latent, local[key][0], rtol=1e-3, atol=1e-3)
        assert meta["extras"] == local[key][1]["extras"]


def _user_env() -> dict[str, str]:
    """A new user's shell: no RAY_ADDRESS of the test session's Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_set_to_img2datasets_folder_is_refused_and_its_files_are_untouched(made, tmp_path, overwrite):
    folders, _, _ = made
    folder = I2DFolder(shutil.copytree(folders["resized"].root, tmp_path / "laion-subset"))
    before, entries = folder.digests(), sorted(folder.root.rglob("*"))
    assert before == folders["resized"].digests()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "encode", "--input", str(folder.root),
                           "--output", str(folder.root), *ENCODE] + (["--overwrite"] if overwrite else []),
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=_user_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("latentcache: error: ") and "00000.parquet" in last and "choose another output" in last
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr
    assert folder.digests() == before, "a file img2dataset wrote was changed"
    assert sorted(folder.root.rglob("*")) == entries, "something was added to img2dataset's folder"


def test_a_tar_completed_after_its_shard_was_committed_is_redone(made, ray_cluster, tmp_path, caplog):
    folders, _, _ = made
    source = folders["originals"]
    growing = tmp_path / "growing"
    growing.mkdir()
    for suffix in (".tar", ".parquet", "_stats.json"):  # shard 00000 finished
        shutil.copy(source.root / f"00000{suffix}", growing)
    whole = (source.root / "00001.tar").read_bytes()
    members = tar_members(whole)
    cut_member = next(m for m in members if m.offset_data + m.size > len(whole) * 0.6 and m.size >= 2)
    (growing / "00001.tar").write_bytes(whole[: cut_member.offset_data + cut_member.size // 2])  # still being written
    out = str(tmp_path / "latents")

    assert _encode(str(growing), out) == 0
    cut = {r.name: r for r in Ledger(out).job_records()}["00001"]
    assert any(e.stage == "read" and "the tar ends after" in e.reason for e in cut.errors), cut.errors

    for suffix in (".tar", ".parquet", "_stats.json"):  # img2dataset finishes the shard
        shutil.copy(source.root / f"00001{suffix}", growing)
    with caplog.at_level(logging.WARNING, logger="pipeline.core.runner"):
        assert _encode(str(growing), out) == 0
    assert "changed since their output was committed; redoing them: 00001" in caplog.text

    expected = {**source.samples("00000"), **source.samples("00001")}
    keys = [key for key, _, _ in read_latents(out)]
    errors = [r["key"] for r in _errors_table(out)]
    assert len(keys) == len(set(keys)) and len(errors) == len(set(errors)), "a key twice"
    assert not set(keys) & set(errors)
    assert sorted(keys + errors) == sorted(expected), "every key of the two tars once, nothing lost"
    assert all(r["stage"] != "read" for r in _errors_table(out)), "the cut tar's error outlived its redo"
    assert len(keys) + len(errors) == sum(s["successes"] for s in I2DFolder(growing).stats().values())
    assert verify_output(out, source=[str(growing)]).ok


def test_the_readers_read_the_latent_folder_as_it_is(made, encoded, tmp_path, monkeypatch):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    folders, _, _ = made
    out = encoded["originals"]
    errored = {r["key"] for r in _errors_table(out)}
    expected = {k: v["txt"].decode("utf-8") for k, v in folders["originals"].samples().items() if k not in errored}
    assert len(expected) == 27

    df = pd.read_parquet(out)
    assert len(df) == 27 and dict(zip(df["key"], df["txt"])) == expected
    table = ds.dataset(out, format="parquet").to_table(columns=["key", "txt"])
    assert table.num_rows == 27 and dict(zip(*table.to_pydict().values())) == expected
    frame = pl.read_parquet(f"{out}/*.parquet")
    assert frame.height == 27 and dict(zip(frame["key"], frame["txt"])) == expected
    db = duckdb.connect()
    try:
        got = db.execute(f"SELECT key, txt FROM read_parquet('{out}/*.parquet')").fetchall()
    finally:
        db.close()
    assert len(got) == 27 and dict(got) == expected

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=out, cache_dir=str(tmp_path / "hf"), split="train")
    assert loaded.num_rows == 27 and dict(zip(loaded["key"], loaded["txt"])) == expected

    from pipeline.dataset import LatentDataset  # and the training reader: txt as str, json parsed

    items = list(LatentDataset(out))
    assert len(items) == 27 and {i["key"]: i["txt"] for i in items} == expected
    assert all(i["json"]["key"] == i["key"] and i["json"]["caption"] == i["txt"] for i in items)
