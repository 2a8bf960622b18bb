"""The cluster path, end to end on one machine, with the real parts a user launches with.

PostgreSQL (a temporary data directory, as the `postgres` user when run as root) behind an
`mlflow server` whose artifacts go to S3 (a moto server on 127.0.0.1), a Ray head and one worker
node started with `ray start` as cluster.yaml starts them (distinct ports and temp dirs: two
nodes on one machine), real CamVid shards written to S3. Then, through `segnext submit`:

1. a training run, 2 workers (one per node: the custom resource `segnext_node`), shards read from
   S3, checkpoints to S3, logged and registered in the tracking server;
2. a tune run with 2 concurrent trials logging to the same server;
3. a training run whose worker node is killed mid-run (its raylet, by PID: `ray stop` would stop
   every Ray process on the machine): it finishes its planned iterations, its MLflow run FINISHED;
4. `segnext eval` of `models:/NAME@champion` on the S3 test split, and `mlflow models serve` of
   the same model answering a test image.

The checks read the facts: job statuses from Ray's job API, runs, metrics, registered versions and
aliases from the tracking server's REST API, objects listed in the bucket, rows in PostgreSQL
(`psql`), and after the teardown no process of this script left (each process started here
carries a marker in its environment, and the process trees below them are recorded while the
nodes run: Ray's agents rename themselves, which overwrites the marker in /proc).

    .venv/bin/python bench/local_cluster.py [--keep DIR] [--json facts.json]

What one machine cannot show: separate disks (S3 stands in for them; nothing here relies on a
shared local path), a real network between nodes, and `ray up` provisioning machines.
Exit status 0 when every check passed; `tests/pipelines/test_local_cluster.py` runs it.
"""

from __future__ import annotations

import argparse
import base64
import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

