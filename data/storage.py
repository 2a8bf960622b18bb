"""Filesystems and URIs: local paths, s3:// and gs:// through pyarrow, the S3 endpoint, checks.

One home for where data lives, so that the shard readers and writers, Ray Train's run storage,
registration, `segnext eval`, predict and `--resume` all open a location the same way.

pyarrow's `S3FileSystem()` ignores the AWS SDK's endpoint variables and, without a region, asks
the network for the bucket's region (fails offline). So the endpoint and region are read here,
once, from the standard variables: `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`), e.g.
`http://127.0.0.1:9000` for MinIO, moto or another S3-compatible store, and `AWS_REGION` (or
`AWS_DEFAULT_REGION`, default us-east-1). boto3 (MLflow's S3 artifacts) and the Ray workers read
the same variables; `configure_endpoint` exports the config's `storage.endpoint` as
`AWS_ENDPOINT_URL_S3`. `preflight` runs in the driver before any Ray worker starts: an
unreachable endpoint, a missing bucket or bad credentials stop the run there, with the URI and
the fix in the message (a `StorageError`, which the commands report as a configuration error).

pyarrow is imported inside the functions that open a filesystem: `pyarrow.fs` costs 0.13-0.5 s
(measured with `python -X importtime`), and `segnext --help` imports this module (through
`pipelines.config`, for `StorageError`) without opening any storage.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import pyarrow.fs as pafs

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
DEFAULT_REGION = "us-east-1"
# pyarrow filesystem type -> URI scheme (the inverse of resolve_filesystem)
SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}
ENDPOINT_HINT = (
    f"for MinIO or another S3-compatible store set storage.endpoint (or ${ENDPOINT_VARIABLES[0]}) "
    "to its URL, e.g. http://127.0.0.1:9000"
)


class StorageError(ValueError):
    """A storage location cannot be reached, read or written; the message names URI and fix."""


# ---------------------------------------------------------------------------------- endpoint


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment; None: AWS itself."""
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def endpoint_env() -> dict[str, str]:
    """The endpoint variables set here, for Ray workers on other nodes (they do not inherit
    this process's environment)."""
    return {name: os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name)}


def configure_endpoint(endpoint: str | None) -> dict[str, str]:
    """Export `storage.endpoint` (when set) for this process; return the endpoint variables
    now in effect, which Ray workers need in their runtime environment."""
    if endpoint:
        os.environ[ENDPOINT_VARIABLES[0]] = endpoint
    return endpoint_env()


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem on the configured endpoint and region (picklable: Ray tasks get it)."""
    import pyarrow.fs as pafs  # see the module docstring

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    endpoint = s3_endpoint()
    if endpoint is None:
        return pafs.S3FileSystem(region=region)
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"S3 endpoint {endpoint!r} (from ${' or $'.join(ENDPOINT_VARIABLES)}) is not a URL "
            "like http://host:9000; fix storage.endpoint or the variable"
        )
    return pafs.S3FileSystem(region=region, endpoint_override=parts.netloc, scheme=parts.scheme)


# ---------------------------------------------------------------------------------- paths


def resolve_filesystem(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local dir or an s3:// / gs:// URI.

    S3 gets an explicit region and the configured endpoint (`s3_filesystem`).
    """
    import pyarrow.fs as pafs  # see the module docstring

    text = os.fspath(root)
    if text.startswith("s3://"):
        return s3_filesystem(), text.removeprefix("s3://").rstrip("/")  # endpoint, region
    if "://" in text:
        filesystem, path = pafs.FileSystem.from_uri(text)
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(text)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); S3 on the configured endpoint and region."""
    return resolve_filesystem(uri)


def is_remote(uri: str | os.PathLike) -> bool:
    """A URI with a scheme (s3://, gs://, file://) rather than a local path."""
    return "://" in os.fspath(uri)


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
    import pyarrow.fs as pafs  # see the module docstring

    filesystem, path = resolve(uri)
    info = file_info(filesystem, path, os.fspath(uri), "read", key=key)
    return info.type != pafs.FileType.NotFound


# ---------------------------------------------------------------------------------- checks


def preflight(data_root: str, storage_path: str) -> None:
    """Fail in the driver, before Ray starts, when the shards under `data_root` cannot be read
    or the run storage `storage_path` cannot be written (config keys data.root and
    run.storage_path)."""
    # data.manifest reads its file through this module, so it is imported here, on use
    from data.manifest import MANIFEST_NAME

    if is_remote(data_root):
        check_readable(join(data_root, MANIFEST_NAME), key="data.root")
    check_writable(storage_path, key="run.storage_path")


def check_readable(uri: str, *, key: str) -> None:
    """`uri` (a file) exists and can be read; else a StorageError naming `key` and the fix."""
    import pyarrow.fs as pafs  # see the module docstring

    filesystem, path = resolve(uri)
    if file_info(filesystem, path, uri, "read", key=key).type == pafs.FileType.File:
        return
    bucket = path.split("/", 1)[0]
    if is_remote(uri) and file_info(filesystem, bucket, uri, "read", key=key).type != (
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
    import pyarrow as pa  # see the module docstring

    filesystem, path = resolve(uri)
    probe = f"{path.rstrip('/')}/.segnext-write-probe-{uuid.uuid4().hex}"
    try:
        if filesystem.type_name == "local":
            filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"segnext storage check\n")
        filesystem.delete_file(probe)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(explain_error(error, uri, "write", key=key)) from error


def file_info(
    filesystem: pafs.FileSystem, path: str, uri: str, action: str, *, key: str | None = None
) -> pafs.FileInfo:
    """`filesystem.get_file_info(path)`; a StorageError explaining `uri` when it fails."""
    import pyarrow as pa  # see the module docstring

    try:
        return filesystem.get_file_info(path)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(explain_error(error, uri, action, key=key)) from error


def explain_error(error: BaseException, uri: str, action: str, *, key: str | None = None) -> str:
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


def write_text(uri: str, text: str) -> None:
    """Write a small text file at `uri` (local path or URI), creating its folder."""
    filesystem, path = resolve(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def read_text(uri: str) -> str:
    """The text of a small file at `uri` (local path or URI)."""
    filesystem, path = resolve(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy a local file or folder (e.g. written shards) to `uri`, in parallel."""
    import pyarrow as pa  # see the module docstring
    import pyarrow.fs as pafs

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
        raise StorageError(explain_error(error, uri, "write")) from error
