"""CamVid in the SegNet layout: `{split}/X.png` with its mask `{split}annot/X.png`.

Masks hold ids 0..10 (`classes.txt`) and 11 = Unlabelled, which becomes the ignore index.
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

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
# The SegNet colours for the 11 classes.
CAMVID_PALETTE: Palette = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
UNLABELLED_ID = 11
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CamVid(Source):
    """CamVid (SegNet version) under `root`."""

    root: Path
    name = "camvid"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))
        if not (self.root / "train").is_dir():
            raise SourceError(
                f"{self.root}: not a CamVid root (no train/ folder). Fix: pass --root pointing "
                f"at the folder holding train/ trainannot/ val/ valannot/ test/ testannot/."
            )

    @cached_property
    def classes(self) -> tuple[str, ...]:
        """Names from `classes.txt` (lines 'id Name') when present, else the standard ones."""
        path = self.root / "classes.txt"
        if not path.is_file():
            return CAMVID_CLASSES
        names: dict[int, str] = {}
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[int(parts[0])] = parts[1]
        missing = [i for i in range(len(CAMVID_CLASSES)) if i not in names]
        if missing:
            raise SourceError(
                f"{path}: no names for class ids {missing}. Fix: list ids 0..10 as 'id Name' "
                f"lines, or remove the file to use the standard CamVid names."
            )
        return tuple(names[i] for i in range(len(CAMVID_CLASSES)))

    @property
    def palette(self) -> Palette:
        return CAMVID_PALETTE

    @property
    def default_splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if (self.root / s).is_dir())

    @cached_property
    def label_lut(self) -> np.ndarray:
        return label_lut({UNLABELLED_ID: IGNORE_INDEX})

    def samples(self, split: str) -> list[Sample]:
        require_split(split, self.default_splits, str(self.root))
        images = list_images(self.root / split)
        masks = self.root / f"{split}annot"
        return make_samples(((p.stem, p, masks / p.name) for p in images), str(self.root / split))
