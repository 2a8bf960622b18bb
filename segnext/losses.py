"""Training losses for the two classifiers.

Classifier outputs come at stride 8. With `resolution="mask"` (the default, like the official
SegNeXt) each loss resizes them bilinearly (align_corners=False) to the mask size first, once
per tensor; with `resolution="logits"` the masks are instead sampled (nearest, pixel centres)
down to the logits' size, and the loss runs on 64x fewer pixels (cheaper; thin objects lose
supervision: a 3-pixel pole is sampled in about 3 of every 8 columns).

`average` picks the normaliser of every per-pixel sum: "valid" divides by the number of
non-ignored pixels (the sane default), "all" by all pixels, ignored ones included (the
official mmsegmentation quirk). Zero valid pixels give a loss of exactly 0 with zero gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

AVERAGES = ("valid", "all")
RESOLUTIONS = ("mask", "logits")
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


def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (B,H,W) sampled at the pixel centres of a `size` grid (nearest, no blending).

    "nearest-exact" maps output pixel i to input floor((i + 0.5) * H / h), the input pixel under
    the output pixel's centre: the same geometry as the bilinear align_corners=False resizing
    of the logits, so a stride-8 logit is scored against the label under its own centre.
    """
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    sampled = F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")
    return sampled[:, 0].to(masks.dtype)


class _PixelLoss(nn.Module):
    """Shared ignore/average/resolution handling and the training progress.

    `set_progress(iteration)` tells the loss how many optimizer steps are done, for losses
    whose weights depend on it (the integrated loss's warm-up); a no-op for the others, so the
    training loop may call it for every head.
    """

    def __init__(
        self, ignore_index: int = 255, average: str = "valid", resolution: str = "mask"
    ) -> None:
        super().__init__()
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        self.ignore_index = ignore_index
        self.average = average
        self.resolution = resolution
        self.iteration = 0

    def set_progress(self, iteration: int) -> None:
        """Optimizer steps completed before the coming forward (0 for the first step)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        self.iteration = int(iteration)

    def loss_size(self, logits: torch.Tensor, masks: torch.Tensor) -> tuple[int, int]:
        """Where the loss is computed: the mask's size or the logits' own."""
        return tuple(masks.shape[-2:] if self.resolution == "mask" else logits.shape[-2:])

    def pixel_weights(self, valid: torch.Tensor) -> torch.Tensor:
        """1/N on valid pixels and 0 on ignored ones; N per `average` (at least 1)."""
        count = valid.sum().clamp_min(1) if self.average == "valid" else valid.numel()
        return valid.float() / count


class CrossEntropyCriterion(_PixelLoss):
    """Official SegNeXt loss: softmax cross-entropy on resized logits, ignore index excluded.

    `class_weights` (None: official, unweighted) multiply each pixel's term by its true class's
    weight; the normaliser stays the pixel count, as for the integrated loss.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        average: str = "valid",
        resolution: str = "mask",
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(ignore_index, average, resolution)
        self.register_buffer("class_weights", _weights_tensor(class_weights), persistent=False)

    def forward(self, outputs: Mapping[str, torch.Tensor], masks: torch.Tensor) -> LossOutput:
        size = self.loss_size(outputs["logits"], masks)
        logits = resize_to(outputs["logits"], size)
        masks = downsample_masks(check_masks(masks, logits.shape[1], self.ignore_index), size)
        valid = masks != self.ignore_index
        ce = F.cross_entropy(logits, masks, ignore_index=self.ignore_index, reduction="none")
        if self.class_weights is not None:
            ce = ce * _true_class_weight(self.class_weights, masks.masked_fill(~valid, 0), logits)
        loss = (ce * self.pixel_weights(valid)).sum()
        return loss, {"ce": loss.detach()}


def _weights_tensor(class_weights: Sequence[float] | None) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if not all(w > 0 for w in class_weights):
        raise ValueError(f"class_weights must all be > 0, got {list(class_weights)}")
    return torch.tensor([float(w) for w in class_weights])


