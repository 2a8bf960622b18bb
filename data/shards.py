"""WebDataset shards for segmentation: the writer, the manifest and the verifier.

Layout (a contract with `data/stream.py`): `OUT/{split}-{000000..}.tar` holding, per sample,
`{key}.image.jpg|png` (RGB), `{key}.mask.png` (8-bit ids, 255 = ignore) and `{key}.json`, plus
`OUT/dataset.json` describing classes, palette, splits, shard checksums and skipped samples.

Every sample is decoded and validated before it is written (bad data fails here, naming the
file, not hours later in a training job). Shards are written under temporary names and renamed
into place only after all of them succeeded; the manifest is written last. Output is
byte-for-byte reproducible: fixed ordering, fixed tar metadata, deterministic encoders.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from PIL import Image
from tqdm import tqdm

from data.sources.base import IGNORE_INDEX, DataError, Sample, SampleError, Source, sanitize_key

FORMAT = "segnext-shards/1"
MANIFEST_NAME = "dataset.json"
MASK_MEMBER = "mask.png"
JSON_MEMBER = "json"
IMAGE_FORMATS = ("jpg", "png")
DEFAULT_SHARD_SIZE = 256
PROBE_SAMPLES = 8  # samples encoded to turn --shard-bytes into samples per shard
TAR_OVERHEAD = 1024  # header + padding per tar member, roughly
SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.tar$")
PARTIAL_NAME = re.compile(r"^\.[A-Za-z0-9_-]+-\d{6}\.tar\.partial$")


class ManifestError(DataError):
    """A missing or malformed dataset.json."""


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """The parsed dataset.json; `root` is where it was read from (a local dir or a URI).

    `splits` keeps the JSON structure: {split: {"num_samples", "shards": [{"path",
    "num_samples", "bytes", "sha256"}], "skipped": [{"source", "reason"}]}}.
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

    def shard_urls(self, split: str) -> list[str]:
        """Full paths (local) or URIs (s3://, gs://) of the split's shards, in order."""
        return [join_root(self.root, shard["path"]) for shard in self.split(split)["shards"]]

    def num_samples(self, split: str) -> int:
        return self.split(split)["num_samples"]

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
            splits = {
                str(split): {
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
                for split, info in data["splits"].items()
            }
            return cls(
                name=str(data["name"]),
                classes=tuple(str(c) for c in data["classes"]),
                palette=tuple(tuple(int(v) for v in c) for c in data["palette"]),
                ignore_index=int(data["ignore_index"]),
                image_format=str(data["image_format"]),
                splits=splits,
                class_pixel_counts={
                    str(k): [int(c) for c in v] for k, v in data["class_pixel_counts"].items()
                },
                root=root,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ManifestError(
                f"{where}: malformed manifest ({type(error).__name__}: {error}). Fix: rebuild "
                f"the shards with `segnext shards`."
            ) from None


def resolve_filesystem(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local dir or an s3:// / gs:// URI.

    S3 gets an explicit region (AWS_REGION, default us-east-1): without one pyarrow asks the
    network for the bucket's region, which fails offline.
    """
    text = os.fspath(root)
    if text.startswith("s3://"):
        region = os.environ.get("AWS_REGION", "us-east-1")
        return pafs.S3FileSystem(region=region), text.removeprefix("s3://").rstrip("/")
    if "://" in text:
        filesystem, path = pafs.FileSystem.from_uri(text)
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(text)


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


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class EncodeOptions:
    image_format: str = "jpg"  # "jpg" (re-encoded) or "png" (lossless)
    jpeg_quality: int = 95


@dataclass(frozen=True)
class _ShardTask:
    """One unit of parallel work: encode `samples` into the tar at `temp_path`."""

    source: Source
    split: str
    index: int
    samples: tuple[Sample, ...]
    temp_path: str
    options: EncodeOptions
    on_error: str


@dataclass(frozen=True)
class _ShardResult:
    split: str
    index: int
    temp_path: str
    num_samples: int
    bytes: int
    sha256: str
    pixel_counts: tuple[int, ...]
    skipped: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class WriteSummary:
    manifest: Manifest
    out: str
    seconds: float

    @property
    def skipped(self) -> list[dict[str, str]]:
        return [s for info in self.manifest.splits.values() for s in info["skipped"]]

    @property
    def num_samples(self) -> int:
        return sum(info["num_samples"] for info in self.manifest.splits.values())

    @property
    def num_shards(self) -> int:
        return sum(len(info["shards"]) for info in self.manifest.splits.values())

    @property
    def num_bytes(self) -> int:
        return sum(s["bytes"] for info in self.manifest.splits.values() for s in info["shards"])

    def line(self) -> str:
        return (
            f"{self.num_samples} samples, {self.num_shards} shards, "
            f"{self.num_bytes / 1e6:.1f} MB, {len(self.skipped)} skipped, "
            f"{self.seconds:.1f} s -> {self.out}"
        )


def encode_sample(
    source: Source, sample: Sample, options: EncodeOptions
) -> tuple[dict[str, bytes], np.ndarray]:
    """Tar members (name after the key -> bytes) and per-class pixel counts of one sample."""
    loaded = source.load(sample)
    if options.image_format == "png":
        image_bytes = loaded.rgb_png or _encode(loaded.image, "PNG")
    else:
        image_bytes = _encode(loaded.image, "JPEG", quality=options.jpeg_quality)
    meta = {
        "source": sample.image,
        "mask_source": sample.mask,
        "height": loaded.image.height,
        "width": loaded.image.width,
    }
    members = {
        f"image.{options.image_format}": image_bytes,
        MASK_MEMBER: _encode(Image.fromarray(loaded.mask), "PNG"),
        JSON_MEMBER: json.dumps(meta).encode(),
    }
    counts = np.bincount(loaded.mask.ravel(), minlength=256)[: len(source.classes)]
    return members, counts


def _encode(image: Image.Image, image_format: str, **params: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file with fixed metadata (mtime 0, root-owned, 0644) so shards are reproducible."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shard(task: _ShardTask) -> _ShardResult:
    """Encode and write one shard to its temporary path (removed again on failure)."""
    counts = np.zeros(len(task.source.classes), np.int64)
    skipped: list[dict[str, str]] = []
    written = 0
    try:
        with (
            open(task.temp_path, "wb") as file,
            tarfile.open(fileobj=file, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            for sample in task.samples:
                try:
                    members, sample_counts = encode_sample(task.source, sample, task.options)
                except SampleError as error:
                    if task.on_error == "raise":
                        raise
                    skipped.append({"source": sample.image, "reason": str(error)})
                    continue
                for name, data in members.items():
                    _add_member(tar, f"{sample.key}.{name}", data)
                counts += sample_counts
                written += 1
    except BaseException:
        Path(task.temp_path).unlink(missing_ok=True)
        raise
    size, digest = 0, ""
    if written:
        size = os.path.getsize(task.temp_path)
        with open(task.temp_path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    else:
        Path(task.temp_path).unlink()
    return _ShardResult(
        split=task.split,
        index=task.index,
        temp_path=task.temp_path,
        num_samples=written,
        bytes=size,
        sha256=digest,
        pixel_counts=tuple(int(c) for c in counts),
        skipped=tuple(skipped),
    )


def _run_tasks(tasks: list[_ShardTask], workers: int) -> Iterator[_ShardResult]:
    """Results as shards complete: in this process for one worker, else in a process pool."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_write_shard, tasks)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once threads exist
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
        futures = [pool.submit(_write_shard, task) for task in tasks]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _samples_per_shard(
    source: Source, samples: list[Sample], shard_bytes: int, options: EncodeOptions
) -> int:
    """Turn a byte budget into a sample count from the mean encoded size of a few samples."""
    sizes = []
    for sample in samples[:PROBE_SAMPLES]:
        try:
            members, _ = encode_sample(source, sample, options)
        except SampleError:
            continue  # reported when the shard is written
        sizes.append(sum(len(data) + TAR_OVERHEAD for data in members.values()))
    if not sizes:
        return DEFAULT_SHARD_SIZE
    return max(1, int(shard_bytes * len(sizes) // sum(sizes)))


def write_shards(
    source: Source,
    out: str | os.PathLike,
    *,
    splits: Iterable[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard_bytes: int | None = None,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    on_error: str = "raise",
    workers: int = 1,
    limit: int | Mapping[str, int] | None = None,
    progress: bool = False,
) -> WriteSummary:
    """Write `source`'s splits as shards + manifest under `out` (a local dir).

    `shard_bytes`, when given, replaces `shard_size` by an estimate from the first samples.
    `limit` keeps the first N samples of each split (or per split, from a mapping).
    On error in raise mode no new shard and no temp file is left behind, and a previous dataset
    in `out` stays intact; on success stale shards of earlier runs are removed.
    """
    _check_options(image_format, jpeg_quality, on_error, shard_size, shard_bytes, workers)
    started = time.perf_counter()
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder. Fix: pick another --out.")
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = tuple(dict.fromkeys(splits or source.default_splits))
    bad_names = [split for split in splits if sanitize_key(split) != split or not split]
    if bad_names:
        raise DataError(
            f"split names {bad_names} would make odd shard file names. Fix: use letters, "
            f"digits, '_' and '-' only."
        )
    options = EncodeOptions(image_format, jpeg_quality)

    tasks: list[_ShardTask] = []
    for split in splits:
        samples = source.samples(split)
        split_limit = limit.get(split) if isinstance(limit, Mapping) else limit
        samples = samples if split_limit is None else samples[:split_limit]
        per_shard = (
            _samples_per_shard(source, samples, shard_bytes, options) if shard_bytes else shard_size
        )
        for index, first in enumerate(range(0, len(samples), per_shard)):
            tasks.append(
                _ShardTask(
                    source=source,
                    split=split,
                    index=index,
                    samples=tuple(samples[first : first + per_shard]),
                    temp_path=str(out_dir / f".{split}-{index:06d}.tar.partial"),
                    options=options,
                    on_error=on_error,
                )
            )

    results: list[_ShardResult] = []
    total = sum(len(task.samples) for task in tasks)
    try:
        with tqdm(total=total, unit="img", desc="shards", disable=not progress) as bar:
            for result in _run_tasks(tasks, workers):
                results.append(result)
                bar.update(result.num_samples + len(result.skipped))
    except BaseException:
        for task in tasks:
            Path(task.temp_path).unlink(missing_ok=True)
        raise
    manifest = _commit(out_dir, source, splits, results, image_format)
    return WriteSummary(manifest, str(out_dir), time.perf_counter() - started)


def _check_options(
    image_format: str,
    jpeg_quality: int,
    on_error: str,
    shard_size: int,
    shard_bytes: int | None,
    workers: int,
) -> None:
    problems = []
    if image_format not in IMAGE_FORMATS:
        problems.append(f"image format {image_format!r} (use jpg or png)")
    if not 1 <= jpeg_quality <= 100:
        problems.append(f"--jpeg-quality {jpeg_quality} (use 1..100)")
    if on_error not in ("raise", "skip"):
        problems.append(f"--on-error {on_error!r} (use raise or skip)")
    if shard_size < 1 or (shard_bytes is not None and shard_bytes < 1):
        problems.append("--shard-size / --shard-bytes below 1")
    if workers < 1:
        problems.append(f"--workers {workers} (use 1 or more)")
    if problems:
        raise DataError(f"invalid shard options: {'; '.join(problems)}.")


def _commit(
    out: Path,
    source: Source,
    splits: tuple[str, ...],
    results: list[_ShardResult],
    image_format: str,
) -> Manifest:
    """Move finished shards to their final names (numbered without gaps), write the manifest
    last, then delete shards an earlier run left that the new manifest does not list."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest beats one pointing at new shards
    split_infos: dict[str, dict] = {}
    pixel_counts: dict[str, list[int]] = {}
    for split in splits:
        mine = sorted((r for r in results if r.split == split), key=lambda r: r.index)
        shards: list[dict] = []
        for result in mine:
            if not result.num_samples:
                continue
            name = f"{split}-{len(shards):06d}.tar"
            os.replace(result.temp_path, out / name)
            shards.append(
                {
                    "path": name,
                    "num_samples": result.num_samples,
                    "bytes": result.bytes,
                    "sha256": result.sha256,
                }
            )
        split_infos[split] = {
            "num_samples": sum(s["num_samples"] for s in shards),
            "shards": shards,
            "skipped": [s for r in mine for s in r.skipped],
        }
        counts = np.zeros(len(source.classes), np.int64)
        for result in mine:
            counts += np.asarray(result.pixel_counts, np.int64)
        pixel_counts[split] = [int(c) for c in counts]
    manifest = Manifest(
        name=source.name,
        classes=tuple(source.classes),
        palette=tuple(tuple(int(v) for v in c) for c in source.palette),
        ignore_index=IGNORE_INDEX,
        image_format=image_format,
        splits=split_infos,
        class_pixel_counts=pixel_counts,
        root=str(out.absolute()),
    )
    temp = out / f".{MANIFEST_NAME}.partial"
    temp.write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")
    os.replace(temp, out / MANIFEST_NAME)
    keep = {shard["path"] for info in split_infos.values() for shard in info["shards"]}
    for path in out.iterdir():
        stale_shard = SHARD_NAME.match(path.name) and path.name not in keep
        if stale_shard or PARTIAL_NAME.match(path.name):
            path.unlink()
    return manifest


# ----------------------------------------------------------------------------- verifying


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
        counts = np.zeros(manifest.num_classes, np.int64)
        readable = True
        for shard in info["shards"]:
            if problems.full:
                break
            result = _verify_shard(
                filesystem, f"{base}/{shard['path']}", shard, manifest, keys, problems
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
        recorded = sum(shard["num_samples"] for shard in info["shards"])
        if recorded != info["num_samples"]:
            problems.append(
                f"split {split}: shards hold {recorded} samples, manifest says {info['num_samples']}"
            )
        expected_counts = manifest.class_pixel_counts.get(split)
        if readable and expected_counts is not None and counts.tolist() != list(expected_counts):
            problems.append(f"split {split}: class pixel counts differ from the manifest")
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
    problems: _Problems,
) -> np.ndarray | None:
    """Check one shard; returns its class pixel counts, or None if some sample was unreadable."""
    name = shard["path"]
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except (FileNotFoundError, OSError) as error:
        problems.append(f"{name}: cannot read ({error})")
        return None
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
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for key, members in _samples_in(tar):
                samples += 1
                if key in keys:
                    problems.append(f"{name}: {key}: key appears twice in the split")
                keys.add(key)
                sample_counts = _check_sample(f"{name}: {key}", members, manifest, problems)
                if sample_counts is None:
                    complete = False
                else:
                    counts += sample_counts
                if problems.full:
                    return None
    except (tarfile.TarError, EOFError, OSError) as error:
        problems.append(f"{name}: unreadable tar after {samples} samples ({error})")
        return None
    if samples != shard["num_samples"]:
        problems.append(f"{name}: {samples} samples, manifest says {shard['num_samples']}")
    return counts if complete else None


def _samples_in(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member suffix: bytes}) per sample; members of one sample are consecutive."""
    key, members = None, {}
    for info in tar:
        if not info.isfile():
            continue
        member_key, _, suffix = info.name.partition(".")
        if member_key != key and key is not None:
            yield key, members
            members = {}
        key = member_key
        file = tar.extractfile(info)
        members[suffix] = file.read() if file else b""
    if key is not None:
        yield key, members


def _check_sample(
    where: str, members: dict[str, bytes], manifest: Manifest, problems: _Problems
) -> np.ndarray | None:
    """Decode one sample's members; append problems; return its class pixel counts."""
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
    return np.bincount(ids.ravel(), minlength=256)[: manifest.num_classes]


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
