"""What every dataset source provides to the shard writer.

A source knows a dataset's on-disk layout: it lists `Sample`s (key + image path + mask path)
per split, names the classes and their palette, and maps the dataset's raw mask ids to training
ids (0..K-1, 255 = ignore) through a 256-entry lookup table. `Source.load` decodes one sample
and validates it, raising `SampleError` with the file, the problem and the fix, so that the
writer can stop or skip before anything reaches a shard.
"""

from __future__ import annotations

import errno
import io
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SKIP_HINT = "or pass --on-error skip to leave this sample out"

Palette = tuple[tuple[int, int, int], ...]


class DataError(Exception):
    """Bad input data or arguments; the message names the file and the fix."""


class SourceError(DataError):
    """A dataset folder or argument that cannot be read as the named layout."""


class SampleError(DataError):
    """One bad image/mask pair (`--on-error skip` leaves these out)."""


@dataclass(frozen=True)
class Sample:
    """One image/mask pair: `key` is unique within its split and safe as a webdataset key.

    `image` and `mask` are file paths; sources that render their samples (synthetic) put a
    descriptive id there instead and override `Source.load`.
    """

    key: str
    image: str
    mask: str


@dataclass(frozen=True)
class LoadedSample:
    """A decoded, validated sample: RGB image, training-id mask, and the original PNG bytes
    when the source file already is an RGB PNG (so lossless shards can keep it unchanged)."""

    image: Image.Image
    mask: np.ndarray
    rgb_png: bytes | None = None


class Source(ABC):
    """A dataset layout. Subclasses are picklable (they travel to writer processes)."""

    name: str

    @property
    @abstractmethod
    def classes(self) -> tuple[str, ...]:
        """Class names; the index is the training id."""

    @property
    @abstractmethod
    def palette(self) -> Palette:
        """One RGB colour per class, for pictures."""

    @property
    @abstractmethod
    def default_splits(self) -> tuple[str, ...]:
        """Splits written when the user names none."""

    @abstractmethod
    def samples(self, split: str) -> list[Sample]:
        """Samples of `split`, sorted by key; raises SourceError for an unknown split."""

    @property
    def label_lut(self) -> np.ndarray:
        """Raw mask id -> training id (uint8, 256 entries). Identity unless overridden."""
        return np.arange(256, dtype=np.uint8)

    def location(self, split: str) -> str:
        """Where `split`'s files live, for messages (a folder, or the source's name)."""
        return str(getattr(self, "root", self.name))

    def unpaired(self, split: str) -> list[dict[str, str]]:
        """Files of `split` that make no sample (a mask without its image), as the writer's
        skipped entries ({"source", "reason"}): counted and listed, never dropped silently."""
        return []

    def load(self, sample: Sample) -> LoadedSample:
        """Decode and validate one sample; raises SampleError naming the file and the fix."""
        image, rgb_png = read_image(sample.image)
        raw = self.read_raw_mask(sample)
        if raw.shape != (image.height, image.width):
            raise SampleError(
                f"{sample.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but its image "
                f"{sample.image} is {image.width}x{image.height} (width x height). Fix: export "
                f"the mask at the image's size, {SKIP_HINT}."
            )
        return LoadedSample(image=image, mask=self.map_labels(raw, sample.mask), rgb_png=rgb_png)

    def read_raw_mask(self, sample: Sample) -> np.ndarray:
        """The sample's mask as stored ids, before `map_labels`."""
        return read_mask(sample.mask, sample.image)

    def map_labels(self, raw: np.ndarray, path: str) -> np.ndarray:
        """Raw mask ids -> training ids through `label_lut`, range-checked."""
        mask = self.label_lut[raw]
        check_label_range(mask, raw, len(self.classes), path)
        return mask


