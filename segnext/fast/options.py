"""Switch a built SegNeXt onto the fast path in place, without touching its state_dict keys.

Module swaps reuse the original submodules, so checkpoints and official weights load the same
before and after; the switches change speed, and results by no more than rounding.
"""

from __future__ import annotations

from torch import nn

from segnext.fast.msca_triton import FusedMSCA
from segnext.ham import NMF
from segnext.mscan import MSCA


def apply_fast_path(
    model: nn.Module,
    *,
    fused_msca: bool = True,
    nmf_grad_last_step_only: bool | None = None,
) -> nn.Module:
    """Apply the fast-path switches to `model` (any module containing MSCA / NMF blocks).

    fused_msca: replace every `MSCA` by `FusedMSCA` (Triton strip branches + sum; eager where
        Triton cannot run). False turns fused blocks back into plain `MSCA`.
    nmf_grad_last_step_only: set on every NMF (backprop through the last update only);
        None leaves each NMF as built.
    Returns `model` for chaining.
    """
    target = FusedMSCA if fused_msca else MSCA
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, MSCA | FusedMSCA) and not isinstance(child, target):
                setattr(parent, name, _convert(child, fused_msca))
    if nmf_grad_last_step_only is not None:
        for module in model.modules():
            if isinstance(module, NMF):
                module.grad_last_step_only = nmf_grad_last_step_only
    return model


def _convert(block: MSCA | FusedMSCA, fused: bool) -> nn.Module:
    """The same submodules (hence the same parameters and keys) under the other class."""
    if fused:
        return FusedMSCA(block)
    plain = MSCA(block.mix.in_channels, [s.horizontal.kernel_size[1] for s in block.strips])
    plain.conv_local, plain.strips, plain.mix = block.conv_local, block.strips, block.mix
    return plain
