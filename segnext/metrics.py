"""Confusion-matrix accumulator: aAcc, mIoU, mAcc, per-class IoU/accuracy, confused pairs.

The matrix (rows = true class, columns = predicted class) is the only state, so results from
several workers combine by summing it (`merge`, or `all_reduce` on `.matrix`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class ConfusionMatrix:
    """Accumulates a (K, K) int64 confusion matrix on the device of the tensors it is fed."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count (target, pred) pairs of every pixel whose target is not the ignore index."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
            )
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        k = self.num_classes
        for name, labels in (("target", target), ("pred", pred)):
            bad = (labels < 0) | (labels >= k)
            if bad.any():
                raise ValueError(
                    f"{name} label {int(labels[bad][0])} is outside 0..{k - 1} and is not the "
                    f"ignore index {self.ignore_index}: map it to a class or to "
                    f"{self.ignore_index}, or set num_classes to cover it"
                )
        if self.matrix.device != target.device:
            self.matrix = self.matrix.to(target.device)
        counts = torch.bincount(target * k + pred, minlength=k * k)
        self.matrix += counts.reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add `other`'s counts into this matrix (e.g. another worker's); returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) "
                f"into a {self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def compute(
        self, class_names: Sequence[str] | None = None, top_confused: int = 5
    ) -> dict[str, Any]:
        """Scores as plain Python numbers.

        IoU is nan for a class absent from both target and prediction, accuracy nan for a class
        absent from the target; mIoU and mAcc are means over the non-nan classes. Confused pairs
        are the largest off-diagonal counts; `fraction` = pixels / pixels of the true class.
        """
        k = self.num_classes
        if class_names is None:
            class_names = [str(i) for i in range(k)]
        if len(class_names) != k:
            raise ValueError(f"got {len(class_names)} class names for {k} classes")
        m = self.matrix.detach().cpu().double()
        tp = m.diag()
        true_total = m.sum(1)
        union = true_total + m.sum(0) - tp
        iou = tp / union  # 0/0 -> nan for absent classes
        acc = tp / true_total
        total = m.sum()
        return {
            "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mIoU": float(iou.nanmean()),
            "mAcc": float(acc.nanmean()),
            "per_class_iou": iou.tolist(),
            "per_class_acc": acc.tolist(),
            "confused_pairs": self._confused_pairs(m, true_total, class_names, top_confused),
        }

    @staticmethod
    def _confused_pairs(
        m: torch.Tensor, true_total: torch.Tensor, names: Sequence[str], top: int
    ) -> list[dict[str, Any]]:
        off = m.clone()
        off.fill_diagonal_(0)
        k = m.shape[0]
        counts = off.view(-1).tolist()
        # sorted() is stable: ties keep (true, pred) id order.
        order = sorted(range(k * k), key=lambda i: -counts[i])
        pairs = []
        for flat in order[:top]:
            pixels = int(counts[flat])
            if pixels == 0:
                break
            t, p = divmod(flat, k)
            pairs.append(
                {
                    "true": names[t],
                    "pred": names[p],
                    "true_id": t,
                    "pred_id": p,
                    "pixels": pixels,
                    "fraction": pixels / float(true_total[t]),
                }
            )
        return pairs
