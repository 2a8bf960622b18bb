"""Transforms: image/mask alignment, padding, cat-max crop retry, photometric maths, eval
padding vs scoring, normalisation. numpy/PIL only, no Ray."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

import segnext
from data.transforms import (
    MEAN,
    STD,
    EvalTransform,
    TrainTransform,
    _resize_window,
    _saturation_hue,
    choose_crop,
    normalize_batch,
    photometric_distortion,
    rescaled_size,
)

IGNORE = 255


def blocky_pair(height: int = 96, width: int = 128, block: int = 16, seed: int = 0):
    """Image whose red channel encodes the mask: mask = R // 32, constant over 16x16 blocks."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 8, size=(height // block, width // block))
    mask = np.kron(classes, np.ones((block, block), dtype=np.int64)).astype(np.uint8)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = mask * 32 + 16
    image[..., 1] = np.kron(rng.integers(0, 256, classes.shape), np.ones((block, block)))
    image[..., 2] = 255 - image[..., 1]
    return image, mask


def interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds one label (away from block edges)."""
    height, width = mask.shape
    padded = np.pad(mask.astype(np.int16), radius, constant_values=-1)
    same = np.ones(mask.shape, dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + height, dx : dx + width] == mask
    return same


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_image_and_mask_aligned(seed: int) -> None:
    image, mask = blocky_pair(seed=seed)
    transform = TrainTransform(crop_size=(48, 64), ratio_range=(0.5, 2.0), photometric=False)
    out_image, out_mask = transform(image, mask, np.random.default_rng(seed))
    assert out_image.shape == (48, 64, 3) and out_mask.shape == (48, 64)
    assert out_image.dtype == np.uint8 and out_mask.dtype == np.uint8
    check = interior(out_mask) & (out_mask != IGNORE)
    assert check.sum() > 200
    np.testing.assert_array_equal(out_image[..., 0][check] // 32, out_mask[check])


def test_flip_mirrors_image_and_mask_together() -> None:
    image, mask = blocky_pair()
    kwargs = {"crop_size": (48, 64), "cat_max_ratio": 1.0, "photometric": False}
    plain = TrainTransform(flip_prob=0.0, **kwargs)(image, mask, np.random.default_rng(3))
    flipped = TrainTransform(flip_prob=1.0, **kwargs)(image, mask, np.random.default_rng(3))
    np.testing.assert_array_equal(flipped[0], plain[0][:, ::-1])
    np.testing.assert_array_equal(flipped[1], plain[1][:, ::-1])


def test_crop_larger_than_image_pads_image_with_zero_and_mask_with_ignore() -> None:
    image, mask = blocky_pair(height=40, width=50, block=10)
    transform = TrainTransform(
        crop_size=(64, 80), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False
    )
    out_image, out_mask = transform(image, mask, np.random.default_rng(0))
    assert out_image.shape == (64, 80, 3)
    np.testing.assert_array_equal(out_image[:40, :50], image)
    np.testing.assert_array_equal(out_mask[:40, :50], mask)
    assert (out_mask[40:] == IGNORE).all() and (out_mask[:, 50:] == IGNORE).all()
    assert (out_image[40:] == 0).all() and (out_image[:, 50:] == 0).all()


def test_scale_resizes_keeping_aspect() -> None:
    assert rescaled_size(360, 480, (2048, 512)) == (512, 683)
    assert rescaled_size(360, 480, (512, 2048)) == (512, 683)
    assert rescaled_size(400, 3000, (2048, 512)) == (273, 2048)  # long side bound
    assert rescaled_size(360, 480, None, 0.5) == (180, 240)
    assert rescaled_size(360, 480, (480, 360), 2.0) == (720, 960)


def test_resizing_only_the_crop_window_equals_resize_then_crop() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    for size in ((180, 240), (47, 63), (90, 120), (131, 175)):
        full = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))
        y0, x0 = size[0] // 5, size[1] // 7
        window = (y0, x0, size[0] // 2, size[1] // 2)
        part = _resize_window(image, size, window)
        expected = full[y0 : y0 + size[0] // 2, x0 : x0 + size[1] // 2]
        assert np.abs(part.astype(int) - expected).max() <= 1


def _crop_passes(mask: np.ndarray, window: tuple[int, int, int, int], ratio: float) -> bool:
    y0, x0, h, w = window
    labels = mask[y0 : y0 + h, x0 : x0 + w]
    counts = np.bincount(labels[labels != IGNORE], minlength=2)
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_cat_max_ratio_retries_until_no_class_dominates() -> None:
    # Class 1 only in the right 40 columns: most 40x40 crops are all class 0.
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[:, 60:] = 1
    mask[:5] = IGNORE  # ignored pixels do not count towards either class

    def pass_rate(ratio: float) -> float:
        windows = [
            choose_crop(mask, (40, 40), np.random.default_rng(seed), cat_max_ratio=ratio)
            for seed in range(60)
        ]
        return np.mean([_crop_passes(mask, window, 0.75) for window in windows])

    assert pass_rate(0.75) >= 0.9  # one draw passes with p ~ 0.3; 11 draws almost always
    assert pass_rate(1.0) <= 0.5  # no retry


def test_cat_max_ratio_keeps_a_crop_when_none_can_pass() -> None:
    mask = np.zeros((50, 50), dtype=np.uint8)
    window = choose_crop(mask, (20, 30), np.random.default_rng(0), cat_max_ratio=0.75)
    assert window[2:] == (20, 30)


def test_photometric_keeps_uint8_and_leaves_the_mask_alone() -> None:
    image, mask = blocky_pair()
    changed = 0
    for seed in range(8):
        kwargs = {"crop_size": (48, 64)}
        with_photo = TrainTransform(**kwargs)(image, mask, np.random.default_rng(seed))
        without = TrainTransform(photometric=False, **kwargs)(
            image, mask, np.random.default_rng(seed)
        )
        assert with_photo[0].dtype == np.uint8 and with_photo[0].shape == (48, 64, 3)
        np.testing.assert_array_equal(with_photo[1], without[1])
        changed += not np.array_equal(with_photo[0], without[0])
    assert changed >= 6


def test_photometric_covers_the_full_range_without_wrapping() -> None:
    image = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (4, 1, 3))
    for seed in range(20):
        out = photometric_distortion(image, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == image.shape
        grey = out[0, :, 0].astype(int)  # grey stays grey; brightness/contrast are monotone
        assert (np.diff(grey) >= 0).all()


def test_saturation_and_hue_match_colorsys() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_saturation_hue(image, 1.0, 0.0), image)
    for saturation, shift in ((1.4, 0.0), (0.6, 0.0), (1.0, 0.5), (1.3, -0.4), (0.5, 0.6)):
        out = _saturation_hue(image, saturation, shift)
        for (r, g, b), got in zip(image.reshape(-1, 3), out.reshape(-1, 3), strict=True):
            h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
            want = colorsys.hsv_to_rgb((h + shift / 6) % 1.0, min(s * saturation, 1.0), v)
            assert np.abs(np.array(want) * 255 - got).max() <= 1.0


def test_hue_rotation_and_desaturation_known_colours() -> None:
    red = np.array([[[255, 0, 0], [200, 100, 100]]], dtype=np.uint8)
    np.testing.assert_array_equal(_saturation_hue(red, 1.0, 2.0)[0, 0], [0, 255, 0])
    grey = _saturation_hue(red, 0.0, 0.0)
    assert (grey[0, 0] == 255).all() and (grey[0, 1] == 200).all()


def test_same_generator_same_sample() -> None:
    image, mask = blocky_pair()
    transform = TrainTransform(crop_size=(48, 64))
    first = transform(image, mask, np.random.default_rng(7))
    again = transform(image, mask, np.random.default_rng(7))
    other = transform(image, mask, np.random.default_rng(8))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_eval_padding_scores_like_the_original() -> None:
    image, mask = blocky_pair(height=60, width=90, block=10, seed=1)
    mask[:10, :10] = IGNORE
    padded_image, padded_mask = EvalTransform(pad_size=(64, 96))(image, mask)
    assert padded_image.shape == (64, 96, 3) and padded_mask.shape == (64, 96)
    assert (padded_mask[60:] == IGNORE).all() and (padded_mask[:, 90:] == IGNORE).all()
    np.testing.assert_array_equal(padded_image[:60, :90], image)
    prediction = np.random.default_rng(0).integers(0, 8, size=(64, 96))
    whole, cropped = segnext.ConfusionMatrix(8, IGNORE), segnext.ConfusionMatrix(8, IGNORE)
    whole.update(torch.from_numpy(prediction), torch.from_numpy(padded_mask).long())
    cropped.update(torch.from_numpy(prediction[:60, :90]), torch.from_numpy(mask).long())
    assert torch.equal(whole.matrix, cropped.matrix)


def test_eval_resize_to_scale_and_too_small_pad_size() -> None:
    image, mask = blocky_pair(height=60, width=90, block=10)
    out_image, out_mask = EvalTransform(pad_size=(40, 64), scale=(60, 40))(image, mask)
    assert out_image.shape == (40, 64, 3)
    assert (out_mask[:, 60:] == IGNORE).all() and (out_mask[:, :60] != IGNORE).any()
    with pytest.raises(ValueError, match="exceeds the pad size"):
        EvalTransform(pad_size=(32, 32))(image, mask)


def test_transforms_reject_bad_arrays() -> None:
    image, mask = blocky_pair()
    with pytest.raises(ValueError, match="mask must be uint8"):
        TrainTransform(crop_size=(8, 8))(image, mask[:-1], np.random.default_rng(0))
    with pytest.raises(ValueError, match="image must be uint8"):
        EvalTransform(pad_size=(96, 128))(image.astype(np.float32), mask)


def test_normalize_batch_matches_mean_std() -> None:
    images = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    out = normalize_batch(images)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32 and out.is_contiguous()
    expected = (images.permute(0, 3, 1, 2).double() - torch.tensor(MEAN).view(1, 3, 1, 1)) / (
        torch.tensor(STD).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(images.float())
