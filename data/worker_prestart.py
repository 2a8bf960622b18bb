"""Start the read tasks' Ray worker processes before the stream needs them.

A Ray task runs in an idle worker process of its node, and a fresh cluster has none: the first
micro-batches wait while the raylet starts one process per concurrent read task (Python, Ray,
Ray Data and this package imported: seconds each, far more on a small busy machine; about 12 of
the 14 s to the first batch in `bench/data_scale.py`). Tiny tasks that ask for what a read task
asks, sent as soon as Ray is up and not waited for, make the raylet start those processes while
the caller does other work (Ray Train starting its worker group); once idle they stay in the
pool (`pipelines.cluster.RAYLET_CONFIG`) and the read tasks run in them.

The raylet hands a task only a worker of the same job and runtime environment (a hash of the
serialised environment), so `env_vars` must be exactly what the read tasks run with beyond the
sender's own environment: nothing when this process reads the stream, the Train worker's
variables when Train workers do (`pipelines.train.read_workers`).
"""

from __future__ import annotations

import math
import os

import ray

# Ray Data sends map tasks with its default scheduling strategy, SPREAD across nodes: so do these.
READ_SCHEDULING = "SPREAD"


def read_slots(free_cpus: float, read_cpus: float, concurrency: int | None = None,
               streams: int = 1) -> int:
    """How many read tasks run at once: the CPUs left to reading over one task's share, capped
    by the streams' task pools (`TrainStream.concurrency` each, None: no cap)."""
    slots = max(0, math.floor(free_cpus / read_cpus + 1e-9))
    return slots if concurrency is None else min(slots, concurrency * streams)


def prestart_read_workers(count: int, read_cpus: float,
                          env_vars: dict[str, str] | None = None) -> list[ray.ObjectRef]:
    """Send `count` no-op tasks shaped like read tasks (`read_cpus`, `env_vars`); returns their
    refs (each the worker's PID), which nobody needs to wait for."""
    options: dict = {"num_cpus": read_cpus, "scheduling_strategy": READ_SCHEDULING,
                     "max_retries": 0}
    if env_vars:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    task = _start_read_worker.options(**options)
    return [task.remote() for _ in range(count)]


@ray.remote
def _start_read_worker() -> int:
    import data.stream  # noqa: F401  (what a read task's worker imports first: Ray Data, PIL)

    return os.getpid()
