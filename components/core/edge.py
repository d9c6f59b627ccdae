"""Edge export: the trained Keras model as TensorFlow Lite files, and scoring them with the interpreter.

TFLite contract (docs/serving.md "Edge (TFLite)"), the same for every variant:
- input `image` float32 [1, S, S, 3], RGB values 0..255: the image decoded (3 channels), resized
  to S x S by the client (bilinear, antialias: `tf.image.resize(..., antialias=True)`) and rounded
  to whole levels (as Transform stores pixels), because PNG and JPEG decoding are not TFLite
  builtin ops. The Transform normalisation (x / 255, `transform.normalize_pixels`) is inside the
  graph.
- output `probabilities` float32 [1, S, S, C] (C = 1: sigmoid foreground probability; C = K:
  softmax); the class rule is the serving one (p > 0.5, or argmax).

Variants: `float16` (weights stored as float16, computed in float32) and `int8` (full-integer
quantisation calibrated on train images; float input and output kept so the contract is unchanged).
Only models whose transform scales by x / 255 (transform.standardize: false) are exported: the
export checks the TFLite graph answers like `serving_default` before writing anything.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

FLOAT16, INT8 = "float16", "int8"
VARIANTS = (FLOAT16, INT8)
TFLITE_DIR = "tflite"  # in the ModelEvaluation artifact; the Pusher copies its files into the version
NUM_CALIBRATION_IMAGES = 32  # int8 representative dataset: enough for stable activation ranges
NUM_CONTRACT_CHECK_IMAGES = 4
# Max |p_tflite_graph - p_serving| before conversion: float round-off of the same ops is ~1e-6, a
# standardising transform moves probabilities by far more.
CONTRACT_TOLERANCE = 1e-4


class UnsupportedTransformError(BadInputError):
    """The model's transform is not x / 255 (transform.standardize: true): no TFLite export."""


def tflite_file_name(variant: str) -> str:
    return f"model_{variant}.tflite"


def check_variants(variants: Sequence[str], field: str = "push.tflite") -> list[str]:
    """The requested variants, in order, each once; an unknown name is a BadInputError naming `field`."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise BadInputError(f"{field}: unknown TFLite variant(s) {unknown}; choose from {list(VARIANTS)}")
    return list(dict.fromkeys(variants))


def decoded_images(encoded: Iterable[bytes], image_size: int) -> np.ndarray:
    """float32 [N, S, S, 3] in 0..255: what a TFLite client feeds (Transform's own decode, resize, rounding)."""
    from segpipe.components.transform import decode_resize_image
    import tensorflow as tf

    pixels = decode_resize_image(tf.constant(list(encoded), tf.string), image_size)  # uint8
    return pixels.numpy().astype(np.float32)


def load_keras_model(saved_model_dir: str | Path) -> Any:
    """The Keras model stored beside a SavedModel (Model artifact root or pushed version folder)."""
    import keras

    saved_model_dir = Path(saved_model_dir)
    for folder in (saved_model_dir, saved_model_dir.parent):
        path = folder / artifacts.KERAS_MODEL_FILE
        if path.is_file():
            return keras.saving.load_model(path, compile=False)
    raise BadInputError(f"{saved_model_dir}: no {artifacts.KERAS_MODEL_FILE} beside the SavedModel to convert to TFLite")


def edge_function(keras_model: Any) -> Any:
    """tf.function [1, S, S, 3] 0..255 -> probabilities: the graph every variant is converted from."""
    import tensorflow as tf

    from segpipe.components.transform import UNIT_SCALE, normalize_pixels

    size = int(keras_model.input_shape[1])

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="image")])
    def predict(image: Any) -> dict[str, Any]:
        # The transform graph's standardize=false normalisation of the decoded, resized pixels: x / 255.
        return {"probabilities": tf.cast(keras_model(normalize_pixels(image, 0.0, UNIT_SCALE), training=False), tf.float32)}

    return predict


