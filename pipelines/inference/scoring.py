"""The one scoring path: validation during training and `segnext eval` score with this code.

Every sample is predicted at its original size by `pipelines.inference.segmenter.Segmenter` (the code the
served model runs: test resize to `data.scale`, padding to the encoder stride or sliding
window, scores resized back to the image) and counted in a confusion matrix against its
untouched mask. So the validation mIoU that picks `best` and `@champion` during training is the
number `segnext eval` prints for that checkpoint and split, to float rounding.

Samples are read straight from the shards (local, `s3://`, `gs://`) through the manifest's
pyarrow filesystem with the project's one tar reader (`data.manifest.iter_tar_samples`); `rank`/`world` give each training worker
every `world`-th sample, so the workers' matrices sum to the split's matrix exactly once.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from data.manifest import Manifest, iter_tar_samples, tar_error_text
from data.sample_index import checked_shards
from data.samples import FIX_HINT, SamplePipeline, SampleReadError
from data.stream import OnError, SkipTally

if TYPE_CHECKING:
    from pipelines.inference.segmenter import Segmenter

# (sample members, shard url, key): one raw webdataset sample
RawSample = tuple[dict[str, Any], str, str]


class OriginalSize:
    """The "transform" of the scoring SamplePipeline: the pipeline still decodes and validates
    every sample (naming shard and key on errors) but keeps image and mask as they are."""

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return image, mask


def scoring_pipeline(manifest: Manifest) -> SamplePipeline:
    return SamplePipeline(
        transform=OriginalSize(),  # type: ignore[arg-type]
        image_member=f"image.{manifest.image_format}",
        num_classes=len(manifest.classes),
        ignore_index=manifest.ignore_index,
    )


def iter_raw_samples(
    manifest: Manifest,
    split: str,
    *,
    rank: int = 0,
    world: int = 1,
    skipped: SkipTally | None = None,
) -> Iterator[RawSample]:
    """Raw samples of `split` in manifest order, every `world`-th from `rank`.

    Shards are checked against the manifest first (missing or truncated: named error, or
    skipped and counted in `skipped`); a tar that fails or ends early while read is the same.
    """
    members = (f"image.{manifest.image_format}", "mask.png")
    record = None
    if skipped is not None:  # a skipped shard is counted once, by rank 0, not once per rank
        record = skipped.record if rank == 0 else lambda entries: None
    shards, filesystem = checked_shards(manifest, split, record=record)
    index = 0
    for shard in shards:
        seen = 0
        try:
            with filesystem.open_input_stream(shard.path) as stream:
                for sample in iter_tar_samples(stream, shard.url):
                    seen += 1
                    if index % world == rank:
                        yield {m: sample.get(m) for m in members}, shard.url, str(sample["__key__"])
                    index += 1
        except (tarfile.TarError, OSError, ValueError) as error:
            problem = f"is unreadable after {seen} samples ({tar_error_text(error)})"
        else:
            if seen == shard.num_samples:
                continue
            problem = f"holds {seen} samples, manifest says {shard.num_samples}"
        if skipped is None:
            raise SampleReadError(f"{shard.url}: shard {problem}; {FIX_HINT}")
        missing = shard.num_samples - seen
        # Keep the modulo partition aligned across ranks: every rank skips the same indices.
        index += missing
        if rank == 0:
            skipped.record([{"shard": shard.url, "key": "*", "reason": problem,
                             "samples": missing}])


@dataclass
class Scored:
    """What scoring a set of samples gives: the matrix plus a few samples to look at."""

    matrix: np.ndarray  # (K, K) int64, rows = true class, columns = predicted
    num_samples: int = 0
    preview: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def score_samples(
    segmenter: Segmenter,
    pipeline: SamplePipeline,
    samples: Iterable[RawSample],
    *,
    skipped: SkipTally | None = None,
    preview: int = 0,
    progress: Any = None,
) -> Scored:
    """Decode, predict at original size and count `samples` in batches of the segmenter's
    batch size. A bad sample raises naming shard and key, or with `skipped` is counted there.
    `preview`: keep the first N (image, mask, prediction) triples; `progress`: a tqdm bar."""
    import torch

    from segnext.metrics import ConfusionMatrix

    accumulator = ConfusionMatrix(pipeline.num_classes, pipeline.ignore_index)
    scored = Scored(matrix=np.zeros((pipeline.num_classes,) * 2, dtype=np.int64))
    for batch in _batches(samples, segmenter.settings.batch_size):
        decoded = []
        for sample, url, key in batch:
            try:
                decoded.append(pipeline(sample, shard=url, key=key))
            except SampleReadError as error:
                if skipped is None:
                    raise
                skipped.record([{"shard": url, "key": key, "reason": str(error), "samples": 1}])
        predictions = segmenter.predict([item["image"] for item in decoded])
        for prediction, item in zip(predictions, decoded, strict=True):
            accumulator.update(torch.from_numpy(prediction), torch.from_numpy(item["mask"]))
            if len(scored.preview) < preview:
                scored.preview.append((item["image"], item["mask"], prediction))
        scored.num_samples += len(decoded)
        if progress is not None:
            progress.update(len(batch))
    scored.matrix = accumulator.matrix.cpu().numpy().astype(np.int64)
    return scored


def score_split(
    segmenter: Segmenter,
    manifest: Manifest,
    split: str,
    *,
    rank: int = 0,
    world: int = 1,
    on_error: OnError = "raise",
    preview: int = 0,
    progress: bool = False,
) -> tuple[Scored, SkipTally]:
    """This rank's share of `split` scored at original size, and what was skipped."""
    from tqdm import tqdm

    skipped = SkipTally()
    samples = iter_raw_samples(
        manifest, split, rank=rank, world=world, skipped=skipped if on_error == "skip" else None
    )
    total = -(-manifest.num_samples(split) // world)
    with tqdm(total=total, unit="img", disable=not progress) as bar:
        scored = score_samples(
            segmenter,
            scoring_pipeline(manifest),
            samples,
            skipped=skipped if on_error == "skip" else None,
            preview=preview,
            progress=bar,
        )
    return scored, skipped


def _batches(samples: Iterable[RawSample], size: int) -> Iterator[list[RawSample]]:
    batch: list[RawSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
