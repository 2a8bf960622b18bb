"""The MLflow run of one `segnext train` run: opened in the driver before Ray starts, ended
after the fit with its outcome (best score, skipped samples, curves, log, Description).

The driver (`pipelines.train.driver`) calls these and imports no MLflow client itself; the
workers log per-step metrics and pictures through `pipelines.tracking.runs.RunLogger`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from mlflow.tracking import MlflowClient

from data.manifest import Manifest
from pipelines.config import ExperimentConfig, to_flat_dict, to_yaml
from pipelines.metric_names import SCORE, metric_name
from pipelines.tracking import datasets
from pipelines.tracking import runs as tracking

CURVES = ("train/loss", SCORE, "val/aAcc", "perf/images_per_s")
RESUME_CHANGED_TAG = "resume.changed"  # what each --resume changed, one line per resume


@dataclass(frozen=True)
class TrainingRecord:
    """Where a training run is recorded: the tracking store and the MLflow run id."""

    tracking_uri: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


def existing_run_id(cfg: ExperimentConfig) -> str | None:
    """The MLflow run of Ray run `cfg.run.name` in `cfg.mlflow.experiment`, if one exists
    (read only: creates neither the experiment nor a run)."""
    client = MlflowClient(tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    return tracking.find_run(client, experiment.experiment_id, cfg.run.name)


def open_training_run(
    cfg: ExperimentConfig,
    *,
    num_params: int,
    train_samples: int,
    meta: Mapping[str, Any],
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    manifest: Manifest | None = None,
) -> TrainingRecord:
    """Continue the MLflow run of this Ray run (`cfg.run.name`) if there is one, else create
    it with params, config and meta; either way its Description says what this attempt trains
    (`finish_training_run` adds the outcome), and with the shards' `manifest` the training and
    validation splits are logged as its datasets (`pipelines.tracking.datasets`)."""
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    experiment_id = tracking.ensure_experiment(uri, cfg.mlflow.experiment)
    client = MlflowClient(uri)
    run_name = cfg.run.name
    opening = tracking.training_description(cfg, run_name=run_name, num_params=num_params,
                                            train_samples=train_samples)
    if parent_run_id:
        opening += f"\n- Nested under MLflow run `{parent_run_id}`"
    run_id = tracking.find_run(client, experiment_id, run_name)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        tracking.set_description(client, run_id, opening + "\n- Resumed from its latest checkpoint")
        _log_datasets(client, run_id, cfg, manifest)
        print(f"[segnext] continuing MLflow run {run_id}", flush=True)
        return TrainingRecord(uri, run_id)
    all_tags = {
        tracking.DESCRIPTION_TAG: opening,
        "mlflow.source.git.commit": tracking.git_commit(),
        "ray.version": ray.__version__,
        "torch.version": torch.__version__,
        "workers.count": str(cfg.ray.num_workers),
        "workers.kind": "GPU" if cfg.ray.use_gpu else "CPU",
        "model.params": str(num_params),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    run_id = tracking.start_run(client, experiment_id, ray_run_name=run_name, tags=all_tags,
                                parent_run_id=parent_run_id)
    # the options the model is built with: a head's default decision rule shows as a param
    built = replace(cfg, model=replace(cfg.model, classifier_kwargs=cfg.model.classifier_options()))
    tracking.log_params(client, run_id, to_flat_dict(built))
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    client.log_dict(run_id, dict(meta), "dataset_meta.json")
    _log_datasets(client, run_id, cfg, manifest)
    return TrainingRecord(uri, run_id)


def _log_datasets(
    client: MlflowClient, run_id: str, cfg: ExperimentConfig, manifest: Manifest | None
) -> None:
    if manifest is not None:
        datasets.log_splits(client, run_id, manifest,
                            datasets.training_contexts(cfg.data.train_splits, cfg.data.val_split))


def record_resume_changes(record: TrainingRecord, cfg: ExperimentConfig, changes: str) -> None:
    """What a `--resume` changed from the run's saved config: appended to the tag
    `resume.changed` (params are write-once), and config.yaml replaced by the config now."""
    client = record.client
    earlier = client.get_run(record.run_id).data.tags.get(RESUME_CHANGED_TAG)
    client.set_tag(record.run_id, RESUME_CHANGED_TAG,
                   f"{earlier}\n{changes}" if earlier else changes)
    client.log_text(record.run_id, to_yaml(cfg), "config.yaml")


def fail_training_run(
    record: TrainingRecord, reason: str | None = None, *, status: str = "FAILED"
) -> None:
    """End the run FAILED (or KILLED: interrupted); with `reason`, its Description says why."""
    client = record.client
    if reason:
        tracking.set_description(client, record.run_id, tracking.failed_description(
            tracking.description(client, record.run_id), reason))
    client.set_terminated(record.run_id, status=status)


def log_skipped(record: TrainingRecord, counts: Mapping[str, int]) -> None:
    """Samples left out under `data.on_error: skip`, per split: a metric and a tag each."""
    client = record.client
    for split, count in counts.items():
        client.log_metric(record.run_id, metric_name(f"data/skipped/{split}"), count)
        client.set_tag(record.run_id, metric_name(f"data.skipped.{split}"), str(count))


def log_outcome(
    record: TrainingRecord,
    *,
    best_checkpoint: str | None,
    best_score: float | None,
    log_file: Path | None,
) -> None:
    """The best score and checkpoint, the console log and the curves picture."""
    client = record.client
    if best_score is not None:
        client.log_metric(record.run_id, "best/val_mIoU", best_score)
        client.set_tag(record.run_id, "best_checkpoint", best_checkpoint)
    if log_file is not None:  # the console's full log, as far as it goes
        client.log_artifact(record.run_id, str(log_file), "logs")
    histories = tracking.metric_histories(client, record.run_id, CURVES)
    client.log_figure(record.run_id, tracking.curves_figure(histories), "curves.png")


def finish_training_run(
    record: TrainingRecord,
    cfg: ExperimentConfig,
    *,
    iteration: int,
    best_checkpoint: str | None,
    best_score: float | None,
    model_uri: str | None,
) -> None:
    """The Description's outcome section (what was reached, what to run next); FINISHED."""
    client = record.client
    tracking.set_description(client, record.run_id, tracking.finished_description(
        tracking.description(client, record.run_id), iteration=iteration,
        best_val_miou=best_score, best_checkpoint=best_checkpoint, model_uri=model_uri,
        data_root=cfg.data.root, val_split=cfg.data.val_split, tracking_uri=record.tracking_uri))
    client.set_terminated(record.run_id, status="FINISHED")
