"""`segnext train` on the command line: the parser, the handler and the closing summary.

Kept apart from the driver so that `segnext --help` does not import Ray, torch or MLflow
(the driver's module-level imports cost about 3 s).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from data.storage import StorageError
from pipelines.config import ConfigError, load_config

if TYPE_CHECKING:
    from pipelines.train.driver import TrainResult


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train SegNeXt with Ray Train on Ray Data shards, tracked in MLflow",
        description="Train SegNeXt: TorchTrainer DDP workers fed by Ray Data, logged to MLflow. "
        "Overrides are dotted keys, e.g. optim.lr=1e-3 ray.num_workers=4 train.amp=false.",
    )
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("--resume", metavar="RUN_NAME",
                        help="continue an interrupted run from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, parsed as YAML values")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from pipelines.train.driver import train  # Ray, torch, MLflow: only when training

    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume, config_name=Path(args.config).stem,
                       config_path=args.config)
    except (ConfigError, StorageError) as error:
        print(f"segnext train: configuration error: {error}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


def summary(result: TrainResult) -> str:
    """Where the results are and what to run next."""
    miou = "n/a" if result.best_val_miou is None else f"{result.best_val_miou:.4f}"
    skipped = ", ".join(f"{split} {count}" for split, count in result.skipped.items()) or "none"
    lines = [
        f"run {result.run_name} finished at iteration {result.iteration}",
        f"  best val mIoU    {miou}",
        f"  best checkpoint  {result.best_checkpoint}",
        f"  Ray run folder   {result.path}",
        f"  MLflow run id    {result.run_id}",
        f"  skipped samples  {skipped}",
    ]
    if result.model_uri:
        lines.append(f"  registered model {result.model_uri}")
    if result.tracking_uri:
        lines.append(f"  MLflow UI        mlflow ui --backend-store-uri {result.tracking_uri}")
    model = result.model_uri or result.best_checkpoint
    if model and result.data_root:
        lines.append(f"next: segnext eval --model {model} --data {result.data_root} "
                     f"--split {result.val_split}")
    return "\n".join(lines)
