"""From RGB images to class masks with a trained SegNeXt, and the model's MLflow pyfunc flavour.

`Segmenter` owns everything between a uint8 (H, W, 3) image of any size and its (H, W) mask:
normalisation, the test resize (the training `data.scale`, if one was set), padding to a
multiple of 32, whole-image or sliding-window inference (chosen per image by its size unless
forced), optional multi-scale + flip, and the resize of the scores back to the input size.
`segnext eval`, `segnext predict` and the served model all go through it, so the score that
`segnext eval` reports is the score of what is served.

`SegNeXtPyfunc` is the `mlflow.pyfunc.PythonModel` that `pipelines.tracking.registry` logs. Inputs:

- a uint8 (H, W, 3) RGB array -> one (H, W) mask array;
- a (B, H, W, 3) array -> a (B, H, W) array; a list of images (sizes may differ) -> a list of
  masks; list items may also be encoded PNG/JPEG bytes or base64 strings;
- a pandas DataFrame (or a dict) with an "image" column of PNG/JPEG bytes or base64 strings
  (what `mlflow models serve` receives from `{"dataframe_split": {"columns": ["image"],
  "data": [["<base64>"], ...]}}`) -> a DataFrame with columns "mask" (base64 PNG of the class
  ids, 8-bit gray; 16-bit when there are more than 256 classes), "height" and "width", which
  the scoring server returns as JSON records.

Masks hold class ids 0..K-1, in the order of the model's `class_names` metadata.

Under `mlflow models serve` (uvicorn; each request runs in a thread of a worker process) the
pyfunc bounds its work: a request holds at most `SEGNEXT_MAX_PIXELS` pixels (default 16 MP; the
model config's `max_pixels` otherwise; 0: no limit), refused before decoding with HTTP 400 and
a message; and a request past the server's timeout (`--timeout`, i.e.
MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, default 60 s), which MLflow answers with 504 without
stopping the thread, stops itself before its next forward pass (one sliding window). Not
bounded: one forward pass (one window, or a whole image up to the pixel limit) and the JSON
decoding before `predict`. Bad input of any kind answers 400 with the message.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.environment_variables import (
    _MLFLOW_IS_IN_SERVING_ENVIRONMENT,
    MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE
from PIL import Image

from data.transforms import rescaled_size
from pipelines.checkpoint_io import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    payload_meta,
)
from pipelines.inference.images import picture_to_rgb, same_size_batches
from pipelines.inference.threads import set_torch_threads
from pipelines.meta import EvalMeta
from segnext.inference import predict_logits

CHECKPOINT_ARTIFACT = "checkpoint"  # key of the checkpoint file in the pyfunc's artifacts
IMAGE_COLUMN = "image"
SIZE_DIVISOR = 32  # the encoder's total stride: whole-image inputs are padded to a multiple
SLIDE_ABOVE_CROPS = 4  # auto mode slides over images with more pixels than 4 training crops
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the official multi-scale test ratios
MAX_PIXELS_ENV = "SEGNEXT_MAX_PIXELS"  # the served model's limit per request
DEFAULT_MAX_PIXELS = 16_000_000  # 16 MP: a 4000x4000 photo; far above any training crop

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceSettings:
    """How `Segmenter` runs the model; `from_checkpoint` fills it from the training run."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_size: tuple[int, int]  # slide window (h, w); the training crop unless configured
    stride: tuple[int, int]  # slide stride (h, w)
    mode: str = "auto"  # "whole", "slide", or "auto": slide above SLIDE_ABOVE_CROPS crops
    scale: tuple[int, int] | None = None  # test resize bounds (long, short); None: keep size
    scales: tuple[float, ...] = (1.0,)  # multi-scale ratios (TTA)
    flip: bool = False  # add the horizontally flipped view (TTA)
    batch_size: int = 4  # images of one size per forward pass

    def mode_for(self, height: int, width: int) -> str:
        if self.mode != "auto":
            return self.mode
        crop_pixels = self.crop_size[0] * self.crop_size[1]
        return "slide" if height * width > SLIDE_ABOVE_CROPS * crop_pixels else "whole"


