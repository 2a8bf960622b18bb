"""Ray Data stream of augmented, fixed-size uint8 samples from webdataset shards.

One Ray task per shard reads the tar (read_webdataset's datasource, raw bytes) and decodes +
transforms its samples in `map_batches` with the same CPU request and no batch size, so Ray
fuses both into one operator: raw bytes never go through the object store, only uint8 crops do
(4x fewer bytes than float). Normalisation happens in `iter_batches`, on the training device.

Per-sample augmentation is seeded by (seed, epoch, key) (`data.samples.SamplePipeline`); the
epoch is Ray Data's execution index, so every pass over the dataset (an epoch in Ray Train)
draws fresh augmentations and a fresh shard order. `epochs=N` chains N passes into one stream,
so a small dataset does not pay Ray Data's start-up once per epoch.

Errors never pass silently: shard sizes are checked against the manifest before anything runs;
at read time a damaged tar or a shard shorter than its manifest count raises `SampleReadError`
naming the shard, and a member that does not decode names shard and key. With
`on_error="skip"` they are left out and counted in a named Ray actor: `skipped_samples(root,
split)` reads the count.

This module does not import torch (only `iter_batches` uses it, through data.transforms): the
Ray Data worker processes that unpickle `PrepareBatch` then skip torch's ~1.5 CPU-s import.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import ray
from pyarrow import fs as pafs
from ray.data import (
    DataContext,
    Dataset,
    ExecutionResources,
    FileShuffleConfig,
    TaskPoolStrategy,
)
from ray.data._internal.datasource.webdataset_datasource import WebDatasetDatasource

from data.samples import FIX_HINT, SamplePipeline, SampleReadError, build_pipeline
from data.shards import Manifest, join_root, load_manifest, resolve_filesystem
from data.transforms import to_training_batch

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
Verify = Literal["size", "sha256", "none"]
MAX_SKIP_EXAMPLES = 100


def configure_data_context(
    cpu: float | None = None,
    object_store_memory: float | None = None,
    *,
    progress_bars: bool = False,
) -> DataContext:
    """Cap what Ray Data may use in this process (set before building datasets; Train workers
    hold CPUs that Ray Data must not wait for) and silence progress bars on small machines."""
    context = DataContext.get_current()
    context.execution_options.resource_limits = ExecutionResources(
        cpu=cpu, object_store_memory=object_store_memory
    )
    context.enable_progress_bars = progress_bars
    return context


class SkipTally:
    """Samples and shards left out by `on_error="skip"`: a count and the first examples.

    Used as it is by single-process readers and, wrapped as the `SkipLedger` actor, shared by
    all the read tasks of a Ray Data stream."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[dict[str, str | int]] = []

    def record(self, entries: list[dict[str, str | int]]) -> None:
        for entry in entries:
            self.count += int(entry.get("samples", 1))
            if len(self.examples) < MAX_SKIP_EXAMPLES:
                self.examples.append(entry)

    def report(self) -> dict:
        return {"count": self.count, "examples": list(self.examples)}


SkipLedger = ray.remote(num_cpus=0)(SkipTally)


def split_label(split: str | Sequence[str]) -> str:
    """One name for one split or several read as one ("train+val")."""
    return split if isinstance(split, str) else "+".join(split)


def _record_to(ledger: object | None) -> Callable[[list[dict]], None] | None:
    """The record callback of a SkipLedger actor handle (waits: counts must be complete)."""
    if ledger is None:
        return None
    return lambda entries: ray.get(ledger.record.remote(entries))


def _ledger_name(root: str, split: str | Sequence[str]) -> str:
    return f"segnext-skips:{root}:{split_label(split)}"


def skipped_samples(root: str, split: str | Sequence[str]) -> dict:
    """{"count": samples left out so far by skip-mode datasets of (root, split) in this Ray
    job, "examples": [{"shard", "key", "reason", "samples"}, ...] (first 100)}."""
    try:
        ledger = ray.get_actor(_ledger_name(str(root), split))
    except ValueError:
        return {"count": 0, "examples": []}
    return ray.get(ledger.report.remote())


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


class CheckedWebDataset(WebDatasetDatasource):
    """`read_webdataset`'s datasource (Ray 2.60 keeps it internal) plus two checks per shard:
    a damaged tar raises naming the shard instead of a bare `ReadError`, and a shard that
    yields fewer samples than its manifest entry fails (tarfile's stream mode takes a corrupt
    header for the end of the archive and would silently drop the rest). With a ledger
    (skip mode) the samples kept so far stay and the missing ones are counted."""

    def __init__(self, shards: list[ShardFile], *, ledger: object | None, **kwargs) -> None:
        super().__init__([shard.path for shard in shards], **kwargs)
        self.counts = {shard.path: shard.num_samples for shard in shards}
        self.ledger = ledger

    def _read_stream(self, stream: object, path: str) -> Iterator[object]:
        expected, seen = self.counts[path], 0
        try:
            for block in super()._read_stream(stream, path):
                seen += len(block)
                yield block
        except tarfile.TarError as error:
            problem = f"is unreadable after {seen} samples ({error})"
        else:
            if seen == expected:
                return
            problem = f"holds {seen} samples, manifest says {expected} (damaged tar header?)"
        if self.ledger is None:
            raise SampleReadError(f"{path}: shard {problem}; {FIX_HINT}")
        logger.warning("skipping the rest of shard %s: %s", path, problem)
        entry = {"shard": path, "key": "*", "reason": problem, "samples": expected - seen}
        _record_to(self.ledger)([entry])


