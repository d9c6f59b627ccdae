"""U-Nets on keras.applications backbones: MobileNetV2 or ResNet50 as the encoder (`model.encoder`).

The backbone is built with `weights=None` (nothing is ever downloaded) and its features at strides
2, 4, 8 and 16 are the skip connections, the backbone's output (stride 32) the bottleneck, as in
segmentation_models. The decoder doubles the resolution five times (bilinear upsampling, concat
with the skip of that stride, core.model's conv block), and the head is core.model's, so losses,
metrics, export and serving see the same [N, S, S, C] probabilities as from `build_unet`.

The input contract does not change either: the model takes the Transform's output (x / 255, or
standardised) with 1 or 3 channels. A fixed 1x1 convolution, `encoder_input`, maps it to the
range the backbone was trained on: it undoes the Transform's scaling, repeats a grey channel to
three, and applies the backbone's own `keras.applications.<module>.preprocess_input` (MobileNetV2:
pixels / 127.5 - 1; ResNet50: RGB to BGR minus the ImageNet channel means). All three are affine
per pixel, so one fixed convolution holds them exactly, and a saved model.keras needs no custom
layer to load.

Pretrained weights (`model.encoder_weights`) are the backbone's own Keras weights file:
`keras.applications.<Backbone>(include_top=False, weights=None, ...).save_weights("x.weights.h5")`,
or the no-top `.h5` file keras.applications itself would download. They load into the `encoder`
sub-model strictly: every backbone layer must be in the file with its shapes, so a file of another
backbone or width fails (layers the backbone does not have, such as a classifier top, are unused).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

UNET = "unet"  # the plain U-Net of core.model.build_unet: no backbone
ENCODER_LAYER = "encoder"  # the backbone sub-model inside the U-Net: what is frozen and loaded
INPUT_LAYER = "encoder_input"  # the fixed 1x1 convolution to the backbone's input range
OUTPUT_STRIDE = 32  # both backbones halve the input five times
MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)  # the widths keras.applications publishes weights for
WEIGHT_SUFFIXES = (".weights.h5", ".h5")  # Keras 3 weights file, or keras.applications' legacy HDF5


@dataclass(frozen=True)
class Backbone:
    application: str  # constructor in keras.applications
    module: str  # keras.applications submodule holding its preprocess_input
    skips: tuple[str, ...]  # layers whose outputs are at strides 2, 4, 8, 16
    widths: bool  # takes keras.applications' `alpha` width multiplier


ENCODERS = {
    "mobilenet_v2": Backbone("MobileNetV2", "mobilenet_v2", ("block_1_expand_relu", "block_3_expand_relu",
                                                             "block_6_expand_relu", "block_13_expand_relu"), True),
    "resnet50": Backbone("ResNet50", "resnet50", ("conv1_relu", "conv2_block3_out", "conv3_block4_out",
                                                  "conv4_block6_out"), False),
}
ENCODER_CHOICES = (UNET, *ENCODERS)


def size_multiple(encoder: str) -> int:
    """What the input height and width must be divisible by because of the encoder (1 for the U-Net,
    whose own constraint is 2**model.depth)."""
    return 1 if encoder == UNET else OUTPUT_STRIDE


def input_size_problem(encoder: str, image_size: int) -> str | None:
    """Why `image_size` does not fit `encoder`, naming both fields, or None when it does."""
    multiple = size_multiple(encoder)
    if image_size % multiple:
        return (f"model.encoder {encoder} needs transform.image_size divisible by {multiple} (its output stride), "
                f"got {image_size}")
    return None


def uses_patches(image_size: int, crop: int) -> bool:
    """Whether `train.crop_size` trains on patches: 0 and the whole input size both mean whole inputs."""
    return 0 < crop < image_size


def training_side(image_size: int, crop: int) -> int:
    """The side of what the model trains on: the patch, or the whole input."""
    return crop if uses_patches(image_size, crop) else image_size


def crop_size_problem(crop: int, image_size: int, *, depth: int, encoder: str) -> str | None:
    """Why `train.crop_size` cannot train this model on this input, naming the fields, or None."""
    if crop == 0 or crop == image_size:
        return None
    if crop > image_size:
        return f"train.crop_size {crop} is larger than transform.image_size {image_size}; use 0 for whole images"
    multiple = 2**depth if encoder == UNET else size_multiple(encoder)
    if crop % multiple:
        return (f"train.crop_size {crop} is not divisible by {multiple} "
                + ("(2**model.depth)" if encoder == UNET else f"(model.encoder {encoder}'s output stride)"))
    return None


def input_conversion(encoder: str, scale: Sequence[float], offset: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [1, 1, C, 3], bias [3]) of the 1x1 convolution from the model input to the backbone's input.

    The model input x has C = len(scale) channels with pixel / 255 = x * scale + offset per channel
    (scale 1, offset 0 for the Transform's x / 255). The backbone's preprocess_input is affine per
    pixel, pre(p) = p M + b, so its M and b are read off by applying it to black and to each pure
    channel; a single channel is repeated to all three.
    """
    import keras

    scale, offset = np.asarray(scale, np.float64), np.asarray(offset, np.float64)
    channels = len(scale)
    if channels not in (1, 3) or len(offset) != channels:
        raise ValueError(f"input scale {list(scale)} and offset {list(offset)}: need 1 or 3 channels each")
    preprocess = getattr(keras.applications, ENCODERS[encoder].module).preprocess_input
    probes = np.concatenate([np.zeros((1, 3)), 255.0 * np.eye(3)]).astype(np.float32).reshape(4, 1, 1, 3)
    out = np.asarray(preprocess(probes), np.float64).reshape(4, 3)
    bias, matrix = out[0], (out[1:] - out[0]) / 255.0
    expand = np.eye(3) if channels == 3 else np.ones((1, 3))  # input channel -> the RGB channels it feeds
    kernel = (255.0 * scale[:, None] * expand) @ matrix
    bias = (255.0 * offset @ expand) @ matrix + bias
    return kernel.reshape(1, 1, channels, 3).astype(np.float32), bias.astype(np.float32)


