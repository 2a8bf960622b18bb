"""Model registry: pyfunc logging, champion alias moves only for a better model, run lookup.

The helpers at the top (`tiny_checkpoint`, `sqlite_store`, `single_thread`) are shared with the
other registry/serving/eval/predict tests, which import them from here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

import segnext
from pipelines.checkpoint_io import CheckpointError, build_meta, save_checkpoint

CLASSES = ("sky", "road", "car")
PALETTE = ((70, 130, 180), (128, 64, 128), (0, 0, 142))


def tiny_checkpoint(
    folder: Path,
    *,
    val_miou: float | None = 0.3,
    class_names: Sequence[str] = CLASSES,
    palette: Sequence[Sequence[int]] = PALETTE,
    constant_class: int | None = None,
    iteration: int = 1,
    config: dict | None = None,
    seed: int = 0,
    classifier: str = "standard",
    classifier_kwargs: dict | None = None,
) -> Path:
    """A SegNeXt-T checkpoint in the contract format. `constant_class` zeroes the (standard)
    classifier's weights and biases it so the model predicts that class at every pixel."""
    state = dict(_initial_state(len(class_names), seed, classifier))
    if constant_class is not None:
        prefix = "decode_head.classifier.conv_seg"
        state[f"{prefix}.weight"] = torch.zeros_like(state[f"{prefix}.weight"])
        state[f"{prefix}.bias"] = torch.zeros_like(state[f"{prefix}.bias"])
        state[f"{prefix}.bias"][constant_class] = 10.0
    meta = build_meta(
        variant="tiny",
        num_classes=len(class_names),
        classifier=classifier,
        classifier_kwargs=dict(classifier_kwargs or {}),
        nmf={},
        class_names=list(class_names),
        palette=[list(color) for color in palette],
        ignore_index=255,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        crop_size=[64, 64],
    )
    metrics = {} if val_miou is None else {"val/mIoU": val_miou}
    payload = {
        "model": state,
        "iteration": iteration,
        "epoch": 0,
        "metrics": metrics,
        "config": dict(config or {}),
        "meta": meta,
    }
    return save_checkpoint(folder, payload)


@functools.cache
def _initial_state(num_classes: int, seed: int, classifier: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return segnext.create_model("tiny", num_classes, classifier=classifier).state_dict()


def sqlite_store(folder: Path) -> tuple[str, str]:
    """(tracking URI, experiment id) of a fresh SQLite store, created once up front."""
    from pipelines.tracking.runs import ensure_experiment

    uri = f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    return uri, ensure_experiment(uri, "segnext")


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine, two threads oversubscribe badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Foreign:
    """An arbitrary class: unpickling it would run code, so weights_only=True refuses it."""


# ------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_champion_moves_only_for_a_better_model(tmp_path, monkeypatch, single_thread):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.cli import main
    from pipelines.tracking.registry import register_checkpoint, using_tracking_uri

    uri, experiment = sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    runs = [client.create_run(experiment).info.run_id for _ in range(3)]
    client.set_terminated(runs[1])

    first = register_checkpoint(tiny_checkpoint(tmp_path / "a", val_miou=0.30), run_id=runs[0])
    assert str(first.version) == "1" and first.aliases == ["champion"]
    assert "no champion yet" in first.description

    best = 0.5123456789  # more digits than the description prints
    second_ckpt = tiny_checkpoint(tmp_path / "b", val_miou=best)
    assert main(["register", "--run", runs[1], "--checkpoint", str(second_ckpt)]) == 0
    second = client.get_model_version("segnext", "2")
    assert second.aliases == ["champion"]
    assert "0.5123 vs champion v1 0.3000 (+0.2123): promoted" in second.description

    # a tie is not a win: the champion moves only for a strictly better val mIoU
    third = register_checkpoint(tiny_checkpoint(tmp_path / "c", val_miou=best), run_id=runs[2])
    assert third.aliases == []
    assert "0.5123 vs champion v2 0.5123: not promoted; v2 stays" in third.description
    assert str(client.get_model_version_by_alias("segnext", "champion").version) == "2"

    # "latest" is reserved by MLflow as an alias; models:/<name>/latest is the newest version
    with using_tracking_uri(uri):
        assert mlflow.models.Model.load("models:/segnext/latest").run_id == runs[2]
        champion = mlflow.models.Model.load("models:/segnext@champion")
    assert champion.run_id == runs[1]
    assert champion.metadata["class_names"] == list(CLASSES)
    assert champion.metadata["palette"] == [list(color) for color in PALETTE]
    assert champion.signature.outputs.input_names() == ["mask", "height", "width"]

    tags = third.tags
    assert {"dataset", "classes", "variant", "classifier", "val_mIoU", "run_id", "git_commit"} <= (
        set(tags)
    )
    assert json.loads(tags["classes"]) == list(CLASSES)
    assert (tags["variant"], float(tags["val_mIoU"]), tags["run_id"]) == ("tiny", best, runs[2])
    # a run still training keeps its status; a finished one stays finished
    assert client.get_run(runs[0]).info.status == "RUNNING"
    assert client.get_run(runs[1]).info.status == "FINISHED"


def test_register_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    from pipelines.tracking.registry import register_checkpoint

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": Foreign()}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt holds pickled Python objects"):
        register_checkpoint(foreign, run_id="0" * 32, tracking_uri=f"sqlite:///{tmp_path}/x.db")
    assert not (tmp_path / "x.db").exists()  # refused before touching the store


def test_find_run_checkpoint_best_and_latest(tmp_path):
    from mlflow import MlflowClient

    from pipelines.tracking.registry import find_run_checkpoint
    from pipelines.tracking.runs import RUN_NAME_TAG

    storage = tmp_path / "ray"
    for iteration, score in ((100, 0.2), (200, 0.5), (300, 0.4)):
        folder = storage / "demo-run" / f"checkpoint_{iteration:07d}"
        tiny_checkpoint(folder, val_miou=score, iteration=iteration)
    uri, experiment = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(experiment, tags={RUN_NAME_TAG: "demo-run"}).info.run_id
    client.log_param(run_id, "run.storage_path", str(storage))
    run = client.get_run(run_id)
    assert Path(find_run_checkpoint(run, "best")).parent.name == "checkpoint_0000200"
    assert Path(find_run_checkpoint(run, "latest")).parent.name == "checkpoint_0000300"

    bare = client.get_run(client.create_run(experiment).info.run_id)
    with pytest.raises(FileNotFoundError, match="pass --checkpoint PATH"):
        find_run_checkpoint(bare, "best")
