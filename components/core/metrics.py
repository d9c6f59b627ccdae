"""Exact segmentation metrics from a confusion matrix, in numpy.

Metrics are computed from confusion counts accumulated over every evaluated pixel, never by
averaging per-batch or per-image ratios, so the numbers do not depend on how the data was batched.
Pixels whose true label is 255 (ignore) are excluded everywhere.

Notation: `C` is the K x K confusion matrix, `C[t, p]` = number of pixels of true class t predicted as
class p. For class k: TP_k = C[k, k], FP_k = sum_t C[t, k] - TP_k, FN_k = sum_p C[k, p] - TP_k.
A class that appears neither in the truth nor in the prediction has an undefined IoU/Dice (NaN,
written as null in JSON) and is left out of the means, as Keras' MeanIoU does.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from segpipe.components.core.artifacts import IGNORE_LABEL


# Metric keys: the evaluation JSON, the blessing's checks, segpipe.json, `serving list`, the report.
PIXEL_ACCURACY = "pixel_accuracy"
ALL_BACKGROUND_ACCURACY = "all_background_accuracy"
MEAN_IOU = "mean_iou"
FOREGROUND_IOU = "foreground_iou"
DICE = "dice"
IOU_PER_CLASS = "iou_per_class"
DICE_PER_CLASS = "dice_per_class"
CONFUSION_MATRIX = "confusion_matrix"
NUM_EXAMPLES = "num_examples"
NUM_PIXELS = "num_pixels"
SCALAR_METRICS = (PIXEL_ACCURACY, ALL_BACKGROUND_ACCURACY, MEAN_IOU, FOREGROUND_IOU, DICE)
# The evaluation's top-level metrics are measured at each mask's own size; the same set measured at
# the model's S x S input sits under this key (the gap between the two is what resizing costs).
MODEL_RESOLUTION = "model_resolution"


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K int64 counts (rows = true class, columns = predicted class); 255 in `y_true` is skipped.

    Raises ValueError for a true label outside 0..K-1 and 255, or a prediction outside 0..K-1,
    because silently dropping such pixels would hide a data or model bug.
    """
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"true and predicted masks differ in size: {y_true.size} vs {y_pred.size}")
    keep = y_true != IGNORE_LABEL
    y_true, y_pred = y_true[keep], y_pred[keep]
    bad_true = (y_true < 0) | (y_true >= num_classes)
    if bad_true.any():
        raise ValueError(f"true mask has label {int(y_true[bad_true][0])} outside 0..{num_classes - 1} and 255")
    bad_pred = (y_pred < 0) | (y_pred >= num_classes)
    if bad_pred.any():
        raise ValueError(f"prediction has class {int(y_pred[bad_pred][0])} outside 0..{num_classes - 1}")
    counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def pixel_accuracy(cm: np.ndarray) -> float:
    """sum_k TP_k / sum(C): the fraction of non-ignored pixels labelled correctly (NaN if none)."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else math.nan


def all_background_accuracy(cm: np.ndarray) -> float:
    """sum_p C[0, p] / sum(C): the pixel accuracy of predicting background everywhere.

    The floor a useful model must beat: on data that is 90% background a model that finds nothing
    already scores 0.9 pixel accuracy.
    """
    total = cm.sum()
    return float(cm[0].sum() / total) if total else math.nan


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU_k = TP_k / (TP_k + FP_k + FN_k), NaN where the denominator is 0."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def dice_per_class(cm: np.ndarray) -> np.ndarray:
    """Dice_k = 2 TP_k / (2 TP_k + FP_k + FN_k), NaN where the denominator is 0."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def true_pixels(cm: np.ndarray) -> np.ndarray:
    """sum_p C[k, p]: labelled pixels of each class k."""
    return np.asarray(cm).sum(axis=1)


def predicted_pixels(cm: np.ndarray) -> np.ndarray:
    """sum_t C[t, k]: pixels predicted as each class k."""
    return np.asarray(cm).sum(axis=0)


def never_predicted(cm: np.ndarray) -> list[int]:
    """Classes present in the truth that the model never predicts: the clearest per-class failure.

    Their IoU is 0 like any bad class's, but the fix differs (the model has collapsed the class
    into others), so the gate names them separately.
    """
    return [k for k, (true, predicted) in enumerate(zip(true_pixels(cm), predicted_pixels(cm)))
            if true > 0 and predicted == 0]


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


def mean_iou(cm: np.ndarray) -> float:
    """Mean of IoU_k over every defined class, background (k = 0) included."""
    return _nanmean(iou_per_class(cm))


def foreground_iou(cm: np.ndarray) -> float:
    """Mean of IoU_k over the defined foreground classes k = 1..K-1 (binary: the IoU of class 1)."""
    return _nanmean(iou_per_class(cm)[1:])


def dice(cm: np.ndarray) -> float:
    """Mean of Dice_k over the defined foreground classes k = 1..K-1 (binary: F1 of class 1)."""
    return _nanmean(dice_per_class(cm)[1:])


def example_iou(cm: np.ndarray) -> float:
    """Foreground IoU of one example, used to rank examples from worst to best.

    An example with no foreground in truth or prediction scores 1.0: there was nothing to find and
    nothing was invented, which is a perfect answer.
    """
    value = foreground_iou(cm)
    return 1.0 if math.isnan(value) else value


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def summarize(cm: np.ndarray) -> dict[str, Any]:
    """Every metric of a confusion matrix as JSON-able values (undefined -> None)."""
    cm = np.asarray(cm, dtype=np.int64)
    return {
        PIXEL_ACCURACY: _json_float(pixel_accuracy(cm)),
        ALL_BACKGROUND_ACCURACY: _json_float(all_background_accuracy(cm)),
        MEAN_IOU: _json_float(mean_iou(cm)),
        FOREGROUND_IOU: _json_float(foreground_iou(cm)),
        DICE: _json_float(dice(cm)),
        IOU_PER_CLASS: [_json_float(v) for v in iou_per_class(cm)],
        DICE_PER_CLASS: [_json_float(v) for v in dice_per_class(cm)],
        NUM_PIXELS: int(cm.sum()),
        CONFUSION_MATRIX: cm.tolist(),
    }
