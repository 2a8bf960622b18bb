"""Training throughput: the full Ray pipeline against the same model fed from memory.

Side by side in one invocation, same model (SegNeXt-T, integrated classifier by default), same
loss, optimizer and per-step batch, same synthetic data:

- memory: one process, pre-decoded normalised tensors already in RAM, torch using every core
  (the ceiling of the model itself on this machine) and using one thread (per-core efficiency);
- ray-N: `segnext train`'s own path (Ray Data shards -> decode -> augment -> Ray Train DDP over N
  CPU workers, MLflow logging included), read back from the run's `perf/images_per_s` after
  the first logging window (start-up excluded).

Wall-clock images/s plus CPU-seconds per image over this process and all its descendants (Ray's
raylet, workers and tasks included, sampled from /proc), which stays meaningful on a machine
shared with other jobs.

    .venv/bin/python bench/train_throughput.py                    # 2 cores: a few minutes
    .venv/bin/python bench/train_throughput.py --workers 1 2 4 --iterations 60 --crop 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cpu_meter import CpuMeter  # bench/ is the script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.sources import Synthetic  # noqa: E402
from data.transforms import MEAN, STD  # noqa: E402


def base_overrides(args: argparse.Namespace, root: Path) -> list[str]:
    return [
        f"model.classifier={args.classifier}",
        f"data.root={root / 'shards'}",
        f"data.crop_size=[{args.crop}, {args.crop}]",
        "data.ratio_range=[0.75, 1.5]",
        f"schedule.iterations={args.iterations}",
        "schedule.warmup_iters=1",
        f"train.global_batch_size={args.batch}",
        f"train.log_every={args.log_every}",
        f"train.val_every={args.iterations}",
        f"train.checkpoint_every={args.iterations}",
        "train.max_failures=0",
        "registry.register=false",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "mlflow.experiment=bench-train-throughput",
        f"run.storage_path={root / 'ray'}",
    ]


def run_memory(args: argparse.Namespace, cfg, threads: int) -> dict[str, float]:
    """The model alone: random batches of in-RAM tensors, one process, `threads` threads."""
    from pipelines.train.loop import build_model
    from pipelines.train.optim import build_optimizer
    from pipelines.train.step import train_step
    from segnext import build_criterion

    torch.set_num_threads(threads)
    source = Synthetic(num_train=args.samples, num_val=0, size=(args.crop, args.crop))
    images, masks = zip(*(source.render("train", i) for i in range(args.samples)), strict=True)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(np.stack(masks)).long()
    torch.manual_seed(0)
    model = build_model(cfg, len(source.classes)).train()
    criterion = build_criterion(cfg.model.classifier)
    optimizer = build_optimizer(model, cfg.optim)
    step_times = []
    meter = CpuMeter()
    wall_start = None
    for step in range(args.iterations):
        if step == args.log_every:  # same warm-up exclusion as the Ray runs
            meter.start()
            wall_start = time.perf_counter()
        index = torch.randint(0, args.samples, (args.batch,))
        result = train_step(model, [{"images": x[index], "masks": y[index]}], criterion, optimizer)
        step_times.append(result.seconds)
    images = args.batch * (args.iterations - args.log_every)
    return {
        "images_per_s": images / (time.perf_counter() - wall_start),
        "cpu_s_per_image": meter.stop() / images,
        "step_s": statistics.median(step_times[args.log_every :]),
        "total_s": time.perf_counter() - wall_start,
    }


def run_ray(args: argparse.Namespace, root: Path, workers: int) -> dict[str, float]:
    """`run_training` as `segnext train` runs it; throughput from its own MLflow metrics."""
    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config
    from pipelines.train.driver import run_training
    from pipelines.train.resolve import resolve

    cpus = os.cpu_count() or 1
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            *base_overrides(args, root),
            f"ray.num_workers={workers}",
            f"ray.cpus_per_worker={max(cpus - 1, 1) / workers:.3f}",  # leave a core to Ray Data
        ],
    )
    meter = CpuMeter().start()
    wall_before = time.perf_counter()
    result = run_training(resolve(cfg, run_name=f"bench-{workers}w-{int(time.time())}",
                                  storage_path=str(root / "ray")))
    wall = time.perf_counter() - wall_before
    cpu = meter.stop()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    history = sorted(client.get_metric_history(result.run_id, "perf/images_per_s"),
                     key=lambda m: m.step)
    steady = [m.value for m in history if m.step > args.log_every]
    print(f"[bench]   {len(steady)} windows, {wall:.0f} s", flush=True)
    steps = sorted(client.get_metric_history(result.run_id, "perf/step_time_s"),
                   key=lambda m: m.step)
    waits = client.get_metric_history(result.run_id, "perf/data_wait_fraction")
    return {
        "images_per_s": statistics.median(steady),
        "cpu_s_per_image": cpu / (args.batch * args.iterations),  # whole run, start-up included
        "step_s": statistics.median(m.value for m in steps if m.step > args.log_every),
        "data_wait": statistics.median(m.value for m in waits if m.step > args.log_every),
        "total_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--classifier", default="integrated", choices=("standard", "integrated"))
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="global batch per step")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--samples", type=int, default=256, help="synthetic train images")
    args = parser.parse_args()

    import ray

    from data.shard_writer import write_shards
    from pipelines.cluster import init_ray
    from pipelines.config import load_config

    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        root = Path(folder)
        write_shards(Synthetic(num_train=args.samples, num_val=16, size=(args.crop, args.crop)),
                     root / "shards")
        cfg = load_config(REPO / "configs" / "demo.yaml", base_overrides(args, root))
        cores = os.cpu_count() or 1
        ceiling_name = f"memory, 1 process, {cores} threads"
        results = {ceiling_name: run_memory(args, cfg, cores)}
        if cores > 1:
            results["memory, 1 process, 1 thread"] = run_memory(args, cfg, 1)
        init_ray("local", num_cpus=cores)
        try:
            for workers in args.workers:
                print(f"[bench] Ray Data -> Ray Train with {workers} worker(s) ...", flush=True)
                results[f"Ray Data -> Ray Train, {workers} worker(s)"] = run_ray(args, root, workers)
        finally:
            ray.shutdown()

    ceiling = results[ceiling_name]["images_per_s"]
    print(f"\nSegNeXt-T ({args.classifier}), crop {args.crop}x{args.crop}, batch {args.batch}, "
          f"{args.iterations} iterations, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print("| pipeline | images/s | vs memory | step (s) | data wait | CPU-s / image | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        wait = f"{100 * r['data_wait']:.0f}%" if "data_wait" in r else "-"
        print(f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / ceiling:.2f}x | "
              f"{r['step_s']:.3f} | {wait} | {r['cpu_s_per_image']:.3f} | {r['total_s']:.0f} |")
    print("Ray rows: images/s is the median of the run's perf/images_per_s windows after the "
          "first; CPU-s / image and wall include Ray start-up, validation and checkpoints.")


if __name__ == "__main__":
    main()
