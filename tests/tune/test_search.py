"""`segnext tune`: resource plan, reports, and one real search on a local Ray cluster.

The slow tests share one 3-trial search on tiny synthetic shards (64x64, 1 worker per trial,
10 iterations, one trial at a time so ASHA's decisions are reproducible):
  trial 0  lr 2e-3   learns           -> completed
  trial 1  lr 1e-7   does not learn   -> stopped early by ASHA at its first validation
  trial 2  lr 1e4    diverges (NaN)   -> failed, the search goes on
The search is interrupted (SIGINT, as Ctrl+C) once two trials have ended, then resumed by name:
the resumed search must run only trial 2.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from ray import tune

from pipelines.config import ConfigError, Dimension, TuneConfig, load_config, with_overrides
from tune.search import (
    COMPLETED,
    FAILED,
    SEARCH_TAG,
    STATUS_TAG,
    STOPPED,
    TRIAL_TAG,
    ResourcePlanError,
    TrialOutcome,
    params_figure,
    plan_concurrency,
    plan_search,
    results_csv,
    results_markdown,
    trial_demand,
)
from tune.space import load_search_config

SEARCH_YAML = """
model: {{variant: tiny, classifier: integrated, drop_path_rate: 0.0}}
data: {{root: {shards}, crop_size: [64, 64], ratio_range: [0.75, 1.5]}}
optim: {{lr: 2.0e-3}}
schedule: {{iterations: 10, warmup_iters: 1}}
train: {{global_batch_size: 8, log_every: 5, val_every: 5, checkpoint_every: 5, keep_best: 1,
        max_failures: 0}}
eval: {{batch_size: 8}}
ray: {{num_workers: 1, cpus_per_worker: 0.5}}
mlflow: {{tracking_uri: "sqlite:///{store}/mlflow.db", experiment: tune-test}}
registry: {{name: tune-test}}
run: {{storage_path: {store}/ray}}
tune:
  trials: 1
  max_concurrent: 1
  asha: {{grace_period: 1, reduction_factor: 2}}
  space:
    optim.lr: {{grid: [2.0e-3, 1.0e-7, 1.0e+4]}}
