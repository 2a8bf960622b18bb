"""NMF, Hamburger and LightHamHead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segnext.ham import NMF, LightHamHead


def _x(b: int = 2, d: int = 32, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, d, h, w, generator=gen)


def _error(nmf: NMF, x: torch.Tensor) -> float:
    return torch.linalg.norm(nmf(x) - x).item()


def test_reconstruction_error_falls_with_steps() -> None:
    x = _x(d=32, h=8, w=8)
    errors = [_error(NMF(32, rank=4, eval_steps=steps).eval(), x) for steps in (0, 1, 2, 4, 7, 20)]
    assert all(b <= a + 1e-5 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.97 * errors[0], errors


def test_factors_stay_non_negative() -> None:
    nmf = NMF(32, rank=4).eval()
    bases, coef = nmf.decompose(_x().flatten(2))
    assert bases.shape == (2, 32, 4) and coef.shape == (2, 64, 4)
    assert (bases >= 0).all() and (coef >= 0).all()
    assert (nmf(_x()) >= 0).all()


@pytest.mark.parametrize("training", [True, False])
def test_init_bases_shape_and_norm(training: bool) -> None:
    nmf = NMF(48, rank=16).train(training)
    bases = nmf.init_bases(3, torch.device("cpu"))
    assert bases.shape == (3, 48, 16) and bases.dtype == torch.float32
    assert (bases >= 0).all()
    assert torch.allclose(bases.norm(dim=1), torch.ones(3, 16), atol=1e-5)
    assert nmf.init_bases(1, "cpu", dtype=torch.float64).dtype == torch.float64


def test_eval_is_deterministic_and_leaves_global_rng_alone() -> None:
    x = _x()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = NMF(32, rank=4).eval()(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(NMF(32, rank=4).eval()(x), first)  # fresh instance, same bases
    assert not torch.equal(NMF(32, rank=4, seed=1).eval()(x), first)


def test_training_and_random_eval_bases_draw_fresh_bases() -> None:
    x = _x()
    train = NMF(32, rank=4).train()
    assert not torch.equal(train(x), train(x))
    official = NMF(32, rank=4, random_eval_bases=True).eval()
    assert not torch.equal(official(x), official(x))


def test_steps_follow_the_mode() -> None:
    nmf = NMF(32, rank=4, train_steps=1, eval_steps=3)
    calls = []
    original = nmf._update
    nmf._update = lambda *a: calls.append(1) or original(*a)
    nmf.train()(_x())
    nmf.eval()(_x())
    assert len(calls) == (2 * 1 + 1) + (2 * 3 + 1)


def test_adds_no_state_dict_keys_but_follows_dtype_moves() -> None:
    nmf = NMF(16, rank=4)
    assert list(nmf.state_dict()) == []
    assert nmf.double().fixed_bases.dtype == torch.float64


def test_runs_in_fp32_under_bf16_autocast() -> None:
    nmf = NMF(32, rank=4).eval()
    x = _x().to(torch.bfloat16)
    reference = nmf(x.float())
    seen = []
    original = nmf.decompose
    nmf.decompose = lambda flat: seen.append(flat.dtype) or original(flat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nmf(x)
    assert seen == [torch.float32]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.to(torch.bfloat16))


def test_channels_last_input_gives_the_same_result_in_channels_last() -> None:
    nmf = NMF(32, rank=4).eval()
    x = _x()
    out = nmf(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, nmf(x), atol=1e-5)


def test_grad_last_step_only_same_forward_and_still_trains() -> None:
    x = _x().requires_grad_()
    full = NMF(32, rank=4)
    fast = NMF(32, rank=4, grad_last_step_only=True)
    torch.manual_seed(0)
    out_full = full.train()(x)
    torch.manual_seed(0)
    out_fast = fast.train()(x)
    assert torch.equal(out_full, out_fast)
    (grad_fast,) = torch.autograd.grad(out_fast.square().sum(), x)
    (grad_full,) = torch.autograd.grad(out_full.square().sum(), x)
    assert grad_fast.abs().sum() > 0
    assert not torch.allclose(grad_fast, grad_full)  # the full unroll backprops further


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="rank"):
        NMF(16, rank=0)


def test_head_output_and_init() -> None:
    torch.manual_seed(0)
    head = LightHamHead((64, 160, 256), 256, 19, rank=16).eval()
    feats = [torch.randn(2, 64, 8, 8), torch.randn(2, 160, 4, 4), torch.randn(2, 256, 2, 2)]
    with torch.no_grad():
        out = head(feats)
    assert list(out) == ["logits"] and out["logits"].shape == (2, 19, 8, 8)
    conv = head.squeeze.conv  # kaiming normal, fan_out = 256 (1x1), ReLU gain
    assert conv.weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.05)
    assert not head.hamburger.ham_in.bias.any()
    assert head.classifier.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert isinstance(head.squeeze.norm, nn.GroupNorm) and head.squeeze.norm.num_groups == 32
    assert isinstance(head.hamburger.ham_out.act, nn.Identity)
    with pytest.raises(ValueError, match="expected 3 feature maps"):
        head(feats[:2])
