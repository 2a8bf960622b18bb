"""Ending a command's Ray: disconnect, and stop a private cluster with every process it ran.

Why: `ray.shutdown()` stops the processes a private cluster's head started (raylet, GCS,
dashboard, ...) but leaves the workers under the raylet to notice on their own that it is gone.
After SIGTERM to `segnext tune`, a trial's busy workers (its `SynchronizationActor`, Ray Train's
`PreemptionWatcher`, a Train worker) were re-parented to init and ran on for 10 s to a minute,
retrying the GCS, and the dashboard's forkserver outlived the command too. So the cluster's
processes (the head's processes and everything below them, read from /proc before the
shutdown) that are still alive after `ray.shutdown()` are killed. A joined cluster is only
disconnected from: its processes are not this command's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

ProcessId = tuple[int, int]  # (pid, start time in clock ticks): a reused pid is not the same


def stop_ray() -> None:
    """Disconnect this process from Ray (a no-op without Ray); a private cluster it started is
    stopped, none of its processes left running."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from pipelines.cluster import started_private_cluster

    cluster = private_cluster_processes() if started_private_cluster() else set()
    ray.shutdown()
    for pid, started in cluster:
        if start_time(pid) == started:  # still the same process
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def private_cluster_processes() -> set[ProcessId]:
    """The processes of the cluster this process started: the head's own (Ray's node object
    holds their Popen handles) and all their descendants (workers, actors, agents)."""
    from ray._private import worker

    node = worker._global_node
    if node is None:
        return set()
    roots = {info.process.pid for infos in node.all_processes.values() for info in infos}
    identities = {(pid, start_time(pid)) for pid in descendants(roots) | roots}
    return {(pid, started) for pid, started in identities if started}


def descendants(roots: set[int]) -> set[int]:
    """Every live process below `roots` (from /proc)."""
    children: dict[int, set[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields:
            children.setdefault(int(fields[1]), set()).add(int(stat.parent.name))
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {c for pid in frontier for c in children.get(pid, ())} - found
        found |= frontier
    return found


def _stat_fields(stat: Path) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, ...; None when gone or a zombie."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    return start_time(pid) != 0


def start_time(pid: int) -> int:
    """The process's start time (0 when it is gone): with the pid, names one process."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return int(fields[19]) if fields else 0
