"""Which Ray cluster a command runs on: the one place that calls `ray.init`.

`ray.address` (config) or the `address` argument:

- `None`: join the cluster that `RAY_ADDRESS` or the last `ray start` names if it answers;
  if none is named, or the named one is dead (a head killed without `ray stop` leaves its
  address behind), start a private local cluster instead. Never hangs on a dead address.
- `"local"`: always a private local cluster in this process.
- `"auto"` or `host:port` (or `ray://host:port`): that cluster; if it does not answer within
  `PROBE_TIMEOUT_S`, a `ConfigError` names the address, where it came from and the fix.

Every process of the cluster (workers, actors, Ray Train's controller and its placement-group
cleaner) gets `RAY_ADDRESS` pinned to the cluster this command uses. Ray code that resolves the
address `auto` inside a worker (the cleaner does, through the State API) would otherwise pick
the newest cluster on the machine, and a `ray start --head` by someone else mid-run made the
cleaner declare this run's controller dead and kill its workers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import closing, contextmanager

from pipelines.config import ConfigError

# Ray Train V2 tees print() into its logger too, so every line would show twice on the driver.
WORKER_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
PROBE_TIMEOUT_S = 3.0
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by Ray when it starts a head node
# The head's autoscaler monitor and dashboard export metrics on fixed ports (44217, 44227)
# unless these name others; a `ray start --head` beside a private cluster needs them free.
METRIC_PORT_ENVS = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
# The raylet kills idle task workers beyond `num_workers_soft_limit` (default: the CPU count).
# The training stream's read tasks come in bursts (several fractional-CPU tasks per step), so
# with the default the raylet killed the surplus after each burst and started new ones for the
# next: on the 2-core machine 338 worker processes in 18 minutes of CamVid training (each about
# a CPU-second of Python start-up), and training fell from 6 to 3 img/s. A higher limit keeps
# the workers a burst needed (no more than CPUs / data.read_cpus of them; ~200 MB each).
RAYLET_CONFIG = {"num_workers_soft_limit": 64}


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Connect this process to Ray (see the module doc) unless already connected; returns the
    GCS address in use. `env`: more environment variables for every worker."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    worker_env = {**WORKER_ENV, **(env or {})}
    for key, value in worker_env.items():
        os.environ.setdefault(key, value)
    from pipelines.console import current_log

    target = resolve_address(address)
    # ray.init applies `logging_config` after `logging_level`, so the driver's "ray" logger ends
    # at WARNING either way; under the quiet console its records below ERROR (the token-auth
    # notice) reach the log file only (pipelines.console), its ERRORs still show.
    level = "ERROR" if current_log() is not None else "WARNING"
    options = {"logging_level": level, "logging_config": ray.LoggingConfig(log_level="WARNING")}
    with _keeping_stop_handlers():
        if target is not None:
            ray.init(address=target,
                     runtime_env={"env_vars": {**worker_env, "RAY_ADDRESS": target}}, **options)
            print(f"[segnext] joined the Ray cluster at {target}", flush=True)
            return target
        address = _start_private(num_cpus, worker_env, options)
    print(f"[segnext] started a private Ray cluster at {address}", flush=True)
    return address


@contextmanager
def _keeping_stop_handlers() -> Iterator[None]:
    """Put this process's SIGTERM/SIGINT handlers back after `ray.init`, whose core worker
    installs a C++ failure handler for SIGTERM (it dumps a stack trace and aborts, exit 134):
    a command's SIGTERM must unwind like Ctrl-C (pipelines.cli), ending the run cleanly."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if callable(handler) or handler in (signal.SIG_IGN, signal.SIG_DFL):
                signal.signal(signum, handler)


def resolve_address(address: str | None) -> str | None:
    """host:port of the live cluster to join, or None to start a private one."""
    if address == "local":
        return None
    if address not in (None, "auto"):
        _require_alive(address, "ray.address")
        return address
    named, source = _named_cluster()
    if named is None:
        if address == "auto":
            raise ConfigError(
                "ray.address = 'auto' but no running cluster is named (RAY_ADDRESS is unset and "
                "no `ray start` address file exists); start one with `ray start --head` or set "
                "ray.address: null for a private local cluster"
            )
        return None
    if _answers(named):
        return named
    if address == "auto":
        _require_alive(named, source)
    print(
        f"[segnext] {source} names the Ray cluster {named}, which does not answer (stale: "
        "killed without `ray stop`?); starting a private local cluster instead",
        flush=True,
    )
    return None


def _named_cluster() -> tuple[str | None, str]:
    """The cluster address the environment names, and where it came from."""
    from ray._common.utils import get_ray_address_file

    from_env = os.environ.get("RAY_ADDRESS", "").strip()
    if from_env:
        return from_env, "RAY_ADDRESS"
    path = get_ray_address_file(None)
    if os.path.isfile(path):
        with open(path) as handle:
            text = handle.read().strip()
        if text:
            return text, path
    return None, ""