"""


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


def test_grace_period_must_fit_in_the_schedule(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SEARCH_YAML.format(shards="/x", store=tmp_path))
    with pytest.raises(ConfigError, match="tune.asha.grace_period = 3 validations is 15"):
        load_search_config(path, ["tune.asha.grace_period=3"])


def test_picture_plots_the_confusing_classes_against_each_weight(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        SEARCH_YAML.format(shards="/x", store=tmp_path)
        + "    loss.weights.variance: {loguniform: [0.01, 1.0]}\n"
    )
    _, settings = load_search_config(path)
    outcomes = [
        TrialOutcome(
            f"t{i}",
            f"s-t{i}",
            COMPLETED,
            {"optim.lr": 2e-3, "loss.weights.variance": weight},
            best_val_miou=miou,
            iteration=10,
            class_iou={"car": car, "truck": truck},
        )
        for i, (weight, miou, car, truck) in enumerate(
            [(0.01, 0.5, 0.4, 0.2), (0.5, 0.6, 0.5, 0.45)]
        )
    ]
    figure = params_figure(outcomes, settings)
    assert len(figure.axes) == 3 * 2  # rows: mIoU, IoU car, IoU truck; columns: the two keys
    labels = [ax.get_ylabel() for ax in figure.axes]
    assert labels == ["best val mIoU"] * 2 + ["IoU car"] * 2 + ["IoU truck"] * 2
    assert figure.axes[5].get_xscale() == "log"
    truck = figure.axes[5].collections[0].get_offsets()
    assert sorted(map(tuple, truck.tolist())) == [(0.01, 0.2), (0.5, 0.45)]
    table = results_markdown(outcomes, settings).splitlines()
    assert table[0].endswith("| best val mIoU | IoU car | IoU truck | iteration | error |")
    assert table[2].startswith("| t1 |") and "| 0.5000 | 0.4500 |" in table[2]


def test_reports_rank_trials_and_draw_one_panel_per_key(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        SEARCH_YAML.format(shards="/x", store=tmp_path)
        + "    optim.weight_decay: {choice: [0.0, 0.01]}\n"
    )
    _, settings = load_search_config(path)
    outcomes = [
        TrialOutcome(
            "t0",
            "s-t0",
            STOPPED,
            {"optim.lr": 1e-7, "optim.weight_decay": 0.0},
            best_val_miou=0.03,
            iteration=5,
        ),
        TrialOutcome(
            "t1",
            "s-t1",
            FAILED,
            {"optim.lr": 1e4, "optim.weight_decay": 0.01},
            error="FloatingPointError: loss is nan | inf",
        ),
        TrialOutcome(
            "t2",
            "s-t2",
            COMPLETED,
            {"optim.lr": 2e-3, "optim.weight_decay": 0.0},
            best_val_miou=0.41,
            iteration=10,
            checkpoint="/c",
        ),
    ]
    table = results_markdown(outcomes, settings).splitlines()
    assert table[0] == (
        "| trial | status | optim.lr | optim.weight_decay | best val mIoU | iteration | error |"
    )
    assert [row.split(" | ")[0] for row in table[2:]] == ["| t2", "| t0", "| t1"]
    assert "loss is nan / inf" in table[4]  # a '|' would break the table
    csv_rows = results_csv(outcomes, settings).splitlines()
    assert csv_rows[1].startswith("t2,completed,0.002,0.0,0.410000,10,/c,")
    figure = params_figure(outcomes, settings)
    assert len(figure.axes) == 2
    assert figure.axes[0].get_xscale() == "linear"  # grid values plot as they are
    figure.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


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

    from tune.search import _plan

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


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.shards import write_shards
    from data.sources import Synthetic

    shards = tmp_path_factory.mktemp("ws") / "shards"
    write_shards(Synthetic(num_train=16, num_val=4, size=(64, 64), seed=0), shards, shard_size=16)
    return shards


def _warm_search(tmp_path: Path, shards: Path, warm_start: str):
    path = tmp_path / "s.yaml"
    path.write_text(
        SEARCH_YAML.format(shards=shards, store=tmp_path).replace(
            "tune:\n", f"tune:\n  warm_start: {warm_start}\n"
        )
    )
    return load_search_config(path)


def test_warm_start_fits_the_shards_or_the_search_stops_before_ray(
    tmp_path: Path, small_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tune.search as search_module
    from tune.search import run_search

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray was started although the warm start is invalid")

    monkeypatch.setattr(search_module, "init_ray", forbidden)
    other = _checkpoint(tmp_path / "other", num_classes=3)
    cases = [
        (f"{{from: {tmp_path / 'none.pt'}}}", "does not exist"),
        (f"{{from: {other}, part: model}}", "num_classes 3, this run 7"),
        (f"{{from: {small_shards / 'dataset.json'}}}", "not a torch checkpoint"),
    ]
    for warm_start, needle in cases:
        cfg, settings = _warm_search(tmp_path, small_shards, warm_start)
        with pytest.raises(ConfigError) as error:
            run_search(cfg, settings, name="w")
        assert needle in str(error.value)
        assert str(error.value).startswith(("tune.warm_start", "model.init_from"))


def test_warm_start_uses_the_source_when_it_exists_else_trains_from_scratch(
    tmp_path: Path, small_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    from tune.search import resolve_warm_start

    source = _checkpoint(tmp_path / "other", num_classes=3)
    cfg, settings = _warm_search(tmp_path, small_shards, f"{{from: {source}, part: encoder}}")
    notes: list[str] = []
    prepared = resolve_warm_start(cfg, settings, notes)
    assert prepared.cfg.model.init_from == str(source)
    assert prepared.cfg.model.init_part == "encoder"
    assert notes == [f"warm start: every trial starts from the encoder of {source} "
                     "(iteration 1, val/mIoU 0.5000)"]

    missing = tmp_path / "none.pt"
    cfg, settings = _warm_search(
        tmp_path,
        small_shards,
        f"{{from: {missing}, if_missing: scratch, scratch: {{schedule.iterations: 20}}}}",
    )
    notes = []
    prepared = resolve_warm_start(cfg, settings, notes)
    assert prepared.cfg.model.init_from is None
    assert prepared.cfg.schedule.iterations == 20
    assert notes == [
        f"warm start: {missing} not found; training from scratch (schedule.iterations=20)"
    ]
    assert notes[0] in capsys.readouterr().out


def _checkpoint(folder: Path, *, num_classes: int) -> Path:
    import segnext
    from pipelines.checkpoint_io import build_meta, save_checkpoint

    model = segnext.create_model("tiny", num_classes, classifier="integrated")
    meta = build_meta(
        variant="tiny",
        num_classes=num_classes,
        classifier="integrated",
        classifier_kwargs={},
        nmf={},
        class_names=[f"c{i}" for i in range(num_classes)],
        palette=[[i, i, i] for i in range(num_classes)],
        ignore_index=255,
        mean=[0.0] * 3,
        std=[1.0] * 3,
        crop_size=[64, 64],
    )
    payload = {
        "model": model.state_dict(),
        "iteration": 1,
        "epoch": 0,
        "metrics": {"val/mIoU": 0.5},
        "config": {},
        "meta": meta,
    }
    return save_checkpoint(folder, payload)


# ---------------------------------------------------------------------------------- slow


class InterruptAfter(tune.Callback):
    """Sends SIGINT (Ctrl+C) once `count` trials have ended; Tune saves its state and stops.

    Tune pickles its callbacks with the search and restores them on resume, so a marker file
    makes it fire once.
    """

    def __init__(self, count: int, marker: Path) -> None:
        self.count, self.marker, self.ended = count, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended()

    def _ended(self) -> None:
        self.ended += 1
        if self.ended >= self.count and not self.marker.exists():
            self.marker.write_text("interrupted\n")
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory):
    """Run the 3-trial search, interrupt it after two trials, resume it; return both runs."""
    import ray

    from data.shards import write_shards
    from data.sources import Synthetic
    from pipelines.cluster import init_ray
    from tune.search import run_search

    tmp = tmp_path_factory.mktemp("tune")
    shards = tmp / "shards"
    write_shards(Synthetic(num_train=32, num_val=8, size=(64, 64), seed=0), shards, shard_size=16)
    path = tmp / "search.yaml"
    path.write_text(SEARCH_YAML.format(shards=shards, store=tmp))
    cfg, settings = load_search_config(path)
    init_ray("local", num_cpus=2)
    try:
        first = run_search(
            cfg, settings, name="s", callbacks=[InterruptAfter(2, tmp / "interrupted.marker")]
        )
        before = _progress_rows(first)
        second = run_search(cfg, settings, name="s", resume=True)
    finally:
        ray.shutdown()
    return {"first": first, "second": second, "before": before, "cfg": cfg}


def _progress_rows(summary) -> dict[str, int]:
    """Rows in each trial's Tune progress.csv: a rerun trial would add rows."""
    rows = {}
    for outcome in summary.outcomes:
        progress = Path(summary.path) / f"trial_{outcome.trial_id}" / "progress.csv"
        rows[outcome.trial_id] = len(progress.read_text().splitlines()) if progress.exists() else 0
    return rows


