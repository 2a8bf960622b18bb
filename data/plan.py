"""The global batch plan: which samples make up each optimizer step, and which worker takes which.

Everything here is a function of the seed, the epoch and the number of samples, never of the
number of workers, the order in which Ray reads shards, or failures. That is what makes a
resumed run continue with the very batch it would have seen, and a 1-worker run train on the
same global batches as a 2-worker run:

- epoch e visits the samples in `epoch_order(e)`, a seeded permutation; it holds
  `steps_per_epoch` global batches of `global_batch_size` consecutive samples (the remainder
  of the permutation is left out of that epoch, a different remainder every epoch);
- a global batch is cut into `micro_per_step` micro-batches of `micro_batch_size` consecutive
  samples; with W workers, worker r takes micro-batches r*A .. r*A + A - 1, A = micro_per_step / W
  (gradient accumulation). DDP's mean over workers of per-worker means over A micro-batches is
  the same mean over all micro-batches whatever W is;
- random ops in the forward pass (drop path) draw from a generator seeded per micro-batch
  (`micro_seed`), so a micro-batch gets the same masks on any worker;
- augmentation draws from a generator seeded per (seed, epoch, sample key) (data.samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PLAN_VERSION = 1  # bump when the order below changes: checkpoints record it


@dataclass(frozen=True)
class DataPosition:
    """Where a run is in its data: what checkpoints record and restores check."""

    iteration: int  # optimizer steps done
    epoch: int  # epoch of the next step
    sample: int  # global samples of that epoch already consumed
    num_samples: int
    global_batch_size: int
    seed: int
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global batch {self.global_batch_size} is not a multiple of the micro-batch "
                f"{self.micro_batch_size}"
            )
        if self.num_samples < self.global_batch_size:
            raise ValueError(
                f"{self.num_samples} training samples cannot fill one global batch of "
                f"{self.global_batch_size}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    @property
    def micro_per_step(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    def accumulation(self, world: int) -> int:
        """Micro-batches per worker per step; a clear error for a worker count that cannot split
        the step evenly."""
        if world < 1 or self.micro_per_step % world:
            raise ValueError(
                f"{world} workers cannot share {self.micro_per_step} micro-batches of "
                f"{self.micro_batch_size} (global batch {self.global_batch_size}) evenly; "
                f"use a worker count dividing {self.micro_per_step}"
            )
        return self.micro_per_step // world

    def epoch_order(self, epoch: int) -> np.ndarray:
        return _permutation(self.num_samples, self.seed, epoch)

    def position(self, iteration: int) -> DataPosition:
        epoch, step = divmod(iteration, self.steps_per_epoch)
        return DataPosition(iteration=iteration, epoch=epoch,
                            sample=step * self.global_batch_size, num_samples=self.num_samples,
                            global_batch_size=self.global_batch_size, seed=self.seed)

    def micro_batch(self, iteration: int, micro: int) -> np.ndarray:
        """Sample numbers of micro-batch `micro` (0 .. micro_per_step - 1) of step `iteration`."""
        position = self.position(iteration)
        start = position.sample + micro * self.micro_batch_size
        return self.epoch_order(position.epoch)[start : start + self.micro_batch_size]

    def worker_micro_batches(self, world: int, rank: int) -> range:
        """The micro-batch numbers worker `rank` of `world` takes in every step."""
        accumulation = self.accumulation(world)
        return range(rank * accumulation, (rank + 1) * accumulation)

    def micro_seed(self, iteration: int, micro: int) -> int:
        """The torch seed for the forward pass of one micro-batch (same on any worker)."""
        state = np.random.SeedSequence([self.seed, iteration, micro, 0x5E6]).generate_state(2)
        return int(state[0]) << 31 | int(state[1]) >> 1


@lru_cache(maxsize=4)
def _permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch, 0x0DE5]).permutation(num_samples)
    order.flags.writeable = False
    return order
