"""Trainer component: input pipeline, resume after preemption, warm start, bad input (tiny data)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from segpipe.components.core import artifacts

from segpipe.components import trainer
from segpipe.components.core.errors import BadInputError, TrainingError

SIZE = 32
MODEL_CONFIG = {"base_filters": 4, "depth": 2, "batch_norm": False, "dropout": 0.0}


def train_config(**overrides: object) -> dict:
    from segpipe.pipeline.config import load_config

    cfg = load_config(overrides={"train.epochs": 2, "train.batch_size": 2, "train.shuffle_buffer": 8})
    return {**dataclasses.asdict(cfg.train), **overrides}


def write_transformed(uri: Path, split: str, images: np.ndarray, masks: np.ndarray) -> None:
    """Transformed examples as Transform writes them: flat float image, flat int64 mask, id."""
    import tensorflow as tf

    folder = artifacts.split_dir(uri, split)
    folder.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
        for i, (image, mask) in enumerate(zip(images, masks)):
            feature = {
                "image": tf.train.Feature(float_list=tf.train.FloatList(value=image.ravel())),
                "mask": tf.train.Feature(int64_list=tf.train.Int64List(value=mask.ravel())),
                "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"{split}-{i}".encode()])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def run_trainer(tiny_transform: dict, out: Path, transformed: Path | None = None, **kwargs: object) -> dict:
    params = {
        "base_model_uri": None,
        "backup_dir": str(out / "backup"),
        "num_classes": 2,
        "image_size": SIZE,
        "model_config": MODEL_CONFIG,
        "train_config": train_config(),
        **kwargs,
    }
    return trainer.train_model(
        str(transformed or tiny_transform["transformed"]), str(tiny_transform["graph"]),
        str(out / "model"), str(out / "model_run"), **params,
    )


@pytest.fixture(scope="module")
def trained(tiny_transform, tmp_path_factory):
    """A run preempted after epoch 1, then rerun: (first error, result of the rerun, output dir)."""

    class Preempted(Exception):
        pass

    out = tmp_path_factory.mktemp("trainer")
    original = trainer.make_callbacks

    def preempting_callbacks(*args, **kwargs):
        import keras

        class PreemptAfterFirstEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == 0:
                    raise Preempted("killed after epoch 1")

        return original(*args, **kwargs) + [PreemptAfterFirstEpoch()]

    trainer.make_callbacks = preempting_callbacks
    try:
        with pytest.raises(Preempted) as first:
            run_trainer(tiny_transform, out)
    finally:
        trainer.make_callbacks = original
    state = {
        "model_published": (out / "model").exists(),
        "backup_epoch": trainer.resumed_epoch(out / "backup"),
    }
    result = run_trainer(tiny_transform, out)
    return state, result, out, first


def test_killed_trainer_resumes_at_epoch_two(trained):
    state, result, out, first = trained
    assert "killed after epoch 1" in str(first.value)
    assert state == {"model_published": False, "backup_epoch": 1}
    assert result["initial_epoch"] == 1 and result["epochs"] == 2
    history = trainer.read_history(out / "model_run" / trainer.HISTORY_FILE)
    assert [int(row["epoch"]) for row in history] == [0, 1]
    assert not (out / "backup").exists()


def test_trainer_publishes_model_and_run_artifacts(trained):
    _, result, out, _ = trained
    model_dir, run_dir = out / "model", out / "model_run"
    assert (model_dir / artifacts.SAVED_MODEL_DIR / "saved_model.pb").is_file()
    assert (model_dir / artifacts.KERAS_MODEL_FILE).is_file()
    assert artifacts.read_info(model_dir).type == artifacts.MODEL
    assert artifacts.read_info(run_dir).type == artifacts.MODEL_RUN
    assert (run_dir / trainer.CURVES_FILE).stat().st_size > 1000
    assert any((run_dir / trainer.LOGS_DIR).rglob("events.out.tfevents.*"))
    assert set(result["metrics"]) == {"val_loss", "val_pixel_accuracy", "val_iou", "val_dice"}
    assert result["precision"] == "float32" and result["replicas"] == 1
    assert result["counts"] == {"train": 4, "eval": 4}
    assert artifacts.read_info(model_dir).counts == {"train": 4, "eval": 4}
    json.dumps(result)  # the component returns JSON-able values


def test_warm_start_copies_matching_weights_and_skips_other_architectures(trained):
    import keras

    _, _, out, _ = trained
    model = trainer.create_model(SIZE, 2, MODEL_CONFIG)
    assert trainer.warm_start(model, str(out / "model"))["used"] is True
    base = keras.saving.load_model(out / "model" / artifacts.KERAS_MODEL_FILE, compile=False)
    for a, b in zip(model.get_weights(), base.get_weights()):
        np.testing.assert_array_equal(a, b)
    wider = trainer.create_model(SIZE, 2, {**MODEL_CONFIG, "base_filters": 8})
    outcome = trainer.warm_start(wider, str(out / "model"))
    assert outcome["used"] is False and "architecture differs" in outcome["reason"]
    with pytest.raises(BadInputError, match="base model maps"):
        trainer.warm_start(trainer.create_model(64, 2, MODEL_CONFIG), str(out / "model"))
    with pytest.raises(BadInputError, match="model.keras: base model for warm start not found"):
        trainer.warm_start(model, str(out / "missing"))


def test_image_size_mismatch_and_empty_eval_are_bad_input(tiny_transform, tmp_path):
    with pytest.raises(BadInputError, match=r"feature 'image' has 3072 values.*image_size 64 needs 12288"):
        run_trainer(tiny_transform, tmp_path, image_size=64)
    transformed = tmp_path / "transformed"
    write_transformed(transformed, "train", np.zeros((2, SIZE, SIZE, 3), np.float32), np.zeros((2, SIZE, SIZE), np.int64))
    write_transformed(transformed, "eval", np.zeros((0, SIZE, SIZE, 3), np.float32), np.zeros((0, SIZE, SIZE), np.int64))
    with pytest.raises(BadInputError, match="Split-eval: every shard is empty"):
        run_trainer(tiny_transform, tmp_path, transformed=transformed)
    assert not (tmp_path / "model").exists()


def test_nan_loss_raises_training_error_naming_epoch_and_step(tiny_transform, tmp_path):
    # A NaN learning rate turns every weight NaN in the first update, so the second step's loss is
    # NaN whatever the kernels do with NaN inputs (oneDNN's ReLU maps a NaN input to 0).
    with pytest.raises(TrainingError, match="at epoch 1 step 2"):
        run_trainer(tiny_transform, tmp_path, train_config=train_config(learning_rate=float("nan")))
    assert not (tmp_path / "model").exists() and not (tmp_path / "model_run").exists()


def test_augmentation_moves_image_and_mask_together():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    masks = rng.integers(0, 2, (8, 16, 16)).astype(np.int32)
    masks[:, 0, 0] = 255
    images = np.repeat(masks[..., None], 3, axis=-1).astype(np.float32)
    tf.random.set_seed(1)
    aug_images, aug_masks = trainer.augment_batch(tf.constant(images), tf.constant(masks), flip=True, rot90=True, zoom=0.0)
    np.testing.assert_array_equal(aug_images.numpy()[..., 0], aug_masks.numpy())
    assert not np.array_equal(aug_masks.numpy(), masks)  # something moved
    _, zoomed = trainer.augment_batch(tf.constant(images), tf.constant(masks), flip=False, rot90=False, zoom=0.5)
    assert set(np.unique(zoomed.numpy())) <= {0, 1, 255}  # nearest-neighbour keeps class ids


def test_dataset_streams_parsed_batches(tiny_transform):
    files = artifacts.split_files(tiny_transform["transformed"], "eval")
    dataset = trainer.make_dataset(files, image_size=SIZE, batch_size=3, training=False)
    batches = list(dataset)
    assert [int(b[0].shape[0]) for b in batches] == [3, 1]
    images, masks = batches[0]
    assert images.shape == (3, SIZE, SIZE, 3) and masks.dtype.name == "int32"
    assert 0.0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 1.0


def test_precision_policy_choice_on_cpu():
    assert trainer.select_precision("auto") == "float32"
    assert trainer.select_precision("on") == "mixed_float16"
    assert trainer.select_precision("off") == "float32"


def test_cli_train_reports_bad_input_with_exit_code_2(tiny_transform, tmp_path, capsys):
    from segpipe.pipeline.cli import main

    code = main([
        "train", "--transformed", str(tiny_transform["transformed"]), "--transform-graph", str(tiny_transform["graph"]),
        "--out", str(tmp_path / "train"), "--root", str(tmp_path / "root"),
        "--set", "transform.image_size=64", "--set", "model.depth=2",
    ])
    assert code == 2
    assert "image_size 64 needs 12288" in capsys.readouterr().err
    assert not (tmp_path / "train" / "model").exists()
