"""Per-channel latent normalisation (diffusers' `latents_mean` / `latents_std`, issue 13 part 3):
read from a diffusers folder and applied as diffusers' pipelines invert it, refused when
inconsistent, carried in the identity and shard metadata, inverted by decode and the training
reader; and a config field that could change the latents and is not understood is refused."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.jobs.vae_worker import vae_identity
from pipeline.posterior import sample_scaled
from tests.vae_reference import diffusers_vae, rel_err
from vae import PRESETS, get_preset, load_vae
from vae.presets import LatentScaling, check_against_config, preset_from_diffusers_config

MEAN = (0.4, -0.7, 1.3, -0.2)
STD = (2.5, 0.6, 4.0, 1.7)
# The tiny architecture with Playground-like statistics: a VAE whose config normalises per channel.
NORMALISED = dataclasses.replace(get_preset("tiny"), name="tiny-normalised", latents_mean=MEAN, latents_std=STD)


@pytest.fixture(scope="module")
def normalised_folder(tmp_path_factory) -> str:
    """A VAE folder as diffusers' `save_pretrained` writes it, with latents_mean/latents_std."""
    folder = tmp_path_factory.mktemp("vae") / "normalised"
    diffusers_vae(NORMALISED, seed=3).save_pretrained(str(folder), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["latents_mean"] == list(MEAN) and config["latents_std"] == list(STD)
    return str(folder)


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1


def test_latents_equal_diffusers_normalised_mean_and_decode_inverts_as_its_pipelines_do(normalised_folder):
    from diffusers import AutoencoderKL as DiffusersVAE

    reference = DiffusersVAE.from_pretrained(normalised_folder).eval()
    codec = load_vae(normalised_folder)
    assert codec.scaling.latents_mean == MEAN and codec.scaling.latents_std == STD
    x = _images()
    with torch.no_grad():
        mean = reference.encode(x).latent_dist.mean
        sf, lm, ls = (reference.config.scaling_factor, torch.tensor(reference.config.latents_mean).view(1, 4, 1, 1),
                      torch.tensor(reference.config.latents_std).view(1, 4, 1, 1))
        expected = (mean - lm) * sf / ls
        ours = codec.scale(codec.encode(x).mean)
        assert (ours - expected).abs().max() <= 1e-3 * expected.abs().max()
        # Without the statistics the latents would be far off (the defect: 0.47 relative error).
        assert rel_err(mean * sf, expected) > 0.3
        # diffusers' SDXL pipelines decode latents * std / scale + mean.
        image = reference.decode(ours * ls / sf + lm).sample
        assert rel_err(codec.decode(codec.unscale(ours)), image) < 1e-4
    assert torch.allclose(codec.unscale(codec.scale(mean)), mean, atol=1e-5)


def test_identity_carries_the_statistics_only_when_the_vae_has_them():
    plain = vae_identity("fp", get_preset("sd15"), "float32")
    # Unchanged for every VAE without them, so outputs written before this resume as before.
    assert plain == {"vae_fingerprint": "fp", "preset": "sd15", "scaling_factor": 0.18215, "shift_factor": 0.0,
                     "compute_dtype": "float32"}
    normalised = vae_identity("fp", NORMALISED, "float32")
    assert normalised["latents_mean"] == list(MEAN) and normalised["latents_std"] == list(STD)
    assert LatentScaling.from_metadata(normalised) == NORMALISED.scaling
    # Shard metadata holds strings (JSON for the lists): it reads back to the same scaling.
    as_metadata = {k: json.dumps(v) if isinstance(v, list) else repr(v) for k, v in normalised.items()
                   if k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}
    assert LatentScaling.from_metadata(as_metadata) == NORMALISED.scaling


def test_presets_define_them_and_a_folder_that_disagrees_with_its_preset_is_refused():
    playground = PRESETS["playground-v2.5"]
    assert playground.scaling.per_channel and playground.arch == PRESETS["sdxl"].arch
    config = playground.diffusers_config()
    check_against_config(playground, config)  # its own config agrees
    wrong_std = {**config, "latents_std": [1.0, 1.0, 1.0, 1.0]}
    with pytest.raises(ValueError, match=r"preset 'playground-v2.5' has latents_std=\[8.4927, .*\], but the "
                                         r"weights' config.json says \[1.0, 1.0, 1.0, 1.0\]"):
        check_against_config(playground, wrong_std)
    with pytest.raises(ValueError, match=r"preset 'sdxl' has latents_mean=null, but .* says \[-1.6574"):
        check_against_config(PRESETS["sdxl"], {**config, "scaling_factor": 0.13025})


@pytest.mark.parametrize("change, message", [
    ({"latents_std": None}, r"latents_mean is given without latents_std; expected both"),
    ({"latents_mean": None}, r"latents_std is given without latents_mean; expected both"),
    ({"latents_mean": [0.0, 0.0, 0.0]}, r"latents_mean has 3 values and latents_std 4"),
    ({"latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}, r"latents_mean/latents_std have 3 values, but "
                                                           r"preset 'custom' has 4 latent channels"),
    ({"latents_std": [1.0, 0.0, 1.0, 1.0]}, r"latents_std=\[1.0, 0.0, 1.0, 1.0\] .*expected every value > 0"),
    ({"latents_mean": "0.5"}, r"latents_mean='0.5' is not allowed; expected a non-empty list of numbers"),
    ({"shift_factor": 0.1}, r"shift_factor=0.1 and latents_mean are both given"),
    ({"norm_eps": 1e-5}, r"field\(s\) \['norm_eps'\] that latentcache does not understand and that may change "
                         r"the latents"),
    ({"_class_name": "AutoencoderKLWan"}, r"describes a AutoencoderKLWan; expected an AutoencoderKL"),
])
def test_a_config_that_would_change_the_latents_in_a_way_not_understood_is_refused(change, message):
    config = {**NORMALISED.diffusers_config(), "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
              "sample_size": 512, **change}
    with pytest.raises(ValueError, match=message):
        preset_from_diffusers_config(config)


def test_a_folder_with_an_unknown_field_is_refused_when_loaded(tmp_path, normalised_folder):
    import shutil

    folder = tmp_path / "extra"
    shutil.copytree(normalised_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_clamp": 3.0}))
    with pytest.raises(ValueError, match=r"\['latent_clamp'\]"):
        load_vae(str(folder))


def test_posterior_noise_is_scaled_per_channel():
    mean = torch.zeros(4, 32, 32)
    logvar = torch.full((4, 32, 32), 2.0)  # std e
    z = sample_scaled(mean, logvar, NORMALISED.scaling, torch.Generator().manual_seed(0))
    per_channel_std = z.flatten(1).std(dim=1) / np.e
    expected = torch.tensor([NORMALISED.scaling_factor / s for s in STD])
    assert torch.allclose(per_channel_std, expected, rtol=0.1)
    # A batch (B, C, h, w) broadcasts the same way.
    zb = sample_scaled(mean.expand(8, -1, -1, -1), logvar.expand(8, -1, -1, -1), NORMALISED.scaling,
                       torch.Generator().manual_seed(0))
    assert torch.allclose(zb.transpose(0, 1).flatten(1).std(dim=1) / np.e, expected, rtol=0.05)


def test_a_decode_refuses_latents_scaled_otherwise_by_the_same_weights(tmp_path, normalised_folder):
    from pipeline.core.kind import PermanentShardError
    from pipeline.io.latent_writers import LatentRecord, make_writer
    from pipeline.jobs.decode import check_latent_shard

    codec = load_vae(normalised_folder)
    z = np.zeros((4, 8, 8), np.float32)
    unnormalised = {"vae_fingerprint": codec.fingerprint, "preset": "custom", "scaling_factor": "0.5",
                    "shift_factor": "0.0"}
    with make_writer("parquet", str(tmp_path), "s0", unnormalised) as w:
        w.add(LatentRecord("k", z, z, (64, 64), (0, 0), (64, 64)))
        w.commit()
    with pytest.raises(PermanentShardError, match=r"s0.parquet is scaled with factor 0.5, shift 0.0; the custom VAE "
                                                  r"uses factor 0.5, per-channel mean \[0.4, -0.7, 1.3, -0.2\]"):
        check_latent_shard(str(tmp_path / "s0.parquet"), codec, None)


def test_encode_job_writes_normalised_latents_that_decode_and_the_reader_invert(ray_cluster, tmp_path,
                                                                                normalised_folder):
    from diffusers import AutoencoderKL as DiffusersVAE

    from pipeline.config import DecodeConfig, EncodeConfig, PreprocessConfig, RetryConfig, VAEConfig
    from pipeline.core.layout import CURRENT
    from pipeline.dataset import LatentDataset
    from pipeline.io.latent_reader import read_latents, read_shard_metadata
    from pipeline.io.tar_reader import iter_shard
    from pipeline.jobs import run
    from pipeline.transforms import prepare, to_model_input
    from tests import imagedata

    inputs = imagedata.photo_shards(tmp_path / "in", 2, per_shard=3, max_side=96)
    retry = RetryConfig(max_attempts=2, backoff_s=0.1, backoff_max_s=0.2)
    cfg = EncodeConfig(input=(inputs,), output=str(tmp_path / "latents"),
                       vae=VAEConfig(source=normalised_folder, dtype="float32"),
                       preprocess=PreprocessConfig(resolution=64), latent_dtype="float32", batch_size=2, actors=1,
                       decode_threads=2, retry=retry)
    assert run(cfg, progress=False).samples_written == 6

    manifest = json.loads((tmp_path / "latents" / CURRENT.manifest).read_text())
    assert manifest["identity"]["latents_mean"] == list(MEAN) and manifest["identity"]["latents_std"] == list(STD)
    shard = sorted((tmp_path / "latents").glob("*.parquet"))[0]
    meta = read_shard_metadata(str(shard))
    assert json.loads(meta["latents_mean"]) == list(MEAN) and json.loads(meta["latents_std"]) == list(STD)

    # Each stored latent is diffusers' normalised mean of the same preprocessed image.
    reference = DiffusersVAE.from_pretrained(normalised_folder).eval()
    lm, ls = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
    sf = NORMALISED.scaling_factor
    stored = {key: latent for key, latent, _ in read_latents(str(tmp_path / "latents"))}
    assert len(stored) == 6
    for url in sorted(str(p) for p in (tmp_path / "in").glob("*.tar")):
        for item in iter_shard(url):
            p = prepare(item, cfg.preprocess)
            with torch.no_grad():
                want = (reference.encode(to_model_input([p.pixels])).latent_dist.mean - lm) * sf / ls
            got = torch.from_numpy(stored[p.key])
            assert (got - want[0]).abs().max() <= 1e-3 * want.abs().max(), p.key

    ds = LatentDataset(str(tmp_path / "latents"))
    assert ds.scaling == NORMALISED.scaling
    # Decoding inverts it: the images equal diffusers' decode of latents * std / scale + mean.
    out = tmp_path / "images"
    run(DecodeConfig(input=(str(tmp_path / "latents"),), output=str(out), actors=1, batch_size=2, retry=retry),
        progress=False)
    from tests.test_decode_job import _pixels, _read_tars

    decoded = {k: _pixels(s["png"]).astype(np.int16)  # _read_tars: each key written once
               for k, s in _read_tars(sorted(str(p) for p in out.glob("*.tar"))).items()}
    assert set(decoded) == set(stored)
    for key, latent in stored.items():
        with torch.no_grad():
            image = reference.decode(torch.from_numpy(latent)[None] * ls / sf + lm).sample[0]
        want = ((image.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(decoded[key] - want).max() <= 1, key
