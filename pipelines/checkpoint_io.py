"""Checkpoint files: one `checkpoint.pt` per Ray Train checkpoint folder.

The payload is a plain dict of tensors and built-in types, so `torch.load(weights_only=True)`
reads it without unpickling code; its "meta" is `ModelMeta.to_dict()` on disk and a checked
`ModelMeta` once loaded. Writes go to a temporary file renamed into place, so a crash
mid-write never leaves a truncated checkpoint behind.

Ray Train writes checkpoints through a pyarrow filesystem, so everything that reads them later
(registration, `segnext eval`, predict, `--resume`) goes through the same one (data.storage):
a remote checkpoint is fetched into a temporary folder that disappears after use, never
assumed local.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch

import segnext
from data.storage import StorageError, explain_error, file_info, is_remote, resolve, uri_of
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


def is_checkpoint_uri(reference: str | os.PathLike) -> bool:
    """A URI on a filesystem pyarrow opens that is not an MLflow model folder (no `MLmodel`):
    read as a checkpoint file or Ray checkpoint folder. models:/, runs:/ and MLflow's own
    schemes are not; they go to MLflow."""
    text = os.fspath(reference)
    if not is_remote(text):
        return False
    try:
        filesystem, path = resolve(text)
    except (ValueError, pa.ArrowException):  # mlflow-artifacts://, http://: not a filesystem
        return False
    model_file = f"{path.rstrip('/')}/MLmodel"
    return file_info(filesystem, model_file, text, "read").type != pafs.FileType.File


@contextmanager
def local_checkpoint(reference: str | os.PathLike) -> Iterator[Path]:
    """A local path to the checkpoint file or folder `reference`: the path itself when it is
    local, else a copy fetched through pyarrow into a temporary folder removed on exit."""
    text = os.fspath(reference)
    if not is_remote(text):
        yield Path(text).expanduser()
        return
    filesystem, path = resolve(text)
    kind = file_info(filesystem, path, text, "read").type
    if kind == pafs.FileType.NotFound:
        raise CheckpointError(
            f"no checkpoint at {text}; pass a Ray checkpoint folder holding {CHECKPOINT_FILE} "
            "or the file itself"
        )
    with tempfile.TemporaryDirectory(prefix="segnext-checkpoint-") as folder:
        target = Path(folder) / (PurePosixPath(path).name or "checkpoint")
        if kind == pafs.FileType.Directory:
            target.mkdir()
        try:
            pafs.copy_files(
                path,
                str(target),
                source_filesystem=filesystem,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        except (OSError, pa.ArrowException) as error:
            raise StorageError(explain_error(error, text, "read")) from error
        yield target


def checkpoint_files(run_uri: str) -> list[str]:
    """`<run>/checkpoint_*/checkpoint.pt` under a Ray run folder, local or remote, sorted."""
    filesystem, path = resolve(run_uri)
    if file_info(filesystem, path, run_uri, "read").type != pafs.FileType.Directory:
        return []
    entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    files = [
        f"{entry.path}/{CHECKPOINT_FILE}"
        for entry in entries
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint_")
    ]
    found = [
        info.path for info in filesystem.get_file_info(files) if info.type == pafs.FileType.File
    ]
    return sorted(uri_of(filesystem, file) for file in found)


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


def model_from_checkpoint(
    payload: dict[str, Any], source: str = "checkpoint", decision: str | None = None
) -> segnext.SegNeXt:
    """Rebuild the SegNeXt described by `payload["meta"]`, load its weights, eval mode. Weights
    that do not fit that model are a CheckpointError naming `source` and the mismatch.

    `decision`: an integrated head's prediction rule in place of the saved one (the weights do
    not depend on it), to score one trained model under each rule."""
    meta = payload_meta(payload)
    classifier_kwargs = meta.classifier_kwargs.to_dict()
    if decision is not None:
        if meta.classifier != "integrated":
            raise CheckpointError(f"{source}: a decision rule is a choice of the integrated "
                                  f"head; this model's head is {meta.classifier}: drop it")
        classifier_kwargs["decision"] = decision
    model = segnext.create_model(
        meta.variant,
        meta.num_classes,
        classifier=meta.classifier,
        **model_overrides(classifier_kwargs, meta.nmf.to_dict()),
    )
    expected, given = model.state_dict(), payload["model"]
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [key for key in expected if key in given and given[key].shape != expected[key].shape]
    if missing or unexpected or reshaped:
        def sample(keys: list[str]) -> str:
            return f" (e.g. {', '.join(keys[:2])})" if keys else ""

        raise CheckpointError(
            f"{source}: its weights do not fit the SegNeXt-{meta.variant} {meta.classifier} "
            f"model its meta describes: {len(missing)} missing{sample(missing)}, "
            f"{len(unexpected)} unexpected{sample(unexpected)}, {len(reshaped)} of another "
            f"shape{sample(reshaped)}. Likely cause: the file was edited, or its weights and meta "
            "come from different models; use a checkpoint as `segnext train` wrote it"
        )
    model.load_state_dict(given)
    return model.eval()
