"""Test-time prediction: whole image, sliding window, multi-scale + flip (mmsegmentation-style).

The model must be in eval mode, where `model(images)` returns logits (B, K, H, W) at the input
resolution. With one scale and no flip, `predict_logits` returns those logits unchanged
(averaged over overlapping windows in "slide" mode). With several scales or flip it averages
the softmax probabilities of every view (as mmsegmentation does) and returns their log, so
`softmax(result)` is always the predicted distribution and `argmax(result)` the prediction.
For the integrated classifier, whose logits are log-probabilities, softmax is the identity on
probabilities, so the same rule holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segnext.windows import window_boxes

MODES = ("whole", "slide")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model returned {type(logits).__name__}, expected a logits tensor")
    if (
        logits.dim() != 4
        or logits.shape[0] != images.shape[0]
        or (logits.shape[-2:] != images.shape[-2:])
    ):
        raise ValueError(
            f"model returned logits {tuple(logits.shape)} for images {tuple(images.shape)}; "
            "expected (B, K, H, W) at the input resolution"
        )
    return logits


def slide_logits(
    model: nn.Module,
    images: torch.Tensor,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
) -> torch.Tensor:
    """Average of the logits of overlapping crop windows (mmsegmentation's grid).

    Windows start every `stride` pixels, the last one clamped to the border (the grid of
    `segnext.windows.window_boxes`); a window larger than the image is zero-padded at the
    bottom/right (0 = the mean colour after normalisation) and its logits cropped back.
    """
    h_crop, w_crop = _pair(crop_size, "crop_size")
    h_stride, w_stride = _pair(stride, "stride")
    if h_stride > h_crop or w_stride > w_crop:
        raise ValueError(f"stride {stride} larger than crop_size {crop_size} leaves gaps")
    batch, _, height, width = images.shape
    summed: torch.Tensor | None = None
    count = images.new_zeros((1, 1, height, width))
    for y1, x1, y2, x2 in window_boxes(height, width, (h_crop, w_crop), (h_stride, w_stride)):
        crop = images[:, :, y1:y2, x1:x2]
        pad_h, pad_w = h_crop - crop.shape[-2], w_crop - crop.shape[-1]
        if pad_h or pad_w:
            crop = F.pad(crop, (0, pad_w, 0, pad_h))
        logits = _forward(model, crop)[:, :, : y2 - y1, : x2 - x1]
        if summed is None:
            summed = logits.new_zeros((batch, logits.shape[1], height, width))
        summed[:, :, y1:y2, x1:x2] += logits
        count[:, :, y1:y2, x1:x2] += 1
    return summed / count


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mode: str = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Scores (B, K, H, W) at the input resolution; argmax over dim 1 is the prediction.

    mode "slide" needs `crop_size` and `stride`; each scale resizes the image bilinearly by
    that ratio (rounded to whole pixels), `flip` adds the horizontally flipped view.
    """
    if model.training:
        raise ValueError("predict_logits needs the model in eval mode: call model.eval() first")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("mode='slide' needs crop_size and stride")
    if mode == "whole" and (crop_size is not None or stride is not None):
        raise ValueError("crop_size and stride apply to mode='slide' only")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive ratios, got {scales}")

    def run(x: torch.Tensor) -> torch.Tensor:
        return _forward(model, x) if mode == "whole" else slide_logits(model, x, crop_size, stride)

    if scales == (1.0,) and not flip:
        return run(images)
    height, width = images.shape[-2:]
    probs = None
    for scale in scales:
        size = (int(height * scale + 0.5), int(width * scale + 0.5))
        scaled = images
        if size != (height, width):
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = run(scaled.flip(-1)) if flipped else run(scaled)
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(
                    logits, size=(height, width), mode="bilinear", align_corners=False
                )
            view = logits.float().softmax(dim=1)
            probs = view if probs is None else probs + view
    probs = probs / (len(scales) * (2 if flip else 1))
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def predict(model: nn.Module, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """Class ids (B, H, W) int64: argmax of `predict_logits(model, images, **kwargs)`."""
    return predict_logits(model, images, **kwargs).argmax(dim=1)
