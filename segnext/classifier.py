"""Pixel classifiers that sit on the decoder's features (stride 8).

`StandardClassifier` is the official SegNeXt `conv_seg` (Dropout2d + 1x1 conv, one softmax).
Every classifier returns a dict of tensors at the feature resolution; `"logits"` is always
present and its argmax over dim 1 is the prediction.
"""

from __future__ import annotations

import torch
from torch import nn


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


CLASSIFIERS: dict[str, type[nn.Module]] = {"standard": StandardClassifier}


def build_classifier(
    kind: str, in_channels: int, num_classes: int, dropout: float = 0.1, **kwargs
) -> nn.Module:
    """Build the classifier named `kind` ("standard" or "integrated")."""
    if kind not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {kind!r}; choose one of {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[kind](in_channels, num_classes, dropout=dropout, **kwargs)
