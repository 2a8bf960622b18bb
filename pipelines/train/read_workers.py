"""The training run's side of the read-worker prestart (`data/worker_prestart.py`; config
`data.prestart_workers`).

Each Train worker streams its share of the batch plan with Ray Data read tasks that it sends
itself, so they run with the Train worker's runtime environment: the job's, plus what Ray
Train's controller actor is given (the variables Train propagates from the driver and
RAY_WARN_BLOCKING_GET_INSIDE_ASYNC, `DataParallelTrainer._initialize_and_run_controller`),
plus `RunConfig.worker_runtime_env`. The prestart sends exactly those variables, or the
raylet would start new workers for the read tasks anyway; `tests/data/test_worker_prestart.py`
checks on a real TorchTrainer that the read tasks run in the prestarted processes.
"""

from __future__ import annotations

import logging

import ray
from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
from ray.train.v2._internal.constants import (
    DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
    get_env_vars_to_propagate,
)

from data.stream import TrainStream
from data.worker_prestart import prestart_read_workers, read_slots
from pipelines.cluster import WORKER_ENV

logger = logging.getLogger(__name__)


def worker_env_vars(storage_env: dict[str, str]) -> dict[str, str]:
    """`RunConfig.worker_runtime_env`'s variables: the cluster's worker set and the storage's."""
    return {**WORKER_ENV, **storage_env}


def train_task_env(worker_env: dict[str, str]) -> dict[str, str]:
    """The variables, beyond the job's, of a task sent by a Train worker whose
    `worker_runtime_env` has `worker_env` (see the module doc)."""
    controller = {RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR:
                  DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE, **get_env_vars_to_propagate()}
    return {**controller, **worker_env}


def prestart_train_read_workers(stream: TrainStream, workers: int, cpus_per_worker: float,
                                worker_env: dict[str, str]) -> int:
    """Start, without waiting, one worker process per read task that can run beside `workers`
    Train workers of `cpus_per_worker` on the CPUs available now; returns how many."""
    free = ray.available_resources().get("CPU", 0.0) - workers * cpus_per_worker
    count = read_slots(free, stream.read_cpus, stream.concurrency, streams=workers)
    prestart_read_workers(count, stream.read_cpus, train_task_env(worker_env))
    logger.info("starting %d read-task workers while the Train workers start", count)
    return count
