"""The shard format: the manifest (dataset.json) and the one tar reader of shards.

Layout (a contract between `data/shard_writer.py`, `data/shard_verify.py` and the readers in
`data/`): `OUT/{split}-{000000..}.tar` holding, per sample, `{key}.image.jpg|png` (RGB),
`{key}.mask.png` (8-bit ids, 255 = ignore) and `{key}.json`, plus `OUT/dataset.json` describing
classes, palette, splits, shard checksums, image sizes and skipped samples. Readers trust only
the manifest: a shard file it does not list does not exist for them. Kept apart from the writer
so that readers (Ray Data workers included) import neither the writer nor the verifier.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from data.sources.base import DataError
from data.storage import resolve_filesystem

FORMAT = "segnext-shards/1"
MANIFEST_NAME = "dataset.json"
MASK_MEMBER = "mask.png"
JSON_MEMBER = "json"
IMAGE_FORMATS = ("jpg", "png")


class ManifestError(DataError):
    """A missing or malformed dataset.json."""


@dataclass(frozen=True)
class Manifest:
    """The parsed dataset.json; `root` is where it was read from (a local dir or a URI).

    `splits` keeps the JSON structure: {split: {"num_samples", "shards": [{"path",
    "num_samples", "bytes", "sha256"}], "skipped": [{"source", "reason"}], "image_size":
    {"min": [h, w], "max": [h, w]}, "index": {"path", "bytes", "sha256"}}}; "image_size" and
    "index" (`data.shard_index`) are absent in manifests written before they were recorded,
    and for empty splits. Accessors taking `split` also take a list of splits.
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    image_format: str
    splits: dict[str, dict]
    class_pixel_counts: dict[str, list[int]]
    root: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> dict:
        """The split's entry; a clear error when the dataset has no such split."""
        if split not in self.splits:
            raise ManifestError(
                f"{self.root}: no split '{split}' (has: {', '.join(self.splits)}). Fix: build "
                f"it with `segnext shards ... --splits {split}` or pick an existing split."
            )
        return self.splits[split]

    def _entries(self, split: str | Sequence[str]) -> list[dict]:
        return [self.split(name) for name in ([split] if isinstance(split, str) else split)]

    def shard_urls(self, split: str | Sequence[str]) -> list[str]:
        """Full paths (local) or URIs (s3://, gs://) of the split's shards, in order."""
        return [
            join_root(self.root, shard["path"])
            for entry in self._entries(split)
            for shard in entry["shards"]
        ]

    def num_samples(self, split: str | Sequence[str]) -> int:
        return sum(entry["num_samples"] for entry in self._entries(split))

    def min_image_size(self, split: str | Sequence[str]) -> tuple[int, int] | None:
        """(smallest height, smallest width) over the split's images (not necessarily of one
        image); None when the manifest does not record sizes or the split is empty."""
        return self._image_size(split, "min", min)

    def max_image_size(self, split: str | Sequence[str]) -> tuple[int, int] | None:
        """(largest height, largest width) over the split's images, or None as above."""
        return self._image_size(split, "max", max)

    def _image_size(
        self, split: str | Sequence[str], which: str, pick: Callable
    ) -> tuple[int, int] | None:
        sizes = [entry.get("image_size") for entry in self._entries(split)]
        if not sizes or any(size is None for size in sizes):
            return None
        return (pick(s[which][0] for s in sizes), pick(s[which][1] for s in sizes))

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "classes": list(self.classes),
            "palette": [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
            "image_format": self.image_format,
            "splits": self.splits,
            "class_pixel_counts": self.class_pixel_counts,
        }

    @classmethod
    def from_dict(cls, data: Mapping, root: str = "") -> Manifest:
        """Parse and check the structure, so that a broken file fails here, by name."""
        where = join_root(root, MANIFEST_NAME)
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ManifestError(
                f"{where}: format {found!r}, expected {FORMAT!r}. Fix: rebuild the shards "
                f"with `segnext shards`."
            )
        try:
            return cls(
                name=str(data["name"]),
                classes=tuple(str(c) for c in data["classes"]),
                palette=tuple(tuple(int(v) for v in c) for c in data["palette"]),
                ignore_index=int(data["ignore_index"]),
                image_format=str(data["image_format"]),
                splits={str(split): _parse_split(info) for split, info in data["splits"].items()},
                class_pixel_counts={
                    str(k): [int(c) for c in v] for k, v in data["class_pixel_counts"].items()
                },
                root=root,
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise ManifestError(
                f"{where}: malformed manifest ({type(error).__name__}: {error}). Fix: rebuild "
                f"the shards with `segnext shards`."
            ) from None


def _parse_split(info: Mapping) -> dict:
    entry = {
        "num_samples": int(info["num_samples"]),
        "shards": [
            {
                "path": str(shard["path"]),
                "num_samples": int(shard["num_samples"]),
                "bytes": int(shard["bytes"]),
                "sha256": str(shard["sha256"]),
            }
            for shard in info["shards"]
        ],
        "skipped": [dict(item) for item in info.get("skipped", [])],
    }
    if info.get("index") is not None:  # absent in manifests written before indexes
        index = info["index"]
        entry["index"] = {"path": str(index["path"]), "bytes": int(index["bytes"]),
                          "sha256": str(index["sha256"])}
    if info.get("image_size") is not None:
        size = info["image_size"]
        entry["image_size"] = {
            which: [int(size[which][0]), int(size[which][1])] for which in ("min", "max")
        }
    return entry


def join_root(root: str, relative: str) -> str:
    """`root/relative` for a URI or a local dir (kept as given, no normalisation of URIs)."""
    return f"{root.rstrip('/')}/{relative}" if root else relative


def load_manifest(root: str | os.PathLike) -> Manifest:
    """Read `root/dataset.json` from a local dir or an s3:// / gs:// URI."""
    text = os.fspath(root)
    root_name = text.rstrip("/") if "://" in text else os.path.abspath(text)
    filesystem, base = resolve_filesystem(text)
    where = join_root(root_name, MANIFEST_NAME)
    try:
        with filesystem.open_input_stream(f"{base}/{MANIFEST_NAME}") as stream:
            data = json.loads(stream.read())
    except FileNotFoundError:
        raise ManifestError(
            f"{where}: not found. Fix: build shards with `segnext shards <source> --out "
            f"{text}`, or point at the folder that holds {MANIFEST_NAME}."
        ) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ManifestError(
            f"{where}: not valid JSON ({error}). Fix: rebuild the shards."
        ) from None
    return Manifest.from_dict(data, root=root_name)


# ----------------------------------------------------------------------------- reading


def iter_tar_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, object]]:
    """Raw samples ({"__key__", "__url__", member suffix: bytes}) of one open shard stream.

    The one tar reader of the verifier and the plain loader: webdataset's expander and key
    grouping, so both read exactly what webdataset-based training code reads. Errors propagate
    (tarfile.TarError, OSError, ValueError for a repeated member); `tar_error_text` words them.
    """
    # webdataset imports torch (1.85 CPU-s, see data.shard_writer._write_shard): on first use
    from webdataset.tariterators import group_by_keys, tar_file_expander

    yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def tar_error_text(error: BaseException) -> str:
    """The reason of a tar read error without the stream reprs webdataset appends to args."""
    text = str(error.args[0]) if error.args else type(error).__name__
    return text.split(" @ ")[0]
