"""From RGB images to class masks with a trained SegNeXt: the one inference core.

`Segmenter` owns everything between a uint8 (H, W, 3) image of any size and its (H, W) mask:
normalisation, the test resize (the training `data.scale`, if one was set), padding to a
multiple of 32, whole-image or sliding-window inference (chosen per image by its size unless
forced), optional multi-scale + flip, and the resize of the scores back to the input size.
Training-time validation (`pipelines.inference.scoring`), `segnext eval`, `segnext predict` and
the served model (`pipelines.serving.pyfunc`) all go through it, so the score that `segnext
eval` reports is the score of what is served.

It needs torch only: no MLflow, no pandas, which training workers and `segnext eval` would
otherwise import for nothing. Model references that may be MLflow URIs (`models:/...`) are
resolved by `pipelines.tracking.models`; the HTTP payload forms are `pipelines.serving.payload`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data.transforms import rescaled_size
from pipelines.checkpoint_io import load_checkpoint, model_from_checkpoint
from pipelines.inference.images import same_size_batches
from pipelines.meta import EvalMeta, payload_meta
from segnext.inference import predict_logits

SIZE_DIVISOR = 32  # the encoder's total stride: whole-image inputs are padded to a multiple
SLIDE_ABOVE_CROPS = 4  # auto mode slides over images with more pixels than 4 training crops
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the official multi-scale test ratios


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
        cls, payload: dict[str, Any], *, device: str | None = None, source: str = "checkpoint",
        decision: str | None = None, **overrides: Any,
    ) -> Segmenter:
        """`overrides`: the keywords of `settings_from_checkpoint` (mode, crop_size, ...);
        `source`: what errors name (the file or URI); `decision`: an integrated head's
        prediction rule in place of the saved one."""
        meta = payload_meta(payload)
        return cls(
            model_from_checkpoint(payload, source, decision),
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


def load_checkpoint_segmenter(
    checkpoint: str | Path, *, device: str | None = None, **overrides: Any
) -> Segmenter:
    """A Segmenter for a checkpoint file, Ray checkpoint folder or checkpoint URI (s3://...),
    read with weights_only=True (no pickle); `overrides`: as `Segmenter.from_checkpoint`."""
    return Segmenter.from_checkpoint(load_checkpoint(checkpoint), device=device,
                                     source=str(checkpoint), **overrides)
