"""How many CPU threads inference may use: the cores this process can actually run on.

`os.cpu_count()` (and torch's default thread count) reports the machine's cores, not the ones a
container's cgroup quota or a `taskset` affinity mask grants; oversubscribing a busy 2-core box
made one 480x360 image take 120 s instead of 7 s. `segnext predict` and the served model both
size their thread pools here. No torch import at module level: the ONNX path uses it too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

THREADS_ENV = "SEGNEXT_THREADS"  # explicit override, e.g. for a machine shared on purpose
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_cpus(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs granted by the cgroup quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`); None: no
    quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: the affinity mask, capped by the cgroup quota (rounded up),
    at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def inference_threads(requested: int | None = None) -> int:
    """`requested`, else $SEGNEXT_THREADS, else $OMP_NUM_THREADS, else `available_cpus()`."""
    for value, where in ((requested, "--threads"), (os.environ.get(THREADS_ENV), THREADS_ENV),
                         (os.environ.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS")):
        if value is None or value == "":
            continue
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"{where}={value!r}: expected a whole number of threads") from None
        if threads < 1:
            raise ValueError(f"{where}={value!r}: expected at least 1 thread")
        return threads
    return available_cpus()


def set_torch_threads(requested: int | None = None) -> int:
    """Size torch's intra-op pool with `inference_threads`; returns the count."""
    import torch

    threads = inference_threads(requested)
    torch.set_num_threads(threads)
    return threads
