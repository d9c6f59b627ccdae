"""FusedBatchNormalization computes what keras.layers.BatchNormalization computes, with its variables."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from segpipe.components.core.batch_norm import FusedBatchNormalization
from segpipe.components.core.model import build_unet

RNG = np.random.default_rng(7)
X = (RNG.normal(size=(4, 6, 5, 3)) * 2.0 + 1.5).astype("float32")


def twin_layers(**kwargs):
    """A Keras BN layer and a fused one holding the same (non-default) variables."""
    plain, fused = keras.layers.BatchNormalization(**kwargs), FusedBatchNormalization(**kwargs)
    plain.build(X.shape)
    fused.build(X.shape)
    for variable in plain.weights:
        variable.assign(RNG.uniform(0.5, 1.5, size=variable.shape).astype("float32"))
    for mine, theirs in zip(fused.weights, plain.weights):
        mine.assign(theirs)
    return plain, fused


def test_training_step_matches_keras_outputs_moving_statistics_and_gradients():
    plain, fused = twin_layers(momentum=0.8)
    x = tf.constant(X)
    results = []
    for layer in (plain, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.cos(y))  # any non-linear scalar
        grads = tape.gradient(loss, [x, *layer.trainable_weights])
        results.append((y, grads, [w.numpy() for w in layer.non_trainable_weights]))
    (y_plain, g_plain, stats_plain), (y_fused, g_fused, stats_fused) = results
    np.testing.assert_allclose(y_fused, y_plain, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(g_fused, g_plain):
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-4)
    for mine, theirs in zip(stats_fused, stats_plain):  # moving mean, moving (biased) variance
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


def test_inference_matches_keras_and_leaves_the_statistics_alone():
    plain, fused = twin_layers()
    before = [w.numpy() for w in fused.non_trainable_weights]
    np.testing.assert_allclose(fused(X, training=False), plain(X, training=False), rtol=1e-5, atol=1e-5)
    for after, was in zip(fused.non_trainable_weights, before):
        np.testing.assert_array_equal(after.numpy(), was)


def test_frozen_layer_normalises_with_the_moving_statistics_as_keras_does():
    plain, fused = twin_layers()
    plain.trainable = fused.trainable = False
    np.testing.assert_allclose(fused(X, training=True), plain(X, training=True), rtol=1e-5, atol=1e-5)


def test_shapes_the_kernel_does_not_cover_fall_back_to_keras():
    flat = X.reshape(-1, 3)
    plain, fused = keras.layers.BatchNormalization(), FusedBatchNormalization()
    np.testing.assert_allclose(fused(flat, training=True), plain(flat, training=True), rtol=1e-5, atol=1e-5)
    first_axis = FusedBatchNormalization(axis=1)
    assert first_axis(X, training=True).shape == X.shape  # normalised over axis 1 by Keras's call


def test_mixed_precision_returns_the_compute_dtype_with_float32_statistics():
    plain, fused = twin_layers(dtype="mixed_float16")
    y = fused(X.astype("float16"), training=True)
    assert y.dtype == tf.float16 and fused.moving_mean.dtype == "float32"
    expected = plain(X.astype("float16"), training=True)
    np.testing.assert_allclose(np.asarray(y, "float32"), np.asarray(expected, "float32"), rtol=1e-2, atol=1e-2)


def test_unet_uses_it_and_a_saved_model_loads_back(tmp_path):
    model = build_unet((16, 16, 3), 2, 4, 2, batch_norm=True)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 10 and all(isinstance(layer, FusedBatchNormalization) for layer in norms)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert type(loaded.get_layer(norms[0].name)) is FusedBatchNormalization
    x = RNG.random((2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_inside_a_traced_function(training):
    plain, fused = twin_layers()
    traced = tf.function(lambda x: fused(x, training=training))
    np.testing.assert_allclose(traced(tf.constant(X)), plain(X, training=training), rtol=1e-4, atol=1e-5)
