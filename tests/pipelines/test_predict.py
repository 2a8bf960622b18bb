"""`segnext predict`: palette masks, overlays and the legend written for every input image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_registry import CLASSES, PALETTE, single_thread, tiny_checkpoint  # noqa: F401

from pipelines.checkpoint_io import CheckpointError
from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def one_inference_thread(monkeypatch):
    """What `pipelines.inference.threads` gives the code under test: one thread on the shared machine."""
    monkeypatch.setenv("SEGNEXT_THREADS", "1")


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


# ---------------------------------------------------------------- messy inputs, one by one


def _messy_folder(folder):
    """Good images in every common pixel format, plus files that cannot be read."""
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    ramp = (np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) * 27).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "wide16.png")  # opens as I;16, values up to 64773
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "pal.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("LA").save(folder / "graya.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    png = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.fromarray(rgb[..., 0].astype(np.float32)).save(folder / "float.tif")  # mode F
    return {"rgb", "wide16", "pal", "gray", "graya", "rgba", "cmyk"}, {
        "corrupt.png", "truncated.png", "float.tif"
    }


def test_predict_skips_bad_images_writes_the_rest_and_exits_2(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", constant_class=1)
    good, bad = _messy_folder(tmp_path / "images")
    out = tmp_path / "out"
    argv = ["predict", "--model", str(checkpoint), "--input", str(tmp_path / "images"),
            "--out", str(out), "--threads", "1"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert {p.name for p in out.glob("*_mask.png")} == {f"{stem}_mask.png" for stem in good}
    for stem in good:
        assert (np.asarray(Image.open(out / f"{stem}_mask.png")) == 1).all()
    skipped = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(skipped) == len(bad)  # one line each, no traceback
    assert "Traceback" not in captured.err
    assert any("float.tif: unsupported image mode 'F'" in line for line in skipped)
    assert any("corrupt.png: not a readable image" in line for line in skipped)
    assert "wide16.png: 16-bit image (values 0..64773) scaled to 8-bit by /257" in captured.err
    summary = captured.err.strip().splitlines()[-1]
    assert summary.startswith(f"segnext predict: error: {len(bad)} of {len(good) + len(bad)}")
    assert all(name in summary for name in bad)
    assert f"wrote {len(good)} masks" in captured.out


def test_every_pixel_format_converts_to_rgb_without_clipping(tmp_path):
    from pipelines.commands.predict import ImageReadError, read_image

    _messy_folder(tmp_path / "images")
    folder = tmp_path / "images"
    rgb = np.asarray(Image.open(folder / "rgb.png"))
    wide, note = read_image(folder / "wide16.png")
    ramp = np.asarray(Image.open(folder / "wide16.png")).astype(np.float64)
    assert wide.dtype == np.uint8 and wide.shape == (40, 60, 3) and "/257" in note
    assert np.abs(wide[..., 0] - ramp / 257).max() <= 0.5  # scaled, not clipped to 255
    assert len(np.unique(wide)) > 200
    assert (wide[..., 0] == wide[..., 2]).all()
    for name in ("rgba.png", "pal.png", "gray.png", "graya.png", "cmyk.jpg"):
        image, note = read_image(folder / name)
        assert image.dtype == np.uint8 and image.shape == (40, 60, 3) and note is None, name
    assert (read_image(folder / "rgba.png")[0] == rgb).all()  # alpha dropped, colours kept
    gray = np.asarray(Image.open(folder / "gray.png"))
    assert (read_image(folder / "graya.png")[0][..., 1] == gray).all()
    palette = np.asarray(Image.open(folder / "pal.png").convert("RGB"))
    assert (read_image(folder / "pal.png")[0] == palette).all()
    assert np.abs(read_image(folder / "cmyk.jpg")[0].astype(int) - rgb).mean() < 40
    with pytest.raises(ImageReadError, match="truncated.png: not a readable image"):
        read_image(folder / "truncated.png")


def test_large_images_get_a_note_and_a_progress_bar_goes_to_stderr(tmp_path, capsys):
    from pipelines.commands.predict import predict_files

    checkpoint = tiny_checkpoint(tmp_path / "ckpt", constant_class=0)  # training crop 64x64
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    _write_image(small, 64, 128, 0)
    _write_image(large, 140, 150, 1)  # 5.1 x the crop area: auto mode slides
    report = predict_files(checkpoint, [small, large], tmp_path / "out", threads=1)
    assert len(report.written) == 4 and not report.failed
    err = capsys.readouterr().err
    assert f"{large}: 150x140 px, 5x the 64x64 training crop area: sliding-window inference " \
           "over 12 windows, this may take a while" in err
    assert str(small) not in err
    predict_files(checkpoint, [small], tmp_path / "out2", threads=1, progress=True)
    assert "predict: 100%" in capsys.readouterr().err  # tqdm's bar, with its rate and ETA


# ------------------------------------------------------------------------------ threads


def test_threads_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    import os

    from pipelines.inference.threads import available_cpus, inference_threads

    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == affinity  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core: at least 1 thread
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: one core
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SEGNEXT_THREADS", raising=False)
    assert inference_threads() == available_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert inference_threads() == 3
    monkeypatch.setenv("SEGNEXT_THREADS", "2")
    assert inference_threads() == 2 and inference_threads(1) == 1
    monkeypatch.setenv("SEGNEXT_THREADS", "lots")
    with pytest.raises(ValueError, match="SEGNEXT_THREADS='lots': expected a whole number"):
        inference_threads()
