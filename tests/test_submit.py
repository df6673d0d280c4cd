"""Cluster jobs: `latentcache submit`, `run` and `jobs`, the job spec, the token, and secrets.

The cluster tests start a real Ray head on loopback (`ray start --head`, its own temp dir and
ports, token authentication on) whose environment holds the S3 keys, as a cluster node's would,
and drive it through the `latentcache` command as a user on a laptop would.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imagedata
from pipeline.cluster import (ENTRYPOINT, SPEC_ENV, TRAVELLING_ENV, ClusterError, build_submission,
                              dashboard_address, find_token, project_env)
from pipeline.config import ConfigError
from pipeline.core.runner import FORWARDED_ENV
from pipeline.spec import is_secret_name, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent
LATENTCACHE = str(Path(sys.executable).with_name("latentcache"))


# --- the spec, the token, the submission: no cluster ----------------------------------------------


def test_shipped_specs_are_valid_and_a_typo_is_named(tmp_path):
    for name, kind in (("encode", "encode"), ("decode", "decode"), ("audit", "audit")):
        spec = load_spec(ROOT / "jobs" / f"{name}.yaml")
        assert spec.kind == kind and spec.config.output.startswith("s3://")
        assert spec.config.resources.num_gpus == 1  # cluster specs wait for GPUs, never fall back to CPU
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: encode\ninput: a.tar\noutput: out\npreprocess:\n  resolutoin: 512\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key\(s\) \['preprocess.resolutoin'\]"):
        load_spec(bad)
    with pytest.raises(ConfigError, match="no `job:` key"):
        spec_from_dict({"input": "a.tar", "output": "out"})
    with pytest.raises(ConfigError, match=r"job='encdoe' is not a job kind; expected one of \['audit', 'decode', 'encode'\]"):
        spec_from_dict({"job": "encdoe", "input": "a.tar", "output": "out"})
    with pytest.raises(ConfigError, match="no such job spec file"):
        load_spec(tmp_path / "missing.yaml")
    spec = spec_from_dict({"job": "encode", "input": "a.tar", "output": "out"}, {"preprocess.resolution": "256"})
    assert spec.config.preprocess.resolution == 256
    # What the cluster runs is the checked spec, every field filled in: it rebuilds the same config.
    again = spec_from_dict(json.loads(spec.to_json()))
    assert again.config == spec.config and again.kind == "encode"


def test_a_spec_holding_credentials_is_refused_by_name():
    with pytest.raises(ConfigError) as e:
        spec_from_dict({"job": "encode", "input": "s3://b/a.tar", "output": "s3://b/out",
                        "storage_options": {"key": "AKIA...", "client_kwargs": {"aws_secret_access_key": "x"}}})
    assert "['storage_options.key', 'storage_options.client_kwargs.aws_secret_access_key'] hold credentials" in str(e.value)
    assert "AKIA" not in str(e.value)
    # Not credentials: where the store is, and how to reach it.
    ok = spec_from_dict({"job": "encode", "input": "s3://b/a.tar", "output": "s3://b/out",
                         "storage_options": {"endpoint_url": "http://minio:9000", "anon": False, "profile": "ml"}})
    assert ok.config.storage_options["profile"] == "ml"


def test_the_token_is_found_the_way_ray_finds_it(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "token"
    named.write_text("from-path")
    assert find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(named)}, home).value == "from-env"
    t = find_token({"RAY_AUTH_TOKEN_PATH": str(named)}, home)
    assert t.value == "from-path" and t.source == f"RAY_AUTH_TOKEN_PATH ({named})"
    t = find_token({}, home)
    assert t.value == "from-home" and t.source.endswith(".ray/auth_token")
    assert "from-home" not in repr(t)  # never in a log line or a traceback's locals
    assert find_token({}, tmp_path / "nobody") is None
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH=.*cannot read the token file"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "absent")}, home)


def test_the_address_is_the_dashboard():
    assert dashboard_address(None, {"RAY_ADDRESS": "http://head:8265/"}) == "http://head:8265"
    assert dashboard_address("head:8265", {}) == "http://head:8265"
    for bad in ("auto", "ray://head:10001"):
        with pytest.raises(ClusterError, match="dashboard's address"):
            dashboard_address(bad, {})
    with pytest.raises(ClusterError, match="give --address http://HEAD:8265"):
        dashboard_address(None, {})


def test_no_credential_travels_in_the_submission():
    spec = spec_from_dict({"job": "encode", "input": "s3://b/a.tar", "output": "s3://b/out"})
    shell = {"AWS_ENDPOINT_URL": "http://s3.local:9000", "AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "AKIAXYZ",
             "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "sess", "RAY_AUTH_TOKEN": "tok"}
    sub = build_submission(spec, environ=shell, env={"HF_HUB_OFFLINE": "1"})
    env_vars = sub.runtime_env["env_vars"]
    assert env_vars["AWS_ENDPOINT_URL"] == "http://s3.local:9000" and env_vars["AWS_REGION"] == "eu-west-1"
    assert env_vars["HF_HUB_OFFLINE"] == "1" and json.loads(env_vars[SPEC_ENV])["output"] == "s3://b/out"
    text = json.dumps(sub.runtime_env) + sub.entrypoint + json.dumps(dict(sub.metadata))
    for value in ("AKIAXYZ", "s3cr3t", "sess", "tok"):
        assert value not in text
    assert sub.entrypoint == ENTRYPOINT and sub.submission_id.startswith("latentcache-encode-")
    assert sub.runtime_env["working_dir"] == str(ROOT) and ".venv" in sub.runtime_env["excludes"]
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "DB_PASSWORD"):
        with pytest.raises(ConfigError, match=f"--env {name}: credentials never travel"):
            build_submission(spec, environ={}, env={name: "x"})
    # Neither the driver's forwarding to its actors nor what a submission carries holds a credential.
    assert not [n for n in (*FORWARDED_ENV, *TRAVELLING_ENV) if is_secret_name(n)]
    assert project_env(pip=["latentcache==0.1.0"]) == {"pip": ["latentcache==0.1.0"]}
    with pytest.raises(ConfigError, match="not a latentcache checkout"):
        project_env(working_dir="/")


def test_run_runs_a_spec_here(tmp_path, ray_cluster):
    shards = tmp_path / "shards"
    for i in range(2):
        imagedata.write_tar_shard(str(shards / f"s-{i:06d}.tar"),
                                  [{"__key__": f"s{i}/{n}", "jpg": imagedata.encode(img, "JPEG"), "txt": n}
                                   for n, img in imagedata.real_photos(max_side=96)[:3]])
    spec = tmp_path / "job.yaml"
    spec.write_text(f"job: encode\ninput: {shards}\noutput: {tmp_path / 'out'}\n"
                    "vae: {source: 'random:tiny'}\npreprocess: {resolution: 64}\nbatch_size: 2\n")
    from pipeline.cli import main

    assert main(["run", str(spec), "--no-progress", "--set", "format=safetensors"]) == 0
    import pyarrow.parquet as pq

    from pipeline.core.layout import CURRENT

    manifest = json.loads((tmp_path / "out" / CURRENT.manifest).read_text())
    assert manifest["identity"]["format"] == "safetensors"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["s-000000.safetensors",
                                                                               "s-000001.safetensors"]
    assert pq.read_table(tmp_path / "out" / CURRENT.errors).num_rows == 0


# --- a real Ray head with token authentication ------------------------------------------------------


@pytest.fixture(scope="module")
def head(s3_server, tmp_path_factory):
    """A Ray head whose environment holds S3 keys of its own (the nodes' credentials), with token
    authentication on. Yields (head, token, key id, secret)."""
    from ray_head import start_head

    token, key_id, secret = secrets.token_hex(16), f"LCKEY{secrets.token_hex(6)}", f"lcsecret{secrets.token_hex(12)}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "HOME": str(tmp_path_factory.mktemp("nodehome"))}
    h = start_head(env)
    try:
        yield h, token, key_id, secret
    finally:
        h.stop()
        assert not h.alive(), f"processes of the test's Ray head still run: {h.alive()}"


def _laptop_env(tmp_path, **extra) -> dict[str, str]:
    """A user's shell: no Ray token anywhere unless given, and no ~/.ray of the machine's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), **extra)
    return env


