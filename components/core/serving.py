"""The serving SavedModel: the TFT transform graph and the U-Net in one self-contained artifact.

Signatures (README "Serving contract"):
- `serving_default`: `image_bytes` tf.string [N] (PNG/JPEG; TensorFlow Serving's REST API
  base64-decodes inputs whose name ends in `_bytes`) -> the transform graph (decode, resize,
  normalise; only the raw `image` feature is fed, see components/transform.py RAW_SERVING_KEYS)
  -> the model.
- `serve_tensor`: `image` float32 [N, S, S, 3], already normalised: the model input the trainer
  parses from the transformed examples (`transform.normalize_pixels` of the stored uint8 pixels).
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
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

SAVED_MODEL_PB = "saved_model.pb"
SERVING_INFO_FILE = "segpipe.json"  # the run record inside each pushed version

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
    expected = artifacts.output_channels(num_classes)
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


# ------------------------------------------------------------------ resolving and loading


VARIABLES_DIR = "variables"


def is_version_number(name: str) -> bool:
    """A version folder name: ASCII digits, written the way the pusher writes it (no leading 0)."""
    return name.isascii() and name.isdigit() and str(int(name)) == name


def is_complete_version(folder: str | os.PathLike) -> bool:
    """A version the pusher finished: numeric name, saved_model.pb, variables/ and segpipe.json.

    Anything else in a serving dir (a folder someone wrote PNGs into, a half-copied SavedModel) is
    not a model segpipe pushed, so no resolver picks it.
    """
    folder = Path(folder)
    return (
        is_version_number(folder.name)
        and (folder / SAVED_MODEL_PB).is_file()
        and (folder / VARIABLES_DIR).is_dir()
        and (folder / SERVING_INFO_FILE).is_file()
    )


def taken_version_numbers(serving_dir: str | os.PathLike) -> list[int]:
    """Every numeric folder name, complete version or not, ascending: a new version goes above them
    all (TensorFlow Serving loads the highest number, and an existing folder is never replaced)."""
    root = Path(serving_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())


def list_version_numbers(serving_dir: str | os.PathLike) -> list[int]:
    """The complete pushed versions (`is_complete_version`), ascending; anything else is ignored."""
    root = Path(serving_dir)
    if not root.is_dir():
        return []
    versions, ignored = [], []
    for entry in root.iterdir():
        if entry.is_dir() and is_version_number(entry.name):
            (versions if is_complete_version(entry) else ignored).append(entry)
    for entry in ignored:
        log.warning("%s: not a complete pushed version (%s); ignored", entry, _missing_parts(entry))
    return sorted(int(p.name) for p in versions)


def _missing_parts(folder: Path) -> str:
    wanted = ((SAVED_MODEL_PB, Path.is_file), (VARIABLES_DIR + "/", Path.is_dir), (SERVING_INFO_FILE, Path.is_file))
    return "no " + ", no ".join(name for name, test in wanted if not test(folder / name.rstrip("/")))


def latest_blessed_model(serving_dir: str | os.PathLike) -> str | None:
    """The highest complete version folder (only blessed models are ever pushed), or None."""
    versions = list_version_numbers(serving_dir)
    return str(Path(serving_dir) / str(versions[-1])) if versions else None


def resolve_saved_model(path: str | os.PathLike) -> Path:
    """A SavedModel folder from a Model artifact, a SavedModel folder or a serving dir (its latest).

    Raises BadInputError naming the path when none of the three layouts is found.
    """
    path = Path(path)
    if (path / artifacts.SAVED_MODEL_DIR / SAVED_MODEL_PB).is_file():
        return path / artifacts.SAVED_MODEL_DIR
    if (path / SAVED_MODEL_PB).is_file():
        return path
    latest = latest_blessed_model(path)
    if latest is not None:
        return Path(latest)
    incomplete = [str(n) for n in taken_version_numbers(path)]
    detail = (f" (numeric folder(s) {', '.join(incomplete)} are not complete pushed versions: each needs "
              f"{SAVED_MODEL_PB}, {VARIABLES_DIR}/ and {SERVING_INFO_FILE})") if incomplete else ""
    raise BadInputError(
        f"{path}: not a SavedModel folder, a Model artifact (with {artifacts.SAVED_MODEL_DIR}/) "
        f"or a serving directory with pushed versions{detail}"
    )


def read_serving_info(version_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(version_dir) / SERVING_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}



@dataclass(frozen=True)
class ServingModel:
    """A loaded SavedModel and what the serving contract says about it."""

    path: Path
    loaded: Any
    image_size: int
    num_classes: int  # classes in class_mask: 2 for a 1-channel sigmoid head, else C


def load_serving(path: str | os.PathLike) -> ServingModel:
    """Load a SavedModel / Model artifact / serving dir (its latest) and check the serving contract."""
    saved_model = resolve_saved_model(path)
    try:
        loaded = load_serving_model(saved_model)
    except Exception as exc:  # noqa: BLE001 - TensorFlow raises OSError, DecodeError, NotFoundError, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BadInputError(f"{saved_model}: not a loadable SavedModel ({reason})") from None
    signature = loaded.signatures.get(SERVING_BYTES)
    if signature is None:
        raise BadInputError(f"{saved_model}: no '{SERVING_BYTES}' signature")
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if BYTES_INPUT not in inputs or not {CLASS_MASK, PROBABILITIES} <= set(outputs):
        raise BadInputError(
            f"{saved_model}: '{SERVING_BYTES}' must take '{BYTES_INPUT}' and return "
            f"'{PROBABILITIES}' and '{CLASS_MASK}'"
        )
    size = outputs[CLASS_MASK].shape[1]
    channels = outputs[PROBABILITIES].shape[-1]
    if size is None or channels is None:
        raise BadInputError(f"{saved_model}: '{CLASS_MASK}' has no static image size")
    return ServingModel(saved_model, loaded, int(size), artifacts.data_classes(int(channels)))


def predict_class_masks(model: ServingModel, encoded_images: list[bytes]) -> np.ndarray:
    """uint8 [N, S, S] class ids from `serving_default` for PNG/JPEG bytes."""
    outputs = predict_bytes(model.loaded, encoded_images)
    return outputs[CLASS_MASK].astype(np.uint8)


def predict_probabilities(model: ServingModel, encoded_images: list[bytes]) -> np.ndarray:
    """float32 [N, S, S, C] `probabilities` from `serving_default` for PNG/JPEG bytes."""
    return predict_bytes(model.loaded, encoded_images)[PROBABILITIES].astype(np.float32)


# ------------------------------------------------------------------ image bytes for serving_default

# The serving graph's tf.io.decode_image is fed these as they are. Their header size (read by PIL in
# `image_for_serving`, capped by data_format.MAX_IMAGE_PIXELS) is the size TensorFlow decodes.
SERVED_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class ServingImage:
    """One image ready for `serving_default`: the bytes to send and the image's own size."""

    data: bytes
    height: int
    width: int
    rgb: np.ndarray | None  # uint8 [height, width, 3] when decoded (`decode=True`), else None


