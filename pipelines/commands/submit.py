"""`segnext submit`: send `segnext train|tune|eval ...` to a Ray cluster as a Ray job.

    segnext submit --address http://HEAD:8265 [--no-wait] [--allow-local] -- train --config X k=v

What `ray job submit --working-dir . -- python -m pipelines.cli ...` would do, plus what a job
on several nodes needs and a hand-written submit line forgets: the working directory is this
checkout less its git-ignored outputs (runs/, shards, .venv: Ray honours .gitignore), the MLflow
tracking URI, the S3 endpoint and the AWS variables travel in the runtime env, and the job joins
the cluster it runs on (`ray.address=auto`). Before anything is sent it refuses what cannot work
on more than one machine: a local `data.root` or `run.storage_path` (each node has its own disk;
`--allow-local` says the nodes share that absolute path), a SQLite or file tracking store, an
unreachable tracking server. Then it follows the job's logs and exits with the job's status.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from data.storage import is_remote
from pipelines.config import ConfigError, load_config

COMMANDS = ("train", "tune", "eval")
# Passed to the job when set here: where runs are tracked and how S3 is reached.
PASSED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_EC2_METADATA_DISABLED", "NO_PROXY", "no_proxy",
)
PROBE_TIMEOUT_S = 5.0
EXIT_STATUS = {"SUCCEEDED": 0, "STOPPED": 130}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="run segnext train/tune/eval as a Ray job on a cluster (checked before it is sent)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS")
                        or os.environ.get("RAY_JOB_ADDRESS"),
                        help="the cluster's dashboard, http://HEAD:8265 "
                             "(default: $RAY_API_SERVER_ADDRESS)")
    parser.add_argument("--no-wait", action="store_true",
                        help="submit and return: print the job id and the `ray job` commands")
    parser.add_argument("--allow-local", action="store_true",
                        help="accept local data.root / run.storage_path / --data: every node "
                             "mounts the same absolute path (NFS)")
    parser.add_argument("--working-dir", default=".",
                        help="the checkout uploaded with the job (default: the current folder)")
    parser.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                        help="the segnext command to run: train, tune or eval, and its arguments")
    parser.set_defaults(func=_main)


@dataclass
class JobPlan:
    """What is sent: the entrypoint and its runtime env, checked."""

    command: str
    entrypoint: list[str]
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = "."

    def runtime_env(self) -> dict:
        # runs/ is git-ignored in this project; listed too for checkouts without a .gitignore
        return {"working_dir": self.working_dir, "env_vars": dict(self.env),
                "excludes": ["/runs/", "/.venv/", "/.git/"]}


def _main(args: argparse.Namespace) -> int:
    if not args.address:
        raise ConfigError("segnext submit needs the cluster's dashboard address: --address "
                          "http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    plan = plan_job(args.command_line, working_dir=args.working_dir,
                    allow_local=args.allow_local)
    client = _client(args.address)
    job_id = f"segnext-{plan.command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    print(f"[segnext] uploading {plan.working_dir} (less its git-ignored files) to the cluster",
          flush=True)
    with _quiet_ray_client():  # a dozen INFO/WARNING lines per upload about ignored files
        client.submit_job(entrypoint=shlex.join(plan.entrypoint), runtime_env=plan.runtime_env(),
                          submission_id=job_id, metadata={"segnext_command": plan.command})
    print(f"[segnext] submitted job {job_id} to {args.address}: {shlex.join(plan.entrypoint)}",
          flush=True)
    commands = _job_commands(job_id, args.address)
    if args.no_wait:
        print(commands)
        return 0
    try:
        _follow(client, job_id)
    except KeyboardInterrupt:
        if _ask_to_stop(job_id):
            client.stop_job(job_id)
            print(f"[segnext] asked the cluster to stop job {job_id}")
        else:
            print(f"[segnext] stopped following; job {job_id} goes on\n{commands}")
        return 130
    status, exit_code = _outcome(client, job_id)
    print(f"[segnext] job {job_id} {status}\n{commands}")
    return exit_code


def plan_job(command_line: list[str], *, working_dir: str = ".",
             allow_local: bool = False) -> JobPlan:
    """The job for `segnext COMMAND ARGS`, or a ConfigError naming what cannot work on a
    cluster and the fix. Nothing is sent and no Ray is started here."""
    from pipelines.cli import build_parser

    line = command_line[1:] if command_line[:1] == ["--"] else list(command_line)
    if not line or line[0] not in COMMANDS:
        raise ConfigError(f"segnext submit runs one of {', '.join(COMMANDS)}: "
                          "segnext submit --address URL -- train --config configs/X.yaml ...")
    root = Path(working_dir).resolve()
    if not (root / "pipelines").is_dir():
        raise ConfigError(f"--working-dir {root} is not a checkout of this project (no "
                          "pipelines/ folder): run segnext submit from the repository root")
    args = build_parser().parse_args(line)
    env = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    tracking = _tracking_uri_of(args, line[0], root)
    if tracking is not None:
        _require_shared_tracking(tracking)
        env["MLFLOW_TRACKING_URI"] = tracking
    entry = ["python", "-m", "pipelines.cli", *line]
    if line[0] in ("train", "tune"):
        cfg = load_config(_inside(root, args.config), args.overrides)
        _require_shared(cfg.data.root, "data.root", allow_local)
        _require_shared(cfg.run.storage_path, "run.storage_path", allow_local)
        if cfg.storage.endpoint:
            env["AWS_ENDPOINT_URL_S3"] = cfg.storage.endpoint
        entry.append("ray.address=auto")  # the job's driver joins the cluster it runs on
    else:
        _require_shared(args.data, "--data", allow_local)
        if not args.model.startswith("models:/"):
            _require_shared(args.model, "--model", allow_local)
    return JobPlan(command=line[0], entrypoint=entry, env=env, working_dir=str(root))


def _inside(root: Path, config: str) -> str:
    """The config file as the job sees it: a path inside the uploaded working directory."""
    path = Path(config).resolve()
    if not path.is_file():
        raise ConfigError(f"--config {config}: no such file")
    if not path.is_relative_to(root):
        raise ConfigError(f"--config {config} lies outside the working directory {root}, which "
                          "is all the job gets: copy it under configs/")
    return str(path)


def _require_shared(value: str | None, key: str, allow_local: bool) -> None:
    if value is None or is_remote(value):
        return
    if not allow_local:
        raise ConfigError(
            f"{key} = {value!r} is a local path: on a cluster each node reads its own disk, so "
            "workers on other nodes would not find it (or write where nobody looks). Fix: put "
            f"it on shared storage ({key}=s3://bucket/prefix), or pass --allow-local if every "
            "node mounts that same path (NFS)"
        )
    if not os.path.isabs(value):
        raise ConfigError(f"{key} = {value!r}: with --allow-local a shared path must be "
                          "absolute (the job runs in a copy of the working directory)")


def _tracking_uri_of(args: argparse.Namespace, command: str, root: Path) -> str | None:
    """The tracking URI the job will use, or None where the command logs nothing."""
    if command == "eval":
        if args.log_to == "none" and not args.model.startswith("models:/"):
            return None
        configured = args.tracking_uri
    else:
        configured = load_config(_inside(root, args.config), args.overrides).mlflow.tracking_uri
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or ""


def _require_shared_tracking(uri: str) -> None:
    if not uri or uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        shown = uri or "(unset: a SQLite file under runs/)"
        raise ConfigError(
            f"MLflow tracking URI {shown} is local to this machine: runs logged by workers on "
            "other nodes would be lost, and concurrent trials corrupt a SQLite file. Fix: run a "
            "tracking server (`mlflow server --backend-store-uri postgresql+psycopg://... "
            "--artifacts-destination s3://bucket/mlflow`) and export MLFLOW_TRACKING_URI="
            "http://HOST:5000 (or set mlflow.tracking_uri)"
        )
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S):
                return
        except (urllib.error.URLError, OSError) as error:
            raise ConfigError(
                f"the MLflow tracking server {uri} does not answer ({error}); start it or fix "
                "MLFLOW_TRACKING_URI / mlflow.tracking_uri before submitting"
            ) from None


def _client(address: str):
    """A job client; sends the cluster's auth token where Ray 2.60 keeps one (its `ray job` CLI
    needs RAY_AUTH_MODE=token for that, which users forget)."""
    from ray.job_submission import JobSubmissionClient

    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if "RAY_AUTH_MODE" not in os.environ and (token_file.is_file()
                                              or os.environ.get("RAY_AUTH_TOKEN")):
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        return JobSubmissionClient(address)
    except ConnectionError as error:
        raise ConfigError(f"no Ray job server answers at {address} ({error}); the address is "
                          "the head's dashboard, http://HEAD:8265") from None


@contextmanager
def _quiet_ray_client() -> Iterator[None]:
    import logging

    logger = logging.getLogger("ray")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _follow(client, job_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def _outcome(client, job_id: str) -> tuple[str, int]:
    """The job's final status and the exit code this command ends with: 0 when it succeeded,
    the driver's own exit code when Ray knows it, else 1 (130 for a stopped job)."""
    deadline = time.monotonic() + 30  # the log stream ends a moment before the status is final
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if info.status.is_terminal() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if status in EXIT_STATUS:
        return status, EXIT_STATUS[status]
    code = getattr(info, "driver_exit_code", None)
    message = f" ({info.message})" if info.message else ""
    return status + message, code if isinstance(code, int) and code > 0 else 1


def _ask_to_stop(job_id: str) -> bool:
    """After Ctrl-C: stop the job too, or only stop following it. Without a terminal there is
    nobody to ask: the job goes on."""
    if not sys.stdin.isatty():
        return False
    try:
        answer = input(f"\nstop job {job_id} on the cluster too? [y/N] ")
    except (EOFError, KeyboardInterrupt):
        return False
    return answer.strip().lower() in ("y", "yes")


def _job_commands(job_id: str, address: str) -> str:
    where = f"--address {address}"
    return (f"  status: ray job status {job_id} {where}\n"
            f"  logs:   ray job logs {job_id} {where} --follow\n"
            f"  stop:   ray job stop {job_id} {where}\n"
            "  (RAY_AUTH_MODE=token for the `ray job` CLI on a cluster with token auth)")
