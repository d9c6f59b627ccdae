"""Batch normalisation as TensorFlow's one fused kernel.

Keras 3's BatchNormalization writes the layer as separate ops (moments, then x * a + b), and their
gradients as more of them; tf_keras 2 (so TFX's Trainer) calls `FusedBatchNormV3`, which on CPU is
one oneDNN kernel forward and one backward. On the demo's U-Net (14 BN layers) the plain layers
cost about a third of a CPU training step (benchmarks/bench_trainer.py, variant no_batch_norm).

The arithmetic and the variables are Keras's: the same gamma, beta, moving mean and variance, the
moving statistics updated with the biased batch variance as Keras does (the kernel returns the
Bessel-corrected one; it is scaled back), so weights and checkpoints are interchangeable with
keras.layers.BatchNormalization. Anything the kernel does not cover (another backend, not 4-D
channels-last, masks, renorm, synchronized statistics) falls back to Keras's own call.
"""
from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="segpipe")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization over the last axis of NHWC tensors as `FusedBatchNormV3`."""

    def _fused(self, inputs: Any) -> bool:
        return (keras.backend.backend() == "tensorflow" and len(inputs.shape) == 4 and self.axis in (3, -1)
                and not self.renorm and not self.synchronized)

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if mask is not None or not self._fused(inputs):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = tf.cast(inputs, "float32")  # as Keras: statistics in float32 under mixed precision
        channels = tf.shape(x)[-1:]
        gamma = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones(channels)
        beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros(channels)
        if training and self.trainable:
            y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=self.epsilon, data_format="NHWC", is_training=True)
            count = tf.cast(tf.size(x) // tf.shape(x)[-1], "float32")
            variance = variance * (count - 1.0) / count  # Bessel-corrected -> biased, as Keras keeps
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        else:
            y, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.convert_to_tensor(self.moving_mean),
                variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon,
                data_format="NHWC", is_training=False)
        return tf.cast(y, self.compute_dtype)
