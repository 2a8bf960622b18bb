"""Losses: cross-entropy averaging and ignore handling; the integrated loss and its terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segnext.classifier import MASKED_LOGIT, build_classifier, candidate_mask
from segnext.losses import build_criterion, class_balance_weights, downsample_masks


def _integrated_outputs(general: torch.Tensor, refine: torch.Tensor) -> dict[str, torch.Tensor]:
    # The loss recomputes the integration from the two logit maps; "logits" is not read.
    return {"logits": torch.zeros_like(general), "general_logits": general, "refine_logits": refine}


def test_cross_entropy_valid_vs_all_on_hand_example():
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 0.0, -5.0]]).view(1, 2, 1, 3)
    masks = torch.tensor([[[0, 1, 255]]])
    a, b = math.log(1 + math.exp(-2)), math.log(2)
    valid, parts = build_criterion("standard")({"logits": logits}, masks)
    quirk, _ = build_criterion("standard", average="all")({"logits": logits}, masks)
    assert valid.item() == pytest.approx((a + b) / 2, rel=1e-6)
    assert quirk.item() == pytest.approx((a + b) / 3, rel=1e-6)
    assert set(parts) == {"ce"} and not parts["ce"].requires_grad


def test_cross_entropy_upsamples_stride_8_logits_to_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    masks = torch.randint(0, 4, (2, 24, 40))
    masks[0, :5] = 255
    loss, _ = build_criterion("standard")({"logits": logits}, masks)
    up = F.interpolate(logits, size=(24, 40), mode="bilinear", align_corners=False)
    assert loss.item() == pytest.approx(F.cross_entropy(up, masks, ignore_index=255).item(), 1e-5)


@pytest.mark.parametrize("kind", ["standard", "integrated"])
def test_ignored_pixels_do_not_count(kind):
    torch.manual_seed(0)
    outputs = _integrated_outputs(torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6))
    outputs["logits"] = torch.randn(1, 4, 6, 6)
    masks = torch.randint(0, 4, (1, 6, 6))
    masks[:, :, :3] = 255
    criterion = build_criterion(kind)
    before, _ = criterion(outputs, masks)
    changed = {k: v.clone() for k, v in outputs.items()}
    for value in changed.values():
        value[:, :, :, :3] += 7.0  # only where the mask is ignored
    after, _ = criterion(changed, masks)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["standard", "integrated"])
@pytest.mark.parametrize("average", ["valid", "all"])
def test_all_ignored_gives_zero_loss_and_zero_grads(kind, average):
    general = torch.randn(2, 5, 3, 3, requires_grad=True)
    refine = torch.randn(2, 5, 3, 3, requires_grad=True)
    outputs = {"logits": general, "general_logits": general, "refine_logits": refine}
    loss, parts = build_criterion(kind, average=average)(outputs, torch.full((2, 12, 12), 255))
    loss.backward()
    assert loss.item() == 0.0 and all(p.item() == 0.0 for p in parts.values())
    for grad in (general.grad, refine.grad):
        assert grad is None or (torch.isfinite(grad).all() and not grad.any())


@pytest.mark.parametrize("kind", ["standard", "integrated"])
def test_out_of_range_label_is_rejected(kind):
    outputs = _integrated_outputs(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))
    outputs["logits"] = outputs["general_logits"]
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, 1, 2] = 7
    with pytest.raises(ValueError, match="label 7 is outside 0..2"):
        build_criterion(kind)(outputs, masks)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="average"):
        build_criterion("standard", average="mean")
    with pytest.raises(ValueError, match="unknown loss weight"):
        build_criterion("integrated", weights={"gen": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        build_criterion("integrated", weights={"variance": -1.0})
    with pytest.raises(ValueError, match="unknown classifier"):
        build_criterion("fancy")


def test_general_term_is_bce_summed_over_classes_averaged_over_valid_pixels():
    torch.manual_seed(0)
    general, refine = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    masks = torch.randint(0, 4, (2, 5, 5))
    masks[1, 0] = 255
    _, parts = build_criterion("integrated")(_integrated_outputs(general, refine), masks)
    valid = masks != 255
    onehot = F.one_hot(masks.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    bce = F.binary_cross_entropy_with_logits(general, onehot, reduction="none")
    expected = (bce * valid.unsqueeze(1)).sum() / valid.sum()
    assert parts["general"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_class_weights_scale_each_class_positive_bce_term():
    torch.manual_seed(1)
    general, refine = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    masks = torch.randint(0, 4, (2, 5, 5))
    masks[0, 2] = 255
    weights = [1.0, 2.0, 5.0, 0.5]
    criterion = build_criterion("integrated", class_weights=weights)
    _, parts = criterion(_integrated_outputs(general, refine), masks)
    valid = masks != 255
    onehot = F.one_hot(masks.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    pos_weight = torch.tensor(weights).view(4, 1, 1)  # torch's own weighted BCE as the reference
    bce = F.binary_cross_entropy_with_logits(
        general, onehot, pos_weight=pos_weight, reduction="none"
    )
    expected = (bce * valid.unsqueeze(1)).sum() / valid.sum()
    assert parts["general"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="one weight per class"):
        build_criterion("integrated", class_weights=[1.0, 2.0])(
            _integrated_outputs(general, refine), masks
        )
    with pytest.raises(ValueError, match="> 0"):
        build_criterion("integrated", class_weights=[1.0, 0.0, 1.0, 1.0])


def test_class_weights_scale_the_standard_cross_entropy_by_the_true_class():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4)
    masks = torch.randint(0, 3, (2, 4, 4))
    masks[1, 1] = 255
    weights = [1.0, 3.0, 0.25]
    loss, _ = build_criterion("standard", class_weights=weights)({"logits": logits}, masks)
    valid = masks != 255
    ce = F.cross_entropy(logits, masks, ignore_index=255, reduction="none")
    per_pixel = torch.tensor(weights)[masks.clamp(max=2)]
    expected = (ce * per_pixel * valid).sum() / valid.sum()  # pixel count, not sum of weights
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="one weight per class"):
        build_criterion("standard", class_weights=[1.0])({"logits": logits}, masks)


def test_class_balance_weights_cancel_prior_odds_at_power_one():
    assert class_balance_weights([0.5, 0.2, 0.01], 1.0) == pytest.approx([1.0, 4.0, 99.0])
    assert class_balance_weights([0.5, 0.2, 0.01], 0.5) == pytest.approx([1.0, 2.0, 99**0.5])
    assert class_balance_weights([0.3, 0.7], 0.0) == [1.0, 1.0]
    assert class_balance_weights([0.0], 1.0) == pytest.approx([9999.0])  # absent class: finite
    with pytest.raises(ValueError, match=">= 0"):
        class_balance_weights([0.5], -1.0)
    with pytest.raises(ValueError, match="pixel shares"):
        class_balance_weights([1.5], 1.0)


def test_refine_term_uses_top_k_plus_true_class():
    general = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0]).view(1, 5, 1, 1)
    refine = torch.tensor([1.0, 2.0, 3.0, 0.5, -1.0]).view(1, 5, 1, 1)
    outputs = _integrated_outputs(general, refine)
    for target, candidates in ((1, [0, 1]), (4, [0, 1, 4])):  # true class in / out of top-2
        _, parts = build_criterion("integrated", top_k=2)(outputs, torch.tensor([[[target]]]))
        r = refine.flatten()
        expected = torch.logsumexp(r[candidates], 0) - r[target]
        assert parts["refine"].item() == pytest.approx(expected.item(), rel=1e-6)
        weights = [1.0, 2.0, 3.0, 4.0, 5.0]  # class weights act on L_gen only
        weighted = build_criterion("integrated", top_k=2, class_weights=weights)
        _, parts = weighted(outputs, torch.tensor([[[target]]]))
        assert parts["refine"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_variance_term_on_hand_example():
    """g large for every class -> p_gen ~ 1, so P = softmax(r); L_var = -Var(top-3 of P)."""
    general = torch.full((1, 4, 1, 2), 50.0)
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.4, 0.35, 0.25, 0.0]]).T.reshape(1, 4, 1, 2)
    refine = probs.clamp_min(1e-30).log()
    masks = torch.tensor([[[0, 255]]])
    criterion = build_criterion("integrated", top_k=None, weights={"variance": 0.5})
    loss, parts = criterion(_integrated_outputs(general, refine), masks)
    spread = torch.tensor([0.7, 0.2, 0.1]).var(correction=0).item()  # 0.068889
    assert parts["variance"].item() == pytest.approx(-spread, rel=1e-5)
    expected = parts["general"] + parts["refine"] + 0.5 * parts["variance"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # A more confused pixel (scores close together) is penalised more: the sign is right.
    _, confused = criterion(_integrated_outputs(general, refine), torch.tensor([[[255, 0]]]))
    assert parts["variance"].item() < confused["variance"].item() < 0


def test_integrated_loss_is_finite_with_masking_and_upsampling():
    torch.manual_seed(0)
    general = (torch.randn(2, 6, 4, 4) * 5).requires_grad_()
    refine = (torch.randn(2, 6, 4, 4) * 5).requires_grad_()
    masks = torch.randint(0, 6, (2, 32, 32))
    loss, parts = build_criterion("integrated", top_k=1)(
        _integrated_outputs(general, refine), masks
    )
    loss.backward()
    assert set(parts) == {"general", "refine", "variance"}
    assert torch.isfinite(loss) and torch.isfinite(general.grad).all()
    assert torch.isfinite(refine.grad).all()


class _TinySegmenter(nn.Module):
    """Stride-2 conv features + a classifier head (stands in for SegNeXt in a loss test)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1)
        )
        self.head = build_classifier("integrated", 16, num_classes, dropout=0.0, top_k=2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(F.relu(self.features(images)))


def test_integrated_loss_overfits_tiny_problem():
    torch.manual_seed(0)
    num_classes = 4
    blocks = torch.randint(0, num_classes, (2, 4, 4))
    masks = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 2 x 32 x 32, 8x8 blocks
    colours = torch.rand(num_classes, 3) * 2 - 1
    images = colours[masks].permute(0, 3, 1, 2) + 0.05 * torch.randn(2, 3, 32, 32)
    masks[0, :2] = 255
    model = _TinySegmenter(num_classes)
    criterion = build_criterion("integrated", top_k=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(100):
        loss, parts = criterion(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: v.item() for k, v in parts.items()} | {"loss": loss.item()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.1 * first["loss"]
    assert last["general"] < 0.1 * first["general"] and last["refine"] < 0.1 * first["refine"]
    assert last["variance"] < first["variance"]
    with torch.no_grad():
        pred = model.head.resize_logits(model.eval()(images), (32, 32)).argmax(1)
    valid = masks != 255
    assert (pred[valid] == masks[valid]).float().mean().item() > 0.99


def _masked_reference(general, refine, masks, top_k, variance_top_k):
    """The K-class form of the integrated loss terms (masking with MASKED_LOGIT), at mask size."""
    size = masks.shape[-2:]
    general = F.interpolate(general, size=size, mode="bilinear", align_corners=False)
    refine = F.interpolate(refine, size=size, mode="bilinear", align_corners=False)
    valid = masks != 255
    target = masks.masked_fill(~valid, 0).unsqueeze(1)
    candidates = candidate_mask(general, top_k)
    masked = refine if candidates is None else refine.masked_fill(~candidates, MASKED_LOGIT)
    log_probs = F.log_softmax(F.logsigmoid(general) + F.log_softmax(masked, 1), 1)
    if candidates is not None:
        refine = refine.masked_fill(~candidates.scatter(1, target, True), MASKED_LOGIT)
    nll = torch.logsumexp(refine, 1) - refine.gather(1, target).squeeze(1)
    top = log_probs.topk(min(variance_top_k, general.shape[1]), dim=1).values.exp()
    n = valid.sum()
    return (nll * valid).sum() / n, -(top.var(dim=1, correction=0) * valid).sum() / n


@pytest.mark.parametrize(
    ("top_k", "variance_top_k"), [(3, 3), (2, 3), (4, 2), (1, 3), (None, 3), (0, 4)]
)
def test_candidate_space_loss_equals_masked_all_class_form(top_k, variance_top_k):
    torch.manual_seed(0)
    general = (torch.randn(2, 6, 3, 4) * 3).requires_grad_()
    refine = (torch.randn(2, 6, 3, 4) * 3).requires_grad_()
    masks = torch.randint(0, 6, (2, 24, 32))
    masks[0, :4] = 255
    criterion = build_criterion("integrated", top_k=top_k, variance_top_k=variance_top_k)
    _, parts = criterion(_integrated_outputs(general, refine), masks)
    ref_refine, ref_variance = _masked_reference(general, refine, masks, top_k, variance_top_k)
    assert parts["refine"].item() == pytest.approx(ref_refine.item(), rel=1e-5)
    assert parts["variance"].item() == pytest.approx(ref_variance.item(), rel=1e-5, abs=1e-7)
    # and the same gradients (loss = refine + variance here: general weight 0)
    criterion = build_criterion(
        "integrated", top_k=top_k, variance_top_k=variance_top_k, weights={"general": 0.0,
                                                                           "variance": 1.0}
    )
    loss, _ = criterion(_integrated_outputs(general, refine), masks)
    grads = torch.autograd.grad(loss, (general, refine))
    expected = torch.autograd.grad(ref_refine + ref_variance, (general, refine))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_downsample_masks_takes_the_label_under_each_output_pixel_centre():
    masks = torch.arange(12).view(1, 3, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
    masks[0, 3, 4] = 255  # off-centre pixel of block (0, 0): never sampled
    assert torch.equal(downsample_masks(masks, (3, 4)), torch.arange(12).view(1, 3, 4))
    line = torch.zeros(1, 1, 16, dtype=torch.long)
    line[0, 0, 4] = 7  # centre of output pixel 1 of 4 (covers 4..7): floor(1.5 * 4) = 6
    line[0, 0, 6] = 5
    assert downsample_masks(line, (1, 4)).tolist() == [[[0, 5, 0, 0]]]
    assert downsample_masks(masks, (24, 32)) is masks


@pytest.mark.parametrize("kind", ["standard", "integrated"])
def test_logits_resolution_scores_stride_8_logits_against_sampled_masks(kind):
    torch.manual_seed(0)
    general, refine = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    outputs = _integrated_outputs(general, refine) | {"logits": general}
    masks = torch.randint(0, 5, (2, 24, 32))
    masks[1, :8] = 255
    small = downsample_masks(masks, (3, 4))
    loss, parts = build_criterion(kind, resolution="logits")(outputs, masks)
    same, same_parts = build_criterion(kind)(outputs, small)  # at mask size = logits' size
    assert loss.item() == pytest.approx(same.item(), rel=1e-6)
    assert parts.keys() == same_parts.keys()
    full, _ = build_criterion(kind)(outputs, masks)
    assert abs(full.item() - loss.item()) > 1e-4  # a different (cheaper) loss, not a no-op


def test_out_of_range_label_is_rejected_before_downsampling():
    outputs = _integrated_outputs(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2))
    masks = torch.zeros(1, 16, 16, dtype=torch.long)
    masks[0, 0, 1] = 9  # not under any output pixel centre
    with pytest.raises(ValueError, match="label 9"):
        build_criterion("integrated", resolution="logits")(outputs, masks)


def test_warm_up_ramps_refine_and_variance_weights_from_zero():
    torch.manual_seed(0)
    general = torch.randn(1, 4, 3, 3, requires_grad=True)
    refine = torch.randn(1, 4, 3, 3, requires_grad=True)
    outputs = _integrated_outputs(general, refine)
    masks = torch.randint(0, 4, (1, 24, 24))
    criterion = build_criterion("integrated", warmup_iters=10, weights={"variance": 0.5})
    totals = {}
    for iteration in (0, 5, 10, 50):
        criterion.set_progress(iteration)
        loss, parts = criterion(outputs, masks)
        ramp = min(1.0, iteration / 10)
        expected = parts["general"] + ramp * (parts["refine"] + 0.5 * parts["variance"])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        totals[iteration] = loss
    criterion.set_progress(0)
    loss, _ = criterion(outputs, masks)
    loss.backward()
    assert not refine.grad.any() and general.grad.any()  # the refinement waits at step 0
    assert totals[0].item() != pytest.approx(totals[50].item())
    no_warmup = build_criterion("integrated", weights={"variance": 0.5})
    no_warmup.set_progress(0)
    assert no_warmup(outputs, masks)[0].item() == pytest.approx(totals[50].item(), rel=1e-6)


def test_set_progress_is_a_no_op_for_the_standard_loss_and_checks_its_input():
    logits, masks = torch.randn(1, 3, 2, 2), torch.randint(0, 3, (1, 16, 16))
    criterion = build_criterion("standard", warmup_iters=100)
    before, _ = criterion({"logits": logits}, masks)
    criterion.set_progress(0)
    assert criterion({"logits": logits}, masks)[0].item() == before.item()
    with pytest.raises(ValueError, match="iteration must be >= 0"):
        criterion.set_progress(-1)
    with pytest.raises(ValueError, match="resolution"):
        build_criterion("standard", resolution="half")
    with pytest.raises(ValueError, match="warmup_iters"):
        build_criterion("integrated", warmup_iters=-5)
