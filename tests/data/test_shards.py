"""Shard writer, manifest and verifier on real CamVid images."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.manifest import FORMAT, ManifestError, load_manifest
from data.shard_verify import verify
from data.shard_writer import write_shards
from data.sources import CamVid, Folder, SampleError, Synthetic
from data.sources.camvid import CAMVID_CLASSES
from data.storage import resolve_filesystem
from pipelines.cli import main

SMALL = (120, 90)  # CamVid images shrunk 4x keep the error-path tests fast


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_files(out: Path) -> list[str]:
    """Every file but the manifest and the index files it names (leftovers show up here)."""
    manifest = json.loads((out / "dataset.json").read_text()) if (out / "dataset.json").exists() else {}
    indexes = {info["index"]["path"] for info in manifest.get("splits", {}).values()
               if "index" in info}
    return sorted(p.name for p in out.iterdir() if p.name != "dataset.json" and p.name not in indexes)


def test_camvid_shards_match_the_source(camvid_shards, camvid_root, read_samples):
    manifest = load_manifest(camvid_shards)
    assert manifest.name == "camvid" and manifest.classes == CAMVID_CLASSES
    assert manifest.ignore_index == 255 and manifest.image_format == "jpg"
    assert manifest.num_samples("train") == 20 and manifest.num_samples("val") == 8
    assert [s["num_samples"] for s in manifest.splits["train"]["shards"]] == [8, 8, 4]
    assert manifest.shard_urls("val") == [str(camvid_shards / "val-000000.tar")]
    report = verify(camvid_shards)
    assert report.ok, report.problems
    assert (report.num_shards, report.num_samples) == (4, 28)

    for split in ("train", "val"):
        samples = read_samples(camvid_shards, split)
        counts = np.zeros(11, np.int64)
        for key, sample in samples.items():
            image_path = camvid_root / split / f"{key}.png"
            raw = np.asarray(Image.open(camvid_root / f"{split}annot" / f"{key}.png"))
            np.testing.assert_array_equal(sample["mask"], np.where(raw == 11, 255, raw))
            source = np.asarray(Image.open(image_path)).astype(np.int16)
            assert np.abs(sample["image"] - source).mean() < 3.0  # JPEG q95
            assert sample["json"] == {
                "source": str(image_path),
                "mask_source": str(camvid_root / f"{split}annot" / f"{key}.png"),
                "height": 360,
                "width": 480,
            }
            counts += np.bincount(raw.ravel(), minlength=12)[:11]
        assert manifest.class_pixel_counts[split] == counts.tolist()


def test_lossless_keeps_the_original_png(tmp_path, camvid_root, read_samples):
    write_shards(CamVid(camvid_root), tmp_path, splits=["val"], limit=2, image_format="png")
    assert load_manifest(tmp_path).image_format == "png"
    for key, sample in read_samples(tmp_path, "val").items():
        assert sample["image_bytes"] == (camvid_root / "val" / f"{key}.png").read_bytes()


def make_folder_dataset(root: Path, camvid_root: Path, problem: str | None) -> tuple[Folder, str]:
    """Three good shrunken CamVid pairs plus, with `problem`, one bad pair named `b_bad`
    (sorted between the good ones). Returns the source and the bad file's name."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    sources = sorted((camvid_root / "val").glob("*.png"))[:3]
    for stem, path in zip(("a_good", "c_good", "d_good"), sources, strict=True):
        Image.open(path).resize(SMALL).save(images / f"{stem}.png")
        Image.open(camvid_root / "valannot" / path.name).resize(SMALL, Image.NEAREST).save(
            masks / f"{stem}.png"
        )
    bad_name = "b_bad.png"
    good_image, good_mask = Image.open(images / "a_good.png"), Image.open(masks / "a_good.png")
    if problem == "undecodable":
        (images / bad_name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
        good_mask.save(masks / bad_name)
    elif problem == "missing_mask":
        good_image.save(images / bad_name)
    elif problem == "size_mismatch":
        good_image.save(images / bad_name)
        good_mask.crop((0, 0, 100, 90)).save(masks / bad_name)
    elif problem == "out_of_range":
        good_image.save(images / bad_name)
        ids = np.asarray(good_mask).copy()
        ids[10:20, 10:20] = 42
        Image.fromarray(ids).save(masks / bad_name)
    source = Folder(CAMVID_CLASSES, {"val": (images, masks)}, ignore_index=11)
    return source, bad_name


PROBLEMS = {
    "undecodable": "cannot decode image",
    "missing_mask": "does not exist",
    "size_mismatch": "mask is 100x90 but its image",
    "out_of_range": r"label ids \[42\]",
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_bad_sample_raises_and_leaves_nothing(tmp_path, camvid_root, problem):
    source, bad_name = make_folder_dataset(tmp_path / "data", camvid_root, problem)
    out = tmp_path / "out"
    with pytest.raises(SampleError, match=PROBLEMS[problem]) as caught:
        write_shards(source, out, shard_size=1)
    message = str(caught.value)
    assert bad_name in message and "Fix:" in message and "--on-error skip" in message
    assert list(out.iterdir()) == []  # a finished shard of a good sample did not survive either


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_bad_sample_is_skipped_and_listed(tmp_path, camvid_root, problem):
    source, bad_name = make_folder_dataset(tmp_path / "data", camvid_root, problem)
    summary = write_shards(source, tmp_path / "out", on_error="skip", shard_size=2)
    manifest = load_manifest(tmp_path / "out")
    assert manifest.num_samples("val") == 3
    [skipped] = manifest.splits["val"]["skipped"]
    assert skipped["source"].endswith(bad_name)
    assert bad_name in skipped["reason"]
    assert summary.skipped == [skipped] and "1 skipped" in summary.line()
    assert verify(tmp_path / "out").ok


def test_failed_rerun_keeps_the_previous_dataset(tmp_path, camvid_root):
    source, _ = make_folder_dataset(tmp_path / "data", camvid_root, None)
    out = tmp_path / "out"
    write_shards(source, out, shard_size=1)
    before = {name: file_sha(out / name) for name in shard_files(out)}
    manifest_before = (out / "dataset.json").read_text()

    make_folder_dataset(tmp_path / "data", camvid_root, "out_of_range")
    with pytest.raises(SampleError):
        write_shards(source, out, shard_size=1)
    assert {name: file_sha(out / name) for name in shard_files(out)} == before
    assert (out / "dataset.json").read_text() == manifest_before
    assert verify(out).ok


def test_rerun_is_byte_identical_and_removes_stale_shards(tmp_path):
    source = Synthetic(num_train=12, num_val=4, size=(48, 48), seed=3)
    out = tmp_path / "out"
    write_shards(source, out, shard_size=3)
    assert shard_files(out) == [f"train-{i:06d}.tar" for i in range(4)] + [
        "val-000000.tar",
        "val-000001.tar",
    ]
    first = {name: file_sha(out / name) for name in shard_files(out)}
    manifest = (out / "dataset.json").read_text()
    write_shards(source, out, shard_size=3)
    assert {name: file_sha(out / name) for name in shard_files(out)} == first
    assert (out / "dataset.json").read_text() == manifest

    write_shards(source, out, shard_size=8)  # fewer shards: the old extra ones must go
    listed = sorted(load_manifest(out).shard_urls(["train", "val"]))
    assert [str(out / name) for name in shard_files(out)] == listed and len(listed) == 3
    # the old manifest held the plain names for other bytes: the new shards carry their digest
    assert all(
        re.fullmatch(r"(train|val)-00000[01]-[0-9a-f]{12}\.tar", Path(n).name) for n in listed
    )
    assert verify(out).ok
    write_shards(source, out, shard_size=3)  # the plain names are free again
    assert {name: file_sha(out / name) for name in shard_files(out)} == first
    assert (out / "dataset.json").read_text() == manifest


def test_shard_bytes_sets_samples_per_shard(tmp_path):
    source = Synthetic(num_train=20, num_val=0, size=(64, 64), seed=1)
    write_shards(source, tmp_path, splits=["train"], shard_bytes=40_000)
    shards = load_manifest(tmp_path).splits["train"]["shards"]
    assert 2 <= len(shards) <= 10
    assert all(s["bytes"] < 80_000 for s in shards)


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_verify_detects_truncated_shard(tmp_path, camvid_shards):
    out = copy_shards(camvid_shards, tmp_path / "copy")
    path = out / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:100_000])
    report = verify(out)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "train-000001.tar: 100000 bytes, manifest says" in text
    assert "train-000001.tar: sha256" in text
    assert "train-000001.tar: unreadable tar" in text or "train-000001.tar: 1 samples" in text