from pipelines.ray_stop import ProcessId, descendants, start_time

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"
BUCKET = "segnext-cluster"
MARKER = "SEGNEXT_LOCAL_CLUSTER"
REGISTERED = "segnext-cluster"
AWS = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
}
# Ray's start-up waits (agents' port files, node registration) are sized for idle machines; on a
# loaded 2-core one the worker node's raylet gave up waiting for its dashboard agent (~15 s).
RAY_PATIENCE = {"RAY_agent_register_timeout_ms": "180000", "RAY_raylet_start_wait_time_s": "180"}
# The tiny run every job trains: SegNeXt-T on 64x64 crops of CamVid at half size, batch 4.
TRAIN_OVERRIDES = [
    "model.drop_path_rate=0.0", "data.crop_size=[64,64]", "data.scale=[120,90]",
    "train.global_batch_size=4", "train.log_every=1", "eval.batch_size=4",
    "ray.cpus_per_worker=0.5", "data.read_cpus=0.25",
]


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(pid: int) -> str | None:
    """The command line of process `pid` (None when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").rstrip()[:160]
    except OSError:
        return None


class Processes:
    """Every process this script starts, in a session of its own and marked in its environment:
    the teardown ends them and whatever they started (Ray's daemons, agents and workers), and
    nothing else."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = uuid.uuid4().hex
        self.started: list[subprocess.Popen] = []
        self.tracked: set[ProcessId] = set()

    def env(self, **extra: str) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)  # `ray start`'s jobs run `python` from PATH
        env = {**os.environ, **AWS, **extra, MARKER: self.marker}
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
        for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "HTTP_PROXY", "HTTPS_PROXY",
                     "http_proxy", "https_proxy"):
            if name not in extra:
                env.pop(name, None)
        return env

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   env=self.env(**env), start_new_session=True, cwd=self.root)
        log.close()
        self.started.append(process)
        return process

    def run(self, argv: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env(**env), capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def marked(self) -> dict[int, str]:
        """pid -> command of every live process carrying this run's marker."""
        found: dict[int, str] = {}
        needle = f"{MARKER}={self.marker}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            command = _command(int(entry))
            if needle in environ and state != "Z" and command is not None:
                found[int(entry)] = command
        return found

    def track(self) -> None:
        """Record (pid, start time) of every live process below the started, marked and already
        recorded ones. Why: the marker is not enough. A process that renames itself
        (setproctitle: the raylet's `ray::DashboardAgent` and `ray::RuntimeEnvAgent`) overwrites
        the memory /proc shows as its environ and cmdline, so neither the marker nor this run's
        `--temp-dir` can be read there; and when its raylet ends it is re-parented to init and
        runs on. `ray start --block` and the raylet, its parents, stay marked, so the tree is
        read below them while it is whole: when the nodes are up, before a raylet is killed,
        and when the teardown begins."""
        live = {pid for pid, started in self.tracked if start_time(pid) == started}
        roots = {p.pid for p in self.started if p.poll() is None} | set(self.marked()) | live
        for pid in roots | descendants(roots):
            started = start_time(pid)
            if started and pid != os.getpid():
                self.tracked.add((pid, started))

    def ours(self) -> dict[int, str]:
        """pid -> command of every live process of this run: marked, or recorded by `track`
        (the same pid with the same start time: a reused pid is someone else's)."""
        found = self.marked()
        for pid, started in self.tracked:
            if pid not in found and start_time(pid) == started:
                command = _command(pid)
                if command is not None:
                    found[pid] = command
        return found

    def stop_all(self, grace_s: float = 15.0) -> dict[int, str]:
        """SIGTERM to every process of this run (`ours`, the tree read first), SIGKILL to what
        is left after `grace_s`; returns what still lives after that (it should be nothing)."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            self.track()  # what started during the grace period too
            for pid in self.ours():
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self.ours() and time.monotonic() < deadline:
                time.sleep(0.3)
        for process in self.started:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)
        return self.ours()


def wait_for(what: str, ready: Callable[[], Any], timeout_s: float, poll_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = ready()
        except Exception:  # noqa: BLE001 - not up yet
            value = None
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")


# ------------------------------------------------------------------------------------ services


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    if which:
        return Path(which).resolve().parent
    raise FileNotFoundError("no PostgreSQL server binaries (pg_ctl) on this machine")


class Postgres:
    """A throw-away PostgreSQL server: initdb in a temp folder, trust auth on 127.0.0.1 only.
    PostgreSQL refuses to run as root, so as root it runs as the `postgres` user."""

    def __init__(self, procs: Processes, root: Path) -> None:
        self.procs, self.bin, self.root = procs, postgres_bin(), root
        # a folder of its own in /tmp: the `postgres` user cannot enter `root` when a parent is
        # private (pytest's tmp_path is 0700 root); its log is copied into `root` at the end
        self.folder = Path(tempfile.mkdtemp(prefix="segnext-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.folder, user="postgres")
            os.chmod(self.folder, 0o755)

    def start(self) -> str:
        def pg(*argv: str) -> None:
            result = self.procs.run([*self.as_user, str(self.bin / argv[0]), *argv[1:]], 120)
            if result.returncode:
                raise RuntimeError(f"{argv[0]} failed: {result.stdout}{result.stderr}")

        pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
           "--no-sync")
        pg("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w", "-t",
           "120", "start", "-o",
           f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off")
        self.psql("CREATE DATABASE mlflow", database="postgres")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/mlflow"

    def psql(self, sql: str, database: str = "mlflow") -> list[list[str]]:
        result = self.procs.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                 "-d", database, "-At", "-F", "\t", "-c", sql], 60)
        if result.returncode:
            raise RuntimeError(f"psql {sql!r}: {result.stderr}")
        return [line.split("\t") for line in result.stdout.splitlines() if line]

    def stop(self) -> None:
        if self.data.is_dir():
            self.procs.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                            "fast", "-w", "stop"], 60)
        with suppress(OSError):
            shutil.copy(self.folder / "server.log", self.root / "postgres-server.log")
        shutil.rmtree(self.folder, ignore_errors=True)


def start_moto(procs: Processes) -> str:
    port = free_port()
    procs.start("moto", [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                         "-p", str(port)])
    endpoint = f"http://127.0.0.1:{port}"
    wait_for("moto", lambda: urllib.request.urlopen(endpoint, timeout=2), 120)
    s3(endpoint).create_bucket(Bucket=BUCKET)
    return endpoint


def s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **{
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"], "region_name": AWS["AWS_REGION"]})


def start_mlflow(procs: Processes, backend: str, endpoint: str) -> str:
    port = free_port()
    procs.start("mlflow-server", [
        str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
        "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1",
    ], MLFLOW_S3_ENDPOINT_URL=endpoint, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    uri = f"http://127.0.0.1:{port}"
    wait_for("mlflow server", lambda: urllib.request.urlopen(f"{uri}/health", timeout=3), 600, 2)
    return uri


class RayNodes:
    """A head and a worker node started by `ray start --block`, as cluster.yaml starts them,
    each with ports of its own (none of Ray's defaults) and its own temp dir."""

    def __init__(self, procs: Processes, root: Path) -> None:
        # Ray's socket paths must stay under 108 bytes (AF_UNIX): its temp dirs live in a short
        # folder of /tmp, not in `root` (pytest's tmp_path is too deep).
        self.procs, self.root = procs, Path(tempfile.mkdtemp(prefix="segnext-ray-", dir="/tmp"))
        self.dashboard_port = free_port()
        self.gcs_port = free_port()
        self.address = ""

    def _ports(self) -> list[str]:
        return ["--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()),
                "--metrics-export-port", str(free_port()),
                "--node-manager-port", str(free_port()),
                "--object-manager-port", str(free_port())]

    def _env(self, node: str) -> dict[str, str]:
        return {**RAY_PATIENCE, "RAY_num_workers_soft_limit": "64", "RAY_AUTH_MODE": "token",
                "SEGNEXT_NODE": node, "AUTOSCALER_METRIC_PORT": str(free_port()),
                "DASHBOARD_METRIC_PORT": str(free_port())}

    def start(self) -> str:
        from ray.util import get_node_ip_address

        ray = str(Path(sys.executable).parent / "ray")
        self.address = f"{get_node_ip_address()}:{self.gcs_port}"
        common = ["--block", "--disable-usage-stats", "--resources", '{"segnext_node": 1}']
        self.procs.start("ray-head", [
            ray, "start", "--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port",
            str(free_port()), "--num-cpus", "2", "--temp-dir", str(self.root / "ray-head"),
            "--min-worker-port", "0", "--max-worker-port", "0", *self._ports(), *common,
        ], **self._env("head"))
        url = self.dashboard_url
        wait_for("ray head", lambda: self.client().get_version(), 300, 2)
        self.procs.start("ray-worker", [
            ray, "start", "--address", self.address, "--num-cpus", "1", "--temp-dir",
            str(self.root / "ray-worker"), "--min-worker-port", "0", "--max-worker-port", "0",
            *self._ports(), *common,
        ], **self._env("worker"))
        wait_for("ray worker node", lambda: len(self.alive_nodes()) == 2, 300, 2)
        self.procs.track()  # the agents, unmarked (see Processes.track)
        return url

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes, from the dashboard's REST API (no Ray driver here)."""
        request = urllib.request.Request(f"{self.dashboard_url}/nodes?view=summary")
        token = Path("~/.ray/auth_token").expanduser()
        if token.is_file():
            request.add_header("Authorization", f"Bearer {token.read_text().strip()}")
        with urllib.request.urlopen(request, timeout=5) as response:
            summary = json.load(response)["data"]["summary"]
        return [node for node in summary if node.get("raylet", {}).get("state") == "ALIVE"]

    def worker_raylet_pid(self) -> int:
        for pid in self.procs.marked():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "raylet" and b"SEGNEXT_NODE=worker" in environ:
                return pid
        raise RuntimeError("the worker node's raylet is not running")


# ---------------------------------------------------------------------------------- the runs


class Scenario:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs = Processes(root)
        self.checks: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}

    def check(self, name: str, ok: bool, detail: Any = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[cluster] {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return bool(ok)

    def segnext(self, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
        env = {"MLFLOW_TRACKING_URI": self.tracking, "AWS_ENDPOINT_URL_S3": self.endpoint}
        started = time.monotonic()
        result = self.procs.run([sys.executable, "-m", "pipelines.cli", *argv], timeout, **env)
        (self.root / "commands.log").open("a").write(
            f"$ segnext {' '.join(argv)}\n(exit {result.returncode}, "
            f"{time.monotonic() - started:.0f} s)\n{result.stdout}\n{result.stderr}\n")
        return result

    def submit(self, *argv: str, no_wait: bool = False) -> tuple[str, subprocess.CompletedProcess]:
        flags = ["--no-wait"] if no_wait else []
        result = self.segnext("submit", "--address", self.nodes.dashboard_url, *flags, "--",
                              *argv)
        job = next((line.split("submitted job ", 1)[1].split()[0]
                    for line in result.stdout.splitlines() if "submitted job " in line), "")
        return job, result

    def mlflow(self, path: str, **query: Any) -> dict:
        data = json.dumps(query).encode() if query else None
        request = urllib.request.Request(f"{self.tracking}/api/2.0/mlflow/{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:  # 404: no such experiment / model (yet)
            if error.code == 404:
                return {}
            raise

    def runs(self, experiment: str) -> list[dict]:
        found = self.mlflow("experiments/get-by-name?experiment_name=" + experiment)
        if not found:
            return []
        eid = found["experiment"]["experiment_id"]
        return self.mlflow("runs/search", experiment_ids=[eid], max_results=100).get("runs", [])

    def job_status(self, job: str) -> str:
        return str(self.nodes.client().get_job_status(job).value)

    # -------------------------------------------------------------------------------- steps

    def start(self) -> None:
        self.postgres = Postgres(self.procs, self.root)
        backend = self.postgres.start()
        self.endpoint = start_moto(self.procs)
        self.tracking = start_mlflow(self.procs, backend, self.endpoint)
        self.nodes = RayNodes(self.procs, self.root)
        self.nodes.start()
        self.check("two Ray nodes up", len(self.nodes.alive_nodes()) == 2,
                   f"head {self.nodes.address}, dashboard {self.nodes.dashboard_url}")
        self.shards = f"s3://{BUCKET}/shards/camvid"
        result = self.segnext("shards", "camvid", "--root", str(CAMVID), "--out", self.shards,
                              "--splits", "train,val,test", "--limit", "16")
        self.check("CamVid shards written to S3", result.returncode == 0,
                   result.stdout.strip().splitlines()[-1:] or result.stderr[-300:])

    def common(self, name: str, iterations: int, every: int) -> list[str]:
        return ["--config", "configs/camvid-cpu.yaml", f"data.root={self.shards}",
                f"run.storage_path=s3://{BUCKET}/ray", f"storage.endpoint={self.endpoint}",
                f"run.name={name}", f"schedule.iterations={iterations}",
                "schedule.warmup_iters=1", f"train.val_every={every}",
                f"train.checkpoint_every={every}", *TRAIN_OVERRIDES]

    def refusals(self) -> None:
        """What cannot work on a cluster is refused before anything is sent."""
        local = self.segnext("submit", "--address", self.nodes.dashboard_url, "--", "train",
                             "--config", "configs/camvid-cpu.yaml")
        self.check("submit refuses a local data.root", local.returncode == 2
                   and "local path" in local.stderr, local.stderr.strip()[-200:])
        env_sqlite = self.procs.run(
            [sys.executable, "-m", "pipelines.cli", "submit", "--address",
             self.nodes.dashboard_url, "--", "train", *self.common("x", 2, 2)], 120,
            MLFLOW_TRACKING_URI=f"sqlite:///{self.root}/mlflow.db")
        self.check("submit refuses a SQLite tracking URI", env_sqlite.returncode == 2
                   and "local to this machine" in env_sqlite.stderr,
                   env_sqlite.stderr.strip()[-200:])
        jobs = self.nodes.client().list_jobs()
        self.check("nothing was submitted by the refused commands", not jobs, len(jobs))

    def train(self) -> None:
        job, result = self.submit("train", *self.common("cluster-train", 6, 3),
                                  "ray.num_workers=2", "ray.resources_per_worker={segnext_node: 1}",
                                  "registry.register=true", f"registry.name={REGISTERED}",
                                  "mlflow.experiment=cluster")
        status = self.job_status(job) if job else "not submitted"
        self.check("train job SUCCEEDED (job API)", status == "SUCCEEDED" and
                   result.returncode == 0, f"{job} {status}, submit exit {result.returncode}")
        runs = [r for r in self.runs("cluster") if r["info"].get("run_name") == "cluster-train"]
        run = runs[0] if runs else {"info": {}, "data": {}}
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        # each node holds one `segnext_node` and each worker asks for one: 2 workers, 2 nodes
        self.check("the run trained on 2 workers, one per node (tracking server)",
                   tags.get("workers.world_size") == "2", tags.get("workers.world_size"))
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        self.check("train run FINISHED with val mIoU (tracking server)",
                   run["info"].get("status") == "FINISHED" and any("mIoU" in k for k in metrics),
                   f"{run['info'].get('status')}, {sorted(metrics)[:6]}")
        self.facts["train_run_id"] = run["info"].get("run_id")
        inputs = run.get("inputs", {}).get("dataset_inputs", [])
        self.facts["train_datasets"] = [d["dataset"]["name"] for d in inputs]
        model = self.mlflow(f"registered-models/get?name={REGISTERED}").get("registered_model", {})
        aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
        self.check("model registered with @champion (tracking server)", "champion" in aliases,
                   aliases)
        keys = [o["Key"] for o in s3(self.endpoint).list_objects_v2(
            Bucket=BUCKET, Prefix="ray/cluster-train/").get("Contents", [])]
        self.check("checkpoints in the bucket", any("checkpoint_" in k for k in keys),
                   f"{len(keys)} objects under ray/cluster-train/")
        artifacts = s3(self.endpoint).list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")
        self.check("MLflow artifacts in the bucket", artifacts.get("KeyCount", 0) > 0,
                   f"{artifacts.get('KeyCount', 0)} objects under mlflow/")

    def tune(self) -> None:
        job, result = self.submit(
            "tune", "--config", "configs/demo-tune.yaml", f"data.root={self.shards}",
            f"run.storage_path=s3://{BUCKET}/tune", f"storage.endpoint={self.endpoint}",
            "schedule.iterations=4", "schedule.warmup_iters=1", "train.val_every=2",
            "train.checkpoint_every=2", "tune.trials=2", "tune.max_concurrent=2",
            "tune.warm_start=null", "registry.register=false", "mlflow.experiment=cluster-tune",
            *TRAIN_OVERRIDES)
        status = self.job_status(job) if job else "not submitted"
        self.check("tune job SUCCEEDED (job API)", status == "SUCCEEDED" and
                   result.returncode == 0, f"{job} {status}, submit exit {result.returncode}")
        # a trial ASHA stops early ends KILLED (tagged "stopped early"), a completed one FINISHED
        trials = [r["info"] for r in self.runs("cluster-tune")
                  if r["info"].get("status") in ("FINISHED", "KILLED") and "end_time" in r["info"]
                  and any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
        finished = sum(t["status"] == "FINISHED" for t in trials)
        spans = sorted((int(t["start_time"]), int(t["end_time"])) for t in trials)
        overlap = any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:],
                                                                           strict=False))
        self.check("tune: 2+ trial runs ended in the tracking server, running concurrently",
                   len(trials) >= 2 and finished >= 1 and overlap,
                   f"{len(trials)} ended runs ({finished} FINISHED), overlap {overlap}")
        self.facts["tune_trials"] = {t["run_name"]: t["status"] for t in trials}

    def lose_a_node(self) -> None:
        name = "cluster-node-lost"
        job, _ = self.submit("train", *self.common(name, 16, 4), "ray.num_workers=2",
                             "ray.min_workers=1", "train.max_failures=3",
                             "ray.resources_per_worker={segnext_node: 1}",
                             "registry.register=false", "mlflow.experiment=cluster",
                             no_wait=True)
        bucket = s3(self.endpoint)

        def checkpointed() -> bool:
            listed = bucket.list_objects_v2(Bucket=BUCKET, Prefix=f"ray/{name}/checkpoint_")
            return listed.get("KeyCount", 0) > 0

        wait_for("the first checkpoint of the node-loss run", checkpointed, 900, 2)
        pid = self.nodes.worker_raylet_pid()
        self.procs.track()  # its agents and workers, orphaned by the kill
        os.kill(pid, signal.SIGKILL)
        wait_for("the node marked dead", lambda: len(self.nodes.alive_nodes()) == 1, 180, 2)
        self.check("worker node's raylet killed by PID mid-run", True, f"raylet pid {pid}")
        client = self.nodes.client()
        status = wait_for("the node-loss job to end", lambda: (
            s := client.get_job_status(job)).is_terminal() and s, 1200, 3)
        runs = [r for r in self.runs("cluster") if r["info"].get("run_name") == name]
        info = runs[0]["info"] if runs else {}
        steps = self.mlflow(f"metrics/get-history?run_id={info.get('run_id')}"
                            "&metric_key=train/loss").get("metrics", []) if info else []
        last = max((int(m["step"]) for m in steps), default=0)
        self.check("node-loss job SUCCEEDED and its run FINISHED at the planned iteration",
                   str(status.value) == "SUCCEEDED" and info.get("status") == "FINISHED"
                   and last == 16, f"job {status.value}, run {info.get('status')}, last step {last}")

    def eval_and_serve(self) -> None:
        model = f"models:/{REGISTERED}@champion"
        job, result = self.submit("eval", "--model", model, "--data", self.shards, "--split",
                                  "test", "--tracking-uri", self.tracking, "--experiment",
                                  "cluster-eval")
        status = self.job_status(job) if job else "not submitted"
        runs = self.runs("cluster-eval")
        metrics = {m["key"]: m["value"] for r in runs for m in r["data"].get("metrics", [])}
        self.check("eval of @champion on the S3 test split (job + tracking server)",
                   status == "SUCCEEDED" and any("mIoU" in k for k in metrics),
                   f"{job} {status}, metrics {sorted(metrics)[:4]}")
        self.serve(model)

    def serve(self, model: str) -> None:
        port = free_port()
        server = self.procs.start("serve", [
            str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model,
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            MLFLOW_TRACKING_URI=self.tracking, MLFLOW_S3_ENDPOINT_URL=self.endpoint)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for("mlflow models serve", lambda: urllib.request.urlopen(f"{url}/ping",
                                                                          timeout=3), 600, 2)
            image = self.test_image()
            body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
                [base64.b64encode(image).decode()]]}}).encode()
            request = urllib.request.Request(f"{url}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                answer = json.load(response)
            record = answer["predictions"][0]
            self.check("mlflow models serve answers a test image", record["height"] > 0,
                       f"mask {record['width']}x{record['height']}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)

    def test_image(self) -> bytes:
        """The first image of the S3 test split, read from its shard as any client would."""
        import tarfile

        bucket = s3(self.endpoint)
        keys = [o["Key"] for o in bucket.list_objects_v2(
            Bucket=BUCKET, Prefix="shards/camvid/").get("Contents", [])]
        shard = next(k for k in sorted(keys) if "test" in k.rsplit("/", 1)[-1]
                     and k.endswith(".tar"))
        data = bucket.get_object(Bucket=BUCKET, Key=shard)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))
                          and "mask" not in m.name)
            return tar.extractfile(member).read()

    def database_rows(self) -> None:
        rows = self.postgres.psql("SELECT status, count(*) FROM runs GROUP BY status")
        models = self.postgres.psql("SELECT name FROM registered_models")
        self.facts["postgres_runs"] = dict(rows)
        self.check("runs and registered models are rows in PostgreSQL",
                   int(dict(rows).get("FINISHED", 0)) >= 4 and [REGISTERED] in models,
                   f"runs {dict(rows)}, models {models}")

    def teardown(self, keep: bool) -> None:
        if hasattr(self, "postgres"):
            self.postgres.stop()
        left = self.procs.stop_all()
        self.check("no process of this run left", not left, left or "none")
        if hasattr(self, "nodes"):  # its processes are gone: keep its logs with the rest
            if keep:
                shutil.move(self.nodes.root, self.root / "ray-nodes")
            shutil.rmtree(self.nodes.root, ignore_errors=True)


