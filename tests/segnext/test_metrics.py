"""Confusion matrix: hand-computed scores, confused pairs, merging, bad labels."""

from __future__ import annotations

import math

import pytest
import torch

from segnext.metrics import ConfusionMatrix

# rows = true, cols = pred:  [[3, 1, 0], [1, 2, 0], [0, 2, 1]]; the last pixel is ignored.
TARGET = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 255])
PRED = torch.tensor([0, 0, 0, 1, 1, 1, 0, 2, 1, 1, 2])


def test_scores_on_hand_example():
    cm = ConfusionMatrix(3)
    cm.update(PRED.view(1, 11), TARGET.view(1, 11))
    assert cm.matrix.tolist() == [[3, 1, 0], [1, 2, 0], [0, 2, 1]]
    assert cm.matrix.dtype == torch.int64
    scores = cm.compute(class_names=["road", "car", "truck"], top_confused=2)
    assert scores["aAcc"] == pytest.approx(6 / 10)
    assert scores["per_class_iou"] == pytest.approx([3 / 5, 2 / 6, 1 / 3])
    assert scores["mIoU"] == pytest.approx((3 / 5 + 2 / 6 + 1 / 3) / 3)
    assert scores["per_class_acc"] == pytest.approx([3 / 4, 2 / 3, 1 / 3])
    assert scores["mAcc"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 3) / 3)
    assert scores["confused_pairs"] == [
        {"true": "truck", "pred": "car", "true_id": 2, "pred_id": 1, "pixels": 2,
         "fraction": pytest.approx(2 / 3)},
        {"true": "road", "pred": "car", "true_id": 0, "pred_id": 1, "pixels": 1,
         "fraction": pytest.approx(1 / 4)},
    ]  # fmt: skip
    assert len(cm.compute()["confused_pairs"]) == 3  # only non-zero off-diagonal entries


def test_absent_class_is_nan_and_left_out_of_means():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    scores = cm.compute()
    assert math.isnan(scores["per_class_iou"][3]) and math.isnan(scores["per_class_acc"][3])
    assert scores["mIoU"] == pytest.approx((3 / 5 + 2 / 6 + 1 / 3) / 3)
    # Predicted but never true: IoU 0 counts in mIoU, accuracy stays nan.
    cm.update(torch.tensor([3]), torch.tensor([0]))
    scores = cm.compute()
    assert scores["per_class_iou"][3] == 0.0 and math.isnan(scores["per_class_acc"][3])


def test_matches_naive_count_and_merge_is_sum():
    torch.manual_seed(0)
    target = torch.randint(0, 6, (3, 17, 9))
    target[target == 5] = 255
    pred = torch.randint(0, 5, (3, 17, 9))
    naive = torch.zeros(5, 5, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist(), strict=True):
        if t != 255:
            naive[t, p] += 1
    whole, first, second = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(pred, target)
    first.update(pred[:1], target[:1])
    second.update(pred[1:], target[1:])
    assert torch.equal(whole.matrix, naive)
    assert torch.equal(first.merge(second).matrix, naive)
    first.reset()
    assert not first.matrix.any()
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(ConfusionMatrix(4))


@pytest.mark.parametrize("name, bad", [("target", 7), ("target", -1), ("pred", 3)])
def test_out_of_range_label_names_value_and_fix(name, bad):
    target, pred = torch.tensor([0, 1, 255]), torch.tensor([0, 1, 2])
    (target if name == "target" else pred)[1] = bad
    with pytest.raises(ValueError, match=rf"{name} label {bad} is outside 0..2.*num_classes"):
        ConfusionMatrix(3).update(pred, target)


def test_empty_matrix_scores_are_nan():
    scores = ConfusionMatrix(2).compute()
    assert math.isnan(scores["aAcc"]) and math.isnan(scores["mIoU"])
    assert scores["confused_pairs"] == []
