"""The fused MSCA kernels against the eager reference: outputs and every gradient.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (slow: tiny shapes only);
with CUDA they are compiled and checked in fp32 and bf16.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' definition
pytest.importorskip("triton", reason="triton is not installed: the fused MSCA kernels need it")

import segnext.fast.msca_triton as msca_triton  # noqa: E402
from segnext import create_model  # noqa: E402
from segnext.fast import FusedMSCA, apply_fast_path  # noqa: E402
from segnext.ham import NMF  # noqa: E402
from segnext.mscan import MSCA  # noqa: E402

msca_triton = importlib.reload(msca_triton)  # re-define the kernels if imported before the env
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_msca(channels: int, strip_sizes=(7, 11, 21)) -> MSCA:
    torch.manual_seed(0)
    block = MSCA(channels, strip_sizes)
    for p in block.parameters():  # non-trivial biases so that padding mistakes show
        torch.nn.init.normal_(p, 0.0, 0.3)
    return block.to(DEVICE)


def _outputs_and_grads(block, x, grad):
    x = x.detach().requires_grad_()
    y = block(x)
    grads = torch.autograd.grad(y, [x, *block.parameters()], grad)
    return y.detach(), grads


@pytest.mark.parametrize(
    ("shape", "tile", "strip_sizes"),
    [((1, 1, 9, 13), 64, (7, 11, 21)), ((2, 1, 5, 6), 2048, (3, 9, 5))],
    ids=["multi-tile-official-sizes", "map-smaller-than-strip-unsorted-sizes"],
)
def test_fused_msca_matches_eager_outputs_and_grads(monkeypatch, shape, tile, strip_sizes):
    monkeypatch.setattr(msca_triton, "TILE_ELEMENTS", tile)
    eager = _random_msca(shape[1], strip_sizes).double()
    fused = msca_triton.FusedMSCA(eager)
    x = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    grad = torch.randn_like(x)
    y_ref, g_ref = _outputs_and_grads(eager, x, grad)
    y, g = _outputs_and_grads(fused, x, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # kernels accumulate in fp32
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need CUDA")
@pytest.mark.parametrize("shape", [(2, 32, 128, 128), (4, 160, 32, 32), (2, 256, 16, 16)])
def test_fused_msca_bf16_autocast_close_to_eager(shape):
    eager = _random_msca(shape[1]).float()
    fused = msca_triton.FusedMSCA(eager)
    x = torch.randn(shape, device=DEVICE)
    grad = torch.randn_like(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref, g_ref = _outputs_and_grads(eager, x, grad)
        y, g = _outputs_and_grads(fused, x, grad)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    scale = y_ref.float().abs().max()
    assert (y.float() - y_ref.float()).abs().max() <= 0.02 * scale
    for got, want in zip(g, g_ref, strict=True):
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err < 0.02, f"relative gradient error {err:.4f}"


def test_apply_fast_path_swaps_blocks_and_keeps_keys_and_outputs(monkeypatch):
    torch.manual_seed(0)
    model = create_model("tiny", 5).eval()
    reference_keys = list(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    apply_fast_path(model, fused_msca=True, nmf_grad_last_step_only=True)
    assert list(model.state_dict()) == reference_keys
    assert not any(type(m) is MSCA for m in model.modules())
    assert sum(isinstance(m, FusedMSCA) for m in model.modules()) == 13
    assert all(m.grad_last_step_only for m in model.modules() if isinstance(m, NMF))
    # The eager fallback (no Triton device) gives the reference numbers exactly.
    monkeypatch.setattr(msca_triton, "fused_strips_available", lambda _: False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    apply_fast_path(model, fused_msca=False)
    assert sum(type(m) is MSCA for m in model.modules()) == 13
    assert list(model.state_dict()) == reference_keys


def test_fused_strip_sum_rejects_other_branch_counts():
    block = _random_msca(2, (7, 11))
    with pytest.raises(ValueError, match="exactly 3 strip branches"):
        msca_triton.fused_strip_sum(torch.zeros(1, 2, 4, 4, device=DEVICE), block.strips)
