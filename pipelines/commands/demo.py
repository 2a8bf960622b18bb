"""`segnext demo`: the whole pipeline on a laptop in a few minutes, no arguments.

Synthetic shards (written once under runs/demo-shards) -> a local Ray cluster started in this
process -> integrated-classifier SegNeXt-T trained by 2 CPU Ray Train workers on Ray Data ->
MLflow run with metrics and pictures -> best checkpoint registered as a model.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from data.storage import StorageError
from pipelines.config import ConfigError, load_config
from pipelines.train.cli import summary

DEMO_CONFIG = "configs/demo.yaml"
# The synthetic scenes: small enough to train on two CPU cores, big enough to show shapes.
SHARD_OPTIONS = {"num_train": 512, "num_val": 64, "size": (64, 64), "num_classes": 7, "seed": 0}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a small SegNeXt on synthetic data with local Ray + MLflow (a few minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"overrides of {DEMO_CONFIG}, e.g. schedule.iterations=100")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        run_demo(args.overrides)
    except (ConfigError, StorageError) as error:
        print(f"segnext demo: configuration error: {error}")
        return 2
    return 0


def run_demo(overrides: list[str] | None = None) -> None:
    # Ray, torch and MLflow (~3 s) only when the demo runs: `segnext --help` imports this module
    from pipelines.cluster import init_ray
    from pipelines.tracking.runs import project_root, resolve_tracking_uri
    from pipelines.train.driver import train

    started = time.perf_counter()
    root = project_root()
    shards = root / "runs" / "demo-shards"
    tracking_uri = resolve_tracking_uri(None)
    cfg = load_config(
        root / DEMO_CONFIG,
        [
            f"data.root={shards}",
            f"run.storage_path={root / 'runs' / 'ray'}",
            f"mlflow.tracking_uri={tracking_uri}",
            *(overrides or []),
        ],
    )
    if cfg.data.root == str(shards):  # data.root=X on the command line: the user's own data
        ensure_shards(shards)
    cpus = max(cfg.ray.num_workers, os.cpu_count() or 1)
    init_ray("local", num_cpus=cpus)  # a fresh single-node Ray in this process, never another's
    print(f"[segnext] local Ray with {cpus} CPUs")
    result = train(cfg, config_name="demo")
    minutes = (time.perf_counter() - started) / 60
    print()
    print(summary(result))
    print(f"\nDemo finished in {minutes:.1f} min. Validation mIoU {result.best_val_miou:.3f} on "
          f"{result.data_root or cfg.data.root} ({result.val_split} split).")
    print(f"MLflow: experiment {cfg.mlflow.experiment!r}, run {result.run_id}. Open the UI with:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {tracking_uri}")


def ensure_shards(out: Path) -> None:
    """Write the synthetic shards unless a complete set is already there."""
    from data.shard_writer import write_shards
    from data.sources import Synthetic

    if (out / "dataset.json").is_file():
        print(f"[segnext] using the synthetic shards in {out}")
        return
    options = dict(SHARD_OPTIONS)
    options["size"] = tuple(options["size"])
    summary = write_shards(Synthetic(**options), out, workers=min(2, os.cpu_count() or 1))
    print(f"[segnext] wrote {summary.line()}")
