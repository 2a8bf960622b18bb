"""`segnext tune`'s resource plan (`tune.plan`): what one trial holds, how many trials fit at
once, node by node and card by card, and the plans refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, Dimension, TuneConfig, load_config, with_overrides
from tune.plan import ResourcePlanError, plan_concurrency, plan_search, trial_demand

# ---------------------------------------------------------------------------------- fast


def _cfg(tmp_path: Path, *overrides: str):
    path = tmp_path / "c.yaml"
    path.write_text("data: {root: /x, crop_size: [64, 64]}\ntrain: {global_batch_size: 8}\n")
    return load_config(path, list(overrides))


def test_trial_demand_counts_workers_read_task_and_driver(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "ray.num_workers=4",
        "ray.cpus_per_worker=2",
        "ray.use_gpu=true",
        "data.read_cpus=0.5",
    )
    assert trial_demand(cfg) == pytest.approx({"CPU": 4 * 2 + 0.5 + 0.01, "GPU": 4.0})


def test_plan_caps_concurrency_to_what_fits() -> None:
    demand = {"CPU": 2.26, "GPU": 2.0}
    cluster = {"CPU": 16.0, "GPU": 8.0, "memory": 1e11}
    assert plan_concurrency(demand, cluster, requested=None, total=10) == 4  # GPU-bound
    assert plan_concurrency(demand, cluster, requested=8, total=10) == 4
    assert plan_concurrency(demand, cluster, requested=2, total=10) == 2
    assert plan_concurrency(demand, cluster, requested=None, total=3) == 3


def test_plan_fails_early_when_one_trial_does_not_fit() -> None:
    with pytest.raises(ResourcePlanError) as error:
        plan_concurrency({"CPU": 1.26, "GPU": 2.0}, {"CPU": 2.0}, requested=None, total=4)
    message = str(error.value)
    assert "GPU 2 (cluster: 0)" in message and "ray.num_workers" in message


def _gpu_cfg(tmp_path: Path, gpus: float, workers: int = 1):
    return _cfg(
        tmp_path,
        "ray.use_gpu=true",
        f"ray.gpus_per_worker={gpus}",
        f"ray.num_workers={workers}",
        "ray.cpus_per_worker=1",
        "data.read_cpus=0.25",
    )


def _settings(trials: int, max_concurrent: int | None = None) -> TuneConfig:
    dim = Dimension("choice", (1e-3,))
    return TuneConfig(space={"optim.lr": dim}, trials=trials, max_concurrent=max_concurrent)


def test_fractional_gpus_let_trials_share_a_card(tmp_path: Path) -> None:
    """Four 0.25-GPU trials on one GPU; the Train ScalingConfig asks Ray for the same."""
    import ray.train

    from pipelines.train.driver import worker_resources

    cfg = _gpu_cfg(tmp_path, 0.25)
    assert worker_resources(cfg) == {"CPU": 1.0, "GPU": 0.25}
    scaling = ray.train.ScalingConfig(
        num_workers=1, use_gpu=True, resources_per_worker=worker_resources(cfg)
    )
    assert (scaling.num_cpus_per_worker, scaling.num_gpus_per_worker) == (1.0, 0.25)
    concurrency, plan = plan_search(cfg, _settings(8), {"CPU": 16.0, "GPU": 1.0})
    assert concurrency == 4
    assert "GPU: 0.25" in plan[0] and "4 at once" in plan[0]
    assert "0.25 GPU per worker: up to 4 trials' workers share each GPU" in plan[1]
    assert plan_search(cfg, _settings(8), {"CPU": 3.0, "GPU": 1.0})[0] == 2  # CPU-bound
    # 0.4 GPU: two per card, not five on two cards (Ray never splits a worker's fraction)
    assert plan_search(_gpu_cfg(tmp_path, 0.4), _settings(8), {"CPU": 64.0, "GPU": 2.0})[0] == 4
    assert plan_search(_gpu_cfg(tmp_path, 2), _settings(8), {"CPU": 64.0, "GPU": 8.0})[0] == 4


def test_gpu_plans_that_do_not_fit_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ResourcePlanError) as error:
        plan_search(_gpu_cfg(tmp_path, 0.25), _settings(4), {"CPU": 16.0})
    assert "GPU 0.25 (cluster: 0)" in str(error.value)
    assert "ray.gpus_per_worker" in str(error.value)
    with pytest.raises(ResourcePlanError, match="short of GPU 2 .cluster: 1."):
        plan_search(_gpu_cfg(tmp_path, 2), _settings(4), {"CPU": 16.0, "GPU": 1.0})


def test_plan_counts_workers_node_by_node(tmp_path: Path) -> None:
    """A worker's bundle lives on one node: two 1-GPU nodes hold no 2-GPU worker."""
    two_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    with pytest.raises(ResourcePlanError) as error:
        plan_search(_gpu_cfg(tmp_path, 2), _settings(4), {"CPU": 16.0, "GPU": 2.0}, two_nodes)
    assert "room on a single node or card" in str(error.value)
    assert "2 node(s) hold 0 such worker(s)" in str(error.value)
    # CPUs too: 6 CPUs in all, but no 1.5-CPU node holds a 2-CPU worker
    cfg = _cfg(tmp_path, "ray.num_workers=1", "ray.cpus_per_worker=2")
    with pytest.raises(ResourcePlanError, match="4 node.s. hold 0 such worker"):
        plan_search(cfg, _settings(4), {"CPU": 6.0}, [{"CPU": 1.5}] * 4)
    assert plan_search(cfg, _settings(4), {"CPU": 6.0}, [{"CPU": 3.0}] * 2)[0] == 2


