"""The Ray Data stream of each training worker: its share of the global batch plan, in order.

`data.plan` decides which samples make each micro-batch and which worker takes it; this module
turns a worker's share into a Ray Dataset whose blocks are its micro-batches, in plan order
(`preserve_order`): one Ray task per micro-batch reads the samples' byte ranges from the tar
shards (`data.sample_index`), decodes, checks and augments them (`data.samples`), and returns
uint8 crops, so raw bytes never go through the object store, only crops do (4x fewer bytes
than float). Normalisation happens on the training device.

Each worker streams its own dataset rather than a `streaming_split` of one: Ray Data hands
blocks of a split to whichever consumer asks first, which no plan can survive. Here the global
batch sequence is a function of seed and epoch only, so a restored or resized run continues with
exactly the batches it would have seen.

Errors never pass silently: shards are checked and indexed by the driver before any worker
starts; at read time a member that does not decode names shard and key. With `on_error="skip"`
such samples are left out and counted in a named Ray actor: `skipped_samples(root, split)`.

The read tasks do not import torch (only `TrainStream.micro_batches` does, in the worker).
"""

from __future__ import annotations

import logging
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import ray
from pyarrow import fs as pafs
from ray.data import DataContext, Dataset, ExecutionResources, TaskPoolStrategy

from data.manifest import load_manifest
from data.plan import BatchPlan
from data.sample_index import SampleIndex, split_label
from data.samples import FIX_HINT, SamplePipeline, SampleReadError, build_pipeline
from data.scheduler_idle import install_idle_wait
from data.shard_cache import ShardCache, remove_node_caches
from data.shard_index import TAR_BLOCK
from data.transforms import to_training_batch

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
MAX_SKIP_EXAMPLES = 100
CHUNK_ROWS = 20_000  # planned rows per Ray Dataset (a long run chains several)


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


def _record_to(ledger: object | None) -> Callable[[list[dict]], None] | None:
    """The record callback of a SkipLedger actor handle (waits: counts must be complete)."""
    if ledger is None:
        return None
    if isinstance(ledger, SkipTally):  # in-process readers (tests, benchmarks)
        return ledger.record
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


@dataclass(frozen=True)
class ReadPlanned:
    """map_batches function: planned rows (sample references) -> decoded, augmented samples.

    Each row names a shard and the byte ranges of one sample's members (`data.sample_index`);
    one read covers the sample (its image header through its mask), from the node's shard
    cache when there is one, else from the shard in place, so raw bytes never reach the object
    store, only the uint8 crops and the micro-batch number they belong to. The tar headers in
    that read are checked against the index: a wrong offset fails by shard and key."""

    pipeline: SamplePipeline
    filesystem: pafs.FileSystem
    ledger: object | None = None  # SkipLedger handle when on_error="skip"
    cache: ShardCache | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, micro, skipped = [], [], []
        files: dict[str, object] = {}
        try:
            for index, key in enumerate(batch["key"]):
                url, key = str(batch["url"][index]), str(key)
                try:
                    sample = self._read(files, batch, index, url, key)
                    rows.append(self.pipeline(sample, shard=url, key=key,
                                              epoch=int(batch["epoch"][index])))
                    micro.append(int(batch["micro"][index]))
                except SampleReadError as error:
                    if self.ledger is None:
                        raise
                    logger.warning("skipping: %s", error)
                    skipped.append({"shard": url, "key": key, "reason": str(error), "samples": 1})
        finally:
            for handle in files.values():
                handle.close()
        if skipped:  # wait: the count must be complete when the run reads it
            _record_to(self.ledger)(skipped)
        return self._stack(rows, micro)

    def _open(self, files: dict, path: str, size: int) -> object:
        if path not in files:
            files[path] = (self.cache.open(self.filesystem, path, size) if self.cache is not None
                           else self.filesystem.open_input_file(path))
        return files[path]

    def _read(self, files: dict, batch: dict, index: int, url: str, key: str) -> dict[str, bytes]:
        image_at, image_bytes = int(batch["image_at"][index]), int(batch["image_bytes"][index])
        mask_at, mask_bytes = int(batch["mask_at"][index]), int(batch["mask_bytes"][index])
        start, stop = image_at - TAR_BLOCK, mask_at + mask_bytes
        try:
            handle = self._open(files, str(batch["shard"][index]), int(batch["shard_bytes"][index]))
            if start < 0 or mask_at - TAR_BLOCK < image_at + image_bytes:
                raise OSError(f"index offsets {image_at} / {mask_at} cannot be members of a tar")
            span = _read_at(handle, start, stop - start)
            if len(span) != stop - start:
                raise OSError(f"sample is cut short ({len(span)} of {stop - start} bytes)")
            image_member, mask_member = self.pipeline.image_member, "mask.png"
            _check_header(span, 0, f"{key}.{image_member}", image_bytes)
            _check_header(span, mask_at - TAR_BLOCK - start, f"{key}.{mask_member}", mask_bytes)
            return {image_member: span[TAR_BLOCK:TAR_BLOCK + image_bytes],
                    mask_member: span[mask_at - start:]}
        except OSError as error:
            raise SampleReadError(f"{url}: sample '{key}' cannot be read ({error}); {FIX_HINT}") from error

    def _stack(self, rows: list[dict], micro: list[int]) -> dict[str, np.ndarray]:
        height, width = self.pipeline.output_size
        out = {
            "image": np.empty((len(rows), height, width, 3), dtype=np.uint8),
            "mask": np.empty((len(rows), height, width), dtype=np.uint8),
            "micro": np.asarray(micro, dtype=np.int64),
        }
        for index, row in enumerate(rows):
            out["image"][index], out["mask"][index] = row["image"], row["mask"]
        return out


