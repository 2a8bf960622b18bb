"""Run storage on any filesystem pyarrow opens (local, s3://, gs://): checks, fetch, upload.

Ray Train writes checkpoints through a pyarrow filesystem, so everything that reads them later
(registration, `segnext eval`, predict, `--resume`) goes through the same filesystem: a remote
checkpoint is fetched into a temporary folder that disappears after use, never assumed local.

The S3 endpoint (MinIO, moto, other S3-compatible stores) is the config's `storage.endpoint`,
exported as `AWS_ENDPOINT_URL_S3` so that the shard readers (`data.fs`), boto3 and the Ray
workers all see the same one. `preflight` runs in the driver before any Ray worker starts: an
unreachable endpoint, a missing bucket or bad credentials stop the run there, with the URI and
the fix in the message.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

from data.fs import ENDPOINT_VARIABLES, endpoint_env
from data.shards import MANIFEST_NAME, resolve_filesystem
from pipelines.checkpoint_io import CHECKPOINT_FILE, CheckpointError
from pipelines.config import ConfigError, ExperimentConfig

# pyarrow filesystem type -> URI scheme (the inverse of resolve_filesystem)
SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}
ENDPOINT_HINT = (
    f"for MinIO or another S3-compatible store set storage.endpoint (or ${ENDPOINT_VARIABLES[0]}) "
    "to its URL, e.g. http://127.0.0.1:9000"
)


class StorageError(ConfigError):
    """A storage location cannot be reached, read or written; the message names URI and fix."""


# ---------------------------------------------------------------------------------- paths


def is_remote(uri: str | os.PathLike) -> bool:
    """A URI with a scheme (s3://, gs://, file://) rather than a local path."""
    return "://" in os.fspath(uri)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); S3 on the configured endpoint and region."""
    return resolve_filesystem(uri)


def uri_of(filesystem: pafs.FileSystem, path: str) -> str:
    """The URI of `path` on `filesystem` (Ray reports checkpoint paths without the scheme)."""
    if filesystem.type_name == "local":
        return path
    scheme = SCHEMES.get(filesystem.type_name)
    if scheme is None:
        raise ValueError(f"no URI scheme known for a {filesystem.type_name} filesystem ({path})")
    return f"{scheme}://{path.lstrip('/')}"


def join(uri: str, *parts: str) -> str:
    """`uri/part/...` for a local path or a URI (URIs are not normalised)."""
    if not is_remote(uri):
        return str(Path(uri).joinpath(*parts))
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])


def exists(uri: str | os.PathLike, *, key: str | None = None) -> bool:
    """Whether a file or folder (for object stores: any object under the prefix) is there;
    a StorageError (naming config `key`) when the storage cannot be asked."""
    filesystem, path = resolve(uri)
    return _info(filesystem, path, os.fspath(uri), "read", key=key).type != pafs.FileType.NotFound


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
    return _info(filesystem, model_file, text, "read").type != pafs.FileType.File


# ---------------------------------------------------------------------------------- endpoint


def configure_endpoint(endpoint: str | None) -> dict[str, str]:
    """Export `storage.endpoint` (when set) for this process; return the endpoint variables
    now in effect, which Ray workers need in their runtime environment."""
    if endpoint:
        os.environ[ENDPOINT_VARIABLES[0]] = endpoint
    return endpoint_env()


# ---------------------------------------------------------------------------------- checks


def preflight(cfg: ExperimentConfig) -> None:
    """Fail in the driver, before Ray starts, when the shards cannot be read or the run
    storage cannot be written."""
    if is_remote(cfg.data.root):
        check_readable(join(cfg.data.root, MANIFEST_NAME), key="data.root")
    check_writable(cfg.run.storage_path, key="run.storage_path")


def check_readable(uri: str, *, key: str) -> None:
    """`uri` (a file) exists and can be read; else a StorageError naming `key` and the fix."""
    filesystem, path = resolve(uri)
    if _info(filesystem, path, uri, "read", key=key).type == pafs.FileType.File:
        return
    bucket = path.split("/", 1)[0]
    if is_remote(uri) and _info(filesystem, bucket, uri, "read", key=key).type != (
        pafs.FileType.Directory
    ):
        raise StorageError(
            f"{key}: {uri} is not readable: the bucket {bucket!r} does not exist. Fix: create "
            f"it, or correct {key}; {ENDPOINT_HINT}"
        )
    raise StorageError(
        f"{key}: {uri} does not exist. Fix: write it first (shards: segnext shards ... --out, "
        f"or upload a written folder), or correct {key}"
    )


def check_writable(uri: str, *, key: str) -> None:
    """Write and delete a probe object under `uri`: the only test that covers endpoint,
    bucket, credentials and permissions together."""
    filesystem, path = resolve(uri)
    probe = f"{path.rstrip('/')}/.segnext-write-probe-{uuid.uuid4().hex}"
    try:
        if filesystem.type_name == "local":
            filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"segnext storage check\n")
        filesystem.delete_file(probe)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(_explain(error, uri, "write", key=key)) from error


def _info(
    filesystem: pafs.FileSystem, path: str, uri: str, action: str, *, key: str | None = None
) -> pafs.FileInfo:
    try:
        return filesystem.get_file_info(path)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(_explain(error, uri, action, key=key)) from error


def _explain(error: BaseException, uri: str, action: str, *, key: str | None = None) -> str:
    """One sentence on what failed and the fix, from the AWS SDK's error code in `error`."""
    text = str(error)
    where = f"{key}: {uri}" if key else uri
    if "NETWORK_CONNECTION" in text or "Could not resolve" in text or "curlCode" in text:
        fix = (
            f"the storage endpoint cannot be reached; check the network, and {ENDPOINT_HINT} "
            f"(now: {os.environ.get(ENDPOINT_VARIABLES[0]) or 'AWS'})"
        )
    elif "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        fix = f"the bucket does not exist; create it or correct {key or 'the URI'}"
    elif any(
        code in text
        for code in (
            "ACCESS_DENIED",
            "INVALID_ACCESS_KEY_ID",
            "SIGNATURE_DOES_NOT_MATCH",
            "EXPIRED_TOKEN",
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "Forbidden",
            "PermissionError",
            "Permission denied",
        )
    ):
        fix = (
            f"access denied; give these credentials {action} access, or set valid ones "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance role)"
        )
    else:
        fix = f"check the URI, the credentials and the endpoint ({ENDPOINT_HINT})"
    first = text.splitlines()[0] if text else type(error).__name__
    return f"{where}: cannot {action} ({first}). Fix: {fix}"


# ---------------------------------------------------------------------------------- transfer


@contextmanager
def local_checkpoint(reference: str | os.PathLike) -> Iterator[Path]:
    """A local path to the checkpoint file or folder `reference`: the path itself when it is
    local, else a copy fetched through pyarrow into a temporary folder removed on exit."""
    text = os.fspath(reference)
    if not is_remote(text):
        yield Path(text).expanduser()
        return
    filesystem, path = resolve(text)
    kind = _info(filesystem, path, text, "read").type
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
            raise StorageError(_explain(error, text, "read")) from error
        yield target


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy a local file or folder (e.g. written shards) to `uri`, in parallel."""
    filesystem, path = resolve(uri)
    try:
        pafs.copy_files(
            os.fspath(local),
            path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=filesystem,
            use_threads=True,
        )
    except (OSError, pa.ArrowException) as error:
        raise StorageError(_explain(error, uri, "write")) from error


def checkpoint_files(run_uri: str) -> list[str]:
    """`<run>/checkpoint_*/checkpoint.pt` under a Ray run folder, local or remote, sorted."""
    filesystem, path = resolve(run_uri)
    if _info(filesystem, path, run_uri, "read").type != pafs.FileType.Directory:
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
