"""Training metrics between two log lines: summed per step, averaged over ranks when logged."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from pipelines.train.step import StepResult

AllReduce = Callable[[list[float]], np.ndarray]  # sum over ranks


class MetricsWindow:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.wait, self.step_time, self.images, self.steps = 0.0, 0.0, 0.0, 0, 0
        self.parts: dict[str, float] = {}
        self.started = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.loss += result.loss
        for name, value in result.parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value
        self.wait += result.data_wait_s
        self.step_time += result.seconds
        self.images += result.images
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (validation) out of the throughput."""
        self.started += seconds

    def metrics(self, all_reduce: AllReduce, world: int) -> dict[str, float]:
        """Losses as means over steps and ranks; images/s over all ranks (a collective: every
        rank calls it at the same step)."""
        names = sorted(self.parts)
        local = [self.loss, *(self.parts[n] for n in names), self.wait, self.step_time,
                 float(self.images)]
        totals = all_reduce(local) / world
        steps = max(self.steps, 1)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        wait, step_time, images = totals[-3:]
        metrics = {"train/loss": totals[0] / steps}
        metrics.update({f"train/{n}": totals[1 + i] / steps for i, n in enumerate(names)})
        metrics.update({
            "perf/images_per_s": images * world / elapsed,
            "train/images_per_step": images * world / steps,  # the global batch, as trained
            "perf/step_time_s": step_time / steps,
            "perf/data_wait_fraction": wait / elapsed,
        })
        return metrics
