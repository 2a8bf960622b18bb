"""Model size, cost and speed per SegNeXt variant; prints a Markdown table.

Parameters and GMACs (FlopCounterMode on the meta device: no compute, MACs = FLOPs / 2) at
512x512, batch 1, 150 classes, to compare with the spec's conv + NMF counts. Then forward
(eval, no_grad) and forward+backward (train mode, cross-entropy) times on the CPU, and on CUDA
when present (bf16 autocast and channels_last by default, optional torch.compile).

    python bench/model_speed.py                       # all variants, CPU (+ CUDA if present)
    python bench/model_speed.py --variants t s --cpu-size 256 --cuda-batch 16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from segnext import create_model
from segnext.model import VARIANTS, resolve_variant

# The spec's conv + NMF GMACs of the official model (512x512, eval, 150 classes).
SPEC_GMACS = {"tiny": "6.40", "small": "15.65", "base": "34.66", "large": "69.69"}
NUM_CLASSES = 150


def count_gmacs(variant: str, size: int) -> tuple[float, float, float]:
    """(total, NMF part, official-equivalent total) GMACs of one eval forward at size x size.

    Our NMF reuses its initial x^T bases product for the first coefficient update (the bases
    have not moved yet); the official code recomputes it, N*D*R MACs more.
    """
    model = create_model(variant, NUM_CLASSES).to("meta").eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    nmf = sum(counter.get_flop_counts()["SegNeXt.decode_head.hamburger.nmf"].values()) / 2
    total = counter.get_total_flops() / 2
    cfg = VARIANTS[variant]
    reused = (-(-size // 8)) ** 2 * cfg.head_channels * cfg.nmf_rank
    return total / 1e9, nmf / 1e9, (total + reused) / 1e9


def count_params(model: torch.nn.Module) -> tuple[int, int, int]:
    def n(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    return n(model.backbone), n(model.decode_head), n(model)


def median_seconds(fn: Callable[[], None], warmup: int, iters: int, device: str) -> float:
    """Median wall time of `fn`, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_variant(
    variant: str, device: str, batch: int, size: int, args: argparse.Namespace
) -> dict[str, float]:
    """Seconds per forward and per forward+backward, and peak CUDA memory (GiB)."""
    torch.manual_seed(0)
    model = create_model(variant, NUM_CLASSES).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    masks = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)
    use_cuda = device == "cuda"
    if use_cuda and args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if use_cuda and args.compile else model
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if use_cuda and args.amp == "bf16"
        else contextlib.nullcontext()
    )

    def forward() -> None:
        with torch.no_grad(), amp:
            runner(images)

    def forward_backward() -> None:
        with amp:
            logits = runner(images)["logits"]
            logits = F.interpolate(
                logits, size=masks.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = F.cross_entropy(logits, masks, ignore_index=255)
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    fwd = median_seconds(forward, args.warmup, args.iters, device)
    model.train()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    fwd_bwd = median_seconds(forward_backward, args.warmup, args.iters, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else float("nan")
    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "peak_gib": peak}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="t s b l or names")
    parser.add_argument("--flops-size", type=int, default=512)
    parser.add_argument("--cpu-batch", type=int, default=1)
    parser.add_argument("--cpu-size", type=int, default=256)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU timings")
    parser.add_argument("--cuda-batch", type=int, default=16)
    parser.add_argument("--cuda-size", type=int, default=512)
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="CUDA only")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="CUDA only"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    variants = [resolve_variant(v) for v in args.variants]
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    spec = SPEC_GMACS if args.flops_size == 512 else None
    header = (
        "| variant | params encoder / head / total | GMACs ours (NMF) | official-equivalent"
        " / spec |"
    )
    columns = 4
    if not args.no_cpu:
        header += f" CPU fwd ms/img ({args.cpu_batch}x{args.cpu_size}²) | CPU fwd+bwd ms/img |"
        columns += 2
    if cuda:
        mode = f"{args.amp}{', channels_last' if args.channels_last else ''}"
        mode += ", compile" if args.compile else ""
        header += (
            f" CUDA fwd img/s ({args.cuda_batch}x{args.cuda_size}², {mode}) |"
            " CUDA fwd+bwd img/s | CUDA peak GiB (fwd+bwd) |"
        )
        columns += 3
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    device_line = (
        f"torch {torch.__version__}, CPU threads {torch.get_num_threads()} of {os.cpu_count()}"
        f" (load average {load})"
    )
    if cuda:
        device_line += f", {torch.cuda.get_device_name()}"
    print(device_line, flush=True)
    print(header)
    print("|" + "---|" * columns, flush=True)
    for variant in variants:
        encoder, head, total = count_params(create_model(variant, NUM_CLASSES))
        gmacs, nmf, official = count_gmacs(variant, args.flops_size)
        row = (
            f"| {variant} | {encoder:,} / {head:,} / {total:,} | {gmacs:.2f} ({nmf:.3f}) |"
            f" {official:.2f} / {spec[variant] if spec else 'n/a'} |"
        )
        if not args.no_cpu:
            cpu = time_variant(variant, "cpu", args.cpu_batch, args.cpu_size, args)
            row += f" {cpu['fwd'] * 1e3 / args.cpu_batch:.0f} | {cpu['fwd_bwd'] * 1e3 / args.cpu_batch:.0f} |"
        if cuda:
            gpu = time_variant(variant, "cuda", args.cuda_batch, args.cuda_size, args)
            row += (
                f" {args.cuda_batch / gpu['fwd']:.1f} | {args.cuda_batch / gpu['fwd_bwd']:.1f} |"
                f" {gpu['peak_gib']:.1f} |"
            )
        print(row, flush=True)


if __name__ == "__main__":
    main()