@pytest.mark.slow
def test_fractional_gpu_plan_matches_ray_on_a_local_cluster_with_fake_gpus(tmp_path: Path) -> None:
    """Two local nodes declaring one (fake) GPU each: the plan read from the live cluster says
    four 0.4-GPU trials at once, not five, and Ray's scheduler agrees (four 0.4-GPU bundles are
    placed, the fifth waits although 2 GPUs - 4 x 0.4 = 0.4 are free); a 2-GPU worker is
    refused with the reason before anything starts."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    from tune.plan import _plan

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert ray.cluster_resources()["GPU"] == 2.0
        cfg = _cfg(
            tmp_path,
            "ray.use_gpu=true",
            "ray.gpus_per_worker=0.4",
            "ray.num_workers=1",
            "ray.cpus_per_worker=0.1",
            "data.read_cpus=0.1",
        )
        notes: list[str] = []
        assert _plan(cfg, _settings(8), notes) == 4
        assert "on 2 node(s); 4 at once" in notes[0], notes
        groups = [placement_group([{"CPU": 0.1, "GPU": 0.4}]) for _ in range(5)]
        ready, waiting = ray.wait([g.ready() for g in groups], num_returns=5, timeout=20)
        assert (len(ready), len(waiting)) == (4, 1)
        for group in groups:
            remove_placement_group(group)
        with pytest.raises(ResourcePlanError, match="2 node.s. hold 0 such worker"):
            _plan(with_overrides(cfg, {"ray.gpus_per_worker": 2.0}), _settings(4), [])
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["ray.gpus_per_worker=0.5"], "ray.gpus_per_worker needs ray.use_gpu=true"),
        (["ray.use_gpu=true", "ray.gpus_per_worker=1.5"], "a fraction in (0, 1] or a whole"),
        (["ray.use_gpu=true", "ray.gpus_per_worker=0"], "a fraction in (0, 1]"),
        (
            ["ray.use_gpu=true", "ray.gpus_per_worker=0.5", "ray.num_workers=2"],
            "which NCCL refuses",
        ),
        (
            ["ray.use_gpu=true", "ray.gpus_per_worker=0.5", "ray.resources_per_worker={GPU: 1}"],
            "both set the GPUs",
        ),
    ],
)
def test_bad_gpu_fractions_are_config_errors(tmp_path: Path, overrides, needle) -> None:
    with pytest.raises(ConfigError) as error:
        _cfg(tmp_path, *overrides)
    assert needle in str(error.value)

