"""Multi-node on one machine: `ray.cluster_utils.Cluster` (a real head and worker nodes, each its
own raylet), the driver a separate process on it, as on a cluster. Actors ask for what the spec
says, spread over the nodes where they fit, and the pool grows onto a node that joins mid-job."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imagedata
from drivers import output, start_driver
from pipeline.core.layout import CURRENT
from pipeline.core.ledger import Ledger

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.ray, pytest.mark.cluster]


def _ready_nodes(text: str) -> list[str]:
    return re.findall(r"actor ready on node (\w+)", text)


def test_address_auto_with_no_cluster_is_one_line(tmp_path):
    """`--address auto` looks for a running GCS on this machine (its processes, RAY_ADDRESS, the
    temp dir's ray_current_cluster); where there is none, one line with exit status 2."""
    import os

    import psutil

    if any("gcs_server" in (p.info["name"] or "") for p in psutil.process_iter(["name"])):
        pytest.skip("another Ray runs on this machine: `--address auto` would find it")
    inputs = imagedata.photo_shards(tmp_path / "shards", 1, per_shard=1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "no-ray")
    (tmp_path / "no-ray").mkdir()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "encode", "--input", inputs, "--output",
                           str(tmp_path / "out"), "--vae", "random:tiny", "--address", "auto"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("latentcache: error: --address auto: no Ray cluster answers there") and \
        "ray start --head" in last and "Traceback" not in proc.stderr


def test_actors_spread_over_nodes_and_the_pool_grows_onto_a_node_that_joins(tmp_path):
    from ray.cluster_utils import Cluster

    # Long enough (tens of seconds on 2 cores) for a node to join and its actor to load the model.
    inputs = imagedata.photo_shards(tmp_path / "shards", 300, per_shard=4, max_side=160)
    out = tmp_path / "latents"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head holds no actor
    proc = None
    try:
        first = [cluster.add_node(num_cpus=1) for _ in range(2)]
        proc = start_driver(["encode", "--input", inputs, "--output", str(out), "--vae", "random:tiny", "--resolution", "128",
                        "--batch-size", "2", "--address", cluster.address, "--no-progress",
                        "--set", "resources.num_cpus=1", "--set", "resources.rescale_interval_s=0.5",
                        "--set", "decode_threads=1"])
        records = out / CURRENT.records
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and len(_ready_nodes(output(proc))) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, output(proc)[-3000:]
        before = _ready_nodes(output(proc))
        assert sorted(before) == sorted(n.node_id for n in first), f"one actor on each worker node: {before}"
        t_join = time.monotonic()
        joined = cluster.add_node(num_cpus=1)
        print(f"node joined in {time.monotonic() - t_join:.1f} s")
        code = proc.wait(timeout=300)
        text = output(proc)
        assert code == 0, text[-3000:]
        assert "growing the pool from 2 to 3" in text, text[-3000:]
        assert joined.node_id in _ready_nodes(text), f"no actor on the node that joined: {_ready_nodes(text)}"
        committed = len(Ledger(str(out)).job_records())  # 300 shards: compacted into one table at the end
        assert committed == 300 and not list(records.glob("*.json"))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    verified = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(out), "--source", inputs],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_an_actor_no_node_can_hold_is_refused_at_once_naming_what_is_short(tmp_path):
    from ray.cluster_utils import Cluster

    inputs = imagedata.photo_shards(tmp_path / "shards", 1, per_shard=1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=2)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "encode", "--input", inputs, "--output",
                               str(tmp_path / "out"), "--vae", "random:tiny", "--address", cluster.address,
                               "--no-progress", "--set", "resources.num_gpus=1", "--set", "resources.num_cpus=1"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        took = time.monotonic() - t0
    finally:
        cluster.shutdown()
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "no node of the cluster (2 live) can hold one actor: it asks for GPU 1 (the most any node has: 0)" in last
    assert "resources.wait_for_nodes_s" in last and "Traceback" not in proc.stderr
    assert took < 60, f"an infeasible job must fail at once, not wait for the actor start timeout ({took:.0f} s)"
    assert not (tmp_path / "out" / CURRENT.manifest).exists()  # refused before the output was opened


def test_a_job_started_before_its_nodes_waits_for_them(tmp_path):
    """An autoscaling cluster with no node yet where an actor fits (here: none has the custom
    resource the spec asks for): with resources.wait_for_nodes_s the job waits, asking the
    autoscaler for room, and runs once a node joins."""
    from ray.cluster_utils import Cluster

    inputs = imagedata.photo_shards(tmp_path / "shards", 3, per_shard=2)
    out = tmp_path / "latents"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    proc = None
    try:
        proc = start_driver(["encode", "--input", inputs, "--output", str(out), "--vae", "random:tiny", "--resolution", "64",
                        "--address", cluster.address, "--no-progress", "--set", "resources.num_cpus=1",
                        "--set", "resources.custom={gpu_pool: 1}", "--set", "resources.wait_for_nodes_s=120",
                        "--set", "resources.autoscale=true"])
        deadline = time.monotonic() + 120
        while "waiting up to" not in output(proc) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, output(proc)[-3000:]
        assert "for a node with room for one actor (CPU 1, gpu_pool 1)" in output(proc)
        joined = cluster.add_node(num_cpus=1, resources={"gpu_pool": 1})
        code = proc.wait(timeout=300)
        text = output(proc)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    assert code == 0, text[-3000:]
    assert _ready_nodes(text) == [joined.node_id]
    assert len(list((out / CURRENT.records).glob("*.json"))) == 3
