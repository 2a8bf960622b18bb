"""Fixtures shared by every test package: synthetic shards written once per session, the tiny
experiment YAML most pipeline tests train with, and a private Ray cluster per module.

Shards from these fixtures are shared: tests read them and never change them. A test that
modifies shards (corrupts a member, deletes a shard, edits the manifest) copies them into its
own `tmp_path` first (`shutil.copytree`). `tests/data/conftest.py` keeps the data-only ones
(the real CamVid folder and its shards).

Project modules are imported inside the fixtures, so collecting a test never depends on them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch

# Without CUDA the fused MSCA kernels run in Triton's interpreter, and Triton takes the mode
# when `triton` is first imported: set it before any test (tests/pipelines builds FusedMSCA
# models) imports it, or tests/segnext/test_fast.py meets kernels compiled for no device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tiny CPU experiment of the pipeline tests: SegNeXt-tiny on 64x64 crops, 6 iterations of
# global batch 8 on 2 Ray workers, a validation and a checkpoint every 2 iterations, MLflow in
# a SQLite file, nothing registered. data.root, mlflow.tracking_uri and run.storage_path are
# set by `experiment_yaml`.
EXPERIMENT: dict[str, dict[str, object]] = {
    "model": {"variant": "tiny", "classifier": "integrated", "drop_path_rate": 0.0},
    "data": {"root": None, "crop_size": [64, 64], "ratio_range": [0.75, 1.25], "read_cpus": 0.25},
    "optim": {"lr": 2.0e-3},
    "schedule": {"iterations": 6, "warmup_iters": 1},
    "train": {"global_batch_size": 8, "log_every": 2, "val_every": 2, "checkpoint_every": 2,
              "keep_best": 1},
    "eval": {"batch_size": 8},
    "ray": {"num_workers": 2, "cpus_per_worker": 0.5},
    "mlflow": {"tracking_uri": None, "experiment": "test"},
    "registry": {"register": False},
    "run": {"storage_path": None},
}


def write_experiment(
    folder: Path,
    root: Path | str,
    overrides: Mapping[str, object] | None = None,
    *,
    name: str = "exp.yaml",
) -> Path:
    """Write EXPERIMENT as `folder/name` and return its path: data.root = `root`, MLflow in
    `folder/mlflow.db`, Ray run folders under `folder/ray`. `overrides` maps dotted keys to
    Python values ({"train.log_every": 1, "ray.resources_per_worker": {"segnext_node": 1}});
    a key not in EXPERIMENT is added. A string is written as YAML reads it: "6e-5" stays the
    plain scalar a person would type (a string to YAML 1.1)."""
    sections = copy.deepcopy(EXPERIMENT)
    sections["data"]["root"] = os.fspath(root)
    sections["mlflow"]["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    sections["run"]["storage_path"] = os.fspath(folder / "ray")
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node: dict = sections
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = os.fspath(value) if isinstance(value, os.PathLike) else value
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(sections, sort_keys=False, default_flow_style=None, width=1000))
    return path


@pytest.fixture(scope="session")
def experiment_yaml() -> Callable[..., Path]:
    """`experiment_yaml(folder, root, overrides=None, name="exp.yaml") -> Path`: the tiny
    experiment config over the shards at `root` (see `write_experiment`)."""
    return write_experiment


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_shards(num_train, num_val, *, size=(64, 64), num_classes=7, seed=0, **options)`:
    the folder of `Synthetic(...)` written by `write_shards(source, out, **options)` (options:
    splits, shard_size, image_format, ...). Each distinct set of arguments is written once per
    session and shared: read it, copy it before changing it."""
    written: dict[str, Path] = {}

    def make(
        num_train: int,
        num_val: int,
        *,
        size: tuple[int, int] = (64, 64),
        num_classes: int = 7,
        seed: int = 0,
        **options: object,
    ) -> Path:
        key = repr((num_train, num_val, tuple(size), num_classes, seed, sorted(options.items())))
        if key not in written:
            from data.shard_writer import write_shards
            from data.sources import Synthetic

            source = Synthetic(num_train=num_train, num_val=num_val, size=tuple(size),
                               num_classes=num_classes, seed=seed)
            out = tmp_path_factory.mktemp(f"shards-{num_train}-{num_val}")
            write_shards(source, out, **options)
            written[key] = out
        return written[key]

    return make


@pytest.fixture(scope="session")
def tiny_shards(make_shards: Callable[..., Path]) -> Path:
    """32 train + 6 val synthetic 64x64 scenes (7 classes, seed 0), one shard per split: what
    the tiny experiment trains on (test_train, test_s3)."""
    return make_shards(32, 6)


@pytest.fixture(scope="session")
def synthetic_shards(make_shards: Callable[..., Path]) -> Path:
    """32 train + 8 val synthetic 64x64 scenes (7 classes, seed 0), 16 samples per shard (the
    data tests' set, and the search of tests/tune)."""
    return make_shards(32, 8, shard_size=16)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A private local Ray cluster of 2 CPUs (even if another cluster runs on this machine)
    for the tests of one module; shut down after the module."""
    import ray

    from pipelines.cluster import init_ray

    init_ray("local", num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def joined_cluster() -> Iterator[str]:
    """The address of a one-node cluster of 2 CPUs, for a command to join as `ray.address`
    (one that could grow: nothing is refused up front); shut down after the test."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield cluster.address
    ray.shutdown()
    cluster.shutdown()
