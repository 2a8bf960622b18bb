"""The idle wait wrapped around Ray Data's scheduling loop: sleeps only with nothing in flight."""

from __future__ import annotations

import pytest

from data import scheduler_idle


class _Operator:
    def __init__(self, active: int) -> None:
        self.active = active

    def num_active_tasks(self) -> int:
        return self.active


@pytest.fixture()
def wrapped(monkeypatch: pytest.MonkeyPatch):
    from ray.data._internal.execution import streaming_executor

    calls: list[dict] = []
    monkeypatch.setattr(
        streaming_executor,
        "process_completed_tasks",
        lambda topology, *a, **kw: calls.append(topology) or 7,
    )
    sleeps: list[float] = []
    monkeypatch.setattr(scheduler_idle.time, "sleep", sleeps.append)
    scheduler_idle.install_idle_wait(0.02)
    scheduler_idle.install_idle_wait(0.02)  # idempotent: wrapped once
    return streaming_executor.process_completed_tasks, calls, sleeps


def test_sleeps_before_a_pass_with_no_task_in_flight(wrapped) -> None:
    process, calls, sleeps = wrapped
    idle = {_Operator(active=0): None, _Operator(active=0): None}
    assert process(idle, "policies", guard=1) == 7  # the original's result, arguments passed on
    assert sleeps == [0.02] and calls == [idle]


def test_does_not_sleep_while_a_task_runs(wrapped) -> None:
    process, calls, sleeps = wrapped
    busy = {_Operator(active=0): None, _Operator(active=2): None}
    process(busy)
    assert sleeps == [] and calls == [busy]
