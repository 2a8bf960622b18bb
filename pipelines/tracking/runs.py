"""MLflow tracking: where the store lives, one run per training, and the pictures logged to it.

The driver creates the database, the experiment and the run before any worker starts (a fresh
SQLite store opened by several processes at once gets corrupted), then rank 0 of the workers
logs metrics and figures into that run by id. Everything else in the run (params, config,
curves, the registered model) comes from the driver.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.metric_names import metric_name  # noqa: E402, F401 (re-exported)

RUN_NAME_TAG = "segnext.ray_run_name"
MAX_BATCH = 100  # MLflow's per-call limit for params and tags
DESCRIPTION_TAG = "mlflow.note.content"  # what the run page shows as its Description
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value
OUTCOME_HEADING = "\n### "  # the outcome's section: replaced when a resumed run ends again


def project_root() -> Path:
    """The source checkout (for an editable install) or else the current folder."""
    root = Path(__file__).resolve().parents[2]  # pipelines/tracking/runs.py -> the checkout
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else SQLite under <repo>/runs; always absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{project_root() / 'runs' / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return f"sqlite:///{Path(path).expanduser().resolve()}"
    if "://" not in uri:  # a bare folder: MLflow's file store
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def artifact_root(tracking_uri: str) -> str | None:
    """Absolute artifact folder for a local store (workers run in Ray's session folders)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None  # a tracking server or file store decides for itself


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create the store and the experiment if needed; call once, in the driver."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_experiment_location(tracking_uri, name))


def _experiment_location(tracking_uri: str, name: str) -> str | None:
    root = artifact_root(tracking_uri)
    return None if root is None else f"{root}/{name.replace('/', '_')}"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=project_root(),
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def find_run(client: MlflowClient, experiment_id: str, ray_run_name: str) -> str | None:
    """The MLflow run that belongs to Ray run `ray_run_name` (for --resume), if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{ray_run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_run(
    client: MlflowClient,
    experiment_id: str,
    *,
    ray_run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    all_tags = {RUN_NAME_TAG: ray_run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id, tags=all_tags, run_name=ray_run_name).info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(key, _param_value(value)) for key, value in params.items()]
    for start in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    items = [RunTag(key, str(value)) for key, value in tags.items()]
    for start in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, tags=items[start : start + MAX_BATCH])


def set_description(client: MlflowClient, run_id: str, markdown: str) -> None:
    """The Description on the run page (markdown): MLflow keeps it as a tag."""
    if len(markdown) > MAX_TAG_CHARS:
        markdown = markdown[: MAX_TAG_CHARS - 4] + "\n..."
    client.set_tag(run_id, DESCRIPTION_TAG, markdown)


def description(client: MlflowClient, run_id: str) -> str:
    """The run's current Description ("" when it has none)."""
    return client.get_run(run_id).data.tags.get(DESCRIPTION_TAG, "")


def training_description(cfg, *, run_name: str, num_params: int, train_samples: int) -> str:
    """What a training run trains, on what and how long: the run page's Description while it
    runs (`finished_description` adds the outcome)."""
    workers = str(cfg.ray.num_workers)
    if cfg.ray.min_workers is not None:
        workers = f"{cfg.ray.min_workers}-{cfg.ray.num_workers} (elastic)"
    splits = ", ".join(f"`{split}`" for split in cfg.data.train_splits)
    lines = [
        f"**SegNeXt-{cfg.model.variant}, {cfg.model.classifier} classifier**: "
        f"{cfg.model.num_classes} classes, {num_params / 1e6:.2f} M parameters.",
        "",
        f"- Data: `{cfg.data.root}`; trained on {splits} ({train_samples} images), "
        f"validated on `{cfg.data.val_split}`",
        f"- Schedule: {cfg.schedule.iterations} iterations, global batch "
        f"{cfg.train.global_batch_size}, lr {cfg.optim.lr:g}, validation every "
        f"{cfg.train.val_every} iterations",
        f"- Ray Train: {workers} {'GPU' if cfg.ray.use_gpu else 'CPU'} worker(s); run "
        f"`{run_name}` in `{cfg.run.storage_path}`",
    ]
    if cfg.model.init_from:
        lines.append(f"- Starts from `{cfg.model.init_from}` ({cfg.model.init_part})")
    return "\n".join(lines)


def finished_description(
    opening: str,
    *,
    iteration: int,
    best_val_miou: float | None,
    best_checkpoint: str | None,
    model_uri: str | None,
    data_root: str,
    val_split: str,
    tracking_uri: str,
) -> str:
    """`opening` (the running Description) plus the outcome and the commands that use it."""
    lines = [_opening(opening), "", f"### Result (iteration {iteration})", ""]
    if best_val_miou is None:
        lines.append("- No validation score was reported: no best checkpoint to use.")
        return "\n".join(lines)
    lines.append(f"- Best val mIoU: **{best_val_miou:.4f}** (`{val_split}`), checkpoint "
                 f"`{best_checkpoint}`")
    if model_uri:
        lines.append(f"- Registered model: `{model_uri}`")
    lines += next_commands(model_uri or best_checkpoint, data_root=data_root, val_split=val_split,
                           tracking_uri=tracking_uri)
    return "\n".join(lines)


def next_commands(model: str, *, data_root: str, val_split: str, tracking_uri: str) -> list[str]:
    """Markdown list items: evaluate, predict with and export `model` (a registered model URI
    names its store unless that is the default one)."""
    uri_flag = ""
    if model.startswith("models:/") and tracking_uri != resolve_tracking_uri(None):
        uri_flag = f" --tracking-uri {tracking_uri}"
    return [
        f"- Evaluate: `segnext eval --model {model} --data {data_root} --split {val_split}{uri_flag}`",
        f"- Predict: `segnext predict --model {model} --input IMAGES --out OUT_DIR{uri_flag}`",
        f"- Export: `segnext export --model {model} --out model.onnx{uri_flag}`",
    ]


def failed_description(opening: str, message: str) -> str:
    """`opening` plus why the run stopped (a problem the workers found, not retried)."""
    return f"{_opening(opening)}\n\n### Failed\n\n{message}"


def _opening(text: str) -> str:
    return text.split(OUTCOME_HEADING)[0].rstrip()


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class RunLogger:
    """Rank 0's handle on the run created by the driver; every method is a no-op elsewhere."""

    def __init__(self, tracking_uri: str, run_id: str, *, enabled: bool) -> None:
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri) if enabled else None

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in values.items()
            if value is not None and np.isfinite(value)
        ]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def tags(self, values: dict[str, str]) -> None:
        if self.client is not None:
            set_tags(self.client, self.run_id, values)

    def figure(self, figure: plt.Figure, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_figure(self.run_id, figure, artifact_file)
        plt.close(figure)

    def dict(self, values: dict[str, Any], artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_dict(self.run_id, values, artifact_file)


# ---------------------------------------------------------------------------------- pictures


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str]) -> plt.Figure:
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    k = len(class_names)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if normalised[i, j] >= 0.01:
                    color = "white" if normalised[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center",
                            fontsize=6, color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title("confusion matrix (row-normalised)")
    fig.tight_layout()
    return fig


def per_class_iou_figure(ious: Sequence[float], class_names: Sequence[str]) -> plt.Figure:
    values = np.nan_to_num(np.asarray(ious, dtype=np.float64), nan=0.0)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(values) + 2), 3.5))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), class_names, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    mean = float(np.nanmean(np.asarray(ious, dtype=np.float64))) if len(values) else 0.0
    ax.axhline(mean, color="tab:red", linestyle="--", label=f"mIoU {mean:.3f}")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("per-class IoU")
    fig.tight_layout()
    return fig


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; ignored pixels black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    lut[ignore_index] = 0
    return lut[np.clip(mask, 0, 255).astype(np.uint8)]


