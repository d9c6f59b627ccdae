"""Metrics on hand-made masks with exact expected values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from segpipe.components.core import metrics as sm


def test_binary_masks_with_ignore_pixel() -> None:
    true = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 0], [0, 0, 1, 1]])
    cm = sm.confusion_matrix(true, pred, 2)
    assert cm.tolist() == [[3, 1], [1, 2]]  # the 255 pixel is not counted
    assert sm.pixel_accuracy(cm) == pytest.approx(5 / 7)
    assert sm.all_background_accuracy(cm) == pytest.approx(4 / 7)
    assert sm.iou_per_class(cm) == pytest.approx([3 / 5, 1 / 2])
    assert sm.mean_iou(cm) == pytest.approx(0.55)
    assert sm.foreground_iou(cm) == pytest.approx(0.5)
    assert sm.dice(cm) == pytest.approx(2 / 3)


def test_all_background_truth_and_prediction() -> None:
    cm = sm.confusion_matrix(np.zeros((4, 4)), np.zeros((4, 4)), 2)
    assert cm.tolist() == [[16, 0], [0, 0]]
    assert sm.pixel_accuracy(cm) == 1.0
    assert sm.all_background_accuracy(cm) == 1.0
    assert sm.mean_iou(cm) == 1.0  # the undefined foreground class is left out
    assert math.isnan(sm.foreground_iou(cm))
    assert math.isnan(sm.dice(cm))
    assert sm.example_iou(cm) == 1.0
    summary = sm.summarize(cm)
    assert summary["foreground_iou"] is None and summary["iou_per_class"] == [1.0, None]


def test_all_foreground_predicted_right_and_wrong() -> None:
    ones = np.ones((3, 3))
    right = sm.confusion_matrix(ones, ones, 2)
    assert sm.pixel_accuracy(right) == 1.0
    assert sm.all_background_accuracy(right) == 0.0
    assert sm.foreground_iou(right) == 1.0 and sm.mean_iou(right) == 1.0
    wrong = sm.confusion_matrix(ones, np.zeros((3, 3)), 2)
    assert wrong.tolist() == [[0, 0], [9, 0]]
    assert sm.pixel_accuracy(wrong) == 0.0
    assert sm.iou_per_class(wrong).tolist() == [0.0, 0.0]
    assert sm.foreground_iou(wrong) == 0.0 and sm.dice(wrong) == 0.0
    assert sm.example_iou(wrong) == 0.0


def test_multiclass_exact_values() -> None:
    true = np.array([0, 0, 1, 1, 2, 2, 2, 255])
    pred = np.array([0, 1, 1, 1, 2, 0, 1, 2])
    cm = sm.confusion_matrix(true, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 1, 1]]
    assert sm.pixel_accuracy(cm) == pytest.approx(4 / 7)
    assert sm.all_background_accuracy(cm) == pytest.approx(2 / 7)
    assert sm.iou_per_class(cm) == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert sm.mean_iou(cm) == pytest.approx(7 / 18)
    assert sm.foreground_iou(cm) == pytest.approx(5 / 12)
    assert sm.dice_per_class(cm)[1:] == pytest.approx([2 / 3, 1 / 2])
    assert sm.dice(cm) == pytest.approx(7 / 12)


def test_class_absent_everywhere_is_left_out_of_means() -> None:
    cm = sm.confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3)
    iou = sm.iou_per_class(cm)
    assert iou[:2] == pytest.approx([1 / 2, 2 / 3]) and math.isnan(iou[2])
    assert sm.foreground_iou(cm) == pytest.approx(2 / 3)
    assert sm.mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_accumulated_counts_are_exact_not_averaged_ratios() -> None:
    # Example A: 1 pixel, right. Example B: 3 pixels, all wrong. Exact accuracy is 1/4, not (1 + 0) / 2.
    cm_a = sm.confusion_matrix(np.array([1]), np.array([1]), 2)
    cm_b = sm.confusion_matrix(np.array([1, 1, 0]), np.array([0, 0, 1]), 2)
    total = cm_a + cm_b
    assert sm.pixel_accuracy(total) == pytest.approx(0.25)
    concat = sm.confusion_matrix(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 1]), 2)
    assert total.tolist() == concat.tolist()


def test_only_ignored_pixels_give_undefined_accuracy() -> None:
    cm = sm.confusion_matrix(np.full((2, 2), 255), np.zeros((2, 2)), 2)
    assert cm.sum() == 0
    assert math.isnan(sm.pixel_accuracy(cm))
    assert sm.summarize(cm)["pixel_accuracy"] is None


@pytest.mark.parametrize(
    "true, pred, message",
    [
        ([0, 3], [0, 1], "label 3 outside 0..1"),
        ([0, 1], [0, 2], "class 2 outside 0..1"),
        ([0, 1, 1], [0, 1], "differ in size"),
    ],
)
def test_invalid_labels_are_rejected(true: list, pred: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sm.confusion_matrix(np.array(true), np.array(pred), 2)


def test_pixels_per_class_and_classes_never_predicted() -> None:
    # Class 1 is predicted once (wrongly); class 2 is in the truth but never predicted; class 3 is absent.
    cm = sm.confusion_matrix(np.array([0, 0, 1, 2, 2, 255]), np.array([0, 1, 0, 0, 1, 2]), 4)
    assert sm.true_pixels(cm).tolist() == [2, 1, 2, 0]
    assert sm.predicted_pixels(cm).tolist() == [3, 2, 0, 0]
    assert sm.never_predicted(cm) == [2]
    assert sm.never_predicted(sm.confusion_matrix(np.array([0, 1]), np.array([0, 1]), 2)) == []
