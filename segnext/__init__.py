"""SegNeXt in pure PyTorch: the model, its official-weight converter, losses, metrics, inference.

Losses, metrics and inference are imported on first use, so `import segnext` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from segnext.classifier import build_classifier
from segnext.convert import LoadReport, load_official_weights, to_official_state_dict
from segnext.model import VARIANTS, SegNeXt, create_model

_LAZY = {
    "build_criterion": "segnext.losses",
    "ConfusionMatrix": "segnext.metrics",
    "predict_logits": "segnext.inference",
}

__all__ = [
    "VARIANTS",
    "LoadReport",
    "SegNeXt",
    "build_classifier",
    "create_model",
    "load_official_weights",
    "to_official_state_dict",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segnext' has no attribute {name!r}")
