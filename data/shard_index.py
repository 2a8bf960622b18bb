"""The sample index of a split: where each sample's members lie in its shard, as one small file.

The batch plan picks samples by number, so readers need each sample's byte range. Finding them
by reading tar headers costs one small read per member (six ranged GETs per sample on S3,
seconds per thousand samples on loopback, hours at a million on real S3). The writer therefore
records the index with the shards: one Parquet file per split (`{split}-index-{sha8}.parquet`,
named with its sha256 in the manifest's split entry), so a run's start-up reads the manifest and
one file per split, whatever the number of samples.

Shards written before the index existed are scanned once, many shards at a time on threads (the
work is waiting on storage, and it runs on the driver before Ray starts, so that a damaged
dataset is refused in seconds), and the result is cached beside the shards
(`.segnext-index-{split}-{fingerprint}.parquet`, named by the split's shard list and checksums,
so a cache can never describe other shards) when the location is writable.

Rows: shard (position in the split's shard list), key, and the data offset and size of the
image and the mask member. The schema metadata holds the shard fingerprint the index was built
from; an index that does not match the manifest is refused, naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from data.manifest import MASK_MEMBER, Manifest, join_root
from data.samples import FIX_HINT, SampleReadError

logger = logging.getLogger(__name__)

SCAN_THREADS = 16  # shards scanned at once (latency bound: each header read is a round trip)
TAR_BLOCK = 512
FINGERPRINT_KEY = b"segnext.shards"
SCHEMA = pa.schema([
    ("shard", pa.int32()), ("key", pa.string()),
    ("image_at", pa.int64()), ("image_bytes", pa.int64()),
    ("mask_at", pa.int64()), ("mask_bytes", pa.int64()),
])
# webdataset's key rule: the key is the path up to the first dot of the file name.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class SampleEntry(NamedTuple):
    """One sample of one shard: key and (data offset, size) of its image and mask members."""

    key: str
    image_at: int
    image_bytes: int
    mask_at: int
    mask_bytes: int


def fingerprint(shards: Sequence[dict], *, content: bool = False) -> str:
    """sha256 over the split's shard layout (path, bytes, samples), as the manifest has it;
    `content` adds each shard's sha256 (what names a cache: other bytes, another cache). The
    layout is what an index must agree with: offsets are checked against headers at read."""
    listing = [[s["path"], int(s["bytes"]), int(s["num_samples"]),
                *([s["sha256"]] if content else [])] for s in shards]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def index_file_name(split: str, sha256: str) -> str:
    return f"{split}-index-{sha256[:8]}.parquet"


def cache_file_name(split: str, shards: Sequence[dict]) -> str:
    return f".segnext-index-{split}-{fingerprint(shards, content=True)[:16]}.parquet"


def index_file_pattern(split: str) -> re.Pattern:
    """Names of the split's index files and index caches (for the writer's clean-up)."""
    name = re.escape(split)
    return re.compile(rf"^(?:{name}-index-[0-9a-f]{{8}}|\.segnext-index-{name}-[0-9a-f]{{16}})"
                      r"\.parquet$")


# ------------------------------------------------------------------------------ scanning


def scan_members(handle: object, url: str, image_member: str) -> list[SampleEntry]:
    """The samples of one open tar (a seekable binary file), from its headers alone, in tar
    order. A missing member, a repeated one or an unreadable header raises SampleReadError."""
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            members = [member for member in tar.getmembers() if member.isfile()]
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SampleReadError(f"{url}: shard is unreadable ({error}); {FIX_HINT}") from error
    grouped: dict[str, dict[str, tuple[int, int]]] = {}
    for member in members:
        match = _KEY_SUFFIX.match(member.name)
        if match is None:
            continue
        key, suffix = match.groups()
        parts = grouped.setdefault(key, {})
        if suffix in parts:
            raise SampleReadError(f"{url}: sample '{key}' repeats member '{suffix}'; {FIX_HINT}")
        parts[suffix] = (member.offset_data, member.size)
    entries = []
    for key, parts in grouped.items():
        for needed in (image_member, MASK_MEMBER):
            if needed not in parts:
                raise SampleReadError(f"{url}: sample '{key}' has no '{needed}' member; {FIX_HINT}")
        entries.append(SampleEntry(key, *parts[image_member], *parts[MASK_MEMBER]))
    return entries


def scan_shard(filesystem: pafs.FileSystem, path: str, url: str, image_member: str
               ) -> list[SampleEntry]:
    """`scan_members` of the shard at `path` in `filesystem`."""
    try:
        with filesystem.open_input_file(path) as handle:
            return scan_members(handle, url, image_member)
    except OSError as error:
        raise SampleReadError(f"{url}: shard is unreadable ({error}); {FIX_HINT}") from error


def index_table(per_shard: Sequence[Sequence[SampleEntry]], shards: Sequence[dict]) -> pa.Table:
    """The index of a split from each shard's entries (shard i of `shards` = `per_shard[i]`)."""
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for number, entries in enumerate(per_shard):
        columns["shard"].extend([number] * len(entries))
        for name, values in zip(SampleEntry._fields, zip(*entries, strict=True) if entries
                                else [()] * 5, strict=True):
            columns[name].extend(values)
    table = pa.table(columns, schema=SCHEMA)
    return table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint(shards).encode()})


