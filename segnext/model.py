"""SegNeXt = MSCAN encoder + LightHamHead decoder (which owns the classifier); the variants."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segnext.ham import LightHamHead
from segnext.mscan import MSCAN


@dataclass(frozen=True)
class Variant:
    """One row of the official variant table."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    mlp_ratios: tuple[int, int, int, int]
    drop_path_rate: float
    head_channels: int
    nmf_rank: int


VARIANTS: dict[str, Variant] = {
    "tiny": Variant((32, 64, 160, 256), (3, 3, 5, 2), (8, 8, 4, 4), 0.1, 256, 16),
    "small": Variant((64, 128, 320, 512), (2, 2, 4, 2), (8, 8, 4, 4), 0.1, 256, 16),
    "base": Variant((64, 128, 320, 512), (3, 3, 12, 3), (8, 8, 4, 4), 0.1, 512, 64),
    "large": Variant((64, 128, 320, 512), (3, 5, 27, 3), (8, 8, 4, 4), 0.3, 1024, 64),
}
ALIASES = {name[0]: name for name in VARIANTS}
NMF_OPTIONS = (
    "rank",
    "train_steps",
    "eval_steps",
    "random_eval_bases",
    "grad_last_step_only",
    "seed",
)
MODEL_OPTIONS = ("drop_path_rate", "dropout", "encoder_dropout", "classifier_kwargs")


def resolve_variant(variant: str) -> str:
    """Canonical variant name for `variant` (tiny/small/base/large or t/s/b/l, any case)."""
    name = ALIASES.get(variant.lower(), variant.lower())
    if name not in VARIANTS:
        choices = sorted(VARIANTS) + sorted(ALIASES)
        raise ValueError(f"unknown SegNeXt variant {variant!r}; choose one of {choices}")
    return name


class SegNeXt(nn.Module):
    """The segmentation model.

    train mode: the classifier's dict at stride 8 (losses resize to the mask themselves);
    eval mode: `logits` resized bilinearly to the input size, (B, K, H, W).
    """

    def __init__(
        self,
        variant: str,
        num_classes: int,
        classifier: str = "standard",
        *,
        drop_path_rate: float | None = None,
        dropout: float = 0.1,
        encoder_dropout: float = 0.0,
        classifier_kwargs: Mapping[str, Any] | None = None,
        nmf_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.variant = resolve_variant(variant)
        self.num_classes = num_classes
        self.classifier_kind = classifier
        cfg = VARIANTS[self.variant]
        self.backbone = MSCAN(
            cfg.embed_dims,
            cfg.depths,
            cfg.mlp_ratios,
            drop_path_rate=cfg.drop_path_rate if drop_path_rate is None else drop_path_rate,
            dropout=encoder_dropout,
        )
        self.decode_head = LightHamHead(
            cfg.embed_dims[1:],
            cfg.head_channels,
            num_classes,
            classifier=classifier,
            dropout=dropout,
            classifier_kwargs=classifier_kwargs,
            **{"rank": cfg.nmf_rank, **dict(nmf_kwargs or {})},
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        outputs = self.decode_head(self.backbone(images)[1:])
        if self.training:
            return outputs
        # The classifier resizes the way its loss sees the logits in training (for the
        # integrated head: resize g and r, then integrate).
        return self.decode_head.classifier.resize_logits(outputs, tuple(images.shape[-2:]))


def create_model(
    variant: str, num_classes: int, classifier: str = "standard", **overrides: Any
) -> SegNeXt:
    """Build a SegNeXt variant from scratch (official init).

    overrides: drop_path_rate, dropout (classifier Dropout2d, default 0.1), encoder_dropout
    (MLP dropout, default 0), classifier_kwargs (dict for the classifier), and NMF options
    prefixed `nmf_`: nmf_rank, nmf_train_steps, nmf_eval_steps, nmf_random_eval_bases,
    nmf_grad_last_step_only, nmf_seed.
    """
    nmf_kwargs = {k.removeprefix("nmf_"): v for k, v in overrides.items() if k.startswith("nmf_")}
    model_kwargs = {k: v for k, v in overrides.items() if not k.startswith("nmf_")}
    unknown = sorted(set(model_kwargs) - set(MODEL_OPTIONS)) + sorted(
        f"nmf_{k}" for k in set(nmf_kwargs) - set(NMF_OPTIONS)
    )
    if unknown:
        allowed = list(MODEL_OPTIONS) + [f"nmf_{k}" for k in NMF_OPTIONS]
        raise ValueError(f"unknown model override(s) {unknown}; allowed: {allowed}")
    return SegNeXt(variant, num_classes, classifier, nmf_kwargs=nmf_kwargs, **model_kwargs)
