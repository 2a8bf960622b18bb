"""`segnext tune`: running a search (`tune.run`): the warm start, one real search on a
local Ray cluster, its MLflow record and its progress line.

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

from pipelines.config import ConfigError
from pipelines.tracking.search import (
    COMPLETED,
    FAILED,
    ROLE_TAG,
    SEARCH_TAG,
    STATUS_TAG,
    STOPPED,
    TRIAL_TAG,
    TrialOutcome,
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



def test_grace_period_must_fit_in_the_schedule(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SEARCH_YAML.format(shards="/x", store=tmp_path))
    with pytest.raises(ConfigError, match="tune.asha.grace_period = 3 validations is 15"):
        load_search_config(path, ["tune.asha.grace_period=3"])



def test_a_search_name_stays_inside_the_storage_path(tmp_path: Path, capsys) -> None:
    """`--resume ../x` (or run.name) names one folder under run.storage_path, as for train;
    refused before the config is resolved or Ray starts."""
    from pipelines.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(SEARCH_YAML.format(shards="/x", store=tmp_path))
    assert main(["tune", "--config", str(path), "--resume", "../../escape"]) == 2
    assert "run.name '../../escape' must be one folder name" in capsys.readouterr().err


def test_a_search_whose_trials_never_start_stops_after_the_timeout(monkeypatch, capsys) -> None:
    """The bounded wait around Tune's fit: Tune answers the watch's interrupt with its own
    SIGINT handler (it saves the search and fit returns), and the search still ends with the
    error naming ray.start_timeout_s (before, it went on as an interrupted search)."""
    import threading
    import time

    from pipelines.train import start_wait

    monkeypatch.setattr(start_wait, "POLL_S", 0.05)
    monkeypatch.setattr(start_wait, "_workers_alive", lambda: False)
    monkeypatch.setattr(start_wait._Watch, "_fits_now", lambda self: False)
    monkeypatch.setattr(start_wait._Watch, "_cluster",
                        lambda self: "the cluster has {GPU: 0} free of {GPU: 0}")
    never_placed = (r"ray.start_timeout_s: the Ray cluster did not place 1 worker\(s\) of "
                    r"\{GPU: 1\} within 0.3 s")
    asked_to_stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: asked_to_stop.set())  # as Tune's
    try:
        with pytest.raises(ConfigError, match=never_placed), \
                start_wait.bounded_start(1, {"GPU": 1.0}, 0.3):
            deadline = time.monotonic() + 10
            while not asked_to_stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.02)  # Tune's loop: the handler runs between its steps
            assert asked_to_stop.is_set()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ("waiting for 1 worker(s) of {GPU: 1} (the cluster has {GPU: 0} free of {GPU: 0}); "
            "gives up after 0.3 s (ray.start_timeout_s)") in capsys.readouterr().out


@pytest.mark.slow
def test_a_search_a_growing_cluster_cannot_place_is_announced_and_bounded(
    tmp_path: Path, small_shards: Path, joined_cluster: str, capsys
) -> None:
    """tune.capacity says the cluster will grow, so the plan accepts trials it cannot place
    now; Ray would wait for them forever, silently. The search says what it waits for and
    stops after ray.start_timeout_s (exit 2), its parent run FAILED."""
    from mlflow import MlflowClient

    from pipelines.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(SEARCH_YAML.format(shards=small_shards, store=tmp_path))
    code = main(["tune", "--config", str(path), f"ray.address={joined_cluster}",
                 "ray.resources_per_worker={segnext_missing: 1}", "ray.start_timeout_s=8",
                 "tune.capacity={segnext_missing: 1}", "run.name=never-placed"])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert ("[segnext] waiting for 1 worker(s) of {CPU: 0.5, segnext_missing: 1}" in out
            and "gives up after 8 s (ray.start_timeout_s)" in out), out
    assert "ray.start_timeout_s: the Ray cluster did not place 1 worker(s)" in err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tune-test")
    [parent] = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`{SEARCH_TAG}` = 'never-placed' and "
                                                f"tags.`{ROLE_TAG}` = 'search'")
    assert parent.info.status == "FAILED"


@pytest.fixture(scope="module")
def small_shards(make_shards) -> Path:
    """16 train + 4 val synthetic 64x64 scenes, 7 classes (shared: read only)."""
    return make_shards(16, 4, shard_size=16)


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
    import tune.run as search_module
    from tune.run import run_search

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
    from tune.run import resolve_warm_start

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
def search(tmp_path_factory: pytest.TempPathFactory, synthetic_shards: Path, ray_session: None):
    """Run the 3-trial search on `synthetic_shards` (32 train + 8 val) in the module's private
    Ray, interrupt it after two trials, resume it; return both runs."""
    from tune.run import run_search

    tmp = tmp_path_factory.mktemp("tune")
    path = tmp / "search.yaml"
    path.write_text(SEARCH_YAML.format(shards=synthetic_shards, store=tmp))
    cfg, settings = load_search_config(path)
    first = run_search(
        cfg, settings, name="s", callbacks=[InterruptAfter(2, tmp / "interrupted.marker")]
    )
    before = _progress_rows(first)
    second = run_search(cfg, settings, name="s", resume=True)
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

    from tune.run import search_progress

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


def test_checkpoints_on_object_storage_keep_their_scheme() -> None:
    """Ray reports a checkpoint's path on its pyarrow filesystem: on S3 `bucket/key`, which the
    best trial must name as `s3://bucket/key` (it was read as a missing local folder, so a
    search on S3 found no best trial)."""
    import pyarrow.fs as pafs

    from tune.run import _best_checkpoint

    rows = [{"val/mIoU": 0.2, "checkpoint_path": "bucket/tune/s/t0/checkpoint_2"},
            {"val/mIoU": 0.3, "checkpoint_path": "bucket/tune/s/t0/checkpoint_4"},
            {"val/mIoU": 0.4}]
    s3 = pafs.S3FileSystem(region="us-east-1", anonymous=True)
    assert _best_checkpoint(rows, s3) == ("s3://bucket/tune/s/t0/checkpoint_4", 0.3)
    # local: neither folder exists
    assert _best_checkpoint(rows, pafs.LocalFileSystem()) == (None, None)


@pytest.mark.slow
def test_sigterm_to_tune_leaves_no_ray_process(tmp_path: Path, synthetic_shards: Path) -> None:
    """SIGTERM to `segnext tune` mid-trial: exit 130 and, seconds later, none of the processes
    of its private cluster (a trial's Train worker, its actors, the head's) is running (a
    trial's workers ran on for up to a minute, re-parented to init: issue 29, finding 8)."""
    import subprocess
    import sys
    import time

    from pipelines.ray_stop import descendants, running

    repo = Path(__file__).resolve().parents[2]

    config = tmp_path / "search.yaml"
    config.write_text(SEARCH_YAML.format(shards=synthetic_shards, store=tmp_path))
    cli = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "tune", "--config", str(config),
         "schedule.iterations=2000", "train.log_every=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)})
    seen = []
    try:
        for line in cli.stdout:  # until the trial trains
            seen.append(line)
            if "[segnext] it " in line:
                break
        cluster = descendants({cli.pid})
        assert len(cluster) >= 5, "".join(seen[-20:])
        cli.send_signal(signal.SIGTERM)
        seen.extend(cli.stdout)
        assert cli.wait(timeout=120) == 130, "".join(seen[-20:])
    finally:
        cli.kill()
    deadline = time.monotonic() + 5
    while (left := [pid for pid in cluster if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running 5 s after `segnext tune` exited: {left}"
