"""Placement policy (pipeline/core/placement.py): what an actor asks for and how many fit, over
node resource totals as `ray.nodes()` gives them. Pure functions: no cluster here; the real
multi-node behaviour is in test_cluster.py."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, EncodeConfig, ResourcesConfig, from_dict
from pipeline.core.placement import (ActorDemand, actor_demand, actors_that_fit, fit_on_node, infeasible_message,
                                     target_actors)

GPU_NODE = {"CPU": 16.0, "GPU": 2.0, "memory": 64 * 2**30}
CPU_NODE = {"CPU": 8.0, "memory": 32 * 2**30}


def demand(res: ResourcesConfig | None = None, *, nodes, requested=None, wants_gpu=True, force_gpu=False):
    return actor_demand(res or ResourcesConfig(), requested=requested, wants_gpu=wants_gpu, force_gpu=force_gpu,
                        nodes=nodes)


def test_one_gpu_per_actor_where_the_cluster_has_gpus():
    d = demand(nodes=[CPU_NODE, GPU_NODE, GPU_NODE])
    assert d.device == "cuda"
    assert d.resources == {"GPU": 1.0, "CPU": 1.0}
    assert d.ray_options() == {"num_gpus": 1.0, "num_cpus": 1.0}
    assert actors_that_fit([CPU_NODE, GPU_NODE, GPU_NODE], d) == 4  # 2 GPUs on each GPU node, none on the CPU node


def test_a_cluster_without_gpus_runs_on_cpu_unless_the_spec_asks_for_gpus():
    # Autoscaling cluster, no GPU node up yet: with num_gpus set, the actors ask for a GPU and
    # nothing fits now (the runner waits or says why), rather than silently running on CPU.
    asked = demand(ResourcesConfig(num_gpus=1, num_cpus=4), nodes=[CPU_NODE])
    assert asked.device == "cuda" and asked.resources == {"GPU": 1.0, "CPU": 4.0}
    assert actors_that_fit([CPU_NODE], asked) == 0
    assert demand(nodes=[CPU_NODE]).device == "cpu"
    assert demand(nodes=[CPU_NODE], force_gpu=True).device == "cuda"  # vae.device: cuda
    assert demand(nodes=[GPU_NODE], wants_gpu=False).device == "cpu"  # vae.device: cpu


def test_cpu_actors_share_the_cpus_and_one_always_fits_a_node():
    one = demand(nodes=[CPU_NODE], wants_gpu=False)
    assert one.resources == {"CPU": 8.0}
    assert actors_that_fit([CPU_NODE], one) == 1
    four = demand(nodes=[CPU_NODE], requested=4, wants_gpu=False)
    assert four.resources == {"CPU": 2.0} and actors_that_fit([CPU_NODE], four) == 4
    # More actors than cores: a fraction each, so they never wait for one another.
    many = demand(nodes=[{"CPU": 2.0}], requested=8, wants_gpu=False)
    assert many.resources["CPU"] == pytest.approx(0.25) and actors_that_fit([{"CPU": 2.0}], many) == 8
    # Two 1-CPU nodes: one actor of "all the cluster's CPUs" would fit neither.
    spread = demand(nodes=[{"CPU": 1.0}, {"CPU": 1.0}], wants_gpu=False)
    assert spread.resources == {"CPU": 1.0} and actors_that_fit([{"CPU": 1.0}, {"CPU": 1.0}], spread) == 2


def test_fit_is_counted_per_node_by_every_resource_asked():
    d = ActorDemand("cuda", {"GPU": 2.0, "CPU": 6.0, "memory": 20 * 2**30})
    assert fit_on_node(GPU_NODE, d) == 1  # GPUs allow 1, CPUs 2, memory 3
    assert fit_on_node(CPU_NODE, d) == 0
    # Two nodes of one GPU each hold no actor asking for two, though the cluster has two GPUs.
    assert actors_that_fit([{"CPU": 8.0, "GPU": 1.0}] * 2, d) == 0
    custom = ActorDemand("cuda", {"GPU": 1.0, "CPU": 1.0, "accelerator_type:H100": 0.001})
    assert actors_that_fit([GPU_NODE, {**GPU_NODE, "accelerator_type:H100": 1.0}], custom) == 2
    # A fraction of a GPU per actor: 0.5 twice per GPU, with no float drift at the boundary.
    assert fit_on_node({"CPU": 8.0, "GPU": 1.0}, ActorDemand("cuda", {"GPU": 0.1, "CPU": 0.1})) == 10


def test_the_message_names_what_no_node_has():
    d = ActorDemand("cuda", {"GPU": 2.0, "CPU": 4.0})
    msg = infeasible_message(d, [{"CPU": 8.0, "GPU": 1.0}, CPU_NODE])
    assert "GPU 2 (the most any node has: 1)" in msg
    assert "CPU" not in msg.split("asks for", 1)[1].split(".")[0]  # CPUs are not what is short
    assert "resources.wait_for_nodes_s" in msg
    assert "no live node" in infeasible_message(d, [])


def test_target_follows_the_cap_the_room_and_the_work_left():
    res = ResourcesConfig()
    assert target_actors(res, None, fit=8, work=100) == 8  # as many as fit
    assert target_actors(res, None, fit=8, work=3) == 3  # never more than the shards left
    assert target_actors(res, 2, fit=8, work=100) == 2  # `actors` caps when max_actors is unset
    assert target_actors(ResourcesConfig(max_actors=6), 2, fit=8, work=100) == 6  # grows past `actors`
    assert target_actors(ResourcesConfig(max_actors=6), None, fit=1, work=100) == 1
    assert target_actors(res, None, fit=0, work=10) == 0


def test_resources_config_is_checked_by_name():
    cfg = from_dict(EncodeConfig, {"input": ["a.tar"], "output": "out",
                                   "resources": {"num_gpus": 1, "num_cpus": 8, "max_actors": 16,
                                                 "custom": {"accelerator_type:A100": 0.001}}})
    assert cfg.resources.num_gpus == 1.0 and cfg.resources.max_actors == 16
    for bad, message in [({"num_gpus": -1}, "resources.num_gpus=-1"),
                         ({"max_actors": 0}, "resources.max_actors=0"),
                         ({"num_cpus": 0}, "resources.num_cpus=0 needs resources.num_gpus"),
                         ({"custom": {"GPU": 1}}, "must not name CPU, GPU or memory"),
                         ({"custom": {"x": 0}}, "not positive amounts"),
                         ({"gpus": 1}, "unknown config key(s) ['resources.gpus']")]:
        with pytest.raises(ConfigError) as e:
            from_dict(EncodeConfig, {"input": ["a.tar"], "output": "out", "resources": bad})
        assert message in str(e.value)
    with pytest.raises(ConfigError, match="actors=4 is more than resources.max_actors=2"):
        from_dict(EncodeConfig, {"input": ["a.tar"], "output": "out", "actors": 4, "resources": {"max_actors": 2}})
