"""The MLflow Model Registry: log a checkpoint as a pyfunc model, register it, move aliases.

`champion` is an alias that moves to a new version only when its validation mIoU beats the
current champion's (read from that version's `val_mIoU` tag); the comparison and its numbers go
in the version's description. "latest" is reserved by MLflow as an alias name: the newest
version is always `models:/segnext/latest`, which MLflow resolves to the highest version number.
Stages are deprecated in MLflow 3: aliases only (`models:/segnext@champion`).

The pyfunc is logged as "models from code": MLflow stores a three-line entry point that imports
`pipelines.serving.SegNeXtPyfunc` from the installed package, plus the checkpoint file as an
artifact, so loading the model unpickles nothing (the checkpoint is read with
weights_only=True). Class names and palette are in the model's metadata.

Two versions registered at the same instant (parallel Tune trials) may both read the old
champion before either moves it; the alias then lands on whichever sets it last.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager, redirect_stderr
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from data import storage as run_storage
from data.manifest import load_manifest
from pipelines import arg_types
from pipelines.console import current_log, log_only
from pipelines.meta import payload_meta
from pipelines.metric_names import SCORE  # the checkpoint metric the champion is chosen by

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mlflow.entities.model_registry import ModelVersion

# Imported inside the functions below, not here: MLflow (about 1.7 s of CPU at import, measured
# after `segnext --help`'s own imports, which include this module through
# pipelines.cli.SUBCOMMAND_MODULES), pipelines.tracking.runs (MLflow + matplotlib, 1.9 s),
# pipelines.checkpoint_io (torch, 1.6 s) and pandas (0.4 s).

CHAMPION = "champion"
MODEL_NAME = "model"  # the logged model's name within the run
PYFUNC_FORMAT = "segnext-pyfunc/1"
MAX_DESCRIPTION = 5000  # characters of a model version's description in MLflow's SQL stores
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")
ENTRY_POINT = '''"""Pyfunc entry point of a SegNeXt model (written by pipelines.tracking.registry)."""
import mlflow

from pipelines.serving import SegNeXtPyfunc

mlflow.models.set_model(SegNeXtPyfunc())
'''


@contextmanager
def _mlflow_chatter_to_log() -> Iterator[None]:
    """MLflow prints "Registered model ... already exists" / "Created version" lines and a
    download progress bar to stderr; under the quiet console they belong in the log file (our
    own summary line names the version)."""
    if current_log() is None:
        yield
        return
    captured = io.StringIO()
    try:
        with redirect_stderr(captured):
            yield
    finally:
        if captured.getvalue():
            log_only(captured.getvalue().rstrip())


def register_checkpoint(
    checkpoint_path: str | Path,
    *,
    run_id: str,
    registry_name: str = "segnext",
    tracking_uri: str | None = None,
) -> ModelVersion:
    """Log `checkpoint_path` as a pyfunc model under run `run_id` and register it.

    `checkpoint_path` is local or any URI pyarrow opens (s3://, gs://, run.storage_path's
    filesystem): a remote one is fetched into a temporary folder, copied into MLflow's artifact
    store, and the copy removed. The new version becomes `models:/<name>/latest`; alias
    `champion` moves to it when its val mIoU beats the current champion's (or there is no
    champion yet). Returns the version.
    """
    from pipelines.checkpoint_io import local_checkpoint

    with local_checkpoint(checkpoint_path) as local:
        return _register_local(local, run_id=run_id, registry_name=registry_name,
                               tracking_uri=tracking_uri)


def _register_local(
    checkpoint_path: Path, *, run_id: str, registry_name: str, tracking_uri: str | None
) -> ModelVersion:
    import mlflow
    from mlflow import MlflowClient

    from pipelines.checkpoint_io import load_checkpoint, resolve_checkpoint_file
    from pipelines.tracking.datasets import describe_inputs
    from pipelines.tracking.runs import resolve_tracking_uri

    file = resolve_checkpoint_file(checkpoint_path)
    payload = load_checkpoint(file)
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    run = client.get_run(run_id)  # a clear MlflowException when the run does not exist
    score = _val_miou(payload)

    with (using_tracking_uri(uri), _in_run(client, run_id), _mlflow_chatter_to_log(),
          tempfile.TemporaryDirectory() as folder):
        entry_point = Path(folder) / "segnext_pyfunc.py"
        entry_point.write_text(ENTRY_POINT)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(entry_point),
            artifacts={"checkpoint": str(file)},
            signature=_signature(),
            input_example=_input_example(),
            metadata=_model_metadata(payload, score),
            pip_requirements=_requirements(),
        )
        tags = _version_tags(payload, run, score)
        version = mlflow.register_model(info.model_uri, registry_name, tags=tags)
    promote, verdict = _champion_verdict(client, registry_name, score)
    if promote:
        client.set_registered_model_alias(registry_name, CHAMPION, version.version)
    client.update_model_version(
        registry_name, version.version,
        description=_description(payload, run_id, verdict, datasets=describe_inputs(run)),
    )
    _describe_registered_model(client, registry_name, payload)
    return client.get_model_version(registry_name, version.version)


def _describe_registered_model(client: Any, name: str, payload: dict[str, Any]) -> None:
    """The model page's own description (empty otherwise in the MLflow UI): what the model is
    and how its aliases move. Written once; a description someone edited is left alone."""
    if client.get_registered_model(name).description:
        return
    meta = payload_meta(payload)
    more = ", ..." if meta.num_classes > 12 else ""
    client.update_registered_model(
        name,
        description=(
            f"SegNeXt semantic segmentation, {meta.num_classes} classes "
            f"({', '.join(meta.class_names[:12])}{more})."
            f" @{CHAMPION} is the version with the best val mIoU so far; models:/{name}/latest is "
            "the newest. Each version's description says how it compared with the champion."
        ),
    )


def _val_miou(payload: dict[str, Any]) -> float | None:
    value = (payload.get("metrics") or {}).get(SCORE)
    return float(value) if value is not None and math.isfinite(float(value)) else None


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model, models:/ URIs) on `uri` inside the block;
    afterwards the tracking URI in effect before. (MLflow mirrors its global URI into
    $MLFLOW_TRACKING_URI, so both are put back.)"""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None if previous == env else previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def use_tracking_uri(configured: str | None = None) -> str:
    """MLflow's fluent API (models:/ and runs:/ references, artifact downloads) on the
    configured store (`resolve_tracking_uri`) for the rest of this process; returns its URI."""
    import mlflow

    from pipelines.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(configured)
    mlflow.set_tracking_uri(uri)
    return uri


