"""Training-time validation: every worker scores its share of the val split with the code
`segnext eval` runs (`pipelines.inference.scoring`), the confusion matrices are summed over workers,
and rank 0 logs the figures."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import segnext
from data.manifest import load_manifest
from data.samples import SampleReadError
from pipelines.config import ExperimentConfig, to_flat_dict
from pipelines.inference.scoring import score_split
from pipelines.inference.segmenter import Segmenter, settings_from_checkpoint
from pipelines.meta import ModelMeta
from pipelines.metric_names import SCORE, class_iou_metric
from pipelines.tracking import runs as tracking

PREVIEW_SAMPLES = 4  # validation images drawn in the prediction grid
TOP_CONFUSED = 5


class Validator:
    """Scores this worker's share of the val split at original size with the code `segnext
    eval` runs (`pipelines.inference.scoring`), then sums the confusion matrices over all workers."""

    def __init__(self, cfg: ExperimentConfig, meta: ModelMeta, core: nn.Module, *,
                 device: torch.device, rank: int, world: int) -> None:

        self.cfg, self.rank, self.world, self.core = cfg, rank, world, core
        self.manifest = load_manifest(cfg.data.root)
        # The settings `segnext eval` derives from this run's checkpoints: same meta, same config.
        settings = settings_from_checkpoint({"meta": meta, "config": to_flat_dict(cfg)})
        self.segmenter = Segmenter(
            core, settings, class_names=meta.class_names, palette=meta.palette,
            ignore_index=meta.ignore_index, device=device,
        )
        core.train()  # Segmenter puts its model in eval mode; training goes on
        self.device = device
        self.preview: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def run(self) -> tuple[np.ndarray, int]:
        """(summed (K, K) confusion matrix, samples skipped on all workers)."""

        k = self.segmenter.num_classes
        problem = ""
        matrix, skipped = np.zeros((k, k), dtype=np.int64), 0
        self._use_rank0_buffers()
        self.core.eval()
        try:
            scored, tally = score_split(
                self.segmenter, self.manifest, self.cfg.data.val_split, rank=self.rank,
                world=self.world, on_error=self.cfg.data.on_error,
                preview=PREVIEW_SAMPLES if self.rank == 0 else 0,
            )
            matrix, skipped, self.preview = scored.matrix, tally.count, scored.preview
        except (SampleReadError, ValueError, OSError) as error:  # bad data or settings
            problem = str(error)
        finally:
            self.core.train()
        # One collective whatever happened, so a rank that failed never leaves others waiting.
        totals = torch.from_numpy(np.append(matrix.ravel(), [skipped, bool(problem)]))
        totals = totals.to(self.device)
        if self.world > 1:
            dist.all_reduce(totals)
        totals = totals.cpu().numpy()
        if totals[-1]:
            raise ValidationFailed(self._first_problem(problem))
        return totals[:-2].reshape(k, k), int(totals[-2])

    def _use_rank0_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) before scoring.

        Parameters are equal on all ranks after a DDP step, but each rank's last forward
        updated its own running statistics (DDP re-broadcasts rank 0's only at the next
        forward), so without this each rank would score its share with a slightly different
        model than the checkpoint that rank 0 saves, and `segnext eval` of that checkpoint
        would not reproduce the validation score."""
        if self.world > 1:
            for buffer in self.core.buffers():
                dist.broadcast(buffer.data, src=0)

    def _first_problem(self, problem: str) -> str:
        """The first rank's message (every rank takes part in the gather)."""
        messages = [problem]
        if self.world > 1:
            messages = [None] * self.world
            dist.all_gather_object(messages, problem)
        return next(message for message in messages if message)


class ValidationFailed(Exception):
    """Validation cannot run (unreadable val data, impossible settings): a configuration
    problem that a restart would only repeat, so the run ends at once (see train_loop_per_worker)."""


def summarize(matrix: np.ndarray, skipped: int, meta: ModelMeta) -> tuple[dict, dict]:
    """(scalar metrics, full summary) of a summed confusion matrix."""
    result = segnext.ConfusionMatrix(meta.num_classes, meta.ignore_index)
    result.matrix = torch.from_numpy(matrix)
    summary = result.compute(class_names=meta.class_names, top_confused=TOP_CONFUSED)
    metrics = {
        SCORE: float(summary["mIoU"]),
        "val/aAcc": float(summary["aAcc"]),
        "val/mAcc": float(summary["mAcc"]),
        "val/skipped_samples": float(skipped),
    }
    return metrics, summary


def log_validation(logger: tracking.RunLogger, step: int, metrics: dict, summary: dict,
                   matrix: np.ndarray, preview: list, meta: ModelMeta) -> None:
    """Per-class IoU metrics, metrics.json, confusion matrix, per-class IoU bars, predictions."""
    names = meta.class_names
    per_class = {
        class_iou_metric(name): float(iou)
        for name, iou in zip(names, summary["per_class_iou"], strict=True)
    }
    logger.metrics({**metrics, **per_class}, step=step)
    folder = f"validation/step_{step:07d}"
    logger.dict(
        {
            "iteration": step,
            **{key: summary[key] for key in ("mIoU", "aAcc", "mAcc")},
            "per_class_iou": dict(zip(names, summary["per_class_iou"], strict=True)),
            "confused_pairs": summary["confused_pairs"],
        },
        f"{folder}/metrics.json",
    )
    logger.figure(tracking.confusion_matrix_figure(matrix, names),
                       f"{folder}/confusion_matrix.png")
    logger.figure(tracking.per_class_iou_figure(summary["per_class_iou"], names),
                       f"{folder}/per_class_iou.png")
    if preview:
        images, masks, preds = zip(*preview, strict=True)
        logger.figure(
            tracking.prediction_grid_figure(
                images, masks, preds, meta.palette, meta.ignore_index
            ),
            f"{folder}/predictions.png",
        )