def _host_port(address: str) -> tuple[str, int] | None:
    text = address.split("://", 1)[-1]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host or "127.0.0.1", int(port)


def _answers(address: str) -> bool:
    """A TCP connect to the address within PROBE_TIMEOUT_S (a dead head refuses at once)."""
    parsed = _host_port(address)
    if parsed is None:
        return False
    try:
        with closing(socket.create_connection(parsed, timeout=PROBE_TIMEOUT_S)):
            return True
    except OSError:
        return False


def _require_alive(address: str, source: str) -> None:
    if _host_port(address) is None:
        raise ConfigError(
            f"{source} = {address!r} is not a Ray address; use host:port (the head's GCS port, "
            "default 6379), 'auto', 'local' or null"
        )
    if not _answers(address):
        raise ConfigError(
            f"the Ray cluster at {address} (from {source}) does not answer within "
            f"{PROBE_TIMEOUT_S:g} s; start it (`ray start --head`), fix the address, or set "
            "ray.address: null to run on a private local cluster"
        )


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


_PRIVATE: list[str] = []  # the address of the private cluster this process started, if any


def started_private_cluster() -> bool:
    """Whether this process runs on a private cluster it started (one that cannot grow)."""
    import ray

    return bool(_PRIVATE) and ray.is_initialized() and (
        ray.get_runtime_context().gcs_address == _PRIVATE[-1])


def check_fits(per_worker: dict[str, float], workers: int, *, key: str) -> None:
    """Refuse, with what was asked and what the cluster has, a request that a private cluster
    can never grant (it cannot grow: Ray would wait forever, silently). On a joined cluster
    (an autoscaler may add nodes) this checks nothing."""
    import ray

    if not started_private_cluster():
        return
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    fits = sum(int(min((node.get(name, 0.0) / need for name, need in per_worker.items()
                        if need > 0), default=workers)) for node in nodes)
    if fits >= workers:
        return
    have = {name: sum(node.get(name, 0.0) for node in nodes) for name in per_worker}
    raise ConfigError(
        f"{key}: {workers} workers of {per_worker} cannot run on the private Ray cluster of "
        f"this machine ({have} in all; at most {fits} such workers fit). Fix: ask for less "
        "(ray.num_workers, ray.cpus_per_worker, ray.use_gpu=false on a machine without GPUs), "
        "or join a cluster that has them with ray.address"
    )


@contextmanager
def _agent_on_a_free_port() -> Iterator[None]:
    """`ray.init` gives its dashboard agent Ray's default HTTP port (52365: `RayParams` binds
    the constant as a default and `ray.init` has no argument for it), the port `ray job submit`
    reaches on a cluster the user starts with `ray start --head` beside ours. Port 0 lets the
    node pick a free one, as it already does for the agent's gRPC, metrics and runtime-env
    ports; only `ray.init`'s own RayParams is affected, for the time of this call."""
    import ray._private.parameter as parameter

    original = parameter.RayParams

    class FreeAgentPortParams(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    parameter.RayParams = FreeAgentPortParams
    try:
        yield
    finally:
        parameter.RayParams = original


def _start_private(num_cpus: int | None, worker_env: dict[str, str], options: dict) -> str:
    """A local head on ports chosen here, none of them Ray's defaults (the user's own cluster
    on this machine needs those: GCS 6379, dashboard 8265, agent 52365), and its address known
    before its workers start."""
    import ray
    from ray.util import get_node_ip_address

    address = f"{get_node_ip_address()}:{_free_port()}"
    # RAY_ADDRESS in this process would override address="local" (a dead one: a hang).
    saved = {name: os.environ.pop(name, None)
             for name in (GCS_PORT_ENV, "RAY_ADDRESS", *METRIC_PORT_ENVS)}
    os.environ[GCS_PORT_ENV] = address.rsplit(":", 1)[1]
    for name in METRIC_PORT_ENVS:
        os.environ[name] = str(_free_port())
    try:
        with _agent_on_a_free_port():
            ray.init(address="local", num_cpus=num_cpus, dashboard_port=_free_port(),
                     _system_config=dict(RAYLET_CONFIG),  # a copy: Ray adds its own keys to it
                     runtime_env={"env_vars": {**worker_env, "RAY_ADDRESS": address}},
                     **options)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    actual = ray.get_runtime_context().gcs_address
    if actual != address:  # a Ray that ignores the port variable: fail loudly, not silently
        ray.shutdown()
        raise RuntimeError(
            f"Ray started its head at {actual}, not at the requested {address}: the installed "
            f"Ray no longer reads {GCS_PORT_ENV}; update pipelines/cluster.py"
        )
    _PRIVATE.append(address)
    return address
