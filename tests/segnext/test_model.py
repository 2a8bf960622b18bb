"""SegNeXt: the official size table, output contracts, gradients, determinism, overrides."""

from __future__ import annotations

import pytest
import torch

from segnext import VARIANTS, SegNeXt, create_model

# (encoder, head with 150 classes, total with 150, total with 19, state_dict keys): the spec.
OFFICIAL_SIZES = {
    "tiny": (3_903_584, 359_830, 4_263_414, 4_229_747, 550),
    "small": (13_450_176, 482_710, 13_932_886, 13_899_219, 436),
    "base": (26_277_824, 1_358_486, 27_636_310, 27_569_107, 854),
    "large": (44_636_864, 4_289_686, 48_926_550, 48_792_275, 1500),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_and_key_counts_match_official(variant: str) -> None:
    encoder, head, total150, total19, keys = OFFICIAL_SIZES[variant]
    model = create_model(variant, 150)
    assert (_count(model.backbone), _count(model.decode_head), _count(model)) == (
        encoder,
        head,
        total150,
    )
    assert len(model.state_dict()) == keys
    model19 = create_model(variant[0], 19)
    assert _count(model19) == total19
    assert len(model19.state_dict()) == keys


def test_attributes_and_aliases() -> None:
    model = create_model("T", 7)
    assert isinstance(model, SegNeXt)
    assert (model.variant, model.num_classes, model.classifier_kind) == ("tiny", 7, "standard")
    assert create_model("b", 3).variant == "base"


def test_eval_returns_upsampled_logits_and_train_returns_stride8_dict() -> None:
    model = create_model("tiny", 5)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        logits = model.eval()(x)
        head = model.decode_head(model.backbone(x)[1:])["logits"]
        out = model.train()(x)
    assert logits.shape == (2, 5, 64, 80)
    assert list(out) == ["logits"] and out["logits"].shape == (2, 5, 8, 10)
    expected = torch.nn.functional.interpolate(
        head, size=(64, 80), mode="bilinear", align_corners=False
    )
    assert torch.equal(logits, expected)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", 4, drop_path_rate=0.0).train()
    out = model(torch.randn(2, 3, 64, 64))["logits"]
    out.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_eval_is_deterministic_across_calls_and_instances() -> None:
    x = torch.randn(1, 3, 64, 64)
    model = create_model("tiny", 6).eval()
    twin = create_model("tiny", 6).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)
        assert torch.equal(twin(x), first)


def test_overrides_reach_their_modules() -> None:
    model = create_model(
        "tiny",
        3,
        drop_path_rate=0.5,
        dropout=0.0,
        nmf_rank=8,
        nmf_train_steps=2,
        nmf_eval_steps=3,
        nmf_random_eval_bases=True,
        nmf_grad_last_step_only=True,
    )
    nmf = model.decode_head.hamburger.nmf
    assert (nmf.rank, nmf.train_steps, nmf.eval_steps) == (8, 2, 3)
    assert nmf.random_eval_bases and nmf.grad_last_step_only
    assert model.backbone.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.5)
    assert isinstance(model.decode_head.classifier.dropout, torch.nn.Identity)
    assert create_model("large", 3).decode_head.hamburger.nmf.rank == 64
    assert create_model("small", 3).backbone.stages[-1].blocks[-1].drop_path.drop_prob == 0.1


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown SegNeXt variant 'huge'"):
        create_model("huge", 3)
    with pytest.raises(ValueError, match="nmf_stepz"):
        create_model("tiny", 3, nmf_stepz=2)
    with pytest.raises(ValueError, match="drop_rate"):
        create_model("tiny", 3, drop_rate=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("tiny", 0)
