"""FusedAdam takes Keras's Adam steps: the same weights after the same fit, on one device and under
MirroredStrategy over two logical CPUs, and a checkpoint either can restore."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

# A subprocess: the two logical CPUs must be configured before TensorFlow starts. No bias before the
# batch norm: its gradient is rounding noise, and Adam turns noise of any size into full steps.
PROGRAM = r"""
import json, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import numpy as np
from segpipe.components.core.optimizers import FusedAdam


def fitted(optimizer_class, strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
                                  keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Conv2D(1, 1)])
        schedule = keras.optimizers.schedules.CosineDecay(0.0, 12, warmup_target=0.01, warmup_steps=3)
        model.compile(optimizer=optimizer_class(schedule), loss="mse")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 8, 8, 3)).astype("float32"), rng.normal(size=(32, 8, 8, 1)).astype("float32")
    initial = model.get_weights()
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    return model, initial


out = {}
for name, strategy in (("one_device", tf.distribute.get_strategy()),
                       ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    (keras_adam, initial), (fused, _) = fitted(keras.optimizers.Adam, strategy), fitted(FusedAdam, strategy)
    out[name] = {"weights": [float(np.max(np.abs(a - b))) for a, b in zip(keras_adam.get_weights(), fused.get_weights())],
                 "moved": float(np.max(np.abs(keras_adam.get_weights()[0] - initial[0]))),
                 "iterations": [int(keras_adam.optimizer.iterations.numpy()), int(fused.optimizer.iterations.numpy())],
                 "slots": [len(keras_adam.optimizer.variables), len(fused.optimizer.variables)]}
    # A checkpoint written by one restores into the other (same slot variables).
    path = sys.argv[1] + f"/{name}.weights.h5"
    fused.save_weights(path)
    keras_adam.load_weights(path)
    out[name]["restored"] = float(max(np.max(np.abs(a - b)) for a, b in zip(keras_adam.get_weights(), fused.get_weights())))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("optimizers")
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["one_device", "mirrored"])
def test_fused_adam_takes_keras_adams_steps(runs, where):
    run = runs[where]
    assert run["iterations"] == [12, 12]
    assert run["slots"][0] == run["slots"][1]
    assert run["moved"] > 1e-3  # the fit changed the weights, so equal weights mean equal steps
    np.testing.assert_array_less(run["weights"], 1e-5)
    assert run["restored"] == 0.0
