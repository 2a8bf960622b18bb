"""Fused MSCA strip branches in Triton: `attn = local + sum_k V_k(H_k(local))` in two passes.

Eager MSCA spends 9 launches and ~21 full-tensor passes on the three strip pairs and their sum.
Here one kernel runs the three horizontal 1xk convs off a single read of `local` (fan-out), and
one kernel runs the three vertical kx1 convs and adds `local` (fan-in): 2 launches, 9 passes.
The backward reuses both kernels with flipped taps (a depth-wise conv's input gradient is the
same conv with the kernel reversed), plus one reduction kernel per conv for weight and bias
gradients. Arithmetic is fp32 in registers; tensors keep their dtype (bf16 under autocast).

Runs on CUDA, or on CPU tensors under `TRITON_INTERPRET=1` (tests); `fused_strips_available`
says whether a tensor can take this path, and `FusedMSCA` falls back to eager otherwise.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from segnext.mscan import MSCA

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: FusedMSCA runs the eager computation
    triton = None
    tl = None

HORIZONTAL, VERTICAL = 1, 0  # AXIS constexpr: the dimension the strip slides along
TILE_ELEMENTS = 2048  # elements per program tile (a power of two)


def triton_available() -> bool:
    """True when Triton imported."""
    return triton is not None


def fused_strips_available(x: torch.Tensor) -> bool:
    """Whether `x` can take the Triton path: CUDA, or CPU with the Triton interpreter on."""
    if triton is None:
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _shifted(ptr, rows, cols, d, H, W, AXIS: tl.constexpr):
        """Load the plane tile displaced by `d` along AXIS; zero outside the image."""
        if AXIS == 1:
            cols = cols + d
        else:
            rows = rows + d
        mask = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
        return tl.load(ptr + rows * W + cols, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _strip_kernel(
        x0, x1, x2, res, y0, y1, y2, w0, w1, w2, b0, b1, b2,
        C, H, W, TILES_W,
        K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
        AXIS: tl.constexpr, FAN_IN: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """Three depth-wise strip convs over one (batch, channel) plane tile.

        FAN_IN=False: y_k = conv_k(x0) + b_k, one shared shifted load feeding all three.
        FAN_IN=True:  y0 = res + sum_k conv_k(x_k) + b_k.
        K0 >= K1 >= K2, all odd; w_k holds K_k taps per channel.
        """
        plane = tl.program_id(0)
        tile = tl.program_id(1)
        c = plane % C
        rows = (tile // TILES_W) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        cols = (tile % TILES_W) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
        inside = (rows < H) & (cols < W)
        base = plane.to(tl.int64) * H * W
        P0: tl.constexpr = K0 // 2
        P1: tl.constexpr = K1 // 2
        P2: tl.constexpr = K2 // 2
        acc0 = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        for t in tl.static_range(K0):
            d = t - P0
            if FAN_IN:
                acc0 += tl.load(w0 + c * K0 + t) * _shifted(x0 + base, rows, cols, d, H, W, AXIS)
                if d >= -P1 and d <= P1:
                    v1 = _shifted(x1 + base, rows, cols, d, H, W, AXIS)
                    acc1 += tl.load(w1 + c * K1 + d + P1) * v1
                if d >= -P2 and d <= P2:
                    v2 = _shifted(x2 + base, rows, cols, d, H, W, AXIS)
                    acc2 += tl.load(w2 + c * K2 + d + P2) * v2
            else:
                v = _shifted(x0 + base, rows, cols, d, H, W, AXIS)
                acc0 += tl.load(w0 + c * K0 + t) * v
                if d >= -P1 and d <= P1:
                    acc1 += tl.load(w1 + c * K1 + d + P1) * v
                if d >= -P2 and d <= P2:
                    acc2 += tl.load(w2 + c * K2 + d + P2) * v
        if HAS_BIAS:
            acc0 += tl.load(b0 + c)
            acc1 += tl.load(b1 + c)
            acc2 += tl.load(b2 + c)
        offs = base + rows * W + cols
        if FAN_IN:
            total = acc0 + acc1 + acc2 + tl.load(res + offs, mask=inside, other=0.0).to(tl.float32)
            tl.store(y0 + offs, total.to(y0.dtype.element_ty), mask=inside)
        else:
            tl.store(y0 + offs, acc0.to(y0.dtype.element_ty), mask=inside)
            tl.store(y1 + offs, acc1.to(y1.dtype.element_ty), mask=inside)
            tl.store(y2 + offs, acc2.to(y2.dtype.element_ty), mask=inside)

    @triton.jit
    def _strip_wgrad_kernel(
        a, g, partial, H, W, TILES_W, N_TILES,
        K: tl.constexpr, AXIS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """Per-tile partial sums of one strip conv's gradients: tap t gets
        sum(g * a shifted by t - K//2); slot K gets sum(g) (the bias gradient)."""
        plane = tl.program_id(0)
        tile = tl.program_id(1)
        rows = (tile // TILES_W) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        cols = (tile % TILES_W) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
        base = plane.to(tl.int64) * H * W
        grad = _shifted(g + base, rows, cols, 0, H, W, AXIS)
        out = partial + (plane.to(tl.int64) * N_TILES + tile) * (K + 1)
        for t in tl.static_range(K):
            tap = grad * _shifted(a + base, rows, cols, t - K // 2, H, W, AXIS)
            tl.store(out + t, tl.sum(tl.sum(tap, axis=1), axis=0))
        tl.store(out + K, tl.sum(tl.sum(grad, axis=1), axis=0))


def _blocks(h: int, w: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_W, tiles along W, tiles in total): ~2K-element tiles, whole rows when
    they fit, so the horizontal halo stays inside the tile for all but the widest maps."""
    block_w = min(triton.next_power_of_2(w), 128)
    block_w = min(block_w, TILE_ELEMENTS)
    block_h = min(triton.next_power_of_2(h), max(1, TILE_ELEMENTS // block_w))
    tiles_w = triton.cdiv(w, block_w)
    return block_h, block_w, tiles_w, tiles_w * triton.cdiv(h, block_h)


def _strips(
    xs: tuple[torch.Tensor, ...],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor] | None,
    axis: int,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Launch `_strip_kernel`: fan-out when given one input, fan-in (plus residual) for three."""
    x = xs[0]
    b, c, h, w = x.shape
    fan_in = len(xs) == 3
    outs = [torch.empty_like(x)] if fan_in else [torch.empty_like(x) for _ in range(3)]
    block_h, block_w, tiles_w, n_tiles = _blocks(h, w)
    ins = xs if fan_in else (x, x, x)
    ys = outs if not fan_in else outs * 3
    bs = biases if biases is not None else weights  # unused when HAS_BIAS is False
    _strip_kernel[(b * c, n_tiles)](
        *ins, residual if residual is not None else x, *ys, *weights, *bs,
        c, h, w, tiles_w,
        K0=weights[0].shape[-1], K1=weights[1].shape[-1], K2=weights[2].shape[-1],
        AXIS=axis, FAN_IN=fan_in, HAS_BIAS=biases is not None,
        BLOCK_H=block_h, BLOCK_W=block_w,
    )  # fmt: skip
    return outs


def _strip_wgrad(a: torch.Tensor, g: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """(C, k + 1) fp32: the taps' gradients, then the bias gradient, of one strip conv."""
    b, c, h, w = a.shape
    block_h, block_w, tiles_w, n_tiles = _blocks(h, w)
    partial = torch.empty(b * c, n_tiles, k + 1, device=a.device, dtype=torch.float32)
    _strip_wgrad_kernel[(b * c, n_tiles)](
        a, g, partial, h, w, tiles_w, n_tiles,
        K=k, AXIS=axis, BLOCK_H=block_h, BLOCK_W=block_w,
    )  # fmt: skip
    return partial.view(b, c, n_tiles, k + 1).sum(dim=(0, 2))


class _FusedStrips(torch.autograd.Function):
    """`local + sum_k vertical_k(horizontal_k(local))` for three strip pairs, sizes descending.

    Weights arrive flattened to (C, k) fp32-or-param dtype; inputs must be NCHW-contiguous.
    """

    @staticmethod
    def forward(ctx, local, wh0, bh0, wv0, bv0, wh1, bh1, wv1, bv1, wh2, bh2, wv2, bv2):
        wh, bh, wv, bv = [wh0, wh1, wh2], [bh0, bh1, bh2], [wv0, wv1, wv2], [bv0, bv1, bv2]
        hs = _strips((local,), wh, bh, HORIZONTAL)
        (attn,) = _strips(tuple(hs), wv, bv, VERTICAL, residual=local)
        ctx.save_for_backward(local, *hs, *wh, *wv)
        return attn

    @staticmethod
    def backward(ctx, grad):
        local, h0, h1, h2, wh0, wh1, wh2, wv0, wv1, wv2 = ctx.saved_tensors
        grad = grad.contiguous()
        hs, wh, wv = (h0, h1, h2), (wh0, wh1, wh2), (wv0, wv1, wv2)
        flip = [w.flip(-1).contiguous() for w in wv]
        grad_hs = _strips((grad,), flip, None, VERTICAL)
        flip = [w.flip(-1).contiguous() for w in wh]
        (grad_local,) = _strips(tuple(grad_hs), flip, None, HORIZONTAL, residual=grad)
        grads: list[torch.Tensor] = []
        for h, gh, w_h, w_v in zip(hs, grad_hs, wh, wv, strict=True):
            k = w_h.shape[-1]
            gw_h = _strip_wgrad(local, gh, k, HORIZONTAL)
            gw_v = _strip_wgrad(h, grad, k, VERTICAL)
            grads += [
                gw_h[:, :k].to(w_h.dtype),
                gw_h[:, k].to(w_h.dtype),
                gw_v[:, :k].to(w_v.dtype),
                gw_v[:, k].to(w_v.dtype),
            ]
        return (grad_local, *grads)


def fused_strip_sum(local: torch.Tensor, strips: nn.ModuleList) -> torch.Tensor:
    """`local + sum(strip(local) for strip in strips)` through the Triton kernels.

    `strips` holds three `StripConv` modules (any odd sizes, any order); weight gradients
    flow back to their parameters in their own shapes.
    """
    if len(strips) != 3:
        raise ValueError(f"the fused MSCA kernel takes exactly 3 strip branches, got {len(strips)}")
    order = sorted(strips, key=lambda s: -s.horizontal.kernel_size[1])
    args: list[torch.Tensor] = []
    for strip in order:
        for conv in (strip.horizontal, strip.vertical):
            args += [conv.weight.reshape(conv.weight.shape[0], -1), conv.bias]
    return _FusedStrips.apply(local.contiguous(), *args)


class FusedMSCA(nn.Module):
    """MSCA with the strip branches and their sum fused; same submodules, so the same
    state_dict keys as `MSCA`. Falls back to the eager computation where Triton cannot run."""

    def __init__(self, msca: MSCA) -> None:
        super().__init__()
        self.conv_local = msca.conv_local
        self.strips = msca.strips
        self.mix = msca.mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.conv_local(x)
        if fused_strips_available(local):
            attn = fused_strip_sum(local, self.strips)
        else:
            attn = local
            for strip in self.strips:
                attn = attn + strip(local)
        return self.mix(attn) * x