def build_encoder_unet(
    encoder: str,
    input_shape: tuple[int, int, int] = (128, 128, 3),
    num_classes: int = 1,
    *,
    base_filters: int = 16,
    batch_norm: bool = True,
    dropout: float = 0.0,
    bn_momentum: float = 0.99,
    alpha: float = 1.0,
    input_scale: Sequence[float] | None = None,
    input_offset: Sequence[float] | None = None,
) -> Any:
    """A U-Net whose encoder is the `encoder` backbone (randomly initialised; see load_encoder_weights).

    Decoder level k (k = 4..0, at stride 2**k) has base_filters * 2**k filters: 256, 128, 64, 32, 16
    for the default 16, segmentation_models' decoder. `bn_momentum` applies to the decoder's and the
    backbone's batch norm alike (the trainer fits it to short runs). `alpha` is MobileNetV2's width
    multiplier. `input_scale` / `input_offset`: see input_conversion (default: the Transform's x / 255).
    Layer names are deterministic: `encoder_input`, `encoder` (the backbone), `dec4_up` ... `dec0_conv2`, `head`.
    """
    import keras
    from keras import layers

    from segpipe.components.core.model import conv_block, segmentation_head

    if encoder not in ENCODERS:
        raise ValueError(f"model.encoder: {encoder!r} is not one of {', '.join(ENCODERS)}")
    height, width, channels = input_shape
    for size in {height, width} - {None}:  # None: any size (checked by the data's own shape)
        problem = input_size_problem(encoder, size)
        if problem:
            raise ValueError(problem)
    spec = ENCODERS[encoder]
    if spec.widths and alpha not in MOBILENET_ALPHAS:
        raise ValueError(f"model.encoder_alpha: {alpha} is not one of {', '.join(map(str, MOBILENET_ALPHAS))}")
    if not spec.widths and alpha != 1.0:
        raise ValueError(f"model.encoder_alpha: {encoder} has no width multiplier; use 1.0, got {alpha}")
    scale = [1.0] * channels if input_scale is None else list(input_scale)
    offset = [0.0] * channels if input_offset is None else list(input_offset)

    backbone = getattr(keras.applications, spec.application)(
        input_shape=(height, width, 3), include_top=False, weights=None, **({"alpha": alpha} if spec.widths else {}))
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum
    features = keras.Model(backbone.inputs, [backbone.get_layer(n).output for n in spec.skips] + [backbone.output],
                           name=ENCODER_LAYER)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    # float32 like the head: the ImageNet means are subtracted exactly under mixed_float16 too.
    convert = layers.Conv2D(3, 1, dtype="float32", trainable=False, name=INPUT_LAYER)
    x = convert(inputs)
    convert.set_weights(list(input_conversion(encoder, scale, offset)))
    *skips, x = features(x)
    block = {"batch_norm": batch_norm, "bn_momentum": bn_momentum, "dropout": dropout}
    for level in range(len(skips), -1, -1):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{level}_up")(x)
        if level:
            x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level - 1]])
        x = conv_block(x, base_filters * 2**level, f"dec{level}", **block)
    return keras.Model(inputs, segmentation_head(x, num_classes), name=f"unet_{encoder}")


def encoder_of(model: Any) -> Any:
    """The backbone sub-model of a U-Net from build_encoder_unet."""
    return model.get_layer(ENCODER_LAYER)


def load_encoder_weights(model: Any, path: str) -> None:
    """Load the backbone's weights file at `path` (local or any tf.io.gfile path) into `model`'s encoder.

    BadInputError naming the file and `model.encoder_weights` when it is missing, unreadable or
    does not fit the backbone (another backbone or width: a layer missing or of another shape).
    """
    import warnings

    import tensorflow as tf

    field = "model.encoder_weights"
    suffix = next((s for s in WEIGHT_SUFFIXES if path.endswith(s)), None)
    if suffix is None:
        raise BadInputError(f"{path}: {field} must be a Keras weights file ({' or '.join(WEIGHT_SUFFIXES)})")
    try:
        found = tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)
    except tf.errors.OpError as exc:
        raise BadInputError(f"{path}: {field} cannot be read ({exc.message})") from None
    if not found:
        raise BadInputError(f"{path}: {field} file not found")
    encoder = encoder_of(model)
    with tempfile.TemporaryDirectory() as tmp:
        local = path
        try:
            if "://" in path:  # h5py reads local files only
                local = str(Path(tmp) / f"encoder{suffix}")
                tf.io.gfile.copy(path, local)
            # Keras warns, then raises, about each part it cannot load; the error below says it once.
            with warnings.catch_warnings(record=True) as skipped:
                warnings.simplefilter("always")
                encoder.load_weights(local)
        except Exception as exc:  # h5py, shape and layer errors: all mean this file does not fit
            raise BadInputError(f"{path}: {field} does not fit the {model.name} encoder "
                                f"({type(exc).__name__}: {exc})") from None
        partial = [str(w.message) for w in skipped if "Skipping" in str(w.message)]
        if partial:  # loaded, but some backbone layers kept their random values
            raise BadInputError(f"{path}: {field} does not fit the {model.name} encoder ({partial[0]})")
    log.info("encoder weights loaded from %s", path)
