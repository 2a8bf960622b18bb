"""Any common picture as the model's input: uint8 (H, W, 3) RGB, without silent damage.

Pillow's `convert("RGB")` clips 16-bit pixel values to 255, so a 16-bit PNG comes out all white
and is predicted as one class; this module scales such images instead, and says so. Used by
`segnext predict` (files) and the served model (request bytes). numpy + PIL only, no torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (and 32-bit int) grayscale
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "L", "LA", "La", "1", "CMYK", "YCbCr")
MAX_16BIT = 65535


class UnsupportedImageError(ValueError):
    """A picture whose pixels have no faithful 8-bit RGB reading (e.g. float data)."""


def picture_to_rgb(picture: Image.Image, where: str) -> tuple[np.ndarray, str | None]:
    """(uint8 (H, W, 3) RGB array, a one-line note when the conversion changed the values'
    scale, else None). EXIF orientation is applied. Alpha is dropped (the stored colours are
    kept, not composited onto a background: transparent regions keep whatever colour they
    hold, as the training images, which have no alpha, would). Palette, grayscale and CMYK
    images are converted by Pillow's own colour conversions."""
    picture = ImageOps.exif_transpose(picture)
    if picture.mode in WIDE_MODES:
        values = np.asarray(picture)
        low, high = int(values.min(initial=0)), int(values.max(initial=0))
        if low < 0 or high > MAX_16BIT:
            raise UnsupportedImageError(
                f"{where}: {picture.mode} pixel values {low}..{high} exceed 16 bits; "
                "save it as an 8- or 16-bit image"
            )
        # Scaled by the 16-bit range (value / 257, rounded), not by this image's own min..max:
        # the same stored value gives the same 8-bit value in every image, as a viewer shows
        # it; nothing is clipped. 12-bit data (0..4095) therefore comes out dark.
        gray = np.round(values.astype(np.float32) / 257.0).astype(np.uint8)
        note = f"{where}: 16-bit image (values {low}..{high}) scaled to 8-bit by /257"
        return np.repeat(gray[..., None], 3, axis=2), note
    if picture.mode not in COLOUR_MODES:
        raise UnsupportedImageError(
            f"{where}: unsupported image mode {picture.mode!r} (e.g. 32-bit float); save it "
            "as 8-bit RGB, grayscale or 16-bit PNG"
        )
    if picture.mode == "P" and "transparency" in picture.info:
        picture = picture.convert("RGBA")  # Pillow's advice for palette transparency
    return np.asarray(picture.convert("RGB")), None


def check_rgb(image: Any, index: int) -> np.ndarray:
    """`image` if it is a uint8 (H, W, 3) array, else an error naming its position."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = getattr(image, "dtype", type(image).__name__)
        raise TypeError(f"image {index}: expected a uint8 numpy array, got {kind}")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image {index}: expected RGB (H, W, 3), got shape {image.shape}")
    return image


def same_size_batches(images: Sequence[np.ndarray], batch_size: int) -> Iterator[list[int]]:
    """Indices of `images` in batches of at most `batch_size` images of one size (checked
    with `check_rgb`): what the PyTorch and the ONNX segmenters stack into one forward."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_size[check_rgb(image, index).shape[:2]].append(index)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]