@dataclass(frozen=True)
class PrepareBatch:
    """map_batches function: raw webdataset rows -> stacked fixed-size uint8 samples."""

    pipeline: SamplePipeline
    epochs: int = 1
    repeat: int = 0
    ledger: object | None = None  # SkipLedger handle when on_error="skip"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray Data counts executions of a dataset; each one (an epoch) reseeds the augmentation.
        epoch = DataContext.get_current()._execution_idx * self.epochs + self.repeat
        members = [name for name in batch if not name.startswith("__")]
        rows, skipped = [], []
        for index, key in enumerate(batch["__key__"]):
            url, key = str(batch["__url__"][index]), str(key)
            sample = {name: batch[name][index] for name in members}
            try:
                rows.append(self.pipeline(sample, shard=url, key=key, epoch=epoch))
            except SampleReadError as error:
                if self.ledger is None:
                    raise
                logger.warning("skipping: %s", error)
                skipped.append({"shard": url, "key": key, "reason": str(error), "samples": 1})
        if skipped:  # wait: the count must be complete when the pass ends
            _record_to(self.ledger)(skipped)
        return self._stack(rows)

    def _stack(self, rows: list[dict]) -> dict[str, np.ndarray]:
        height, width = self.pipeline.output_size
        out = {
            "image": np.empty((len(rows), height, width, 3), dtype=np.uint8),
            "mask": np.empty((len(rows), height, width), dtype=np.uint8),
        }
        for index, row in enumerate(rows):
            out["image"][index], out["mask"][index] = row["image"], row["mask"]
        if not self.pipeline.train:
            for name in ("height", "width"):
                out[name] = np.array([row[name] for row in rows], dtype=np.int32)
        return out


def build_dataset(
    root: str,
    split: str | Sequence[str],
    *,
    train: bool,
    crop_size: tuple[int, int],
    scale: tuple[int, int] | None = None,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    seed: int = 0,
    epochs: int = 1,
    on_error: OnError = "raise",
    verify: Verify = "size",
    read_cpus: float = 0.25,
    concurrency: int | None = None,
) -> Dataset:
    """Dataset of {"image" uint8 (H, W, 3), "mask" uint8 (H, W)} rows at `crop_size` (h, w)
    (+ int "height", "width", the original size, when not `train`). `split` may name several
    splits, read as one (`["train", "val"]`).

    train: shard order shuffled per pass and the mmseg augmentation (random resize to `scale`
    x `ratio_range`, crop with `cat_max_ratio`, flip, photometric, pad). Eval: resize to
    `scale` (None: native size), pad to `crop_size`. `epochs` > 1 streams that many training
    passes as one dataset (the passes run side by side, so epochs overlap). `verify`: shard
    sizes ("size", cheap), also checksums ("sha256", reads every byte) or "none", against the
    manifest before reading. `read_cpus` is the CPU request of each read+transform task: keep
    it small where Train workers hold the CPUs (each task still keeps one core busy);
    `concurrency` caps parallel tasks. One task reads and transforms one shard: Ray fuses the
    read and the map, so raw bytes never reach the object store. Skip-mode counts accumulate
    per (root, split) in the Ray job, once per pass: see `skipped_samples`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if epochs < 1 or (epochs > 1 and not train):
        raise ValueError(f"epochs must be >= 1 and only train streams repeat, got {epochs}")
    manifest = load_manifest(root)
    ledger = None
    if on_error == "skip":
        name = _ledger_name(str(root), split)
        ledger = SkipLedger.options(name=name, get_if_exists=True).remote()
    shards, filesystem = checked_shards(manifest, split, verify=verify, record=_record_to(ledger))
    pipeline = build_pipeline(
        manifest,
        train=train,
        crop_size=crop_size,
        scale=scale,
        ratio_range=ratio_range,
        cat_max_ratio=cat_max_ratio,
        seed=seed,
    )
    passes = []
    for repeat in range(epochs):
        shuffle = FileShuffleConfig(seed=seed * 1_000_003 + repeat) if train else None
        source = CheckedWebDataset(
            shards,
            ledger=ledger,
            decoder=None,  # raw bytes: PrepareBatch decodes, naming shard and key on errors
            fileselect=[f"*.{pipeline.image_member}", "*.mask.png"],
            filesystem=filesystem,
            shuffle=shuffle,
        )
        raw = ray.data.read_datasource(
            source, num_cpus=read_cpus, concurrency=concurrency, override_num_blocks=len(shards)
        )
        # Surface SampleReadError itself (it names shard and key), not Ray's UserCodeException.
        raw.context.raise_original_map_exception = True
        passes.append(
            raw.map_batches(
                PrepareBatch(pipeline, epochs, repeat, ledger),
                batch_size=None,  # a set batch size stops Ray 2.60 fusing the map into the read
                batch_format="numpy",
                num_cpus=read_cpus,
                compute=TaskPoolStrategy(size=concurrency),  # must equal the read's to fuse
            )
        )
    return passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]


def iter_batches(
    data: Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    drop_last: bool = True,
    local_shuffle_buffer_size: int | None = None,
    prefetch_batches: int = 2,
    seed: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass of normalised training batches: {"images" float32 (B, 3, H, W), "masks"
    int64 (B, H, W)} (+ "height", "width" for eval). Works on a Dataset or a Ray Train shard
    (`ray.train.get_dataset_shard`); uint8 goes to `device`, normalisation happens there."""
    batches = data.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=seed,
        prefetch_batches=prefetch_batches,
    )
    for batch in batches:
        yield to_training_batch(batch, device)
