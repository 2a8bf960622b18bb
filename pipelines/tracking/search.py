"""MLflow bookkeeping of a Ray Tune search: the parent run, one nested run per trial, each
trial's per-class IoU, the search's results on the parent run and the registered best checkpoint.

`tune.run` drives the search and calls these with plain data: the outcomes below (what a trial
ended as, read from Tune's experiment folder), the config and the reports already rendered
(`tune.report`). Nothing here knows Ray Tune, and nothing under `tune/` talks to MLflow itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pipelines.config import ExperimentConfig, TuneConfig, to_flat_dict
from pipelines.metric_names import SCORE, class_iou_metric
from pipelines.tracking import runs as tracking
from pipelines.tracking.registry import register_checkpoint

COMPLETED, STOPPED, FAILED = "completed", "stopped early", "failed"
INTERRUPTED, PENDING = "interrupted", "not started"
MLFLOW_STATUS = {COMPLETED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED", INTERRUPTED: "KILLED"}

SEARCH_TAG = "segnext.tune.search"
TRIAL_TAG = "segnext.tune.trial_id"
STATUS_TAG = "segnext.tune.status"
ROLE_TAG = "segnext.tune.role"

CONFUSED_PAIRS = 2  # the best trial's most confused pairs whose classes the picture plots


@dataclass
class TrialOutcome:
    trial_id: str
    run_name: str
    status: str
    params: dict[str, Any]
    best_val_miou: float | None = None
    iteration: int = 0  # last reported train iteration
    checkpoint: str | None = None  # the trial's best checkpoint still on disk
    checkpoint_miou: float | None = None
    error: str | None = None
    mlflow_run_id: str | None = None
    class_iou: dict[str, float] = field(default_factory=dict)  # at its best validation


@dataclass
class SearchSummary:
    name: str
    path: str  # the Tune experiment folder
    parent_run_id: str
    outcomes: list[TrialOutcome]
    interrupted: bool
    best: TrialOutcome | None = None
    registered_version: str | None = None
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def connect(configured_uri: str | None, experiment: str) -> tuple[MlflowClient, str, str]:
    """(client, tracking URI, experiment id). The store and the experiment are created here, in
    the driver, before any worker (a fresh SQLite store opened by several processes at once
    gets corrupted)."""
    tracking_uri = tracking.resolve_tracking_uri(configured_uri)
    experiment_id = tracking.ensure_experiment(tracking_uri, experiment)
    return MlflowClient(tracking_uri), tracking_uri, experiment_id


def open_parent_run(
    client: MlflowClient,
    experiment_id: str,
    cfg: ExperimentConfig,
    settings: TuneConfig,
    name: str,
    *,
    resume: bool,
    description: str,
) -> str:
    """The search's parent run: found again on --resume, else created with the search params;
    `description` is its Description while the search runs."""
    if resume:
        run_id = tracking.find_run(client, experiment_id, name)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            tracking.set_description(client, run_id, description + "\n\nResumed (`--resume`).")
            return run_id
    run_id = tracking.start_run(
        client,
        experiment_id,
        ray_run_name=name,
        tags={
            SEARCH_TAG: name,
            ROLE_TAG: "search",
            "mlflow.source.git.commit": tracking.git_commit(),
            tracking.DESCRIPTION_TAG: description,
        },
    )
    searched = set(settings.space)
    params = {
        key: value
        for key, value in to_flat_dict(cfg).items()
        if key not in searched and key != "tune"  # the search's settings are logged below
    }
    params.update(
        {
            "tune.trials": settings.trials,
            "tune.search": settings.search,
            "tune.seed": settings.seed,
            "tune.max_concurrent": settings.max_concurrent,
            "tune.asha.grace_period": settings.asha.grace_period,
            "tune.asha.reduction_factor": settings.asha.reduction_factor,
            **{f"tune.space.{key}": dim.describe() for key, dim in settings.space.items()},
        }
    )
    tracking.log_params(client, run_id, params)
    return run_id


def fail_parent_run(client: MlflowClient, run_id: str) -> None:
    """The search itself raised (or was killed) before its results were recorded."""
    client.set_terminated(run_id, status="FAILED")


def record_trials(client: MlflowClient, experiment_id: str, summary: SearchSummary) -> None:
    """Status tag and end state on each trial's nested run (created here if the trial died
    before opening one); sets each outcome's `mlflow_run_id`."""
    for outcome in summary.outcomes:
        if outcome.status == PENDING:
            continue
        run_id = tracking.find_run(client, experiment_id, outcome.run_name)
        if run_id is None:
            run_id = tracking.start_run(
                client,
                experiment_id,
                ray_run_name=outcome.run_name,
                tags={SEARCH_TAG: summary.name, TRIAL_TAG: outcome.trial_id, ROLE_TAG: "trial"},
                parent_run_id=summary.parent_run_id,
            )
            tracking.log_params(client, run_id, outcome.params)
        tags = {STATUS_TAG: outcome.status}
        if outcome.error:
            tags["segnext.tune.error"] = outcome.error
        tracking.set_tags(client, run_id, tags)
        if outcome.best_val_miou is not None:
            client.log_metric(run_id, "tune/best_val_mIoU", outcome.best_val_miou)
        client.set_terminated(run_id, status=MLFLOW_STATUS[outcome.status])
        outcome.mlflow_run_id = run_id


