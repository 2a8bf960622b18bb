"""What a long command shows on the terminal: its own lines and one live progress line.

Ray forwards every worker's output to the driver from a background thread: per-report dumps,
deprecation warnings, Ray Data's execution plans, the workers' C++ (`core_worker.cc`) lines.
`quiet_console` keeps, of those, only the project's own `[segnext]` lines. Ray also prints
forwarded lines on the main thread: at `ray.shutdown()` its de-duplicator writes out the lines it
held back, so a line counts as forwarded when Ray's printer (`print_worker_logs`) wrote it, on
whichever thread. What the command's main thread prints passes as it is, except Ray's own log
records below ERROR (the token-auth WARNING of `ray.init`): those, Python warnings and the INFO
logs of MLflow go to the log only; Ray's ERROR records still show. Every line, shown or not, goes
to a log file (uploaded to the MLflow run by `segnext train`). Each thread's partial line is kept
apart, so a worker line is never glued to one of ours. On a terminal the training progress lines
(`[segnext] it ...`) overwrite each other in place. Ray Tune prints its trial table on the main
thread inside `Tuner.fit`: `ray_output_on_main_thread` makes such a block count as Ray's output
(only `[segnext` lines show, the table reaches the log), and MLflow's "Downloading artifacts"
bars are off while the console is quiet. `segnext --verbose` turns all of this off.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

# "(RayTrainWorker pid=123)", "(pid=123, ip=10.0.0.1)", "(TrainController pid=9) " ...
RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)*\((?:[\w.:-]+ )?pid=\d+(?:, ip=[\d.:a-f]+)?\)"
                        r"(\x1b\[[0-9;]*m)* ?")
PROGRESS = ("[segnext] it ", "[segnext tune] trials: ")  # live lines on a terminal
OWN = "[segnext"
# Ray's Python log format on the driver: "2026-12-01 23:20:39,008\tWARNING file.py:85 -- ..."
RAY_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(?P<level>[A-Z]+) \S+:\d+ -- ")
SHOWN_LEVELS = ("ERROR", "CRITICAL", "FATAL")
RAY_PRINTER = ("print_worker_logs", "ray._private.worker")  # prints forwarded lines: (name, module)
NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "mlflow")
# MLflow draws a tqdm bar on stderr for every artifact download/upload (warm starts, registry)
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

_current_log: Path | None = None
_main_thread_is_ray = threading.Event()  # set inside `ray_output_on_main_thread`


def current_log() -> Path | None:
    """The log file of the quiet console in force, if any."""
    return _current_log


class ConsoleFilter(io.TextIOBase):
    """A text stream that writes every line to `log` and only the lines worth seeing to
    `target`; progress lines replace each other on a terminal."""

    def __init__(self, target: TextIO, log: TextIO, *, live: bool) -> None:
        super().__init__()
        self.target, self.log, self.live = target, log, live
        self.pending: dict[int, tuple[str, bool]] = {}  # thread id -> (unfinished line, forwarded)
        self.progress_shown = False
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        forwarded = (
            threading.current_thread() is not threading.main_thread()
            or _main_thread_is_ray.is_set()
            or _printed_by_ray()
        )
        with self._lock:
            start, was_forwarded = self.pending.pop(thread, ("", False))
            forwarded = forwarded or was_forwarded
            *lines, rest = (start + text).split("\n")
            if rest:
                self.pending[thread] = (rest, forwarded)
            for line in lines:
                self._line(line, forwarded=forwarded)
        return len(text)

    def end_lines(self) -> None:
        """Write out every thread's unfinished line (the command is over)."""
        with self._lock:
            for rest, forwarded in self.pending.values():
                self._line(rest, forwarded=forwarded)
            self.pending = {}

    def flush(self) -> None:
        if not self.log.closed:
            self.log.flush()
        self.target.flush()

    def isatty(self) -> bool:
        try:
            return self.target.isatty()
        except ValueError:  # the target closed (interpreter exit): not a terminal any more
            return False

    def fileno(self) -> int:
        return self.target.fileno()

    def _line(self, line: str, *, forwarded: bool) -> None:
        if not self.log.closed:  # a thread may still write after the command ended
            self.log.write(line + "\n")
        match = RAY_PREFIX.match(line)
        if match:
            line = line[match.end():]
        if (match or forwarded) and not line.startswith(OWN):  # Ray's output: only our own lines
            return
        record = RAY_RECORD.match(line)
        if record and record["level"] not in SHOWN_LEVELS:  # Ray's own INFO/WARNING: log only
            return
        if self.live and line.startswith(PROGRESS):
            self.target.write("\r\x1b[2K" + line)
            self.progress_shown = True
        else:
            if self.progress_shown:
                self.target.write("\n")
                self.progress_shown = False
            self.target.write(line + "\n")
        self.target.flush()


@contextlib.contextmanager
def quiet_console(command: str, *, enabled: bool = True,
                  log_dir: str | Path = "runs/logs") -> Iterator[Path | None]:
    """Filter stdout/stderr as the module doc says while the block runs; yields the log path."""
    global _current_log
    if not enabled:
        yield None
        return
    folder = Path(log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    saved_streams = sys.stdout, sys.stderr
    saved_levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    saved_env = {name: os.environ.get(name) for name in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    _import_ray()
    with open(path, "a", buffering=1) as log, warnings.catch_warnings():
        warnings.showwarning = functools.partial(_log_warning, log)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING if name != "ray" else logging.ERROR)
        sys.stdout = ConsoleFilter(saved_streams[0], log, live=saved_streams[0].isatty())
        sys.stderr = ConsoleFilter(saved_streams[1], log, live=False)
        _current_log = path
        print(f"[segnext] full log: {path} (segnext --verbose {command} ... shows it all)")
        try:
            yield path
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.end_lines()
                if stream.progress_shown:
                    stream.target.write("\n")
            sys.stdout, sys.stderr = saved_streams
            _current_log = None
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@contextlib.contextmanager
def ray_output_on_main_thread() -> Iterator[None]:
    """While the block runs, what the main thread prints counts as Ray's output: under the
    quiet console only the project's `[segnext` lines show, everything reaches the log. For
    `Tuner.fit`, which prints Ray Tune's trial table on the main thread between our lines."""
    _main_thread_is_ray.set()
    try:
        yield
    finally:
        _main_thread_is_ray.clear()


def log_only(text: str) -> None:
    """Detail for the log file when the console is quiet; printed otherwise."""
    stream = sys.stdout
    if isinstance(stream, ConsoleFilter):
        stream.log.write(text.rstrip("\n") + "\n")
    else:
        print(text, flush=True)


def _printed_by_ray() -> bool:
    """Whether Ray's printer of forwarded worker output is on this thread's stack (it runs on
    the main thread too, inside `ray.shutdown()`). Looked up by name: if a Ray upgrade renames
    it, the lines it prints on the main thread show again (test_console catches that)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if (code.co_name, frame.f_globals.get("__name__")) == RAY_PRINTER:
            return True
        frame = frame.f_back
    return False


def _log_warning(log: TextIO, message, category, filename, lineno, file=None, line=None) -> None:
    log.write(warnings.formatwarning(message, category, filename, lineno, line))


def _import_ray() -> None:
    """Ray and MLflow set their loggers' levels when imported: import them first."""
    with contextlib.suppress(ImportError):
        import mlflow  # noqa: F401
        import ray.data  # noqa: F401
        import ray.train  # noqa: F401
