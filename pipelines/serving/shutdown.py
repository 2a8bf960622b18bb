"""A served model's process ends within seconds of SIGTERM, even in the middle of a request.

Why: uvicorn's graceful shutdown waits for every open request, and MLflow's scoring server runs
each request in a thread that nothing stops. A request of minutes under a `--timeout` of minutes
kept the uvicorn process computing for those minutes after `mlflow models serve` was stopped.

`SHUTDOWN.install()` (called by the pyfunc's `load_context` in a scoring-server process) starts a
watcher thread. It sees the server begin its shutdown (uvicorn's SIGTERM/SIGINT handler is the
bound `Server.handle_exit`, which sets the server's `should_exit`) or the process lose its parent
(a uvicorn supervisor killed with SIGKILL; the process is then sent SIGTERM). From then on the
pyfunc's forward pre-hook (`SHUTDOWN.check`) stops a running request before its next forward
pass (HTTP 503), and a process still alive `GRACE_S` later exits at once: one forward pass
cannot be interrupted. The watcher polls instead of chaining a signal handler because uvicorn
installs its handlers after a single-worker server has loaded the model, replacing any chained
one. No MLflow or torch import here: the backstop is tested in a bare subprocess.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

# MLflow's scoring server passes the model path to its uvicorn processes in this variable
# (mlflow.pyfunc.scoring_server._SERVER_MODEL_PATH; tests/test_canaries.py checks the name).
SCORING_SERVER_ENV = "__pyfunc_model_path__"
GRACE_S = 3.0  # from the start of the shutdown to a hard exit if the process still runs
POLL_S = 0.25


class ServerStoppingError(RuntimeError):
    """The server is shutting down; the request's computation was stopped."""


def in_scoring_server() -> bool:
    """Whether this process is one that `mlflow models serve` started to answer requests."""
    return SCORING_SERVER_ENV in os.environ


def server_is_exiting() -> bool:
    """Whether the server has received SIGTERM or SIGINT: uvicorn's handler for them is its
    `Server.handle_exit`, which sets `should_exit` and leaves the shutdown to the event loop."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


class ServerShutdown:
    """Process-wide, like the signals and the parent it watches."""

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def check(self, module: Any = None, args: Any = None) -> None:
        """A forward pre-hook: no further forward pass once the server is stopping."""
        if self._stopping.is_set():
            raise ServerStoppingError(
                "the server is shutting down (it received SIGTERM or SIGINT); this request was "
                "stopped. Send it again to a running server"
            )

    def install(self) -> None:
        """Start the watcher, once per process (several models may share it)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(
            target=self._watch, args=(os.getppid(),), name="segnext-shutdown-watch", daemon=True
        ).start()

    def _watch(self, parent: int) -> None:
        while True:
            if server_is_exiting():
                self._begin("the server received SIGTERM or SIGINT")
                return
            if os.getppid() != parent:  # re-parented: the process that started us is gone
                self._begin("its parent process ended")
                os.kill(os.getpid(), signal.SIGTERM)  # the server's own shutdown, too
                return
            time.sleep(POLL_S)

    def _begin(self, why: str) -> None:
        """Stop the running requests; exit hard if the process outlives the grace period."""
        self._stopping.set()
        timer = threading.Timer(GRACE_S, _exit_now, args=(why,))
        timer.daemon = True  # a server that ends in time ends without waiting for it
        timer.start()


def _exit_now(why: str) -> None:
    print(
        f"segnext serving: still running {GRACE_S:g} s after {why} (a forward pass outlasted "
        "the shutdown); exiting now",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signal.SIGTERM)


SHUTDOWN = ServerShutdown()
