"""The cluster path on the real parts (issue 25): `ray start` nodes, `segnext submit` jobs, an
MLflow tracking server on PostgreSQL with artifacts on S3 (moto), a node killed mid-run, eval
and serving of the champion (bench/local_cluster.py, whose own checks read the job API, the
tracking server's REST API, the bucket and PostgreSQL). And a user's own `ray start --head` on
Ray's default ports beside the private cluster segnext starts for itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import local_cluster  # noqa: E402 - bench/ is a folder of scripts, not a package

pytestmark = pytest.mark.slow


# Ray's fixed default ports: GCS, dashboard, dashboard agent (HTTP: the job API), client server,
# autoscaler and dashboard metrics. A user's `ray start --head` next to a private cluster needs
# every one of them.
DEFAULT_PORTS = {6379, 8265, 52365, 10001, 44217, 44227}


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this machine (IPv4 and IPv6), from /proc."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_private_cluster_binds_no_default_ray_port(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from pipelines.cluster import init_ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    taken_before = listening_ports() & DEFAULT_PORTS
    init_ray("local", num_cpus=1)
    try:
        taken = (listening_ports() & DEFAULT_PORTS) - taken_before
    finally:
        ray.shutdown()
    assert not taken, f"the private cluster holds Ray's default port(s) {sorted(taken)}"



def _missing_parts() -> str | None:
    if not (local_cluster.CAMVID / "train.txt").is_file():
        return f"no CamVid at {local_cluster.CAMVID}"
    try:
        local_cluster.postgres_bin()
    except FileNotFoundError as error:
        return str(error)
    return None


@pytest.mark.skipif(_missing_parts() is not None, reason=str(_missing_parts()))
def test_cluster_end_to_end_on_real_parts(tmp_path: Path) -> None:
    facts = tmp_path / "facts.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "local_cluster.py"), "--keep",
                          str(tmp_path / "work"), "--json", str(facts)],
                         capture_output=True, text=True, timeout=2400, cwd=REPO)
    assert facts.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(facts.read_text())
    failed = [f"{c['check']}: {c['detail']}" for c in report["checks"] if not c["ok"]]
    assert not failed, "\n".join(failed) + f"\nlogs in {report['folder']}"
    names = {c["check"] for c in report["checks"]}
    assert {"train job SUCCEEDED (job API)", "tune job SUCCEEDED (job API)",
            "no process of this run left"} <= names
    assert run.returncode == 0


def test_a_user_cluster_on_default_ports_takes_jobs_beside_a_private_one(
    ray_session: None, tmp_path: Path
) -> None:
    """While segnext's private cluster runs (ray_session: what `segnext train` starts), a plain
    `ray start --head` comes up on Ray's default ports and accepts a `ray job submit` sent to
    http://127.0.0.1:8265."""
    taken = listening_ports() & DEFAULT_PORTS
    if taken:
        pytest.skip(f"Ray's default ports are in use on this machine: {sorted(taken)}")
    procs = local_cluster.Processes(tmp_path)
    ray = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="segnext-user-ray-", dir="/tmp")  # AF_UNIX paths < 108 bytes
    user = {"RAY_TMPDIR": temp, "RAY_AUTH_MODE": "token"}
    head = procs.start("user-head", [ray, "start", "--head", "--block", "--num-cpus", "1",
                                     "--disable-usage-stats"], **user)
    try:
        deadline = time.monotonic() + 240
        while not {8265, 52365} <= listening_ports():
            assert head.poll() is None, (tmp_path / "user-head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the user's head did not come up in 240 s"
            time.sleep(1)
        job = procs.run([ray, "job", "submit", "--address", "http://127.0.0.1:8265", "--",
                         "python", "-c", "print('job ran on the user cluster')"], 300, **user)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        assert "job ran on the user cluster" in job.stdout
        assert "succeeded" in job.stdout.lower()
    finally:
        left = procs.stop_all()
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, left
