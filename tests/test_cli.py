"""The `latentcache` command: version, help, demo, status."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import __version__
from pipeline.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"latentcache {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("encode", "decode", "audit", "status", "demo"):
        assert command in out


def test_the_errors_turned_into_one_line_name_real_exception_classes():
    import importlib

    from pipeline.cli import _FAILED_ERRORS, _USAGE_ERRORS, _loaded

    for module, _ in (*_USAGE_ERRORS, *_FAILED_ERRORS):
        importlib.import_module(module)
    usage, failed = _loaded(_USAGE_ERRORS), _loaded(_FAILED_ERRORS)
    assert len(usage) == len(_USAGE_ERRORS) == 8 and len(failed) == len(_FAILED_ERRORS) == 4
    assert all(issubclass(cls, Exception) for cls in (*usage, *failed))
    assert {cls.__name__ for cls in usage} >= {"ConfigError", "WeightsError", "ClusterError"}
    assert not set(usage) & set(failed)


def test_commands_other_than_a_job_kind_parse_without_the_kinds():
    from pipeline.cli import _bare_kinds, build_parser
    from pipeline.jobs import KIND_NAMES, kinds

    assert KIND_NAMES == tuple(kind.name for kind in kinds())
    for argv in (["status", "out/"], ["-v", "configs"], ["verify", "--help"], ["--version"], ["submit", "-h"]):
        assert _bare_kinds(argv), argv
    for argv in ([], ["--help"], ["-h", "status"], ["-vh", "status"], ["--he", "configs"], ["encode", "--help"],
                 ["--debug", "audit", "--input", "x"]):
        assert not _bare_kinds(argv), argv
    # Help however it is asked for lists every command with its help, as the whole parser does.
    whole = build_parser().format_help()
    for argv in (["-vh", "status"], ["--he", "configs"], ["-v", "--help"]):
        assert build_parser(argv).format_help() == whole, argv
    bare = build_parser(["status", "out/"])
    assert bare.parse_args(["status", "out/", "--json"]).json is True
    # The kinds are there by name only; the whole parser gives them their flags.
    with pytest.raises(SystemExit):
        bare.parse_args(["encode", "--input", "x.tar"])
    full = build_parser(["encode", "--input", "x.tar"])
    assert full.parse_args(["encode", "--input", "x.tar"]).input == ["x.tar"]


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == f"latentcache {__version__}"


def test_bad_config_is_a_clear_error_not_a_traceback(capsys, tmp_path):
    code = main(["encode", "--input", str(tmp_path / "x.tar"), "--output", str(tmp_path / "o"),
                 "--set", "preprocess.resolution=500"])
    assert code == 2  # a config error
    assert "preprocess.resolution=500 must be a multiple of 8" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_demo_encodes_decodes_and_audits_the_bundled_photos_with_the_trained_vae(ray_cluster, tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--resolution", "128"]) == 0
    out = capsys.readouterr().out
    assert f"latents: {tmp_path / 'demo' / 'latents'}" in out
    assert "vae:     builtin:tiny-demo" in out
    assert "1 recorded as errors" in out
    assert "decoded 16 latents back into images in 5 WebDataset shard(s)" in out
    assert len(list((tmp_path / "demo" / "decoded").glob("*.tar"))) == 5
    report = tmp_path / "demo" / "audit" / "report.html"
    assert f"report:  {report}" in out and report.is_file()
    summary = json.loads((tmp_path / "demo" / "audit" / "summary.json").read_text())
    assert summary["vae"]["source"] == "builtin:tiny-demo" and not summary["vae"]["random_weights"]
    assert summary["audited"]["keys"] == 16 and summary["completeness"]["missing"] == 0
    assert summary["quality"]["psnr"]["mean"] > 18  # recognisable: the trained weights, not noise
    assert summary["flags"] == {"latent_non_finite": 0, "output_non_finite": 0, "saturated": 0}
    assert main(["status", str(tmp_path / "demo" / "latents")]) == 0
    status = capsys.readouterr().out
    assert "COMPLETE" in status and "5/5 committed" in status and "1 errored" in status
