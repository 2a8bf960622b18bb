"""Pixel classifiers that sit on the decoder's features (stride 8).

`StandardClassifier` is the official SegNeXt `conv_seg` (Dropout2d + 1x1 conv, one softmax).
`IntegratedClassifier` is our extension (shared/spec/integrated-classifier.md): K binary
"general" classifiers, a multinomial "refinement" classifier that decides among the general
classifier's top-k candidates, and their normalised product.

Every classifier returns a dict of tensors at the feature resolution; `"logits"` is always
present and its argmax over dim 1 is the prediction. `resize_logits(outputs, size)` gives the
logits at another resolution (the input's, in eval mode) the way the loss sees them in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Logit given to classes outside the refinement's candidate set. Finite on purpose: -inf turns
# into NaN under bilinear resizing (0 * -inf) and in fp16; exp(-1e4) is exactly 0 in fp32.
MASKED_LOGIT = -1e4


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class StandardClassifier(nn.Module):
    """Official SegNeXt classifier: Dropout2d(0.1) then a 1x1 conv with bias, init N(0, 0.01)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.conv_seg(self.dropout(features))}

    def resize_logits(
        self, outputs: dict[str, torch.Tensor], size: tuple[int, int]
    ) -> torch.Tensor:
        """Official behaviour: bilinear (align_corners=False) resize of the logits."""
        return _resize(outputs["logits"], size)


def candidate_mask(general_logits: torch.Tensor, top_k: int | None) -> torch.Tensor | None:
    """Bool mask (B,K,...) of each pixel's top-k classes by general logit; None = all classes."""
    num_classes = general_logits.shape[1]
    if not top_k or top_k >= num_classes:
        return None
    index = general_logits.topk(top_k, dim=1).indices
    # a tensor source, not the scalar True: torch's ONNX exporter has no scatter_(bool scalar)
    chosen = torch.ones_like(index, dtype=torch.bool)
    return torch.zeros_like(general_logits, dtype=torch.bool).scatter_(1, index, chosen)


# How the integrated head turns its two classifiers into a prediction (`decision=`):
# "product" P(c) ∝ sigmoid(g_c) * softmax_{top-k}(r)_c (the spec), "general" sigmoid(g_c) alone,
# "refine" softmax_{top-k}(r)_c alone (the refinement among the general top-k candidates).
DECISIONS = ("product", "general", "refine")


