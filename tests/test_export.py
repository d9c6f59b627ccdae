"""Serving SavedModel: both signatures equal the Keras model, and it runs with TensorFlow alone.

Tolerance: float32 probabilities within 1e-5 absolute (same kernels, same pixels; only op order may
differ between the Keras call and the SavedModel graph).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from segpipe.components.core import artifacts
from segpipe.components.core.serving import (
    CLASS_MASK,
    PROBABILITIES,
    export_serving_model,
    load_serving_model,
    predict_bytes,
    predict_tensor,
)

SIZE = 32
ATOL = 1e-5


def read_split(uri: Path, split: str, transformed: bool) -> dict[str, object]:
    """id -> raw image bytes, or id -> the model input the trainer parses from the transformed
    record (trainer.parse_batch: stored uint8 pixels, normalised), float32 [S, S, 3]."""
    import tensorflow as tf

    from segpipe.components.trainer import parse_batch

    out: dict[str, object] = {}
    for path in artifacts.split_files(uri, split):
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            feature = tf.train.Example.FromString(record.numpy()).features.feature
            key = feature["id"].bytes_list.value[0].decode()
            if transformed:
                out[key] = parse_batch(record[None], SIZE)[0][0].numpy()
            else:
                out[key] = feature["image"].bytes_list.value[0]
    return out


@pytest.fixture(scope="module")
def exported(tiny_transform, tmp_path_factory):
    """A tiny random U-Net exported with the real transform graph, plus the eval pixels and bytes."""
    import keras

    from segpipe.components.core.model import build_unet

    keras.utils.set_random_seed(3)
    model = build_unet((SIZE, SIZE, 3), 1, base_filters=4, depth=2)
    export_dir = tmp_path_factory.mktemp("export") / artifacts.SAVED_MODEL_DIR
    export_serving_model(model, str(tiny_transform["graph"]), export_dir, image_size=SIZE, num_classes=2)
    raw = read_split(tiny_transform["examples"], artifacts.EVAL, transformed=False)
    pixels = read_split(tiny_transform["transformed"], artifacts.EVAL, transformed=True)
    ids = sorted(raw)
    images = np.stack([pixels[i] for i in ids])
    expected = np.asarray(model(images, training=False))
    return export_dir, [raw[i] for i in ids], images, expected


def test_serving_default_on_png_bytes_equals_keras_model(exported):
    export_dir, encoded, images, expected = exported
    outputs = predict_bytes(load_serving_model(export_dir), encoded)
    assert outputs[PROBABILITIES].shape == (len(encoded), SIZE, SIZE, 1)
    assert outputs[PROBABILITIES].dtype == np.float32 and outputs[CLASS_MASK].dtype == np.int32
    np.testing.assert_allclose(outputs[PROBABILITIES], expected, atol=ATOL)
    decided = np.abs(expected[..., 0] - 0.5) > ATOL  # pixels not on the 0.5 boundary
    np.testing.assert_array_equal(outputs[CLASS_MASK][decided], (expected[..., 0] > 0.5)[decided])


def test_serve_tensor_on_normalized_pixels_equals_keras_model(exported):
    export_dir, _, images, expected = exported
    outputs = predict_tensor(load_serving_model(export_dir), images)
    np.testing.assert_allclose(outputs[PROBABILITIES], expected, atol=ATOL)
    assert outputs[CLASS_MASK].shape == (len(images), SIZE, SIZE)


def test_multiclass_export_returns_argmax_mask(tiny_transform, tmp_path):
    from segpipe.components.core.model import build_unet

    model = build_unet((SIZE, SIZE, 3), 3, base_filters=2, depth=1)
    export_serving_model(model, str(tiny_transform["graph"]), tmp_path / "sm", image_size=SIZE, num_classes=3)
    images = np.random.default_rng(0).uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    outputs = predict_tensor(load_serving_model(tmp_path / "sm"), images)
    assert outputs[PROBABILITIES].shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(outputs[CLASS_MASK], np.argmax(np.asarray(model(images)), axis=-1))
    with pytest.raises(ValueError, match="2 data classes need 1"):
        export_serving_model(model, str(tiny_transform["graph"]), tmp_path / "bad", image_size=SIZE, num_classes=2)


def test_saved_model_cli_runs_it_without_segpipe_or_tft(exported, tmp_path):
    """TensorFlow's own saved_model_cli, in an isolated interpreter where segpipe's packages and TFT
    cannot be imported, serves the PNG bytes with the same result."""
    export_dir, encoded, _, expected = exported
    np.save(tmp_path / "bytes.npy", np.array(encoded, dtype=object), allow_pickle=True)
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"components", "pipeline", "segpipe", "tensorflow_transform"}}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from tensorflow.python.tools import saved_model_cli
        sys.argv = ["saved_model_cli", "run", "--dir", {str(export_dir)!r}, "--tag_set", "serve",
                    "--signature_def", "serving_default", "--inputs", "image_bytes=bytes.npy", "--outdir", "out"]
        saved_model_cli.main()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out" / f"{PROBABILITIES}.npy"), expected, atol=ATOL)
    assert np.load(tmp_path / "out" / f"{CLASS_MASK}.npy").shape == (len(encoded), SIZE, SIZE)