def record_class_iou(client: MlflowClient, summary: SearchSummary, settings: TuneConfig) -> None:
    """Each trial's IoU of the confusing classes at its best validation, read from its MLflow
    run: `tune.classes`, else the classes of the best trial's most confused pairs."""
    best_steps = {}
    for outcome in summary.outcomes:
        history = (
            []
            if outcome.mlflow_run_id is None
            else client.get_metric_history(outcome.mlflow_run_id, SCORE)
        )
        scored = [m for m in history if math.isfinite(m.value)]
        if scored:
            best_steps[outcome.trial_id] = max(scored, key=lambda m: m.value).step
    classes = list(settings.classes or [])
    best = summary.best
    if not classes and best is not None and best.trial_id in best_steps:
        artifact = f"validation/step_{best_steps[best.trial_id]:07d}/metrics.json"
        try:
            local = client.download_artifacts(best.mlflow_run_id, artifact)
            pairs = json.loads(Path(local).read_text())["confused_pairs"][:CONFUSED_PAIRS]
        except Exception as error:  # no artifact store reachable: the picture shows mIoU only
            summary.notes.append(f"confusing pairs unavailable ({artifact}: {error})")
            pairs = []
        for pair in pairs:
            classes += [name for name in (pair["true"], pair["pred"]) if name not in classes]
        if pairs:
            summary.notes.append(
                f"confusing pairs of the best trial {best.trial_id} (true -> predicted): "
                + ", ".join(
                    f"{p['true']} -> {p['pred']} ({100 * p['fraction']:.1f}% of {p['true']})"
                    for p in pairs
                )
            )
    for outcome in summary.outcomes:
        step = best_steps.get(outcome.trial_id)
        if step is None:
            continue
        for name in classes:
            history = client.get_metric_history(
                outcome.mlflow_run_id, class_iou_metric(name)
            )
            values = [m.value for m in history if m.step == step]
            if values and math.isfinite(values[-1]):
                outcome.class_iou[name] = values[-1]


def register_best(summary: SearchSummary, *, registry_name: str, tracking_uri: str) -> None:
    """Register the best checkpoint; a registry failure is reported, not fatal: the search's
    results stay recorded and the checkpoint can be registered later (`segnext register`)."""
    best = summary.best
    try:
        version = register_checkpoint(
            best.checkpoint,
            run_id=best.mlflow_run_id,
            registry_name=registry_name,
            tracking_uri=tracking_uri,
        )
    except Exception as error:  # any registry error: keep the search results
        summary.notes.append(f"registering {best.checkpoint} failed: {error}")
        return
    summary.registered_version = str(version.version)


def record_parent(
    client: MlflowClient,
    summary: SearchSummary,
    *,
    describe: Callable[[str], str],
    results_csv: str,
    results_markdown: str,
    figure: Any,
) -> None:
    """The search's outcome on its parent run, which then ends: trial counts, wall time, the
    best trial, its Description (`describe(current Description)`), the results table (CSV and
    markdown) and `figure` (a matplotlib figure; the caller closes it)."""
    run_id = summary.parent_run_id
    counts = {
        status: sum(o.status == status for o in summary.outcomes)
        for status in (COMPLETED, STOPPED, FAILED)
    }
    for status, count in counts.items():
        client.log_metric(run_id, f"trials/{status.replace(' ', '_')}", count)
    client.log_metric(run_id, "search/wall_s", summary.wall_s)
    tags = {STATUS_TAG: INTERRUPTED if summary.interrupted else COMPLETED}
    if summary.best is not None:
        client.log_metric(run_id, "best/val_mIoU", summary.best.checkpoint_miou)
        tags.update(
            {"best_trial": summary.best.trial_id, "best_checkpoint": summary.best.checkpoint}
        )
    if summary.registered_version is not None:
        tags["registered_version"] = summary.registered_version
    tracking.set_tags(client, run_id, tags)
    tracking.set_description(client, run_id, describe(tracking.description(client, run_id)))
    client.log_text(run_id, results_csv, "tune/results.csv")
    client.log_text(run_id, results_markdown, "tune/results.md")
    client.log_figure(run_id, figure, "tune/val_mIoU_vs_params.png")
    client.set_terminated(run_id, status="KILLED" if summary.interrupted else "FINISHED")
