"""MSCAN encoder: stage shapes, stochastic depth, official init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from segnext.model import VARIANTS
from segnext.mscan import MSCAN, Block, DropPath, LayerNorm2d


def _encoder(variant: str, **kwargs) -> MSCAN:
    cfg = VARIANTS[variant]
    return MSCAN(cfg.embed_dims, cfg.depths, cfg.mlp_ratios, **kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stage_shapes(variant: str) -> None:
    encoder = _encoder(variant).eval()
    with torch.no_grad():
        outs = encoder(torch.randn(2, 3, 64, 96))
    dims = VARIANTS[variant].embed_dims
    assert [tuple(o.shape) for o in outs] == [
        (2, dims[0], 16, 24),
        (2, dims[1], 8, 12),
        (2, dims[2], 4, 6),
        (2, dims[3], 2, 3),
    ]


def test_odd_input_sizes_round_up() -> None:
    encoder = _encoder("tiny").eval()
    with torch.no_grad():
        outs = encoder(torch.randn(1, 3, 65, 33))
    assert [o.shape[-2:] for o in outs] == [(17, 9), (9, 5), (5, 3), (3, 2)]


def test_drop_path_rates_rise_linearly_over_all_blocks() -> None:
    encoder = _encoder("tiny", drop_path_rate=0.3)
    rates = [m.drop_path.drop_prob for m in encoder.modules() if isinstance(m, Block)]
    assert len(rates) == sum(VARIANTS["tiny"].depths)
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.3)
    assert torch.allclose(torch.tensor(rates), torch.linspace(0, 0.3, len(rates)))


def test_drop_path_drops_whole_samples_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.25).train()
    out = drop(torch.ones(4000, 3, 2, 2))
    per_sample = out.flatten(1)
    assert torch.equal(per_sample.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert (per_sample == per_sample[:, :1]).all()  # a sample is kept or dropped as a whole
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)
    x = torch.randn(3, 4)
    assert torch.equal(drop.eval()(x), x)


def test_layer_norm_2d_normalises_channels() -> None:
    norm = LayerNorm2d(8)
    x = torch.randn(2, 8, 3, 5) * 4 + 2
    ref = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
    assert torch.allclose(norm(x), ref, atol=1e-6)


def test_official_init() -> None:
    torch.manual_seed(0)
    encoder = _encoder("tiny")
    block = encoder.stages[3].blocks[0]
    # conv std sqrt(2 / fan_out), fan_out = kh * kw * out / groups
    for conv, fan_out in (
        (block.mlp.fc1, 1024),  # 1x1, 256 -> 1024
        (block.attn.msca.strips[2].vertical, 21),  # depth-wise 21x1
        (encoder.stages[0].embed.conv2, 9 * 32),
    ):
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.08)
        assert conv.weight.mean().abs().item() < 0.2 * math.sqrt(2 / fan_out)
        assert not conv.bias.any()
    assert torch.all(block.layer_scale1 == 0.01) and torch.all(block.layer_scale2 == 0.01)
    norm = encoder.stages[3].norm
    assert torch.all(norm.weight == 1) and not norm.bias.any()
    assert norm.eps == 1e-5
    bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 + 3 + 2 * sum(VARIANTS["tiny"].depths)


def test_sync_batchnorm_conversion_covers_every_batchnorm() -> None:
    encoder = nn.SyncBatchNorm.convert_sync_batchnorm(_encoder("tiny"))
    assert not any(type(m) is nn.BatchNorm2d for m in encoder.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in encoder.modules()) == 31
