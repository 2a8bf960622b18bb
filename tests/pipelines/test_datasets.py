"""Dataset lineage in MLflow (pipelines.tracking.datasets): a training run's train and
validation splits and `segnext eval`'s split are the runs' MLflow datasets, and a registered
version's description names them. Against a temporary SQLite store; nothing trains here
(tests/pipelines/test_train.py checks a real run's inputs)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from test_registry import single_thread, sqlite_store, tiny_checkpoint  # noqa: F401

from data.manifest import load_manifest

CONTEXT = "mlflow.data.context"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating one costs seconds); runs are named apart."""
    return sqlite_store(tmp_path_factory.mktemp("lineage"))[0]


def _inputs(client, run_id: str) -> dict[str, dict]:
    """name -> {digest, source (JSON), source_type, profile, tags} of the run's dataset inputs."""
    found = {}
    for item in client.get_run(run_id).inputs.dataset_inputs:
        found[item.dataset.name] = {
            "digest": item.dataset.digest,
            "source": json.loads(item.dataset.source),
            "source_type": item.dataset.source_type,
            "profile": json.loads(item.dataset.profile),
            "tags": {tag.key: tag.value for tag in item.tags},
        }
    return found


def _config(experiment_yaml, tmp_path: Path, shards: Path, uri: str, *overrides: str):
    """The tiny experiment on `shards`, its MLflow run named after the calling test."""
    from pipelines.config import load_config

    path = experiment_yaml(tmp_path, shards)
    return load_config(path, [f"mlflow.tracking_uri={uri}", "mlflow.experiment=segnext",
                              "model.num_classes=7", f"run.name={tmp_path.name}", *overrides])


def test_a_training_run_logs_its_train_and_validation_splits(
    tmp_path, tiny_shards, experiment_yaml, store
):
    from mlflow import MlflowClient

    from pipelines.tracking.datasets import split_digest
    from pipelines.tracking.training import open_training_run

    uri = store
    manifest = load_manifest(tiny_shards)
    cfg = _config(experiment_yaml, tmp_path, tiny_shards, uri)
    run_id = open_training_run(cfg, num_params=1, train_samples=32, meta={},
                               manifest=manifest).run_id
    client = MlflowClient(uri)
    inputs = _inputs(client, run_id)
    name = manifest.name
    assert set(inputs) == {f"{name}/train", f"{name}/val"}
    train, val = inputs[f"{name}/train"], inputs[f"{name}/val"]
    assert train["tags"][CONTEXT] == "training" and val["tags"][CONTEXT] == "validation"
    root_uri = Path(tiny_shards).resolve().as_uri()
    assert train["source"] == {"uri": root_uri} and train["source_type"] == "local"
    assert train["tags"]["segnext.data.root"] == root_uri
    assert train["digest"] == split_digest(manifest.split("train")["shards"])
    assert len(train["digest"]) == 10 and train["digest"] != val["digest"]
    assert train["profile"]["samples"] == 32 and val["profile"]["samples"] == 6
    assert train["profile"]["classes"] == 7
    assert train["profile"]["class_names"] == list(manifest.classes)
    assert train["profile"]["image_format"] == manifest.image_format
    assert train["profile"]["shards"] == len(manifest.split("train")["shards"])

    # resuming on the same shards adds nothing
    open_training_run(cfg, num_params=1, train_samples=32, meta={}, manifest=manifest)
    assert _inputs(client, run_id) == inputs


def test_a_split_both_trained_and_validated_on_has_both_contexts(
    tmp_path, tiny_shards, experiment_yaml, store
):
    from mlflow import MlflowClient

    from pipelines.tracking.training import open_training_run

    uri = store
    manifest = load_manifest(tiny_shards)
    cfg = _config(experiment_yaml, tmp_path, tiny_shards, uri, "data.train_split=[train, val]")
    run_id = open_training_run(cfg, num_params=1, train_samples=38, meta={},
                               manifest=manifest).run_id
    inputs = _inputs(MlflowClient(uri), run_id)
    assert {name: item["tags"][CONTEXT] for name, item in inputs.items()} == {
        f"{manifest.name}/train": "training", f"{manifest.name}/val": "training,validation"}