def _by_lr(summary) -> dict[float, TrialOutcome]:
    return {o.params["optim.lr"]: o for o in summary.outcomes}


@pytest.mark.slow
def test_asha_stops_a_trial_and_a_diverging_trial_fails(search) -> None:
    second = search["second"]
    assert not second.interrupted
    by_lr = _by_lr(second)
    assert sorted(by_lr) == [1e-7, 2e-3, 1e4]
    assert by_lr[2e-3].status == COMPLETED and by_lr[2e-3].iteration == 10
    assert by_lr[1e-7].status == STOPPED and by_lr[1e-7].iteration == 5
    assert by_lr[1e4].status == FAILED
    assert "nan" in by_lr[1e4].error.lower(), by_lr[1e4].error
    assert second.best is by_lr[2e-3]
    # the confusing classes: those of the best trial's most confused pairs, read from MLflow
    assert any("confusing pairs of the best trial" in note for note in second.notes)
    assert 2 <= len(second.best.class_iou) <= 4
    assert all(0.0 <= iou <= 1.0 for iou in second.best.class_iou.values())
    assert set(by_lr[1e-7].class_iou) == set(second.best.class_iou)
    assert second.best.checkpoint and Path(second.best.checkpoint).is_dir()


@pytest.mark.slow
def test_resume_runs_only_the_missing_trials(search) -> None:
    first, second = search["first"], search["second"]
    assert first.interrupted
    ended_before = {
        o.trial_id: o.status for o in first.outcomes if o.status in (COMPLETED, STOPPED, FAILED)
    }
    assert len(ended_before) == 2
    assert {
        o.trial_id: o.status for o in second.outcomes if o.trial_id in ended_before
    } == ended_before
    after = _progress_rows(second)
    for trial_id in ended_before:  # not one more report: they did not run again
        assert after[trial_id] == search["before"][trial_id] > 0
    train_runs = sorted(p.name for p in (Path(second.path) / "train").iterdir())
    assert train_runs == sorted(f"s-{o.trial_id}" for o in second.outcomes)


