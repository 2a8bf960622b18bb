"""Cityscapes fine annotations: `leftImg8bit/{split}/{city}/X_leftImg8bit.png` with
`gtFine/{split}/{city}/X_gtFine_labelIds.png`.

The 34 label ids (0..33) map to the 19 evaluation classes ("trainIds"); every other label id
is ignored.
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
    label_lut,
    list_images,
    make_samples,
    require_split,
)

# (name, labelId, colour) for the 19 trainIds, in trainId order
CITYSCAPES_CLASSES = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
NUM_LABEL_IDS = 34  # label ids 0..33 are defined; larger values are not Cityscapes labels
SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit"
MASK_SUFFIX = "_gtFine_labelIds.png"


@dataclass(frozen=True)
class Cityscapes(Source):
    """Cityscapes (19 classes) under `root` (holding leftImg8bit/ and gtFine/)."""

    root: Path
    name = "cityscapes"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))
        if not (self.root / "leftImg8bit").is_dir() or not (self.root / "gtFine").is_dir():
            raise SourceError(
                f"{self.root}: not a Cityscapes root (needs leftImg8bit/ and gtFine/). Fix: "
                f"pass --root pointing at the folder holding both."
            )

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in CITYSCAPES_CLASSES)

    @property
    def palette(self) -> Palette:
        return tuple(colour for _, _, colour in CITYSCAPES_CLASSES)

    @property
    def default_splits(self) -> tuple[str, ...]:
        """train and val; test is only written on request (its public masks are empty)."""
        return tuple(s for s in SPLITS[:2] if (self.root / "leftImg8bit" / s).is_dir())

    @cached_property
    def label_lut(self) -> np.ndarray:
        mapping = dict.fromkeys(range(NUM_LABEL_IDS), IGNORE_INDEX)
        mapping.update({label_id: i for i, (_, label_id, _) in enumerate(CITYSCAPES_CLASSES)})
        return label_lut(mapping)

    def samples(self, split: str) -> list[Sample]:
        available = [s for s in SPLITS if (self.root / "leftImg8bit" / s).is_dir()]
        require_split(split, available, str(self.root / "leftImg8bit"))
        images_root = self.root / "leftImg8bit" / split
        pairs = []
        for city in sorted(p for p in images_root.iterdir() if p.is_dir()):
            for image in list_images(city):
                base = image.stem.removesuffix(IMAGE_SUFFIX)
                mask = self.root / "gtFine" / split / city.name / f"{base}{MASK_SUFFIX}"
                pairs.append((base, image, mask))
        return make_samples(pairs, str(images_root))
