"""The `segnext` command line.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`, which adds
its parser and sets `func(args) -> int`. Heavy imports (torch, ray, mlflow) happen inside the
handlers so `segnext --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# module path -> the subcommands it registers (in `segnext --help` order)
SUBCOMMAND_MODULES = (
    "data.cli",  # shards
    "pipelines.train.cli",  # train
    "pipelines.commands.demo",  # demo
    "pipelines.commands.evaluate",  # eval
    "pipelines.commands.predict",  # predict
    "pipelines.tracking.registry",  # register
    "pipelines.commands.export",  # export
    "tune.cli",  # tune
    "pipelines.commands.submit",  # submit
)


PROJECT_PACKAGES = ("segnext", "data", "pipelines", "tune")
QUIET_COMMANDS = ("train", "demo", "tune", "eval")  # long runs: Ray's own output to the log
GLOBAL_FLAGS = ("--debug", "--verbose")  # accepted anywhere on the command line
MAX_ERROR_LINES = 6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segnext", description="SegNeXt segmentation on Ray: shards, train, tune, eval, serve."
    )
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output (worker logs, execution plans) as it comes")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.console import quiet_console
    from pipelines.ray_stop import stop_ray

    argv = list(sys.argv[1:] if argv is None else argv)
    flags = [token for token in argv if token in GLOBAL_FLAGS]
    parser = build_parser()
    args, extra = parser.parse_known_args(flags + [t for t in argv if t not in GLOBAL_FLAGS])
    # `key=value` overrides may follow an option (`--resume NAME key=value`): argparse fills a
    # nargs="*" positional once, so later ones come back as extra; anything else is an error.
    if extra and hasattr(args, "overrides") and all(_is_override(t) for t in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # SIGTERM (timeout, schedulers, a closed terminal) unwinds like Ctrl-C: cleanup code runs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    quiet = not args.verbose and args.command in QUIET_COMMANDS
    had_ray = _ray_connected()
    with quiet_console(args.command, enabled=quiet):
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt as stop:  # its text, if any, says how to continue
            print(f"segnext {args.command}: {str(stop) or 'interrupted'}", file=sys.stderr)
            return 130
        except Exception as error:
            if args.debug:
                raise
            print(error_message(args.command, error), file=sys.stderr)
            return 2 if is_user_error(root_cause(error)) else 1
        finally:
            if not had_ray and _ray_connected():  # inside the console: late worker logs filtered
                stop_ray()  # a private cluster with every process it ran


def _is_override(token: str) -> bool:
    key = token.split("=", 1)[0]
    return "=" in token and not token.startswith("-") and all(key.split("."))


def _ray_connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def root_cause(error: BaseException) -> BaseException:
    """The error a Ray wrapper carries: a worker's exception inside Ray Train's
    `WorkerGroupError`, the user exception inside a `RayTaskError`."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        cause = getattr(error, "cause", None)
        if isinstance(failures, dict) and failures:
            error = next(iter(failures.values()))
        elif isinstance(cause, BaseException):
            error = cause
    return error


def is_user_error(error: BaseException) -> bool:
    """Errors whose message says what to fix: the project's own, bad values, files, MLflow."""
    if any(cls.__module__.split(".")[0] in PROJECT_PACKAGES for cls in type(error).__mro__):
        return True
    if isinstance(error, ValueError | OSError):
        return True
    mlflow = sys.modules.get("mlflow.exceptions")
    return mlflow is not None and isinstance(error, mlflow.MlflowException)


def error_message(command: str, error: BaseException) -> str:
    """One line (a few at most) for the user; the traceback only with --debug. A failure
    inside Ray workers is reported by its root cause."""
    error = root_cause(error)
    lines = [line for line in str(error).strip().splitlines() if line.strip()] or [""]
    text = "\n  ".join(lines[:MAX_ERROR_LINES])
    if len(lines) > MAX_ERROR_LINES:
        text += "\n  ..."
    if is_user_error(error):
        return f"segnext {command}: error: {text}"
    return (
        f"segnext {command}: unexpected {type(error).__name__}: {text}\n"
        "  (rerun with `segnext --debug ...` for the traceback)"
    )


if __name__ == "__main__":
    sys.exit(main())