@pytest.mark.slow
def test_mlflow_holds_parent_nested_runs_and_the_registered_best(search) -> None:
    from mlflow.tracking import MlflowClient

    second, cfg = search["second"], search["cfg"]
    client = MlflowClient(cfg.mlflow.tracking_uri)
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[STATUS_TAG] == COMPLETED
    assert parent.data.params["tune.space.optim.lr"] == "grid(0.002, 1e-07, 10000.0)"
    assert parent.data.metrics["trials/stopped_early"] == 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert artifacts == {"tune/results.csv", "tune/results.md", "tune/val_mIoU_vs_params.png"}

    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    nested = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{SEARCH_TAG}` = 's' and "
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    by_trial: dict[str, list] = {}
    for run in nested:
        by_trial.setdefault(run.data.tags[TRIAL_TAG], []).append(run)
    assert sorted(by_trial) == sorted(o.trial_id for o in second.outcomes)
    for outcome in second.outcomes:  # one run per trial, even across the resume
        (run,) = by_trial[outcome.trial_id]
        assert run.data.tags[STATUS_TAG] == outcome.status
        expected = {COMPLETED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}[outcome.status]
        assert run.info.status == expected
    best_run = by_trial[second.best.trial_id][0]
    assert best_run.data.params["optim.lr"] == "0.002"
    assert "val/mIoU" in best_run.data.metrics

    version = client.get_model_version_by_alias(cfg.registry.name, "champion")
    assert str(version.version) == second.registered_version
    assert version.run_id == second.best.mlflow_run_id


def test_search_progress_line_counts_trials_and_best() -> None:
    from types import SimpleNamespace

    from tune.search import search_progress

    def trial(trial_id, status, iteration=0):
        return SimpleNamespace(trial_id=trial_id, status=status,
                               last_result={"iteration": iteration})

    progress = search_progress(iterations=100)
    trials = [trial("a", "RUNNING"), trial("b", "TERMINATED", 100), trial("c", "TERMINATED", 30),
              trial("d", "ERROR"), trial("e", "PENDING")]
    progress.on_trial_result(0, trials, trials[0], {"val/mIoU": 0.25})
    progress.on_trial_result(0, trials, trials[1], {"val/mIoU": 0.5})
    progress.on_trial_result(0, trials, trials[0], {"val/mIoU": 0.4})
    assert progress.line(trials) == (
        "[segnext tune] trials: 1 running, 1 done, 1 stopped early, 1 failed of 5; "
        "best val/mIoU 0.5000 (b)"
    )
    # Tune creates trials as slots free up: the count is the search's, not the trials seen yet
    assert "failed of 8;" in search_progress(iterations=100, total=8).line(trials)
