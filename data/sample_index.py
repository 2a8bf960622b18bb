"""Where every training sample lives: shard, key, and the byte range of its image and mask.

The batch plan (`data.plan`) picks samples by number, in a global order that does not depend on
how shards are read, so readers need random access to single samples. Tar members are stored
contiguously after a 512-byte header; scanning the headers once (seeking past the data, so a
shard costs one small read per member) gives every member's offset and size. The driver builds
the index before any worker starts: a shard that is missing, unreadable or holds other samples
than the manifest says fails there, naming the shard (or, under `on_error="skip"`, is left out
and counted).
"""

from __future__ import annotations

import hashlib
import logging
import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pyarrow import fs as pafs

from data.manifest import Manifest, join_root
from data.samples import FIX_HINT, SampleReadError
from data.storage import resolve_filesystem

logger = logging.getLogger(__name__)

Verify = Literal["size", "sha256", "none"]

# webdataset's key rule: the key is the path up to the first dot of the file name.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
MASK_MEMBER = "mask.png"


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


def checked_shards(
    manifest: Manifest,
    split: str | Sequence[str],
    *,
    verify: Verify = "size",
    record: Callable[[list[dict]], None] | None = None,
) -> tuple[list[ShardFile], pafs.FileSystem]:
    """(shards, filesystem) of `split` (one split or several, in order) whose files match the
    manifest (size, or sha256 too). A mismatch raises `SampleReadError` naming the shard, or,
    with a `record` callback (skip mode), drops the shard and records its samples there."""
    filesystem, base = resolve_filesystem(manifest.root)
    splits = [split] if isinstance(split, str) else list(split)
    good = []
    for name in splits:
        for entry in manifest.split(name)["shards"]:
            path = f"{base}/{entry['path']}"
            url = join_root(manifest.root, entry["path"])
            problem = "" if verify == "none" else _shard_problem(filesystem, path, entry, verify)
            if not problem:
                good.append(ShardFile(path, url, int(entry["num_samples"])))
                continue
            if record is None:
                raise SampleReadError(f"{url}: shard {problem}; {FIX_HINT}")
            logger.warning("skipping shard %s (%s, %d samples)", url, problem,
                           entry["num_samples"])
            record([{"shard": url, "key": "*", "reason": problem,
                     "samples": entry["num_samples"]}])
    if not good:
        raise SampleReadError(
            f"{manifest.root}: no readable shard left in split '{split_label(split)}'"
        )
    return good, filesystem


@dataclass(frozen=True)
class SampleIndex:
    """Column arrays, one entry per sample, in manifest order (splits, shards, tar order)."""

    shard_paths: tuple[str, ...]  # inside `filesystem`
    shard_urls: tuple[str, ...]  # what errors name
    shard: np.ndarray  # int32 index into shard_paths
    keys: tuple[str, ...]
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
            "shard": np.asarray(self.shard_paths, dtype=object)[shard],
            "url": np.asarray(self.shard_urls, dtype=object)[shard],
            "key": np.asarray(self.keys, dtype=object)[samples],
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
    progress: Callable[[int, int], None] | None = None,
) -> tuple[SampleIndex, pafs.FileSystem]:
    """Index the samples of `splits` (read in order, as one). `skip`: shards that are missing,
    damaged or disagree with the manifest are left out and counted in `SampleIndex.skipped`
    instead of raising `SampleReadError`."""
    skipped: list[int] = []
    record = (lambda entries: skipped.extend(int(e["samples"]) for e in entries)) if skip else None
    shards, filesystem = checked_shards(manifest, splits, record=record)
    image_member = f"image.{manifest.image_format}"
    columns: dict[str, list] = {name: [] for name in ("shard", "keys", "image_at", "image_bytes",
                                                       "mask_at", "mask_bytes")}
    paths, urls = [], []
    for number, shard in enumerate(shards):
        try:
            members = _tar_members(filesystem, shard.path, shard.url)
            entries = _samples_of(members, shard.url, image_member)
            if len(entries) != shard.num_samples:
                raise SampleReadError(
                    f"{shard.url}: shard holds {len(entries)} samples, manifest says "
                    f"{shard.num_samples}; {FIX_HINT}"
                )
        except SampleReadError:
            if not skip:
                raise
            skipped.append(shard.num_samples)
            continue
        paths.append(shard.path)
        urls.append(shard.url)
        for key, image, mask in entries:
            columns["shard"].append(len(paths) - 1)
            columns["keys"].append(key)
            columns["image_at"].append(image[0])
            columns["image_bytes"].append(image[1])
            columns["mask_at"].append(mask[0])
            columns["mask_bytes"].append(mask[1])
        if progress is not None:
            progress(number + 1, len(shards))
    if not columns["keys"]:
        raise SampleReadError(f"{manifest.root}: no readable sample left in {splits!r}; {FIX_HINT}")
    as_int64 = {name: np.asarray(columns[name], dtype=np.int64)
                for name in ("image_at", "image_bytes", "mask_at", "mask_bytes")}
    index = SampleIndex(
        shard_paths=tuple(paths), shard_urls=tuple(urls),
        shard=np.asarray(columns["shard"], dtype=np.int32), keys=tuple(columns["keys"]),
        image_member=image_member, skipped=sum(skipped), **as_int64,
    )
    return index, filesystem


def _tar_members(filesystem: pafs.FileSystem, path: str, url: str) -> list[tarfile.TarInfo]:
    """The regular-file members of one tar, from its headers alone."""
    try:
        with filesystem.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            return [member for member in tar.getmembers() if member.isfile()]
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SampleReadError(f"{url}: shard is unreadable ({error}); {FIX_HINT}") from error


def _samples_of(
    members: list[tarfile.TarInfo], url: str, image_member: str
) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """(key, (image offset, size), (mask offset, size)) per sample, in tar order."""
    grouped: dict[str, dict[str, tuple[int, int]]] = {}
    for member in members:
        match = _KEY_SUFFIX.match(member.name)
        if match is None:
            continue
        key, suffix = match.groups()
        parts = grouped.setdefault(key, {})
        if suffix in parts:
            raise SampleReadError(f"{url}: sample '{key}' repeats member '{suffix}'; {FIX_HINT}")
        parts[suffix] = (member.offset_data, member.size)
    entries = []
    for key, parts in grouped.items():
        for needed in (image_member, MASK_MEMBER):
            if needed not in parts:
                raise SampleReadError(f"{url}: sample '{key}' has no '{needed}' member; {FIX_HINT}")
        entries.append((key, parts[image_member], parts[MASK_MEMBER]))
    return entries
