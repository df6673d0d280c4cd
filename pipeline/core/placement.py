"""Where actors go: what one actor asks Ray for, how many fit the cluster's nodes, how many the
pool should hold. Pure functions over node resource totals; `cluster_nodes()` is the one Ray call.

Counting per node (not cluster totals) is what keeps an actor that asks for 2 GPUs from being
planned on a cluster of 1-GPU nodes, where Ray would keep it pending forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from pipeline.config import ResourcesConfig

Node = Mapping[str, float]  # a live node's resource totals: CPU, GPU, memory (bytes), custom

_EPS = 1e-9


class InfeasibleError(RuntimeError):
    """No node of the cluster can hold one actor (and the job was not told to wait for one)."""


@dataclass(frozen=True)
class ActorDemand:
    """What one actor asks Ray for (Ray resource name -> amount), and the device it runs on."""

    device: str
    resources: Mapping[str, float] = field(default_factory=dict)

    def ray_options(self) -> dict:
        """Keyword arguments for `ray.remote(...).options(...)`."""
        r = dict(self.resources)
        options: dict = {"num_cpus": r.pop("CPU", 0.0), "num_gpus": r.pop("GPU", 0.0)}
        if "memory" in r:
            options["memory"] = int(r.pop("memory"))
        if r:
            options["resources"] = r
        return options

    def describe(self) -> str:
        return ", ".join(f"{k} {_amount(k, v)}" for k, v in sorted(self.resources.items())) or "nothing"


def _amount(name: str, value: float) -> str:
    if name == "memory":
        return f"{value / 2**30:.1f} GiB"
    return f"{value:g}"


def actor_demand(res: ResourcesConfig, *, requested: int | None, wants_gpu: bool, force_gpu: bool,
                 nodes: Sequence[Node]) -> ActorDemand:
    """One actor's resources and device.

    GPU: `res.num_gpus` when set (so an autoscaling cluster with no GPU node yet waits for one
    rather than running on CPU), else 1 when the job wants a GPU and the cluster has one now (or
    `force_gpu`, a `vae.device` of cuda). CPU-only: `res.num_cpus`, else the cluster's CPUs
    shared by the `requested` actors (fractional when there are more actors than CPUs, so they
    never wait for each other), capped at the largest node's CPUs so that one always fits.
    """
    has_gpu = any(n.get("GPU", 0) > 0 for n in nodes)
    if res.num_gpus is not None:
        gpus = res.num_gpus
    elif (wants_gpu and has_gpu) or force_gpu:
        gpus = 1.0
    else:
        gpus = 0.0
    resources: dict[str, float] = {}
    if gpus > 0:
        resources["GPU"] = gpus
        cpus = 1.0 if res.num_cpus is None else res.num_cpus
    elif res.num_cpus is not None:
        cpus = res.num_cpus
    else:
        total = sum(n.get("CPU", 0) for n in nodes) or 1.0
        largest = max((n.get("CPU", 0) for n in nodes), default=1.0) or 1.0
        n = requested or 1
        cpus = min(largest, total / n if n > total else float(int(total // n)))
        cpus = max(0.01, cpus)
    if cpus > 0:
        resources["CPU"] = cpus
    if res.memory_gb:
        resources["memory"] = res.memory_gb * 2**30
    resources.update(res.custom)
    return ActorDemand("cuda" if gpus > 0 else "cpu", resources)


def fit_on_node(node: Node, demand: ActorDemand) -> int:
    """How many actors of `demand` one node holds."""
    counts = []
    for name, amount in demand.resources.items():
        if amount <= 0:
            continue
        counts.append(math.floor(node.get(name, 0.0) / amount + _EPS))
    return min(counts) if counts else 0


def actors_that_fit(nodes: Sequence[Node], demand: ActorDemand) -> int:
    """How many actors of `demand` the live nodes hold at once (by their totals)."""
    return sum(fit_on_node(n, demand) for n in nodes)


def max_actors(res: ResourcesConfig, requested: int | None) -> int | None:
    """The most actors the pool may hold (None: as many as fit)."""
    return res.max_actors if res.max_actors is not None else requested


def target_actors(res: ResourcesConfig, requested: int | None, fit: int, work: int) -> int:
    """How many actors the pool should hold now: what fits, within the cap, no more than the
    shards left to do."""
    cap = max_actors(res, requested)
    n = fit if cap is None else min(cap, fit)
    return max(0, min(n, work))


def infeasible_message(demand: ActorDemand, nodes: Sequence[Node]) -> str:
    """Why no actor fits: what one asks for, against the largest node of each resource asked."""
    if not nodes:
        return f"each actor asks for {demand.describe()}, and the cluster has no live node"
    largest = {name: max(n.get(name, 0.0) for n in nodes) for name in demand.resources}
    short = [f"{name} {_amount(name, amount)} (the most any node has: {_amount(name, largest[name])})"
             for name, amount in sorted(demand.resources.items()) if largest[name] + _EPS < amount]
    what = "; ".join(short) or "a combination that no single node has"
    return (f"no node of the cluster ({len(nodes)} live) can hold one actor: it asks for {what}. "
            "Lower resources.num_gpus / num_cpus / memory_gb, or on an autoscaling cluster set "
            "resources.wait_for_nodes_s (and resources.autoscale) to wait for a node that fits")


def cluster_nodes() -> list[dict[str, float]]:
    """The resource totals of the cluster's live nodes (needs a connected Ray)."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def request_nodes(demand: ActorDemand, count: int) -> None:
    """Ask Ray's autoscaler for room for `count` actors (count 0 withdraws the request)."""
    from ray.autoscaler.sdk import request_resources

    bundle = {k: v for k, v in demand.resources.items() if k != "memory"}
    request_resources(bundles=[bundle] * count)


__all__ = ["ActorDemand", "InfeasibleError", "Node", "actor_demand", "actors_that_fit", "cluster_nodes",
           "fit_on_node", "infeasible_message", "max_actors", "request_nodes", "target_actors"]
