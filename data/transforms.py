"""SegNeXt (mmseg) training and evaluation transforms on uint8 numpy arrays.

Everything here works with or without Ray. Random transforms take a `numpy.random.Generator`
and are deterministic given it. Images are uint8 (H, W, 3) RGB, masks uint8 (H, W) with class
ids and `ignore_index` for "not scored". Samples stay uint8 (4x fewer bytes to ship);
`normalize_batch` / `to_training_batch` run on the training device. Those two import torch
when called: Ray Data's CPU workers import this module, and torch's import costs ~1.5 CPU-s in
every such process.

Train recipe (shared/spec/segnext.md): random resize to `scale` x ratio keeping aspect, random
crop retried until no class covers `cat_max_ratio` of it, horizontal flip, photometric
distortion, pad (image 0, mask ignore).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# mmseg PhotoMetricDistortion defaults: brightness +-32, contrast and saturation [0.5, 1.5],
# hue +-18 in OpenCV's uint8 hue unit (2 degrees).
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
CROP_RETRIES = 10


def rescaled_size(
    height: int, width: int, scale: tuple[int, int] | None, ratio: float = 1.0
) -> tuple[int, int]:
    """(h, w) after an aspect-keeping resize to `scale` times `ratio` (mmseg keep_ratio rule).

    `scale` bounds the long side by max(scale) and the short side by min(scale) (so (2048, 512)
    and (512, 2048) mean the same); None means the image's own size.
    """
    factor = ratio
    if scale is not None:
        long_side, short_side = max(scale), min(scale)
        factor *= min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    if array.shape[:2] == size:
        return array
    return np.array(Image.fromarray(array).resize((size[1], size[0]), resample))


def _resize_window(
    image: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int]
) -> np.ndarray:
    """Bilinear-resize `image` to `size` and crop `window` (y0, x0, h, w), resizing only the
    window: the same pixels as resizing everything then cropping, at a fraction of the cost."""
    height, width = image.shape[:2]
    y0, x0, crop_h, crop_w = window
    if (height, width) == size:
        return image[y0 : y0 + crop_h, x0 : x0 + crop_w]
    sy, sx = height / size[0], width / size[1]
    box = (x0 * sx, y0 * sy, (x0 + crop_w) * sx, (y0 + crop_h) * sy)
    resized = Image.fromarray(image).resize(
        (crop_w, crop_h), Image.Resampling.BILINEAR, box=box, reducing_gap=None
    )
    return np.array(resized)


def _crop_ok(mask_crop: np.ndarray, ignore_index: int, cat_max_ratio: float) -> bool:
    counts = np.bincount(mask_crop.ravel(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() < cat_max_ratio * counts.sum()


def choose_crop(
    mask: np.ndarray,
    crop_size: tuple[int, int],
    rng: np.random.Generator,
    *,
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
) -> tuple[int, int, int, int]:
    """Random crop window (y0, x0, h, w) of at most `crop_size`, as mmseg RandomCrop: redrawn up
    to 10 times while one non-ignored class covers >= cat_max_ratio of the crop (or the crop
    holds fewer than two classes); the last draw is kept if none passes."""
    height, width = mask.shape
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)

    def draw() -> tuple[int, int, int, int]:
        y0 = int(rng.integers(0, height - crop_h + 1))
        x0 = int(rng.integers(0, width - crop_w + 1))
        return y0, x0, crop_h, crop_w

    window = draw()
    if cat_max_ratio >= 1.0:
        return window
    for _ in range(CROP_RETRIES):
        y0, x0, h, w = window
        if _crop_ok(mask[y0 : y0 + h, x0 : x0 + w], ignore_index, cat_max_ratio):
            break
        window = draw()
    return window


def _lut(alpha: float, beta: float) -> np.ndarray:
    """uint8 lookup table of mmseg's convert(): clip(x * alpha + beta) then truncate."""
    return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _saturation_hue(image: np.ndarray, saturation: float, hue_shift: float) -> np.ndarray:
    """Scale HSV saturation by `saturation` (clipped at 1) and rotate hue by `hue_shift`
    sextants (60 degrees each), with value (the max channel) unchanged. Vectorised on float32
    planes; a saturation-only change skips the hue computation (each channel moves towards V)."""
    planes = np.moveaxis(image, -1, 0).astype(np.float32)  # (3, H, W), contiguous planes
    r, g, b = planes
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    out = np.empty(image.shape, dtype=np.uint8)
    if hue_shift == 0.0:
        # S' = min(S * s, 1)  <=>  every channel c -> V - (V - c) * min(s, V / C)
        limit = np.divide(value, chroma, out=np.full_like(chroma, saturation), where=chroma > 0)
        factor = np.minimum(limit, saturation)
        for channel in range(3):
            out[..., channel] = value - (value - planes[channel]) * factor + 0.5
        return out
    inv_chroma = np.divide(1.0, chroma, out=np.zeros_like(chroma), where=chroma > 0)
    red_max = value == r
    green_max = ~red_max & (value == g)
    hue = np.where(red_max, g - b, np.where(green_max, b - r, r - g))
    hue *= inv_chroma
    hue += np.where(red_max, hue_shift, np.where(green_max, 2.0 + hue_shift, 4.0 + hue_shift))
    if saturation != 1.0:
        np.minimum(chroma * saturation, value, out=chroma)
    k = np.empty_like(hue)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):  # HSV -> RGB: V - C * clip(min(k, 4 - k))
        np.add(hue, offset, out=k)
        np.subtract(k, 6.0, out=k, where=k >= 6.0)
        np.add(k, 6.0, out=k, where=k < 0.0)
        weight = np.minimum(k, 4.0 - k)
        np.clip(weight, 0.0, 1.0, out=weight)
        weight *= chroma
        out[..., channel] = value - weight + 0.5
    return out


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion on uint8 RGB: brightness, contrast (randomly before or after
    the colour steps), saturation, hue; each applied with p=0.5.

    Brightness and contrast are uint8 lookup tables (composed when adjacent); saturation and
    hue share one HSV pass instead of two uint8 HSV round trips.
    """
    lut = _lut(1.0, rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)) if rng.integers(2) else None
    contrast_first = bool(rng.integers(2))

    def contrast(current: np.ndarray | None) -> np.ndarray | None:
        if not rng.integers(2):
            return current
        step = _lut(rng.uniform(*CONTRAST_RANGE), 0.0)
        return step if current is None else np.take(step, current)

    if contrast_first:
        lut = contrast(lut)
    saturation = rng.uniform(*SATURATION_RANGE) if rng.integers(2) else 1.0
    hue_shift = rng.integers(-HUE_DELTA, HUE_DELTA) / 30.0 if rng.integers(2) else 0.0
    if saturation != 1.0 or hue_shift != 0.0:
        if lut is not None:
            image, lut = np.take(lut, image), None
        image = _saturation_hue(image, saturation, hue_shift)
    if not contrast_first:
        lut = contrast(lut)
    return image if lut is None else np.take(lut, image)


def pad_to(
    image: np.ndarray, mask: np.ndarray, size: tuple[int, int], ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to `size` (h, w): image with 0, mask with `ignore_index`."""
    height, width = mask.shape
    if (height, width) == tuple(size):
        return image, mask
    if height > size[0] or width > size[1]:
        raise ValueError(f"cannot pad a {height}x{width} sample to {size[0]}x{size[1]}")
    padded_image = np.zeros((size[0], size[1], 3), dtype=np.uint8)
    padded_mask = np.full((size[0], size[1]), ignore_index, dtype=np.uint8)
    padded_image[:height, :width] = image
    padded_mask[:height, :width] = mask
    return padded_image, padded_mask