def table_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes of an index table (zstd; keys and offsets compress well)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_index_file(out: Path, split: str, per_shard: Sequence[Sequence[SampleEntry]],
                     shards: Sequence[dict]) -> dict:
    """Write the split's index file into the local folder `out` (fsynced; named by its
    sha256) and return the manifest's entry for it."""
    data = table_bytes(index_table(per_shard, shards))
    digest = hashlib.sha256(data).hexdigest()
    name = index_file_name(split, digest)
    with open(out / name, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    return {"path": name, "bytes": len(data), "sha256": digest}


# ------------------------------------------------------------------------------- loading


def load_split_index(
    manifest: Manifest, split: str, filesystem: pafs.FileSystem, base: str, image_member: str
) -> tuple[pa.Table, dict[int, SampleReadError]]:
    """(index, {shard position: why it could not be scanned}) of `split`: the file the manifest
    names, else the cache beside the shards, else a parallel scan of the shards (cached where
    the location is writable and every shard scanned). A named or cached index reports no
    problems: a shard that does not match it fails where it is read, by name."""
    entry = manifest.split(split)
    shards = entry["shards"]
    named = entry.get("index")
    if named is not None:
        url = join_root(manifest.root, named["path"])
        data = _read(filesystem, f"{base}/{named['path']}", url)
        if hashlib.sha256(data).hexdigest() != named["sha256"]:
            raise SampleReadError(f"{url}: index differs from its sha256 in the manifest "
                                  f"(corrupt or rewritten); {FIX_HINT}")
        return _checked(pq.read_table(pa.BufferReader(data)), shards, url), {}
    cache = cache_file_name(split, shards)
    url = join_root(manifest.root, cache)
    try:
        data = _read(filesystem, f"{base}/{cache}", url)
        return _checked(pq.read_table(pa.BufferReader(data)), shards, url), {}
    except FileNotFoundError:
        return _scan_and_cache(manifest, split, filesystem, base, image_member)
    except (SampleReadError, pa.ArrowException) as error:
        logger.warning("ignoring the index cache %s (%s); scanning the shards again", url, error)
        return _scan_and_cache(manifest, split, filesystem, base, image_member)


def _read(filesystem: pafs.FileSystem, path: str, url: str) -> bytes:
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except OSError as error:
        if "not found" in str(error).lower() or "does not exist" in str(error).lower():
            raise FileNotFoundError(url) from error
        raise SampleReadError(f"{url}: index is unreadable ({error}); {FIX_HINT}") from error


def _checked(table: pa.Table, shards: Sequence[dict], url: str) -> pa.Table:
    """`table` if it indexes exactly `shards` (fingerprint and per-shard sample counts)."""
    metadata = table.schema.metadata or {}
    if metadata.get(FINGERPRINT_KEY, b"").decode() != fingerprint(shards):
        raise SampleReadError(f"{url}: index was built for other shards than the manifest lists; "
                              f"{FIX_HINT}")
    if table.schema.remove_metadata() != SCHEMA:
        raise SampleReadError(f"{url}: index has columns {table.schema.names}, expected "
                              f"{SCHEMA.names}; {FIX_HINT}")
    counts = [0] * len(shards)
    for number, count in zip(*_value_counts(table), strict=True):
        if not 0 <= number < len(shards):
            raise SampleReadError(f"{url}: index names shard {number} of {len(shards)}; {FIX_HINT}")
        counts[number] = count
    for shard, count in zip(shards, counts, strict=True):
        if count != shard["num_samples"]:
            raise SampleReadError(
                f"{url}: index lists {count} samples for {shard['path']}, manifest says "
                f"{shard['num_samples']}; {FIX_HINT}")
    return table


def _value_counts(table: pa.Table) -> tuple[list[int], list[int]]:
    counted = table.column("shard").value_counts()
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def _scan_and_cache(
    manifest: Manifest, split: str, filesystem: pafs.FileSystem, base: str, image_member: str
) -> tuple[pa.Table, dict[int, SampleReadError]]:
    """Scan every shard of `split` (SCAN_THREADS at once) and cache the index beside them;
    shards that cannot be scanned get no rows and are returned with the reason (no cache)."""
    shards = manifest.split(split)["shards"]
    started = time.perf_counter()

    def scan(shard: dict) -> list[SampleEntry] | SampleReadError:
        url = join_root(manifest.root, shard["path"])
        try:
            entries = scan_shard(filesystem, f"{base}/{shard['path']}", url, image_member)
        except SampleReadError as error:
            return error
        if len(entries) != shard["num_samples"]:
            return SampleReadError(f"{url}: shard holds {len(entries)} samples, manifest says "
                                   f"{shard['num_samples']}; {FIX_HINT}")
        return entries

    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        scanned = list(pool.map(scan, shards))
    problems = {n: result for n, result in enumerate(scanned)
                if isinstance(result, SampleReadError)}
    table = index_table([[] if n in problems else entries for n, entries in enumerate(scanned)],
                        shards)
    if problems:
        return table, problems
    cache = cache_file_name(split, shards)
    url = join_root(manifest.root, cache)
    try:
        with filesystem.open_output_stream(f"{base}/{cache}") as stream:
            stream.write(table_bytes(table))
        where = f"cached at {url}; later starts read it"
    except OSError as error:
        where = f"not cached ({error}); every start scans again"
    logger.warning("indexed split '%s' (%d shards, %d samples) from the tar headers in %.1f s: %s",
                   split, len(shards), table.num_rows, time.perf_counter() - started, where)
    return table, {}
