"""`segnext tune`: the command line of a search (flags to config overrides, the summary it
prints, the exit code). The search itself is `tune.run.run_search`.

`segnext --help` imports this module to build its parser, so it imports no Ray, MLflow or
torch: those come with `tune.run`, imported when a search actually starts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from data.storage import StorageError
from pipelines.config import ConfigError
from pipelines.ray_stop import stop_ray
from tune.space import load_search_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="hyper-parameter search (Ray Tune + ASHA) over Ray Train runs, tracked in MLflow",
        description="Search the `tune.space` of a config with ASHA: each trial is a Ray Train "
        "run, a nested MLflow run under one parent run; the best checkpoint is registered. "
        "Overrides are dotted keys; tune.* keys change the search (tune.asha.grace_period=2).",
    )
    parser.add_argument("--config", required=True, help="YAML config with a tune: section")
    parser.add_argument("--trials", type=int, help="samples to draw (default: tune.trials)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        help="trials at once (default: tune.max_concurrent, else what fits)",
    )
    parser.add_argument("--search", choices=("random", "optuna"), help="default: tune.search")
    parser.add_argument("--resume", metavar="NAME", help="continue the interrupted search NAME")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: run failed trials again from their last checkpoint",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, parsed as YAML values"
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for flag, key in (
        ("trials", "trials"),
        ("max_concurrent", "max_concurrent"),
        ("search", "search"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"tune.{key}={getattr(args, flag)}")
    try:
        if args.retry_failed and not args.resume:
            raise ConfigError("--retry-failed only applies with --resume NAME")
        cfg, settings = load_search_config(args.config, overrides)
        name = (
            args.resume
            or cfg.run.name
            or (f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        )
        # Imported here, not at the top: `tune.run` brings Ray Tune, MLflow and torch, 4.5-5.3 s
        # of CPU to import (measured, process_time), which `segnext --help` and a config error
        # do not pay.
        from tune.report import format_summary
        from tune.run import run_search

        summary = run_search(
            cfg, settings, name=name, resume=bool(args.resume), retry_failed=args.retry_failed
        )
    except (ConfigError, StorageError) as error:
        print(f"segnext tune: configuration error: {error}", file=sys.stderr)
        return 2
    finally:
        stop_ray()  # workers' late log lines would otherwise interleave with the table
    resume = shlex.join(
        ["segnext", "tune", "--config", args.config, "--resume", name, *args.overrides]
    )
    print(format_summary(summary, settings, resume_command=resume))
    if summary.interrupted:
        return 130
    return 0 if summary.best is not None else 1
