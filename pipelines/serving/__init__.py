"""The MLflow pyfunc layer: what `mlflow models serve` runs (registered models import
`pipelines.serving.SegNeXtPyfunc` by that name, so it stays importable from here)."""

from pipelines.inference.segmenter import SegNeXtPyfunc

__all__ = ["SegNeXtPyfunc"]
