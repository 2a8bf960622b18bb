"""Dataset lineage: the shard splits a run trained, validated or was evaluated on, logged as
MLflow datasets (the run page's "Datasets used", `run.inputs.dataset_inputs`).

One dataset per split: name `<manifest name>/<split>`, source the shards' root as a URI
(`file:///...`, `s3://...`, `gs://...`), a digest of the split's shard list from the manifest
(each shard's path and sha256: a rebuilt shard with other bytes gives another digest), and a
profile (samples, shards, bytes, classes, image format and sizes). The context input tag
(`mlflow.data.context`) says how the run used it: `training`, `validation` or `test` (eval).

MLflow keeps one dataset record per (name, digest) in an experiment, with the source of the
first run that logged it; so each input also carries the root this run read
(`segnext.data.root`), which is what `describe_inputs` names. Built from the manifest the
driver has already read (`data.manifest.Manifest`); nothing here reads shards.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from data.manifest import Manifest

ROOT_TAG = "segnext.data.root"  # input tag: the shards' root this run read (a URI)
TRAINING, VALIDATION, TEST = "training", "validation", "test"
DIGEST_CHARS = 10  # MLflow recommends digests of 8-10 characters


class ShardSplit(Dataset):
    """One split of a shard dataset as MLflow sees it: metadata only (no rows to load)."""

    def __init__(self, *, source: Any, name: str, digest: str, profile: Mapping[str, Any]):
        self._profile = dict(profile)
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:  # the digest is always given (split_digest)
        raise NotImplementedError

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    @property
    def schema(self) -> None:
        return None

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def source_uri(root: str) -> str:
    """The shards' root as a URI: object storage as it is, a local folder as file:///..."""
    return root if "://" in root else Path(root).absolute().as_uri()


def split_digest(shards: Iterable[Mapping[str, Any]]) -> str:
    """Short, stable fingerprint of a split: its shards' relative paths and sha256, in order."""
    hasher = hashlib.sha256()
    for shard in shards:
        hasher.update(f"{shard['path']}\t{shard['sha256']}\n".encode())
    return hasher.hexdigest()[:DIGEST_CHARS]


def split_profile(manifest: Manifest, split: str) -> dict[str, Any]:
    """What the split holds, from its manifest entry."""
    entry = manifest.split(split)
    profile: dict[str, Any] = {
        "samples": entry["num_samples"],
        "shards": len(entry["shards"]),
        "bytes": sum(shard["bytes"] for shard in entry["shards"]),
        "classes": manifest.num_classes,
        "class_names": list(manifest.classes),
        "image_format": manifest.image_format,
    }
    if entry.get("image_size"):
        profile["image_size"] = entry["image_size"]  # {"min": [h, w], "max": [h, w]}
    if entry.get("skipped"):
        profile["skipped_when_written"] = len(entry["skipped"])
    return profile


def split_dataset(manifest: Manifest, split: str) -> ShardSplit:
    """The MLflow dataset of `split` of the shards at `manifest.root`."""
    uri = source_uri(manifest.root)
    with warnings.catch_warnings():  # file URIs match two registered local sources: same class
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    return ShardSplit(
        source=source,
        name=f"{manifest.name}/{split}",
        digest=split_digest(manifest.split(split)["shards"]),
        profile=split_profile(manifest, split),
    )


def training_contexts(train_splits: Sequence[str], val_split: str) -> list[tuple[str, str]]:
    """(split, context) pairs of a training run."""
    return [(split, TRAINING) for split in train_splits] + [(val_split, VALIDATION)]


def log_splits(
    client: Any, run_id: str, manifest: Manifest, uses: Sequence[tuple[str, str]]
) -> None:
    """Log each (split, context) of `uses` as an input of run `run_id`. A split used in two
    ways (trained on and validated on) is one input with both contexts ("training,validation"):
    MLflow keeps one input per dataset and run. An input the run already has is left as it is
    (a resumed run on unchanged shards adds nothing; on rebuilt shards, the new digests)."""
    contexts: dict[str, list[str]] = {}
    for split, context in uses:
        if context not in contexts.setdefault(split, []):
            contexts[split].append(context)
    root = source_uri(manifest.root)
    inputs = [
        DatasetInput(
            dataset=split_dataset(manifest, split)._to_mlflow_entity(),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, ",".join(used)), InputTag(ROOT_TAG, root)],
        )
        for split, used in contexts.items()
    ]
    client.log_inputs(run_id, datasets=inputs)


def describe_inputs(run: Any) -> list[str]:
    """One line per dataset input of `run` (an mlflow Run): name, context, digest, source."""
    lines = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        tags = {tag.key: tag.value for tag in item.tags}
        dataset = item.dataset
        try:
            logged_source = json.loads(dataset.source).get("uri", dataset.source)
        except (ValueError, AttributeError):
            logged_source = dataset.source
        context = tags.get(MLFLOW_DATASET_CONTEXT, "input")
        lines.append(f"{dataset.name} ({context}, digest {dataset.digest}, "
                     f"{tags.get(ROOT_TAG, logged_source)})")
    return lines