def _true_class_weight(
    class_weights: torch.Tensor, target: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    """Per-pixel weight (B,H,W) of the true class `target` (ignored pixels mapped to any class)."""
    if class_weights.numel() != logits.shape[1]:
        raise ValueError(
            f"class_weights has {class_weights.numel()} entries for {logits.shape[1]} classes; "
            "give one weight per class"
        )
    return class_weights.to(logits.device)[target]


class IntegratedCriterion(_PixelLoss):
    """w_gen * L_gen + w_ref * L_ref + w_var * L_var (shared/spec/integrated-classifier.md).

    L_gen: binary cross-entropy of the general logits against the one-hot label, summed over
        the K classes and averaged over pixels, so that per pixel it weighs like a
        cross-entropy (a mean over classes would give the general classifier, which decides
        the candidates, 1/K of the refinement's pull on the shared features).
    L_ref: cross-entropy of the refinement softmax restricted to the general top-k candidates
        *plus the true class* (teacher forcing: where the general classifier missed the true
        class, the refiner still learns to pick it among the confusing candidates; always finite).
    `class_weights` (see `class_balance_weights`) weigh the positive term of L_gen per class,
        as a weighted cross-entropy weighs the true class's term: one-vs-rest BCE on a class
        that covers 1% of the pixels is otherwise ruled by its negatives, its sigmoid stays low
        and the class drops out of the candidates the refinement decides among. L_ref stays
        unweighted (weighting it too, so that the product favours rare classes twice, is not
        measured).
    L_var: minus the population variance of the top `variance_top_k` integrated probabilities.
    Default weights 1.0 / 1.0 / 0.1: the two classifiers equal, the regulariser (whose range is
    at most 0.25) a gentle push. `top_k` must equal the IntegratedClassifier's.

    `warmup_iters` > 0 ramps w_ref and w_var linearly from 0 (iteration 0) to their values
    (iteration `warmup_iters`; see `set_progress`): the refinement decides among the general
    classifier's candidates, which are noise until the general classifier has learnt a little.

    Everything after the top-k runs on the k candidates only (B,k,H,W), not on all K classes:
    the integrated probability of a class outside the candidates is exactly 0, so the softmaxes,
    the refinement's cross-entropy and the variance lose nothing (equal to the K-class form
    with non-candidates masked to MASKED_LOGIT, up to float rounding) and cost about 2.5x less.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        average: str = "valid",
        weights: Mapping[str, float] | None = None,
        top_k: int | None = 3,
        variance_top_k: int = 3,
        resolution: str = "mask",
        warmup_iters: int = 0,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(ignore_index, average, resolution)
        if variance_top_k < 2:
            raise ValueError(f"variance_top_k must be >= 2 (a variance), got {variance_top_k}")
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0 (0: no warm-up), got {warmup_iters}")
        self.weights = _resolve_weights(weights)
        self.top_k = top_k
        self.variance_top_k = variance_top_k
        self.warmup_iters = warmup_iters
        self.register_buffer("class_weights", _weights_tensor(class_weights), persistent=False)

    def ramp(self) -> float:
        """The warm-up factor of w_ref and w_var at the current iteration, in [0, 1]."""
        if self.warmup_iters == 0:
            return 1.0
        return min(1.0, self.iteration / self.warmup_iters)

    def forward(self, outputs: Mapping[str, torch.Tensor], masks: torch.Tensor) -> LossOutput:
        size = self.loss_size(outputs["general_logits"], masks)
        general_logits = resize_to(outputs["general_logits"], size)
        refine_logits = resize_to(outputs["refine_logits"], size)
        num_classes = general_logits.shape[1]
        masks = downsample_masks(check_masks(masks, num_classes, self.ignore_index), size)
        valid = masks != self.ignore_index
        weight = self.pixel_weights(valid)
        target = masks.masked_fill(~valid, 0).unsqueeze(1)

        # BCE-with-logits summed over classes: sum_c softplus(g_c) - g_target (no one-hot);
        # a positive weight w_t adds (w_t - 1) * softplus(-g_target).
        general_target = general_logits.gather(1, target).squeeze(1)
        bce = F.softplus(general_logits).sum(1) - general_target
        if self.class_weights is not None:
            true_weight = _true_class_weight(self.class_weights, target.squeeze(1), general_logits)
            bce = bce + (true_weight - 1) * F.softplus(-general_target)
        general = (bce * weight).sum()

        # The candidates' logits (B,k,H,W); the integration at this resolution, as
        # IntegratedClassifier.resize_logits does in eval.
        refine_target = refine_logits.gather(1, target).squeeze(1)
        if self.top_k and self.top_k < num_classes:
            general_logits, index = general_logits.topk(self.top_k, dim=1)
            refine_logits = refine_logits.gather(1, index)
            target_is_candidate = (index == target).any(1)
        else:
            target_is_candidate = None
        log_probs = F.log_softmax(
            F.logsigmoid(general_logits) + F.log_softmax(refine_logits, dim=1), dim=1
        )

        # Refinement CE over the candidates plus the true class (added where it is missing).
        normaliser = torch.logsumexp(refine_logits, 1)
        if target_is_candidate is not None:
            normaliser = torch.where(
                target_is_candidate, normaliser, torch.logaddexp(normaliser, refine_target)
            )
        refine = ((normaliser - refine_target) * weight).sum()

        # Variance of the top-v integrated probabilities; classes beyond the k candidates are 0.
        probs = log_probs.exp()
        v = min(self.variance_top_k, num_classes)
        if v < probs.shape[1]:
            probs = probs.topk(v, dim=1).values
        elif v > probs.shape[1]:
            zeros = probs.new_zeros(probs.shape[0], v - probs.shape[1], *probs.shape[2:])
            probs = torch.cat([probs, zeros], 1)
        # Population variance by hand: Tensor.var over dim 1 is ~40x slower on the CPU here.
        spread = (probs - probs.mean(1, keepdim=True)).square().mean(1)
        variance = -(spread * weight).sum()

        w, ramp = self.weights, self.ramp()
        loss = (
            w["general"] * general
            + ramp * w["refine"] * refine
            + ramp * w["variance"] * variance
        )
        parts = {"general": general, "refine": refine, "variance": variance}
        return loss, {name: value.detach() for name, value in parts.items()}


def class_balance_weights(frequencies: Sequence[float], power: float) -> list[float]:
    """Class weights ((1 - f_c) / f_c) ** power, for either loss's `class_weights`.

    `frequencies` are the classes' pixel shares in the training data. On the general
    classifier's BCE, a positive weight w multiplies the odds the sigmoid converges to by w,
    so at power 1 it cancels each class's prior odds (a rare class scores as high as a common
    one on equal evidence); at 0 the loss is unweighted. Shares are clamped
    to [1e-4, 1 - 1e-4]: a class absent from the training data gets a large, finite weight.
    """
    if power < 0:
        raise ValueError(f"class balance power must be >= 0, got {power}")
    if not frequencies or not all(0 <= f <= 1 for f in frequencies):
        raise ValueError(
            f"class frequencies must be pixel shares in [0, 1], got {list(frequencies)}"
        )
    clamped = [min(max(float(f), 1e-4), 1 - 1e-4) for f in frequencies]
    return [((1 - f) / f) ** power for f in clamped]


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
    resolution: str = "mask",
    warmup_iters: int = 0,
    class_weights: Sequence[float] | None = None,
) -> nn.Module:
    """Loss for `classifier` ("standard" or "integrated"): `(outputs, masks) -> (loss, parts)`.

    `resolution` and `class_weights` (the true class's term weighted per class, see
    `class_balance_weights`) apply to both. `weights`, `top_k`, `variance_top_k` and
    `warmup_iters` belong to the integrated loss; the standard loss validates `weights` and
    otherwise ignores them, so one config drives both heads. Both have `set_progress(iteration)`,
    to be called before each step's forward.
    """
    if classifier == "standard":
        _resolve_weights(weights)
        return CrossEntropyCriterion(ignore_index, average, resolution, class_weights)
    if classifier == "integrated":
        return IntegratedCriterion(
            ignore_index, average, weights, top_k, variance_top_k, resolution, warmup_iters,
            class_weights,
        )
    raise ValueError(f"unknown classifier {classifier!r}; choose 'standard' or 'integrated'")