STEPS = ("refusals", "train", "tune", "lose_a_node", "eval_and_serve", "database_rows")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work in this folder and keep it (logs, data)")
    parser.add_argument("--json", help="write the checks and facts here")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS),
                        help="run only these steps (after the start-up); eval needs train")
    args = parser.parse_args(argv)
    # Ray's job client sends the cluster's token only in this mode, read when Ray is imported.
    os.environ["RAY_AUTH_MODE"] = "token"
    # SIGTERM (and SIGINT, which a background job starts with ignored) unwind: the teardown runs.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupt)
    root = Path(args.keep or tempfile.mkdtemp(prefix="segnext-cluster-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(root)
    started = time.monotonic()
    try:
        scenario.start()
        for step in args.only:
            getattr(scenario, step)()
    except Exception as error:  # noqa: BLE001 - reported as a failed check, then torn down
        scenario.check("scenario ran to the end", False, f"{type(error).__name__}: {error}")
    finally:
        scenario.teardown(keep=bool(args.keep))
    scenario.facts["wall_s"] = round(time.monotonic() - started)
    failed = [c for c in scenario.checks if not c["ok"]]
    report = {"checks": scenario.checks, "facts": scenario.facts, "folder": str(root)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"[cluster] {len(scenario.checks) - len(failed)} of {len(scenario.checks)} checks "
          f"passed in {scenario.facts['wall_s']} s; logs in {root}", flush=True)
    if not args.keep and not failed:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
