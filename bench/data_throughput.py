"""Data-loading throughput: the Ray Data stream vs webdataset + torch DataLoader.

Both run the same per-sample pipeline (decode, random resize, cat-max crop, flip, photometric,
pad; uint8 shipped, normalised in the consumer) with the same number of processes, over several
epochs of the CamVid train split, side by side in one invocation. Reported per pipeline:
start-up (to the first batch), steady samples/s (after the first batch), CPU-ms per sample
summed over every process involved (this process and all its descendants: DataLoader workers,
or Ray's raylet/GCS/workers), and samples/s per CPU core = 1000 / steady CPU-ms per sample.
CPU time, unlike wall time, stays meaningful on a machine shared with other jobs.

    .venv/bin/python bench/data_throughput.py                 # CamVid, 2 processes, 4 epochs
    .venv/bin/python bench/data_throughput.py --cpus 4 --epochs 6 --shards /tmp/camvid_shards

Shards are built on first use with `segnext shards camvid` (JPEG q95, --shard-size samples).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from cpu_meter import CpuMeter  # bench/ is the script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO / ".." / "shared" / "datasets" / "camvid"


def ensure_shards(out: Path, shard_size: int) -> Path:
    if not (out / "dataset.json").exists():
        command = [
            str(Path(sys.executable).with_name("segnext")),
            "shards",
            "camvid",
            "--root",
            str(CAMVID),
            "--out",
            str(out),
            "--splits",
            "train",
            "--shard-size",
            str(shard_size),
        ]
        print("building shards:", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return out


def child_pids() -> set[int]:
    """Direct children of this process (spawned by any of its threads)."""
    children = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                if int(handle.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    children.add(int(entry))
        except OSError:
            continue
    return children


def measure(batches: Callable[[], Iterable[dict]], exclude: set[int] = frozenset()) -> dict:
    """Consume every batch; time and CPU to the first batch and from there to the end."""
    meter = CpuMeter(exclude)
    cpu0, wall0 = meter.read(), time.perf_counter()
    samples = first = 0
    cpu1 = wall1 = None
    for batch in batches():
        count = len(batch["images"])
        if cpu1 is None:
            cpu1, wall1, first = meter.read(), time.perf_counter(), count
        else:
            meter.read()
        samples += count
    cpu2, wall2 = meter.read(), time.perf_counter()
    steady = samples - first
    return {
        "samples": samples,
        "startup_s": wall1 - wall0,
        "steady_sps": steady / (wall2 - wall1),
        "cpu_ms": 1000 * (cpu2 - cpu1) / steady,
        "cpu_ms_all": 1000 * (cpu2 - cpu0) / samples,
    }


def transform_ceiling(root: str, recipe: dict, limit: int) -> float:
    """CPU-ms per sample of decode + transform alone in this process (the per-core ceiling)."""
    from data.loader import build_pipeline, read_shard
    from data.manifest import load_manifest

    manifest = load_manifest(root)
    pipeline = build_pipeline(manifest, train=True, **recipe)
    samples = []
    for url in manifest.shard_urls("train"):
        samples.extend((url, sample) for sample in read_shard(url))
    samples = samples[:limit]
    start = time.process_time()
    for epoch in range(2):
        for url, sample in samples:
            pipeline(sample, shard=url, key=sample["__key__"], epoch=epoch)
    return 1000 * (time.process_time() - start) / (2 * len(samples))


def run_torch(root: str, recipe: dict, args: argparse.Namespace) -> dict[str, float]:
    from data.loader import build_torch_loader

    def batches() -> Iterable[dict]:
        loader = build_torch_loader(
            root,
            "train",
            train=True,
            batch_size=args.batch_size,
            num_workers=args.cpus,
            epochs=args.epochs,
            **recipe,
        )
        return iter(loader)

    return measure(batches, exclude=child_pids())  # not the Ray processes started earlier


def run_ray(root: str, recipe: dict, args: argparse.Namespace) -> dict:
    """The training stream of one worker (world 1): `epochs` epochs of the batch plan."""
    from data.stream import build_train_stream

    def batches() -> Iterable[dict]:
        stream = build_train_stream(root, "train", global_batch_size=args.batch_size,
                                    micro_batch_size=args.batch_size, read_cpus=args.read_cpus,
                                    **recipe)
        steps = stream.plan.steps_per_epoch * args.epochs
        for _, batch in stream.micro_batches(world=1, rank=0, start=0, stop=steps,
                                             prefetch_batches=args.prefetch):
            yield batch

    return measure(batches)


def median(results: list[dict], name: str) -> float:
    return float(np.median([result[name] for result in results]))


def summary(name: str, results: list[dict], cpus: int) -> str:
    rate, cpu_ms = median(results, "steady_sps"), median(results, "cpu_ms")
    startups = [result["startup_s"] for result in results]
    return (
        f"{name:<32} {results[0]['samples']:>7.0f} {startups[0]:>7.1f} "
        f"{float(np.median(startups[1:] or startups)):>7.1f} {rate:>9.1f} {rate / cpus:>8.1f} "
        f"{cpu_ms:>7.1f} {median(results, 'cpu_ms_all'):>9.1f} {1000 / cpu_ms:>8.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=Path("/tmp/segnext-bench-camvid"))
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="processes / Ray CPUs per side")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measured run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per pipeline")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"))
    parser.add_argument(
        "--read-cpus", type=float, default=1.0, help="per Ray task; 1.0: --cpus tasks at once"
    )
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--gpu-rate", type=float, default=300.0, help="img/s one GPU trains")
    args = parser.parse_args()

    import ray

    from data.stream import configure_data_context

    root = str(ensure_shards(args.shards, args.shard_size))
    recipe = {"crop_size": tuple(args.crop), "scale": tuple(args.scale) if args.scale else None}
    ceiling = transform_ceiling(root, recipe, limit=128)
    ceiling_512 = transform_ceiling(root, {"crop_size": (512, 512), "scale": (2048, 512)}, 128)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - start
    configure_data_context()
    results: dict[str, list[dict]] = {"torch": [], "stream": []}
    for round_index in range(args.rounds):
        results["torch"].append(run_torch(root, recipe, args))
        results["stream"].append(run_ray(root, recipe, args))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    ray.shutdown()

    print(
        f"\nCamVid train ({results['torch'][0]['samples']} samples per run = {args.epochs} "
        f"epochs, drop_last), crop {args.crop[0]}x{args.crop[1]}, scale {args.scale}, batch "
        f"{args.batch_size}, {args.cpus} processes per side, medians of {args.rounds} "
        f"alternating rounds; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores"
    )
    print(
        f"{'pipeline':<32} {'samples':>7} {'start1':>7} {'start':>7} {'steady/s':>9} "
        f"{'/s/proc':>8} {'CPU-ms':>7} {'CPU-ms+st':>9} {'/s/core':>8}"
    )
    print(f"{'transform alone, 1 process':<32} {ceiling:>57.1f} {'':>9} {1000 / ceiling:>8.1f}")
    print(summary(f"torch DataLoader, {args.cpus} workers", results["torch"], args.cpus))
    print(summary("Ray Data, batch plan stream", results["stream"], args.cpus))
    print(
        "start1: first round (Ray: cold worker processes), start: later rounds, both to the "
        "first batch; CPU-ms: per sample after the first batch, all processes; CPU-ms+st: "
        f"with start-up; /s/core = 1000 / CPU-ms. ray.init took {ray_init_s:.1f} s."
    )
    torch_ms = median(results["torch"], "cpu_ms")
    ratio = torch_ms / median(results["stream"], "cpu_ms")
    wall = median(results["stream"], "steady_sps") / median(results["torch"], "steady_sps")
    print(f"Ray / torch: {ratio:.2f}x samples/s per CPU core, {wall:.2f}x wall")
    overhead = median(results["stream"], "cpu_ms") / ceiling
    cores = args.gpu_rate * ceiling_512 * overhead / 1000
    print(
        f"512x512 crop, scale (2048, 512): transform alone {ceiling_512:.1f} CPU-ms/sample; "
        f"times the stream's overhead over the ceiling here (x{overhead:.2f}) -> one GPU "
        f"training SegNeXt-T at {args.gpu_rate:.0f} img/s needs about {int(np.ceil(cores))} "
        "CPU cores of data loading"
    )


if __name__ == "__main__":
    main()
