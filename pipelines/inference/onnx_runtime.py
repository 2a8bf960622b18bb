"""Run an exported SegNeXt (`segnext export`) with numpy + onnxruntime only: no torch import.

`OnnxSegmenter` is the counterpart of `pipelines.inference.segmenter.Segmenter` for a `.onnx`
file: the same normalisation, test resize, padding to the encoder's stride, whole-image or
sliding-window inference (chosen per image by its size unless forced; the windows of
`segnext.windows`, shared with the torch runtime), optional multi-scale + flip, and the resize
of the scores back to the input size, with the settings the export wrote into the file's
metadata (`METADATA_KEY`, a JSON object: class names, palette, normalisation, eval settings).
A `.onnx` artifact URI (`models:/segnext/3/model.onnx`) is fetched by
`pipelines.tracking.registry.fetch_onnx`: this module imports neither torch nor MLflow.
Bilinear resizes reproduce `torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`, so masks match the PyTorch model's to floating-point noise.

The ONNX graph is the bare network: normalised float32 images (B, 3, H, W) in, scores
(B, K, H, W) at the input resolution out. A file exported with a fixed size (`--height/--width`)
takes only that size, so every image then goes through sliding windows of exactly that size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from data.transforms import rescaled_size  # numpy + PIL only
from pipelines.inference.images import same_size_batches  # numpy + PIL only
from pipelines.meta import MetaError, ModelMeta  # standard library only
from segnext.windows import window_boxes  # standard library only (no torch)

METADATA_KEY = "segnext"  # ONNX metadata_props key holding the JSON below
FORMAT = "segnext-onnx/1"
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the official multi-scale test ratios
MODES = ("auto", "whole", "slide")


class OnnxModelError(ValueError):
    """The file is missing, not an ONNX model, or was not written by `segnext export`."""


@dataclass(frozen=True)
class OnnxSettings:
    """How the runtime runs the network; the export fills it from the training run."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_size: tuple[int, int]  # slide window (h, w)
    stride: tuple[int, int]  # slide stride (h, w)
    mode: str = "auto"  # "whole", "slide", or "auto": slide above `slide_above_crops` crops
    scale: tuple[int, int] | None = None  # test resize bounds (long, short); None: keep size
    scales: tuple[float, ...] = (1.0,)  # multi-scale ratios (TTA)
    flip: bool = False  # add the horizontally flipped view (TTA)
    batch_size: int = 4  # images of one size per run
    size_divisor: int = 32  # whole-image inputs are zero-padded to a multiple of this
    slide_above_crops: int = 4

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> OnnxSettings:
        pairs = ("mean", "std", "crop_size", "stride", "scales")
        fixed = {k: tuple(v) for k, v in values.items() if k in pairs}
        scale = values.get("scale")
        return cls(**{**values, **fixed, "scale": None if scale is None else tuple(scale)})

    def mode_for(self, height: int, width: int) -> str:
        if self.mode != "auto":
            return self.mode
        crop_pixels = self.crop_size[0] * self.crop_size[1]
        return "slide" if height * width > self.slide_above_crops * crop_pixels else "whole"


# ------------------------------------------------------------------------------ array maths


