"""Config: frozen, checked at construction, YAML and flags map onto it, errors name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.cli import build_parser, config_from_args
from pipeline.jobs import get_kind
from pipeline.config import ConfigError, EncodeConfig, PreprocessConfig, from_dict, load_yaml, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_frozen_and_checked():
    cfg = EncodeConfig(input="a.tar", output="out")
    assert cfg.input == ("a.tar",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"format='tfrecord' is not allowed; expected one of \['parquet', 'safetensors'\]"):
        EncodeConfig(input="a.tar", output="out", format="tfrecord")
    with pytest.raises(ConfigError, match="resolution=500 must be a multiple of 8"):
        PreprocessConfig(resolution=500)
    with pytest.raises(ConfigError, match="input must name at least one"):
        EncodeConfig(input=(), output="out")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_configs_load(path):
    data = load_yaml(path)
    cfg = from_dict(EncodeConfig, {"input": ["x.tar"], "output": "o", **data})
    assert cfg.vae.source == data["vae"]["source"]
    assert to_dict(cfg)["preprocess"]["resolution"] == data.get("preprocess", {}).get("resolution", 512)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['preprocess.resolutoin'\]"):
        from_dict(EncodeConfig, {"input": ["a"], "output": "o", "preprocess": {"resolutoin": 512}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="batch_size must be int, got 'many'"):
        from_dict(EncodeConfig, {"input": ["a"], "output": "o", "batch_size": "many"})


def test_flags_override_yaml_and_set_overrides_flags(tmp_path):
    yaml_path = tmp_path / "job.yaml"
    yaml_path.write_text("vae: {source: random:tiny, preset: tiny}\nbatch_size: 2\npreprocess: {resolution: 256}\n")
    args = build_parser().parse_args([
        "encode", "--config", str(yaml_path), "--input", "s3://b/a.tar", "s3://b/b.tar", "--output", "out",
        "--batch-size", "8", "--buckets", "--set", "preprocess.resolution=1024", "--set", "retry.max_attempts=5",
    ])
    cfg = config_from_args(get_kind("encode"), args)
    assert cfg.input == ("s3://b/a.tar", "s3://b/b.tar")
    assert cfg.batch_size == 8 and cfg.preprocess.buckets is True
    assert cfg.preprocess.resolution == 1024 and cfg.retry.max_attempts == 5
    assert cfg.vae.source == "random:tiny" and cfg.format == "parquet"


def test_decode_config_and_flags():
    from pipeline.config import DecodeConfig

    args = build_parser().parse_args(["decode", "--input", "lat/", "--output", "img/", "--image-format", "webp",
                                      "--quality", "80", "--sample", "posterior", "--seed", "3", "--actors", "2"])
    cfg = config_from_args(get_kind("decode"), args)
    assert isinstance(cfg, DecodeConfig) and cfg.vae.source == ""  # the latents' own VAE
    run_flags = config_from_args(get_kind("decode"), build_parser().parse_args(
        ["decode", "--input", "lat/", "--output", "img/", "--dtype", "float32", "--device", "cpu"]))
    assert (run_flags.vae.source, run_flags.vae.dtype, run_flags.vae.device) == ("", "float32", "cpu")
    assert (cfg.image_format, cfg.quality, cfg.sample, cfg.seed, cfg.actors) == ("webp", 80, "posterior", 3, 2)
    with_vae = config_from_args(get_kind("decode"), build_parser().parse_args(
        ["decode", "--input", "lat/", "--output", "img/", "--vae", "random:tiny"]))
    assert with_vae.vae.source == "random:tiny"
    with pytest.raises(ConfigError, match=r"image_format='gif' is not allowed"):
        DecodeConfig(input="a", output="b", image_format="gif")
    with pytest.raises(ConfigError, match=r"sample='mean' is not allowed"):
        DecodeConfig(input="a", output="b", sample="mean")


def test_passthrough_is_checked_and_normalised():
    cfg = EncodeConfig(input="a.tar", output="o", passthrough=["TXT", "json", "txt"])
    assert cfg.passthrough == ("json", "txt")
    with pytest.raises(ConfigError, match=r"\['_key'\] are not member extensions"):
        EncodeConfig(input="a.tar", output="o", passthrough=["_key"])
