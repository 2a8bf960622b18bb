"""`train_step` without Ray: it learns, accumulation is exact, and DDP's `no_sync` path gives
the gradients of one process holding all the micro-batches."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipelines.train.step import train_step


def _model() -> nn.Module:
    """Per-pixel classifier without BatchNorm (batch statistics would make a batch of 2n
    differ from two of n) but with dropout, to exercise the per-micro-batch seeds."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.2),
                         nn.Conv2d(8, 4, 1))


def _criterion(outputs: torch.Tensor, masks: torch.Tensor):
    loss = nn.functional.cross_entropy(outputs, masks)
    return loss, {"ce": loss.detach()}


def _batches(n: int, size: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n * size, 3, 8, 8, generator=generator)
    masks = (images[:, 0] > 0).long() + 2 * (images[:, 1] > 0).long()
    return [{"images": images[i * size:(i + 1) * size], "masks": masks[i * size:(i + 1) * size]}
            for i in range(n)]


def test_loss_falls_on_a_tiny_batch() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    batch = _batches(1, 8)
    losses = [train_step(model, batch, _criterion, optimizer).loss for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]


def test_step_reports_loss_parts_images_and_time() -> None:
    model = _model()
    result = train_step(model, _batches(2, 3), _criterion, torch.optim.SGD(model.parameters(), 0.1),
                        accumulation=2)
    assert result.images == 6 and result.seconds > 0 and result.data_wait_s >= 0
    assert result.parts["ce"] == pytest.approx(result.loss)


def test_two_micro_batches_equal_one_batch_of_twice_the_size() -> None:
    model_a, model_b = _model(), _model()
    model_a.eval(), model_b.eval()  # dropout off: the batch split is all that differs
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.5)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.5)
    micro = _batches(2, 4)
    whole = [{key: torch.cat([m[key] for m in micro]) for key in ("images", "masks")}]
    a = train_step(model_a, micro, _criterion, opt_a, accumulation=2)
    b = train_step(model_b, whole, _criterion, opt_b, accumulation=1)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_seeds_make_the_random_ops_repeatable() -> None:
    runs = []
    for _ in range(2):
        model = _model()
        torch.manual_seed(12345 + len(runs))  # a different global state each time
        train_step(model, _batches(2, 2), _criterion, torch.optim.SGD(model.parameters(), 0.5),
                   accumulation=2, seeds=[7, 8])
        runs.append([p.detach().clone() for p in model.parameters()])
    for pa, pb in zip(*runs, strict=True):
        assert torch.equal(pa, pb)


def test_a_non_finite_loss_stops_before_the_update() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())

    def broken(outputs, masks):
        return outputs.sum() * float("nan"), {}

    with pytest.raises(FloatingPointError, match="nan"):
        train_step(model, _batches(1, 2), broken, torch.optim.SGD(model.parameters(), 0.1))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        micro = _batches(4, 2)[2 * rank:2 * rank + 2]  # rank r: micro-batches 2r, 2r + 1
        calls = []
        original = model.no_sync

        def counting_no_sync():
            calls.append(1)
            return original()

        model.no_sync = counting_no_sync
        train_step(model, micro, _criterion, optimizer, accumulation=2, seeds=[2 * rank, 2 * rank + 1])
        torch.save({"no_sync_calls": len(calls),
                    "params": [p.detach().clone() for p in model.module.parameters()]},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: with torch 2.13 about one exit in ten aborted
    # there ("terminate called without an active exception", SIGABRT from a native thread, no
    # Python frame) after the group was destroyed and the results saved.
    os._exit(0)


def test_ddp_accumulation_equals_one_process_with_all_micro_batches(tmp_path) -> None:
    """2 DDP ranks x 2 accumulated micro-batches (no_sync on the first) == 1 process x 4."""
    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["no_sync_calls"] for r in results] == [1, 1]  # all but the last micro-batch

    single = _model()
    train_step(single, _batches(4, 2), _criterion, torch.optim.SGD(single.parameters(), lr=0.5),
               accumulation=4, seeds=[0, 1, 2, 3])
    for result in results:
        for got, want in zip(result["params"], single.parameters(), strict=True):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
