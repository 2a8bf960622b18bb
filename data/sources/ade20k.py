"""ADE20K scene parsing (ADEChallengeData2016): `images/{training,validation}/*.jpg` with
`annotations/{same}/*.png`.

The 150 classes are stored as 1..150 with 0 = "other"; "reduce zero label" maps 0 to the
ignore index and k to k-1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from data.sources.base import (
    IGNORE_INDEX,
    Palette,
    Sample,
    Source,
    SourceError,
    bit_palette,
    label_lut,
    list_images,
    make_samples,
    require_split,
)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip
# our split name -> the folder name in ADEChallengeData2016
SPLIT_FOLDERS = {"train": "training", "val": "validation"}


@dataclass(frozen=True)
class ADE20K(Source):
    """ADE20K (150 classes) under `root` (the ADEChallengeData2016 folder)."""

    root: Path
    name = "ade20k"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))
        if not (self.root / "images").is_dir() or not (self.root / "annotations").is_dir():
            raise SourceError(
                f"{self.root}: not an ADE20K root (needs images/ and annotations/). Fix: pass "
                f"--root pointing at ADEChallengeData2016."
            )

    @property
    def classes(self) -> tuple[str, ...]:
        return ADE20K_CLASSES

    @property
    def palette(self) -> Palette:
        return bit_palette(len(ADE20K_CLASSES))

    @property
    def default_splits(self) -> tuple[str, ...]:
        return tuple(s for s, f in SPLIT_FOLDERS.items() if (self.root / "images" / f).is_dir())

    @cached_property
    def label_lut(self) -> np.ndarray:
        """Reduce zero label: 0 -> ignore, k -> k-1; 255 stays ignore."""
        mapping = {0: IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX}
        mapping.update({k: k - 1 for k in range(1, IGNORE_INDEX)})
        return label_lut(mapping)

    def samples(self, split: str) -> list[Sample]:
        require_split(split, self.default_splits, str(self.root))
        folder = SPLIT_FOLDERS[split]
        images = list_images(self.root / "images" / folder)
        masks = self.root / "annotations" / folder
        return make_samples(((p.stem, p, masks / f"{p.stem}.png") for p in images), str(masks))
