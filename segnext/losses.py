"""Training losses for the two classifiers.

Classifier outputs come at stride 8; like the official SegNeXt, each loss resizes them
bilinearly (align_corners=False) to the mask size first, once per tensor.

`average` picks the normaliser of every per-pixel sum: "valid" divides by the number of
non-ignored pixels (the sane default), "all" by all pixels, ignored ones included (the
official mmsegmentation quirk). Zero valid pixels give a loss of exactly 0 with zero gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from segnext.classifier import MASKED_LOGIT, integrate

AVERAGES = ("valid", "all")
DEFAULT_WEIGHTS = {"general": 1.0, "refine": 1.0, "variance": 0.1}

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


def resize_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upcast to fp32 (losses are computed in fp32 even under autocast) and resize to `size`."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def check_masks(masks: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Validate masks (B,H,W) of class ids; labels outside 0..K-1 other than ignore raise."""
    if masks.dim() != 3 or masks.dtype.is_floating_point:
        raise ValueError(
            f"masks must be an integer tensor (B, H, W), got {tuple(masks.shape)} {masks.dtype}"
        )
    bad = (masks != ignore_index) & ((masks < 0) | (masks >= num_classes))
    if bad.any():
        value = int(masks[bad][0])
        raise ValueError(
            f"mask label {value} is outside 0..{num_classes - 1} and is not the ignore index "
            f"{ignore_index}: map it to a class or to {ignore_index} in the dataset, or set "
            f"num_classes to cover it"
        )
    return masks.long()


class _PixelLoss(nn.Module):
    """Shared ignore/average handling: per-pixel weights that sum to the chosen average."""

    def __init__(self, ignore_index: int = 255, average: str = "valid") -> None:
        super().__init__()
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        self.ignore_index = ignore_index
        self.average = average

    def pixel_weights(self, valid: torch.Tensor) -> torch.Tensor:
        """1/N on valid pixels and 0 on ignored ones; N per `average` (at least 1)."""
        count = valid.sum().clamp_min(1) if self.average == "valid" else valid.numel()
        return valid.float() / count


class CrossEntropyCriterion(_PixelLoss):
    """Official SegNeXt loss: softmax cross-entropy on resized logits, ignore index excluded."""

    def forward(self, outputs: Mapping[str, torch.Tensor], masks: torch.Tensor) -> LossOutput:
        logits = resize_to(outputs["logits"], masks.shape[-2:])
        masks = check_masks(masks, logits.shape[1], self.ignore_index)
        valid = masks != self.ignore_index
        ce = F.cross_entropy(logits, masks, ignore_index=self.ignore_index, reduction="none")
        loss = (ce * self.pixel_weights(valid)).sum()
        return loss, {"ce": loss.detach()}


class IntegratedCriterion(_PixelLoss):
    """w_gen * L_gen + w_ref * L_ref + w_var * L_var (shared/spec/integrated-classifier.md).

    L_gen: binary cross-entropy of the general logits against the one-hot label, summed over
        the K classes and averaged over pixels, so that per pixel it weighs like a
        cross-entropy (a mean over classes would give the general classifier, which decides
        the candidates, 1/K of the refinement's pull on the shared features).
    L_ref: cross-entropy of the refinement softmax restricted to the general top-k candidates
        *plus the true class* (teacher forcing: where the general classifier missed the true
        class, the refiner still learns to pick it among the confusing candidates; always finite).
    L_var: minus the population variance of the top `variance_top_k` integrated probabilities.
    Default weights 1.0 / 1.0 / 0.1: the two classifiers equal, the regulariser (whose range is
    at most 0.25) a gentle push. `top_k` must equal the IntegratedClassifier's.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        average: str = "valid",
        weights: Mapping[str, float] | None = None,
        top_k: int | None = 3,
        variance_top_k: int = 3,
    ) -> None:
        super().__init__(ignore_index, average)
        if variance_top_k < 2:
            raise ValueError(f"variance_top_k must be >= 2 (a variance), got {variance_top_k}")
        self.weights = _resolve_weights(weights)
        self.top_k = top_k
        self.variance_top_k = variance_top_k

    def forward(self, outputs: Mapping[str, torch.Tensor], masks: torch.Tensor) -> LossOutput:
        size = masks.shape[-2:]
        general_logits = resize_to(outputs["general_logits"], size)
        refine_logits = resize_to(outputs["refine_logits"], size)
        num_classes = general_logits.shape[1]
        masks = check_masks(masks, num_classes, self.ignore_index)
        valid = masks != self.ignore_index
        weight = self.pixel_weights(valid)
        target = masks.masked_fill(~valid, 0).unsqueeze(1)

        # BCE-with-logits summed over classes: sum_c softplus(g_c) - g_target (no one-hot).
        bce = F.softplus(general_logits).sum(1) - general_logits.gather(1, target).squeeze(1)
        general = (bce * weight).sum()

        # Integrate at mask resolution (as IntegratedClassifier.resize_logits does in eval).
        log_probs, candidates = integrate(general_logits, refine_logits, self.top_k)
        if candidates is not None:
            keep = candidates.scatter(1, target, True)
            refine_logits = refine_logits.masked_fill(~keep, MASKED_LOGIT)
        nll = torch.logsumexp(refine_logits, 1) - refine_logits.gather(1, target).squeeze(1)
        refine = (nll * weight).sum()

        k = min(self.variance_top_k, num_classes)
        top = log_probs.topk(k, dim=1).values.exp()
        variance = -(top.var(dim=1, correction=0) * weight).sum()

        w = self.weights
        loss = w["general"] * general + w["refine"] * refine + w["variance"] * variance
        parts = {"general": general, "refine": refine, "variance": variance}
        return loss, {name: value.detach() for name, value in parts.items()}


def _resolve_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """Defaults overridden by `weights`; unknown keys and negative weights raise."""
    weights = dict(weights or {})
    unknown = set(weights) - set(DEFAULT_WEIGHTS)
    if unknown:
        raise ValueError(
            f"unknown loss weight(s) {sorted(unknown)}; valid keys are {sorted(DEFAULT_WEIGHTS)}"
        )
    resolved = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in weights.items()}}
    negative = {k: v for k, v in resolved.items() if v < 0}
    if negative:
        raise ValueError(f"loss weights must be >= 0, got {negative}")
    return resolved


def build_criterion(
    classifier: str,
    *,
    ignore_index: int = 255,
    average: str = "valid",
    weights: Mapping[str, float] | None = None,
    top_k: int | None = 3,
    variance_top_k: int = 3,
) -> nn.Module:
    """Loss for `classifier` ("standard" or "integrated"): `(outputs, masks) -> (loss, parts)`.

    `weights`, `top_k` and `variance_top_k` belong to the integrated loss; the standard loss
    validates `weights` and otherwise ignores them, so one config drives both heads.
    """
    if classifier == "standard":
        _resolve_weights(weights)
        return CrossEntropyCriterion(ignore_index, average)
    if classifier == "integrated":
        return IntegratedCriterion(ignore_index, average, weights, top_k, variance_top_k)
    raise ValueError(f"unknown classifier {classifier!r}; choose 'standard' or 'integrated'")