@dataclass(frozen=True)
class TrainTransform:
    """Random resize -> random crop (cat-max retry) -> flip -> photometric -> pad.

    crop_size is (h, w); scale as in `rescaled_size` (None: the image's own size).
    """

    crop_size: tuple[int, int]
    scale: tuple[int, int] | None = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    ignore_index: int = 255
    flip_prob: float = 0.5
    photometric: bool = True

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        _check_pair(image, mask)
        ratio = rng.uniform(*self.ratio_range)
        size = rescaled_size(*mask.shape, self.scale, ratio)
        mask = _resize(mask, size, Image.Resampling.NEAREST)
        window = choose_crop(
            mask,
            self.crop_size,
            rng,
            cat_max_ratio=self.cat_max_ratio,
            ignore_index=self.ignore_index,
        )
        y0, x0, h, w = window
        mask = mask[y0 : y0 + h, x0 : x0 + w]
        image = _resize_window(image, size, window)
        if rng.random() < self.flip_prob:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        image, mask = pad_to(image, mask, self.crop_size, self.ignore_index)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


@dataclass(frozen=True)
class EvalTransform:
    """Aspect-keeping resize to `scale` (None: keep size), then pad to `pad_size` (h, w) so every
    sample has one shape and batches stack. Padded mask pixels are `ignore_index`, so scoring
    the padded prediction equals scoring the unpadded one."""

    pad_size: tuple[int, int]
    scale: tuple[int, int] | None = None
    ignore_index: int = 255

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _check_pair(image, mask)
        size = rescaled_size(*mask.shape, self.scale)
        if size[0] > self.pad_size[0] or size[1] > self.pad_size[1]:
            raise ValueError(
                f"eval sample resized to {size[0]}x{size[1]} exceeds the pad size "
                f"{self.pad_size[0]}x{self.pad_size[1]}: raise the eval crop/pad size or lower "
                "the test scale"
            )
        image = _resize(image, size, Image.Resampling.BILINEAR)
        mask = _resize(mask, size, Image.Resampling.NEAREST)
        return pad_to(image, mask, self.pad_size, self.ignore_index)


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
        raise ValueError(
            f"mask must be uint8 (H, W) matching the image {image.shape[:2]}, "
            f"got {mask.dtype} {mask.shape}"
        )


def normalize_batch(images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> normalised (B, 3, H, W) contiguous `dtype` (default float32);
    run it on the training device so only uint8 crosses the wire."""
    import torch

    dtype = dtype or torch.float32
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}"
        )
    mean = torch.tensor(MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(STD, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    out = images.permute(0, 3, 1, 2).contiguous().to(dtype)
    return out.sub_(mean).mul_(inv_std)


def to_training_batch(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict:
    """uint8 collated batch -> {"images" normalised float32 (B, 3, H, W), "masks" int64
    (B, H, W)} (+ int64 "height", "width" when present), moved to `device` as uint8 and
    converted there."""
    import torch

    out = {
        "images": normalize_batch(batch["image"].to(device, non_blocking=True)),
        "masks": batch["mask"].to(device, non_blocking=True).long(),
    }
    for name in ("height", "width"):
        if name in batch:
            out[name] = torch.as_tensor(batch[name]).to(device).long()
    return out
