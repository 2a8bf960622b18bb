"""The registered model's MLflow pyfunc flavour: what `mlflow models serve` runs.

`SegNeXtPyfunc` is the `mlflow.pyfunc.PythonModel` that `pipelines.tracking.registry` logs (as
`pipelines.serving.SegNeXtPyfunc`): it loads its checkpoint artifact into a
`pipelines.inference.segmenter.Segmenter` (weights only) and answers requests in the forms of
`pipelines.serving.payload`. It is kept apart from the Segmenter so that training-time
validation, `segnext eval` and `segnext predict` run the same inference code without MLflow.

Under `mlflow models serve` (uvicorn; each request runs in a thread of a worker process) the
pyfunc bounds its work: a request holds at most `SEGNEXT_MAX_PIXELS` pixels (default 16 MP; the
model config's `max_pixels` otherwise; 0: no limit), refused before decoding with HTTP 400 and
a message; and a request past the server's timeout (`--timeout`, i.e.
MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, default 60 s), which MLflow answers with 504 without
stopping the thread, stops itself before its next forward pass (one sliding window). Not
bounded: one forward pass (one window, or a whole image up to the pixel limit) and the JSON
decoding before `predict`. Bad input of any kind answers 400 with the message. On SIGTERM the
running requests stop the same way (HTTP 503) and the process ends within seconds
(`pipelines.serving.shutdown`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
import torch
from mlflow.environment_variables import (
    _MLFLOW_IS_IN_SERVING_ENVIRONMENT,
    MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    DEADLINE_EXCEEDED,
    INVALID_PARAMETER_VALUE,
    TEMPORARILY_UNAVAILABLE,
)

from pipelines.inference.segmenter import load_checkpoint_segmenter
from pipelines.inference.threads import set_torch_threads
from pipelines.serving.payload import MAX_PIXELS_ENV, RequestTimeoutError, predict_any
from pipelines.serving.shutdown import SHUTDOWN, ServerStoppingError, in_scoring_server

CHECKPOINT_ARTIFACT = "checkpoint"  # key of the checkpoint file in the pyfunc's artifacts
DEFAULT_MAX_PIXELS = 16_000_000  # 16 MP: a 4000x4000 photo; far above any training crop


def max_pixels_setting(model_config: dict[str, Any] | None = None) -> int:
    """The pixel limit of one request: $SEGNEXT_MAX_PIXELS, else the model config's
    `max_pixels`, else DEFAULT_MAX_PIXELS; 0 means no limit."""
    for value, where in (
        (os.environ.get(MAX_PIXELS_ENV), MAX_PIXELS_ENV),
        ((model_config or {}).get("max_pixels"), "model config max_pixels"),
    ):
        if value is None or value == "":
            continue
        try:
            limit = int(value)
        except (TypeError, ValueError):
            limit = -1
        if limit < 0:
            raise ValueError(f"{where}={value!r}: expected a whole number of pixels (0: no limit)")
        return limit
    return DEFAULT_MAX_PIXELS


class _Deadline:
    """A per-thread deadline checked before every forward pass of the network (each sliding
    window is one), so a request past the scoring server's timeout stops computing within one
    window instead of keeping its worker busy; the server answers 504 at the timeout anyway."""

    def __init__(self) -> None:
        self._local = threading.local()  # the scoring server runs requests in threads

    @contextmanager
    def within(self, seconds: float | None) -> Iterator[None]:
        self._local.at = None if not seconds else time.monotonic() + seconds
        try:
            yield
        finally:
            self._local.at = None

    def check(self, module: torch.nn.Module, args: Any) -> None:
        at = getattr(self._local, "at", None)
        if at is not None and time.monotonic() > at:
            raise RequestTimeoutError(
                "the request ran past the scoring server's timeout "
                f"({MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name}); stopped. Send smaller images, "
                "or start the server with a longer --timeout"
            )


class SegNeXtPyfunc(mlflow.pyfunc.PythonModel):
    """The registered model: loads its checkpoint artifact (weights only), predicts masks."""

    # `predict` has no input type hint on purpose: MLflow would validate against it and reject
    # the array and list forms. This MLflow switch skips that wrapping and its warning.
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        set_torch_threads()  # the cores the server may use (cgroup-aware), not the machine's
        self.segmenter = load_checkpoint_segmenter(context.artifacts[CHECKPOINT_ARTIFACT])
        self.max_pixels = max_pixels_setting(getattr(context, "model_config", None))
        self.deadline = _Deadline()
        self.segmenter.model.register_forward_pre_hook(self.deadline.check)
        if in_scoring_server():  # not in a batch job that loads the model: its signals are its own
            SHUTDOWN.install()
            self.segmenter.model.register_forward_pre_hook(SHUTDOWN.check)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        # Under `mlflow models serve` only: a batch job calling the pyfunc has no timeout.
        serving = _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get()
        timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get() if serving else None
        try:
            with self.deadline.within(timeout):
                return predict_any(self.segmenter, model_input, self.max_pixels)
        except (ValueError, TypeError) as error:  # bad input: HTTP 400 with the message
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        except RequestTimeoutError as error:
            raise MlflowException(str(error), error_code=DEADLINE_EXCEEDED) from None
        except ServerStoppingError as error:
            raise MlflowException(str(error), error_code=TEMPORARILY_UNAVAILABLE) from None
