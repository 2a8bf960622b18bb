"""One webdataset sample -> fixed-size uint8 arrays: the per-sample step of both loaders.

`SamplePipeline` decodes a sample's raw members, names the shard and key in every error, checks
the mask (8-bit, same size, ids < K or ignore) and applies the train or eval transform.
Augmentation draws from a generator seeded by (seed, epoch, key), so a sample gets the same
augmentation in the same epoch in the Ray stream and in the plain loader, whatever worker, task
or batch it lands in. numpy + PIL only: Ray Data workers import this without torch.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.manifest import Manifest
from data.sources.base import SampleError
from data.transforms import EvalTransform, TrainTransform

FIX_HINT = "rebuild the shards with `segnext shards ...` or pass on_error='skip' to leave it out"


class SampleReadError(SampleError):
    """A shard member that cannot be decoded or is not a valid image/mask pair."""


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator for one sample in one epoch: independent of scheduling and batching."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def _decode(data: object, member: str, shard: str, key: str) -> Image.Image:
    if not isinstance(data, bytes):
        raise SampleReadError(f"{shard}: sample '{key}' has no '{member}' member; {FIX_HINT}")
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise SampleReadError(
            f"{shard}: sample '{key}': cannot decode '{member}' ({error}); {FIX_HINT}"
        ) from error
    return picture


@dataclass(frozen=True)
class SamplePipeline:
    """Decode + validate + transform one sample into fixed-size uint8 arrays.

    Train output: {"image" (H, W, 3), "mask" (H, W)} at crop size. Eval output adds the
    original "height" and "width". `num_classes` lets it reject masks with unknown ids.
    """

    transform: TrainTransform | EvalTransform
    image_member: str
    num_classes: int
    ignore_index: int = 255
    seed: int = 0

    @property
    def train(self) -> bool:
        return isinstance(self.transform, TrainTransform)

    @property
    def output_size(self) -> tuple[int, int]:
        """(h, w) of every output sample."""
        if isinstance(self.transform, TrainTransform):
            return tuple(self.transform.crop_size)
        return tuple(self.transform.pad_size)

    def __call__(
        self, sample: dict[str, object], *, shard: str, key: str, epoch: int = 0
    ) -> dict[str, np.ndarray | int]:
        picture = _decode(sample.get(self.image_member), self.image_member, shard, key)
        image = np.array(picture if picture.mode == "RGB" else picture.convert("RGB"))
        label = _decode(sample.get("mask.png"), "mask.png", shard, key)
        if label.mode != "L":
            raise SampleReadError(
                f"{shard}: sample '{key}': mask.png is mode {label.mode}, expected 8-bit gray "
                f"(L); {FIX_HINT}"
            )
        mask = np.array(label)
        if mask.shape != image.shape[:2]:
            raise SampleReadError(
                f"{shard}: sample '{key}': mask {mask.shape} and image {image.shape[:2]} "
                f"differ in size; {FIX_HINT}"
            )
        counts = np.bincount(mask.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        if counts[self.num_classes :].any():
            bad = int(np.flatnonzero(counts[self.num_classes :])[0]) + self.num_classes
            raise SampleReadError(
                f"{shard}: sample '{key}': mask holds id {bad}, outside 0..{self.num_classes - 1} "
                f"and not ignore ({self.ignore_index}); {FIX_HINT}"
            )
        if isinstance(self.transform, TrainTransform):
            image, mask = self.transform(image, mask, sample_rng(self.seed, epoch, key))
            return {"image": image, "mask": mask}
        height, width = mask.shape
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "height": height, "width": width}


def build_pipeline(
    manifest: Manifest,
    *,
    train: bool,
    crop_size: tuple[int, int],
    scale: tuple[int, int] | None = None,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    seed: int = 0,
) -> SamplePipeline:
    """The SamplePipeline for a manifest (data.manifest.Manifest) and the recipe knobs."""
    ignore_index = manifest.ignore_index
    if train:
        transform = TrainTransform(
            crop_size=tuple(crop_size),
            scale=scale,
            ratio_range=tuple(ratio_range),
            cat_max_ratio=cat_max_ratio,
            ignore_index=ignore_index,
        )
    else:
        transform = EvalTransform(pad_size=tuple(crop_size), scale=scale, ignore_index=ignore_index)
    return SamplePipeline(
        transform=transform,
        image_member=f"image.{manifest.image_format}",
        num_classes=len(manifest.classes),
        ignore_index=ignore_index,
        seed=seed,
    )
