"""The data path at dataset scale: start-up, requests per sample and stream rate on S3.

A synthetic dataset of `--samples` 64x64 scenes (default 100,000, `--shard-size` per shard) is
written once, uploaded to a moto S3 server on 127.0.0.1 and read through a loopback proxy that
adds `--delays` milliseconds before every request (0 and 20: about what a real S3 GET costs)
and counts the requests. For each delay, a child process (so that it can import another
checkout's code: `--old-tree`) measures:

- start-up: `build_train_stream` (manifest, index, a stat per shard, the batch plan) and then
  the first micro-batch out of the Ray Data stream, in seconds and requests. `--read-workers`:
  when the read tasks' Ray worker processes start (`data.prestart_workers`, data/worker_prestart.py): `prestart` (the
  default, as `segnext train` does) at the clock's start, not waited for, so they start while
  the stream is built; `cold` at the first read (the code before the prestart); `warm` before
  the clock, waited for, which separates Ray's process start-up from the data path's;
- the stream: `--stream-samples` more training samples (random resize, crop, flip, photometric;
  global batch 16), in requests per sample read and samples/s per read CPU (wall rate divided by
  the CPUs Ray gives the read tasks, `--cpus`), plus CPU-seconds per 1000 samples (this process
  and all its descendants, so load from other jobs does not distort it).

The old code (a checkout before the index, `--old-tree DIR`) scans tar headers on the driver, a
round trip per member, one shard after another: it is measured on `--old-samples` scenes of the
same generator (a separate, smaller upload, shards of 100) and its start-up is extrapolated
linearly to `--samples` (its cost per sample is constant). Moto itself takes milliseconds per
request; the proxy reports that as `upstream_ms_mean` beside the counts.

    .venv/bin/python bench/data_scale.py                                   # new code, 100k
    .venv/bin/python bench/data_scale.py --old-tree /tmp/old --old-samples 300
    .venv/bin/python bench/data_scale.py --samples 20000 --delays 0 20 --stream-samples 4000
    .venv/bin/python bench/data_scale.py --delays 0 20 --read-workers cold prestart
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench"
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


# ---------------------------------------------------------------------------- the proxy


class DelayProxy(ThreadingHTTPServer):
    """HTTP proxy to `upstream` (host:port) that sleeps `delay_s` before each request and counts
    requests by method. One upstream connection per client connection (keep-alive both ways)."""

    daemon_threads = True

    def __init__(self, upstream: str, delay_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.delay_s = delay_s
        self.counts: Counter[str] = Counter()
        self.upstream_s = 0.0  # time spent waiting for moto, summed over requests
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, method: str, upstream_s: float) -> None:
        with self._lock:
            self.counts[method] += 1
            self.upstream_s += upstream_s

    def take_counts(self) -> dict[str, int]:
        with self._lock:
            counts, self.counts = dict(self.counts), Counter()
            if counts:
                counts["upstream_ms_mean"] = round(1000 * self.upstream_s / sum(counts.values()))
            self.upstream_s = 0.0
        return counts


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: DelayProxy

    def _forward(self) -> None:
        time.sleep(self.server.delay_s)
        started = time.perf_counter()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if not hasattr(self, "_upstream"):
            host, port = self.server.upstream.split(":")
            self._upstream = http.client.HTTPConnection(host, int(port), timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        self._upstream.request(self.command, self.path, body=body, headers=headers)
        response = self._upstream.getresponse()
        data = response.read()
        self.server.count(self.command, time.perf_counter() - started)
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                self.send_header(key, value)
        upstream_length = response.getheader("Content-Length")
        self.send_header("Content-Length", upstream_length if self.command == "HEAD" and
                         upstream_length else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


# --------------------------------------------------------------------------- set-up


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_local_shards(folder: Path, samples: int, shard_size: int) -> Path:
    """Synthetic 64x64 scenes written once with the project's writer (so with its index)."""
    if (folder / "dataset.json").exists():
        return folder
    sys.path.insert(0, str(REPO))
    from data.shard_writer import write_shards
    from data.sources import Synthetic

    started = time.perf_counter()
    source = Synthetic(num_train=samples, num_val=0, size=(64, 64), num_classes=7, seed=0)
    write_shards(source, folder, splits=("train",), shard_size=shard_size,
                 workers=os.cpu_count() or 1, progress=True)
    print(f"wrote {samples} samples in {time.perf_counter() - started:.0f} s -> {folder}",
          flush=True)
    return folder


def without_index(folder: Path, samples: int) -> Path:
    """The first `samples` scenes of the same generator in shards of 100, with a manifest as
    the old code wrote it (no index), for the old code's measurement: its cost per sample
    (a round trip per tar header) does not depend on the shard size."""
    ensure_local_shards(folder, samples, 100)
    manifest = json.loads((folder / "dataset.json").read_text())
    for info in manifest["splits"].values():
        if "index" in info:
            (folder / info.pop("index")["path"]).unlink()
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


