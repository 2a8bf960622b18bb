"""A user's own folder dataset (ROOT/<split>/{images,masks}) into shards: several splits per
folder, runs that keep what they do not write, refusals, binary masks, and runs that are killed.

Datasets are tiny and made here with PIL; the kill tests run `segnext shards` in a subprocess.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.manifest import ManifestError, load_manifest
from data.shard_verify import verify
from data.shard_writer import write_shards
from data.sources import DataError, Folder, SampleError, SourceError, Synthetic
from data.sources.folder import discover_splits
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("background", "polyp", "tool")
SPLIT_SIZES = {"train": (5, (40, 56)), "val": (3, (32, 48)), "test": (2, (36, 44))}  # n, (h, w)


def make_split(root: Path, split: str, count: int, size: tuple[int, int], seed: int) -> dict:
    """`count` images + 3-class masks under root/split/{images,masks}; {stem: mask}."""
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    masks = {}
    for i in range(count):
        stem = f"{split}_{i:03d}"
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        mask = rng.integers(0, len(CLASSES), size, dtype=np.uint8)
        Image.fromarray(image).save(root / split / "images" / f"{stem}.jpg", quality=90)
        Image.fromarray(mask).save(root / split / "masks" / f"{stem}.png")
        masks[stem] = mask
    return masks


def make_dataset(root: Path, seed: int = 0) -> dict[str, dict]:
    """train/val/test sub-folders of different image sizes; {split: {stem: mask}}."""
    return {
        split: make_split(root, split, count, size, seed + i)
        for i, (split, (count, size)) in enumerate(SPLIT_SIZES.items())
    }


def write_classes(path: Path, names=CLASSES) -> Path:
    path.write_text("\n".join(names) + "\n")
    return path


def shard_shas(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.name != "dataset.json"
    }


def listed(out: Path) -> set[str]:
    """The files the manifest names: shards and each split's index."""
    manifest = load_manifest(out)
    return ({shard["path"] for info in manifest.splits.values() for shard in info["shards"]}
            | {info["index"]["path"] for info in manifest.splits.values() if "index" in info})


def assert_complete(out: Path) -> None:
    """What the manifest lists is on disk, intact, and nothing else is there."""
    report = verify(out)
    assert report.ok, report.problems
    assert set(shard_shas(out)) == listed(out)


def folder_args(out: Path, classes: Path, *extra: str) -> list[str]:
    return ["shards", "folder", "--classes", str(classes), "--out", str(out), *extra]


# ----------------------------------------------------------------------------- splits


def test_three_splits_in_one_run_and_in_three_runs(tmp_path, read_samples, capsys):
    expected = make_dataset(tmp_path / "data")
    classes = write_classes(tmp_path / "classes.txt")
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(folder_args(one, classes, "--root", str(tmp_path / "data"))) == 0
    assert "[train, val, test]" in capsys.readouterr().out
    for split in ("train", "val", "test"):
        folders = f"{tmp_path / 'data' / split / 'images'}:{tmp_path / 'data' / split / 'masks'}"
        assert main(folder_args(three, classes, "--split", f"{split}={folders}")) == 0
    assert "kept splits: train, val" in capsys.readouterr().out

    for out in (one, three):
        manifest = load_manifest(out)
        assert sorted(manifest.splits) == ["test", "train", "val"]
        assert_complete(out)
        for split, masks in expected.items():
            samples = read_samples(out, split)
            assert sorted(samples) == sorted(masks)
            for stem, mask in masks.items():
                np.testing.assert_array_equal(samples[stem]["mask"], mask, err_msg=stem)
            assert manifest.min_image_size(split) == SPLIT_SIZES[split][1]
            assert manifest.max_image_size(split) == SPLIT_SIZES[split][1]
        assert manifest.min_image_size(["train", "val"]) == (32, 48)
        assert manifest.num_samples(["train", "val"]) == 8
    assert shard_shas(one) == shard_shas(three)  # same bytes whichever way they were written


def test_rewriting_a_split_keeps_the_others(tmp_path):
    make_dataset(tmp_path / "data")
    source = Folder(CLASSES, discover_splits(tmp_path / "data"))
    out = tmp_path / "out"
    write_shards(source, out, shard_size=2)
    before = shard_shas(out)
    kept = {n: sha for n, sha in before.items() if not n.startswith("val")}

    (tmp_path / "data" / "val" / "images" / "val_000.jpg").unlink()
    summary = write_shards(source, out, splits=["val"], shard_size=2)
    assert summary.written == ("val",) and summary.kept == ("train", "test")
    after = shard_shas(out)
    assert {n: sha for n, sha in after.items() if not n.startswith("val")} == kept
    assert load_manifest(out).num_samples("val") == 2
    assert_complete(out)


