"""A plain webdataset + torch DataLoader, without Ray, yielding what `data.stream` yields.

It runs the same `SamplePipeline` (same transforms, same per-sample seeds) as the Ray Data
stream: the baseline that stream is benchmarked and tested against.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.manifest import iter_tar_samples, load_manifest, tar_error_text
from data.samples import FIX_HINT, SamplePipeline, SampleReadError, build_pipeline
from data.storage import resolve_filesystem
from data.transforms import to_training_batch


def epoch_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """Shard order for one training epoch (a seeded permutation)."""
    rng = np.random.default_rng([seed, epoch])
    return [urls[i] for i in rng.permutation(len(urls))]


class ShardSamples(IterableDataset):
    """Samples of `urls`, `epochs` passes per iteration; DataLoader workers take every n-th
    shard. Call `set_epoch(k)` before iteration k (non-persistent workers) for fresh
    augmentation and shard order."""

    def __init__(
        self, urls: list[str], pipeline: SamplePipeline, *, shuffle: bool, epochs: int = 1
    ) -> None:
        super().__init__()
        self.urls, self.pipeline, self.shuffle, self.epochs = list(urls), pipeline, shuffle, epochs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, np.ndarray | int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for repeat in range(self.epochs):
            epoch = self.epoch * self.epochs + repeat
            urls = epoch_order(self.urls, self.pipeline.seed, epoch) if self.shuffle else self.urls
            for url in urls[worker::workers]:
                for sample in read_shard(url):
                    yield self.pipeline(sample, shard=url, key=sample["__key__"], epoch=epoch)


def read_shard(url: str) -> Iterator[dict[str, object]]:
    """Raw webdataset samples of one shard (a local path or an s3:// / gs:// URI), read by the
    verifier's reader; a damaged tar raises `SampleReadError` naming it."""
    filesystem, path = resolve_filesystem(url)
    try:
        with filesystem.open_input_stream(path, compression=None, buffer_size=1 << 20) as stream:
            yield from iter_tar_samples(stream, url)
    except (tarfile.TarError, OSError, ValueError) as error:
        raise SampleReadError(
            f"{url}: unreadable shard ({tar_error_text(error)}); {FIX_HINT}"
        ) from error


@dataclass
class TorchLoader:
    """Iterates normalised training batches from a uint8 DataLoader."""

    loader: DataLoader
    device: torch.device | str = "cpu"

    def set_epoch(self, epoch: int) -> None:
        self.loader.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            yield to_training_batch(batch, self.device)


def build_torch_loader(
    root: str,
    split: str,
    *,
    train: bool,
    crop_size: tuple[int, int],
    batch_size: int,
    num_workers: int = 2,
    scale: tuple[int, int] | None = None,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    seed: int = 0,
    epochs: int = 1,
    drop_last: bool = True,
    device: torch.device | str = "cpu",
) -> TorchLoader:
    """Plain webdataset + torch DataLoader with the same samples as `data.stream.TrainStream`
    (same transforms, same per-sample seeds); `epochs` passes per iteration."""
    manifest = load_manifest(root)
    pipeline = build_pipeline(
        manifest,
        train=train,
        crop_size=crop_size,
        scale=scale,
        ratio_range=ratio_range,
        cat_max_ratio=cat_max_ratio,
        seed=seed,
    )
    dataset = ShardSamples(manifest.shard_urls(split), pipeline, shuffle=train, epochs=epochs)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return TorchLoader(loader, device)
