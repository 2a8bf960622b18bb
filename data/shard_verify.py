"""The shard verifier: `segnext shards verify` re-reads shards against their manifest.

Every shard's size and sha256, every member decoded, mask ids within the classes, sample,
pixel-count and image-size totals as recorded: what a reader would trip over, found in one
pass and listed, not one error at a time. Reads through the same filesystem and tar reader as
training (data.storage, data.manifest.iter_tar_samples), so local, s3:// and gs:// alike.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
from PIL import Image
from tqdm import tqdm

from data.manifest import (
    JSON_MEMBER,
    MASK_MEMBER,
    Manifest,
    iter_tar_samples,
    load_manifest,
    tar_error_text,
)
from data.samples import SampleReadError
from data.shard_index import SampleEntry, index_table, load_split_index, scan_members
from data.sources.base import DataError
from data.storage import resolve_filesystem


@dataclass(frozen=True)
class VerifyReport:
    root: str
    num_shards: int
    num_samples: int
    problems: tuple[str, ...]
    stopped_early: bool  # True when the problem limit was reached

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            return f"OK: {self.num_samples} samples in {self.num_shards} shards -> {self.root}"
        more = " (stopped at the limit)" if self.stopped_early else ""
        return f"FAILED: {len(self.problems)} problems{more} in {self.root}"


class _Problems(list):
    """A list of problem lines that knows when it has enough."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    @property
    def full(self) -> bool:
        return len(self) >= self.limit


def verify(
    root: str | os.PathLike, *, max_problems: int = 20, progress: bool = False
) -> VerifyReport:
    """Re-read every shard: size and sha256 against the manifest, every member decoded, mask
    ids within the classes, sample and pixel counts as recorded."""
    if max_problems < 1:  # 0 or less would stop at once and report a dataset never read as OK
        raise DataError(f"--max-problems {max_problems}: use 1 or more (problems listed before "
                        "verification stops)")
    manifest = load_manifest(root)
    filesystem, base = resolve_filesystem(os.fspath(root))
    problems = _Problems(max_problems)
    num_shards = num_samples = 0
    all_shards = [
        (split, shard) for split, info in manifest.splits.items() for shard in info["shards"]
    ]
    bar = tqdm(total=len(all_shards), unit="shard", desc="verify", disable=not progress)
    for split, info in manifest.splits.items():
        keys: set[str] = set()
        sizes: list[tuple[int, int]] = []
        counts = np.zeros(manifest.num_classes, np.int64)
        readable = True
        scanned: list[list[SampleEntry] | None] = []
        for shard in info["shards"]:
            if problems.full:
                break
            result = _verify_shard(
                filesystem, f"{base}/{shard['path']}", shard, manifest, keys, sizes, problems,
                scanned,
            )
            bar.update(1)
            num_shards += 1
            if result is None:
                readable = False
                continue
            num_samples += shard["num_samples"]
            counts += result
        if problems.full:
            break
        _check_index(manifest, split, filesystem, base, scanned, problems)
        recorded = sum(shard["num_samples"] for shard in info["shards"])
        if recorded != info["num_samples"]:
            problems.append(
                f"split {split}: shards hold {recorded} samples, manifest says {info['num_samples']}"
            )
        expected_counts = manifest.class_pixel_counts.get(split)
        if readable and expected_counts is not None and counts.tolist() != list(expected_counts):
            problems.append(f"split {split}: class pixel counts differ from the manifest")
        recorded_size = info.get("image_size")
        if readable and sizes and recorded_size is not None:
            found = {
                "min": [min(h for h, _ in sizes), min(w for _, w in sizes)],
                "max": [max(h for h, _ in sizes), max(w for _, w in sizes)],
            }
            if found != recorded_size:
                problems.append(
                    f"split {split}: image sizes (h, w) {found} differ from the manifest's "
                    f"{recorded_size}"
                )
    bar.close()
    return VerifyReport(
        root=manifest.root,
        num_shards=num_shards,
        num_samples=num_samples,
        problems=tuple(problems[:max_problems]),
        stopped_early=problems.full,
    )


