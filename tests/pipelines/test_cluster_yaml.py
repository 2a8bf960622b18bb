"""cluster.yaml passes the same checks `ray up` runs before it talks to AWS."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_up_schema_accepts_it(config: dict) -> None:
    prepared = prepare_config(config)  # fills AWS defaults, as `ray up` does
    validate_config(prepared)  # jsonschema + node-type consistency; raises on any error
    assert prepared["provider"]["type"] == "aws"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training on the head
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscaling from zero


def test_a_broken_copy_is_rejected(config: dict) -> None:
    broken = prepare_config({**config, "max_workers": "many"})
    with pytest.raises(Exception, match="many"):
        validate_config(broken)


def test_nodes_install_this_project_with_pinned_torch(config: dict) -> None:
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = " ".join(config[key])
        assert "torch==2.13.0" in commands
        assert "pip install" in commands and "/home/ubuntu/segnext" in commands
    assert "whl/cpu" in " ".join(config["head_setup_commands"])
    assert "whl/cu" in " ".join(config["worker_setup_commands"])
    for remote, local in config["file_mounts"].items():
        assert (REPO / local).resolve() == REPO, (remote, local)


def test_nodes_start_ray_with_the_raylet_config_of_private_clusters(config: dict) -> None:
    """A `ray up` cluster runs its raylets as `init_ray` runs a private one (RAYLET_CONFIG)."""
    from pipelines.cluster import RAYLET_CONFIG

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        for name, value in RAYLET_CONFIG.items():
            assert f"RAY_{name}={int(value)}" in start, (key, name)
