"""The decode worker in-process (no Ray): the shard skeleton with a real codec and tar sink, on
latent shards written by the project's writers, including latents no decoder can take."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from pipeline.config import DecodeConfig
from pipeline.core.kind import JobPlan, PermanentShardError, PlanContext, ShardContext, shard_metadata
from pipeline.core.ledger import Ledger, build_manifest
from pipeline.core.scheduler import ShardTask
from pipeline.core.shard import ShardProcessor
from pipeline.io.latent_writers import LatentRecord, make_writer
from pipeline.jobs.decode import DecodeJob, PreparedLatent
from pipeline.jobs.encode import vae_identity
from pipeline.samples import SampleError
from vae import inspect_vae


def _latents(tmp_path, fingerprint: str | None = None) -> str:
    info = inspect_vae("random:tiny")
    meta = {"kind": "encode", **vae_identity(fingerprint or info.fingerprint, info.preset, "float32"),
            "vae_source": "random:tiny", "vae_seed": 0}
    meta = shard_metadata(JobPlan(inputs={}, identity=meta, provenance={}, data_extension="parquet"))
    rng = np.random.default_rng(0)
    with make_writer("parquet", str(tmp_path / "lat"), "s", meta, latent_dtype="float32", columns=("txt",)) as w:
        for key, shape in (("ok", (4, 4, 4)), ("wide", (16, 4, 4)), ("ok2", (4, 2, 6))):
            z = rng.standard_normal(shape).astype(np.float32)
            w.add(LatentRecord(key, z, z - 3, (40, 40), (0, 0), (shape[1] * 8, shape[2] * 8), extras={"txt": b"x"}))
        w.commit()
    return str(tmp_path / "lat" / "s.parquet")


def _worker(tmp_path, url: str, **kw):
    cfg = DecodeConfig(input=(url,), output=str(tmp_path / "out"), batch_size=2, decode_threads=1, **kw)
    kind = DecodeJob()
    inputs = kind.inputs(cfg)
    plan = kind.plan(cfg, inputs, PlanContext(device="cpu"))
    Ledger(cfg.output).open_job(build_manifest(kind="decode", identity=plan.identity, shards=plan.inputs,
                                               data_extension="tar", code_version="test"), overwrite=False)
    return kind.worker(cfg, plan), plan, cfg


def test_wrong_shape_is_a_sample_error_and_the_rest_is_written(tmp_path):
    url = _latents(tmp_path)
    worker, plan, cfg = _worker(tmp_path, url)
    result = ShardProcessor(worker, output=cfg.output, identity=plan.identity).process(ShardTask("s", url))
    assert (result.samples_read, result.samples_written, result.samples_errored) == (3, 2, 1)
    (record,) = Ledger(cfg.output).job_records()
    (error,) = record.errors
    assert error.key == "wide" and error.stage == "preprocess"
    assert "shape (16, 4, 4); expected (4, h, w)" in error.reason
    with tarfile.open(tmp_path / "out" / "s.tar") as tar:
        assert sorted(tar.getnames()) == ["ok.latentcache.json", "ok.png", "ok.txt",
                                          "ok2.latentcache.json", "ok2.png", "ok2.txt"]


def test_non_finite_latent_and_missing_logvar_are_named(tmp_path):
    url = _latents(tmp_path)
    worker, _, _ = _worker(tmp_path, url, sample="posterior")
    task = ShardTask("s", url)
    z = np.ones((4, 2, 2), np.float32)
    z[0, 0, 0] = np.inf
    bad = worker.prepare(("k", z, {"logvar": np.zeros_like(z)}), task)
    assert isinstance(bad, SampleError) and "1 non-finite value(s)" in bad.reason
    no_logvar = worker.prepare(("k", np.ones((4, 2, 2), np.float32), {"logvar": None}), task)
    assert isinstance(no_logvar, SampleError) and "log-variance" in no_logvar.reason
    good = worker.prepare(("k", np.ones((4, 2, 2), np.float32), {"logvar": np.full((4, 2, 2), -2.0, np.float32)}), task)
    assert isinstance(good, PreparedLatent) and not np.allclose(good.latent, 1.0)


def test_run_flags_keep_the_latents_own_vae(tmp_path):
    """--dtype or --device without --vae change how the latents' VAE runs, not which VAE it is."""
    from pipeline.config import DecodeVAEConfig

    url = _latents(tmp_path)
    worker, plan, _ = _worker(tmp_path, url, vae=DecodeVAEConfig(dtype="float32", device="cpu"))
    assert plan.worker_args["vae"]["source"] == "random:tiny" and plan.worker_args["vae"]["device"] == "cpu"
    assert worker.codec.fingerprint == inspect_vae("random:tiny").fingerprint


