"""The audit job end to end, on a real local Ray and moto's S3: an audit's scores are those computed
directly from the source image (prepared as the encoder did) and the decoded latent; sampled audits
pick distinct keys by seed; a wrong scaling factor is flagged; the PSNR gate sets the exit code;
a source key missing from the cache is reported; the report opens in a real browser."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.cli import main
from pipeline.config import AuditConfig, EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
from pipeline.io.latent_reader import read_latents
from pipeline.io.tar_reader import iter_shard
from pipeline.jobs import run
from pipeline.jobs.audit import sample_rows
from pipeline.metrics import to_pixels
from pipeline.transforms import hflip, prepare
from tests import imagedata
from vae import load_vae
from vae.weights import BUILTIN_DIR

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RETRY = RetryConfig(max_attempts=2, backoff_s=0.1, backoff_max_s=0.2)
DEMO_VAE = Path(BUILTIN_DIR) / "tiny-demo"


def _samples(prefix: str, n: int, max_side: int = 160) -> list[dict]:
    photos = imagedata.real_photos(max_side=max_side)
    return [{"__key__": f"{prefix}/{i:03d}", "jpg": imagedata.encode(photos[i % len(photos)][1], "JPEG", quality=90),
             "txt": f"caption {prefix} {i}"} for i in range(n)]


def _encode(inputs: list[str], out: str, vae: VAEConfig, **kw) -> None:
    base = dict(input=tuple(inputs), output=out, vae=vae, latent_dtype="float32", batch_size=3, actors=2,
                decode_threads=2, max_error_rate=1.0, retry=RETRY)
    base.update(kw)
    run(EncodeConfig(**base), progress=False)


def _audit_cfg(latents: str, out: str, **kw) -> AuditConfig:
    base = dict(input=(latents,), output=out, actors=2, batch_size=3, decode_threads=2, retry=RETRY, worst=4)
    base.update(kw)
    return AuditConfig(**base)


@pytest.fixture(scope="module")
def s3_cache(ray_cluster, s3_server, tmp_path_factory):
    """Two source shards on S3 (real photos of many aspect ratios, one broken image), encoded with
    buckets and flips by a random-weights tiny VAE; then one sample added to a source shard, so the
    cache misses it."""
    import boto3

    bucket = "audit-" + os.urandom(4).hex()
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=bucket)
    base = f"s3://{bucket}"
    first = _samples("a", 5)
    second = _samples("b", 4) + [{"__key__": "b/broken", "jpg": b"not a jpeg"}]
    imagedata.write_tar_shard(f"{base}/src/train-000000.tar", first)
    imagedata.write_tar_shard(f"{base}/src/train-000001.tar", second)
    _encode([f"{base}/src/train-{{000000..000001}}.tar"], f"{base}/latents", VAEConfig(source="random:tiny"),
            preprocess=PreprocessConfig(resolution=64, buckets=True, bucket_step=16, flip=True))
    late = _samples("a", 6)[5:]
    late[0]["__key__"] = "a/late"
    imagedata.write_tar_shard(f"{base}/src/train-000000.tar", first + late)
    return base


def _expected_scores(base: str) -> dict[tuple[str, bool], tuple[float, float]]:
    """(key, flipped) -> (psnr, ssim), computed here from the source and the stored latents."""
    codec = load_vae("random:tiny")
    sources = {}
    for name in ("train-000000", "train-000001"):
        for s in iter_shard(f"{base}/src/{name}.tar"):
            if isinstance(s, dict):
                sources[s["__key__"]] = s
    out = {}
    for key, latent, meta in read_latents(f"{base}/latents"):
        pre = PreprocessConfig(**json.loads(meta["shard_metadata"]["preprocess"]))
        pixels = prepare(sources[key], pre).pixels
        for flipped, z in ((False, latent), (True, meta["latent_flip"])):
            image = codec.decode(codec.unscale(torch.from_numpy(z.astype(np.float32))[None]))[0].numpy()
            src = hflip(pixels) if flipped else pixels
            recon = to_pixels(image)
            out[(key, flipped)] = (peak_signal_noise_ratio(src, recon, data_range=255),
                                   structural_similarity(src, recon, data_range=255, channel_axis=2))
    return out


@pytest.mark.s3
def test_audit_scores_equal_direct_computation_and_report_missing_keys(s3_cache):
    base = s3_cache
    summary = run(_audit_cfg(f"{base}/latents", f"{base}/audit"), progress=False)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    with fs.open(f"{base}/audit/metrics.parquet", "rb") as f:
        metrics = pd.read_parquet(f)
    expected = _expected_scores(base)
    assert len(metrics) == len(expected) == 18  # 9 encoded keys, each with its flipped latent
    assert not metrics.duplicated(["key", "flipped"]).any()
    for row in metrics.itertuples():
        psnr, ssim = expected[(row.key, row.flipped)]
        assert row.psnr == pytest.approx(psnr, abs=0.02), row.key
        assert row.ssim == pytest.approx(ssim, abs=2e-3), row.key
        assert row.shard in ("train-000000", "train-000001") and row.height * row.width >= 48 * 48
    assert set(metrics.columns) >= {"key", "shard", "psnr", "ssim", "mae", "saturated", "latent_non_finite",
                                    "output_non_finite"}
    report = json.loads(fs.cat_file(f"{base}/audit/summary.json"))
    assert report["quality"]["psnr"]["mean"] == pytest.approx(float(np.mean([p for p, _ in expected.values()])),
                                                              abs=0.02)
    c = report["completeness"]
    assert (c["source_samples"], c["latents"], c["encode_errors"], c["missing"]) == (11, 9, 1, 1)
    assert c["missing_examples"] == [{"key": "a/late", "shard": f"{base}/src/train-000000.tar"}]
    assert report["vae"]["random_weights"] is True and report["vae"]["source"] == "random:tiny"
    assert summary.result["psnr_mean"] == report["quality"]["psnr"]["mean"]
    assert summary.result["report"] == f"{base}/audit/report.html"
    page = fs.cat_file(f"{base}/audit/report.html").decode()
    assert "a/late" in page and "random weights" in page
    for i in range(4):
        assert fs.exists(f"{base}/audit/images/worst-{i:03d}.png") and fs.exists(f"{base}/audit/images/random-{i:03d}.png")
    # The lowest PSNRs are the ones shown as the worst.
    assert [w["psnr"] for w in report["worst"]] == sorted(metrics.psnr)[:4]


@pytest.mark.s3
def test_sampled_audit_picks_n_distinct_keys_by_seed(s3_cache):
    base = s3_cache

    def keys(out: str, seed: int) -> list[str]:
        run(_audit_cfg(f"{base}/latents", f"{base}/{out}", samples=4, seed=seed), progress=False)
        with fsspec.open(f"{base}/{out}/metrics.parquet", "rb") as f:
            m = pd.read_parquet(f)
        assert m.groupby("key").size().eq(2).all()  # a key is audited with its flipped latent
        return sorted(m.key.unique())

    first, again = keys("sample-1", 7), keys("sample-2", 7)
    assert len(first) == 4 and first == again
    # The keys are the seeded pick over the whole cache, in stored order per shard.
    stored = {}
    for key, _, meta in read_latents(f"{base}/latents"):
        stored.setdefault(meta["shard"], []).append(key)
    rows = sample_rows({n: len(k) for n, k in stored.items()}, 4, 7)
    assert first == sorted(stored[n][i] for n, picks in rows.items() for i in picks)


@pytest.fixture(scope="module")
def demo_cache(ray_cluster, tmp_path_factory) -> Path:
    """Real photos encoded with the built-in trained tiny VAE, and again with a copy of it whose
    config names a scaling factor 4x too large (latents scaled with a wrong factor)."""
    if not DEMO_VAE.is_dir():
        pytest.fail(f"the built-in demo VAE is missing at {DEMO_VAE}; train it with jobs/train_demo_vae.py")
    root = tmp_path_factory.mktemp("demo-cache")
    imagedata.write_tar_shard(str(root / "src" / "photos-000000.tar"), _samples("p", 6, max_side=256))
    _encode([str(root / "src")], str(root / "latents"), VAEConfig(source="builtin:tiny-demo"),
            preprocess=PreprocessConfig(resolution=128))
    wrong = root / "wrong-vae"
    shutil.copytree(DEMO_VAE, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["scaling_factor"] *= 4
    (wrong / "config.json").write_text(json.dumps(config))
    _encode([str(root / "src")], str(root / "latents-wrong"), VAEConfig(source=str(wrong)),
            preprocess=PreprocessConfig(resolution=128))
    return root


def test_wrong_scaling_factor_is_flagged_and_the_psnr_gate_sets_the_exit_code(demo_cache, tmp_path, capsys):
    args = ["audit", "--latents", str(demo_cache / "latents"), "--worst", "3", "--actors", "2", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "ok"), "--fail-under-psnr", "15"]) == 0
    good = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert good["latents"]["scaling_ok"] is True and good["passed"] is True
    assert good["vae"]["source"] == "builtin:tiny-demo" and good["vae"]["random_weights"] is False
    assert good["quality"]["psnr"]["mean"] > 15

    # The same finished audit gated higher: nothing is recomputed, the exit code still follows the gate.
    assert main([*args, "--output", str(tmp_path / "ok"), "--fail-under-psnr", "99"]) == 3
    assert "below --fail-under-psnr 99" in capsys.readouterr().err
    assert (tmp_path / "ok" / "report.html").is_file()

    assert main([*args[:2], str(demo_cache / "latents-wrong"), *args[3:], "--output", str(tmp_path / "wrong")]) == 0
    wrong = json.loads((tmp_path / "wrong" / "summary.json").read_text())
    assert wrong["latents"]["scaling_ok"] is False
    assert wrong["latents"]["std_rms"] == pytest.approx(4 * good["latents"]["std_rms"], rel=0.02)
    assert "Latent scaling looks wrong" in (tmp_path / "wrong" / "report.html").read_text()
    # The decode itself inverts the same wrong factor, so reconstructions are as good: only the statistics tell.
    assert wrong["quality"]["psnr"]["mean"] == pytest.approx(good["quality"]["psnr"]["mean"], abs=0.5)


@pytest.mark.browser
def test_report_opens_in_a_real_browser_with_every_image_loaded(demo_cache, tmp_path, browser):
    out = tmp_path / "audit"
    run(_audit_cfg(str(demo_cache / "latents"), str(out), worst=3), progress=False)
    shot = tmp_path / "report.png"
    page = browser(out / "report.html", shot)
    assert page.title.startswith("latentcache audit:")
    assert len(page.images) == 2 + 3 + 3  # two figures, the worst 3, a random 3
    assert page.broken_images() == []
    assert all(img["natural_width"] > 0 for img in page.images)
    assert page.outside(out) == []  # nothing from outside the report's folder, nothing from the internet
    assert page.text_length > 500
    assert shot.stat().st_size > 50_000
