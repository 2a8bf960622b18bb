"""Any dataset as image + mask folders paired by file stem (`a.jpg` <-> `a.png`), one pair of
folders per split.

The usual layout of exported and downloaded datasets, `ROOT/<split>/{images,masks}`, is read by
`discover_splits`; any other layout is a mapping split -> (images folder, masks folder). Class
names come from a text file (one per line, the line order gives the ids). The dataset's own
ignore id becomes 255, an optional JSON label map (`{"src_id": dst_id}`) renumbers ids, and for
binary datasets `mask_threshold` turns 0/255 or noisy JPEG masks into 0/1 (value > T -> 1).
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
    SKIP_HINT,
    Palette,
    Sample,
    SampleError,
    Source,
    SourceError,
    bit_palette,
    check_class_names,
    check_label_range,
    label_lut,
    list_images,
    make_samples,
    read_mask,
    require_split,
)

Layout = tuple[tuple[str, Path, Path], ...]  # (split, images folder, masks folder)
USUAL_SPLITS = ("train", "val", "test")  # listed first, in this order
BINARY_COLOUR_FIX = (
    "binary masks saved in colour (e.g. JPEG exports) are read as gray with --mask-threshold "
    "127 (value > 127 -> class 1); other colour masks need one id per pixel"
)


@dataclass(frozen=True)
class Folder(Source):
    """Images and masks (8-bit ids) per split: `layout` maps split -> (images, masks) folders
    (a mapping or (split, images, masks) triples; kept as absolute-path triples)."""

    class_names: tuple[str, ...]
    layout: Mapping[str, tuple[Path, Path]] | Layout
    ignore_index: int | None = None
    label_map: Mapping[int, int] = field(default_factory=dict)
    mask_threshold: int | None = None
    name = "folder"

    def __post_init__(self) -> None:
        items = self.layout.items() if isinstance(self.layout, Mapping) else [
            (split, (images, masks)) for split, images, masks in self.layout
        ]  # fmt: skip
        layout = tuple(
            (str(split), Path(os.path.abspath(images)), Path(os.path.abspath(masks)))
            for split, (images, masks) in items
        )
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if not layout:
            raise SourceError(
                "folder source: no splits. Fix: pass --root DIR (with DIR/<split>/images and "
                "DIR/<split>/masks), --split NAME=IMAGES:MASKS, or --images and --masks."
            )
        if not self.class_names:
            raise SourceError("folder source: empty class list. Fix: name at least one class.")
        check_class_names(self.class_names, "folder source")
        if self.ignore_index is not None and not 0 <= self.ignore_index <= 255:
            raise SourceError(  # the id indexes the 256-entry mask lookup table
                f"folder source: --ignore-index {self.ignore_index} is outside 0..255, the ids "
                "an 8-bit mask holds. Fix: pass the id your masks mark as 'don't care'."
            )
        for source_id, target_id in self.label_map.items():
            if not 0 <= source_id <= 255 or not (
                0 <= target_id < len(self.classes) or target_id == IGNORE_INDEX
            ):
                raise SourceError(
                    f"label map entry {source_id} -> {target_id}: ids must be 0..255 and map "
                    f"to 0..{len(self.classes) - 1} or {IGNORE_INDEX}. Fix: correct the map."
                )
        if self.mask_threshold is not None:
            self._check_threshold()

    def _check_threshold(self) -> None:
        problem = ""
        if not 0 <= self.mask_threshold <= 254:
            problem = f"--mask-threshold {self.mask_threshold} is outside 0..254"
        elif len(self.classes) != 2:
            problem = (
                f"--mask-threshold makes binary masks but the class list has "
                f"{len(self.classes)} classes"
            )
        elif self.label_map:
            problem = "--mask-threshold and --label-map both map mask values"
        if problem:
            raise SourceError(
                f"folder source: {problem}. Fix: use --mask-threshold (e.g. 127) only with "
                f"two classes (background, foreground) and without --label-map."
            )

    @classmethod
    def from_files(
        cls,
        classes_file: Path,
        layout: Mapping[str, tuple[Path, Path]],
        *,
        ignore_index: int | None = None,
        label_map_file: Path | None = None,
        mask_threshold: int | None = None,
    ) -> Folder:
        """Build from a class-name file and an optional JSON label-map file."""
        return cls(
            class_names=read_class_names(Path(classes_file)),
            layout=layout,
            ignore_index=ignore_index,
            label_map=read_label_map(Path(label_map_file)) if label_map_file else {},
            mask_threshold=mask_threshold,
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.class_names

    @property
    def palette(self) -> Palette:
        return bit_palette(len(self.classes))

    @property
    def default_splits(self) -> tuple[str, ...]:
        return tuple(split for split, _, _ in self.layout)

    def folders(self, split: str) -> tuple[Path, Path]:
        """(images, masks) folders of `split`."""
        require_split(split, self.default_splits, "folder source")
        return next((images, masks) for name, images, masks in self.layout if name == split)

    def location(self, split: str) -> str:
        images, masks = self.folders(split)
        return f"{images} + {masks}"

    @cached_property
    def label_lut(self) -> np.ndarray:
        """The threshold or the label map, then the dataset's ignore id -> 255 (it wins)."""
        if self.mask_threshold is not None:
            lut = (np.arange(256) > self.mask_threshold).astype(np.uint8)
        else:
            lut = label_lut(self.label_map)
        if self.ignore_index is not None:
            lut[self.ignore_index] = IGNORE_INDEX
        return lut

    def read_raw_mask(self, sample: Sample) -> np.ndarray:
        """With a threshold, colour masks (JPEG exports) are read as their luminance."""
        if self.mask_threshold is not None:
            return read_mask(sample.mask, sample.image, gray=True)
        if len(self.classes) == 2:
            return read_mask(sample.mask, sample.image, colour_fix=BINARY_COLOUR_FIX)
        return read_mask(sample.mask, sample.image)

    def map_labels(self, raw: np.ndarray, path: str) -> np.ndarray:
        """As the base class, but a 2-class dataset whose masks hold values other than 0/1
        (0/255 PNGs, JPEG noise) is an error that suggests --mask-threshold: without it 255
        would silently become 'ignore' and the foreground would never be learnt."""
        if self.mask_threshold is None and len(self.classes) == 2:
            declared = {0, 1, *self.label_map}
            if self.ignore_index is not None:
                declared.add(self.ignore_index)
            values = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
            stray = [int(v) for v in values if int(v) not in declared]
            if stray:
                raise SampleError(
                    f"{path}: mask holds values {stray[:10]}{'...' if len(stray) > 10 else ''} "
                    f"but the dataset has 2 classes (ids 0 and 1). Binary masks stored as 0/255 "
                    f"or as JPEG need a threshold. Fix: pass --mask-threshold 127 (value > 127 "
                    f"-> class 1), or --ignore-index 255 if 255 marks pixels to ignore, "
                    f"{SKIP_HINT}."
                )
        mask = self.label_lut[raw]
        check_label_range(mask, raw, len(self.classes), path)
        return mask

    def unpaired(self, split: str) -> list[dict[str, str]]:
        images, masks = self.folders(split)
        stems = {p.stem for p in list_images(images)}
        return [{"source": str(mask), "reason": f"{mask}: mask without an image in {images}"}
                for mask in list_images(masks) if mask.stem not in stems]

    def samples(self, split: str) -> list[Sample]:
        images, masks = self.folders(split)
        masks_by_stem: dict[str, Path] = {}
        for mask in list_images(masks):
            if mask.stem in masks_by_stem:
                other = masks_by_stem[mask.stem]
                raise SourceError(
                    f"{masks}: two masks for stem '{mask.stem}' ({other.name}, "
                    f"{mask.name}). Fix: keep one mask per image."
                )
            masks_by_stem[mask.stem] = mask
        return make_samples(
            (
                (p.stem, p, masks_by_stem.get(p.stem, masks / f"{p.stem}.png"))
                for p in list_images(images)
            ),
            str(images),
        )


