"""The decode job end to end, on a real local Ray and moto's S3: latents written by `encode` come
back as WebDataset image shards, read by webdataset itself, equal to the codec's own decode within
one level, under the same keys with their captions; every latent is written once or recorded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import DecodeConfig, EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
from pipeline.core.kind import PlanError
from pipeline.core.layout import CURRENT
from pipeline.core.ledger import Ledger
from pipeline.io.latent_reader import read_latents
from pipeline.jobs import run
from pipeline.jobs.decode import INFO_MEMBER, to_uint8
from pipeline.posterior import generator
from tests import imagedata
from tests.interrupt import kill_driver_after_first_commit
from vae import load_vae

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RES = 64
RETRY = RetryConfig(max_attempts=2, backoff_s=0.1, backoff_max_s=0.2)


def _samples(prefix: str, n: int, start: int = 0) -> list[dict]:
    photos = imagedata.real_photos(max_side=128)
    return [{"__key__": f"{prefix}/{i:03d}", "jpg": imagedata.encode(photos[i % len(photos)][1], "JPEG", quality=90),
             "txt": f"caption {prefix} {i} 🐈", "json": json.dumps({"i": i})} for i in range(start, start + n)]


def _encode(inputs: list[str], out: str, **kw) -> None:
    base = dict(input=tuple(inputs), output=out, vae=VAEConfig(source="random:tiny", seed=0, dtype="float32"),
                preprocess=PreprocessConfig(resolution=RES), latent_dtype="float32", batch_size=3, actors=2,
                decode_threads=2, max_error_rate=1.0, retry=RETRY)
    base.update(kw)
    run(EncodeConfig(**base), progress=False)


def _decode_cfg(inputs: list[str], out: str, **kw) -> DecodeConfig:
    base = dict(input=tuple(inputs), output=out, actors=2, batch_size=3, decode_threads=2, max_error_rate=1.0,
                retry=RETRY)
    base.update(kw)
    return DecodeConfig(**base)


def _read_tars(paths: list[str]) -> dict[str, dict]:
    """Every sample of the tars, as webdataset reads them (keys must be unique across shards)."""
    out: dict[str, dict] = {}
    for path in paths:
        for sample in wds.WebDataset(path, shardshuffle=False, empty_check=False):
            assert sample["__key__"] not in out, f"{sample['__key__']} written twice"
            out[sample["__key__"]] = sample
    return out


def _expected_images(latents_url: str, seed: int = 0) -> dict[str, np.ndarray]:
    codec = load_vae("random:tiny", seed=seed)
    out = {}
    for key, latent, _ in read_latents(latents_url):
        z = torch.from_numpy(latent.astype(np.float32))[None]
        out[key] = to_uint8(codec.decode(codec.unscale(z)))[0]
    return out


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def encoded(ray_cluster, tmp_path_factory) -> Path:
    """Three latent shards (Parquet) of real photos with captions, one broken image."""
    root = tmp_path_factory.mktemp("encoded")
    shards = [_samples("a", 4), _samples("b", 5), _samples("c", 2) + [{"__key__": "c/bad", "jpg": b"not a jpeg"}]]
    for i, samples in enumerate(shards):
        imagedata.write_tar_shard(str(root / "in" / f"part-{i:04d}.tar"), samples)
    _encode([str(root / "in")], str(root / "latents"))
    return root


def test_decode_gives_one_image_per_latent_equal_to_the_codec_and_rerun_does_nothing(encoded, tmp_path):
    out = tmp_path / "images"
    summary = run(_decode_cfg([str(encoded / "latents")], str(out)), progress=False)
    s = summary
    assert (s.total_shards, s.samples_read, s.samples_written, s.samples_errored) == (3, 11, 11, 0)
    tars = sorted(str(p) for p in out.glob("*.tar"))
    assert [Path(p).name for p in tars] == ["part-0000.tar", "part-0001.tar", "part-0002.tar"]
    got = _read_tars(tars)
    expected = _expected_images(str(encoded / "latents"))
    assert set(got) == set(expected)
    latents = {k: m for k, _, m in read_latents(str(encoded / "latents"))}
    for key, sample in got.items():
        diff = np.abs(_pixels(sample["png"]).astype(int) - expected[key].astype(int))
        assert diff.max() <= 1, (key, diff.max())
        assert sample["txt"].decode() == latents[key]["extras"]["txt"]  # passthrough members as they were
        assert json.loads(sample["json"]) == json.loads(latents[key]["extras"]["json"])
        info = json.loads(sample[INFO_MEMBER])
        assert info["vae_fingerprint"] == load_vae("random:tiny").fingerprint
        assert tuple(info["target_size"]) == (RES, RES)
        assert tuple(info["original_size"]) == latents[key]["original_size"]
    records_before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / CURRENT.records).iterdir())

    again = run(_decode_cfg([str(encoded / "latents")], str(out)), progress=False)
    assert again.processed_shards == 0 and again.skipped_shards == 3 and again.samples_read == 0
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / CURRENT.records).iterdir()) == records_before


@pytest.mark.s3
def test_encode_then_decode_on_s3(ray_cluster, s3_bucket, tmp_path):
    base = f"s3://{s3_bucket}"
    imagedata.write_tar_shard(f"{base}/data/train-000000.tar", _samples("s", 4))
    imagedata.write_tar_shard(f"{base}/data/train-000001.tar", _samples("t", 3))
    _encode([f"{base}/data/train-{{000000..000001}}.tar"], f"{base}/latents", format="safetensors")
    summary = run(_decode_cfg([f"{base}/latents"], f"{base}/images", image_format="webp", quality=100), progress=False)
    assert summary.samples_written == 7
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{base}/images") if p.endswith(".tar")) == \
        ["train-000000.tar", "train-000001.tar"]
    local = []
    for name in ("train-000000.tar", "train-000001.tar"):
        fs.get(f"{base}/images/{name}", str(tmp_path / name))
        local.append(str(tmp_path / name))
    got = _read_tars(local)
    assert set(got) == {f"s/{i:03d}" for i in range(4)} | {f"t/{i:03d}" for i in range(3)}
    assert all("webp" in s and s["txt"].decode().startswith("caption") for s in got.values())
    from pipeline.status import job_status

    assert job_status(f"{base}/images")["state"] == "complete"


def test_mixed_bucket_shapes_decode_per_shape(ray_cluster, tmp_path):
    photos = imagedata.real_photos(max_side=160)
    samples = [{"__key__": f"k{i}", "jpg": imagedata.encode(img, "JPEG"), "txt": name}
               for i, (name, img) in enumerate(photos)]
    imagedata.write_tar_shard(str(tmp_path / "in" / "mixed.tar"), samples)
    _encode([str(tmp_path / "in")], str(tmp_path / "latents"), format="safetensors",
            preprocess=PreprocessConfig(resolution=128, buckets=True, bucket_step=32))
    shapes = {latent.shape for _, latent, _ in read_latents(str(tmp_path / "latents"))}
    assert len(shapes) > 1
    run(_decode_cfg([str(tmp_path / "latents")], str(tmp_path / "images")), progress=False)
    got = _read_tars([str(tmp_path / "images" / "mixed.tar")])
    expected = _expected_images(str(tmp_path / "latents"))
    assert set(got) == set(expected)
    for key, sample in got.items():
        pixels = _pixels(sample["png"])
        assert pixels.shape == expected[key].shape
        assert tuple(json.loads(sample[INFO_MEMBER])["target_size"]) == pixels.shape[:2]
        assert np.abs(pixels.astype(int) - expected[key].astype(int)).max() <= 1


def test_another_vae_is_refused_naming_both(encoded, tmp_path):
    cfg = _decode_cfg([str(encoded / "latents")], str(tmp_path / "o"), vae=VAEConfig(source="random:tiny", seed=7))
    ours = load_vae("random:tiny", seed=0).fingerprint
    theirs = load_vae("random:tiny", seed=7).fingerprint
    with pytest.raises(PlanError, match=f"fingerprint {theirs}, but the latents were made with {ours}"):
        run(cfg, progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_hostile_keys_and_bad_latents_are_sample_errors(ray_cluster, tmp_path):
    photo = imagedata.encode(imagedata.photo(max_side=96), "JPEG")
    keys = ["good/0", "../evil", "a/../../b", "/abs", "c//d", "good/1"]
    imagedata.write_tar_members(str(tmp_path / "in" / "keys.tar"),
                                [(f"{k}.{ext}", data) for k in keys for ext, data in (("jpg", photo), ("txt", b"t"))])
    _encode([str(tmp_path / "in")], str(tmp_path / "latents"))
    written = {k for k, _, _ in read_latents(str(tmp_path / "latents"))}
    # Names that leave the shard are the reader's sample errors already; the rest is kept as it is.
    encode_errors = {e.key: e for r in Ledger(str(tmp_path / "latents")).job_records() for e in r.errors}
    assert {"../evil", "a/../../b", "/abs"} <= set(encode_errors) and not {"../evil", "a/../../b", "/abs"} & written
    assert all(e.stage == "read" for e in encode_errors.values())
    assert {"good/0", "good/1"} <= written

    summary = run(_decode_cfg([str(tmp_path / "latents")], str(tmp_path / "images")), progress=False)
    errors = {e.key: e for r in Ledger(str(tmp_path / "images")).job_records() for e in r.errors}
    assert all(e.stage == "write" and "cannot name tar members" in e.reason for e in errors.values())
    assert summary.samples_written + summary.samples_errored == summary.samples_read == len(written)
    import tarfile

    with tarfile.open(tmp_path / "images" / "keys.tar") as tar:
        names = tar.getnames()
    assert all(not n.startswith(("/", "..")) and "/../" not in n for n in names)
    assert {n.rsplit(".", 1)[0] for n in names if n.endswith(".png")} == {"good/0", "good/1"} | (written - set(errors))


def test_posterior_sampling_is_seeded_and_differs_from_the_mode(encoded, tmp_path):
    run(_decode_cfg([str(encoded / "latents")], str(tmp_path / "mode")), progress=False)
    for name in ("p1", "p2", "p3"):
        seed = 5 if name != "p3" else 6
        run(_decode_cfg([str(encoded / "latents")], str(tmp_path / name), sample="posterior", seed=seed),
            progress=False)
    read = {n: _read_tars(sorted(str(p) for p in (tmp_path / n).glob("*.tar"))) for n in ("mode", "p1", "p2", "p3")}
    key = "a/000"
    px = {n: _pixels(read[n][key]["png"]).astype(int) for n in read}
    assert np.array_equal(px["p1"], px["p2"])  # same seed, same image
    assert not np.array_equal(px["p1"], px["mode"]) and not np.array_equal(px["p1"], px["p3"])
    # And it is exactly mean + scaling * std * eps(seed, key), decoded.
    codec = load_vae("random:tiny", seed=0)
    (_, latent, meta), = [r for r in read_latents(str(encoded / "latents"), with_logvar=True) if r[0] == key]
    eps = torch.randn(latent.shape, generator=generator(5, key)).numpy()
    z = latent + codec.scaling_factor * np.exp(0.5 * meta["logvar"]) * eps  # written out, not the helper
    want = to_uint8(codec.decode(codec.unscale(torch.from_numpy(z.astype(np.float32))[None])))[0]
    assert np.abs(px["p1"] - want.astype(int)).max() <= 1


@pytest.mark.driver
def test_decode_interrupted_then_resumed_writes_every_key_once(ray_cluster, tmp_path):
    import ray

    for s in range(6):
        imagedata.write_tar_shard(str(tmp_path / "in" / f"part-{s:04d}.tar"), _samples(f"s{s}", 3))
    _encode([str(tmp_path / "in")], str(tmp_path / "latents"), preprocess=PreprocessConfig(resolution=256))
    out = tmp_path / "images"
    args = ["decode", "--input", str(tmp_path / "latents"), "--output", str(out), "--batch-size", "1",
            "--actors", "1", "--address", ray.get_runtime_context().gcs_address, "--no-progress"]
    done_before = kill_driver_after_first_commit(args, out / CURRENT.records)
    assert 1 <= done_before < 6 and not (out / CURRENT.success).exists()

    resumed = run(_decode_cfg([str(tmp_path / "latents")], str(out), actors=1), progress=False)
    assert resumed.skipped_shards >= done_before and resumed.processed_shards == 6 - resumed.skipped_shards
    got = _read_tars(sorted(str(p) for p in out.glob("*.tar")))
    assert sorted(got) == sorted(f"s{s}/{i:03d}" for s in range(6) for i in range(3))
    assert (out / CURRENT.success).exists() and not (out / CURRENT.tmp).exists()
