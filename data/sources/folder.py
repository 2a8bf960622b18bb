"""Any dataset as two folders: images and masks paired by file stem (`a.jpg` <-> `a.png`).

Class names come from a text file (one per line, the line order gives the ids). The dataset's
own ignore id becomes 255 and an optional JSON label map (`{"src_id": dst_id}`) renumbers ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Folder(Source):
    """Images in `images`, masks (8-bit ids) in `masks`, all in one split named `split`."""

    images: Path
    masks: Path
    class_names: tuple[str, ...]
    ignore_index: int | None = None
    label_map: Mapping[int, int] = field(default_factory=dict)
    split: str = "train"
    name = "folder"

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", Path(os.path.abspath(self.images)))
        object.__setattr__(self, "masks", Path(os.path.abspath(self.masks)))
        if not self.class_names:
            raise SourceError("folder source: empty class list. Fix: name at least one class.")
        for source_id, target_id in self.label_map.items():
            if not 0 <= source_id <= 255 or not (
                0 <= target_id < len(self.classes) or target_id == IGNORE_INDEX
            ):
                raise SourceError(
                    f"label map entry {source_id} -> {target_id}: ids must be 0..255 and map "
                    f"to 0..{len(self.classes) - 1} or {IGNORE_INDEX}. Fix: correct the map."
                )

    @classmethod
    def from_files(
        cls,
        images: Path,
        masks: Path,
        classes_file: Path,
        *,
        ignore_index: int | None = None,
        label_map_file: Path | None = None,
        split: str = "train",
    ) -> Folder:
        """Build from a class-name file and an optional JSON label-map file."""
        return cls(
            images=images,
            masks=masks,
            class_names=read_class_names(Path(classes_file)),
            ignore_index=ignore_index,
            label_map=read_label_map(Path(label_map_file)) if label_map_file else {},
            split=split,
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.class_names

    @property
    def palette(self) -> Palette:
        return bit_palette(len(self.classes))

    @property
    def default_splits(self) -> tuple[str, ...]:
        return (self.split,)

    @cached_property
    def label_lut(self) -> np.ndarray:
        """The label map, then the dataset's ignore id -> 255 (the ignore id wins)."""
        mapping = dict(self.label_map)
        if self.ignore_index is not None:
            mapping[self.ignore_index] = IGNORE_INDEX
        return label_lut(mapping)

    def samples(self, split: str) -> list[Sample]:
        require_split(split, self.default_splits, str(self.images))
        masks_by_stem: dict[str, Path] = {}
        for mask in list_images(self.masks):
            if mask.stem in masks_by_stem:
                other = masks_by_stem[mask.stem]
                raise SourceError(
                    f"{self.masks}: two masks for stem '{mask.stem}' ({other.name}, "
                    f"{mask.name}). Fix: keep one mask per image."
                )
            masks_by_stem[mask.stem] = mask
        return make_samples(
            (
                (p.stem, p, masks_by_stem.get(p.stem, self.masks / f"{p.stem}.png"))
                for p in list_images(self.images)
            ),
            str(self.images),
        )


def read_class_names(path: Path) -> tuple[str, ...]:
    """One class name per line (line order = id); blank lines and '#' comments are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise SourceError(
            f"{path}: cannot read the class list ({error}). Fix: pass --classes "
            f"with a text file holding one class name per line."
        ) from None
    names = tuple(s for s in (line.split("#", 1)[0].strip() for line in lines) if s)
    if not names:
        raise SourceError(f"{path}: no class names. Fix: write one class name per line.")
    return names


def read_label_map(path: Path) -> dict[int, int]:
    """A JSON object {"source id": target id}."""
    try:
        raw = json.loads(path.read_text())
        return {int(k): int(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise SourceError(
            f"{path}: not a label map ({error}). Fix: write a JSON object such as "
            f'{{"11": 255, "12": 3}} (source id -> class id or 255).'
        ) from None
