"""Make Ray Data's scheduling loop wait while it has nothing in flight.

Ray Data 2.60's `StreamingExecutor` runs its scheduling loop in a thread of the consuming
process, here every Ray Train worker. Each pass waits on the running tasks (`ray.wait`, up to
0.1 s) but skips the wait when none is running, so while the stream is ahead of the consumer
(its output queue full, every read task done: the normal state of a training stream, whose
steps are slower than its reads) the loop spins on Python bookkeeping (Prometheus gauges,
resource budgets) at full speed. Measured on the 2-core machine (py-spy on a `make demo`
worker): that thread took about half a core per Train worker, and the demo trained at 16 img/s
instead of 49.

`install_idle_wait()` wraps the loop's `process_completed_tasks` so that a pass with no task
in flight first sleeps `IDLE_WAIT_S`: the loop then costs little while the consumer catches up,
and it still notices a freed output slot within that time, far below a training step. It is
idempotent and only touches the process it runs in. A Ray upgrade that renames the wrapped
function fails loudly here and in tests/test_canaries.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

IDLE_WAIT_S = 0.02
_MARK = "_segnext_idle_wait"


def install_idle_wait(idle_wait_s: float = IDLE_WAIT_S) -> None:
    """Wrap `StreamingExecutor`'s `process_completed_tasks` once in this process."""
    from ray.data._internal.execution import streaming_executor

    original: Callable[..., Any] = streaming_executor.process_completed_tasks
    if getattr(original, _MARK, False):
        return

    def process_completed_tasks(topology: dict, *args: Any, **kwargs: Any) -> Any:
        if not any(op.num_active_tasks() for op in topology):
            time.sleep(idle_wait_s)
        return original(topology, *args, **kwargs)

    setattr(process_completed_tasks, _MARK, True)
    streaming_executor.process_completed_tasks = process_completed_tasks
