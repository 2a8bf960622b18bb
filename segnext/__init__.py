"""SegNeXt in pure PyTorch: the model, its official-weight converter, losses, metrics, inference.

Every public name is imported on first use (`segnext.create_model`, `from segnext import
SegNeXt`, ... work as always), so `import segnext` itself loads no torch: `segnext.windows`, the
sliding-window grid in plain Python, is shared with the torch-free ONNX runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "VARIANTS": "segnext.model",
    "SegNeXt": "segnext.model",
    "create_model": "segnext.model",
    "build_classifier": "segnext.classifier",
    "LoadReport": "segnext.convert",
    "load_official_weights": "segnext.convert",
    "to_official_state_dict": "segnext.convert",
    "build_criterion": "segnext.losses",
    "ConfusionMatrix": "segnext.metrics",
    "predict_logits": "segnext.inference",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segnext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
