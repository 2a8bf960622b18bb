"""Whole shards from object storage on local disk, shared by the read tasks of a node.

A read task needs a handful of samples spread over many shards. Read in place from S3 that is
one ranged GET per sample per epoch (with the latency of each on the read path); here a task
that needs a shard the node does not hold downloads all of it once (in `CHUNK_BYTES` reads), and
every later read of any sample in it, by any task of the node, is a local `pread`. Requests per
sample fall to (shards downloaded) / (samples read), a few in a thousand for 1000-sample shards.

The cache is a directory of `<sha1 of the shard path>.tar` files, bounded by `capacity` bytes:
after a download, least-recently-used shards are deleted until the total fits (a reader holding
an evicted shard open keeps reading it: POSIX unlinks only the name). Downloads go to a
temporary name and are renamed into place, under a per-shard `flock`, so tasks racing for one
shard download it once and a killed download never leaves a partial shard behind. The driver
removes each node's cache directory at the end of a run (`remove_node_caches`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pyarrow import fs as pafs

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # bytes per GET of a download (memory held per downloading task)


@dataclass(frozen=True)
class ShardCache:
    """A node-local, size-bounded directory of whole shards (picklable: one per run)."""

    directory: str
    capacity: int  # bytes

    def open(self, filesystem: pafs.FileSystem, path: str, size: int) -> BinaryIO:
        """A local, seekable file holding the `size`-byte shard at `path` in `filesystem`,
        downloaded first if this node does not hold it."""
        if size > self.capacity:
            raise OSError(f"shard of {size} bytes does not fit data.cache_bytes={self.capacity}")
        folder = Path(self.directory)
        folder.mkdir(parents=True, exist_ok=True)
        local = folder / f"{hashlib.sha1(path.encode()).hexdigest()}.tar"
        handle = _open_if_complete(local, size)
        if handle is not None:
            return handle
        with _locked(local.with_suffix(".lock")):
            handle = _open_if_complete(local, size)  # another task finished it meanwhile
            if handle is not None:
                return handle
            _download(filesystem, path, size, local)
            handle = open(local, "rb")  # noqa: SIM115 (returned to the caller, who closes it)
        self._evict(keep=local)
        return handle

    def _evict(self, keep: Path) -> None:
        """Delete least-recently-used shards until the cache fits its capacity."""
        folder = Path(self.directory)
        with _locked(folder / ".evict.lock"):
            shards = []
            for entry in os.scandir(folder):
                if entry.name.endswith(".tar") and entry.path != str(keep):
                    with contextlib.suppress(FileNotFoundError):
                        stat = entry.stat()
                        shards.append((stat.st_atime, stat.st_size, entry.path))
            total = sum(size for _, size, _ in shards) + keep.stat().st_size
            for _, size, name in sorted(shards):
                if total <= self.capacity:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
                    total -= size
                    logger.info("shard cache %s: evicted %s (%d bytes)", folder, name, size)


def _open_if_complete(local: Path, size: int) -> BinaryIO | None:
    """The cached shard, opened, if it is there at full size; marks it recently used."""
    try:
        handle = open(local, "rb")  # noqa: SIM115 (returned open)
    except FileNotFoundError:
        return None
    if os.fstat(handle.fileno()).st_size != size:
        handle.close()
        return None
    with contextlib.suppress(OSError):
        os.utime(local)  # LRU by access time, whatever the mount's atime policy
    return handle


def _download(filesystem: pafs.FileSystem, path: str, size: int, local: Path) -> None:
    partial = local.with_suffix(f".part-{os.getpid()}")
    try:
        with filesystem.open_input_file(path) as source, open(partial, "wb") as target:
            done = 0
            while done < size:
                chunk = source.read_at(min(CHUNK_BYTES, size - done), done)
                if not chunk:
                    raise OSError(f"shard ends at {done} of {size} bytes (cut short)")
                target.write(chunk)
                done += len(chunk)
        os.replace(partial, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_cache_directory(directory: str) -> bool:
    """Delete one node's cache directory (True if there was one)."""
    existed = os.path.isdir(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return existed


def remove_node_caches(directory: str) -> int:
    """Delete `directory` on every alive node of the connected Ray cluster (one task pinned to
    each); returns the number of nodes that held one."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remove = ray.remote(num_cpus=0)(remove_cache_directory)
    pending = [
        remove.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"],
                                                                          soft=False)).remote(
            directory)
        for node in ray.nodes() if node.get("Alive")
    ]
    return sum(ray.get(pending))
