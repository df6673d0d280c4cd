"""Issue 13, defect 1: latentcache never replaces or removes a file it did not write. A dataset
tool's folder (img2dataset writes `00000.tar` beside `00000.parquet` and `00000_stats.json`) given
as both input and output is refused at planning, before Ray starts, naming the file; `--overwrite`
removes only what latentcache wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.core.ledger import ForeignObjectError, Ledger, build_manifest
from tests import imagedata


def _dataset_folder(root: Path, shards: int = 2) -> Path:
    """What img2dataset leaves: per shard a tar, a Parquet table of url/caption/status, a stats file."""
    root.mkdir(parents=True)
    for s in range(shards):
        name = f"{s:05d}"
        samples = [{"__key__": f"{name}{i:04d}", "jpg": imagedata.encode(imagedata.photo(max_side=64), "JPEG"),
                    "txt": f"caption {s} {i}"} for i in range(2)]
        imagedata.write_tar_shard(str(root / f"{name}.tar"), samples)
        pq.write_table(pa.table({"key": [f"{name}{i:04d}" for i in range(2)],
                                 "url": [f"http://127.0.0.1/{s}/{i}.jpg" for i in range(2)],
                                 "caption": [f"caption {s} {i}" for i in range(2)],
                                 "status": ["success"] * 2}), str(root / f"{name}.parquet"))
        (root / f"{name}_stats.json").write_text(json.dumps({"count": 2, "successes": 2}))
    return root


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_set_to_a_dataset_folder_is_refused_and_its_files_are_left_as_they_were(tmp_path, capsys,
                                                                                          overwrite):
    folder = _dataset_folder(tmp_path / "data")
    before = imagedata.digests(folder)
    args = ["encode", "--input", str(folder), "--output", str(folder), "--vae", "random:tiny",
            "--resolution", "64", "--no-progress"] + (["--overwrite"] if overwrite else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds 2 file(s) that this job would replace" in err
    assert "00000.parquet, 00001.parquet" in err and "choose another output" in err
    assert "Traceback" not in err and "Started a local Ray" not in err
    assert imagedata.digests(folder) == before, "a file latentcache did not write was touched"


def test_a_resume_is_not_refused_for_its_own_files_but_a_stranger_at_a_new_shards_name_is(tmp_path) -> None:
    out = tmp_path / "out"
    shards = {"a": "s3://in/a.tar", "b": "s3://in/b.tar"}
    manifest = build_manifest(kind="encode", identity={"kind": "encode", "x": 1}, shards=shards,
                              data_extension="parquet", code_version="0")
    ledger = Ledger(str(out))
    ledger.open_job(manifest, overwrite=False)
    (out / "a.parquet").write_bytes(b"ours, its record not yet written (a crash between the two)")
    (out / "notes.parquet").write_bytes(b"the user's, but no shard of this job has that name")
    assert Ledger(str(out)).foreign_objects(manifest) == []

    grown = build_manifest(kind="encode", identity={"kind": "encode", "x": 1}, shards={**shards, "c": "s3://in/c.tar"},
                           data_extension="parquet", code_version="0")
    (out / "c.parquet").write_bytes(b"someone else's")
    with pytest.raises(ForeignObjectError, match=r"already holds 1 file\(s\) .*: c\.parquet\."):
        Ledger(str(out)).refuse_foreign_objects(grown)
    assert (out / "c.parquet").read_bytes() == b"someone else's"


def test_a_fresh_output_with_whole_job_outputs_in_the_way_is_refused(tmp_path) -> None:
    out = tmp_path / "audit"
    out.mkdir()
    (out / "report.html").write_text("<html>a person's own report</html>")
    manifest = build_manifest(kind="audit", identity={"kind": "audit"}, shards={"a": "x"}, data_extension="parquet",
                              code_version="0", outputs=["report.html", "previews/"])
    assert Ledger(str(out)).foreign_objects(manifest) == ["report.html"]
