"""Parameter groups and the warm-up + poly schedule of the SegNeXt recipe."""

from __future__ import annotations

import pytest
import torch

from pipelines.config import OptimConfig, ScheduleConfig
from pipelines.train.optim import RecipeSchedule, build_optimizer, lr_factor, param_groups
from segnext.model import create_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return create_model("tiny", 5, classifier="integrated")


def test_groups_cover_every_parameter_once(model: torch.nn.Module) -> None:
    groups = param_groups(model, OptimConfig(lr=1e-3, weight_decay=0.05, decoder_lr_mult=10))
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {group["name"]: group for group in groups}
    assert by_name["decoder"]["lr"] == pytest.approx(1e-2)
    assert by_name["decoder"]["weight_decay"] == 0.05
    assert by_name["encoder"]["lr"] == by_name["encoder_norm"]["lr"] == pytest.approx(1e-3)
    assert by_name["encoder"]["weight_decay"] == 0.05
    assert by_name["encoder_norm"]["weight_decay"] == 0.0
    decoder_ids = {id(p) for p in model.decode_head.parameters()}
    assert {id(p) for p in by_name["decoder"]["params"]} == decoder_ids


def test_encoder_norms_have_no_decay(model: torch.nn.Module) -> None:
    groups = {g["name"]: g for g in param_groups(model, OptimConfig())}
    no_decay = {id(p) for p in groups["encoder_norm"]["params"]}
    names = {id(p): name for name, p in model.backbone.named_parameters()}
    no_decay_names = {names[i] for i in no_decay}
    # stem BNs, patch-embedding BNs, block BNs and stage LayerNorms, weights and biases
    for name in ("stages.0.embed.norm1.weight", "stages.1.embed.norm.bias",
                 "stages.2.blocks.4.norm2.weight", "stages.3.norm.weight"):
        assert name in no_decay_names
    # 2 stem BNs + 3 patch-embed BNs + 2 BNs per block (13 blocks) + 4 LayerNorms, 2 params each
    assert len(no_decay) == 2 * (2 + 3 + 2 * 13 + 4)
    assert not any("proj" in n or "layer_scale" in n for n in no_decay_names)


def test_schedule_warmup_then_poly() -> None:
    cfg = ScheduleConfig(iterations=1000, warmup_iters=100, warmup_ratio=1e-6, power=1.0)
    assert lr_factor(0, cfg) == pytest.approx(1e-6)
    # mmcv: the warm-up ramp multiplies the poly value
    assert lr_factor(50, cfg) == pytest.approx((0.5 + 0.5e-6) * 0.95)
    assert lr_factor(100, cfg) == pytest.approx(0.9)
    assert lr_factor(550, cfg) == pytest.approx(0.45)
    assert lr_factor(1000, cfg) == 0.0
    assert lr_factor(2000, cfg) == 0.0
    square = ScheduleConfig(iterations=100, warmup_iters=0, power=2.0)
    assert lr_factor(50, square) == pytest.approx(0.25)


def test_scheduler_drives_every_group_and_round_trips(model: torch.nn.Module) -> None:
    sched_cfg = ScheduleConfig(iterations=10, warmup_iters=2)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    scheduler = RecipeSchedule(optimizer, sched_cfg)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["encoder"] == pytest.approx(1e-9) and lrs["decoder"] == pytest.approx(1e-8)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["encoder"] == pytest.approx(1e-3 * 0.6)
    assert lrs["decoder"] == pytest.approx(1e-2 * 0.6)

    state = scheduler.state_dict()
    restored_opt = build_optimizer(model, OptimConfig(lr=1e-3))
    restored = RecipeSchedule(restored_opt, sched_cfg)
    restored.load_state_dict(state)
    restored_opt.step()
    restored.step()
    assert restored.last_epoch == 5
    assert restored.get_last_lr()[0] == pytest.approx(1e-3 * 0.5)