def discover_splits(
    root: Path, images_dir: str = "images", masks_dir: str = "masks"
) -> dict[str, tuple[Path, Path]]:
    """{split: (images, masks)} for every sub-folder `root/<split>` holding both `images_dir`
    and `masks_dir`, the usual splits first; sub-folders holding neither are passed over."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: folder does not exist. Fix: check --root.")
    found: dict[str, tuple[Path, Path]] = {}
    usual = {name: i for i, name in enumerate(USUAL_SPLITS)}
    children = sorted(
        (p for p in root.iterdir() if p.is_dir()),
        key=lambda p: (usual.get(p.name, len(usual)), p.name),
    )
    for child in children:
        images, masks = child / images_dir, child / masks_dir
        if images.is_dir() and masks.is_dir():
            found[child.name] = (images, masks)
        elif images.is_dir() or masks.is_dir():
            have, lack = (images_dir, masks_dir) if images.is_dir() else (masks_dir, images_dir)
            raise SourceError(
                f"{child}: has {have}/ but no {lack}/. Fix: add {child / lack}, move the "
                f"folder out of {root}, or name the sub-folders with --images-dir/--masks-dir."
            )
    if found:
        return found
    if (root / images_dir).is_dir() and (root / masks_dir).is_dir():
        raise SourceError(
            f"{root}: holds {images_dir}/ and {masks_dir}/ itself, not split sub-folders. Fix: "
            f"pass --split train={root / images_dir}:{root / masks_dir}, or move them into "
            f"{root / 'train'}/."
        )
    raise SourceError(
        f"{root}: no split sub-folders <split>/{images_dir}/ + <split>/{masks_dir}/. Fix: "
        f"lay the dataset out as {root}/train/{images_dir}, {root}/train/{masks_dir}, ... or "
        f"name the sub-folders with --images-dir and --masks-dir."
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
    check_class_names(names, str(path))
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
