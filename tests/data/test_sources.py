"""Each dataset layout, built from real CamVid pixels, read back through shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.manifest import load_manifest
from data.shard_verify import verify
from data.shard_writer import write_shards
from data.sources import ADE20K, VOC, CamVid, Cityscapes, Folder, SampleError, SourceError
from data.sources.base import bit_palette
from data.sources.camvid import CAMVID_CLASSES
from data.sources.cityscapes import CITYSCAPES_CLASSES

UNLABELLED = 11


def camvid_pairs(root: Path, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The first `count` CamVid train samples as (stem, RGB array, raw id mask)."""
    images = sorted((root / "train").glob("*.png"))[:count]
    return [
        (p.stem, np.asarray(Image.open(p)), np.asarray(Image.open(root / "trainannot" / p.name)))
        for p in images
    ]


def expected_mask(raw: np.ndarray) -> np.ndarray:
    """CamVid ids in training form: 0..10 kept, Unlabelled -> 255."""
    return np.where(raw == UNLABELLED, 255, raw).astype(np.uint8)


def save(array: np.ndarray, path: Path, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **params)
    return path


def assert_masks_round_trip(out: Path, split: str, expected: dict[str, np.ndarray], read_samples):
    samples = read_samples(out, split)
    assert sorted(samples) == sorted(expected)
    for key, mask in expected.items():
        np.testing.assert_array_equal(samples[key]["mask"], mask, err_msg=key)
        assert samples[key]["image"].shape == (*mask.shape, 3)


def test_camvid_source_lists_splits_and_maps_unlabelled(camvid_root):
    source = CamVid(camvid_root)
    assert source.default_splits == ("train", "val", "test")
    assert [len(source.samples(s)) for s in source.default_splits] == [367, 101, 233]
    assert source.classes[0] == "Sky" and source.classes[-1] == "Bicyclist"
    assert len(source.classes) == len(source.palette) == 11
    sample = source.samples("train")[0]
    loaded = source.load(sample)
    raw = np.asarray(Image.open(sample.mask))
    assert UNLABELLED in raw
    np.testing.assert_array_equal(loaded.mask, expected_mask(raw))
    assert loaded.rgb_png == Path(sample.image).read_bytes()  # RGB PNG kept for --lossless


def test_camvid_bad_root_and_split_name_the_fix(tmp_path, camvid_root):
    with pytest.raises(SourceError, match="no train/ folder"):
        CamVid(tmp_path)
    with pytest.raises(SourceError, match="no split 'training'.*train, val, test"):
        CamVid(camvid_root).samples("training")


def test_ade20k_tree_reduces_zero_label(tmp_path, camvid_root, read_samples):
    root = tmp_path / "ADEChallengeData2016"
    expected = {"train": {}, "val": {}}
    for i, (_, image, raw) in enumerate(camvid_pairs(camvid_root, 3)):
        split, folder = ("train", "training") if i < 2 else ("val", "validation")
        stem = f"ADE_{folder[:5]}_{i:08d}"
        ade_ids = np.where(raw == UNLABELLED, 0, raw + 1).astype(np.uint8)  # 0 = "other"
        save(image, root / "images" / folder / f"{stem}.jpg", quality=95)
        save(ade_ids, root / "annotations" / folder / f"{stem}.png")
        expected[split][stem] = expected_mask(raw)
    source = ADE20K(root)
    assert len(source.classes) == len(set(source.classes)) == 150
    assert source.classes[:3] == ("wall", "building", "sky")
    assert source.default_splits == ("train", "val")

    write_shards(source, tmp_path / "out")
    assert verify(tmp_path / "out").ok
    for split, masks in expected.items():
        assert_masks_round_trip(tmp_path / "out", split, masks, read_samples)


