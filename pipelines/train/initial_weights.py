"""Start a run from the weights of a checkpoint of this project (`model.init_from`).

`model.init_part` says what is taken: `model` (every tensor: same variant, classifier and
number of classes) or `encoder` (the MSCAN backbone only: any classes, the decoder starts
fresh). Only the weights are taken; the optimizer, schedule and iteration start anew.

The driver resolves the source once (`resolve_source`): a `models:/NAME@ALIAS` reference is
looked up in the MLflow registry and its checkpoint copied under `run.storage_path`, a relative
path becomes absolute, so every worker gets a plain path or s3:// URI; `check_source` then loads
it into the driver's dry-built model, so a wrong file fails before Ray starts. Workers apply it
(`apply_source`) only when Ray has no checkpoint of the run's own to restore.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from pipelines.config import ConfigError

ENCODER_PREFIX = "backbone."
FOLDER = "warm-start"  # under run.storage_path: registered checkpoints copied for the workers


class WarmStartMissing(ConfigError):
    """The source does not exist (no such file, registered model, version or alias)."""


def resolve_source(source: str, *, tracking_uri: str | None, storage_path: str) -> str:
    """A path or URI every worker can read for `source`; WarmStartMissing when it is not there."""
    from pipelines import storage

    if source.startswith("models:/"):
        return _registered_checkpoint(source, tracking_uri, storage_path)
    if storage.is_remote(source):
        if not storage.exists(source, key="model.init_from"):
            raise WarmStartMissing(f"model.init_from {source} does not exist; fix the URI")
        return source
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise WarmStartMissing(
            f"model.init_from {path} does not exist; pass a checkpoint.pt, a Ray checkpoint "
            "folder, an s3:// URI or models:/NAME@ALIAS"
        )
    return str(path)


def _registered_checkpoint(source: str, tracking_uri: str | None, storage_path: str) -> str:
    from mlflow.exceptions import MlflowException

    from pipelines import storage
    from pipelines.inference.segmenter import resolve_model
    from pipelines.tracking.registry import using_tracking_uri
    from pipelines.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    try:
        with using_tracking_uri(uri):
            local = Path(resolve_model(source).checkpoint)
    except MlflowException as error:
        alias_missing = "alias" in error.message and "not found" in error.message
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or alias_missing:
            raise WarmStartMissing(
                f"model.init_from {source}: not in the registry of {uri} ({error.message})"
            ) from None
        raise ConfigError(f"model.init_from {source}: {error.message}") from None
    except ValueError as error:  # an MLflow model not logged by `segnext register`
        raise ConfigError(f"model.init_from {source}: {error}") from None
    file = local / "checkpoint.pt" if local.is_dir() else local
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    target = storage.join(storage_path, FOLDER, digest, "checkpoint.pt")
    if storage.is_remote(target):
        if not storage.exists(target):
            storage.upload(file, target)
    elif not Path(target).is_file():
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        partial = f"{target}.{os.getpid()}.tmp"
        shutil.copyfile(file, partial)
        os.replace(partial, target)  # atomic: a reader never sees half a file
    print(f"[segnext] model.init_from {source} -> {target}", flush=True)
    return target


def check_source(source: str, part: str, model: nn.Module) -> None:
    """Load `source` into the driver's dry-built `model`: a ConfigError names what differs."""
    from pipelines.checkpoint_io import CheckpointError, load_checkpoint

    try:
        payload = load_checkpoint(source)
    except CheckpointError as error:
        raise ConfigError(f"model.init_from: {error}") from None
    meta = payload["meta"]  # a ModelMeta, checked by load_checkpoint
    if part == "model":
        for key, theirs, ours in (
            ("num_classes", meta.num_classes, model.num_classes),
            ("variant", meta.variant, model.variant),
            ("classifier", meta.classifier, model.classifier_kind),
        ):
            if theirs != ours:
                raise ConfigError(
                    f"model.init_from {source} has {key} {theirs!r}, this run "
                    f"{ours!r}: the whole model cannot be taken; set model.init_part=encoder "
                    "to take its encoder only, or start from a matching checkpoint"
                )
    elif meta.variant != model.variant:
        raise ConfigError(
            f"model.init_from {source} is SegNeXt-{meta.variant}, this run "
            f"SegNeXt-{model.variant}: set model.variant={meta.variant} to take its encoder"
        )
    try:
        apply_weights(model, payload["model"], part)
    except ValueError as error:
        raise ConfigError(f"model.init_from {source}: {error}") from None


def apply_source(model: nn.Module, source: str, part: str) -> str:
    """Load the weights of checkpoint `source` into `model` (a worker, before training)."""
    from pipelines.checkpoint_io import load_checkpoint

    count = apply_weights(model, load_checkpoint(source)["model"], part)
    return f"{count} tensors ({part}) from {source}"


def apply_weights(model: nn.Module, state: dict[str, Any], part: str) -> int:
    """Copy `state` (all of it, or its encoder) into `model`; ValueError on any mismatch."""
    own = model.state_dict()
    if part == "encoder":
        state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        own = {k: v for k, v in own.items() if k.startswith(ENCODER_PREFIX)}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(
            f"the {part} tensors differ: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise ValueError(
                f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=part == "model")
    return len(state)
