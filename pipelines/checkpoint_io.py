"""Checkpoint files: one `checkpoint.pt` per Ray Train checkpoint folder.

The payload is a plain dict of tensors and built-in types, so `torch.load(weights_only=True)`
reads it without unpickling code; its "meta" is `ModelMeta.to_dict()` on disk and a checked
`ModelMeta` once loaded. Writes go to a temporary file renamed into place, so a crash
mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

import segnext
from pipelines.meta import FORMAT, EvalMeta, MetaError, ModelMeta, payload_meta

CHECKPOINT_FILE = "checkpoint.pt"
REQUIRED_KEYS = ("model", "iteration", "meta")


class CheckpointError(ValueError):
    """The file is missing, unreadable, or not a checkpoint written by this project."""


def save_checkpoint(path_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path_dir/checkpoint.pt` atomically; returns the file path.
    A `ModelMeta` under "meta" is written in its dict form."""
    if isinstance(payload.get("meta"), ModelMeta):
        payload = {**payload, "meta": payload["meta"].to_dict()}
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    target = path_dir / CHECKPOINT_FILE
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=path_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def resolve_checkpoint_file(path: str | Path) -> Path:
    """Accept a checkpoint folder (Ray's `checkpoint_...` dir) or the `.pt` file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; pass a Ray checkpoint folder holding {CHECKPOINT_FILE} "
            "or the file itself"
        )
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (weights only: no code is unpickled);
    its "meta" comes back as a checked `ModelMeta` (CheckpointError naming the file if not).

    `path` may be a URI (s3://, gs://): the checkpoint is fetched into a temporary folder."""
    from pipelines.storage import is_remote, local_checkpoint

    if is_remote(path):
        with local_checkpoint(path) as local:
            try:
                return load_checkpoint(local, map_location)
            except CheckpointError as error:  # name the URI, not the temporary copy
                raise CheckpointError(str(error).replace(str(local), str(path))) from None
    file = resolve_checkpoint_file(path)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message advises weights_only=False: never repeat that for a foreign file.
        if "GLOBAL" not in str(error):  # not a refused object: bytes that are no pickle at all
            raise CheckpointError(
                f"{file} is truncated, corrupt or not a torch checkpoint (no valid pickle); "
                "pass a complete checkpoint.pt written by `segnext train`"
            ) from None
        raise CheckpointError(
            f"{file} holds pickled Python objects beyond tensors, which the safe loader refuses "
            "(nothing in it was run); it is not a checkpoint written by `segnext train`. Use a "
            "checkpoint of this project; official SegNeXt weights go through "
            "segnext.load_official_weights"
        ) from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{file} is truncated, corrupt or not a torch checkpoint ({type(error).__name__}); "
            "pass a complete checkpoint.pt written by `segnext train` (a crashed copy or "
            "download? fetch it again)"
        ) from None
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        raise CheckpointError(
            f"{file} is a torch file but not a checkpoint of this project: it lacks the keys "
            f"{', '.join(REQUIRED_KEYS)}"
        )
    found = payload["meta"].get("format") if isinstance(payload["meta"], dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{file}: checkpoint format {found!r}, this code reads {FORMAT!r}")
    try:
        payload["meta"] = ModelMeta.from_dict(payload["meta"], source=str(file))
    except MetaError as error:
        raise CheckpointError(str(error)) from None
    return payload


def build_meta(
    *,
    variant: str,
    num_classes: int,
    classifier: str,
    classifier_kwargs: dict[str, Any],
    nmf: dict[str, Any],
    class_names: list[str],
    palette: list[list[int]],
    ignore_index: int,
    mean: list[float],
    std: list[float],
    crop_size: list[int],
    eval: EvalMeta | None = None,
) -> ModelMeta:
    """Everything needed to rebuild the model and run it on new images, without the config;
    numbers are coerced from what configs and manifests hold (e.g. numpy ints), then checked."""
    return ModelMeta(
        variant=variant,
        num_classes=int(num_classes),
        classifier=classifier,
        classifier_kwargs=dict(classifier_kwargs),
        nmf=dict(nmf),
        class_names=tuple(class_names),
        palette=tuple(tuple(int(v) for v in color) for color in palette),
        ignore_index=int(ignore_index),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        crop_size=tuple(int(v) for v in crop_size),
        eval=eval,
    )


def model_overrides(classifier_kwargs: dict[str, Any], nmf: dict[str, Any]) -> dict[str, Any]:
    """The `create_model(**overrides)` keywords for a model config or checkpoint meta."""
    overrides: dict[str, Any] = {}
    if classifier_kwargs:
        overrides["classifier_kwargs"] = dict(classifier_kwargs)
    overrides.update({f"nmf_{key}": value for key, value in nmf.items()})
    return overrides


def model_from_checkpoint(payload: dict[str, Any]) -> segnext.SegNeXt:
    """Rebuild the SegNeXt described by `payload["meta"]`, load its weights, eval mode."""
    meta = payload_meta(payload)
    model = segnext.create_model(
        meta.variant,
        meta.num_classes,
        classifier=meta.classifier,
        **model_overrides(meta.classifier_kwargs.to_dict(), meta.nmf.to_dict()),
    )
    model.load_state_dict(payload["model"])
    return model.eval()