def image_for_serving(image: bytes, *, decode: bool) -> ServingImage:
    """The bytes `segpipe predict` and `segpipe infer` send for an encoded image, and its size.

    PNG and JPEG in RGB are sent as they are; other formats and modes (grayscale, RGBA, palette, ...)
    are converted to RGB by PIL and re-encoded as PNG, so every caller sends the same bytes for the
    same image. Without `decode` only the header of a PNG/JPEG in RGB is read (the serving graph
    decodes it); with `decode` the pixels are decoded too, so a truncated file fails here. Raises
    ValueError saying why the bytes are not a usable image (too large, not a format PIL decodes,
    unreadable).
    """
    import io

    from PIL import Image, UnidentifiedImageError

    from segpipe.components.core.data_format import ImageTooLargeError, open_image

    try:
        with open_image(image) as img:
            height, width = img.height, img.width
            served = img.format in SERVED_FORMATS and img.mode == "RGB"
            if served and not decode:
                return ServingImage(image, height, width, None)
            rgb = img.convert("RGB")
            rgb.load()
    except ImageTooLargeError as exc:
        raise ValueError(f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image (not a format PIL decodes)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None
    data = image
    if not served:
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        data = buf.getvalue()
    return ServingImage(data, height, width, np.asarray(rgb) if decode else None)


def class_mask_at_size(probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [height, width] class ids of one image at its own size, from its S x S x C probabilities.

    Each channel is resized bilinearly (PIL: pixel centres aligned, area-weighted when shrinking),
    then the model's rule picks the class (p > 0.5 for one channel, else argmax). Resizing the
    probabilities gives borders between model pixels, where nearest neighbour of the S x S class mask
    would draw every model pixel as a block. `segpipe predict` writes these masks and the Evaluator
    scores them, so both see the same prediction. At height = width = S it equals `class_mask`.
    """
    from PIL import Image

    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.shape[:2] != (height, width):
        probabilities = np.stack([
            np.asarray(Image.fromarray(probabilities[..., c]).resize((width, height), Image.BILINEAR))
            for c in range(probabilities.shape[-1])
        ], axis=-1)
    if probabilities.shape[-1] == 1:
        return (probabilities[..., 0] > 0.5).astype(np.uint8)
    return np.argmax(probabilities, axis=-1).astype(np.uint8)
