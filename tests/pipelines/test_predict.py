"""`segnext predict`: palette masks, overlays and the legend written for every input image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_registry import CLASSES, PALETTE, single_thread, tiny_checkpoint  # noqa: F401

from pipelines.checkpoint import CheckpointError
from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def _write_image(path, height, width, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def test_predict_writes_masks_overlays_and_legend(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", constant_class=1)
    folder = tmp_path / "images"
    folder.mkdir()
    first = _write_image(folder / "street.png", 40, 60, 0)
    _write_image(folder / "alley.jpg", 50, 35, 1)
    (folder / "notes.txt").write_text("not an image: skipped")
    other = tmp_path / "more"
    other.mkdir()
    _write_image(other / "street.png", 30, 30, 2)  # same name as one in `folder`
    out = tmp_path / "out"

    argv = [
        "predict",
        "--model",
        str(checkpoint),
        "--input",
        str(folder),
        str(other / "street.png"),
    ]
    assert main([*argv, "--out", str(out), "--alpha", "0.5"]) == 0

    expected = {"alley": (50, 35), "street": (40, 60), "street_1": (30, 30)}
    for stem, size in expected.items():
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.mode == "P" and mask.size == size[::-1]
        assert (np.asarray(mask) == 1).all()  # pixel values are class ids
        assert mask.getpalette()[3:6] == list(PALETTE[1])  # class 1 is drawn in its colour
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert overlay.shape == (*size, 3)
    blended = np.asarray(Image.open(out / "street_overlay.png")).astype(int)
    wanted = np.round(0.5 * first + 0.5 * np.asarray(PALETTE[1]))
    assert np.abs(blended - wanted).max() <= 1
    legend = json.loads((out / "classes.json").read_text())
    assert [entry["name"] for entry in legend] == list(CLASSES)
    assert [entry["color"] for entry in legend] == [list(c) for c in PALETTE]


def test_predict_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    image = tmp_path / "image.png"
    _write_image(image, 8, 8, 0)
    with pytest.raises(CheckpointError, match="is truncated, corrupt or not a torch checkpoint"):
        main(["--debug", "predict", "--model", str(image), "--input", str(image),
              "--out", str(tmp_path)])
    code = main(["predict", "--model", str(image), "--input", str(image), "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"segnext predict: error: {image} is truncated")
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        main(["--debug", "predict", "--model", str(image), "--input", str(missing),
              "--out", str(tmp_path)])
