"""Load test of `mlflow models serve` on loopback: N concurrent clients for T seconds.

Starts the scoring server itself on 127.0.0.1 (nothing leaves the machine) for a registered
model: by default a SegNeXt-T with random weights (latency does not depend on the weights)
registered in a temporary SQLite store, 3 classes, whole-image inference; or `--model URI`
(e.g. the demo's `models:/segnext@champion` with `--tracking-uri`). Each client thread sends
one PNG image per request (stdlib urllib, the JSON `dataframe_split` form) back to back until
the time is up. Prints p50/p99 latency, throughput, errors by kind, and the load average.
Every server process gets SIGTERM at the end and the script checks that none is left.

    python bench/serve_load.py                        # 4 clients x 20 s, 360x480 images
    python bench/serve_load.py --clients 8 --seconds 60 --size 720 960 --workers 1
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_latency import _checkpoint  # noqa: E402  (the benchmarks' random-weight checkpoint)

from pipelines.inference.threads import available_cpus  # noqa: E402


def _tiny_model(folder: Path) -> tuple[str, str]:
    """(model URI, tracking URI): a random SegNeXt-T, 512x512 crop, registered as champion."""
    from mlflow import MlflowClient

    from pipelines.tracking.registry import register_checkpoint
    from pipelines.tracking.runs import ensure_experiment

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run(ensure_experiment(uri, "serve-load")).info.run_id
    checkpoint = _checkpoint(folder / "ckpt", "t", 3, (512, 512))
    register_checkpoint(checkpoint, run_id=run_id, tracking_uri=uri)
    return "models:/segnext@champion", uri


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _body(height: int, width: int) -> bytes:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[text]]}}).encode()


def _wait_for_ping(url: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("server did not answer /ping in time")


def _client(url: str, body: bytes, until: float, timeout: float, out: list, errors: list) -> None:
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
            out.append(time.perf_counter() - start)
        except urllib.error.HTTPError as error:
            errors.append(f"HTTP {error.code}")
        except OSError as error:
            errors.append(type(error).__name__)


def _process_tree(pid: int) -> set[int]:
    """`pid` and every live process below it, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return {p for p in tree if p in parents}


def _live(pids: set[int]) -> set[int]:
    live = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                live.add(pid)
        except OSError:
            continue
    return live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="uvicorn worker processes (default: the cores available)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--model", default=None, help="model URI (default: a tiny random one)")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        if args.model is None:
            model, tracking_uri = _tiny_model(Path(folder))
        else:
            from pipelines.tracking.runs import resolve_tracking_uri

            model, tracking_uri = args.model, resolve_tracking_uri(args.tracking_uri)
        port = _free_port()
        bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn`
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
               "SEGNEXT_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model,
                   "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port),
                   "-w", str(args.workers)]
        log_path = Path(folder) / "serve.log"
        with log_path.open("w") as log:
            server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for_ping(url, server, 300)
            body = _body(*args.size)
            _client(url, body, time.monotonic() + 1e-9, 120, [], [])  # one warm-up request
            latencies: list[float] = []
            errors: list[str] = []
            load_before = os.getloadavg()[0]
            start = time.monotonic()
            until = start + args.seconds
            clients = [
                threading.Thread(target=_client, args=(url, body, until, 120, latencies, errors))
                for _ in range(args.clients)
            ]
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join()
            elapsed = time.monotonic() - start
            load_after = os.getloadavg()[0]
        finally:
            processes = _process_tree(server.pid)
            server.send_signal(signal.SIGTERM)  # the CLI only, as `kill PID` does
            stop = time.monotonic()
            while (left := _live(processes)) and time.monotonic() < stop + 15:
                server.poll()  # reap our own child
                time.sleep(0.2)
            stopped_in = time.monotonic() - stop
            if left:
                os.killpg(server.pid, signal.SIGKILL)

    cut = sorted(latencies)
    p99 = cut[min(len(cut) - 1, int(0.99 * len(cut)))] if cut else float("nan")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs ({available_cpus()} available), "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    print(f"server: {args.workers} uvicorn workers x {args.threads} torch threads; "
          f"{args.clients} clients x {args.seconds:g} s; {args.size[0]}x{args.size[1]} PNG")
    print(f"requests: {len(cut)} ok, {len(errors)} errors"
          f"{' (' + ', '.join(sorted(set(errors))) + ')' if errors else ''} in {elapsed:.1f} s")
    if cut:
        print(f"latency: p50 {1000 * statistics.median(cut):.0f} ms, p99 {1000 * p99:.0f} ms, "
              f"max {1000 * cut[-1]:.0f} ms; throughput {len(cut) / elapsed:.2f} req/s")
    print(f"after SIGTERM: {len(left)} of {len(processes)} server processes left "
          f"({stopped_in:.1f} s)")


if __name__ == "__main__":
    main()
