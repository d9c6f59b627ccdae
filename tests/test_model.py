"""U-Net architecture, losses and metrics on tiny hand-made tensors (no data files)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from segpipe.components.core import artifacts
from segpipe.components.core.model import (
    SegmentationLoss,
    SegmentationMetric,
    build_unet,
    dice,
    dice_bce_loss,
    get_loss,
    iou,
    masked_crossentropy,
    pixel_accuracy,
    segmentation_metrics,
    soft_dice_loss,
)

# One image, 2x3 pixels. Labels: 255 = ignore.
LABELS = np.array([[[0, 1, 1], [255, 0, 1]]], dtype=np.int64)
# Foreground probabilities of a binary head: predicted classes [[0, 1, 0], [1, 1, 1]].
BINARY_PROBS = np.array([[[0.2, 0.9, 0.4], [0.7, 0.6, 0.8]]], dtype=np.float32)[..., None]


def test_default_unet_is_the_tutorial_model():
    model = build_unet()
    assert model.count_params() == 31_031_745
    assert model.input_shape == (None, 128, 128, 3)
    assert model.output_shape == (None, 128, 128, 1)
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs[:10]] == [64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024]
    assert model.get_layer("head").activation.__name__ == "sigmoid"
    assert model.get_layer("head").dtype_policy.name == "float32"


@pytest.mark.parametrize(
    "size, classes, filters, depth, batch_norm",
    [(32, 1, 4, 2, False), (32, 3, 4, 3, True), (64, 5, 2, 4, False), (16, 2, 8, 1, True)],
)
def test_unet_variants_have_expected_shapes_and_names(size, classes, filters, depth, batch_norm):
    model = build_unet((size, size, 3), classes, filters, depth, batch_norm=batch_norm, dropout=0.1)
    assert model.output_shape == (None, size, size, classes)
    out = model(np.zeros((2, size, size, 3), np.float32))
    assert tuple(out.shape) == (2, size, size, classes)
    names = [layer.name for layer in model.layers]
    assert f"enc{depth}_pool" in names and f"dec{depth}_up" in names and "bottleneck_conv2" in names
    assert names == [layer.name for layer in build_unet((size, size, 3), classes, filters, depth, batch_norm=batch_norm, dropout=0.1).layers]
    assert model.get_layer("head").activation.__name__ == ("sigmoid" if classes == 1 else "softmax")
    assert any(n.endswith("_bn1") for n in names) == batch_norm


def test_unet_rejects_sizes_not_divisible_by_the_pooling_factor():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 8"):
        build_unet((36, 36, 3), depth=3)


def test_two_data_classes_use_the_binary_head():
    assert artifacts.output_channels(2) == 1 and artifacts.output_channels(3) == 3
    assert artifacts.data_classes(1) == 2 and artifacts.data_classes(3) == 3


def test_binary_metrics_exact_and_ignore_label():
    # Valid pixels: 5 (one 255). Correct: (0,0), (0,1), (1,2) -> 3/5.
    # Foreground: predicted {(0,1), (1,2), (1,1)}, true {(0,1), (0,2), (1,2)}; (1,0) is ignored.
    # |P & T| = 2, |P| = 3, |T| = 3 -> IoU = 2/4, Dice = 4/6.
    assert float(pixel_accuracy(LABELS, BINARY_PROBS)) == pytest.approx(3 / 5)
    assert float(iou(LABELS, BINARY_PROBS)) == pytest.approx(0.5)
    assert float(dice(LABELS, BINARY_PROBS)) == pytest.approx(2 / 3)
    # The ignored pixel's prediction must not matter.
    flipped = BINARY_PROBS.copy()
    flipped[0, 1, 0, 0] = 0.1
    assert float(iou(LABELS, flipped)) == pytest.approx(0.5)
    assert float(pixel_accuracy(LABELS, flipped)) == pytest.approx(3 / 5)


def test_multiclass_metrics_exact():
    labels = np.array([[[0, 1, 2, 2]]])
    # argmax predictions: [0, 2, 2, 1]
    probs = np.eye(3, dtype=np.float32)[np.array([[[0, 2, 2, 1]]])]
    # class 1: I=0, U=2 -> 0; class 2: I=1, U=3 -> 1/3. mean IoU = 1/6. Dice: 0 and 2/4 -> 1/4.
    assert float(pixel_accuracy(labels, probs, 3)) == pytest.approx(2 / 4)
    assert float(iou(labels, probs, 3)) == pytest.approx(1 / 6)
    assert float(dice(labels, probs, 3)) == pytest.approx(1 / 4)


def test_empty_foreground_everywhere_scores_one_and_all_ignored_accuracy_is_one():
    labels = np.zeros((1, 2, 2))
    probs = np.full((1, 2, 2, 1), 0.1, np.float32)
    assert float(iou(labels, probs)) == 1.0 and float(dice(labels, probs)) == 1.0
    assert float(pixel_accuracy(np.full((1, 2, 2), 255), probs)) == 1.0


def test_crossentropy_is_mean_over_valid_pixels():
    p = BINARY_PROBS[0, ..., 0]
    t = LABELS[0]
    valid = t != 255
    expected = -np.mean(np.where(t == 1, np.log(p), np.log(1 - p))[valid])
    assert float(masked_crossentropy(LABELS, BINARY_PROBS)) == pytest.approx(expected, rel=1e-5)
    # Labels shaped [N, H, W, 1] give the same value.
    assert float(masked_crossentropy(LABELS[..., None], BINARY_PROBS)) == pytest.approx(expected, rel=1e-5)
    # softmax: -log p_t over valid pixels.
    probs3 = np.array([[[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]], np.float32)
    labels3 = np.array([[[0, 255]]])
    assert float(masked_crossentropy(labels3, probs3)) == pytest.approx(-math.log(0.7), rel=1e-5)


def test_soft_dice_loss_and_combination():
    labels = np.array([[[1, 0, 255]]])
    probs = np.array([[[0.8, 0.2, 0.9]]], np.float32)[..., None]
    # valid: p = [0.8, 0.2], t = [1, 0]: dice = 2*0.8 / (1.0 + 1) = 0.8
    assert float(soft_dice_loss(labels, probs)) == pytest.approx(0.2, rel=1e-4)
    assert float(dice_bce_loss(labels, probs)) == pytest.approx(
        float(masked_crossentropy(labels, probs)) + 0.2, rel=1e-4
    )
    assert get_loss("dice_bce").kind == "dice_bce"
    with pytest.raises(ValueError, match="train.loss"):
        get_loss("focal")


def test_metric_accumulates_dataset_level_counts_over_batches():
    metric = SegmentationMetric("iou", 2)
    first = (np.array([[[1, 1]]]), np.array([[[0.9, 0.9]]], np.float32)[..., None])  # I=2, U=2: IoU 1
    second = (np.array([[[0, 1, 1, 1]]]), np.array([[[0.9, 0.1, 0.1, 0.1]]], np.float32)[..., None])  # I=0, U=4
    metric.update_state(*first)
    metric.update_state(*second)
    assert float(metric.result()) == pytest.approx(2 / 6)  # the mean of batch ratios would be 0.5
    metric.reset_state()
    metric.update_state(*second)
    assert float(metric.result()) == 0.0


def test_the_metrics_of_a_traced_step_share_one_count_and_keep_their_values():
    import tensorflow as tf

    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 2, (2, 6, 6)).astype(np.int32)
    y_true[0, 0] = 255  # ignored pixels
    y_pred = rng.uniform(0, 1, (2, 6, 6, 1)).astype(np.float32)
    traced, eager = segmentation_metrics(2), segmentation_metrics(2)

    @tf.function
    def step(labels, probabilities):
        for metric in traced:
            metric.update_state(labels, probabilities)

    graph = step.get_concrete_function(tf.TensorSpec(y_true.shape, tf.int32), tf.TensorSpec(y_pred.shape)).graph
    assert [op.type for op in graph.get_operations()].count("OneHot") == 2  # prediction and truth, once
    step(y_true, y_pred)
    for metric in eager:  # eager calls: each metric counts on its own
        metric.update_state(y_true, y_pred)
    for shared, alone in zip(traced, eager):
        assert float(shared.result()) == pytest.approx(float(alone.result()))
    assert 0.2 < float(eager[1].result()) < 0.8  # a value that would differ if a count were lost


def test_tiny_unet_loss_falls_on_generated_data():
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 0.3, (16, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((16, 32, 32), np.int64)
    for i in range(16):
        y, x = rng.integers(0, 16, 2)
        images[i, y : y + 12, x : x + 12] += 0.6
        masks[i, y : y + 12, x : x + 12] = 1
    masks[:, 0, :] = 255  # an ignored border row
    model = build_unet((32, 32, 3), 1, base_filters=4, depth=2)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=get_loss("bce"), metrics=segmentation_metrics(2))
    history = model.fit(images, masks, batch_size=8, epochs=6, verbose=0).history
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    assert set(history) >= {"pixel_accuracy", "iou", "dice"}


def test_batch_norm_momentum_reaches_every_bn_layer():
    import keras

    model = build_unet((16, 16, 3), 2, 4, 2, batch_norm=True, bn_momentum=0.8)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 10 and {layer.momentum for layer in norms} == {0.8}  # 2 per level, 5 levels
    assert {layer.momentum for layer in build_unet((16, 16, 3), 2, 4, 2, batch_norm=True).layers
            if isinstance(layer, keras.layers.BatchNormalization)} == {0.99}  # Keras's default


def test_class_weighted_crossentropy_is_the_weighted_mean_over_valid_pixels():
    p = BINARY_PROBS[0, ..., 0]
    t = LABELS[0]
    valid = t != 255
    pixel = -np.where(t == 1, np.log(p), np.log(1 - p))
    w = np.where(t == 1, 3.0, 0.5)
    expected = (pixel * w)[valid].sum() / w[valid].sum()
    assert float(masked_crossentropy(LABELS, BINARY_PROBS, [0.5, 3.0])) == pytest.approx(expected, rel=1e-5)
    # Softmax: class 2 weighted 4x against class 0.
    probs3 = np.array([[[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]], np.float32)
    labels3 = np.array([[[0, 2, 255]]])
    expected3 = (-math.log(0.7) * 1 - math.log(0.8) * 4) / 5
    assert float(masked_crossentropy(labels3, probs3, [1.0, 1.0, 4.0])) == pytest.approx(expected3, rel=1e-5)
    assert float(dice_bce_loss(labels3, probs3, [1.0, 1.0, 4.0])) == pytest.approx(
        expected3 + float(soft_dice_loss(labels3, probs3)), rel=1e-5)


def test_k_class_soft_dice_is_the_mean_over_foreground_classes():
    # 3 classes, 4 valid pixels. Class 1: p = [0.2, 0.6, 0.1, 0.1], t = [0, 1, 0, 0] -> 2*0.6 / (1.0 + 1);
    # class 2: p = [0.1, 0.2, 0.8, 0.1], t = [0, 0, 1, 0] -> 2*0.8 / (1.2 + 1). Background is left out.
    probs = np.array([[[[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.0, 0.0, 1.0]]]], np.float32)
    labels = np.array([[[0, 1, 2, 0, 255]]])
    expected = 1 - (1.2 / 2.0 + 1.6 / 2.2) / 2
    assert float(soft_dice_loss(labels, probs)) == pytest.approx(expected, rel=1e-4)


def test_class_weights_survive_the_loss_config():
    loss = get_loss("dice_bce", [0.5, 2.0, 6.0])
    again = SegmentationLoss.from_config(loss.get_config())
    assert (again.kind, again.class_weights) == ("dice_bce", [0.5, 2.0, 6.0])
    assert get_loss("bce").class_weights is None


def rare_class_data(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32 px: a red rectangle of class 1 (~15% of the pixels) and a 5x5 blue square of class 2 (~2.4%)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.4, (num, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((num, 32, 32), np.int64)
    for i in range(num):
        h, w = rng.integers(10, 16, 2)
        y, x = rng.integers(0, 32 - h), rng.integers(0, 32 - w)
        images[i, y : y + h, x : x + w, 0] += 0.5
        masks[i, y : y + h, x : x + w] = 1
        y, x = rng.integers(0, 27, 2)
        images[i, y : y + 5, x : x + 5, 2] += 0.5
        masks[i, y : y + 5, x : x + 5] = 2
    return images, masks


def test_imbalance_loss_learns_a_rare_class_that_plain_crossentropy_misses():
    import keras

    from segpipe.components.trainer import class_weights_from_counts

    images, masks = rare_class_data(32, 0)
    eval_images, eval_masks = rare_class_data(16, 1)
    counts = np.bincount(masks.ravel(), minlength=3)
    assert 0.02 < counts[2] / counts.sum() < 0.04
    weights = class_weights_from_counts(counts.tolist())
    rare_iou = {}
    for name, loss in (("ce", get_loss("bce")), ("dice_ce_weighted", get_loss("dice_bce", weights))):
        keras.utils.set_random_seed(0)
        model = build_unet((32, 32, 3), 3, base_filters=4, depth=2)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss)
        model.fit(images, masks, batch_size=8, epochs=25, verbose=0)
        metric = SegmentationMetric("iou", 3)
        metric.update_state(eval_masks, model(eval_images))
        counts_ = {k: v.numpy() for k, v in metric.counts.items()}
        union = counts_["predicted"] + counts_["target"] - counts_["intersection"]
        rare_iou[name] = float(counts_["intersection"][2] / union[2])
    assert rare_iou["dice_ce_weighted"] > 0.2, rare_iou
    assert rare_iou["ce"] < rare_iou["dice_ce_weighted"], rare_iou
