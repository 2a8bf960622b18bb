"""Synthetic scenes: a textured background and randomly placed shapes, one class per kind.

Made to check the whole pipeline in minutes: a small model should reach a high mIoU, yet two
pairs of classes are deliberately close so that confusion metrics have something to find:
`disc_red`/`disc_orange` differ only by a small colour shift, `box_plain`/`box_dotted` only by a
dot texture. Each sample is rendered from (seed, split, index), so any process renders the same
pixels and the dataset is reproducible without storing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.sources.base import (
    LoadedSample,
    Palette,
    Sample,
    Source,
    SourceError,
    require_split,
)

# name, shape, base colour, texture; the first K rows are the classes of a K-class dataset
CLASS_TABLE = (
    ("background", "none", (112, 108, 100), "none"),
    ("disc_red", "disc", (205, 45, 45), "none"),
    ("disc_orange", "disc", (205, 95, 45), "none"),
    ("box_plain", "box", (50, 85, 200), "none"),
    ("box_dotted", "box", (50, 85, 200), "dots"),
    ("triangle", "triangle", (60, 175, 75), "none"),
    ("stripes", "band", (225, 205, 50), "stripes"),
    ("ring", "ring", (160, 70, 185), "none"),
)
CONFUSING_PAIRS = ((1, 2), (3, 4))
MIN_CLASSES, MAX_CLASSES = 6, 8
SPLIT_IDS = {"train": 0, "val": 1}
OBJECTS_PER_IMAGE = (3, 7)  # [low, high)
BACKGROUND_JITTER = 15.0  # per image and channel
COLOUR_JITTER = 10.0  # per object and channel, well below the 50-level cue of disc_orange
PIXEL_NOISE = 6.0
DOT_FACTOR = 0.6  # brightness of box_dotted's dots


@dataclass(frozen=True)
class Synthetic(Source):
    """`num_train` + `num_val` scenes of `size` (H, W) pixels with `num_classes` classes."""

    num_train: int = 512
    num_val: int = 64
    size: tuple[int, int] = (128, 128)
    seed: int = 0
    num_classes: int = 7
    name = "synthetic"

    def __post_init__(self) -> None:
        if not MIN_CLASSES <= self.num_classes <= MAX_CLASSES:
            raise SourceError(
                f"synthetic: --num-classes {self.num_classes} is not supported. Fix: pick "
                f"{MIN_CLASSES}..{MAX_CLASSES}."
            )
        if min(self.size) < 32 or self.num_train < 0 or self.num_val < 0 or self.seed < 0:
            raise SourceError(
                f"synthetic: size {self.size}, counts ({self.num_train}, {self.num_val}) and "
                f"seed {self.seed} must be >= (32, 32), >= 0 and >= 0. Fix: adjust them."
            )

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(row[0] for row in CLASS_TABLE[: self.num_classes])

    @property
    def palette(self) -> Palette:
        return tuple(row[2] for row in CLASS_TABLE[: self.num_classes])

    @property
    def confusing_pairs(self) -> tuple[tuple[int, int], ...]:
        """Class-id pairs that differ only by a small cue (colour shift, texture)."""
        return CONFUSING_PAIRS

    @property
    def default_splits(self) -> tuple[str, ...]:
        return tuple(SPLIT_IDS)

    def samples(self, split: str) -> list[Sample]:
        require_split(split, self.default_splits, "synthetic")
        count = self.num_train if split == "train" else self.num_val
        return [
            Sample(
                key=f"{split}_{i:06d}",
                image=f"synthetic:seed={self.seed}:{split}:{i}",
                mask=f"synthetic:seed={self.seed}:{split}:{i}:mask",
            )
            for i in range(count)
        ]

    def load(self, sample: Sample) -> LoadedSample:
        split, index = sample.key.rsplit("_", 1)
        image, mask = self.render(split, int(index))
        return LoadedSample(image=Image.fromarray(image), mask=mask)

    def render(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 image and (H, W) uint8 mask of one scene; later shapes occlude."""
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        height, width = self.size
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        image = np.asarray(CLASS_TABLE[0][2], np.float32) + rng.uniform(
            -BACKGROUND_JITTER, BACKGROUND_JITTER, 3
        )
        image = image + 18.0 * _smooth_field(rng, height, width)
        mask = np.zeros((height, width), np.uint8)
        for _ in range(int(rng.integers(*OBJECTS_PER_IMAGE))):
            class_id = int(rng.integers(1, self.num_classes))
            _, shape, colour, texture = CLASS_TABLE[class_id]
            region = _shape(shape, rng, yy, xx, min(height, width))
            fill = np.asarray(colour, np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
            image[region] = fill * _texture(texture, rng, yy[region], xx[region])
            mask[region] = class_id
        image += PIXEL_NOISE * rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int = 4) -> np.ndarray:
    """Low-frequency colour noise: a (cells+1)^2 random grid, bilinearly upsampled."""
    grid = rng.standard_normal((cells + 1, cells + 1, 3), dtype=np.float32)
    rows = np.tensordot(_linear_weights(height, cells), grid, axes=(1, 0))  # (H, cells+1, 3)
    return np.einsum("hjc,wj->hwc", rows, _linear_weights(width, cells), optimize=True)


def _linear_weights(length: int, cells: int) -> np.ndarray:
    """(length, cells+1) linear-interpolation weights from a coarse grid to `length` pixels."""
    position = np.linspace(0, cells, length, dtype=np.float32)
    distance = np.abs(position[:, None] - np.arange(cells + 1, dtype=np.float32)[None, :])
    return np.maximum(0.0, 1.0 - distance)


def _shape(
    shape: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, side: int
) -> np.ndarray:
    """Boolean region of one randomly placed shape."""
    cy, cx = rng.uniform(0, yy.shape[0]), rng.uniform(0, yy.shape[1])
    if shape in ("disc", "ring"):
        radius = rng.uniform(0.08, 0.18) * side
        dist2 = (yy - cy) ** 2 + (xx - cx) ** 2
        inner = (0.55 * radius) ** 2 if shape == "ring" else -1.0
        return (dist2 <= radius**2) & (dist2 > inner)
    if shape in ("box", "band"):
        if shape == "box":
            half = rng.uniform(0.08, 0.2, 2) * side
        else:  # long and thin, horizontal or vertical
            half = np.array([rng.uniform(0.05, 0.1), rng.uniform(0.2, 0.35)]) * side
            half = half[::-1] if rng.random() < 0.5 else half
        return (np.abs(yy - cy) <= half[0]) & (np.abs(xx - cx) <= half[1])
    if shape == "triangle":
        radius = rng.uniform(0.1, 0.22) * side
        angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
        vy, vx = cy + radius * np.sin(angles), cx + radius * np.cos(angles)
        edges = [
            (vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i])
            for i, j in ((0, 1), (1, 2), (2, 0))
        ]
        return (edges[0] >= 0) & (edges[1] >= 0) & (edges[2] >= 0)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Brightness factor (N, 1) of the pixels at (yy, xx) for a texture, random phase."""
    phase = rng.integers(0, 8, 2)
    if texture == "dots":  # 2x2 dark dots every 5 pixels
        dots = (((yy + phase[0]) % 5) < 2) & (((xx + phase[1]) % 5) < 2)
        factor = np.where(dots, DOT_FACTOR, 1.0)
    elif texture == "stripes":  # diagonal stripes, 8 pixels per period
        factor = np.where(((yy + xx + phase[0]) % 8) < 4, 1.0, 0.35)
    else:
        factor = np.ones_like(yy)
    return factor[..., None].astype(np.float32)
