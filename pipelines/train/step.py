"""One optimizer step over micro-batches: the arithmetic of training, and nothing else.

No Ray, no logging, no checkpoints: the Ray Train loop, `bench/train_throughput.py` and
`bench/gpu_train.py` all call this, so what is measured is what trains.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

Criterion = Callable[[object, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepResult:
    loss: float  # mean of the micro-batches' losses
    parts: dict[str, float] = field(default_factory=dict)  # the criterion's terms, same mean
    images: int = 0
    data_wait_s: float = 0.0  # time spent waiting for the next micro-batch
    seconds: float = 0.0  # the whole step


def train_step(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    *,
    accumulation: int = 1,
    scheduler: object | None = None,
    seeds: Sequence[int] | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    channels_last: bool = False,
) -> StepResult:
    """Forward + backward over `accumulation` micro-batches ({"images", "masks"}), then one
    optimizer (and scheduler) step.

    Gradients are averaged over the micro-batches, so accumulating 2 micro-batches of n equals
    one batch of 2n for a per-batch mean loss (up to float summation order). Under DDP the
    gradient all-reduce runs only on the last micro-batch (`no_sync`). `seeds[i]` seeds torch's
    generator before micro-batch i's forward (drop path), making it independent of which worker
    runs it. A non-finite loss raises `FloatingPointError` before the optimizer steps."""
    started = time.perf_counter()
    result = StepResult(loss=0.0)
    source = iter(batches)
    for micro in range(accumulation):
        wait = time.perf_counter()
        batch = next(source)
        result.data_wait_s += time.perf_counter() - wait
        images, masks = batch["images"], batch["masks"]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if seeds is not None:
            torch.manual_seed(seeds[micro])
        last = micro == accumulation - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast or contextlib.nullcontext():
                outputs = model(images)
            loss, parts = criterion(outputs, masks)
            (loss / accumulation).backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"training loss is {value}")
        result.loss += value / accumulation
        for name, part in parts.items():
            result.parts[name] = result.parts.get(name, 0.0) + float(part) / accumulation
        result.images += int(images.shape[0])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    result.seconds = time.perf_counter() - started
    return result
