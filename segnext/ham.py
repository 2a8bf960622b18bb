"""The SegNeXt decoder: LightHamHead, whose core is a Hamburger (NMF as a global context block).

The NMF is the one numerically delicate part: it overflows in fp16 and drifts in bf16, so it
always runs in fp32, even inside an autocast region.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segnext.classifier import build_classifier


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Leave any autocast region (a no-op on devices without autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class NMF(nn.Module):
    """Non-negative matrix factorisation `x ~ bases @ coef^T` by unrolled multiplicative updates.

    x (B, C, H, W) is read as (B, D=C, N=H*W) and must be non-negative. Training starts from
    fresh uniform random bases every forward (the official behaviour). Evaluation starts from
    fixed bases drawn once at construction from a private seeded generator, so predictions are
    repeatable; `random_eval_bases=True` restores the official random start in eval too. The
    fixed bases are a non-persistent buffer: they follow `.to(device)` but add no state_dict key.
    """

    def __init__(
        self,
        channels: int,
        rank: int = 64,
        train_steps: int = 6,
        eval_steps: int = 7,
        random_eval_bases: bool = False,
        grad_last_step_only: bool = False,
        seed: int = 0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if rank < 1 or train_steps < 0 or eval_steps < 0:
            raise ValueError(
                f"NMF needs rank >= 1 and steps >= 0, got rank={rank}, "
                f"train_steps={train_steps}, eval_steps={eval_steps}"
            )
        self.channels = channels
        self.rank = rank
        self.train_steps = train_steps
        self.eval_steps = eval_steps
        self.random_eval_bases = random_eval_bases
        self.grad_last_step_only = grad_last_step_only
        self.eps = eps
        generator = torch.Generator().manual_seed(seed)
        fixed = torch.rand(channels, rank, generator=generator, device="cpu")
        fixed = F.normalize(fixed, dim=0)
        self.register_buffer("fixed_bases", fixed, persistent=False)

    def init_bases(
        self, batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Starting bases (batch, D, R), L2-normalised over D: random in training, else fixed."""
        if self.training or self.random_eval_bases:
            bases = torch.rand(batch, self.channels, self.rank, device=device, dtype=dtype)
            return F.normalize(bases, dim=1)
        return self.fixed_bases.to(device=device, dtype=dtype).expand(batch, -1, -1)

    def _update(
        self, factor: torch.Tensor, numerator: torch.Tensor, other: torch.Tensor
    ) -> torch.Tensor:
        """One Lee-Seung step: `factor * numerator / (factor @ (other^T other) + eps)`."""
        denominator = torch.bmm(factor, torch.bmm(other.mT, other)).add_(self.eps)
        return factor * numerator / denominator

    def _iterate(
        self, x: torch.Tensor, bases: torch.Tensor, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xt_bases = torch.bmm(x.mT, bases)  # (B, N, R)
        coef = torch.softmax(xt_bases, dim=-1)
        for step in range(steps):
            if step > 0:  # step 0 reuses the product above: the bases have not moved yet
                xt_bases = torch.bmm(x.mT, bases)
            coef = self._update(coef, xt_bases, bases)
            bases = self._update(bases, torch.bmm(x, coef), coef)
        return bases, coef

    def decompose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factorise non-negative fp32 x (B, D, N) into bases (B, D, R) and coef (B, N, R)."""
        bases = self.init_bases(x.shape[0], x.device, x.dtype)
        steps = self.train_steps if self.training else self.eval_steps
        if self.grad_last_step_only:  # HamNet's speed option: backprop through the last step only
            with torch.no_grad():
                bases, coef = self._iterate(x, bases, steps)
        else:
            bases, coef = self._iterate(x, bases, steps)
        coef = self._update(coef, torch.bmm(x.mT, bases), bases)
        return bases, coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        with _autocast_off(x.device.type):
            flat = x.float().flatten(2)
            bases, coef = self.decompose(flat)
            if flat.is_contiguous():
                out = torch.bmm(bases, coef.mT)
            else:  # channels_last input: produce the transposed product to keep that layout
                out = torch.bmm(coef, bases.mT).mT
        return out.reshape(b, c, h, w).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, rank={self.rank}, train_steps={self.train_steps}, "
            f"eval_steps={self.eval_steps}, random_eval_bases={self.random_eval_bases}, "
            f"grad_last_step_only={self.grad_last_step_only}"
        )


class ConvNormAct(nn.Module):
    """1x1 conv (no bias), GroupNorm(32), optional ReLU: the head's building block."""

    def __init__(self, in_channels: int, out_channels: int, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.GroupNorm(32, out_channels)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Hamburger(nn.Module):
    """`relu(x + gn(conv(NMF(relu(conv(x))))))`: NMF as a low-rank global context residual."""

    def __init__(self, channels: int, **nmf_kwargs: Any) -> None:
        super().__init__()
        self.ham_in = nn.Conv2d(channels, channels, 1)
        self.nmf = NMF(channels, **nmf_kwargs)
        self.ham_out = ConvNormAct(channels, channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.nmf(F.relu(self.ham_in(x)))
        return F.relu(x + self.ham_out(context))


class LightHamHead(nn.Module):
    """Decoder: resize stages 2-4 to stride 8, concat, squeeze, Hamburger, align, classify.

    `forward` returns the classifier's dict (at stride 8); `features` the map it classifies.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        classifier: str = "standard",
        dropout: float = 0.1,
        classifier_kwargs: Mapping[str, Any] | None = None,
        **nmf_kwargs: Any,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.squeeze = ConvNormAct(sum(self.in_channels), channels)
        self.hamburger = Hamburger(channels, **nmf_kwargs)
        self.align = ConvNormAct(channels, channels)
        self.classifier = build_classifier(
            classifier, channels, num_classes, dropout=dropout, **dict(classifier_kwargs or {})
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official head init (the classifier inits itself): kaiming fan_out convs, GN 1/0."""
        for part in (self.squeeze, self.hamburger, self.align):
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.GroupNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The decoder's features at the first input's size (stride 8), before classifying."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(inputs)}")
        size = inputs[0].shape[-2:]
        maps = [inputs[0]] + [
            F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in inputs[1:]
        ]
        return self.align(self.hamburger(self.squeeze(torch.cat(maps, dim=1))))

    def forward(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.classifier(self.features(inputs))