def test_cityscapes_tree_maps_label_ids_to_train_ids(tmp_path, camvid_root, read_samples):
    label_ids = np.array([label_id for _, label_id, _ in CITYSCAPES_CLASSES], np.uint8)
    expected = {"train": {}, "val": {}}
    for i, (_, image, raw) in enumerate(camvid_pairs(camvid_root, 3)):
        split, city = ("train", "aachen") if i < 2 else ("val", "lindau")
        base = f"{city}_{i:06d}_000019"
        ids = np.where(raw == UNLABELLED, 0, label_ids[np.minimum(raw, 10)]).astype(np.uint8)
        ids[:8] = 4  # "static": a label id that is not one of the 19 classes
        save(image, tmp_path / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png")
        save(ids, tmp_path / "gtFine" / split / city / f"{base}_gtFine_labelIds.png")
        want = expected_mask(raw)
        want[:8] = 255
        expected[split][base] = want
    source = Cityscapes(tmp_path)
    assert len(source.classes) == len(source.palette) == 19
    assert source.palette[0] == (128, 64, 128)

    write_shards(source, tmp_path / "out", image_format="png")
    assert verify(tmp_path / "out").ok
    for split, masks in expected.items():
        assert_masks_round_trip(tmp_path / "out", split, masks, read_samples)


def test_voc_tree_reads_palette_indices(tmp_path, camvid_root, read_samples):
    root = tmp_path / "VOC2012"
    palette = [v for colour in bit_palette(256) for v in colour]
    expected, lists = {"train": {}, "val": {}}, {"train": [], "val": []}
    for i, (_, image, raw) in enumerate(camvid_pairs(camvid_root, 3)):
        split, voc_id = ("train" if i < 2 else "val"), f"2007_{i:06d}"
        ids = np.where(raw == UNLABELLED, 255, raw).astype(np.uint8)  # 255 = VOC border
        mask = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
        mask.putpalette(palette)
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        mask.save(root / "SegmentationClass" / f"{voc_id}.png")
        save(image, root / "JPEGImages" / f"{voc_id}.jpg", quality=95)
        lists[split].append(voc_id)
        expected[split][voc_id] = expected_mask(raw)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, ids in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    assert Image.open(root / "SegmentationClass" / "2007_000000.png").mode == "P"
    source = VOC(root)
    assert len(source.classes) == 21 and source.palette[1] == (128, 0, 0)

    write_shards(source, tmp_path / "out")
    assert verify(tmp_path / "out").ok
    for split, masks in expected.items():
        assert_masks_round_trip(tmp_path / "out", split, masks, read_samples)


def test_folder_source_ignore_index_and_label_map(tmp_path, camvid_root, read_samples):
    expected = {}
    for stem, image, raw in camvid_pairs(camvid_root, 2):
        save(image, tmp_path / "images" / f"{stem}.jpg", quality=95)
        save(raw, tmp_path / "masks" / f"{stem}.png")
        want = expected_mask(raw)
        want[want == 10] = 9  # label map below merges Bicyclist into Pedestrian
        expected[stem] = want
    (tmp_path / "classes.txt").write_text("# CamVid\n" + "\n".join(CAMVID_CLASSES) + "\n")
    (tmp_path / "map.json").write_text(json.dumps({"10": 9}))
    source = Folder.from_files(
        tmp_path / "classes.txt",
        {"val": (tmp_path / "images", tmp_path / "masks")},
        ignore_index=UNLABELLED,
        label_map_file=tmp_path / "map.json",
    )
    assert len(source.classes) == 11 and source.default_splits == ("val",)

    write_shards(source, tmp_path / "out")
    assert load_manifest(tmp_path / "out").num_samples("val") == 2
    assert_masks_round_trip(tmp_path / "out", "val", expected, read_samples)


def test_folder_source_argument_errors(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    (tmp_path / "map.json").write_text("[1, 2]")
    with pytest.raises(SourceError, match="map.json: not a label map"):
        Folder.from_files(
            tmp_path / "classes.txt",
            {"train": (tmp_path, tmp_path)},
            label_map_file=tmp_path / "map.json",
        )
    with pytest.raises(SourceError, match="label map entry 3 -> 7"):
        Folder(("a", "b"), {"train": (tmp_path, tmp_path)}, label_map={3: 7})
    with pytest.raises(SourceError, match="nope.txt: cannot read the class list"):
        Folder.from_files(tmp_path / "nope.txt", {"train": (tmp_path, tmp_path)})
    (tmp_path / "masks").mkdir()
    for name in ("x.png", "x.bmp"):
        Image.new("L", (4, 4)).save(tmp_path / "masks" / name)
    folder = Folder(("a", "b"), {"train": (tmp_path, tmp_path / "masks")})
    with pytest.raises(SourceError, match="two masks for stem 'x'"):
        folder.samples("train")


def test_colour_mask_is_rejected_with_the_fix(tmp_path, camvid_root):
    stem, image, raw = camvid_pairs(camvid_root, 1)[0]
    save(image, tmp_path / "images" / f"{stem}.png")
    save(np.stack([raw] * 3, axis=-1), tmp_path / "masks" / f"{stem}.png")
    source = Folder(tuple("abcdefghijkl"), {"train": (tmp_path / "images", tmp_path / "masks")})
    with pytest.raises(SampleError, match=rf"{stem}.png: mask has image mode RGB.*convert"):
        source.load(source.samples("train")[0])