def _verify_shard(
    filesystem: pafs.FileSystem,
    path: str,
    shard: dict,
    manifest: Manifest,
    keys: set[str],
    sizes: list[tuple[int, int]],
    problems: _Problems,
    scanned: list[list[SampleEntry] | None],
) -> np.ndarray | None:
    """Check one shard; returns its class pixel counts, or None if some sample was unreadable.
    Adds the (h, w) of each good sample to `sizes` and the shard's tar index to `scanned`
    (None where its headers do not parse)."""
    name = shard["path"]
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except (FileNotFoundError, OSError) as error:
        problems.append(f"{name}: cannot read ({error})")
        scanned.append(None)
        return None
    try:
        scanned.append(scan_members(io.BytesIO(data), name, f"image.{manifest.image_format}"))
    except SampleReadError:
        scanned.append(None)  # the member walk below names what is wrong
    if len(data) != shard["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, manifest says {shard['bytes']}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard["sha256"]:
        problems.append(
            f"{name}: sha256 {digest[:16]}... differs from the manifest's "
            f"{shard['sha256'][:16]}... (the file changed since it was written)"
        )
    counts = np.zeros(manifest.num_classes, np.int64)
    samples, complete = 0, True
    try:
        for sample in iter_tar_samples(io.BytesIO(data), name):
            key = str(sample["__key__"])
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            samples += 1
            if key in keys:
                problems.append(f"{name}: {key}: key appears twice in the split")
            keys.add(key)
            checked = _check_sample(f"{name}: {key}", members, manifest, problems)
            if checked is None:
                complete = False
            else:
                counts += checked[0]
                sizes.append(checked[1])
            if problems.full:
                return None
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        problems.append(f"{name}: unreadable tar after {samples} samples ({tar_error_text(error)})")
        return None
    if samples != shard["num_samples"]:
        problems.append(f"{name}: {samples} samples, manifest says {shard['num_samples']}")
    return counts if complete else None


def _check_index(
    manifest: Manifest,
    split: str,
    filesystem: pafs.FileSystem,
    base: str,
    scanned: list[list[SampleEntry] | None],
    problems: _Problems,
) -> None:
    """The split's index file (named by the manifest) matches the tars, row by row."""
    named = manifest.split(split).get("index")
    if named is None:  # written before indexes: readers scan and cache one
        return
    shards = manifest.split(split)["shards"]
    try:
        table, _ = load_split_index(manifest, split, filesystem, base,
                                    f"image.{manifest.image_format}")
    except (SampleReadError, FileNotFoundError) as error:
        problems.append(f"{named['path']}: {error}")
        return
    for number, (shard, entries) in enumerate(zip(shards, scanned, strict=False)):
        if entries is None:
            continue
        rows = table.filter(pc.equal(table.column("shard"), number))
        expected = index_table([entries], [shard]).drop_columns(["shard"])
        if not rows.drop_columns(["shard"]).equals(expected.replace_schema_metadata(None)):
            problems.append(f"{named['path']}: offsets of {shard['path']} differ from the tar's "
                            "headers; rewrite the split with `segnext shards`")


def _check_sample(
    where: str, members: dict[str, bytes], manifest: Manifest, problems: _Problems
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Decode one sample's members; append problems; return its class pixel counts and (h, w)."""
    image_member = f"image.{manifest.image_format}"
    expected = {image_member, MASK_MEMBER, JSON_MEMBER}
    if set(members) != expected:
        problems.append(f"{where}: members {sorted(members)}, expected {sorted(expected)}")
        return None
    try:
        image = _decode(members[image_member])
        mask = _decode(members[MASK_MEMBER])
        meta = json.loads(members[JSON_MEMBER])
    except (OSError, SyntaxError, ValueError) as error:
        problems.append(f"{where}: cannot decode ({error})")
        return None
    if image.mode != "RGB" or mask.mode != "L":
        problems.append(f"{where}: image mode {image.mode} / mask mode {mask.mode}, need RGB / L")
        return None
    if mask.size != image.size or (meta.get("width"), meta.get("height")) != image.size:
        problems.append(
            f"{where}: sizes differ: image {image.size}, mask {mask.size}, "
            f"json {(meta.get('width'), meta.get('height'))} (width, height)"
        )
        return None
    ids = np.asarray(mask)
    bad = np.unique(ids[(ids >= manifest.num_classes) & (ids != manifest.ignore_index)])
    if bad.size:
        problems.append(
            f"{where}: mask ids {bad.tolist()[:10]} outside 0..{manifest.num_classes - 1}"
        )
        return None
    return np.bincount(ids.ravel(), minlength=256)[: manifest.num_classes], ids.shape


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