def _pair(value: Sequence[int] | None) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


def settings_from_checkpoint(
    payload: dict[str, Any],
    *,
    mode: str | None = None,
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    tta: bool = False,
    batch_size: int | None = None,
) -> InferenceSettings:
    """Settings from the checkpoint's meta (its eval settings; for checkpoints written before
    those, the training config's); keyword arguments override."""
    meta = payload_meta(payload)
    run = meta.eval or EvalMeta.from_flat_config(payload.get("config") or {})
    crop = _pair(crop_size) or run.crop or meta.crop_size
    default_stride = (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
    if mode is None:  # training validated whole images; serving still slides over big ones
        mode = "slide" if run.mode == "slide" else "auto"
    if mode not in ("auto", "whole", "slide"):
        raise ValueError(f"mode must be auto, whole or slide, got {mode!r}")
    return InferenceSettings(
        mean=meta.mean,
        std=meta.std,
        crop_size=crop,
        stride=_pair(stride) or run.stride or default_stride,
        mode=mode,
        scale=run.scale,
        scales=TTA_SCALES if tta else (1.0,),
        flip=tta,
        batch_size=batch_size or run.batch_size,
    )


class Segmenter:
    """A SegNeXt in eval mode plus the pre- and post-processing around it."""

    def __init__(
        self,
        model: torch.nn.Module,
        settings: InferenceSettings,
        *,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        ignore_index: int = 255,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.settings = settings
        self.class_names = list(class_names)
        self.palette = [list(map(int, color)) for color in palette]
        self.ignore_index = ignore_index
        self.num_classes = len(self.class_names)
        self.mask_dtype = np.uint8 if self.num_classes <= 256 else np.int32
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(settings.mean, device=self.device).view(shape)
        self._std = torch.tensor(settings.std, device=self.device).view(shape)

    @classmethod
    def from_checkpoint(
        cls, payload: dict[str, Any], *, device: str | None = None, **overrides: Any
    ) -> Segmenter:
        """`overrides`: the keywords of `settings_from_checkpoint` (mode, crop_size, ...)."""
        meta = payload_meta(payload)
        return cls(
            model_from_checkpoint(payload),
            settings_from_checkpoint(payload, **overrides),
            class_names=meta.class_names,
            palette=meta.palette,
            ignore_index=meta.ignore_index,
            device=device,
        )

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One (H, W) mask of class ids per uint8 (H, W, 3) RGB image, in input order.

        Images of the same size are batched together, up to `settings.batch_size`.
        """
        masks: list[np.ndarray | None] = [None] * len(images)
        for chunk in same_size_batches(images, self.settings.batch_size):
            batch = np.stack([images[i] for i in chunk])
            for index, mask in zip(chunk, self._predict_batch(batch), strict=True):
                masks[index] = mask
        return masks  # type: ignore[return-value]

    @torch.inference_mode()
    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        height, width = images.shape[1:3]
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        size = rescaled_size(height, width, self.settings.scale)
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        mode = self.settings.mode_for(*size)
        window: dict[str, Any] = {}
        if mode == "slide":
            window = {"crop_size": self.settings.crop_size, "stride": self.settings.stride}
        else:  # zero (= the mean colour) padding to the encoder's stride, cropped off below
            pad_h, pad_w = (-size[0]) % SIZE_DIVISOR, (-size[1]) % SIZE_DIVISOR
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = predict_logits(
            self.model,
            x,
            mode=mode,
            scales=self.settings.scales,
            flip=self.settings.flip,
            **window,
        )[:, :, : size[0], : size[1]]
        if size != (height, width):
            logits = F.interpolate(
                logits.float(), size=(height, width), mode="bilinear", align_corners=False
            )
        return logits.argmax(dim=1).cpu().numpy().astype(self.mask_dtype)


# ------------------------------------------------------------------- loading a model reference


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference leads: its local checkpoint file, and the MLflow run that
    logged it (None for a bare checkpoint)."""

    reference: str
    checkpoint: Path | str  # str: a URI (s3://...), fetched when loaded
    run_id: str | None = None


def resolve_model(model: str | Path) -> ModelSource:
    """A checkpoint (file or Ray checkpoint folder), a local MLflow model folder, or a model
    URI (`models:/segnext@champion`, `models:/segnext/3`, or any other MLflow model URI);
    MLflow models are downloaded and read through their checkpoint artifact."""
    from pipelines.storage import is_checkpoint_uri

    text = str(model)
    local = Path(text).expanduser()
    if is_checkpoint_uri(text):  # s3://.../checkpoint_0000100 under a run.storage_path
        return ModelSource(text, text)
    if ":/" in text and not local.exists():  # a URI: models:/..., runs:/..., s3://...
        return _mlflow_model(text, Path(mlflow.artifacts.download_artifacts(text)))
    if (local / "MLmodel").is_file():
        return _mlflow_model(text, local)
    return ModelSource(text, local)


def _mlflow_model(reference: str, model_dir: Path) -> ModelSource:
    info = mlflow.models.Model.load(str(model_dir))
    artifact = (info.flavors.get("python_function", {}).get("artifacts") or {}).get(
        CHECKPOINT_ARTIFACT
    )
    if artifact is None:
        raise ValueError(
            f"{reference} is an MLflow model but not one logged by `segnext register` (no "
            f"{CHECKPOINT_ARTIFACT!r} artifact); pass a segnext model or checkpoint"
        )
    return ModelSource(reference, model_dir / artifact["path"], info.run_id)


def load_segmenter(model: str | Path, *, device: str | None = None, **overrides: Any) -> Segmenter:
    """A Segmenter for any reference `resolve_model` takes. The checkpoint is read with
    weights_only=True (no pickle), and `overrides` (the keywords of `settings_from_checkpoint`)
    replace the settings the training run recorded."""
    payload = load_source(resolve_model(model))
    return Segmenter.from_checkpoint(payload, device=device, **overrides)


def load_source(source: ModelSource) -> dict[str, Any]:
    """`load_checkpoint` of a resolved reference; errors name the reference the user gave
    (`models:/segnext@champion`), not only the file MLflow downloaded."""
    try:
        return load_checkpoint(source.checkpoint)
    except CheckpointError as error:
        if str(source.reference) in str(error):
            raise
        raise CheckpointError(f"{source.reference}: {error}") from None


# ------------------------------------------------------------------------------ pyfunc flavour


class ImageTooLargeError(ValueError):
    """A request above the served model's pixel limit (`SEGNEXT_MAX_PIXELS`)."""


class RequestTimeoutError(RuntimeError):
    """The request ran past the scoring server's timeout; its computation was stopped."""


def _check_pixels(height: int, width: int, where: str, max_pixels: int | None) -> None:
    if max_pixels and height * width > max_pixels:
        raise ImageTooLargeError(
            f"{where}: {width}x{height} = {height * width / 1e6:.1f} MP is above this model's "
            f"limit of {max_pixels / 1e6:g} MP ({MAX_PIXELS_ENV}={max_pixels}); send a smaller "
            f"image or raise {MAX_PIXELS_ENV} where the server runs"
        )


def decode_image(value: Any, where: str, max_pixels: int | None = None) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from an array, nested lists, PIL image, or encoded bytes
    (PNG/JPEG; str = base64 of them), converted by `pipelines.inference.images` (16-bit scaled, palette,
    gray, alpha). `max_pixels`: refuse larger images, for encoded ones before decoding."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value)
        except ValueError as error:
            raise ValueError(f"{where}: a string must be base64 PNG/JPEG bytes ({error})") from None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = Image.open(io.BytesIO(bytes(value)))
            _check_pixels(value.height, value.width, where, max_pixels)  # header only so far
            value.load()
        except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
            raise ValueError(f"{where}: bytes are not a readable image ({error})") from None
    if isinstance(value, Image.Image):
        _check_pixels(value.height, value.width, where, max_pixels)
        array, note = picture_to_rgb(value, where)
        if note:
            _logger.warning(note)
        return array
    array = np.asarray(value)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{where}: expected an RGB image (H, W, 3), got shape {array.shape}")
    _check_pixels(array.shape[0], array.shape[1], where, max_pixels)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)  # e.g. JSON lists arrive as int64
    raise ValueError(
        f"{where}: pixel values must be integers 0..255 (uint8), got {array.dtype}; "
        "scale float images by 255 and cast to uint8"
    )


def encode_mask_png(mask: np.ndarray) -> str:
    """Base64 PNG of a class-id mask: 8-bit gray, or 16-bit when ids exceed 255."""
    array = mask.astype(np.uint8) if mask.max(initial=0) <= 255 else mask.astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_mask_png(text: str) -> np.ndarray:
    """Inverse of `encode_mask_png` (for clients of the served model)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def _table_images(table: pd.DataFrame | dict, max_pixels: int | None) -> list[np.ndarray]:
    columns = list(table.columns) if isinstance(table, pd.DataFrame) else list(table)
    if IMAGE_COLUMN not in columns:
        raise ValueError(
            f"input table has columns {columns}; send the images in a column named "
            f"{IMAGE_COLUMN!r} (PNG/JPEG bytes, base64-encoded in JSON)"
        )
    values = table[IMAGE_COLUMN]
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    return [decode_image(value, f"row {row}", max_pixels) for row, value in enumerate(values)]


def _checked(images: list[np.ndarray], max_pixels: int | None) -> list[np.ndarray]:
    """`images`, if together they are within `max_pixels` (the work of one request)."""
    total = sum(image.shape[0] * image.shape[1] for image in images)
    if max_pixels and total > max_pixels:
        raise ImageTooLargeError(
            f"the request's {len(images)} images hold {total / 1e6:.1f} MP together, above "
            f"this model's limit of {max_pixels / 1e6:g} MP per request ({MAX_PIXELS_ENV}="
            f"{max_pixels}); send fewer images per request"
        )
    return images


def predict_any(segmenter: Segmenter, model_input: Any, max_pixels: int | None = None) -> Any:
    """The pyfunc contract (module docstring): masks in the form the input came in.
    `max_pixels`: the most pixels one request may hold (each image and all together)."""
    def decode_all(values: Any) -> list[np.ndarray]:
        images = [decode_image(value, f"image {i}", max_pixels) for i, value in enumerate(values)]
        return _checked(images, max_pixels)

    if isinstance(model_input, pd.DataFrame | dict):
        masks = segmenter.predict(_checked(_table_images(model_input, max_pixels), max_pixels))
        return pd.DataFrame(
            {
                "mask": [encode_mask_png(mask) for mask in masks],
                "height": [mask.shape[0] for mask in masks],
                "width": [mask.shape[1] for mask in masks],
            }
        )
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 3:
            return segmenter.predict([decode_image(model_input, "input", max_pixels)])[0]
        if model_input.ndim == 4:
            return np.stack(segmenter.predict(decode_all(model_input)))
    if isinstance(model_input, list | tuple | np.ndarray):
        return segmenter.predict(decode_all(model_input))
    if isinstance(model_input, str | bytes | Image.Image):
        return segmenter.predict([decode_image(model_input, "input", max_pixels)])[0]
    raise TypeError(
        f"unsupported input {type(model_input).__name__}: pass a uint8 (H, W, 3) array, a list "
        f"of them, or a DataFrame with an {IMAGE_COLUMN!r} column of PNG/JPEG bytes"
    )


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
        payload = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.segmenter = Segmenter.from_checkpoint(payload)
        self.max_pixels = max_pixels_setting(getattr(context, "model_config", None))
        self.deadline = _Deadline()
        self.segmenter.model.register_forward_pre_hook(self.deadline.check)

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
