"""Which cluster a command joins: stale and dead addresses never hang, the named cluster is
probed first. (A run's immunity to a second cluster is in test_train.py.)"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from pipelines.cluster import resolve_address
from pipelines.config import ConfigError


@pytest.fixture
def address_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Ray's `ray start` address file, in a private temp dir for this test."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray" / "ray_current_cluster"


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"  # closed again: nobody listens there


def test_nothing_named_starts_a_private_cluster(address_file: Path) -> None:
    assert resolve_address(None) is None
    assert resolve_address("local") is None
    with pytest.raises(ConfigError, match="no running cluster is named"):
        resolve_address("auto")


def test_stale_address_file_is_detected_quickly(
    address_file: Path, capsys: pytest.CaptureFixture
) -> None:
    stale = dead_address()
    address_file.write_text(stale)
    start = time.monotonic()
    assert resolve_address(None) is None  # the default: a private cluster instead, with a note
    assert f"names the Ray cluster {stale}, which does not answer" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=f"cluster at {stale} \\(from {address_file}\\)"):
        resolve_address("auto")
    assert time.monotonic() - start < 10


def test_explicit_addresses_are_probed(
    address_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = dead_address()
    with pytest.raises(ConfigError, match=f"cluster at {stale} \\(from ray.address\\)"):
        resolve_address(stale)
    with pytest.raises(ConfigError, match="is not a Ray address"):
        resolve_address("my-cluster")
    monkeypatch.setenv("RAY_ADDRESS", stale)
    with pytest.raises(ConfigError, match="from RAY_ADDRESS"):
        resolve_address("auto")
    with socket.socket() as server:  # something answering: joined as it is
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        assert resolve_address(live) == live
        monkeypatch.setenv("RAY_ADDRESS", live)
        assert resolve_address(None) == live


def test_a_private_cluster_gets_the_raylet_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle read-task workers are kept (RAYLET_CONFIG): no process churn between bursts."""
    import ray

    from pipelines.cluster import RAYLET_CONFIG, init_ray

    assert RAYLET_CONFIG == {"num_workers_soft_limit": 64}
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray("local", num_cpus=1)
    try:
        node = ray._private.worker.global_worker.node
        assert node._ray_params._system_config["num_workers_soft_limit"] == 64
    finally:
        ray.shutdown()