def test_verify_detects_flipped_bytes_and_sha_mismatch(tmp_path, camvid_shards):
    out = copy_shards(camvid_shards, tmp_path / "copy")
    path = out / "val-000000.tar"
    data = bytearray(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        mask = next(m for m in tar if m.name.endswith(".mask.png"))
    start = mask.offset_data + 40  # inside the PNG's first data chunk: its CRC now fails
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    path.write_bytes(bytes(data))
    problems = "\n".join(verify(out).problems)
    assert "val-000000.tar: sha256" in problems
    assert f"val-000000.tar: {mask.name.split('.')[0]}: cannot decode" in problems

    # same corruption with a manifest that agrees with the file: decoding still catches it
    manifest = json.loads((out / "dataset.json").read_text())
    manifest["splits"]["val"]["shards"][0]["sha256"] = file_sha(path)
    (out / "dataset.json").write_text(json.dumps(manifest))
    [problem] = verify(out).problems
    assert "cannot decode" in problem

    # an intact file whose recorded checksum is wrong
    out2 = copy_shards(camvid_shards, tmp_path / "copy2")
    manifest = json.loads((out2 / "dataset.json").read_text())
    manifest["splits"]["train"]["shards"][2]["sha256"] = "0" * 64
    (out2 / "dataset.json").write_text(json.dumps(manifest))
    [problem] = verify(out2).problems
    assert problem.startswith("train-000002.tar: sha256")


def test_verify_stops_after_max_problems(tmp_path, camvid_shards):
    out = copy_shards(camvid_shards, tmp_path / "copy")
    manifest = json.loads((out / "dataset.json").read_text())
    for shard in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        shard["sha256"] = "0" * 64
    (out / "dataset.json").write_text(json.dumps(manifest))
    report = verify(out, max_problems=2)
    assert len(report.problems) == 2 and report.stopped_early
    assert "stopped at the limit" in report.line()


def test_load_manifest_errors_and_uris(tmp_path, camvid_shards, monkeypatch):
    with pytest.raises(ManifestError, match="dataset.json: not found. Fix: build shards"):
        load_manifest(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ManifestError, match=f"expected '{FORMAT}'"):
        load_manifest(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": FORMAT, "name": "x"}))
    with pytest.raises(ManifestError, match="malformed manifest"):
        load_manifest(tmp_path)

    uri = camvid_shards.as_uri()
    manifest = load_manifest(uri)
    assert manifest.shard_urls("train")[0] == f"{uri}/train-000000.tar"
    with pytest.raises(ManifestError, match="no split 'test'"):
        manifest.shard_urls("test")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    filesystem, path = resolve_filesystem("s3://bucket/shards/camvid/")
    assert (filesystem.type_name, filesystem.region, path) == (
        "s3",
        "eu-west-1",
        "bucket/shards/camvid",
    )


def test_cli_writes_in_parallel_and_verifies(tmp_path, camvid_root, capsys):
    out = tmp_path / "cli"
    args = [
        "shards",
        "camvid",
        "--root",
        str(camvid_root),
        "--out",
        str(out),
        "--splits",
        "train,val",
    ]
    code = main([*args, "--limit", "8", "--shard-size", "4", "--workers", "2"])
    assert code == 0
    assert "16 samples, 4 shards" in capsys.readouterr().out
    # two worker processes write the same bytes as one in-process writer
    reference = tmp_path / "reference"
    write_shards(CamVid(camvid_root), reference, splits=["train", "val"], limit=8, shard_size=4)
    assert {n: file_sha(out / n) for n in shard_files(out)} == {
        n: file_sha(reference / n) for n in shard_files(reference)
    }
    assert main(["shards", "verify", str(out)]) == 0
    assert "OK: 16 samples in 4 shards" in capsys.readouterr().out


def test_cli_reports_bad_input_and_fails(tmp_path, camvid_root, capsys):
    source, bad_name = make_folder_dataset(tmp_path / "data", camvid_root, "missing_mask")
    (tmp_path / "classes.txt").write_text("\n".join(CAMVID_CLASSES))
    images, masks = source.folders("val")
    args = ["shards", "folder", "--images", str(images), "--masks", str(masks), "--split", "val"]
    args += ["--classes", str(tmp_path / "classes.txt"), "--ignore-index", "11", "--out"]
    assert main([*args, str(tmp_path / "out")]) == 1
    assert bad_name in capsys.readouterr().err
    assert main([*args, str(tmp_path / "out2"), "--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert "3 samples, 1 shards" in captured.out and "1 skipped" in captured.out
    assert f"skipped: {images / bad_name}" in captured.err
    assert main(["shards", "verify", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err
