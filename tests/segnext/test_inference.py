"""Test-time prediction: whole image, sliding window, multi-scale + flip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segnext.inference import predict, predict_logits


class _ConvNet(nn.Module):
    """Stand-in segmenter: (B,3,H,W) -> (B,K,H,W) logits; a 1x1 kernel makes it pointwise."""

    def __init__(self, num_classes: int = 5, kernel: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, kernel, padding=kernel // 2), nn.ReLU(), nn.Conv2d(8, num_classes, 1)
        )
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(images)


def _model(**kwargs) -> _ConvNet:
    torch.manual_seed(0)
    return _ConvNet(**kwargs).eval()


def test_whole_and_single_view_return_model_logits():
    model, images = _model(), torch.randn(2, 3, 12, 20)
    expected = model(images)
    assert torch.equal(predict_logits(model, images), expected)
    assert torch.equal(predict_logits(model, images, scales=[1.0], flip=False), expected)
    assert torch.equal(predict(model, images), expected.argmax(1))


def test_slide_with_one_window_equals_whole():
    model, images = _model(), torch.randn(2, 3, 12, 20)
    whole = predict_logits(model, images)
    model.calls = 0
    slide = predict_logits(model, images, mode="slide", crop_size=(12, 20), stride=(8, 16))
    assert model.calls == 1 and torch.equal(slide, whole)


def test_slide_grid_covers_and_averages_overlaps():
    """A pointwise model has no context, so any window grid must reproduce the whole image."""
    model, images = _model(kernel=1), torch.randn(1, 3, 13, 20)
    whole = predict_logits(model, images)
    model.calls = 0
    slide = predict_logits(model, images, mode="slide", crop_size=(7, 9), stride=(4, 5))
    assert model.calls == 3 * 4  # mmseg grid: (13-7+3)//4+1 rows, (20-9+4)//5+1 columns
    assert torch.allclose(slide, whole, atol=1e-6)
    # A crop larger than the image: one zero-padded window, logits cropped back.
    padded = predict_logits(model, images, mode="slide", crop_size=32, stride=16)
    assert torch.allclose(padded, whole, atol=1e-6)


def test_multi_scale_and_flip():
    model, images = _model(), torch.randn(2, 3, 16, 24)
    scores = predict_logits(model, images, scales=(0.5, 1.0, 1.75), flip=True)
    assert scores.shape == (2, 5, 16, 24) and torch.isfinite(scores).all()
    assert torch.allclose(scores.exp().sum(1), torch.ones(2, 16, 24), atol=1e-5)
    slid = predict_logits(
        model, images, mode="slide", crop_size=12, stride=8, scales=(0.75, 1.25), flip=True
    )
    assert slid.shape == (2, 5, 16, 24)
    # Pointwise model: the flipped view agrees, so the average is the single view's softmax.
    pointwise = _model(kernel=1)
    flipped = predict_logits(pointwise, images, flip=True)
    assert torch.allclose(flipped, pointwise(images).log_softmax(1), atol=1e-5)


def test_bad_arguments_are_rejected():
    model, images = _model(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="needs crop_size and stride"):
        predict_logits(model, images, mode="slide")
    with pytest.raises(ValueError, match="leaves gaps"):
        predict_logits(model, images, mode="slide", crop_size=4, stride=5)
    with pytest.raises(ValueError, match="mode"):
        predict_logits(model, images, mode="tiles")
    with pytest.raises(ValueError, match="eval"):
        predict_logits(model.train(), images)


def test_segnext_tiny_slide_equals_whole():
    from segnext.model import create_model

    model = create_model("tiny", num_classes=4).eval()
    images = torch.randn(1, 3, 64, 96)
    torch.manual_seed(1)  # the NMF draws random bases at every forward
    whole = predict_logits(model, images)
    torch.manual_seed(1)
    slide = predict_logits(model, images, mode="slide", crop_size=(64, 96), stride=(48, 64))
    assert whole.shape == (1, 4, 64, 96) and torch.equal(slide, whole)
    probs = predict_logits(model, images, scales=(0.5, 1.0), flip=True).exp()
    assert torch.allclose(probs.sum(1), torch.ones(1, 64, 96), atol=1e-5)
