"""What each classifier head and its loss cost per training step on the CPU; prints Markdown.

Forward + backward of (a) the classifier and its loss alone, on stride-8 decoder features,
and (b) the whole SegNeXt, both at one worker's share of the CamVid CPU benchmark's step
(4 images of 180x240, 11 classes, one torch thread), for every head x loss resolution
(`loss.resolution`: "mask" = logits resized to the mask, "logits" = mask sampled down to the
stride-8 logits); then each classifier at eval on one image (integration at the full-size
mask, as `segnext eval` scores the half-size CamVid predictions). Process CPU time per call is the column to trust on a busy machine (wall
time is printed too). To compare code versions, run it with another checkout first on the
path (only "mask" exists where the loss has no `resolution` option):

    .venv/bin/python bench/head_cost.py
    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/head_cost.py --resolutions mask
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import segnext
from segnext import build_criterion, create_model
from segnext.classifier import DECISIONS, build_classifier
from segnext.model import VARIANTS

HEADS = ("standard", "integrated")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="images per call (one worker's)")
    parser.add_argument("--size", type=int, nargs=2, default=[180, 240], metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--resolutions", nargs="+", default=["mask", "logits"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10, help="timed calls (head alone)")
    parser.add_argument("--model-iters", type=int, default=3, help="timed calls (whole model)")
    parser.add_argument("--no-model", action="store_true", help="time the head alone only")
    return parser.parse_args()


def measure(fn: Callable[[], None], iters: int) -> tuple[float, float]:
    """Median (wall ms, process CPU ms) per call, after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(iters):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)


def criterion_for(head: str, resolution: str) -> torch.nn.Module:
    # Only pass the option when it is not the default, so that older checkouts run "mask".
    return build_criterion(head, **({} if resolution == "mask" else {"resolution": resolution}))


def head_alone(head: str, resolution: str, args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    height, width = args.size
    channels = VARIANTS[args.variant].head_channels
    features = torch.randn(args.batch, channels, -(-height // 8), -(-width // 8))
    features.requires_grad_()
    masks = torch.randint(0, args.classes, (args.batch, height, width))
    classifier = build_classifier(head, channels, args.classes).train()
    criterion = criterion_for(head, resolution)

    def step() -> None:
        loss, _ = criterion(classifier(features), masks)
        loss.backward()

    return measure(step, args.iters)


def head_eval(head: str, args: argparse.Namespace, **options: str) -> tuple[float, float]:
    """One image's classifier at eval: forward, resize to the full-size mask (2x), argmax;
    `options`: the classifier's (the integrated head's `decision`)."""
    torch.manual_seed(0)
    height, width = args.size
    channels = VARIANTS[args.variant].head_channels
    features = torch.randn(1, channels, -(-height // 8), -(-width // 8))
    classifier = build_classifier(head, channels, args.classes, **options).eval()

    def call() -> None:
        with torch.inference_mode():
            classifier.resize_logits(classifier(features), (2 * height, 2 * width)).argmax(1)

    return measure(call, args.iters)


def whole_model_eval(head: str, args: argparse.Namespace, **options: str) -> tuple[float, float]:
    """One full-size image (2x the crop: CamVid's half-size test images) through the whole model
    at eval, argmax included; `options`: the classifier's."""
    torch.manual_seed(0)
    height, width = args.size
    model = create_model(args.variant, args.classes, classifier=head,
                         classifier_kwargs=options).eval()
    image = torch.randn(1, 3, 2 * height, 2 * width)

    def call() -> None:
        with torch.inference_mode():
            model(image).argmax(1)

    return measure(call, args.model_iters)


def whole_model(head: str, resolution: str, args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    height, width = args.size
    model = create_model(args.variant, args.classes, classifier=head).train()
    images = torch.randn(args.batch, 3, height, width)
    masks = torch.randint(0, args.classes, (args.batch, height, width))
    criterion = criterion_for(head, resolution)

    def step() -> None:
        loss, _ = criterion(model(images), masks)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return measure(step, args.model_iters)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), load average {load}, "
        f"segnext from {os.path.dirname(segnext.__file__)}; batch {args.batch} x "
        f"{args.size[0]}x{args.size[1]}, {args.classes} classes, SegNeXt-{args.variant}",
        flush=True,
    )
    columns = "| head | loss at | head + loss fwd+bwd: CPU ms (wall ms) |"
    if not args.no_model:
        columns += " whole model fwd+bwd: CPU ms (wall ms) |"
    print(columns)
    print("|---" * (columns.count("|") - 1) + "|")
    for head in HEADS:
        for resolution in args.resolutions:
            wall, cpu = head_alone(head, resolution, args)
            row = f"| {head} | {resolution} | {cpu:.1f} ({wall:.1f}) |"
            if not args.no_model:
                wall, cpu = whole_model(head, resolution, args)
                row += f" {cpu:.0f} ({wall:.0f}) |"
            print(row, flush=True)
    size = f"{2 * args.size[0]}x{2 * args.size[1]}"
    columns = f"| head | eval, one image: head + resize to {size} + argmax: CPU ms (wall ms) |"
    if not args.no_model:
        columns += f" whole model eval, one {size} image: CPU ms (wall ms) |"
    print(f"\n{columns}\n" + "|---" * (columns.count("|") - 1) + "|")
    rows = [("standard", {}), *(("integrated", {"decision": rule}) for rule in DECISIONS)]
    for head, options in rows:
        wall, cpu = head_eval(head, args, **options)
        name = f"{head}, decision {options['decision']}" if options else head
        row = f"| {name} | {cpu:.1f} ({wall:.1f}) |"
        if not args.no_model:
            wall, cpu = whole_model_eval(head, args, **options)
            row += f" {cpu:.0f} ({wall:.0f}) |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