def read_sample_file(path: str, missing: str) -> bytes:
    """The bytes of one image or mask file. A path that is not a readable file (a folder named
    `x.png`, a symbolic-link loop, no permission) is a SampleError naming it, so that `--on-error
    skip` skips and counts it like any bad sample; `missing` is the message for a missing file."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SampleError(missing) from None
    except IsADirectoryError:
        problem, fix = "is a folder, not a file", f"move or rename it (it is in {Path(path).parent})"
    except OSError as error:
        if error.errno == errno.ELOOP:
            problem, fix = "is a symbolic link loop", "point the link at a file, or remove it"
        else:
            problem, fix = f"cannot be read ({error.strerror})", "make it readable"
    raise SampleError(f"{path}: {problem}. Fix: {fix}, {SKIP_HINT}.")


def read_image(path: str) -> tuple[Image.Image, bytes | None]:
    """Fully decode an image file to RGB; also return its bytes if it already is an RGB PNG."""
    data = read_sample_file(
        path,
        missing=f"{path}: image file does not exist. Fix: restore the file or remove it from the "
        f"split list, {SKIP_HINT}.",
    )
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            is_rgb_png = opened.format == "PNG" and opened.mode == "RGB"
            image = opened if opened.mode == "RGB" else opened.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise SampleError(
            f"{path}: cannot decode image ({error}). Fix: re-export or replace the file, "
            f"{SKIP_HINT}."
        ) from None
    return image, (data if is_rgb_png else None)


COLOUR_MASK_FIX = "convert colour masks to one id per pixel (e.g. with a palette lookup)"


def read_mask(
    path: str, image_path: str, *, gray: bool = False, colour_fix: str = COLOUR_MASK_FIX
) -> np.ndarray:
    """Read an 8-bit label image as its stored ids (palette PNGs: the indices, not colours);
    with `gray`, colour and bilevel masks (binary masks saved as RGB JPEGs) become luminance.
    `colour_fix` is the advice for a colour mask read without `gray`."""
    data = read_sample_file(
        path,
        missing=f"{image_path}: its mask {path} does not exist. Fix: add the mask file, "
        f"{SKIP_HINT}.",
    )
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            mode = opened.mode
            if gray and mode in ("1", "LA", "RGB", "RGBA", "CMYK", "YCbCr"):
                ids = np.asarray(opened.convert("L"))
            else:
                ids = np.asarray(opened) if mode in ("L", "P") else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise SampleError(
            f"{path}: cannot decode mask ({error}). Fix: re-export the mask as an 8-bit PNG, "
            f"{SKIP_HINT}."
        ) from None
    if ids is None:
        raise SampleError(
            f"{path}: mask has image mode {mode}; expected 8-bit class ids (mode L or P). "
            f"Fix: {colour_fix}, {SKIP_HINT}."
        )
    return ids


def check_label_range(mask: np.ndarray, raw: np.ndarray, num_classes: int, path: str) -> None:
    """Raise SampleError if a mapped id is neither a class (0..K-1) nor IGNORE_INDEX."""
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raw_ids = sorted(int(v) for v in np.unique(raw[bad]))
        raise SampleError(
            f"{path}: mask has label ids {raw_ids[:10]} that map outside the "
            f"{num_classes} classes (0..{num_classes - 1}, {IGNORE_INDEX} = ignore). Fix: "
            f"check the dataset type and class list, map them with --label-map or "
            f"--ignore-index, {SKIP_HINT}."
        )


def check_class_names(names: Iterable[str], where: str) -> None:
    """Raise SourceError if a class name repeats (two ids with one name cannot be told apart
    in metrics, pictures or the model card)."""
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise SourceError(
            f"{where}: class names {repeated[:10]} appear more than once. Fix: give every "
            f"class its own name (the order gives the ids)."
        )


def label_lut(mapping: Mapping[int, int]) -> np.ndarray:
    """Identity lookup table with `mapping` applied (ids not mentioned keep their value, so
    unexpected ids are caught by the range check instead of silently becoming a class)."""
    lut = np.arange(256, dtype=np.uint8)
    for source_id, target_id in mapping.items():
        lut[source_id] = target_id
    return lut


def sanitize_key(text: str) -> str:
    """A webdataset-safe key: anything but letters, digits, '_' and '-' becomes '_'
    (a dot would split the key, a slash would make a folder)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def make_samples(pairs: Iterable[tuple[str, Path, Path]], where: str) -> list[Sample]:
    """Samples from (raw key, image path, mask path), sorted by key; duplicate keys after
    sanitising are an error naming both files."""
    by_key: dict[str, Sample] = {}
    for raw_key, image, mask in pairs:
        key = sanitize_key(raw_key)
        if key in by_key:
            raise SourceError(
                f"{where}: {by_key[key].image} and {image} both give the sample key '{key}'. "
                f"Fix: rename one of them so the names differ in more than punctuation."
            )
        by_key[key] = Sample(key=key, image=str(image), mask=str(mask))
    return [by_key[key] for key in sorted(by_key)]


def bit_palette(num_classes: int) -> Palette:
    """The PASCAL VOC colour map (bits of the class id spread over R, G, B), any length."""
    colours = []
    for class_id in range(num_classes):
        r = g = b = 0
        value = class_id
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted; a missing folder is a SourceError."""
    if not folder.is_dir():
        raise SourceError(f"{folder}: folder does not exist. Fix: check the dataset root path.")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def require_split(split: str, available: Iterable[str], where: str) -> None:
    """Raise SourceError if `split` is not one of `available`."""
    available = tuple(available)
    if split not in available:
        raise SourceError(
            f"{where}: no split '{split}' (available: {', '.join(available) or 'none'}). "
            f"Fix: pass --splits with some of the available ones."
        )