def test_a_different_dataset_is_refused_unless_overwrite(tmp_path, capsys):
    make_dataset(tmp_path / "data")
    classes = write_classes(tmp_path / "classes.txt")
    out = tmp_path / "out"
    assert main(folder_args(out, classes, "--root", str(tmp_path / "data"))) == 0
    before, manifest_before = shard_shas(out), (out / "dataset.json").read_bytes()

    other = ["shards", "synthetic", "--num-train", "4", "--num-val", "2", "--size", "32", "32"]
    capsys.readouterr()
    assert main([*other, "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "already holds dataset 'folder'" in error and "'synthetic'" in error
    assert "[background, polyp, tool] (3)" in error and "--out" in error
    assert "--overwrite" in error
    lossless = folder_args(out, classes, "--root", str(tmp_path / "data"), "--lossless")
    assert main(lossless) == 1
    assert "images stored as jpg vs png" in capsys.readouterr().err
    assert shard_shas(out) == before and (out / "dataset.json").read_bytes() == manifest_before

    capsys.readouterr()
    assert main([*other, "--out", str(out), "--overwrite"]) == 0
    manifest = load_manifest(out)
    assert manifest.name == "synthetic" and sorted(manifest.splits) == ["train", "val"]
    assert_complete(out)  # the folder dataset's shards are gone, test split included
    assert "removed the previous dataset's splits: train, val, test" in capsys.readouterr().out


def test_overwrite_of_one_split_of_the_same_dataset_keeps_the_others(tmp_path, capsys):
    """`--split val=... --overwrite` on the folder's own dataset rewrites val only."""
    make_dataset(tmp_path / "data")
    classes = write_classes(tmp_path / "classes.txt")
    out = tmp_path / "out"
    assert main(folder_args(out, classes, "--root", str(tmp_path / "data"))) == 0
    kept = {n: sha for n, sha in shard_shas(out).items() if not n.startswith("val")}
    val = tmp_path / "data" / "val"
    capsys.readouterr()
    rewrite = folder_args(out, classes, "--split", f"val={val / 'images'}:{val / 'masks'}",
                          "--overwrite")
    assert main(rewrite) == 0
    line = capsys.readouterr().out
    assert "[val]" in line and "kept splits: train, test" in line and "removed" not in line
    assert {n: sha for n, sha in shard_shas(out).items() if not n.startswith("val")} == kept
    assert set(load_manifest(out).splits) == {"train", "val", "test"}
    assert_complete(out)


def test_unreadable_manifest_is_not_replaced_silently(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset.json").write_text("{broken")
    source = Synthetic(num_train=2, num_val=1, size=(32, 32))
    with pytest.raises(ManifestError, match="cannot be read.*Fix: pass --overwrite"):
        write_shards(source, out)
    write_shards(source, out, overwrite=True)
    assert_complete(out)


def test_old_manifest_without_image_sizes_still_loads(tmp_path):
    out = tmp_path / "out"
    write_shards(Synthetic(num_train=2, num_val=1, size=(32, 40)), out)
    assert load_manifest(out).min_image_size("train") == (32, 40)
    data = json.loads((out / "dataset.json").read_text())
    for info in data["splits"].values():
        del info["image_size"]
    (out / "dataset.json").write_text(json.dumps(data))
    manifest = load_manifest(out)
    assert manifest.min_image_size("train") is None and manifest.num_samples("train") == 2
    assert verify(out).ok
    write_shards(Synthetic(num_train=2, num_val=1, size=(32, 40)), out, splits=["val"])
    manifest = load_manifest(out)
    assert manifest.min_image_size("val") == (32, 40)
    assert manifest.min_image_size("train") is None  # kept as it was
    assert manifest.min_image_size(["train", "val"]) is None


def test_a_failure_while_renaming_keeps_the_previous_dataset(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_shards(Synthetic(num_train=6, num_val=2, size=(32, 32), seed=1), out, shard_size=2)
    before, manifest_before = shard_shas(out), (out / "dataset.json").read_bytes()
    calls = []
    real_replace = os.replace

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr("data.shard_writer.os.replace", failing_replace)
    changed = Synthetic(num_train=6, num_val=2, size=(32, 32), seed=2)
    with pytest.raises(OSError, match="simulated"):
        write_shards(changed, out, shard_size=2)
    monkeypatch.undo()
    assert (out / "dataset.json").read_bytes() == manifest_before
    assert {n: s for n, s in shard_shas(out).items() if n in before} == before
    assert verify(out).ok  # one orphan shard may be left; readers do not see it
    write_shards(changed, out, shard_size=2)
    assert_complete(out)  # the orphan is cleaned up by the next run of its split


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    descriptor = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another `segnext shards` run is writing"):
            write_shards(Synthetic(num_train=1, num_val=1, size=(32, 32)), out)
    finally:
        os.close(descriptor)


def test_split_layout_errors(tmp_path, capsys):
    classes = write_classes(tmp_path / "classes.txt")
    (tmp_path / "flat" / "images").mkdir(parents=True)
    (tmp_path / "flat" / "masks").mkdir()
    with pytest.raises(SourceError, match="not split sub-folders. Fix: pass --split train="):
        discover_splits(tmp_path / "flat")
    (tmp_path / "half" / "train" / "images").mkdir(parents=True)
    with pytest.raises(SourceError, match="has images/ but no masks/"):
        discover_splits(tmp_path / "half")
    out = str(tmp_path / "out")
    for args, message in [
        (["--split", "val=only_images"], "expected NAME=IMAGES:MASKS"),
        (["--split", "val"], "a bare split name"),
        (["--images", "x"], "--images and --masks go together"),
        ([], "no images given"),
        (["--root", str(tmp_path / "flat"), "--split", "x=a:b"], "not split sub-folders"),
    ]:
        assert main(["shards", "folder", "--classes", str(classes), "--out", out, *args]) == 1
        assert message in capsys.readouterr().err, args


@pytest.mark.parametrize(("args", "message"), [
    (["--ignore-index", "300"], "--ignore-index 300 is outside 0..255"),
    (["--ignore-index", "-1"], "--ignore-index -1 is outside 0..255"),
    (["--limit", "-1"], "--limit -1 (use 1 or more samples per split)"),
    (["--limit", "0"], "--limit 0 (use 1 or more samples per split)"),
])
def test_option_ranges_are_checked_before_any_work(tmp_path, capsys, args, message):
    """A value no dataset can use stops `segnext shards` before --out is touched (`--limit -1`
    dropped each split's last sample, `--ignore-index 300` failed mid-write; issue 29, 7)."""
    make_split(tmp_path / "data", "train", 2, (32, 32), 0)
    classes = write_classes(tmp_path / "classes.txt")
    out = tmp_path / "out"
    assert main(folder_args(out, classes, "--root", str(tmp_path / "data"), *args)) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("count", ["0", "-1"])
def test_verify_needs_room_for_one_problem(tmp_path, capsys, count):
    """`--max-problems 0` stopped before reading a shard and reported the dataset OK."""
    assert main(["shards", "verify", str(tmp_path), "--max-problems", count]) == 1
    assert f"--max-problems {count}: use 1 or more" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


def binary_mask(size: tuple[int, int], seed: int) -> np.ndarray:
    """0/1 blocks of 16 px offset by 6 px from JPEG's 8x8 grid: edges inside JPEG blocks give
    compression noise (measured: 25-46 distinct values at quality 75-90, none across 127)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 2, (size[0] // 16 + 2, size[1] // 16 + 2), dtype=np.uint8)
    return np.kron(blocks, np.ones((16, 16), np.uint8))[6 : 6 + size[0], 6 : 6 + size[1]]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_mask_threshold_on_jpeg_masks(tmp_path, read_samples, capsys, mode):
    expected = {}
    for i in range(3):
        stem, mask = f"k{i}", binary_mask((48, 64), i)
        save_dir = tmp_path / "data" / "train"
        (save_dir / "images").mkdir(parents=True, exist_ok=True)
        (save_dir / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(
            save_dir / "images" / f"{stem}.jpg"
        )
        Image.fromarray(mask * 255).convert(mode).save(
            save_dir / "masks" / f"{stem}.jpg", quality=75
        )
        expected[stem] = mask
    stored = np.asarray(Image.open(tmp_path / "data/train/masks/k0.jpg").convert("L"))
    assert len(np.unique(stored)) > 2  # the JPEG really is noisy
    classes = write_classes(tmp_path / "classes.txt", ("background", "polyp"))
    args = folder_args(tmp_path / "out", classes, "--root", str(tmp_path / "data"))
    assert main(args) == 1
    error = capsys.readouterr().err
    problem = "mask holds values" if mode == "L" else "mask has image mode RGB"
    assert f"k0.jpg: {problem}" in error and "--mask-threshold 127" in error
    assert main([*args, "--mask-threshold", "127"]) == 0
    samples = read_samples(tmp_path / "out", "train")
    for stem, mask in expected.items():
        np.testing.assert_array_equal(samples[stem]["mask"], mask, err_msg=stem)


def test_binary_png_0_255_needs_a_threshold_or_an_ignore_index(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.new("RGB", (16, 16)).save(images / "a.png")
    Image.fromarray(binary_mask((16, 16), 0) * 255).save(masks / "a.png")
    layout = {"train": (images, masks)}
    sample = Folder(("bg", "fg"), layout).samples("train")[0]
    with pytest.raises(SampleError, match=r"values \[255\].*--mask-threshold 127"):
        Folder(("bg", "fg"), layout).load(sample)
    ignored = Folder(("bg", "fg"), layout, ignore_index=255).load(sample).mask
    assert set(np.unique(ignored)) <= {0, 255}
    thresholded = Folder(("bg", "fg"), layout, mask_threshold=127).load(sample).mask
    np.testing.assert_array_equal(thresholded, binary_mask((16, 16), 0))
    with pytest.raises(SourceError, match="has 3 classes"):
        Folder(("a", "b", "c"), layout, mask_threshold=127)
    with pytest.raises(SourceError, match="outside 0..254"):
        Folder(("a", "b"), layout, mask_threshold=255)


def test_empty_folders_and_all_skipped_are_errors(tmp_path, capsys):
    classes = write_classes(tmp_path / "classes.txt")
    (tmp_path / "data" / "train" / "images").mkdir(parents=True)
    (tmp_path / "data" / "train" / "masks").mkdir()
    args = folder_args(tmp_path / "out", classes, "--root", str(tmp_path / "data"))
    assert main(args) == 1
    assert "split 'train': no samples in" in capsys.readouterr().err
    assert main([*args, "--allow-empty"]) == 0
    assert load_manifest(tmp_path / "out").num_samples("train") == 0

    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "train" / "images" / "a.png")  # no mask
    out2 = tmp_path / "out2"
    assert main([*folder_args(out2, classes, "--root", str(tmp_path / "data")), "--on-error",
                 "skip"]) == 1  # fmt: skip
    error = capsys.readouterr().err
    assert "all 1 samples were skipped" in error and "a.png: its mask" in error
    assert not out2.exists() or list(out2.iterdir()) == []


def test_folders_and_link_loops_named_like_images_are_bad_samples(tmp_path, capsys):
    """A folder `x.png` or a symbolic-link loop among the images (or masks) stops the writer
    with the path and the fix, or is skipped and counted with --on-error skip."""
    make_dataset(tmp_path / "data")
    images = tmp_path / "data" / "train" / "images"
    masks = tmp_path / "data" / "train" / "masks"
    (images / "zz_folder.png").mkdir()
    (images / "zz_loop.png").symlink_to("zz_loop.png")
    mask_folder = masks / sorted(masks.iterdir())[0].name  # the first image's mask: a folder
    mask_folder.unlink()
    mask_folder.mkdir()
    classes = write_classes(tmp_path / "classes.txt")
    args = folder_args(tmp_path / "out", classes, "--root", str(tmp_path / "data"))
    assert main(args) == 1
    error = capsys.readouterr().err
    assert f"{mask_folder}: is a folder, not a file. Fix: move or rename it" in error
    assert "Errno" not in error

    assert main([*args, "--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert "3 skipped" in captured.out
    for line in (
        f"skipped: {images / 'zz_folder.png'}: is a folder, not a file. Fix: move or rename it",
        f"skipped: {images / 'zz_loop.png'}: is a symbolic link loop. Fix: point the link at a "
        "file, or remove it",
        f"skipped: {mask_folder}: is a folder, not a file",
    ):
        assert line in captured.err
    manifest = load_manifest(tmp_path / "out")
    assert len(manifest.splits["train"]["skipped"]) == 3 and manifest.num_samples("train") == 4


def test_duplicate_class_names_are_refused(tmp_path, capsys):
    make_dataset(tmp_path / "data")
    classes = write_classes(tmp_path / "classes.txt", ("background", "polyp", "background"))
    assert main(folder_args(tmp_path / "out", classes, "--root", str(tmp_path / "data"))) == 1
    error = capsys.readouterr().err
    assert "classes.txt: class names ['background'] appear more than once" in error
    with pytest.raises(SourceError, match="appear more than once"):
        Folder(("a", "a"), {"train": (tmp_path, tmp_path)})


# ----------------------------------------------------------------------------- killed runs


def make_slow_dataset(root: Path, count: int = 32, side: int = 320) -> Path:
    """Noise JPEGs that --lossless re-encodes as PNG (slow: tens of ms each)."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            root / "images" / f"s{i:03d}.jpg", quality=90
        )
        Image.fromarray(np.zeros((side, side), np.uint8)).save(root / "masks" / f"s{i:03d}.png")
    return root


def start_writer(out: Path, data: Path, classes: Path, workers: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipelines.cli", *folder_args(out, classes)]
    command += ["--split", f"train={data / 'images'}:{data / 'masks'}", "--lossless"]
    command += ["--shard-size", "2", "--workers", str(workers)]
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def wait_for_partials(out: Path, process: subprocess.Popen, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len([p for p in out.iterdir() if p.name.endswith(".partial")]) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"writer ended early: {process.communicate()}")
        time.sleep(0.01)
    pytest.fail("no .partial shard appeared within 60 s")


def children(pid: int) -> set[int]:
    """Live (non-zombie) child processes of `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def previous_dataset(tmp_path) -> tuple[Path, Path, Path, dict[str, str], bytes]:
    """A folder dataset already in `out` (train + val) and a slow one to write over its train."""
    make_dataset(tmp_path / "data")
    classes = write_classes(tmp_path / "classes.txt")
    out = tmp_path / "out"
    source = Folder(CLASSES, discover_splits(tmp_path / "data"))
    write_shards(source, out, shard_size=2, image_format="png")  # as the writer's --lossless
    slow = make_slow_dataset(tmp_path / "slow")
    return out, slow, classes, shard_shas(out), (out / "dataset.json").read_bytes()


def test_sigkill_mid_write_keeps_the_previous_dataset(previous_dataset):
    out, slow, classes, before, manifest_before = previous_dataset
    process = start_writer(out, slow, classes, workers=1)
    wait_for_partials(out, process, count=2)  # one shard written, the next one being written
    process.kill()
    process.communicate(timeout=30)
    assert (out / "dataset.json").read_bytes() == manifest_before
    assert {n: s for n, s in shard_shas(out).items() if not n.endswith(".partial")} == before
    assert verify(out).ok

    process = start_writer(out, slow, classes, workers=1)  # the next run completes and cleans
    assert process.wait(timeout=120) == 0, process.communicate()
    assert_complete(out)
    assert sorted(load_manifest(out).splits) == ["test", "train", "val"]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "SIGINT"])
def test_workers_end_with_the_parent(previous_dataset, how):
    out, slow, classes, before, manifest_before = previous_dataset
    process = start_writer(out, slow, classes, workers=2)
    wait_for_partials(out, process, count=2)
    workers = children(process.pid)
    assert len(workers) >= 2  # two writers (and multiprocessing's resource tracker)
    if how == "SIGINT":  # Ctrl-C in a terminal: the whole foreground process group
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=30)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)], "writer processes outlived the parent"
    while any(p.name.endswith(".partial") for p in out.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]
    assert (out / "dataset.json").read_bytes() == manifest_before
    assert shard_shas(out) == before
    if how != "SIGKILL":
        text = stderr.decode()
        assert process.returncode == 128 + getattr(signal, how)
        assert "Traceback" not in text and text.count("interrupted: nothing written") == 1


def test_masks_without_an_image_are_counted_and_listed(tmp_path, capsys):
    make_dataset(tmp_path / "data")
    masks = tmp_path / "data" / "train" / "masks"
    orphan = masks / "orphan_000.png"
    shutil.copy(sorted(masks.iterdir())[0], orphan)
    classes = write_classes(tmp_path / "classes.txt")
    out = tmp_path / "out"
    assert main(folder_args(out, classes, "--root", str(tmp_path / "data"))) == 0
    captured = capsys.readouterr()
    assert "1 skipped" in captured.out
    assert f"skipped: {orphan}: mask without an image" in captured.err
    assert load_manifest(out).splits["train"]["skipped"][0]["source"] == str(orphan)
