"""The trainer's GPU code paths, run on CPU: MirroredStrategy over two replicas, mixed_float16, XLA.

One subprocess (its TensorFlow state never touches the test process) splits the CPU into two
logical devices before TensorFlow starts, then calls the trainer's own `train_model` three times:
`distribution: mirrored` (one replica per logical CPU, batch norm on), `mixed_precision: on`, and
`jit_compile: true`. Nothing here has run on a GPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segpipe.components.core import artifacts

PROGRAM = r"""
import json, os, sys
from pathlib import Path

spec = json.loads(sys.argv[1])
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import numpy as np
from segpipe.components import trainer
from segpipe.components.core import serving

seen = {}


class RecordTrainingDtypes(keras.callbacks.Callback):
    # What the model trains with (the exported model is a float32 copy, so only here is it visible).
    def on_train_begin(self, logs=None):
        seen["conv_policy"] = self.model.get_layer("enc1_conv1").dtype_policy.name
        seen["conv_compute"] = str(self.model.get_layer("enc1_conv1").compute_dtype)
        seen["head_policy"] = self.model.get_layer("head").dtype_policy.name
        seen["output_dtype"] = str(self.model.outputs[0].dtype)
        seen["optimizer"] = type(self.model.optimizer).__name__
        seen["jit_compile"] = bool(self.model.jit_compile)


make_callbacks = trainer.make_callbacks
trainer.make_callbacks = lambda *a, **k: [*make_callbacks(*a, **k), RecordTrainingDtypes()]

results = {}
for name, case in spec["cases"].items():
    seen = {}
    summary = trainer.train_model(**case)
    loaded = serving.load_serving_model(Path(case["model_uri"]) / "serving_model")
    images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    out = serving.predict_tensor(loaded, images)
    results[name] = {
        "summary": summary, "seen": seen,
        "serving": {key: str(value.dtype) for key, value in out.items()},
        "probabilities_in_range": bool(np.all((out["probabilities"] >= 0) & (out["probabilities"] <= 1))),
        "class_ids": sorted(int(v) for v in np.unique(out["class_mask"])),
        "saved_weights_dtypes": sorted({str(w.dtype) for w in keras.saving.load_model(
            Path(case["model_uri"]) / "model.keras", compile=False).weights}),
    }
Path(spec["results"]).write_text(json.dumps(results, default=str))
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)  # all written: skip TensorFlow's interpreter teardown (1-4 s on 2 cores)
"""


def case(tiny_transform: dict, out: Path, **train: object) -> dict:
    from segpipe.pipeline.config import load_config

    cfg = load_config(overrides={
        "model.base_filters": 4, "model.depth": 2, "train.epochs": 1, "train.min_steps": 0,
        "train.batch_size": 2, "train.early_stopping_patience": 0, "train.warm_start": False,
        **{f"train.{k}": v for k, v in train.items()},
    })
    return {
        "transformed_examples_uri": str(tiny_transform["transformed"]),
        "transform_graph_uri": str(tiny_transform["graph"]),
        "model_uri": str(out / "model"),
        "model_run_uri": str(out / "model_run"),
        "base_model_uri": None,
        "backup_dir": str(out / "backup"),
        "num_classes": 2,
        "image_size": 32,
        "model_config": {**dataclasses.asdict(cfg.model), "batch_norm": True},  # BN under replicas too
        "train_config": dataclasses.asdict(cfg.train),
    }


@pytest.fixture(scope="module")
def device_runs(tiny_transform, tmp_path_factory):
    root = tmp_path_factory.mktemp("device_paths")
    spec = {
        "cases": {
            "mirrored": case(tiny_transform, root / "mirrored", distribution="mirrored", mixed_precision="off"),
            "mixed": case(tiny_transform, root / "mixed", mixed_precision="on"),
            "jit": case(tiny_transform, root / "jit", jit_compile=True, mixed_precision="off"),
        },
        "results": str(root / "results.json"),
    }
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", PROGRAM, json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {name: {**result, "root": root / name} for name, result in json.loads(Path(spec["results"]).read_text()).items()}


def test_mirrored_trains_one_replica_per_logical_cpu_with_the_global_batch(device_runs):
    run = device_runs["mirrored"]
    summary = run["summary"]
    assert summary["strategy"] == "MirroredStrategy" and summary["replicas"] == 2
    # train.batch_size is per replica: 4 train records / global batch 2 x 2 = 1 step per epoch.
    assert summary["plan"]["steps_per_epoch"] == 1
    assert np.isfinite(summary["metrics"]["val_loss"])
    assert artifacts.is_published(run["root"] / "model") and artifacts.is_published(run["root"] / "model_run")


def test_mixed_float16_trains_with_a_float32_head_and_serves_float32(device_runs):
    run = device_runs["mixed"]
    assert run["summary"]["precision"] == "mixed_float16"
    seen = run["seen"]
    assert seen["conv_policy"] == "mixed_float16" and seen["conv_compute"] == "float16"
    assert seen["head_policy"] == "float32" and seen["output_dtype"] == "float32"
    assert seen["optimizer"] == "LossScaleOptimizer"  # Keras adds loss scaling under mixed_float16
    assert np.isfinite(run["summary"]["metrics"]["val_loss"])
    # The export is a float32 copy: float32 probabilities in [0, 1] and int32 class ids 0/1.
    assert run["serving"] == {"probabilities": "float32", "class_mask": "int32"}
    assert run["probabilities_in_range"] and set(run["class_ids"]) <= {0, 1}
    assert run["saved_weights_dtypes"] == ["float32"]


def test_jit_compile_trains_on_cpu(device_runs):
    run = device_runs["jit"]
    assert run["seen"]["jit_compile"] is True and run["summary"]["precision"] == "float32"
    assert run["summary"]["epochs"] == 1 and np.isfinite(run["summary"]["metrics"]["val_loss"])
    assert artifacts.is_published(run["root"] / "model")