@dataclass(frozen=True)
class TrainStream:
    """Everything a worker needs to stream its share of the batch plan: picklable, built once
    by the driver (the index is checked there, before any worker starts)."""

    index: SampleIndex
    filesystem: pafs.FileSystem
    pipeline: SamplePipeline
    plan: BatchPlan
    root: str
    splits: tuple[str, ...]
    on_error: OnError = "raise"
    read_cpus: float = 0.25
    concurrency: int | None = None
    cache: ShardCache | None = None  # whole shards on each node's disk (remote roots)
    rows_per_dataset: int = CHUNK_ROWS
    ledger: object | None = None  # SkipLedger handle (skip mode), see `with_skip_ledger`

    def dataset(self, *, world: int, rank: int, start: int, stop: int) -> Dataset:
        """The Ray Dataset of this worker's micro-batches for steps [start, stop), in plan order:
        one block (one read+transform task) per micro-batch."""
        plan = self.plan
        samples, epochs, micros = [], [], []
        for iteration in range(start, stop):
            epoch = plan.position(iteration).epoch
            for micro in plan.worker_micro_batches(world, rank):
                chosen = plan.micro_batch(iteration, micro)
                samples.append(chosen)
                epochs.append(np.full(len(chosen), epoch, dtype=np.int64))
                micros.append(np.full(len(chosen), iteration * plan.micro_per_step + micro,
                                      dtype=np.int64))
        columns = self.index.rows(np.concatenate(samples))
        columns["epoch"], columns["micro"] = np.concatenate(epochs), np.concatenate(micros)
        table = pa.table({name: pa.array(list(values) if values.dtype == object else values)
                          for name, values in columns.items()})
        size = plan.micro_batch_size
        blocks = [table.slice(offset, size) for offset in range(0, table.num_rows, size)]
        ledger = self.ledger
        if self.on_error == "skip" and ledger is None:  # used without a driver (benches, tests)
            ledger = self._named_ledger()
        # from_blocks keeps one block per micro-batch and reads block metadata here; from_arrow
        # would start a 1-CPU task per block, which waits forever where Train workers hold the
        # CPUs (two tune trials on 2 cores). A developer API: tests/test_canaries.py guards it.
        install_idle_wait()  # the executor runs in this process: no spinning while ahead
        source = ray.data.from_blocks(blocks)
        source.context.execution_options.preserve_order = True  # plan order is the contract
        source.context.raise_original_map_exception = True  # SampleReadError names shard + key
        source.context.enable_progress_bars = False
        return source.map_batches(
            ReadPlanned(self.pipeline, self.filesystem, ledger, self.cache),
            batch_size=None,  # one block = one micro-batch = one task
            batch_format="numpy",
            num_cpus=self.read_cpus,
            compute=TaskPoolStrategy(size=self.concurrency),
        )

    def with_skip_ledger(self) -> TrainStream:
        """This stream with its skip-mode ledger created in the calling process (the driver):
        an actor is owned by its creator and dies with it, the driver reads the count after the
        workers have exited, and the handle travels with the stream (Train workers may live in
        another namespace, where a lookup by name would find nothing). Shards the index left
        out are recorded once, here."""
        if self.on_error != "skip" or self.ledger is not None:
            return self
        ledger = self._named_ledger()
        if self.index.skipped:
            ray.get(ledger.record.remote([{"shard": self.root, "key": "*", "samples":
                                           self.index.skipped,
                                           "reason": "shard missing or damaged (index)"}]))
        return replace(self, ledger=ledger)

    def remove_cache(self) -> None:
        """Delete this stream's shard cache on every node (at the end of the run or search)."""
        if self.cache is not None and ray.is_initialized():
            held = remove_node_caches(self.cache.directory)
            logger.info("removed the shard cache %s on %d nodes", self.cache.directory, held)

    def _named_ledger(self) -> object:
        return SkipLedger.options(name=_ledger_name(self.root, list(self.splits)),
                                  get_if_exists=True).remote()

    def micro_batches(
        self, *, world: int, rank: int, start: int, stop: int, device: torch.device | str = "cpu",
        prefetch_batches: int = 2,
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(micro-batch number, normalised batch on `device`) for steps [start, stop), in plan
        order; datasets of `rows_per_dataset` rows are chained so a long run does not hold its
        whole plan at once. A micro-batch whose samples were all skipped raises."""
        import torch

        per_step = self.plan.accumulation(world) * self.plan.micro_batch_size
        span = max(1, self.rows_per_dataset // per_step)
        expected = iter(m for it in range(start, stop) for m in (
            it * self.plan.micro_per_step + micro
            for micro in self.plan.worker_micro_batches(world, rank)))
        for first in range(start, stop, span):
            dataset = self.dataset(world=world, rank=rank, start=first, stop=min(first + span, stop))
            blocks = dataset.iter_batches(batch_size=None, batch_format="numpy",
                                          prefetch_batches=prefetch_batches)
            for micro, group in regroup_by_micro(blocks):
                wanted = next(expected)
                if micro != wanted:
                    raise SampleReadError(
                        f"{self.root}: every sample of micro-batch {wanted} (step "
                        f"{wanted // self.plan.micro_per_step}) was skipped as unreadable; "
                        f"{FIX_HINT}"
                    )
                with warnings.catch_warnings():  # Ray's blocks are read-only; never written to
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    uint8 = {name: torch.from_numpy(group[name]) for name in ("image", "mask")}
                yield micro, to_training_batch(uint8, device)


def _read_at(handle: object, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a pyarrow file or a local binary file (the cache's)."""
    if hasattr(handle, "read_at"):
        return handle.read_at(size, offset)
    return os.pread(handle.fileno(), size, offset)


def _check_header(span: bytes, at: int, name: str, size: int) -> None:
    """The tar header at `span[at:]` is the one of member `name` with `size` data bytes (a name
    over 100 characters is stored cut in that header: its start is compared)."""
    try:
        header = tarfile.TarInfo.frombuf(span[at:at + TAR_BLOCK], "utf-8", "surrogateescape")
    except tarfile.TarError as error:
        raise OSError(f"no tar header where the index puts {name} ({error})") from error
    if header.size != size or not name.startswith(header.name) or not header.name:
        raise OSError(f"the index puts {name} ({size} bytes) where the tar holds "
                      f"{header.name} ({header.size} bytes)")


def regroup_by_micro(blocks: Iterator[dict[str, np.ndarray]]) -> Iterator[tuple[int, dict]]:
    """Whole micro-batches from a stream of blocks, whatever Ray did to block boundaries
    (blocks may arrive merged or split; rows are in plan order)."""
    pending: list[dict[str, np.ndarray]] = []
    current = None
    for block in blocks:
        ids = block["micro"]
        if not len(ids):
            continue
        cuts = np.flatnonzero(np.diff(ids)) + 1
        for piece_start, piece_end in zip([0, *cuts], [*cuts, len(ids)], strict=True):
            micro = int(ids[piece_start])
            piece = {name: block[name][piece_start:piece_end] for name in ("image", "mask")}
            if current is not None and micro != current:
                yield current, _concat(pending)
                pending = []
            current = micro
            pending.append(piece)
    if current is not None:
        yield current, _concat(pending)


def _concat(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(pieces) == 1:
        return pieces[0]
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}


def build_train_stream(
    root: str,
    splits: str | Sequence[str],
    *,
    crop_size: tuple[int, int],
    global_batch_size: int,
    micro_batch_size: int,
    scale: tuple[int, int] | None = None,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    seed: int = 0,
    on_error: OnError = "raise",
    read_cpus: float = 0.25,
    concurrency: int | None = None,
    cache: ShardCache | None = None,
) -> TrainStream:
    """Index the training samples of `splits` (one split or several, read as one) and plan
    their global batches. Shard problems raise `SampleReadError` naming the shard here, or,
    with `on_error="skip"`, leave the shard out (counted in `TrainStream.index.skipped`).
    `cache`: read whole shards through a node-local cache (`data.shard_cache`)."""
    from data.sample_index import build_sample_index

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    manifest = load_manifest(root)
    index, filesystem = build_sample_index(manifest, splits, skip=on_error == "skip")
    pipeline = build_pipeline(manifest, train=True, crop_size=crop_size, scale=scale,
                              ratio_range=ratio_range, cat_max_ratio=cat_max_ratio, seed=seed)
    plan = BatchPlan(num_samples=len(index), global_batch_size=global_batch_size,
                     micro_batch_size=micro_batch_size, seed=seed)
    names = (splits,) if isinstance(splits, str) else tuple(splits)
    return TrainStream(index=index, filesystem=filesystem, pipeline=pipeline, plan=plan,
                       root=str(root), splits=names, on_error=on_error, read_cpus=read_cpus,
                       concurrency=concurrency, cache=cache)
