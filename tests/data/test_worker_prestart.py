"""The read-worker prestart: as many workers as read tasks fit, and the read tasks run in them,
whether the driver reads the stream (the benchmarks) or Train workers do (`segnext train`).

"Run in them" is checked on a fresh private cluster: every read task ran in a worker process
launched before the read began. Nothing else sends tasks there before the read, so those
processes are the prestart's; a prestart whose runtime environment differed from the read
tasks' would leave the raylet to launch new workers at the read, and the check fails.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from data.stream import TrainStream, build_train_stream
from data.worker_prestart import prestart_read_workers, read_slots

READ_TASK = "MapBatches(ReadPlanned)"  # Ray Data's name for the stream's read tasks


def test_read_slots_are_the_read_tasks_that_fit() -> None:
    assert read_slots(2.0, 0.5) == 4
    assert read_slots(0.5, 0.25) == 2  # 2 CPUs less 2 Train workers of 0.75 (camvid-cpu)
    assert read_slots(0.3, 0.25) == 1
    assert read_slots(-1.0, 0.25) == 0  # Train takes more than is free now: none
    assert read_slots(16.0, 0.5, concurrency=3, streams=2) == 6  # capped by the task pools


@pytest.fixture
def fresh_cluster() -> Iterator[str]:
    """A private 2-CPU cluster with no worker started yet; its GCS address."""
    from data.stream import configure_data_context
    from pipelines.cluster import init_ray

    if ray.is_initialized():
        ray.shutdown()
    address = init_ray("local", num_cpus=2)
    configure_data_context()
    yield address
    ray.shutdown()


def _stream(root: Path) -> TrainStream:
    return build_train_stream(root, "train", crop_size=(40, 48), global_batch_size=8,
                              micro_batch_size=4, seed=5, read_cpus=0.25)


def _read_workers_launched_after(address: str, started_ms: float) -> tuple[set[int], set[int]]:
    """(the read tasks' worker PIDs, those of them launched at or after `started_ms`)."""
    from ray.util.state import list_tasks, list_workers

    deadline = time.monotonic() + 30
    while True:  # task events reach the GCS about a second late
        tasks = list_tasks(address=address, filters=[("name", "=", READ_TASK)], detail=True)
        # the worker's PID reaches the task's record a little after its state
        done = [task for task in tasks if task.state == "FINISHED" and task.worker_pid]
        if tasks and len(done) == len(tasks) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    pids = {task.worker_pid for task in done}
    launched = {worker.pid: worker.worker_launch_time_ms
                for worker in list_workers(address=address, detail=True, limit=1000)}
    # a worker missing from the table counts as launched at the read: the check fails
    return pids, {pid for pid in pids if launched.get(pid, float("inf")) >= started_ms}


@pytest.mark.slow
def test_read_tasks_run_in_the_prestarted_workers(fresh_cluster, synthetic_shards) -> None:
    stream = _stream(synthetic_shards)
    count = read_slots(2.0, stream.read_cpus)
    prestarted = set(ray.get(prestart_read_workers(count, stream.read_cpus)))
    started_ms = time.time() * 1000
    stream.dataset(world=1, rank=0, start=0, stop=4).take_all()
    pids, late = _read_workers_launched_after(fresh_cluster, started_ms)
    assert pids and not late, f"read tasks in workers launched at the read: {late}"
    assert prestarted <= set(_alive_worker_pids(fresh_cluster))  # still in the pool


@pytest.mark.slow
def test_train_workers_read_tasks_run_in_the_prestarted_workers(
        fresh_cluster, synthetic_shards, tmp_path) -> None:
    """The training path: the driver prestarts with the Train worker's environment
    (`pipelines.train.read_workers`), a TorchTrainer worker streams its share."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.read_workers import prestart_train_read_workers, worker_env_vars

    stream = _stream(synthetic_shards)
    worker_env = worker_env_vars({"SEGNEXT_TEST_STORAGE": "s3-settings"})
    assert prestart_train_read_workers(stream, 1, 1.0, worker_env) == 4  # 1 free CPU / 0.25

    def loop(config: dict) -> float:
        started_ms = time.time() * 1000
        config["stream"].dataset(world=1, rank=0, start=0, stop=4).take_all()
        return started_ms

    sigint = signal.getsignal(signal.SIGINT)  # fit() leaves Ray Train's handler behind
    try:
        result = TorchTrainer(
            loop, train_loop_config={"stream": stream},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1.0}),
            run_config=RunConfig(name="prestart", storage_path=str(tmp_path),
                                 worker_runtime_env={"env_vars": worker_env}),
        ).fit()
    finally:
        signal.signal(signal.SIGINT, sigint)
    pids, late = _read_workers_launched_after(fresh_cluster, result.return_value)
    assert pids and not late, f"read tasks in workers launched at the read: {late}"


def _alive_worker_pids(address: str) -> list[int]:
    from ray.util.state import list_workers

    return [worker.pid for worker in list_workers(
        address=address, filters=[("is_alive", "=", "True")], limit=1000)]
