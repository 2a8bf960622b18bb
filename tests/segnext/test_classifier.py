"""Classifiers: the official standard head and the integrated (general + refinement) head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segnext.classifier import (
    CLASSIFIERS,
    MASKED_LOGIT,
    IntegratedClassifier,
    StandardClassifier,
    build_classifier,
    candidate_mask,
    integrate,
)


def _integrated(num_classes: int = 6, top_k: int | None = 3, seed: int = 0):
    torch.manual_seed(seed)
    head = build_classifier("integrated", 8, num_classes, refine_channels=16, top_k=top_k)
    # Larger output weights than the N(0, 0.01) init so the classes are well separated.
    for conv in (head.general, head.refine_out):
        torch.nn.init.normal_(conv.weight, std=1.0)
        torch.nn.init.normal_(conv.bias, std=1.0)
    return head.eval()


def _by_hand(head: IntegratedClassifier, features: torch.Tensor, top_k: int | None):
    """P ∝ sigmoid(g) * softmax over the general top-k of r, written out directly."""
    g = head.general(features)
    r = head.refine_out(F.relu(head.refine_hidden(torch.cat([features, torch.sigmoid(g)], 1))))
    keep = torch.ones_like(g, dtype=torch.bool)
    if top_k:
        threshold = g.sort(dim=1, descending=True).values[:, top_k - 1 : top_k]
        keep = g >= threshold
    e = torch.exp(r - r.max(1, keepdim=True).values) * keep
    p_ref = e / e.sum(1, keepdim=True)
    product = torch.sigmoid(g) * p_ref
    return product / product.sum(1, keepdim=True)


def test_registry_and_standard_head():
    assert set(CLASSIFIERS) == {"standard", "integrated"}
    head = build_classifier("standard", 8, 5)
    assert isinstance(head, StandardClassifier)
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.3)
    out = head.eval()(torch.randn(2, 8, 4, 6))
    assert set(out) == {"logits"} and out["logits"].shape == (2, 5, 4, 6)
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier("fancy", 8, 5)


def test_integrated_outputs_and_init():
    torch.manual_seed(0)
    head = build_classifier("integrated", 16, 7)
    assert isinstance(head, IntegratedClassifier) and head.top_k == 3
    for conv in (head.general, head.refine_out):
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.3)
        assert torch.count_nonzero(conv.bias) == (7 if conv is head.general else 0)
    out = head.eval()(torch.randn(2, 16, 5, 4))
    assert set(out) == {"logits", "general_logits", "refine_logits"}
    for value in out.values():
        assert value.shape == (2, 7, 5, 4) and torch.isfinite(value).all()
    assert torch.allclose(out["logits"].exp().sum(1), torch.ones(2, 5, 4), atol=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        build_classifier("integrated", 16, 7, top_k=-1)


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_prediction_is_argmax_of_normalised_product(top_k):
    head = _integrated(top_k=top_k)
    features = torch.randn(3, 8, 5, 7)
    expected = _by_hand(head, features, top_k)
    log_probs = head(features)["logits"]
    assert torch.allclose(log_probs.exp(), expected, atol=1e-6)
    assert torch.equal(log_probs.argmax(1), expected.argmax(1))


def test_top_k_restricts_prediction_to_general_candidates():
    head = _integrated(num_classes=6, top_k=2)
    out = head(torch.randn(4, 8, 6, 6))
    probs = out["logits"].exp()
    assert torch.equal((probs > 0).sum(1), torch.full((4, 6, 6), 2))
    top2 = out["general_logits"].topk(2, dim=1).indices
    assert (top2 == out["logits"].argmax(1, keepdim=True)).any(1).all()
    # None, 0 and k >= K all mean "every class is a candidate".
    for top_k in (None, 0, 6, 10):
        probs = _integrated(num_classes=6, top_k=top_k)(torch.randn(2, 8, 3, 3))["logits"].exp()
        assert (probs > 0).all()


def test_masked_logits_survive_bilinear_resizing():
    """Masked classes are finite, so resizing the log-probs cannot produce NaN."""
    head = _integrated(num_classes=5, top_k=1)
    logits = head(torch.randn(2, 8, 4, 4))["logits"]
    resized = F.interpolate(logits, size=(13, 17), mode="bilinear", align_corners=False)
    assert torch.isfinite(resized).all()


def test_resize_logits_integrates_after_resizing():
    head = _integrated(num_classes=5, top_k=2)
    out = head(torch.randn(2, 8, 4, 5))
    assert torch.equal(head.resize_logits(out, (4, 5)), out["logits"])
    resized = head.resize_logits(out, (16, 20)).exp()

    def up(x):
        return F.interpolate(x, size=(16, 20), mode="bilinear", align_corners=False)

    g, r = up(out["general_logits"]), up(out["refine_logits"])
    keep = g >= g.sort(dim=1, descending=True).values[:, 1:2]
    product = torch.sigmoid(g) * torch.exp(r) * keep
    assert torch.allclose(resized, product / product.sum(1, keepdim=True), atol=1e-6)

    standard = build_classifier("standard", 8, 5).eval()
    logits = standard(torch.randn(1, 8, 4, 5))
    expected = F.interpolate(logits["logits"], size=(16, 20), mode="bilinear")
    assert torch.equal(standard.resize_logits(logits, (16, 20)), expected)


def test_general_biases_start_at_the_class_prior():
    """sigmoid(g) starts at 1/K (default) or at the given class frequencies, not at 0.5."""
    head = build_classifier("integrated", 16, 4).eval()
    assert torch.allclose(head.general.bias.sigmoid(), torch.full((4,), 0.25), atol=1e-6)
    prior = [0.5, 0.3, 0.15, 0.05]
    head = build_classifier("integrated", 16, 4, prior=prior).eval()
    assert torch.allclose(head.general.bias.sigmoid(), torch.tensor(prior), atol=1e-6)
    # Near-zero weights: the initial general probabilities are the prior everywhere.
    p_gen = head(torch.randn(1, 16, 3, 3))["general_logits"].sigmoid()
    assert torch.allclose(p_gen.mean((0, 2, 3)), torch.tensor(prior), atol=0.02)
    for bad in ([0.5, 0.5], [0.5, 0.3, 0.2, 0.0], [0.5, 0.3, 0.2, "x"]):
        with pytest.raises(ValueError, match="prior must list 4 class frequencies"):
            build_classifier("integrated", 16, 4, prior=bad)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_integrate_on_candidates_equals_the_masked_all_class_softmax(top_k):
    """The k-candidate computation is the K-class one with non-candidates masked out."""
    torch.manual_seed(0)
    general, refine = torch.randn(2, 6, 5, 7) * 3, torch.randn(2, 6, 5, 7) * 3
    log_probs, index = integrate(general, refine, top_k)
    candidates = candidate_mask(general, top_k)
    masked = refine.masked_fill(~candidates, MASKED_LOGIT)
    expected = F.log_softmax(F.logsigmoid(general) + F.log_softmax(masked, 1), 1)
    torch.testing.assert_close(log_probs.exp(), expected.exp(), rtol=1e-5, atol=1e-7)
    assert torch.equal(log_probs.argmax(1), expected.argmax(1))
    assert index.shape == (2, top_k, 5, 7)
    assert (log_probs[~candidates] == MASKED_LOGIT).all()
    assert integrate(general, refine, None)[1] is None


def test_decision_rules_predict_from_the_named_parts():
    from segnext.classifier import DECISIONS, IntegratedClassifier, integrate

    torch.manual_seed(0)
    general, refine = torch.randn(2, 6, 4, 5), torch.randn(2, 6, 4, 5)
    product, index = integrate(general, refine, 3)
    assert torch.equal(integrate(general, refine, 3, "product")[0], product)  # the default
    only_general, _ = integrate(general, refine, 3, "general")
    assert torch.equal(only_general.argmax(1), general.argmax(1))  # all K classes, g alone
    only_refine, _ = integrate(general, refine, 3, "refine")
    candidates = refine.gather(1, index)  # r alone, among the general top-3
    assert torch.equal(only_refine.argmax(1), index.gather(1, candidates.argmax(1, keepdim=True))[:, 0])
    for log_probs in (only_general, only_refine):
        assert torch.allclose(log_probs.exp().sum(1), torch.ones(2, 4, 5), atol=1e-5)
    head = IntegratedClassifier(8, 6, decision="general").eval()
    assert head.decision == "general" and set(DECISIONS) == {"product", "general", "refine"}
    with pytest.raises(ValueError, match="decision must be one of"):
        IntegratedClassifier(8, 6, decision="vote")
