"""MSCAN, the SegNeXt encoder: a convolutional stem, then four stages of MSCA blocks.

Every stage downsamples by 2 (the stem by 4), runs its blocks and ends with a LayerNorm over
channels; the normalised map is both the stage output and the next stage's input. All other
encoder norms are BatchNorm, so `nn.SyncBatchNorm.convert_sync_batchnorm` applies directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYER_SCALE_INIT = 1e-2  # per-channel scales on both residual branches start small


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescaling the survivors."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of a (B, C, H, W) map (the official stage-end norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Stem(nn.Module):
    """Stage-1 entry: two stride-2 3x3 convs (3 -> C/2 -> C) with BatchNorm; output stride 4."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(mid)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(mid, out_channels, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(x))


class PatchEmbed(nn.Module):
    """Stage 2-4 entry: a stride-2 3x3 conv with bias, then BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class StripConv(nn.Module):
    """A depth-wise 1xk conv followed by a depth-wise kx1 conv: a cheap kxk receptive field."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.horizontal = nn.Conv2d(
            channels, channels, (1, kernel_size), padding=(0, pad), groups=channels
        )
        self.vertical = nn.Conv2d(
            channels, channels, (kernel_size, 1), padding=(pad, 0), groups=channels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vertical(self.horizontal(x))


class MSCA(nn.Module):
    """Multi-scale convolutional attention: a 5x5 depth-wise conv, three strip branches
    (7, 11, 21) summed onto it, a 1x1 channel mix; the result gates the input."""

    def __init__(self, channels: int, strip_sizes: Sequence[int] = (7, 11, 21)) -> None:
        super().__init__()
        self.conv_local = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.strips = nn.ModuleList(StripConv(channels, k) for k in strip_sizes)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.conv_local(x)
        attn = local
        for strip in self.strips:
            attn = attn + strip(local)
        return self.mix(attn) * x


class Attention(nn.Module):
    """1x1 conv, GELU, MSCA, 1x1 conv, plus its own shortcut (inside the block's residual)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.act = nn.GELU()
        self.msca = MSCA(channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.msca(self.act(self.proj_in(x)))) + x


class Mlp(nn.Module):
    """Convolutional feed-forward: 1x1 expand, depth-wise 3x3, GELU, 1x1 project."""

    def __init__(self, channels: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm residual block: `x += dp(ls1 * attn(bn1(x)))`, `x += dp(ls2 * mlp(bn2(x)))`."""

    def __init__(
        self,
        channels: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.attn = Attention(channels)
        self.norm2 = nn.BatchNorm2d(channels)
        self.mlp = Mlp(channels, int(channels * mlp_ratio), dropout)
        self.layer_scale1 = nn.Parameter(torch.full((channels,), LAYER_SCALE_INIT))
        self.layer_scale2 = nn.Parameter(torch.full((channels,), LAYER_SCALE_INIT))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale2[:, None, None] * self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Downsample (stem or patch embedding), a run of blocks, then the stage LayerNorm."""

    def __init__(
        self,
        embed: nn.Module,
        channels: int,
        depth: int,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.Sequential(
            *(Block(channels, mlp_ratio, drop_paths[i], dropout) for i in range(depth))
        )
        self.norm = LayerNorm2d(channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))


class MSCAN(nn.Module):
    """The encoder; `forward` returns the four stage outputs at strides 4, 8, 16, 32."""

    def __init__(
        self,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (3, 3, 5, 2),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        in_channels: int = 3,
        drop_path_rate: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(mlp_ratios):
            raise ValueError("embed_dims, depths and mlp_ratios must have the same length")
        self.embed_dims = tuple(embed_dims)
        # Stochastic depth rises linearly from 0 over all blocks of the network.
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, start, prev = [], 0, in_channels
        for i, (dim, depth, ratio) in enumerate(zip(embed_dims, depths, mlp_ratios, strict=True)):
            embed = Stem(prev, dim) if i == 0 else PatchEmbed(prev, dim)
            stages.append(Stage(embed, dim, depth, ratio, rates[start : start + depth], dropout))
            start, prev = start + depth, dim
        self.stages = nn.ModuleList(stages)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official from-scratch init: convs N(0, sqrt(2/fan_out)), norms 1/0, layer scales 0.01."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm | nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, Block):
                nn.init.constant_(m.layer_scale1, LAYER_SCALE_INIT)
                nn.init.constant_(m.layer_scale2, LAYER_SCALE_INIT)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs
