"""Checkpoint files: atomic writes, weights-only loads, clear errors, model rebuild."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipelines.checkpoint_io import (
    CHECKPOINT_FILE,
    CheckpointError,
    build_meta,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from pipelines.config import OptimConfig, ScheduleConfig
from pipelines.train.optim import RecipeSchedule, build_optimizer
from segnext import create_model


class NotWeights:
    """An arbitrary object: weights-only loading must refuse to unpickle it."""


def _payload(model: torch.nn.Module) -> dict:
    optimizer = build_optimizer(model, OptimConfig())
    scheduler = RecipeSchedule(optimizer, ScheduleConfig(iterations=10, warmup_iters=2))
    optimizer.step()
    scheduler.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": 1,
        "epoch": 0,
        "metrics": {"val/mIoU": 0.5},
        "config": {"optim.lr": 6e-5, "data.crop_size": [64, 64], "model.num_classes": None},
        "meta": build_meta(
            variant="tiny",
            num_classes=3,
            classifier="integrated",
            classifier_kwargs={"top_k": 2},
            nmf={"eval_steps": 5},
            class_names=["a", "b", "c"],
            palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]],
            ignore_index=255,
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            crop_size=[64, 64],
        ),
    }


def test_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    model = create_model("tiny", 3, classifier="integrated", classifier_kwargs={"top_k": 2})
    payload = _payload(model)
    path = save_checkpoint(tmp_path / "ckpt", payload)
    assert path == tmp_path / "ckpt" / CHECKPOINT_FILE
    assert os.listdir(tmp_path / "ckpt") == [CHECKPOINT_FILE]  # no temp file left behind

    loaded = load_checkpoint(tmp_path / "ckpt")  # a folder or the file itself
    assert loaded["iteration"] == 1 and loaded["metrics"]["val/mIoU"] == 0.5
    assert loaded["meta"].class_names == ("a", "b", "c")
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    assert not rebuilt.training and rebuilt.classifier_kind == "integrated"
    assert rebuilt.decode_head.classifier.top_k == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"model": {}, "iteration": 1, "meta": {"format": "x"}})
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - any pickling error
        save_checkpoint(tmp_path, {"model": {}, "iteration": 2, "meta": lambda: 0})
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]


def test_files_that_are_not_ours(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="garbage.pt is truncated, corrupt or not a torch"):
        load_checkpoint(garbage)
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {"w": torch.zeros(64)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.pt is truncated, corrupt"):
        load_checkpoint(truncated)

    pickled = tmp_path / "code.pt"
    torch.save({"model": NotWeights()}, pickled)
    with pytest.raises(CheckpointError, match="holds pickled Python objects") as refused:
        load_checkpoint(pickled)
    assert "weights_only=False" not in str(refused.value)  # never advise the unsafe load

    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointError, match="lacks the keys"):
        load_checkpoint(plain)

    other = tmp_path / "other.pt"
    torch.save({"model": {}, "iteration": 0, "meta": {"format": "other/9"}}, other)
    with pytest.raises(CheckpointError, match="format 'other/9'"):
        load_checkpoint(other)


def test_cli_refuses_a_malicious_file_in_one_line(tmp_path: Path, capsys) -> None:
    """Through the command line: exit 2, one line naming the file, no traceback, no advice to
    load it unsafely, and the payload never runs."""
    from pipelines.cli import main

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(str(marker))}, evil)
    image = tmp_path / "image.png"
    image.write_bytes(b"")
    code = main(["predict", "--model", str(evil), "--input", str(image), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert err.startswith(f"segnext predict: error: {evil} holds pickled Python objects")
    assert "Traceback" not in err and "weights_only=False" not in err
    assert len(err.strip().splitlines()) == 1


class Payload:
    """Unpickling would create the marker file (it must never happen)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_weights_that_do_not_fit_name_the_file_and_the_mismatch(tmp_path: Path, capsys) -> None:
    """A checkpoint missing a weight: `segnext predict` stops with the file, the counts and the
    likely cause (exit 2), not PyTorch's raw strict-loading message."""
    from PIL import Image

    from pipelines.cli import main

    model = create_model("tiny", 3, classifier="integrated", classifier_kwargs={"top_k": 2})
    payload = _payload(model)
    first = next(iter(payload["model"]))
    del payload["model"][first]
    path = save_checkpoint(tmp_path / "ckpt", payload)
    image = tmp_path / "scene.png"
    Image.new("RGB", (64, 48)).save(image)
    code = main(["predict", "--model", str(path), "--input", str(image), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{path}: its weights do not fit the SegNeXt-tiny integrated model" in err
    assert f"1 missing (e.g. {first})" in err and "0 unexpected" in err
    assert "Likely cause" in err and "unexpected RuntimeError" not in err
