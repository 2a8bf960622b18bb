"""The S3 filesystem every reader and writer of this project uses, endpoint included.

pyarrow's `S3FileSystem()` ignores the AWS SDK's endpoint variables and, without a region, asks
the network for the bucket's region (fails offline). So the endpoint and region are read here,
once, from the standard variables: `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`), e.g.
`http://127.0.0.1:9000` for MinIO, moto or another S3-compatible store, and `AWS_REGION` (or
`AWS_DEFAULT_REGION`, default us-east-1). boto3 (MLflow's S3 artifacts) reads the same
variables. `segnext train` sets `AWS_ENDPOINT_URL_S3` from the config's `storage.endpoint`.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import pyarrow.fs as pafs

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
DEFAULT_REGION = "us-east-1"


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


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem on the configured endpoint and region (picklable: Ray tasks get it)."""
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
