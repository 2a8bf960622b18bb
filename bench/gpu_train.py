"""Training and inference speed of SegNeXt, reference mode against the fast path; Markdown out.

Reference mode is the official computation: eager fp32 under PyTorch's default precision flags
(cuDNN convolutions may use TF32, `cudnn.allow_tf32=True`; matmuls may not,
`cuda.matmul.allow_tf32=False`), plain AdamW. Every other mode adds fast-path switches; the
spec's H100 anchor (SegNeXt-T, batch 16, 512x512, 150 classes) is 124 img/s training, 561 img/s
inference at batch 16. A training step = forward, cross-entropy, backward, AdamW step, with no
host sync inside; CUDA events time `--iters` steps after `--warmup`.

    python bench/gpu_train.py --variants t s                         # CUDA, batch 16, 512x512
    python bench/gpu_train.py --device cpu --batch 2 --size 64 --iters 2 --warmup 1 \
        --modes reference bf16-fused --infer-batch 2                 # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipelines.train.step import train_step
from segnext import build_criterion, create_model
from segnext.fast import apply_fast_path, fused_strips_available

NUM_CLASSES = 150


@dataclass(frozen=True)
class Mode:
    """One combination of fast-path switches (all False = the reference computation)."""

    bf16: bool = False  # autocast bf16; the NMF stays fp32 inside it
    fused_msca: bool = False  # Triton strip branches + branch sum
    nmf_grad_last_step_only: bool = False
    fused_adamw: bool = False  # torch.optim.AdamW(fused=True), CUDA only
    channels_last: bool = False
    compile: bool = False


MODES: dict[str, Mode] = {
    "reference": Mode(),
    "bf16": Mode(bf16=True),
    "bf16-cl": Mode(bf16=True, channels_last=True),
    "bf16-fused": Mode(bf16=True, fused_msca=True, fused_adamw=True),
    "bf16-fused-nmflast": Mode(
        bf16=True, fused_msca=True, fused_adamw=True, nmf_grad_last_step_only=True
    ),
    "bf16-fused-compile": Mode(bf16=True, fused_msca=True, fused_adamw=True, compile=True),
    "bf16-compile": Mode(bf16=True, fused_adamw=True, compile=True),
}


class Timer:
    """Wall time of a region: CUDA events on a GPU (no sync until read), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None], repeats: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        for _ in range(repeats):
            fn()
        return time.perf_counter() - begin


def build(variant: str, mode: Mode, device: torch.device) -> torch.nn.Module:
    """The seeded model with `mode`'s module switches (identical weights in every mode)."""
    torch.manual_seed(0)
    model = create_model(variant, NUM_CLASSES).to(device)
    apply_fast_path(
        model, fused_msca=mode.fused_msca, nmf_grad_last_step_only=mode.nmf_grad_last_step_only
    )
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(mode: Mode, device: torch.device) -> contextlib.AbstractContextManager:
    if mode.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch(size: int, n: int, device: torch.device, mode: Mode) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=gen).to(device)
    if mode.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, NUM_CLASSES, (n, size, size), generator=gen).to(device)
    return images, masks


def train_speed(variant: str, mode: Mode, args: argparse.Namespace) -> dict[str, float]:
    """img/s of full training steps and the peak memory they need."""
    device = torch.device(args.device)
    model = build(variant, mode, device).train()
    step_model = torch.compile(model) if mode.compile else model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.01, fused=mode.fused_adamw or None
    )
    criterion = build_criterion("standard")
    images, masks = batch(args.size, args.batch, device, mode)

    batches = [{"images": images, "masks": masks}]

    def step() -> None:
        train_step(step_model, batches, criterion, optimizer, autocast=autocast(mode, device))

    timer = Timer(device)
    timer(step, args.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = timer(step, args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"train_img_s": args.batch * args.iters / seconds, "peak_gib": peak}


@torch.no_grad()
def infer_speed(variant: str, mode: Mode, args: argparse.Namespace) -> dict[str, float]:
    """Latency at batch 1 (median ms) and throughput at `--infer-batch` (img/s), eval mode."""
    device = torch.device(args.device)
    model = build(variant, mode, device).eval()
    run = torch.compile(model) if mode.compile else model
    timer = Timer(device)
    result = {}
    for n in (1, args.infer_batch):
        images, _ = batch(args.size, n, device, mode)

        def forward(images: torch.Tensor = images) -> None:
            with autocast(mode, device):
                run(images)

        timer(forward, args.warmup)
        if n == 1:
            times = [timer(forward, 1) for _ in range(args.iters)]
            result["infer_bs1_ms"] = statistics.median(times) * 1e3
        else:
            result[f"infer_bs{n}_img_s"] = n * args.iters / timer(forward, args.iters)
    return result


@torch.no_grad()
def logits_error(variant: str, mode: Mode, args: argparse.Namespace) -> dict[str, float]:
    """How far `mode`'s eval logits are from the reference's (same weights, same input):
    relative L2 error and the share of pixels whose argmax differs."""
    device = torch.device(args.device)
    images, _ = batch(args.size, 2, device, Mode())
    reference = build(variant, Mode(), device).eval()(images).float()
    fast = build(variant, mode, device).eval()
    with autocast(mode, device):
        logits = fast(images.contiguous(memory_format=torch.channels_last)
                      if mode.channels_last else images).float()  # fmt: skip
    err = ((logits - reference).norm() / reference.norm()).item()
    flips = (logits.argmax(1) != reference.argmax(1)).float().mean().item()
    return {"logits_rel_err": err, "argmax_changed": flips}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["t", "s"])
    parser.add_argument("--modes", nargs="+", default=["reference", "bf16", "bf16-fused",
                        "bf16-fused-nmflast"], choices=sorted(MODES))  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-infer", action="store_true", help="training speed only")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; pass --device cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's defaults, stated: the official anchor
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"# SegNeXt speed, {args.device}"
          f"{' ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}, torch "
          f"{torch.__version__}, batch {args.batch}, {args.size}x{args.size}, {NUM_CLASSES} "
          f"classes; fused MSCA runs Triton: "
          f"{fused_strips_available(torch.empty(0, device=args.device))}\n")  # fmt: skip
    header = ("| variant | mode | train img/s | x reference | peak GiB | infer bs1 ms | "
              f"infer bs{args.infer_batch} img/s | logits rel err | argmax changed |")  # fmt: skip
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for variant in args.variants:
        base = None
        for name in args.modes:
            mode = MODES[name]
            row: dict = {"variant": variant, "mode": name, **asdict(mode)}
            row.update(train_speed(variant, mode, args))
            if not args.no_infer:
                row.update(infer_speed(variant, mode, args))
            row.update(logits_error(variant, mode, args))
            base = row["train_img_s"] if name == "reference" else base
            ratio = row["train_img_s"] / base if base else float("nan")
            rows.append(row)
            print(f"| {variant} | {name} | {row['train_img_s']:.1f} | {ratio:.2f} | "
                  f"{row['peak_gib']:.1f} | {row.get('infer_bs1_ms', float('nan')):.2f} | "
                  f"{row.get(f'infer_bs{args.infer_batch}_img_s', float('nan')):.1f} | "
                  f"{row['logits_rel_err']:.2e} | {row['argmax_changed']:.4f} |", flush=True)  # fmt: skip
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
