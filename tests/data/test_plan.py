"""The global batch plan: a function of seed, epoch and sample count only."""

from __future__ import annotations

import numpy as np
import pytest

from data.plan import BatchPlan


def test_epochs_are_seeded_permutations() -> None:
    plan = BatchPlan(num_samples=50, global_batch_size=8, micro_batch_size=2, seed=3)
    assert sorted(plan.epoch_order(0)) == list(range(50))
    assert np.array_equal(plan.epoch_order(1), BatchPlan(50, 8, 4, 3).epoch_order(1))
    assert not np.array_equal(plan.epoch_order(0), plan.epoch_order(1))
    assert not np.array_equal(plan.epoch_order(0), BatchPlan(50, 8, 2, 4).epoch_order(0))


def test_steps_cover_an_epoch_without_repeats() -> None:
    plan = BatchPlan(num_samples=50, global_batch_size=8, micro_batch_size=2, seed=0)
    assert plan.steps_per_epoch == 6 and plan.micro_per_step == 4
    seen = np.concatenate([plan.micro_batch(step, micro) for step in range(6) for micro in range(4)])
    assert len(seen) == 48 and len(set(seen.tolist())) == 48  # 2 left out of epoch 0
    position = plan.position(7)
    assert (position.epoch, position.sample) == (1, 8)
    assert np.array_equal(plan.micro_batch(7, 0), plan.epoch_order(1)[8:10])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_workers_split_every_step_into_the_same_micro_batches(world: int) -> None:
    plan = BatchPlan(num_samples=40, global_batch_size=8, micro_batch_size=2, seed=1)
    owned = [list(plan.worker_micro_batches(world, rank)) for rank in range(world)]
    assert sorted(m for ranks in owned for m in ranks) == [0, 1, 2, 3]
    assert plan.accumulation(world) == 4 // world


def test_uneven_worker_counts_are_refused() -> None:
    plan = BatchPlan(num_samples=40, global_batch_size=8, micro_batch_size=2, seed=1)
    with pytest.raises(ValueError, match="3 workers cannot share 4 micro-batches"):
        plan.accumulation(3)
    with pytest.raises(ValueError, match="not a multiple of the micro-batch"):
        BatchPlan(num_samples=40, global_batch_size=8, micro_batch_size=3, seed=1)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        BatchPlan(num_samples=4, global_batch_size=8, micro_batch_size=2, seed=1)


def test_micro_seeds_depend_on_position_only() -> None:
    plan = BatchPlan(num_samples=40, global_batch_size=8, micro_batch_size=2, seed=1)
    seeds = {plan.micro_seed(step, micro) for step in range(10) for micro in range(4)}
    assert len(seeds) == 40 and all(0 <= s < 2**63 for s in seeds)
    assert plan.micro_seed(3, 1) == BatchPlan(80, 8, 2, 1).micro_seed(3, 1)
