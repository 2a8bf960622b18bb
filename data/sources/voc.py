"""PASCAL VOC 2012 segmentation: `JPEGImages/X.jpg`, `SegmentationClass/X.png` (palette PNG
whose indices are the class ids; 255 marks object borders and stays ignored), split lists in
`ImageSets/Segmentation/{split}.txt`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from data.sources.base import (
    Palette,
    Sample,
    Source,
    SourceError,
    bit_palette,
    make_samples,
    require_split,
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


@dataclass(frozen=True)
class VOC(Source):
    """PASCAL VOC 2012 (21 classes) under `root` (the VOC2012 folder)."""

    root: Path
    name = "voc"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))
        if not self._lists.is_dir():
            raise SourceError(
                f"{self.root}: not a VOC2012 root (no ImageSets/Segmentation/). Fix: pass "
                f"--root pointing at VOC2012 (holding JPEGImages/ and SegmentationClass/)."
            )

    @property
    def _lists(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"

    @property
    def classes(self) -> tuple[str, ...]:
        return VOC_CLASSES

    @property
    def palette(self) -> Palette:
        return bit_palette(len(VOC_CLASSES))

    @property
    def default_splits(self) -> tuple[str, ...]:
        return tuple(s for s in ("train", "val") if (self._lists / f"{s}.txt").is_file())

    def samples(self, split: str) -> list[Sample]:
        available = sorted(p.stem for p in self._lists.glob("*.txt"))
        require_split(split, available, str(self._lists))
        ids = (self._lists / f"{split}.txt").read_text().split()
        return make_samples(
            (
                (i, self.root / "JPEGImages" / f"{i}.jpg",
                 self.root / "SegmentationClass" / f"{i}.png")
                for i in ids
            ),
            str(self._lists / f"{split}.txt"),
        )  # fmt: skip
