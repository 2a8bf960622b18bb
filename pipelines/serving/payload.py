"""The served model's payload codec: what a request may hold, and what a response holds.

It exists apart from the pyfunc (`pipelines.serving.pyfunc`) because it is plain data handling
(numpy, pandas, Pillow) that the MLflow wrapper, the tests and HTTP clients (`decode_mask_png`)
share. Inputs `predict_any` takes:

- a uint8 (H, W, 3) RGB array -> one (H, W) mask array;
- a (B, H, W, 3) array -> a (B, H, W) array; a list of images (sizes may differ) -> a list of
  masks; list items may also be encoded PNG/JPEG bytes or base64 strings;
- a pandas DataFrame (or a dict) with an "image" column of PNG/JPEG bytes or base64 strings
  (what `mlflow models serve` receives from `{"dataframe_split": {"columns": ["image"],
  "data": [["<base64>"], ...]}}`) -> a DataFrame with columns "mask" (base64 PNG of the class
  ids, 8-bit gray; 16-bit when there are more than 256 classes), "height" and "width", which
  the scoring server returns as JSON records.

Masks hold class ids 0..K-1, in the order of the model's `class_names` metadata. A request holds
at most `max_pixels` pixels (each image and all together), refused before decoding.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from pipelines.inference.images import picture_to_rgb

if TYPE_CHECKING:
    from pipelines.inference.segmenter import Segmenter

IMAGE_COLUMN = "image"
MAX_PIXELS_ENV = "SEGNEXT_MAX_PIXELS"  # the served model's limit per request

_logger = logging.getLogger(__name__)


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