def integrate(
    general_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    top_k: int | None,
    decision: str = "product",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log of P(c) ∝ sigmoid(g_c) * softmax_{top-k}(r)_c, normalised over c.

    `decision` drops one factor (see DECISIONS): "general" normalises sigmoid(g) over all K
    classes (no candidates), "refine" keeps softmax_{top-k}(r) only. Training is the same for
    every rule; only the prediction changes.

    Pointwise in space, so callers may resize `g` and `r` first and integrate at any resolution.
    Returns (log integrated probabilities (B,K,...), candidate indices (B,k,...) or None = all
    classes). Classes outside the candidate set get exactly MASKED_LOGIT (probability 0,
    finite). The softmaxes run on the k candidates only, not on all K classes (at full image
    size on the CPU this is about a third cheaper for K = 11, k = 3).
    """
    if decision == "general":
        return F.log_softmax(F.logsigmoid(general_logits), dim=1), None
    num_classes = general_logits.shape[1]
    if not top_k or top_k >= num_classes:
        log_probs = F.log_softmax(refine_logits, dim=1)
        if decision == "product":
            log_probs = F.log_softmax(F.logsigmoid(general_logits) + log_probs, dim=1)
        return log_probs, None
    top_general, index = general_logits.topk(top_k, dim=1)
    log_probs = F.log_softmax(refine_logits.gather(1, index), dim=1)
    if decision == "product":
        log_probs = F.log_softmax(F.logsigmoid(top_general) + log_probs, dim=1)
    full = torch.full_like(general_logits, MASKED_LOGIT, dtype=log_probs.dtype)
    return full.scatter(1, index, log_probs), index


def prior_bias(num_classes: int, prior: Sequence[float] | None = None) -> torch.Tensor:
    """Logits whose sigmoids are `prior` (default 1/K each), clamped to [1e-4, 1 - 1e-4]."""
    if prior is None:
        prior = [1.0 / num_classes] * num_classes
    if len(prior) != num_classes or not all(
        isinstance(p, int | float) and 0 < p < 1 for p in prior
    ):
        raise ValueError(
            f"prior must list {num_classes} class frequencies in (0, 1), got {prior!r}; "
            "pass the training split's pixel frequencies or leave it unset (1/K each)"
        )
    p = torch.tensor([min(max(float(v), 1e-4), 1 - 1e-4) for v in prior])
    return torch.log(p / (1 - p))


class IntegratedClassifier(nn.Module):
    """General (K sigmoids) + refinement (softmax over the top-k candidates) classifier.

    Outputs at feature resolution: "logits" = log integrated probabilities, "general_logits" = g,
    "refine_logits" = the refinement's raw logits r, *unmasked*: the top-k restriction is applied
    by `integrate`, which is pointwise and so can be re-applied after resizing (masked logits do
    not survive bilinear resizing: masked and unmasked neighbours blend into huge losses).

    Args:
        refine_channels: hidden width of the refinement block (1x1 conv, ReLU, 1x1 conv).
        top_k: candidates per pixel the refinement decides among (default 3, the spec's k for
            the variance term; None or 0 = all classes). The loss must use the same value.
        prior: class frequencies the general classifier starts from: its biases are initialised
            to log(p / (1 - p)) so that sigmoid(g_c) = p_c before training (None: 1/K for every
            class). A zero bias would start every sigmoid at 0.5, so the first steps of the BCE
            are spent pushing all K scores down instead of separating classes.
        decision: the prediction rule, one of DECISIONS (default "product", the spec's); it
            changes eval outputs only, so a trained model can be scored under each rule.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dropout: float = 0.1,
        refine_channels: int = 64,
        top_k: int | None = 3,
        prior: Sequence[float] | None = None,
        decision: str = "product",
    ) -> None:
        super().__init__()
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be None, 0 (all classes) or positive, got {top_k}")
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {list(DECISIONS)}, got {decision!r}")
        bias = prior_bias(num_classes, prior)
        self.top_k = top_k
        self.decision = decision
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.general = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        self.refine_hidden = nn.Conv2d(in_channels + num_classes, refine_channels, kernel_size=1)
        self.refine_out = nn.Conv2d(refine_channels, num_classes, kernel_size=1)
        for conv in (self.general, self.refine_out):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
        with torch.no_grad():
            self.general.bias.copy_(bias)
        nn.init.kaiming_normal_(self.refine_hidden.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.refine_hidden.bias)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.dropout(features)
        general_logits = self.general(features)
        hidden = F.relu(self.refine_hidden(torch.cat([features, general_logits.sigmoid()], 1)))
        refine_logits = self.refine_out(hidden)
        log_probs, _ = integrate(general_logits, refine_logits, self.top_k, self.decision)
        return {
            "logits": log_probs,
            "general_logits": general_logits,
            "refine_logits": refine_logits,
        }

    def resize_logits(
        self, outputs: dict[str, torch.Tensor], size: tuple[int, int]
    ) -> torch.Tensor:
        """Log integrated probabilities at `size`: resize g and r, then integrate.

        Resizing the integrated log-probs instead would blend masked (MASKED_LOGIT) and
        unmasked neighbours, snapping boundaries to the nearest feature pixel, and would not
        match what the loss trains.
        """
        general, refine = outputs["general_logits"], outputs["refine_logits"]
        resized = _resize(general, size), _resize(refine, size)
        return integrate(*resized, self.top_k, self.decision)[0]


CLASSIFIERS: dict[str, type[nn.Module]] = {
    "standard": StandardClassifier,
    "integrated": IntegratedClassifier,
}


def build_classifier(
    kind: str, in_channels: int, num_classes: int, dropout: float = 0.1, **kwargs
) -> nn.Module:
    """Build the classifier named `kind` ("standard" or "integrated")."""
    if kind not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {kind!r}; choose one of {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[kind](in_channels, num_classes, dropout=dropout, **kwargs)