def prediction_grid_figure(
    images: np.ndarray,
    masks: np.ndarray,
    preds: np.ndarray,
    palette: Sequence[Sequence[int]],
    ignore_index: int,
    alpha: float = 0.55,
) -> plt.Figure:
    """One row per sample: image, ground truth overlaid, prediction overlaid.

    images: (N, H, W, 3) uint8; masks, preds: (N, H, W) int.
    """
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for row in range(n):
        image = images[row].astype(np.float32)
        valid = (masks[row] != ignore_index)[..., None]
        truth = colorize(masks[row], palette, ignore_index).astype(np.float32)
        pred = colorize(preds[row], palette, ignore_index).astype(np.float32)
        panels = (
            images[row],
            np.where(valid, (1 - alpha) * image + alpha * truth, image).astype(np.uint8),
            ((1 - alpha) * image + alpha * pred).astype(np.uint8),
        )
        for col, (panel, title) in enumerate(zip(panels, ("image", "truth", "prediction"), strict=True)):
            axes[row, col].imshow(panel)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title)
    fig.tight_layout()
    return fig


def curves_figure(histories: dict[str, list[tuple[int, float]]]) -> plt.Figure:
    """One panel per metric, value against iteration."""
    keys = [key for key, points in histories.items() if points]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.2),
                             squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        steps, values = zip(*sorted(histories[key]), strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("iteration")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def metric_histories(client: MlflowClient, run_id: str, keys: Sequence[str]) -> dict:
    """{key: [(step, value), ...]}, last value per step (a resumed run may repeat steps)."""
    histories = {}
    for key in keys:
        by_step = {}
        for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            by_step[metric.step] = metric.value
        histories[key] = sorted(by_step.items())
    return histories
