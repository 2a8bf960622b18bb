"""MLflow record of one `segnext eval`: its scores, figures and metrics.json in a run.

`pipelines.commands.evaluate` computes the scores and imports no MLflow client itself; this
writes them into a new run or into the run that logged the model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.entities import Metric

from pipelines.metric_names import class_iou_metric
from pipelines.tracking import datasets
from pipelines.tracking import runs as tracking

if TYPE_CHECKING:
    from pipelines.commands.evaluate import EvalResult


def log_evaluation(
    result: EvalResult,
    *,
    model: str,
    data: str,
    split: str,
    target: str,
    experiment: str,
    tracking_uri: str | None = None,
) -> str:
    """Log the scores into a new run (`target="new"`) or the model's run (`"model"`); returns
    the run id. Metric keys are `eval/<split>/...`; the split is the run's dataset of context
    "test" (a split the model's run already has, e.g. its validation split, keeps its context)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    source_run = result.model_run_id
    if target == "model":
        if source_run is None:
            raise ValueError(
                f"{model} is a bare checkpoint with no MLflow run; use --log-to new or pass a "
                "registered model (models:/segnext@champion)"
            )
        run_id = source_run
    else:
        experiment_id = tracking.ensure_experiment(uri, experiment)
        tags = {"segnext.eval.model": model, "segnext.eval.data": data, "segnext.eval.split": split}
        if source_run:
            tags["segnext.eval.model_run"] = source_run
        run_id = client.create_run(experiment_id, run_name=f"eval-{split}", tags=tags).info.run_id
    prefix = f"eval/{split}"
    scores = result.scores
    values = {f"{prefix}/{key}": scores[key] for key in ("mIoU", "aAcc", "mAcc")}
    for name, iou in zip(result.class_names, scores["per_class_iou"], strict=True):
        values[class_iou_metric(name, prefix)] = iou
    values[f"{prefix}/skipped_samples"] = result.skipped["count"]
    metrics = [Metric(key, float(v), 0, 0) for key, v in values.items() if not math.isnan(v)]
    client.log_batch(run_id, metrics=metrics)
    if result.manifest is not None:  # the split scored, as a dataset of context "test"
        datasets.log_splits(client, run_id, result.manifest, [(split, datasets.TEST)])
    figures = (
        (tracking.confusion_matrix_figure(result.matrix, result.class_names), "confusion_matrix"),
        (tracking.per_class_iou_figure(scores["per_class_iou"], result.class_names), "iou"),
    )
    for figure, name in figures:
        client.log_figure(run_id, figure, f"{prefix}/{name}.png")
    client.log_dict(
        run_id,
        {
            "model": model,
            "data": data,
            "split": split,
            "num_samples": result.num_samples,
            "settings": result.settings,
            "skipped": result.skipped,
            "scores": scores,
            "class_names": result.class_names,
            "confusion_matrix": result.matrix.tolist(),
        },
        f"{prefix}/metrics.json",
    )
    if target == "new":
        client.set_terminated(run_id)
    return run_id
