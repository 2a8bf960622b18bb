"""The MLflow pyfunc layer: what `mlflow models serve` runs (registered models import
`pipelines.serving.SegNeXtPyfunc` by that name, so it stays importable from here).

`SegNeXtPyfunc` is imported on first use (PEP 562), so that the payload codec
(`pipelines.serving.payload`, for HTTP clients too) imports neither MLflow nor torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SegNeXtPyfunc"]


def __getattr__(name: str) -> Any:
    if name == "SegNeXtPyfunc":
        from pipelines.serving.pyfunc import SegNeXtPyfunc

        return SegNeXtPyfunc
    raise AttributeError(f"module 'pipelines.serving' has no attribute {name!r}")
