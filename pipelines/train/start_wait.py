"""A bounded, announced wait for a run's Ray Train workers.

Ray Train waits for its worker group's resources silently and without end: each attempt times
out after `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (60 s) and the controller tries again,
forever, and an elastic run short of `ray.min_workers` does not even try. A private cluster
refuses a request it can never hold up front (`pipelines.cluster.check_fits`); a joined one
may still grow (an autoscaler adding nodes), so there the driver watches instead: once the
cluster lacks the free resources, or after `ANNOUNCE_AFTER_S`, the console says what the run
waits for and for how long, and after `ray.start_timeout_s` without a live worker the run
stops with what was asked and what the cluster has.

The watch needs the driver's main thread (it stops `fit` with `_thread.interrupt_main`), and
reads Ray's actor table (`ray._private.state.actors`, listed in tests/test_canaries.py): a
Tune trial (another thread, other runs in the same job) is not watched; `segnext tune` watches
its whole search instead, until the first trial's workers are up. Tune answers the interrupt
with its own SIGINT handler (it saves the search and `fit` returns): the error is raised then.
The interrupt runs whatever SIGINT handler the process has, and `TorchTrainer.fit` leaves its
own behind (it aborts that run's controller, long gone, and swallows the interrupt: a later
run's wait then never ended), so the block runs under Python's own handler, restored after.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pipelines.config import ConfigError
from pipelines.console import log_only

WORKER_CLASS = "RayTrainWorker"  # Ray Train V2's worker actor
ANNOUNCE_AFTER_S = 30.0  # a start slower than this is announced even when resources are free
POLL_S = 1.0


class _Watch:
    """The watching thread's state: whether the run's workers came up, or it gave up."""

    def __init__(self, workers: int, per_worker: dict[str, float], timeout_s: float) -> None:
        self.workers, self.per_worker, self.timeout_s = workers, per_worker, timeout_s
        self.gave_up = False
        self.stop = threading.Event()

    def run(self) -> None:
        started, announced = time.monotonic(), False
        while not self.stop.wait(POLL_S):
            waited = time.monotonic() - started
            if _workers_alive():
                log_only(f"[segnext] the run's workers are up after {waited:.0f} s")
                return
            if not announced and (waited >= ANNOUNCE_AFTER_S or not self._fits_now()):
                print(f"[segnext] waiting for {self.workers} worker(s) of "
                      f"{_format(self.per_worker)} ({self._cluster()}); gives up after "
                      f"{self.timeout_s:g} s (ray.start_timeout_s)", flush=True)
                announced = True
            if waited >= self.timeout_s and not self.stop.is_set():
                self.gave_up = True
                _thread.interrupt_main()  # fit() ends with a KeyboardInterrupt, turned into:
                return

    def error(self) -> ConfigError:
        return ConfigError(
            f"ray.start_timeout_s: the Ray cluster did not place {self.workers} worker(s) of "
            f"{_format(self.per_worker)} within {self.timeout_s:g} s ({self._cluster()}). "
            "Fix: ask for less (ray.num_workers, ray.cpus_per_worker, ray.use_gpu, "
            "ray.resources_per_worker), add nodes, or raise ray.start_timeout_s for a cluster "
            "that is still growing")

    def _fits_now(self) -> bool:
        import ray

        free = ray.available_resources()
        return all(free.get(name, 0.0) >= need * self.workers
                   for name, need in self.per_worker.items())

    def _cluster(self) -> str:
        import ray

        free, total = ray.available_resources(), ray.cluster_resources()
        return (f"the cluster has {_format({k: free.get(k, 0.0) for k in self.per_worker})} "
                f"free of {_format({k: total.get(k, 0.0) for k in self.per_worker})}")


@contextmanager
def bounded_start(workers: int, per_worker: dict[str, float], timeout_s: float) -> Iterator[None]:
    """Around `trainer.fit()`: announce a wait for `workers` workers of `per_worker` and stop
    it after `timeout_s` with a ConfigError saying what was asked and what the cluster has."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    watch = _Watch(workers, per_worker, timeout_s)
    thread = threading.Thread(target=watch.run, name="segnext-start-watch", daemon=True)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread.start()
    try:
        yield
    except KeyboardInterrupt:
        if watch.gave_up:
            raise watch.error() from None
        raise
    finally:
        watch.stop.set()
        thread.join()
        signal.signal(signal.SIGINT, handler)
    if watch.gave_up:  # a SIGINT handler (Ray Tune's) turned the interrupt into a return
        raise watch.error()


def _workers_alive() -> bool:
    """Whether a Ray Train worker of this job (this driver's run) is alive."""
    import ray
    from ray._private import state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    actors = state.actors(job_id=job, actor_state_name="ALIVE").values()
    return any(actor["ActorClassName"] == WORKER_CLASS for actor in actors)


def _format(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {value:g}" for name, value in resources.items()) + "}"