def tracking_env() -> dict[str, str]:
    """$MLFLOW_TRACKING_URI for Ray workers: the store this process resolves models:/ URIs
    against, so that theirs resolve to the same models."""
    import mlflow

    return {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}


@contextmanager
def _in_run(client: Any, run_id: str) -> Iterator[None]:
    """Make `run_id` the active run, leaving its status as it was (it may still be training)."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield
    if status != "FINISHED":
        client.update_run(run_id, status=status)


def _signature() -> Any:
    """Outputs and the serving form only: an input schema would make MLflow reject the array
    and list inputs before the model sees them (pipelines.serving.payload documents all forms)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema(
            [ColSpec("string", "mask"), ColSpec("long", "height"), ColSpec("long", "width")]
        ),
    )


def _input_example() -> Any:
    """One small PNG, base64 in an "image" column: the request `mlflow models serve` takes."""
    import pandas as pd

    ramp = np.linspace(0, 255, 48, dtype=np.uint8)
    image = np.stack([np.tile(ramp, (32, 1))] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def _model_metadata(payload: dict[str, Any], score: float | None) -> dict[str, Any]:
    meta = payload_meta(payload)
    return {
        "format": PYFUNC_FORMAT,
        **meta.describe(),
        "crop_size": list(meta.crop_size),
        "iteration": int(payload.get("iteration", 0)),
        "val_mIoU": score,
    }


def _requirements() -> list[str]:
    """Pinned from this environment; the project itself is `segnext-ray` (not on PyPI)."""
    pins = []
    for package in ("segnext-ray", "torch", "mlflow", "numpy", "pandas", "pillow"):
        try:
            version = importlib_metadata.version(package).split("+")[0]
        except importlib_metadata.PackageNotFoundError:
            pins.append(package)
        else:
            pins.append(f"{package}=={version}")
    return pins


def _version_tags(payload: dict[str, Any], run: Any, score: float | None) -> dict[str, str]:
    meta, config = payload_meta(payload), payload.get("config") or {}
    return {
        "dataset": _dataset(config),
        "classes": json.dumps(list(meta.class_names)),
        "variant": meta.variant,
        "classifier": meta.classifier,
        "val_mIoU": "nan" if score is None else repr(score),  # exact: compared by later versions
        "run_id": run.info.run_id,
        "git_commit": _git_commit(run),
        "iteration": str(payload.get("iteration", "")),
    }


def _dataset(config: dict[str, Any]) -> str:
    """The shards' manifest name when the shards are reachable, else their location."""
    root = str(config.get("data.root") or "")
    if not root:
        return "unknown"
    try:
        return load_manifest(root).name
    except Exception:  # the tag is informative only; the root still names the data
        return root


def _git_commit(run: Any) -> str:
    tags = run.data.tags
    commit = tags.get("git_commit") or tags.get("mlflow.source.git.commit")
    if commit:
        return commit
    from pipelines.tracking.runs import git_commit

    return git_commit()


def _champion_score(client: Any, name: str) -> tuple[str | None, float | None]:
    """(version, val mIoU) of the current champion; (None, None) when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    try:
        score = float(champion.tags.get("val_mIoU", "nan"))
    except ValueError:
        score = float("nan")
    return champion.version, score if math.isfinite(score) else None


def _champion_verdict(client: Any, name: str, score: float | None) -> tuple[bool, str]:
    """Whether the new version becomes champion, and the sentence that says why."""
    version, best = _champion_score(client, name)
    new = "n/a" if score is None else f"{score:.4f}"
    if version is None:
        return True, f"val mIoU {new}; no champion yet: promoted to @{CHAMPION}."
    old = "n/a" if best is None else f"{best:.4f}"
    if score is not None and (best is None or score > best):
        gain = "" if best is None else f" ({score - best:+.4f})"
        return True, (
            f"val mIoU {new} vs champion v{version} {old}{gain}: promoted to @{CHAMPION}."
        )
    return False, f"val mIoU {new} vs champion v{version} {old}: not promoted; v{version} stays."


def _description(
    payload: dict[str, Any], run_id: str, verdict: str, *, datasets: list[str] | None = None
) -> str:
    """What the version is, the champion verdict, and the datasets its run logged (name,
    context, digest, source: `pipelines.tracking.datasets.describe_inputs`)."""
    meta = payload_meta(payload)
    text = (
        f"SegNeXt-{meta.variant} ({meta.classifier} classifier), "
        f"{meta.num_classes} classes, iteration {payload.get('iteration', '?')} of run "
        f"{run_id}. {verdict}"
    )
    if datasets:
        text += "\n\nDatasets: " + "; ".join(datasets) + "."
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 4] + " ..."


ONNX_ARTIFACT = "model.onnx"  # the ONNX file's name inside a registered version's model folder


def attach_onnx(
    onnx_file: str | Path, *, registry_name: str, version: str, tracking_uri: str | None = None
) -> ModelVersion:
    """Add an exported ONNX file (`segnext export --register`) to a registered version's model
    folder, beside its MLmodel, so `models:/NAME/VERSION` holds both flavours and
    `models:/NAME/VERSION/model.onnx` the ONNX one; tags `onnx` (that URI) and `onnx_sha256`."""
    from mlflow import MlflowClient

    from pipelines.tracking.runs import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    model_version = client.get_model_version(registry_name, version)
    # SQLite stores leave model_id empty; the source is then the logged model's models:/m-... URI
    source = model_version.source or ""
    model_id = model_version.model_id or (
        source.removeprefix("models:/") if source.startswith("models:/m-") else None
    )
    if model_id is None:
        raise ValueError(
            f"{registry_name} v{version} was registered from {source}, not from a logged model "
            "(MLflow 3); re-register it with `segnext register` to attach an ONNX file"
        )
    digest = hashlib.sha256(Path(onnx_file).read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as folder:
        named = Path(folder) / ONNX_ARTIFACT
        shutil.copyfile(onnx_file, named)
        client.log_model_artifact(model_id, str(named))
    uri = f"models:/{registry_name}/{model_version.version}/{ONNX_ARTIFACT}"
    client.set_model_version_tag(registry_name, model_version.version, "onnx", uri)
    client.set_model_version_tag(registry_name, model_version.version, "onnx_sha256", digest)
    return client.get_model_version(registry_name, model_version.version)


def fetch_onnx(model: str | Path) -> str:
    """A local path for an ONNX reference: a local `.onnx` file as it is, an MLflow artifact
    URI (`models:/segnext/3/model.onnx`, what `attach_onnx` tags) downloaded first. MLflow
    imports no torch, so the ONNX path of `segnext predict` stays torch-free."""
    text = str(model)
    if ":/" in text and not Path(text).exists():
        import mlflow.artifacts

        text = mlflow.artifacts.download_artifacts(text)
    return text


def registered_version(reference: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """(name, version) of `models:/NAME/VERSION`, `models:/NAME@ALIAS` or `models:/NAME/latest`
    (ValueError for any other reference, or a name without versions)."""
    from mlflow import MlflowClient

    from pipelines.tracking.runs import resolve_tracking_uri

    match = MODEL_URI.match(reference)
    if match is None:
        raise ValueError(
            f"--register needs --model models:/NAME/VERSION or models:/NAME@ALIAS, got {reference}"
        )
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    name, version, alias = match["name"], match["version"], match["alias"]
    if alias is not None:
        return name, str(client.get_model_version_by_alias(name, alias).version)
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"{reference}: registered model {name!r} has no versions")
        return name, str(max(int(v.version) for v in versions))
    return name, str(client.get_model_version(name, version).version)


# ---------------------------------------------------------------------------------- command


def find_run_checkpoint(run: Any, which: str) -> str:
    """The `best` (highest val mIoU) or `latest` (highest iteration) checkpoint of a run: a
    local path or a URI (s3://...) on run.storage_path's filesystem.

    `best` is the run's `best_checkpoint` tag (set by `segnext train`) when its folder still
    exists; otherwise the Ray checkpoint folders `<run.storage_path>/<Ray run name>/checkpoint_*`
    are searched.
    """
    from pipelines.checkpoint_io import CHECKPOINT_FILE, checkpoint_files, load_checkpoint
    from pipelines.tracking.runs import RUN_NAME_TAG, project_root

    tagged = run.data.tags.get("best_checkpoint")
    if which == "best" and tagged and run_storage.exists(tagged):
        return tagged
    storage = run.data.params.get("run.storage_path")
    name = run.data.tags.get(RUN_NAME_TAG)
    if not storage or not name:
        raise FileNotFoundError(
            f"run {run.info.run_id} records no checkpoint location (param run.storage_path and "
            f"tag {RUN_NAME_TAG}); pass --checkpoint PATH"
        )
    candidates = (
        [storage]
        if run_storage.is_remote(storage) or Path(storage).is_absolute()
        else [
            str(Path.cwd() / storage),
            str(project_root() / storage),
        ]
    )
    files = []
    for base in candidates:
        files = checkpoint_files(run_storage.join(base, name))
        if files:
            break
    if not files:
        where = " or ".join(run_storage.join(base, name) for base in candidates)
        raise FileNotFoundError(
            f"no checkpoint_*/{CHECKPOINT_FILE} under {where} for run {run.info.run_id}; "
            "pass --checkpoint PATH"
        )
    if which == "latest":
        return max(files, key=lambda f: int(load_checkpoint(f)["iteration"]))
    scores = {f: _val_miou(load_checkpoint(f)) for f in files}
    return max(files, key=lambda f: -math.inf if scores[f] is None else scores[f])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register a training run's checkpoint in the MLflow Model Registry",
        description="Log a run's checkpoint as a pyfunc model, register it, set @latest, and "
        "move @champion if its val mIoU beats the champion's.",
    )
    parser.add_argument("--run", required=True, help="MLflow run id of the training run")
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="best | latest | a checkpoint file or Ray checkpoint folder (default: best)",
    )
    parser.add_argument("--name", type=arg_types.registry_name, default="segnext",
                        help="registered model name")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or runs/mlflow.db"
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from pipelines.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if args.checkpoint in ("best", "latest"):
        path = find_run_checkpoint(MlflowClient(uri).get_run(args.run), args.checkpoint)
    else:
        path = args.checkpoint  # a local path or a URI (s3://...)
    version = register_checkpoint(path, run_id=args.run, registry_name=args.name, tracking_uri=uri)
    aliases = ", ".join(f"@{alias}" for alias in version.aliases) or "none"
    print(f"registered {args.name} v{version.version} from {path} (aliases: {aliases})")
    print(version.description)
    print(f"load it with mlflow.pyfunc.load_model('models:/{args.name}/{version.version}')")
    return 0
