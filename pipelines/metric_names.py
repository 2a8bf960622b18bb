"""The metric names that the train loop, Ray Tune, the registry and eval must agree on.

One definition each, in a module that imports nothing heavy, so the CLI modules can import it at
start-up (`pipelines.tracking.runs` re-exports `metric_name` but pulls in MLflow and matplotlib).
"""

from __future__ import annotations

# The score: Ray Train keeps checkpoints by it, ASHA ranks trials by it, the registry's champion
# alias moves by it.
SCORE = "val/mIoU"


def metric_name(text: str) -> str:
    """A metric key MLflow accepts: letters, digits, _ - . / and spaces; anything else -> _."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in text)


def class_iou_metric(class_name: str, prefix: str = "val") -> str:
    """`val/IoU/<class>`: one class's IoU as the train loop and `segnext eval` log it."""
    return f"{prefix}/IoU/{metric_name(class_name)}"