def _axis_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear resize (align_corners=False) on one axis."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(source.astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (source - low).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) float32 resized to `size` like F.interpolate(bilinear, align_corners=False)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y0, y1, wy = _axis_weights(x.shape[-2], size[0])
    x0, x1, wx = _axis_weights(x.shape[-1], size[1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------- the model


class OnnxSegmenter:
    """An exported SegNeXt plus the pre- and post-processing around it (see module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        **overrides: Any,
    ) -> None:
        """`overrides`: mode, crop_size, stride, tta, batch_size (as `segnext predict` takes
        them; None keeps what the export recorded). `threads`: onnxruntime intra-op threads."""
        self.path = Path(path)
        self.session = _open_session(self.path, threads, providers)
        metadata = read_metadata(self.path, self.session)
        self.metadata = metadata  # the export's JSON (also: source, opset, val_mIoU, ...)
        self.meta = model_meta(self.path, metadata)
        self.class_names = list(self.meta.class_names)
        self.palette = [list(color) for color in self.meta.palette]
        self.ignore_index = self.meta.ignore_index
        self.num_classes = self.meta.num_classes
        self.mask_dtype = np.uint8 if self.num_classes <= 256 else np.int32
        self.input_name = self.session.get_inputs()[0].name
        size = metadata.get("input_size")
        self.input_size = None if size is None else tuple(size)
        self.settings = _apply_overrides(
            OnnxSettings.from_json(metadata["settings"]), self.input_size, **overrides
        )
        shape = (1, 3, 1, 1)
        self._mean = np.asarray(self.settings.mean, dtype=np.float32).reshape(shape)
        self._std = np.asarray(self.settings.std, dtype=np.float32).reshape(shape)

    def network(self, x: np.ndarray) -> np.ndarray:
        """Scores (B, K, H, W) of normalised float32 images (B, 3, H, W): the bare graph."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W)."""
        x = images.transpose(0, 3, 1, 2).astype(np.float32)
        return (x - self._mean) / self._std

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One (H, W) mask of class ids per uint8 (H, W, 3) RGB image, in input order.

        Images of the same size are batched together, up to `settings.batch_size`.
        """
        masks: list[np.ndarray | None] = [None] * len(images)
        for chunk in same_size_batches(images, self.settings.batch_size):
            scores = self.scores(np.stack([images[i] for i in chunk]))
            for index, score in zip(chunk, scores, strict=True):
                masks[index] = score.argmax(axis=0).astype(self.mask_dtype)
        return masks  # type: ignore[return-value]

    def scores(self, images: np.ndarray) -> np.ndarray:
        """Scores (B, K, H, W) at the input size of same-size uint8 images (B, H, W, 3).

        The steps of `Segmenter._predict_batch`, in its order: normalise, test resize, pad
        (whole mode), whole/slide run (over every TTA view), crop the padding, resize back.
        """
        height, width = images.shape[1:3]
        size = rescaled_size(height, width, self.settings.scale)
        x = resize_bilinear(self.normalise(images), size)
        mode = "slide" if self.input_size is not None else self.settings.mode_for(*size)
        if mode == "whole":  # zeros (= the mean colour) to the encoder's stride, cropped below
            divisor = self.settings.size_divisor
            pad = ((0, 0), (0, 0), (0, (-size[0]) % divisor), (0, (-size[1]) % divisor))
            x = np.pad(x, pad)
        if self.settings.scales == (1.0,) and not self.settings.flip:
            scores = self._run(x, mode)
        else:
            scores = self._tta(x, mode)
        return resize_bilinear(scores[:, :, : size[0], : size[1]], (height, width))

    def _run(self, x: np.ndarray, mode: str) -> np.ndarray:
        return self._slide(x) if mode == "slide" else self.network(x)

    def _slide(self, x: np.ndarray) -> np.ndarray:
        """Average of overlapping windows: segnext.inference.slide_logits's, over the same
        grid (`segnext.windows.window_boxes`)."""
        (h_crop, w_crop), stride = self.settings.crop_size, self.settings.stride
        batch, _, height, width = x.shape
        summed: np.ndarray | None = None
        count = np.zeros((1, 1, height, width), dtype=np.float32)
        for y1, x1, y2, x2 in window_boxes(height, width, (h_crop, w_crop), stride):
            crop = x[:, :, y1:y2, x1:x2]
            pad = ((0, 0), (0, 0), (0, h_crop - crop.shape[-2]), (0, w_crop - crop.shape[-1]))
            scores = self.network(np.pad(crop, pad))[:, :, : y2 - y1, : x2 - x1]
            if summed is None:
                summed = np.zeros((batch, scores.shape[1], height, width), dtype=np.float32)
            summed[:, :, y1:y2, x1:x2] += scores
            count[:, :, y1:y2, x1:x2] += 1
        return summed / count

    def _tta(self, x: np.ndarray, mode: str) -> np.ndarray:
        """Mean softmax over scales and flips, returned as its log (segnext.inference rule)."""
        height, width = x.shape[-2:]
        probs: np.ndarray | None = None
        views = 0
        for scale in self.settings.scales:
            size = (int(height * scale + 0.5), int(width * scale + 0.5))
            scaled = resize_bilinear(x, size)
            for flipped in (False, True) if self.settings.flip else (False,):
                view = scaled[..., ::-1] if flipped else scaled
                scores = self._run(view, mode)
                if flipped:
                    scores = scores[..., ::-1]
                view_probs = _softmax(resize_bilinear(scores, (height, width)))
                probs = view_probs if probs is None else probs + view_probs
                views += 1
        probs = probs / views
        return np.log(np.maximum(probs, np.finfo(np.float32).tiny))


def _apply_overrides(
    settings: OnnxSettings,
    input_size: tuple[int, int] | None,
    *,
    mode: str | None = None,
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    tta: bool = False,
    batch_size: int | None = None,
) -> OnnxSettings:
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if input_size is not None:  # the graph takes only this size: windows of exactly it
        if mode == "whole" or (crop_size is not None and tuple(crop_size) != input_size):
            raise ValueError(
                f"this ONNX file was exported for {input_size[0]}x{input_size[1]} inputs only, so "
                "it runs sliding windows of that size; re-export with --dynamic for other modes"
            )
        crop_size = input_size
        if stride is None and any(s > c for s, c in zip(settings.stride, input_size, strict=True)):
            stride = (max(1, input_size[0] * 2 // 3), max(1, input_size[1] * 2 // 3))
    changes: dict[str, Any] = {}
    if mode is not None:
        changes["mode"] = mode
    if crop_size is not None:
        changes["crop_size"] = (int(crop_size[0]), int(crop_size[1]))
        if stride is None:
            stride = (max(1, int(crop_size[0]) * 2 // 3), max(1, int(crop_size[1]) * 2 // 3))
    if stride is not None:
        changes["stride"] = (int(stride[0]), int(stride[1]))
    if tta:
        changes.update(scales=TTA_SCALES, flip=True)
    if batch_size:
        changes["batch_size"] = int(batch_size)
    return replace(settings, **changes)


# ------------------------------------------------------------------------------------ files


def _open_session(
    path: Path, threads: int | None, providers: Sequence[str] | None
) -> ort.InferenceSession:
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX file; write one with `segnext export`")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # errors only: ORT's warnings are about graph rewrites
    # No busy-waiting between runs: the numpy work around them (and, on a shared machine, other
    # jobs) would compete with idle spinning threads for the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            str(path), options, providers=list(providers or ort.get_available_providers())
        )
    except Exception as error:  # onnxruntime raises its own exception types per failure
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OnnxModelError(f"{path}: onnxruntime cannot load it as an ONNX model ({first})") from None


def read_metadata(path: Path, session: ort.InferenceSession) -> dict[str, Any]:
    """The JSON `segnext export` stored under metadata key `METADATA_KEY`, checked."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise OnnxModelError(
            f"{path}: an ONNX model without {METADATA_KEY!r} metadata (class names, palette, "
            "normalisation); export it with `segnext export`"
        )
    meta = json.loads(text)
    if meta.get("format") != FORMAT:
        raise OnnxModelError(f"{path}: metadata format {meta.get('format')!r}, this reads {FORMAT}")
    if not isinstance(meta.get("settings"), dict):
        raise OnnxModelError(
            f"{path}: {METADATA_KEY!r} metadata has no 'settings' object; export it again with "
            "`segnext export`"
        )
    return meta


def model_meta(path: Path, metadata: dict[str, Any]) -> ModelMeta:
    """The checkpoint's `ModelMeta` the export stored under "meta". Files exported before it
    was stored carry its flat `ModelMeta.describe()` keys, with normalisation and crop in the
    settings: those are read as they were, checked the same way."""
    raw = metadata.get("meta")
    if raw is None:
        settings = metadata["settings"]
        flat = ("variant", "num_classes", "classifier", "class_names", "palette", "ignore_index")
        raw = {
            **{key: metadata[key] for key in flat if key in metadata},
            "mean": settings.get("mean"),
            "std": settings.get("std"),
            "crop_size": settings.get("crop_size"),
        }
    try:
        return ModelMeta.from_dict(raw, source=str(path))
    except MetaError as error:
        raise OnnxModelError(f"{error} (in its {METADATA_KEY!r} metadata)") from None
