"""What a long command shows on the terminal: its own lines and one live progress line.

Ray forwards every worker's output to the driver from a background thread: per-report dumps,
deprecation warnings, Ray Data's execution plans. `quiet_console` keeps, of those, only the
project's own `[segnext]` lines; what the command's main thread prints passes as it is; Python
warnings and the INFO logs of Ray and MLflow go to the log only. Every line, shown or not, goes
to a log file (uploaded to the MLflow run by `segnext train`). On a terminal the training
progress lines (`[segnext] it ...`) overwrite each other in place. `segnext --verbose` turns all
of this off.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
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
NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "mlflow")

_current_log: Path | None = None


def current_log() -> Path | None:
    """The log file of the quiet console in force, if any."""
    return _current_log


class ConsoleFilter(io.TextIOBase):
    """A text stream that writes every line to `log` and only the lines worth seeing to
    `target`; progress lines replace each other on a terminal."""

    def __init__(self, target: TextIO, log: TextIO, *, live: bool) -> None:
        super().__init__()
        self.target, self.log, self.live = target, log, live
        self.pending = ""
        self.progress_shown = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

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

    def _line(self, line: str) -> None:
        if not self.log.closed:  # a thread may still write after the command ended
            self.log.write(line + "\n")
        match = RAY_PREFIX.match(line)
        if match:
            line = line[match.end():]
        forwarded = match or threading.current_thread() is not threading.main_thread()
        if forwarded and not line.startswith(OWN):  # Ray's log thread: only our own lines
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
                if stream.pending:
                    stream.write("\n")
                if stream.progress_shown:
                    stream.target.write("\n")
            sys.stdout, sys.stderr = saved_streams
            _current_log = None
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)


def log_only(text: str) -> None:
    """Detail for the log file when the console is quiet; printed otherwise."""
    stream = sys.stdout
    if isinstance(stream, ConsoleFilter):
        stream.log.write(text.rstrip("\n") + "\n")
    else:
        print(text, flush=True)


def _log_warning(log: TextIO, message, category, filename, lineno, file=None, line=None) -> None:
    log.write(warnings.formatwarning(message, category, filename, lineno, line))


def _import_ray() -> None:
    """Ray and MLflow set their loggers' levels when imported: import them first."""
    with contextlib.suppress(ImportError):
        import mlflow  # noqa: F401
        import ray.data  # noqa: F401
        import ray.train  # noqa: F401
