"""A run's initial weights: official pretrained weights and/or a checkpoint of this project.

`model.pretrained` (official SegNeXt / ImageNet files) and `model.init_from` (a checkpoint of
this project) are both applied by `apply_initial_weights`, the one path a worker's fresh
model gets its starting weights through (a restored run takes its own checkpoint instead).

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

import segnext
from data import storage
from pipelines.checkpoint_io import CheckpointError, load_checkpoint
from pipelines.config import ConfigError, ModelConfig
from pipelines.tracking.models import ModelNotRegistered, registered_checkpoint_file
from pipelines.tracking.runs import resolve_tracking_uri

ENCODER_PREFIX = "backbone."
FOLDER = "warm-start"  # under run.storage_path: registered checkpoints copied for the workers


class WarmStartMissing(ConfigError):
    """The source does not exist (no such file, registered model, version or alias)."""


def resolve_source(source: str, *, tracking_uri: str | None, storage_path: str) -> str:
    """A path or URI every worker can read for `source`; WarmStartMissing when it is not there."""
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
    uri = resolve_tracking_uri(tracking_uri)
    try:
        file = registered_checkpoint_file(source, uri)
    except ModelNotRegistered as error:
        raise WarmStartMissing(f"model.init_from {source}: {error}") from None
    except ValueError as error:  # refused by MLflow, or a model not logged by `segnext register`
        raise ConfigError(f"model.init_from {source}: {error}") from None
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


def apply_initial_weights(model_cfg: ModelConfig, model: nn.Module, *, log: bool) -> None:
    """A worker's fresh model gets its initial weights (both sources resolved by the driver):
    official pretrained weights (`model.pretrained`, `segnext.load_official_weights`), then
    a checkpoint of this project (`model.init_from`); `log` prints what was loaded."""
    if model_cfg.pretrained:
        report = segnext.load_official_weights(model, model_cfg.pretrained)
        if log:
            print(f"[segnext] pretrained weights from {model_cfg.pretrained}: {report}")
    if model_cfg.init_from:
        report = apply_source(model, model_cfg.init_from, model_cfg.init_part)
        if log:
            print(f"[segnext] initial weights: {report}", flush=True)


def apply_source(model: nn.Module, source: str, part: str) -> str:
    """Load the weights of checkpoint `source` into `model` (a worker, before training)."""
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
