"""The `segnext` command line.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`, which adds
its parser and sets `func(args) -> int`. Heavy imports (torch, ray, mlflow) happen inside the
handlers so `segnext --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> the subcommands it registers (in `segnext --help` order)
SUBCOMMAND_MODULES = (
    "data.cli",  # shards
    "pipelines.train",  # train
    "pipelines.demo",  # demo
    "pipelines.evaluate",  # eval
    "pipelines.predict",  # predict
    "pipelines.registry",  # register
    "tune.search",  # tune
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segnext", description="SegNeXt segmentation on Ray: shards, train, tune, eval, serve."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
