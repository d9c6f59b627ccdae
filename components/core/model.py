"""The U-Net, its losses and its metrics (Keras 3 only: `import keras`, never `tf.keras`).

`build_unet()` with its defaults is the classic U-Net of the Keras tutorial (the `seed` profile):
31,031,745 parameters at 128x128x3. Losses and metrics are pure functions of `keras.ops` tensors, so
they run on any Keras backend; the Keras metric classes only accumulate their counts over an epoch.

Label convention everywhere: `y_true` holds class ids (int, shape [N, H, W] or [N, H, W, 1]);
pixels equal to IGNORE_LABEL (255) count in neither loss nor metrics. `y_pred` holds probabilities
[N, H, W, C]: C = 1 is the binary sigmoid head (class 1 = foreground), C = K >= 2 a softmax.
"""
from __future__ import annotations

import threading
from typing import Any

import keras
from keras import layers, ops

from segpipe.components.core.artifacts import IGNORE_LABEL
from segpipe.components.core.batch_norm import FusedBatchNormalization

EPSILON = 1e-7


# ---------------------------------------------------------------- architecture


def conv_block(
    x: Any, filters: int, name: str, *, batch_norm: bool = False, bn_momentum: float = 0.99, dropout: float = 0.0
) -> Any:
    """Two 3x3 'same' convolutions with ReLU (the tutorial's level), optional BN and dropout.

    `bn_momentum` is the moving-average momentum of the BN statistics that inference uses. Keras's
    0.99 still weighs the initial values (mean 0, variance 1) by 0.99**n after n steps, 27% after
    130, so a short run needs a smaller one (the trainer fits it to the run).
    """
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm, name=f"{name}_conv{i}")(x)
        if batch_norm:
            x = FusedBatchNormalization(momentum=bn_momentum, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def encoder_block(x: Any, filters: int, name: str, **block: Any) -> tuple[Any, Any]:
    """Returns (skip features, 2x2 max-pooled features)."""
    skip = conv_block(x, filters, name, **block)
    return skip, layers.MaxPooling2D(2, name=f"{name}_pool")(skip)


def decoder_block(x: Any, skip: Any, filters: int, name: str, **block: Any) -> Any:
    """2x2 stride-2 transposed convolution, concatenation with the skip, conv block."""
    x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    return conv_block(x, filters, name, **block)


def segmentation_head(x: Any, num_classes: int) -> Any:
    """1x1 convolution to sigmoid (1 class) or softmax (K classes), always float32 output.

    float32 keeps probabilities exact under the mixed_float16 policy (the usual mixed-precision rule
    for the last layer).
    """
    activation = "sigmoid" if num_classes == 1 else "softmax"
    return layers.Conv2D(num_classes, 1, activation=activation, dtype="float32", name="head")(x)


def build_unet(
    input_shape: tuple[int, int, int] = (128, 128, 3),
    num_classes: int = 1,
    base_filters: int = 64,
    depth: int = 4,
    batch_norm: bool = False,
    dropout: float = 0.0,
    bn_momentum: float = 0.99,
    name: str = "unet",
) -> keras.Model:
    """The tutorial's U-Net, generalised: `depth` pooling levels, filters doubling from `base_filters`.

    Height and width must be divisible by 2**depth; None accepts any such size. Layer names are deterministic
    (`enc1_conv1` ... `bottleneck_conv2`, `dec1_up` ..., `head`) so weights can be matched by name.
    """
    height, width = input_shape[0], input_shape[1]
    factor = 2**depth
    if any(side is not None and side % factor for side in (height, width)):
        raise ValueError(f"input_shape {input_shape}: height and width must be divisible by 2**depth = {factor}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    block = {"batch_norm": batch_norm, "bn_momentum": bn_momentum, "dropout": dropout}
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x, skips = inputs, []
    for level in range(1, depth + 1):
        skip, x = encoder_block(x, base_filters * 2 ** (level - 1), f"enc{level}", **block)
        skips.append(skip)
    x = conv_block(x, base_filters * 2**depth, "bottleneck", **block)
    for level in range(depth, 0, -1):
        x = decoder_block(x, skips[level - 1], base_filters * 2 ** (level - 1), f"dec{level}", **block)
    return keras.Model(inputs, segmentation_head(x, num_classes), name=name)


# ---------------------------------------------------------------- tensor helpers


def _labels_and_valid(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    """Class ids as int32 [N, H, W] with ignored pixels set to 0, and the float validity mask."""
    labels = ops.reshape(ops.cast(y_true, "int32"), ops.shape(y_pred)[:-1])
    valid = ops.not_equal(labels, IGNORE_LABEL)
    return ops.where(valid, labels, 0), ops.cast(valid, "float32")


def _one_hot(labels: Any, channels: int) -> Any:
    """Binary head (1 channel): the foreground indicator; K channels: one-hot over K classes."""
    if channels == 1:
        return ops.expand_dims(ops.cast(ops.equal(labels, 1), "float32"), -1)
    return ops.one_hot(labels, channels, dtype="float32")


def predicted_classes(y_pred: Any) -> Any:
    """Class ids [N, H, W]: probability > 0.5 for the binary head, argmax otherwise."""
    if y_pred.shape[-1] == 1:
        return ops.cast(ops.greater(y_pred[..., 0], 0.5), "int32")
    return ops.cast(ops.argmax(y_pred, axis=-1), "int32")


# ---------------------------------------------------------------- losses


def _pixel_weights(labels: Any, valid: Any, class_weights: Any) -> Any:
    """w = v * class_weights[t] per pixel (v = 1 where y_true != 255); w = v without class weights."""
    if class_weights is None:
        return valid
    return ops.take(ops.convert_to_tensor(class_weights, "float32"), labels) * valid


def masked_crossentropy(y_true: Any, y_pred: Any, class_weights: Any = None) -> Any:
    """Mean cross-entropy over non-ignored pixels, optionally weighted by the pixel's true class.

    Binary head: -[t log p + (1 - t) log(1 - p)] (the tutorial's binary cross-entropy);
    softmax: -log p_t. Probabilities are clipped to [eps, 1 - eps]. Mean = sum(loss * w) / sum(w),
    w = v * class_weights[t] with v = 1 where y_true != 255 (w = v without class weights; the binary
    head takes [w_background, w_foreground]); 0 when every pixel is ignored.
    """
    labels, valid = _labels_and_valid(y_true, y_pred)
    probs = ops.clip(ops.cast(y_pred, "float32"), EPSILON, 1.0 - EPSILON)
    target = _one_hot(labels, y_pred.shape[-1])
    if y_pred.shape[-1] == 1:
        pixel = -(target * ops.log(probs) + (1.0 - target) * ops.log(1.0 - probs))[..., 0]
    else:
        pixel = -ops.sum(target * ops.log(probs), axis=-1)
    weight = _pixel_weights(labels, valid, class_weights)
    return ops.sum(pixel * weight) / ops.maximum(ops.sum(weight), EPSILON)


def soft_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """1 - soft Dice over non-ignored pixels, averaged over the foreground classes.

    Dice_c = (2 sum(p_c t_c v) + eps) / (sum(p_c v) + sum(t_c v) + eps), summed over the whole batch;
    foreground channels are the single sigmoid channel, or softmax channels 1..K-1 (background
    excluded). Every foreground class counts equally whatever its pixel share, which is what lets a
    class covering a few percent of the pixels pull as hard as a large one.
    """
    labels, valid = _labels_and_valid(y_true, y_pred)
    target = _one_hot(labels, y_pred.shape[-1])
    probs = ops.cast(y_pred, "float32")
    if y_pred.shape[-1] > 1:
        target, probs = target[..., 1:], probs[..., 1:]
    weight = ops.expand_dims(valid, -1)
    axes = tuple(range(len(y_pred.shape) - 1))
    intersection = ops.sum(probs * target * weight, axis=axes)
    total = ops.sum(probs * weight, axis=axes) + ops.sum(target * weight, axis=axes)
    dice = (2.0 * intersection + EPSILON) / (total + EPSILON)
    return 1.0 - ops.mean(dice)


def dice_bce_loss(y_true: Any, y_pred: Any, class_weights: Any = None) -> Any:
    """masked_crossentropy (class-weighted when weights are given) + soft_dice_loss; both ignore 255.

    Binary or K-class alike: the cross-entropy is binary for the sigmoid head, categorical otherwise.
    """
    return masked_crossentropy(y_true, y_pred, class_weights) + soft_dice_loss(y_true, y_pred)


LOSSES = {"bce": masked_crossentropy, "dice_bce": dice_bce_loss}


@keras.saving.register_keras_serializable(package="segpipe")
class SegmentationLoss(keras.losses.Loss):
    """Keras wrapper that hands (y_true, y_pred) to the pure loss unchanged.

    (keras.losses.LossFunctionWrapper would squeeze a 1-channel y_pred to the label's rank.)
    The pure losses already return the mean over valid pixels, a scalar. `class_weights` (one per
    data class, or None) weight the cross-entropy term.
    """

    def __init__(
        self, kind: str = "bce", class_weights: list[float] | None = None, name: str | None = None, **kwargs: Any
    ) -> None:
        if kind not in LOSSES:
            raise ValueError(f"train.loss: {kind!r} is not one of {', '.join(LOSSES)}")
        super().__init__(name=name or kind, **kwargs)
        self.kind = kind
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return LOSSES[self.kind](y_true, y_pred, self.class_weights)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "kind": self.kind, "class_weights": self.class_weights}


def get_loss(name: str, class_weights: list[float] | None = None) -> SegmentationLoss:
    """The Keras loss for config `train.loss` ('bce' or 'dice_bce'), optionally class-weighted."""
    return SegmentationLoss(name, class_weights)


# ---------------------------------------------------------------- metrics (pure functions)


def confusion_counts(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, Any]:
    """Per-class counts over non-ignored pixels, the sufficient statistics of every metric below.

    num_classes counts data classes (2 for the binary head). Returns float32 tensors:
    `intersection`[c] = |P_c and T_c|, `predicted`[c] = |P_c|, `target`[c] = |T_c|,
    `correct` = sum_c intersection[c], `valid` = number of non-ignored pixels.
    """
    labels, valid = _labels_and_valid(y_true, y_pred)
    predicted = predicted_classes(y_pred)
    pred_1h = ops.one_hot(predicted, num_classes, dtype="float32") * ops.expand_dims(valid, -1)
    true_1h = ops.one_hot(labels, num_classes, dtype="float32") * ops.expand_dims(valid, -1)
    axes = (0, 1, 2)
    intersection = ops.sum(pred_1h * true_1h, axis=axes)
    return {
        "intersection": intersection,
        "predicted": ops.sum(pred_1h, axis=axes),
        "target": ops.sum(true_1h, axis=axes),
        "correct": ops.sum(intersection),
        "valid": ops.sum(valid),
    }


_last_counts = threading.local()  # per thread: tf.distribute traces each replica's step in its own


def step_confusion_counts(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, Any]:
    """confusion_counts, computed once for all the metrics of one step.

    Keras hands every compiled metric the same y_true and y_pred tensor objects, so the metrics
    after the first reuse its counts: three metrics cost one computation (104 graph ops per step
    instead of 188, a fixed cost that weighs on small CPU batches). Only inside
    a TensorFlow graph, where tensors cannot change, and by identity: any other input is counted
    afresh (an eager call may pass a numpy buffer refilled in place).
    """
    if not _in_tf_graph():
        return confusion_counts(y_true, y_pred, num_classes)
    last = getattr(_last_counts, "entry", None)
    if last is not None and last[0] is y_true and last[1] is y_pred and last[2] == num_classes:
        return last[3]
    counts = confusion_counts(y_true, y_pred, num_classes)
    _last_counts.entry = (y_true, y_pred, num_classes, counts)
    return counts


def _in_tf_graph() -> bool:
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.executing_eagerly()


def pixel_accuracy_from_counts(counts: dict[str, Any]) -> Any:
    """Accuracy = correct / valid (1 when every pixel is ignored)."""
    return ops.where(counts["valid"] > 0, counts["correct"] / ops.maximum(counts["valid"], 1.0), 1.0)


def _mean_foreground(numerator: Any, denominator: Any) -> Any:
    """Mean of numerator/denominator over foreground classes 1..K-1 with denominator > 0.

    A class absent from both prediction and truth is skipped; if all are absent the score is 1
    (nothing to find, nothing found).
    """
    num, den = numerator[1:], denominator[1:]
    present = ops.cast(den > 0, "float32")
    ratios = num / ops.maximum(den, EPSILON) * present
    n_present = ops.sum(present)
    return ops.where(n_present > 0, ops.sum(ratios) / ops.maximum(n_present, 1.0), 1.0)


def iou_from_counts(counts: dict[str, Any]) -> Any:
    """Foreground IoU = mean_c |P_c and T_c| / |P_c or T_c| over classes c >= 1."""
    union = counts["predicted"] + counts["target"] - counts["intersection"]
    return _mean_foreground(counts["intersection"], union)


def dice_from_counts(counts: dict[str, Any]) -> Any:
    """Foreground Dice = mean_c 2 |P_c and T_c| / (|P_c| + |T_c|) over classes c >= 1."""
    return _mean_foreground(2.0 * counts["intersection"], counts["predicted"] + counts["target"])


def pixel_accuracy(y_true: Any, y_pred: Any, num_classes: int = 2) -> Any:
    """Fraction of non-ignored pixels whose predicted class equals the label."""
    return pixel_accuracy_from_counts(confusion_counts(y_true, y_pred, num_classes))


def iou(y_true: Any, y_pred: Any, num_classes: int = 2) -> Any:
    """Foreground intersection over union (see iou_from_counts)."""
    return iou_from_counts(confusion_counts(y_true, y_pred, num_classes))


def dice(y_true: Any, y_pred: Any, num_classes: int = 2) -> Any:
    """Foreground Dice coefficient (see dice_from_counts)."""
    return dice_from_counts(confusion_counts(y_true, y_pred, num_classes))


# ---------------------------------------------------------------- Keras metric wrappers


@keras.saving.register_keras_serializable(package="segpipe")
class SegmentationMetric(keras.metrics.Metric):
    """Accumulates confusion_counts over an epoch, so the epoch value is the dataset-level ratio
    (not a mean of per-batch ratios)."""

    result_fns = {"pixel_accuracy": pixel_accuracy_from_counts, "iou": iou_from_counts, "dice": dice_from_counts}

    def __init__(self, kind: str = "iou", num_classes: int = 2, name: str | None = None, **kwargs: Any) -> None:
        if kind not in self.result_fns:
            raise ValueError(f"unknown segmentation metric {kind!r}")
        super().__init__(name=name or kind, **kwargs)
        self.kind, self.num_classes = kind, num_classes
        self.counts = {
            key: self.add_variable(shape=shape, initializer="zeros", name=key)
            for key, shape in (
                ("intersection", (num_classes,)),
                ("predicted", (num_classes,)),
                ("target", (num_classes,)),
                ("correct", ()),
                ("valid", ()),
            )
        }

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        batch = step_confusion_counts(y_true, y_pred, self.num_classes)
        for key, variable in self.counts.items():
            variable.assign_add(batch[key])  # per-replica copies, summed on read under tf.distribute

    def result(self) -> Any:
        return self.result_fns[self.kind]({k: ops.convert_to_tensor(v) for k, v in self.counts.items()})

    def reset_state(self) -> None:
        for variable in self.counts.values():
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "kind": self.kind, "num_classes": self.num_classes}


def segmentation_metrics(num_classes: int) -> list[keras.metrics.Metric]:
    """pixel_accuracy, iou, dice for K data classes (K = 2 for the binary head)."""
    return [SegmentationMetric(kind, num_classes) for kind in ("pixel_accuracy", "iou", "dice")]