def test_the_digest_follows_the_shard_hashes(tiny_shards):
    from data.manifest import Manifest
    from pipelines.tracking.datasets import split_dataset

    manifest = load_manifest(tiny_shards)
    data = copy.deepcopy(manifest.to_dict())
    data["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    changed = Manifest.from_dict(data, root=manifest.root)
    again = Manifest.from_dict(copy.deepcopy(manifest.to_dict()), root=manifest.root)

    assert split_dataset(again, "train").digest == split_dataset(manifest, "train").digest
    assert split_dataset(changed, "train").digest != split_dataset(manifest, "train").digest
    assert split_dataset(changed, "val").digest == split_dataset(manifest, "val").digest


def test_the_source_of_object_storage_is_its_uri(tiny_shards):
    from data.manifest import Manifest
    from pipelines.tracking.datasets import split_dataset

    manifest = load_manifest(tiny_shards)
    remote = Manifest.from_dict(manifest.to_dict(), root="s3://bucket/shards")
    dataset = split_dataset(remote, "val")
    assert dataset.source.to_json() == json.dumps({"uri": "s3://bucket/shards"})
    assert dataset._get_source_type() == "s3"
    assert dataset.digest == split_dataset(manifest, "val").digest  # same bytes, same digest


def test_eval_logs_its_split_as_the_test_dataset(tmp_path, tiny_shards, store):
    from mlflow import MlflowClient

    from pipelines.commands.evaluate import EvalResult
    from pipelines.tracking.evaluation import log_evaluation

    uri = store
    manifest = load_manifest(tiny_shards)
    k = manifest.num_classes
    result = EvalResult(
        matrix=np.eye(k, dtype=np.int64), class_names=list(manifest.classes), num_samples=6,
        scores={"mIoU": 1.0, "aAcc": 1.0, "mAcc": 1.0, "per_class_iou": [1.0] * k},
        distributed=False, manifest=manifest,
    )
    run_id = log_evaluation(result, model="some.pt", data=str(tiny_shards), split="val",
                            target="new", experiment="segnext", tracking_uri=uri)
    inputs = _inputs(MlflowClient(uri), run_id)
    assert list(inputs) == [f"{manifest.name}/val"]
    (item,) = inputs.values()
    assert item["tags"][CONTEXT] == "test" and item["profile"]["samples"] == 6


@pytest.mark.slow
def test_the_registered_version_names_its_datasets(
    tmp_path, tiny_shards, experiment_yaml, store, single_thread  # noqa: F811
):
    from mlflow import MlflowClient

    from pipelines.tracking.datasets import split_digest
    from pipelines.tracking.registry import register_checkpoint
    from pipelines.tracking.training import open_training_run

    uri = store
    manifest = load_manifest(tiny_shards)
    cfg = _config(experiment_yaml, tmp_path, tiny_shards, uri)
    run_id = open_training_run(cfg, num_params=1, train_samples=32, meta={},
                               manifest=manifest).run_id
    version = register_checkpoint(tiny_checkpoint(tmp_path / "ckpt"), run_id=run_id,
                                  tracking_uri=uri)
    root_uri = Path(tiny_shards).resolve().as_uri()
    for split, context in (("train", "training"), ("val", "validation")):
        digest = split_digest(manifest.split(split)["shards"])
        assert f"{manifest.name}/{split} ({context}, digest {digest}, {root_uri})" in (
            version.description)
    assert MlflowClient(uri).get_model_version("segnext", version.version).description == (
        version.description)


def test_a_training_run_logs_the_decision_rule_its_model_predicts_with(
    tmp_path, tiny_shards, experiment_yaml, store
):
    """The integrated head's default rule is not in the config; the params show it anyway."""
    from mlflow import MlflowClient

    from pipelines.tracking.training import open_training_run

    cfg = _config(experiment_yaml, tmp_path, tiny_shards, store, "model.classifier=integrated")
    run_id = open_training_run(cfg, num_params=1, train_samples=32, meta={}).run_id
    params = MlflowClient(store).get_run(run_id).data.params
    assert params["model.classifier_kwargs.decision"] == "general"
