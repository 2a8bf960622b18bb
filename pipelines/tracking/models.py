"""Model references: what `--model` (and `model.init_from`) may name, resolved to a checkpoint.

A reference is a checkpoint (file, Ray checkpoint folder, or a URI such as s3://...), a local
MLflow model folder, or an MLflow model URI (`models:/segnext@champion`, `models:/segnext/3`,
`runs:/...`). MLflow models are downloaded and read through their checkpoint artifact. This
lives with the tracking code because resolving the MLflow forms needs MLflow, which the
inference core (`pipelines.inference.segmenter`) does without.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from pipelines.checkpoint_io import CheckpointError, is_checkpoint_uri, load_checkpoint
from pipelines.inference.segmenter import Segmenter
from pipelines.serving.pyfunc import CHECKPOINT_ARTIFACT
from pipelines.tracking.registry import using_tracking_uri


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference leads: its local checkpoint file, and the MLflow run that
    logged it (None for a bare checkpoint)."""

    reference: str
    checkpoint: Path | str  # str: a URI (s3://...), fetched when loaded
    run_id: str | None = None


def resolve_model(model: str | Path) -> ModelSource:
    """A checkpoint (file or Ray checkpoint folder), a local MLflow model folder, or a model
    URI (`models:/segnext@champion`, `models:/segnext/3`, or any other MLflow model URI);
    MLflow models are downloaded and read through their checkpoint artifact."""
    text = str(model)
    local = Path(text).expanduser()
    if is_checkpoint_uri(text):  # s3://.../checkpoint_0000100 under a run.storage_path
        return ModelSource(text, text)
    if ":/" in text and not local.exists():  # a URI: models:/..., runs:/..., s3://...
        return _mlflow_model(text, Path(mlflow.artifacts.download_artifacts(text)))
    if (local / "MLmodel").is_file():
        return _mlflow_model(text, local)
    return ModelSource(text, local)


def _mlflow_model(reference: str, model_dir: Path) -> ModelSource:
    info = mlflow.models.Model.load(str(model_dir))
    artifact = (info.flavors.get("python_function", {}).get("artifacts") or {}).get(
        CHECKPOINT_ARTIFACT
    )
    if artifact is None:
        raise ValueError(
            f"{reference} is an MLflow model but not one logged by `segnext register` (no "
            f"{CHECKPOINT_ARTIFACT!r} artifact); pass a segnext model or checkpoint"
        )
    return ModelSource(reference, model_dir / artifact["path"], info.run_id)


def load_segmenter(model: str | Path, *, device: str | None = None, **overrides: Any) -> Segmenter:
    """A Segmenter for any reference `resolve_model` takes. The checkpoint is read with
    weights_only=True (no pickle), and `overrides` (the keywords of `settings_from_checkpoint`,
    and an integrated head's `decision`) replace what the training run recorded."""
    payload = load_source(resolve_model(model))
    return Segmenter.from_checkpoint(payload, device=device, source=str(model), **overrides)


def load_source(source: ModelSource) -> dict[str, Any]:
    """`load_checkpoint` of a resolved reference; errors name the reference the user gave
    (`models:/segnext@champion`), not only the file MLflow downloaded."""
    try:
        return load_checkpoint(source.checkpoint)
    except CheckpointError as error:
        if str(source.reference) in str(error):
            raise
        raise CheckpointError(f"{source.reference}: {error}") from None


class ModelNotRegistered(LookupError):
    """No such registered model, version or alias in the tracking store."""


def registered_checkpoint_file(reference: str, tracking_uri: str) -> Path:
    """The (downloaded) checkpoint file of registered model `reference` (`models:/NAME@ALIAS`
    or `models:/NAME/VERSION`) in `tracking_uri`: ModelNotRegistered when it is not there,
    ValueError (message from MLflow) for any other refusal."""
    try:
        with using_tracking_uri(tracking_uri):
            local = Path(resolve_model(reference).checkpoint)
    except mlflow.exceptions.MlflowException as error:
        alias_missing = "alias" in error.message and "not found" in error.message
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or alias_missing:
            raise ModelNotRegistered(
                f"not in the registry of {tracking_uri} ({error.message})"
            ) from None
        raise ValueError(error.message) from None
    return local / "checkpoint.pt" if local.is_dir() else local