def _cli(args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([LATENTCACHE, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _photo_shards(bucket: str, n: int) -> list[str]:
    photos = imagedata.real_photos(max_side=128)
    return [imagedata.write_tar_shard(
        f"s3://{bucket}/data/train-{i:06d}.tar",
        [{"__key__": f"t{i}/{name}", "jpg": imagedata.encode(img, "JPEG"), "txt": f"caption {name}"}
         for name, img in photos[i::n]]) for i in range(n)]


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.cluster
def test_submit_follow_encodes_on_the_cluster_and_no_secret_shows(head, s3_bucket, tmp_path):
    h, token, key_id, secret = head
    urls = _photo_shards(s3_bucket, 3)
    out = f"s3://{s3_bucket}/latents"
    spec = tmp_path / "encode.yaml"
    spec.write_text(f"job: encode\ninput: 's3://{s3_bucket}/data/train-{{000000..000002}}.tar'\noutput: {out}\n"
                    "vae: {source: 'random:tiny'}\npreprocess: {resolution: 64}\nbatch_size: 4\n"
                    "resources: {num_cpus: 1}\n")
    # The laptop has the keys in its shell too: they must not travel.
    env = _laptop_env(tmp_path, RAY_AUTH_TOKEN=token, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    done = _cli(["submit", str(spec), "--address", h.dashboard_url, "--follow"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = next(line.split()[3] for line in done.stdout.splitlines() if line.startswith("submitted encode job"))
    assert f"job {job_id} succeeded" in done.stdout
    assert "done: " in done.stdout  # the driver's summary line, streamed from the cluster

    verified = _cli(["verify", out, "--source", *urls], {**os.environ})
    assert verified.returncode == 0, verified.stdout + verified.stderr

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(h.dashboard_url, headers={"Authorization": f"Bearer {token}"})
    info = client.get_job_info(job_id)
    assert str(getattr(info.status, "value", info.status)) == "SUCCEEDED"
    runtime_env = json.dumps(info.runtime_env)
    assert json.loads(info.runtime_env["env_vars"][SPEC_ENV])["output"] == out
    assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]  # may travel
    logs = client.get_job_logs(job_id)
    import s3fs

    fs = s3fs.S3FileSystem()
    written = b"".join(fs.cat_file(p) for p in fs.find(out))
    assert len(written) > 10_000
    for value in (secret, key_id, token):
        assert value not in runtime_env, "a credential is in the job's runtime_env"
        assert value not in logs and value not in done.stdout + done.stderr, "a credential is in the logs"
        assert value.encode() not in written, "a credential is in the output"

    listed = _cli(["jobs", "list", "--address", h.dashboard_url], env)
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = _cli(["jobs", "status", job_id, "--address", h.dashboard_url], env)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout and f"output: {out}" in status.stdout
    logs_cli = _cli(["jobs", "logs", job_id, "--address", h.dashboard_url], env)
    assert logs_cli.returncode == 0 and "done: " in logs_cli.stdout and "9 samples written" in logs_cli.stdout

    # The job's metrics, read back from the head's Prometheus endpoint (pipeline/core/telemetry.py).
    import urllib.request

    deadline, found = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{h.metrics_port}/metrics", timeout=5).read().decode()
        found = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("ray_latentcache_") and 'kind="encode"' in line}
        if found.get("ray_latentcache_samples_written_total") == 9:
            break
        time.sleep(1)
    assert found.get("ray_latentcache_samples_written_total") == 9, sorted(found)
    assert found.get("ray_latentcache_samples_read_total") == 9
    # Gauges (shards committed, actors) are current values of a live driver: gone once it exited.
    assert found.get("ray_latentcache_bytes_written_total", 0) > 10_000
    assert found.get("ray_latentcache_shard_seconds_count") == 3


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.cluster
def test_a_failing_job_reaches_the_user_with_its_reason(head, s3_bucket, tmp_path):
    h, token, _, _ = head
    spec = tmp_path / "encode.yaml"
    spec.write_text(f"job: encode\ninput: 's3://{s3_bucket}/nothing/*.tar'\noutput: s3://{s3_bucket}/out\n"
                    "vae: {source: 'random:tiny'}\n")
    env = _laptop_env(tmp_path, RAY_AUTH_TOKEN=token)
    done = _cli(["submit", str(spec), "--address", h.dashboard_url, "--follow"], env)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    job_id = next(line.split()[3] for line in done.stdout.splitlines() if line.startswith("submitted encode job"))
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"latentcache: job {job_id} failed: ") and f"s3://{s3_bucket}/nothing/*.tar" in last, last
    status = _cli(["jobs", "status", job_id, "--address", h.dashboard_url], env)
    assert status.returncode == 1 and f"{job_id}: FAILED" in status.stdout


@pytest.mark.ray
@pytest.mark.cluster
def test_a_submit_without_the_token_or_with_a_wrong_one_says_so(head, tmp_path):
    h, token, _, _ = head
    spec = ROOT / "jobs" / "encode.yaml"
    missing = _cli(["submit", str(spec), "--address", h.dashboard_url], _laptop_env(tmp_path))
    assert missing.returncode != 0
    assert "requires a Ray authentication token and none was found" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr and "RAY_AUTH_TOKEN_PATH" in missing.stderr
    wrong = _cli(["jobs", "list", "--address", h.dashboard_url], _laptop_env(tmp_path, RAY_AUTH_TOKEN="not-it"))
    assert wrong.returncode != 0 and "rejected the authentication token from RAY_AUTH_TOKEN" in wrong.stderr, wrong.stderr
    assert "not-it" not in wrong.stderr and token not in missing.stderr + wrong.stderr
    # A typo in the spec fails on the laptop, before anything reaches the cluster.
    typo = tmp_path / "typo.yaml"
    typo.write_text("job: encode\ninput: a.tar\noutput: out\nbatch_sise: 4\n")
    refused = _cli(["submit", str(typo), "--address", h.dashboard_url], _laptop_env(tmp_path, RAY_AUTH_TOKEN=token))
    assert refused.returncode != 0 and "unknown config key(s) ['batch_sise']" in refused.stderr


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.cluster
def test_jobs_stop_stops_a_running_job(head, s3_bucket, tmp_path):
    h, token, _, _ = head
    _photo_shards(s3_bucket, 2)
    spec = tmp_path / "encode.yaml"
    spec.write_text(f"job: encode\ninput: 's3://{s3_bucket}/data/*.tar'\noutput: s3://{s3_bucket}/latents\n"
                    "vae: {source: 'random:tiny'}\npreprocess: {resolution: 64}\n")
    env = _laptop_env(tmp_path, RAY_AUTH_TOKEN=token)
    sub = _cli(["submit", str(spec), "--address", h.dashboard_url], env)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.split()[3]
    assert f"latentcache jobs stop {job_id}" in sub.stdout
    stop = _cli(["jobs", "stop", job_id, "--address", h.dashboard_url], env)
    assert stop.returncode == 0 and "resumes it" in stop.stdout, stop.stderr
    deadline = time.monotonic() + 60
    while True:
        status = _cli(["jobs", "status", job_id, "--address", h.dashboard_url], env)
        if f"{job_id}: STOPPED" in status.stdout or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert f"{job_id}: STOPPED" in status.stdout and status.returncode == 1
    unknown = _cli(["jobs", "status", "no-such-job", "--address", h.dashboard_url], env)
    assert unknown.returncode != 0 and "no such job" in unknown.stderr and "Traceback" not in unknown.stderr
