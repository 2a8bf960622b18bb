"""The resource plan of a search: how many trials the cluster holds at once.

A trial holds `ray.num_workers` Train workers (`ray.gpus_per_worker` may be a fraction, so
trials share a card), one data read task and a tiny trial driver. Ray places each worker's
bundle on one node and never splits a GPU fraction across cards, so the plan counts workers
node by node. A search that cannot place one trial fails here, before any trial starts, with
the reason and the keys to change; `tune.max_concurrent` is capped to what fits.
"""

from __future__ import annotations

import math

import ray

from pipelines.config import ConfigError, ExperimentConfig, TuneConfig
from pipelines.train.driver import worker_resources

TRIAL_DRIVER_CPU = 0.01  # the trial only waits on its Train run; 0 is rejected by Tune


class ResourcePlanError(ConfigError):
    """The cluster cannot hold even one trial."""


def trial_demand(cfg: ExperimentConfig) -> dict[str, float]:
    """Resources one trial holds: its Train workers, one data read task, the trial driver."""
    worker = worker_resources(cfg)
    demand = {key: value * cfg.ray.num_workers for key, value in worker.items() if value > 0}
    demand["CPU"] = demand.get("CPU", 0.0) + cfg.data.read_cpus + TRIAL_DRIVER_CPU
    return demand


def plan_concurrency(
    demand: dict[str, float],
    cluster: dict[str, float],
    requested: int | None,
    total: int,
    *,
    worker: tuple[int, dict[str, float]] | None = None,
    nodes: list[dict[str, float]] | None = None,
) -> int:
    """Trials that fit at once (<= requested and total); ResourcePlanError when none does.

    `worker` = (workers per trial, one worker's resources): Ray places each worker's bundle on
    one node and never splits its GPU fraction across cards, so the workers that fit are
    counted node by node (`nodes`, each node's resources; None: the cluster as one node): a card
    holds floor(1 / fraction) fractional workers (two cards hold four 0.4-GPU workers, not
    five, although 5 x 0.4 = 2), and a 2-GPU worker needs a node with 2 GPUs.
    """
    fits = min(math.floor(cluster.get(key, 0.0) / need + 1e-9) for key, need in demand.items())
    packing = ""
    if worker is not None:
        count, resources = worker
        slots = worker_slots(resources, nodes if nodes is not None else [cluster])
        fits = min(fits, slots // count)
        where = f"{len(nodes)} node(s)" if nodes is not None else "the cluster"
        packing = (
            f"; one worker needs {_format_resources(resources)} on one node"
            + (", its GPU fraction on one card" if 0 < resources.get("GPU", 1.0) < 1 else "")
            + f": {where} hold {slots} such worker(s), a trial needs {count}"
        )
    if fits < 1:
        short = ", ".join(
            f"{key} {need:g} (cluster: {cluster.get(key, 0.0):g})"
            for key, need in demand.items()
            if cluster.get(key, 0.0) < need
        )
        raise ResourcePlanError(
            f"one trial needs {_format_resources(demand)} but the cluster cannot hold it: "
            f"short of {short or 'room on a single node or card'}{packing}. Lower "
            "ray.num_workers, ray.cpus_per_worker, ray.gpus_per_worker or "
            "ray.resources_per_worker, set ray.use_gpu=false, add nodes, or (autoscaling "
            "cluster) set tune.capacity to what it grows to"
        )
    return min(fits, requested or fits, total)


def worker_slots(worker: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers of `worker` resources Ray can place at once on `nodes`."""
    slots = 0
    for node in nodes:
        counts = []
        for key, need in worker.items():
            if need <= 0:
                continue
            have = node.get(key, 0.0)
            if key == "GPU" and need < 1:  # a fraction lives on one card
                counts.append(math.floor(have + 1e-9) * math.floor(1 / need + 1e-9))
            else:
                counts.append(math.floor(have / need + 1e-9))
        slots += min(counts, default=0)
    return slots


def plan_search(
    cfg: ExperimentConfig,
    settings: TuneConfig,
    cluster: dict[str, float],
    nodes: list[dict[str, float]] | None = None,
) -> tuple[int, list[str]]:
    """(trials at once, the plan's lines) for a cluster of `cluster` resources in all and, when
    known, `nodes` (each node's resources). With `tune.capacity` the nodes to come are unknown:
    the cluster is planned as one node of that size."""
    demand = trial_demand(cfg)
    cluster = dict(cluster)
    for key, value in (settings.capacity or {}).items():
        cluster[key] = max(cluster.get(key, 0.0), value)
    if settings.capacity:
        nodes = None
    worker = worker_resources(cfg)
    concurrency = plan_concurrency(
        demand,
        cluster,
        settings.max_concurrent,
        settings.total_trials,
        worker=(cfg.ray.num_workers, worker),
        nodes=nodes,
    )
    plan = [
        f"plan: {settings.total_trials} trials, each {cfg.ray.num_workers} worker(s), "
        f"{_format_resources(demand)} per trial; cluster {_format_resources(cluster, demand)}"
        + (f" on {len(nodes)} node(s)" if nodes is not None else "")
        + f"; {concurrency} at once"
    ]
    fraction = worker.get("GPU", 1.0) if cfg.ray.use_gpu else 1.0
    if fraction < 1:
        plan.append(
            f"{fraction:g} GPU per worker: up to {math.floor(1 / fraction + 1e-9)} "
            "trials' workers share each GPU"
        )
    if settings.max_concurrent and concurrency < settings.max_concurrent:
        plan.append(
            f"max_concurrent {settings.max_concurrent} capped to {concurrency}: "
            "the cluster holds no more trials at once"
        )
    return concurrency, plan


def _plan(cfg: ExperimentConfig, settings: TuneConfig, notes: list[str]) -> int:
    """The plan on the connected Ray cluster (its alive nodes), printed and added to `notes`."""
    cluster = {key: float(value) for key, value in ray.cluster_resources().items()}
    nodes = [
        {key: float(value) for key, value in node["Resources"].items()}
        for node in ray.nodes()
        if node["Alive"]
    ]
    concurrency, plan = plan_search(cfg, settings, cluster, nodes)
    for line in plan:
        print(f"[segnext tune] {line}", flush=True)
    notes.extend(plan)
    return concurrency


def _format_resources(resources: dict[str, float], keys: dict | None = None) -> str:
    shown = keys if keys is not None else resources
    return "{" + ", ".join(f"{key}: {resources.get(key, 0.0):g}" for key in shown) + "}"
