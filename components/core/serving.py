"""The serving SavedModel: the TFT transform graph and the U-Net in one self-contained artifact.

Signatures (README "Serving contract"):
- `serving_default`: `image_bytes` tf.string [N] (PNG/JPEG; TensorFlow Serving's REST API
  base64-decodes inputs whose name ends in `_bytes`) -> the transform graph (decode, resize,
  normalise; only the raw `image` feature is fed, see components/transform.py RAW_SERVING_KEYS)
  -> the model.
- `serve_tensor`: `image` float32 [N, S, S, 3], already normalised like the transformed examples.
Both return `probabilities` float32 [N, S, S, C] (C = 1: sigmoid foreground probability; C = K:
softmax) and `class_mask` int32 [N, S, S] (p > 0.5, or argmax).

`keras.export.ExportArchive` tracks the Keras 3 model and the TFT transform graph, wrapped as a
plain `tf.Module` (`components.transform.load_serving_transform`): TFT's own
`transform_features_layer()` is a Keras 2 model that TensorFlow re-traces on save (16-44 s per
export here, against under a second for the module; same graph, same values). The SavedModel loads
with `tf.saved_model.load` or `saved_model_cli` without segpipe or TFT importable.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVING_BYTES = "serving_default"
SERVING_TENSOR = "serve_tensor"
BYTES_INPUT = "image_bytes"
TENSOR_INPUT = "image"
PROBABILITIES = "probabilities"
CLASS_MASK = "class_mask"


def class_mask_from_probabilities(probabilities: Any) -> Any:
    """int32 [N, S, S]: p > 0.5 for one channel (same rule as components.model.predicted_classes)."""
    import tensorflow as tf

    if probabilities.shape[-1] == 1:
        return tf.cast(probabilities[..., 0] > 0.5, tf.int32)
    return tf.argmax(probabilities, axis=-1, output_type=tf.int32)


def export_serving_model(
    keras_model: Any,
    transform_graph_uri: str,
    export_dir: str | Path,
    *,
    image_size: int,
    num_classes: int,
) -> str:
    """Write the SavedModel with both signatures to `export_dir`; returns its path.

    `num_classes` counts data classes (2 = binary, served by a 1-channel sigmoid head).
    """
    import keras
    import tensorflow as tf

    from segpipe.components.transform import load_serving_transform

    channels = keras_model.output_shape[-1]
    expected = 1 if num_classes == 2 else num_classes
    if channels != expected:
        raise ValueError(f"model has {channels} output channels, {num_classes} data classes need {expected}")
    if tuple(keras_model.input_shape[1:]) != (image_size, image_size, 3):
        raise ValueError(f"model input {keras_model.input_shape} does not match image_size {image_size}")

    serving_transform = load_serving_transform(str(transform_graph_uri))
    archive = keras.export.ExportArchive()
    archive.track(keras_model)
    archive.track(serving_transform)

    def predict(images: Any) -> dict[str, Any]:
        probabilities = tf.cast(keras_model(images, training=False), tf.float32)
        return {PROBABILITIES: probabilities, CLASS_MASK: class_mask_from_probabilities(probabilities)}

    def serve_bytes(image_bytes: Any) -> dict[str, Any]:
        images = serving_transform.transform_image(image_bytes)
        return predict(tf.reshape(tf.cast(images, tf.float32), [-1, image_size, image_size, 3]))

    archive.add_endpoint(SERVING_BYTES, serve_bytes, [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    archive.add_endpoint(
        SERVING_TENSOR, predict, [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=TENSOR_INPUT)]
    )
    archive.write_out(str(export_dir), verbose=False)
    log.info("exported serving SavedModel to %s", export_dir)
    return str(export_dir)


def load_serving_model(path: str | Path) -> Any:
    """`tf.saved_model.load` of a serving model (a Model artifact's serving_model/ or a serving version)."""
    import tensorflow as tf

    return tf.saved_model.load(str(path))


def predict_bytes(loaded: Any, encoded_images: list[bytes]) -> dict[str, Any]:
    """Run `serving_default` on encoded images; numpy outputs keyed like the signature."""
    import tensorflow as tf

    outputs = loaded.signatures[SERVING_BYTES](**{BYTES_INPUT: tf.constant(encoded_images, dtype=tf.string)})
    return {key: value.numpy() for key, value in outputs.items()}


def predict_tensor(loaded: Any, images: Any) -> dict[str, Any]:
    """Run `serve_tensor` on normalised float images [N, S, S, 3]; numpy outputs."""
    import tensorflow as tf

    outputs = loaded.signatures[SERVING_TENSOR](**{TENSOR_INPUT: tf.convert_to_tensor(images, tf.float32)})
    return {key: value.numpy() for key, value in outputs.items()}