def test_an_output_of_latentcache_0_1_decodes_with_its_own_vae(tmp_path):
    import json

    from pipeline.core.ledger import ShardRecord, identity_hash

    _latents(tmp_path)  # shard metadata as 0.1 wrote it: vae_source, vae_fingerprint, preset, ...
    info = inspect_vae("random:tiny")
    old_identity = {"fingerprint": info.fingerprint, "preset": "tiny", "scaling_factor": 0.18215, "shift_factor": 0.0,
                    "format": "parquet", "latent_dtype": "float32", "preprocess": {}}
    h = identity_hash(old_identity)
    folder = tmp_path / "lat"
    (folder / "_records").mkdir()
    record = ShardRecord(name="s", input_url="in/s.tar", data_file="s.parquet", samples_read=3, samples_written=3,
                         errors=(), bytes=(folder / "s.parquet").stat().st_size, sha256="x", identity_hash=h)
    as_0_1 = {k: v for k, v in record.to_dict().items() if k != "counters"}
    (folder / "_records" / "s.json").write_text(json.dumps(as_0_1))
    (folder / "_latentcache.json").write_text(json.dumps({"version": 1, "identity": old_identity, "identity_hash": h,
                                                          "shards": {"s": "in/s.tar"}, "total_shards": 1}))
    import shutil

    shutil.rmtree(folder / ".latentcache", ignore_errors=True)
    worker, plan, _ = _worker(tmp_path, str(folder))
    assert plan.inputs == {"s": str(folder / "s.parquet")}
    assert plan.identity["vae_fingerprint"] == info.fingerprint and plan.worker_args["vae"]["source"] == "random:tiny"


def test_a_shard_of_another_vae_cannot_succeed(tmp_path):
    good = _latents(tmp_path)
    worker, _, _ = _worker(tmp_path, good)
    other = _latents(tmp_path / "x", fingerprint="random-0000000000000000")
    with pytest.raises(PermanentShardError, match="made with the VAE random-0000000000000000"):
        task = ShardTask("s", other)
        list(worker.read(task, ShardContext(task)))


def test_latent_inputs_expand_braces_and_globs_and_check_names(tmp_path):
    from pipeline.io.latent_reader import expand_latent_inputs
    from pipeline.io.shards import ShardListingError

    for name in ("p-0", "p-1"):
        with make_writer("parquet", str(tmp_path), name, {}) as w:
            w.commit()
    (tmp_path / ".latentcache" / "errors.parquet").write_bytes(b"bookkeeping, never a shard")
    got = expand_latent_inputs([f"{tmp_path}/p-{{0..1}}.parquet", f"{tmp_path}/**/*.parquet"])
    assert got == [f"{tmp_path}/p-0.parquet", f"{tmp_path}/p-1.parquet"]
    with pytest.raises(ShardListingError, match=r"1 of 3 named shard\(s\) do not exist: .*p-2.parquet"):
        expand_latent_inputs([f"{tmp_path}/p-{{0..2}}.parquet"])
    with pytest.raises(ShardListingError, match="matched no .parquet or .safetensors shards"):
        expand_latent_inputs([f"{tmp_path}/q-*.parquet"])
