"""The shared scoring path: Segmenter geometry against a direct reference, and the scores of
training-time validation against `segnext eval` on the same checkpoint and split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.inference.segmenter import InferenceSettings, Segmenter

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
BAND = 10  # pixels per coordinate band
COLS, ROWS = 8, 6  # bands across and down: classes = COLS * ROWS


class ColourToClass(nn.Module):
    """A per-pixel stand-in model: the class whose band colour is nearest to the pixel's.

    With `coordinate_image` as input, the correct prediction at every pixel is its coordinate
    band, so a mask that is shifted, flipped, mis-padded or cropped back wrongly fails."""

    def __init__(self) -> None:
        super().__init__()
        cols, rows = np.meshgrid(np.arange(COLS), np.arange(ROWS))
        self.register_buffer("red", torch.tensor(band_value(cols.ravel(), COLS)).float())
        self.register_buffer("green", torch.tensor(band_value(rows.ravel(), ROWS)).float())
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * self.std + self.mean
        red = rgb[:, 0:1] - self.red.view(1, -1, 1, 1)
        green = rgb[:, 1:2] - self.green.view(1, -1, 1, 1)
        return -(red**2 + green**2) / 100.0


def band_value(index: np.ndarray, count: int) -> np.ndarray:
    return (index * 255 // (count - 1)).astype(np.uint8)


def coordinate_image(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(image whose red/green encode the x/y band of each pixel, the band-id mask)."""
    ys, xs = np.mgrid[0:height, 0:width]
    col, row = np.minimum(xs // BAND, COLS - 1), np.minimum(ys // BAND, ROWS - 1)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = band_value(col, COLS), band_value(row, ROWS), 90
    return image, (row * COLS + col).astype(np.uint8)


def segmenter(**settings) -> Segmenter:
    base = {"mean": MEAN, "std": STD, "crop_size": (32, 32), "stride": (21, 21), "mode": "whole"}
    return Segmenter(
        ColourToClass(),
        InferenceSettings(**{**base, **settings}),
        class_names=[f"c{i}" for i in range(COLS * ROWS)],
        palette=[[i, i, i] for i in range(COLS * ROWS)],
        device="cpu",
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "whole"},  # padded to a multiple of 32, cropped back
        {"mode": "slide"},  # overlapping windows, zero-padded at the border
        {"mode": "whole", "flip": True},  # flipped view flipped back
        {"mode": "slide", "flip": True},
    ],
    ids=["whole-pad", "slide", "whole-flip", "slide-flip"],
)
def test_geometry_without_resize_is_exact(settings: dict) -> None:
    image, expected = coordinate_image(53, 77)  # neither side a multiple of 32
    (mask,) = segmenter(**settings).predict([image])
    assert mask.shape == expected.shape
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"scale": (48, 36)},  # test resize to 0.66x, scores resized back
        {"scale": (160, 120)},  # upscale
        {"scales": (0.5, 1.0, 1.5), "flip": True},  # multi-scale + flip TTA
    ],
    ids=["downscale", "upscale", "tta"],
)
def test_geometry_with_resize_errs_only_at_band_edges(settings: dict) -> None:
    image, expected = coordinate_image(53, 77)
    (mask,) = segmenter(**settings).predict([image])
    assert mask.shape == expected.shape
    wrong = mask != expected
    ys, xs = np.mgrid[0:53, 0:77]
    near_edge = (np.minimum(xs % BAND, BAND - 1 - xs % BAND) < 2) | (
        np.minimum(ys % BAND, BAND - 1 - ys % BAND) < 2
    )
    assert wrong.mean() < 0.1
    assert not (wrong & ~near_edge).any(), "mistakes away from band edges: geometry is off"


def test_reference_catches_a_shift() -> None:
    """The reference is sharp enough: a 3-pixel shift of the correct mask fails it."""
    _, expected = coordinate_image(53, 77)
    shifted = np.roll(expected, 3, axis=1)
    assert (shifted != expected).mean() > 0.2