def check_contract(saved_model_dir: str | Path, keras_model: Any, encoded: Sequence[bytes]) -> float:
    """Max |probability difference| between the edge graph on decoded images and `serving_default`.

    Raises UnsupportedTransformError when they disagree: the transform does more than x / 255.
    """
    from segpipe.components.core.serving import PROBABILITIES, load_serving_model, predict_bytes

    encoded = list(encoded)[:NUM_CONTRACT_CHECK_IMAGES]
    size = int(keras_model.input_shape[1])
    served = predict_bytes(load_serving_model(saved_model_dir), encoded)[PROBABILITIES]
    edge = edge_function(keras_model)
    images = decoded_images(encoded, size)
    mine = np.concatenate([edge(images[i:i + 1])["probabilities"].numpy() for i in range(len(images))])
    gap = float(np.max(np.abs(mine - served))) if len(encoded) else 0.0
    if gap > CONTRACT_TOLERANCE:
        raise UnsupportedTransformError(
            f"{saved_model_dir}: its transform does not scale images by x / 255 alone (max probability gap "
            f"{gap:.2e} between the TFLite graph and serving_default); TFLite export (push.tflite) needs "
            "transform.standardize: false"
        )
    return gap


def convert(keras_model: Any, variant: str, calibration: np.ndarray | None) -> bytes:
    """One TFLite flatbuffer; `calibration` (float32 [N, S, S, 3] 0..255) is required for int8."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # Frozen first: the converter fails on Keras 3 layers that read a variable through a Reshape
    # (conv biases: "ReadVariableOp ... missing attribute 'value'").
    frozen = convert_variables_to_constants_v2(edge_function(keras_model).get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == FLOAT16:
        converter.target_spec.supported_types = [tf.float16]
    elif variant == INT8:
        if calibration is None or not len(calibration):
            raise BadInputError("int8 TFLite export needs calibration images (train split) and got none")

        def representative() -> Iterable[list[np.ndarray]]:
            for image in calibration:
                yield [image[None].astype(np.float32)]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.float32  # quantize/dequantize at the edges: same contract
        converter.inference_output_type = tf.float32
    else:
        check_variants([variant])
    return converter.convert()


def export_tflite(
    saved_model_dir: str | Path,
    out_dir: str | Path,
    variants: Sequence[str],
    *,
    check_images: Sequence[bytes],
    calibration_images: Sequence[bytes],
) -> dict[str, dict[str, Any]]:
    """Write `model_<variant>.tflite` for each variant into `out_dir`; {variant: {file, bytes}}.

    `check_images` (encoded) verify the input contract first; `calibration_images` (encoded, train
    split) calibrate int8.
    """
    variants = check_variants(variants)
    keras_model = load_keras_model(saved_model_dir)
    gap = check_contract(saved_model_dir, keras_model, check_images)
    log.info("TFLite input contract checked against serving_default (max probability gap %.1e)", gap)
    calibration = None
    if INT8 in variants:
        encoded = list(calibration_images)[:NUM_CALIBRATION_IMAGES]
        calibration = decoded_images(encoded, int(keras_model.input_shape[1])) if encoded else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for variant in variants:
        started = time.perf_counter()
        flatbuffer = convert(keras_model, variant, calibration)
        path = out_dir / tflite_file_name(variant)
        artifacts.atomic_write(path, flatbuffer)
        written[variant] = {"file": path.name, "bytes": len(flatbuffer)}
        log.info("TFLite %s: %s (%d bytes, %.1f s)", variant, path, len(flatbuffer), time.perf_counter() - started)
    return written


class EdgeModel:
    """A TFLite file in `tf.lite.Interpreter`, checked against the contract; one image per call."""

    def __init__(self, path: str | Path) -> None:
        import tensorflow as tf

        self.path = Path(path)
        try:
            self.interpreter = tf.lite.Interpreter(model_path=str(self.path), num_threads=1)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BadInputError(f"{self.path}: not a loadable TFLite model ({exc})") from None
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BadInputError(f"{self.path}: expected one input and one output, has {len(inputs)} and {len(outputs)}")
        self.input, self.output = inputs[0], outputs[0]
        shape = tuple(int(d) for d in self.input["shape"])
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or shape[1] != shape[2] or self.input["dtype"] != np.float32:
            raise BadInputError(f"{self.path}: input {shape} {self.input['dtype']} is not float32 [1, S, S, 3]")
        self.image_size = shape[1]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """float32 [S, S, C] probabilities for one float32 [S, S, 3] image in 0..255."""
        self.interpreter.set_tensor(self.input["index"], np.asarray(image, np.float32)[None])
        self.interpreter.invoke()
        return np.asarray(self.interpreter.get_tensor(self.output["index"])[0], np.float32)

    def timed_predict(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """(probabilities, milliseconds the interpreter took)."""
        started = time.perf_counter()
        probabilities = self.predict(image)
        return probabilities, (time.perf_counter() - started) * 1000.0
