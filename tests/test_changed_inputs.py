"""Issue 13, defect 2: a shard that changes after it was cached is redone. A tar cut short (as it is
while a dataset tool still writes it under its final name) is encoded as far as it goes; once it
is whole, the rerun sees another size in the listing it makes anyway, redoes that shard and says
so; `changed_inputs: error` stops instead; `verify --source` names it."""

from __future__ import annotations

import logging
import os

import pytest

from pipeline.config import EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
from pipeline.core.ledger import Ledger
from pipeline.core.runner import ChangedInputError, run_job
from pipeline.io.latent_reader import read_latents
from pipeline.io.shards import input_version, list_inputs, version_change
from pipeline.verify import verify_output
from tests import imagedata

PER_SHARD = 5


def _inputs(folder) -> dict[str, bytes]:
    """Three tar shards of PER_SHARD photos; returns each tar's whole bytes."""
    whole = {}
    for s in range(3):
        samples = [{"__key__": f"s{s}/{i}", "jpg": imagedata.encode(imagedata.photo(max_side=256), "JPEG"),
                    "txt": f"caption {s} {i}"} for i in range(PER_SHARD)]
        path = imagedata.write_tar_shard(str(folder / f"part-{s}.tar"), samples)
        whole[path] = open(path, "rb").read()
    return whole


def _cfg(tmp_path, **kw) -> EncodeConfig:
    return EncodeConfig(input=(str(tmp_path / "in"),), output=str(tmp_path / "out"), actors=1, max_error_rate=1.0,
                        vae=VAEConfig(source="random:tiny", dtype="float32"), preprocess=PreprocessConfig(resolution=64),
                        retry=RetryConfig(max_attempts=1), **kw)


def test_a_shard_completed_after_it_was_committed_is_redone(ray_cluster, tmp_path, caplog):
    whole = _inputs(tmp_path / "in")
    partial = str(tmp_path / "in" / "part-1.tar")
    with open(partial, "wb") as f:  # cut to 60 %, as a dataset tool leaves it mid-write
        f.write(whole[partial][: int(len(whole[partial]) * 0.6)])
    cfg = _cfg(tmp_path)
    first = run_job("encode", cfg, progress=False)
    assert first.processed_shards == 3
    cut = {r.name: r for r in Ledger(cfg.output).job_records()}["part-1"]
    assert cut.input_version["size"] == int(len(whole[partial]) * 0.6) and "mtime" in cut.input_version
    assert cut.samples_written < PER_SHARD and len(cut.errors) == 1
    assert f"the tar ends after {cut.input_version['size']:,} bytes, and this member's" in cut.errors[0].reason

    with open(partial, "wb") as f:
        f.write(whole[partial])
    # The recorded mtime back: a clock that moved little cannot hide the change, the size tells it.
    mtime = float(cut.input_version["mtime"])
    os.utime(partial, (mtime, mtime))
    report = verify_output(cfg.output, source=[str(tmp_path / "in")])
    changed = [v for v in report.violations if v.kind == "source_changed"]
    assert [v.shard for v in changed] == ["part-1"] and "size" in changed[0].message

    with pytest.raises(ChangedInputError, match=r"1 input shard\(s\) changed .*part-1 \(size .* bytes"):
        run_job("encode", _cfg(tmp_path, changed_inputs="error"), progress=False)
    assert {r.name: r for r in Ledger(cfg.output).job_records()}["part-1"] == cut, "the error mode changed nothing"

    with caplog.at_level(logging.WARNING, logger="pipeline.core.runner"):
        again = run_job("encode", cfg, progress=False)
    assert again.processed_shards == 1 and again.skipped_shards == 2 and again.inputs_changed == 1
    assert caplog.text.count("1 input shard(s) changed since their output was committed; redoing them: part-1") == 1
    keys = sorted(k for k, _, _ in read_latents(cfg.output))
    assert keys == sorted(f"s{s}/{i}" for s in range(3) for i in range(PER_SHARD)), "every key once"
    assert verify_output(cfg.output, source=[str(tmp_path / "in")]).ok
    assert run_job("encode", cfg, progress=False).processed_shards == 0  # and now it is complete


def test_versions_come_from_the_listing_with_the_stores_etag(s3_bucket) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.pipe({f"{s3_bucket}/in/a.tar": b"a" * 10, f"{s3_bucket}/in/b.tar": b"b" * 20})
    for pattern in (f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/in/{{a,b}}.tar", f"s3://{s3_bucket}/in/*.tar"):
        listed = list_inputs([pattern])
        assert set(listed) == set(listed.versions) == {"a", "b"} and listed.versions["b"]["size"] == 20
        assert all(len(v["etag"]) == 32 for v in listed.versions.values()), listed.versions  # MD5 of a plain PUT
    before = list_inputs([f"s3://{s3_bucket}/in"]).versions["a"]
    fs.pipe(f"{s3_bucket}/in/a.tar", b"c" * 10)  # same size, other bytes
    after = list_inputs([f"s3://{s3_bucket}/in"]).versions["a"]
    assert version_change(before, after) == f"etag {before['etag']} -> {after['etag']}"
    assert version_change({}, after) is None, "a record made before versions were kept tells no change"
    assert input_version({"size": 3, "mtime": 1.5}) == {"size": 3, "mtime": "1.5"}