def start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"127.0.0.1:{port}"


def upload(local: Path, uri: str, endpoint: str) -> None:
    from pyarrow import fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    started = time.perf_counter()
    pafs.copy_files(str(local), uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3, use_threads=True)
    print(f"uploaded {local} -> {uri} in {time.perf_counter() - started:.0f} s", flush=True)


# ----------------------------------------------------------------- the measured child


def _child_main(args: argparse.Namespace) -> dict:
    """Start-up and stream of the control's root, with the code tree on PYTHONPATH."""
    import inspect

    sys.path.insert(0, str(REPO / "bench"))
    from cpu_meter import CpuMeter

    from data.stream import build_train_stream
    from pipelines.cluster import init_ray

    control = json.loads(args.child)
    options = {"crop_size": (64, 64), "global_batch_size": 16, "micro_batch_size": 16,
               "ratio_range": (0.5, 2.0), "seed": 0, "read_cpus": 0.5}
    if "cache" in inspect.signature(build_train_stream).parameters and control["cache_bytes"]:
        from data.shard_cache import ShardCache

        options["cache"] = ShardCache(control["cache_dir"], control["cache_bytes"])
    init_ray("local", num_cpus=control["cpus"])
    read_workers = control["read_workers"]  # always "cold" for the old tree (no prestart)
    if read_workers != "cold":
        from functools import partial

        from data.worker_prestart import prestart_read_workers, read_slots

        prestart = partial(prestart_read_workers, read_slots(control["cpus"], options["read_cpus"]),
                           options["read_cpus"])
    if read_workers == "warm":
        import ray

        ray.get(prestart())
    meter = CpuMeter()
    _mark(control["marks"], "start")
    started = time.perf_counter()
    if read_workers == "prestart":  # not waited for: they start while the stream is built
        prestart()
    stream = build_train_stream(control["root"], "train", **options)
    indexed = time.perf_counter()
    _mark(control["marks"], "indexed")
    steps = max(1, control["stream_samples"] // 16)
    batches = stream.micro_batches(world=1, rank=0, start=0, stop=steps + 1)
    next(batches)
    first = time.perf_counter()
    _mark(control["marks"], "first")
    cpu_before = meter.read()
    samples = 0
    for _, batch in batches:
        samples += len(batch["images"])
    done = time.perf_counter()
    cpu = meter.read() - cpu_before
    _mark(control["marks"], "done")
    index = stream.index
    memory = sum(getattr(getattr(index, name), "nbytes", 8 * len(index))  # old code: tuples
                 for name in ("shard", "image_at", "image_bytes", "mask_at", "mask_bytes", "keys"))
    memory += sum(sys.getsizeof(key) for key in index.keys)  # the key strings themselves
    return {"samples": len(index), "index_memory_bytes": memory, "index_s": indexed - started,
            "first_batch_s": first - started, "stream_samples": samples,
            "stream_s": done - first, "cpu_s": cpu}


def _mark(path: str, name: str) -> None:
    """Tell the parent (which owns the proxy's counters) that a phase ended; wait for it."""
    with open(path, "a") as handle:
        handle.write(name + "\n")
    time.sleep(0.3)  # the parent polls every 0.1 s and takes the counts of the phase


def measure(tree: Path, root: str, proxy: DelayProxy, args: argparse.Namespace,
            cache_bytes: int, stream_samples: int, read_workers: str) -> dict:
    """Run the child on `tree`'s code and split the proxy's counts by phase."""
    marks = Path(tempfile.mkstemp(prefix="data-scale-marks-")[1])
    cache_dir = tempfile.mkdtemp(prefix="data-scale-cache-")
    control = {"root": root, "cpus": args.cpus, "stream_samples": stream_samples,
               "read_workers": read_workers,
               "marks": str(marks), "cache_dir": cache_dir, "cache_bytes": cache_bytes}
    env = {**os.environ, "PYTHONPATH": str(tree), "AWS_ENDPOINT_URL_S3": proxy.url}
    proxy.take_counts()
    load = [round(value, 2) for value in os.getloadavg()]  # other jobs on the machine
    child_process = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(control)], env=env, cwd=tree,
        stdout=subprocess.PIPE, text=True)
    phases: dict[str, dict[str, int]] = {}
    seen = 0
    while child_process.poll() is None:
        lines = marks.read_text().split()
        for name in lines[seen:]:
            phases[name] = proxy.take_counts()
        seen = len(lines)
        time.sleep(0.1)
    output = child_process.stdout.read()
    if child_process.returncode:
        raise SystemExit(f"measurement child failed ({child_process.returncode}) on {tree}")
    result = json.loads(output.strip().splitlines()[-1])
    requests = {name: sum(v for k, v in counts.items() if k.isupper())
                for name, counts in phases.items()}
    result["requests_startup"] = requests.get("indexed", 0) + requests.get("first", 0)
    result["requests_index"] = requests.get("indexed", 0)
    result["requests_stream"] = requests.get("done", 0)
    result["by_method"] = phases
    result["read_workers"], result["load_avg_1_5_15"] = control["read_workers"], load
    result["requests_per_sample"] = result["requests_stream"] / max(1, result["stream_samples"])
    result["samples_per_s_per_read_cpu"] = (result["stream_samples"] / result["stream_s"]
                                            / args.cpus)
    result["cpu_ms_per_sample"] = 1000 * result["cpu_s"] / max(1, result["stream_samples"])
    marks.unlink()
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 20.0], help="ms")
    parser.add_argument("--stream-samples", type=int, default=6400)
    parser.add_argument("--slow-stream-samples", type=int, default=320,
                        help="samples streamed by the cache-off and old read paths")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the measured Ray cluster")
    parser.add_argument("--cache-bytes", type=int, default=2 << 30)
    parser.add_argument("--in-place", action="store_true",
                        help="also measure the new code with the shard cache off")
    parser.add_argument("--read-workers", choices=("prestart", "cold", "warm"), nargs="+",
                        default=["prestart"], help="when the read tasks' Ray worker processes "
                        "start: at the clock, not waited for; at the first read; before the "
                        "clock (several: each measured, back to back)")
    parser.add_argument("--old-tree", type=Path, help="a checkout of the code before the index")
    parser.add_argument("--old-samples", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "data-scale")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data_scale.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child_main(args)), flush=True)
        return

    # moto's fake credentials for this process and the children (without credentials the
    # SDK uploads unsigned aws-chunked bodies, which moto stores as they came)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "NO_PROXY": "127.0.0.1,localhost"})
    local = ensure_local_shards(args.work / f"synthetic-{args.samples}-{args.shard_size}",
                                args.samples, args.shard_size)
    server, endpoint = start_s3()
    proxy = DelayProxy(endpoint)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    roots = {"new": f"s3://{BUCKET}/shards"}
    upload(local, roots["new"], endpoint)
    if args.old_tree:
        old_local = without_index(args.work / f"old-{args.old_samples}", args.old_samples)
        roots["old"] = f"s3://{BUCKET}/old-shards"
        upload(old_local, roots["old"], endpoint)
    results = []
    try:
        for delay in args.delays:
            proxy.delay_s = delay / 1000
            few = args.slow_stream_samples  # the slow read paths: fewer samples
            # each --read-workers mode back to back, so that they share the machine's load
            runs = [("new (index + shard cache)", REPO, roots["new"], args.cache_bytes,
                     args.stream_samples, mode) for mode in args.read_workers]
            if args.in_place:
                runs.append(("new, cache off (in place)", REPO, roots["new"], 0, few,
                             args.read_workers[0]))
            if args.old_tree:
                runs.append(("old (tar-header scan)", args.old_tree, roots["old"], 0, few, "cold"))
            for label, tree, root, cache_bytes, samples, mode in runs:
                print(f"measuring {label} at {delay:g} ms, read workers {mode} ...", flush=True)
                row = {"code": label, "delay_ms": delay,
                       **measure(tree, root, proxy, args, cache_bytes, samples, mode)}
                if label.startswith("old"):
                    scale = args.samples / row["samples"]
                    row["startup_s_extrapolated"] = row["index_s"] * scale
                    row["requests_startup_extrapolated"] = row["requests_index"] * scale
                results.append(row)
                print(_line(row), flush=True)
    finally:
        proxy.shutdown()
        server.stop()
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{os.cpu_count()} cores", "samples": args.samples,
              "shard_size": args.shard_size, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


def _line(row: dict) -> str:
    text = (f"  {row['code']} @ {row['delay_ms']:g} ms: {row['samples']} samples, index "
            f"{row['index_s']:.2f} s ({row['requests_index']} requests), first batch "
            f"{row['first_batch_s']:.2f} s; stream {row['requests_per_sample']:.4f} requests/"
            f"sample, {row['samples_per_s_per_read_cpu']:.0f} samples/s per read CPU, "
            f"{row['cpu_ms_per_sample']:.2f} CPU-ms/sample; read workers {row['read_workers']}, "
            f"load {row['load_avg_1_5_15']}")
    if "startup_s_extrapolated" in row:
        text += (f"; start-up at {row['samples'] and int(row['startup_s_extrapolated'])} s "
                 f"extrapolated ({row['requests_startup_extrapolated']:.0f} requests)")
    return text


if __name__ == "__main__":
    main()
