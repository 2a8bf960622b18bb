"""Where every training sample lives: shard, key, and the byte range of its image and mask.

The batch plan (`data.plan`) picks samples by number, in a global order that does not depend on
how shards are read, so readers need random access to single samples. The driver builds this
index before any worker starts, from each split's index file (`data.shard_index`: one read per
split, whatever its size) and one stat per shard (many at once): a shard that is missing, cut
short or disagrees with the manifest fails there, naming the shard (or, under
`on_error="skip"`, is left out and counted).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pyarrow import fs as pafs

from data.manifest import Manifest, join_root
from data.samples import FIX_HINT, SampleReadError
from data.shard_index import SCAN_THREADS, load_split_index
from data.storage import resolve_filesystem

logger = logging.getLogger(__name__)

Verify = Literal["size", "sha256", "none"]



def split_label(split: str | Sequence[str]) -> str:
    """One name for one split or several read as one ("train+val")."""
    return split if isinstance(split, str) else "+".join(split)


def _shard_problem(filesystem: pafs.FileSystem, path: str, expected: dict, verify: Verify) -> str:
    """Why the shard at `path` does not match its manifest entry ("" when it does)."""
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        return "missing"
    if info.size != expected["bytes"]:
        return f"{info.size} bytes, manifest says {expected['bytes']} (truncated or rewritten)"
    if verify == "sha256":
        digest = hashlib.sha256()
        with filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != expected["sha256"]:
            return "sha256 differs from the manifest (corrupt or rewritten)"
    return ""


@dataclass(frozen=True)
class ShardFile:
    """One shard of a split as readers open it."""

    path: str  # inside `filesystem` (no scheme)
    url: str  # what errors name: a local path or the full URI
    num_samples: int
    split: str = ""
    position: int = 0  # in the split's shard list (the index's `shard` column)
    entry: dict | None = field(default=None, compare=False, repr=False)  # manifest entry


def checked_shards(
    manifest: Manifest,
    split: str | Sequence[str],
    *,
    verify: Verify = "size",
    record: Callable[[list[dict]], None] | None = None,
) -> tuple[list[ShardFile], pafs.FileSystem]:
    """(shards, filesystem) of `split` (one split or several, in order) whose files match the
    manifest (size, or sha256 too; SCAN_THREADS checked at once, one stat each). A mismatch
    raises `SampleReadError` naming the shard, or, with a `record` callback (skip mode), drops
    the shard and records its samples there."""
    filesystem, base = resolve_filesystem(manifest.root)
    splits = [split] if isinstance(split, str) else list(split)
    shards = [
        ShardFile(f"{base}/{entry['path']}", join_root(manifest.root, entry["path"]),
                  int(entry["num_samples"]), name, position, entry)
        for name in splits for position, entry in enumerate(manifest.split(name)["shards"])
    ]
    if verify == "none":
        problems = [""] * len(shards)
    else:
        with ThreadPoolExecutor(SCAN_THREADS) as pool:
            problems = list(pool.map(
                lambda shard: _shard_problem(filesystem, shard.path, shard.entry, verify), shards))
    good = []
    for shard, problem in zip(shards, problems, strict=True):
        if not problem:
            good.append(shard)
            continue
        if record is None:
            raise SampleReadError(f"{shard.url}: shard {problem}; {FIX_HINT}")
        logger.warning("skipping shard %s (%s, %d samples)", shard.url, problem, shard.num_samples)
        record([{"shard": shard.url, "key": "*", "reason": problem,
                 "samples": shard.num_samples}])
    if not good:
        raise SampleReadError(
            f"{manifest.root}: no readable shard left in split '{split_label(split)}'"
        )
    return good, filesystem


@dataclass(frozen=True)
class SampleIndex:
    """Column arrays, one entry per sample, in manifest order (splits, shards, tar order).

    Arrays rather than Python lists: a million samples hold about 110 MB here (keys the most)
    and `rows` costs what it selects, not what the index holds."""

    shard_paths: np.ndarray  # object: paths inside `filesystem`
    shard_urls: np.ndarray  # object: what errors name
    shard_bytes: np.ndarray  # int64 per shard (the cache's unit)
    shard: np.ndarray  # int32 index into shard_paths
    keys: np.ndarray  # object
    image_at: np.ndarray  # int64 byte offset of the image member's data
    image_bytes: np.ndarray
    mask_at: np.ndarray
    mask_bytes: np.ndarray
    image_member: str
    skipped: int = 0  # samples of shards left out under on_error="skip"

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        """The columns readers need for `samples` (sample numbers), as arrays."""
        shard = self.shard[samples]
        return {
            "shard": self.shard_paths[shard],
            "url": self.shard_urls[shard],
            "shard_bytes": self.shard_bytes[shard],
            "key": self.keys[samples],
            "image_at": self.image_at[samples],
            "image_bytes": self.image_bytes[samples],
            "mask_at": self.mask_at[samples],
            "mask_bytes": self.mask_bytes[samples],
        }


def build_sample_index(
    manifest: Manifest,
    splits: str | Sequence[str],
    *,
    skip: bool = False,
) -> tuple[SampleIndex, pafs.FileSystem]:
    """Index the samples of `splits` (read in order, as one). `skip`: shards that are missing,
    damaged or disagree with the manifest are left out and counted in `SampleIndex.skipped`
    instead of raising `SampleReadError`."""
    names = [splits] if isinstance(splits, str) else list(splits)
    skipped: list[int] = []
    record = (lambda entries: skipped.extend(int(e["samples"]) for e in entries)) if skip else None
    shards, filesystem = checked_shards(manifest, names, record=record)
    _, base = resolve_filesystem(manifest.root)
    image_member = f"image.{manifest.image_format}"
    good = {(shard.split, shard.position): shard for shard in shards}
    kept: list[ShardFile] = []
    pieces: list[dict[str, np.ndarray]] = []
    for name in names:
        table, problems = load_split_index(manifest, name, filesystem, base, image_member)
        for position, error in problems.items():
            if (name, position) not in good:
                continue  # already left out (and counted) by the stat check
            if not skip:
                raise error
            logger.warning("skipping shard: %s", error)
            skipped.append(good.pop((name, position)).num_samples)
        columns = {column: table.column(column).to_numpy() for column in table.column_names}
        renumber = np.full(len(manifest.split(name)["shards"]), -1, dtype=np.int32)
        for position in range(len(renumber)):
            if (name, position) in good:
                renumber[position] = len(kept)
                kept.append(good[(name, position)])
        shard = renumber[columns["shard"]]
        keep = shard >= 0
        pieces.append({**{column: values[keep] for column, values in columns.items()},
                       "shard": shard[keep]})
    joined = {column: np.concatenate([piece[column] for piece in pieces])
              for column in pieces[0]}
    if not len(joined["key"]):
        raise SampleReadError(f"{manifest.root}: no readable sample left in {splits!r}; {FIX_HINT}")
    index = SampleIndex(
        shard_paths=np.asarray([shard.path for shard in kept], dtype=object),
        shard_urls=np.asarray([shard.url for shard in kept], dtype=object),
        shard_bytes=np.asarray([shard.entry["bytes"] for shard in kept], dtype=np.int64),
        shard=joined["shard"].astype(np.int32), keys=joined["key"].astype(object),
        image_at=joined["image_at"].astype(np.int64),
        image_bytes=joined["image_bytes"].astype(np.int64),
        mask_at=joined["mask_at"].astype(np.int64),
        mask_bytes=joined["mask_bytes"].astype(np.int64),
        image_member=image_member, skipped=sum(skipped),
    )
    return index, filesystem
