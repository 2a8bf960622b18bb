"""The synthetic source: reproducible, learnable, and with its confusing pairs as designed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data.manifest import load_manifest
from data.shard_verify import verify
from data.sources import SourceError, Synthetic


@pytest.fixture(scope="module")
def scenes() -> tuple[Synthetic, list[tuple[np.ndarray, np.ndarray]]]:
    source = Synthetic(num_train=48, size=(64, 64), seed=0, num_classes=8)
    return source, [source.render("train", i) for i in range(48)]


def class_pixels(scenes, class_id: int) -> np.ndarray:
    """(N, 3) colours of every pixel of a class over all scenes."""
    return np.concatenate([image[mask == class_id] for image, mask in scenes]).astype(np.float64)


def interior_luma_std(scenes, class_id: int) -> float:
    """Brightness spread inside a class's regions (edge pixels left out: JPEG rings there)."""
    values = []
    for image, mask in scenes:
        region = mask == class_id
        inside = region.copy()
        inside[1:] &= region[:-1]
        inside[:-1] &= region[1:]
        inside[:, 1:] &= region[:, :-1]
        inside[:, :-1] &= region[:, 1:]
        values.append(image[inside].astype(np.float64) @ [0.299, 0.587, 0.114])
    return float(np.concatenate(values).std())


def test_render_is_deterministic_by_seed():
    a, b = Synthetic(seed=5), Synthetic(seed=5)
    for split, index in (("train", 0), ("train", 7), ("val", 0)):
        image_a, mask_a = a.render(split, index)
        image_b, mask_b = b.render(split, index)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)
        assert image_a.shape == (128, 128, 3) and image_a.dtype == np.uint8
    assert not np.array_equal(a.render("train", 0)[0], Synthetic(seed=6).render("train", 0)[0])
    assert not np.array_equal(a.render("train", 0)[0], a.render("val", 0)[0])
    assert not np.array_equal(a.render("train", 0)[0], a.render("train", 1)[0])


@pytest.mark.parametrize("num_classes", [6, 7, 8])
def test_class_lists(num_classes):
    source = Synthetic(num_classes=num_classes)
    assert len(source.classes) == len(source.palette) == num_classes
    assert source.classes[:5] == (
        "background",
        "disc_red",
        "disc_orange",
        "box_plain",
        "box_dotted",
    )
    assert source.confusing_pairs == ((1, 2), (3, 4))


def test_bad_arguments_name_the_fix():
    with pytest.raises(SourceError, match="--num-classes 5 is not supported. Fix: pick 6..8"):
        Synthetic(num_classes=5)
    with pytest.raises(SourceError, match="must be >= "):
        Synthetic(size=(16, 16))


def test_every_class_appears_and_is_sizeable(scenes):
    source, rendered = scenes
    counts = sum(np.bincount(mask.ravel(), minlength=8) for _, mask in rendered)
    assert (counts > 0).all()
    assert counts[1:].min() > 0.01 * counts.sum()  # no class too rare to learn


def test_confusing_pairs_differ_by_a_small_consistent_cue(scenes):
    _, rendered = scenes
    red, orange = class_pixels(rendered, 1), class_pixels(rendered, 2)
    shift = orange.mean(0) - red.mean(0)
    assert 35 < shift[1] < 65 and abs(shift[0]) < 10 and abs(shift[2]) < 10  # green only
    plain, dotted = class_pixels(rendered, 3), class_pixels(rendered, 4)
    assert np.abs(plain.mean(0) - dotted.mean(0)).max() < 30  # about the same colour ...
    assert interior_luma_std(rendered, 4) > 2 * interior_luma_std(rendered, 3)  # ... but textured


def test_other_classes_are_far_apart_in_colour(scenes):
    source, rendered = scenes
    means = {k: class_pixels(rendered, k).mean(0) for k in range(source.num_classes)}
    for a, b in itertools.combinations(means, 2):
        if (a, b) in source.confusing_pairs:
            continue
        assert np.linalg.norm(means[a] - means[b]) > 50, (source.classes[a], source.classes[b])


def test_synthetic_shards_fixture_keeps_the_cues(synthetic_shards, read_samples):
    manifest = load_manifest(synthetic_shards)
    assert manifest.name == "synthetic" and len(manifest.classes) == 7
    assert (manifest.num_samples("train"), manifest.num_samples("val")) == (32, 8)
    assert verify(synthetic_shards).ok
    source = Synthetic(num_train=32, num_val=8, size=(64, 64), seed=0)
    decoded = []
    for key, sample in read_samples(synthetic_shards, "train").items():
        image, mask = source.render("train", int(key.rsplit("_", 1)[1]))
        np.testing.assert_array_equal(sample["mask"], mask)
        assert np.abs(sample["image"].astype(int) - image).mean() < 8  # JPEG q95, 4:2:0
        decoded.append((sample["image"], sample["mask"]))
    # the small cues survive JPEG: colour shift of disc_orange, texture of box_dotted
    shift = class_pixels(decoded, 2).mean(0) - class_pixels(decoded, 1).mean(0)
    assert shift[1] > 30
    assert interior_luma_std(decoded, 4) > 2 * interior_luma_std(decoded, 3)
