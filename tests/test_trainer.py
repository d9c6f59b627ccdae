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
MODEL_CONFIG = {"base_filters": 4, "depth": 2, "batch_norm": False, "dropout": 0.0, "bn_momentum": "auto"}


def train_config(**overrides: object) -> dict:
    from segpipe.pipeline.config import load_config

    cfg = load_config(overrides={"train.epochs": 2, "train.batch_size": 2, "train.shuffle_buffer": 8, "train.min_steps": 0})
    return {**dataclasses.asdict(cfg.train), **overrides}


def write_transformed(uri: Path, split: str, pixels: np.ndarray, masks: np.ndarray) -> None:
    """Transformed examples as Transform writes them (uint8 pixels, x / 255), without Beam."""
    import tensorflow as tf

    from segpipe.components.transform import UNIT_SCALE, serialized_example

    folder = artifacts.split_dir(uri, split)
    folder.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
        for i, (image, mask) in enumerate(zip(pixels, masks)):
            writer.write(serialized_example(f"{split}-{i}", image, mask, offset=[0.0] * 3, scale=[UNIT_SCALE] * 3))


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
    """A run preempted after epoch 1, then rerun: (state after the kill, result of the rerun, output
    dir, first error, the optimizer's step and learning rate when the rerun's training began)."""
    import keras

    class Preempted(Exception):
        pass

    class PreemptAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                raise Preempted("killed after epoch 1")

    class RecordResumedOptimizer(keras.callbacks.Callback):
        seen: dict = {}

        def on_train_begin(self, logs=None):  # after BackupAndRestore (earlier in the list) restored
            optimizer = self.model.optimizer
            self.seen.update(step=int(optimizer.iterations.numpy()), rate=float(optimizer.learning_rate.numpy()))

    out = tmp_path_factory.mktemp("trainer")
    original = trainer.make_callbacks

    def with_callback(extra):
        return lambda *args, **kwargs: original(*args, **kwargs) + [extra]

    trainer.make_callbacks = with_callback(PreemptAfterFirstEpoch())
    try:
        with pytest.raises(Preempted) as first:
            run_trainer(tiny_transform, out)
        state = {
            "model_published": (out / "model").exists(),
            "backup_epoch": trainer.resumed_epoch(out / "backup"),
        }
        trainer.make_callbacks = with_callback(RecordResumedOptimizer())
        result = run_trainer(tiny_transform, out)
    finally:
        trainer.make_callbacks = original
    return state, result, out, first, RecordResumedOptimizer.seen


def test_killed_trainer_resumes_at_epoch_two(trained):
    state, result, out, first, _ = trained
    assert "killed after epoch 1" in str(first.value)
    assert state == {"model_published": False, "backup_epoch": 1}
    assert result["initial_epoch"] == 1 and result["epochs"] == 2
    history = trainer.read_history(out / "model_run" / trainer.HISTORY_FILE)
    assert [int(row["epoch"]) for row in history] == [0, 1]
    assert not (out / "backup").exists()


def test_resumed_run_continues_the_learning_rate_schedule(trained):
    # 4 train examples, batch 2: 2 steps per epoch, 4 planned; the rerun starts at step 2, the
    # middle of the cosine decay (no warm-up step: 5% of 4 rounds to 0), not at its beginning.
    _, result, _, _, resumed = trained
    assert result["plan"] == {"records": 4, "configured_epochs": 2, "epochs": 2, "steps_per_epoch": 2, "steps": 4,
                              "early_stopping_patience": 5}
    peak = train_config()["learning_rate"]
    assert resumed["step"] == 2
    assert resumed["rate"] == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 2 / 4)), rel=1e-5)


def test_trainer_publishes_model_and_run_artifacts(trained):
    _, result, out, _, _ = trained
    model_dir, run_dir = out / "model", out / "model_run"
    assert (model_dir / artifacts.SAVED_MODEL_DIR / "saved_model.pb").is_file()
    assert (model_dir / artifacts.KERAS_MODEL_FILE).is_file()
    assert artifacts.read_info(model_dir).type == artifacts.MODEL
    assert artifacts.read_info(run_dir).type == artifacts.MODEL_RUN
    assert (run_dir / trainer.CURVES_FILE).stat().st_size > 1000
    assert any((run_dir / trainer.LOGS_DIR).rglob("events.out.tfevents.*"))
    assert set(result["metrics"]) == {"val_loss", "val_pixel_accuracy", "val_iou", "val_dice"}
    assert result["precision"] == "float32" and result["replicas"] == 1
    assert result["monitor"] == "val_iou" and set(result["best_epoch_metrics"]) == set(result["metrics"])
    assert result["bn_momentum"] is None and result["bn_recalibration_batches"] == 0  # no BN layer
    assert result["class_weights"] is None and len(result["iou_per_class"]) == 2  # train.class_weights: none
    assert result["counts"] == {"train": 4, "eval": 4}
    assert artifacts.read_info(model_dir).counts == {"train": 4, "eval": 4}
    json.dumps(result)  # the component returns JSON-able values


def test_warm_start_copies_matching_weights_and_skips_other_architectures(trained):
    import keras

    _, _, out, _, _ = trained
    built = {**MODEL_CONFIG, "bn_momentum": 0.99}  # create_model takes a resolved momentum
    model = trainer.create_model(SIZE, 2, built)
    assert trainer.warm_start(model, str(out / "model"))["used"] is True
    base = keras.saving.load_model(out / "model" / artifacts.KERAS_MODEL_FILE, compile=False)
    for a, b in zip(model.get_weights(), base.get_weights()):
        np.testing.assert_array_equal(a, b)
    wider = trainer.create_model(SIZE, 2, {**built, "base_filters": 8})
    outcome = trainer.warm_start(wider, str(out / "model"))
    assert outcome["used"] is False and "architecture differs" in outcome["reason"]
    with pytest.raises(BadInputError, match="base model maps"):
        trainer.warm_start(trainer.create_model(64, 2, built), str(out / "model"))
    with pytest.raises(BadInputError, match="model.keras: base model for warm start not found"):
        trainer.warm_start(model, str(out / "missing"))


def test_image_size_mismatch_and_empty_eval_are_bad_input(tiny_transform, tmp_path):
    with pytest.raises(BadInputError, match=r"feature 'image' holds pixels of shape \(32, 32, 3\).*image_size 64 needs "
                                            r"\(64, 64, 3\); rerun Transform with transform.image_size=64"):
        run_trainer(tiny_transform, tmp_path, image_size=64)
    transformed = tmp_path / "transformed"
    write_transformed(transformed, "train", np.zeros((2, SIZE, SIZE, 3), np.uint8), np.zeros((2, SIZE, SIZE), np.int64))
    write_transformed(transformed, "eval", np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros((0, SIZE, SIZE), np.int64))
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


def test_parse_batch_augments_the_stored_pixels_as_it_would_the_model_input(tmp_path):
    """parse_batch moves and zooms uint8 pixels before normalising; normalising first (a standardising
    offset and scale) and augmenting the floats draws the same moves and gives the same values."""
    import tensorflow as tf

    from segpipe.components.transform import normalize_pixels, serialized_example

    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (6, SIZE, SIZE, 3)).astype(np.uint8)
    masks = rng.integers(0, 2, (6, SIZE, SIZE))
    offset, scale = np.array([100.0, 120.0, 90.0], np.float32), np.array([0.02, 0.03, 0.025], np.float32)
    records = tf.constant([serialized_example(str(i), p, m, offset=offset, scale=scale)
                           for i, (p, m) in enumerate(zip(pixels, masks))])
    augment = {"flip": True, "rot90": True, "zoom": 0.3}
    tf.random.set_seed(7)
    images, out_masks = trainer.parse_batch(records, SIZE, augment)
    tf.random.set_seed(7)
    float_images, float_masks = trainer.augment_batch(normalize_pixels(pixels, offset, scale), tf.constant(masks, tf.int32),
                                                      **augment)
    assert images.dtype == tf.float32 and images.shape == (6, SIZE, SIZE, 3)
    np.testing.assert_array_equal(out_masks.numpy(), float_masks.numpy())
    np.testing.assert_allclose(images.numpy(), float_images.numpy(), atol=1e-4)
    plain, _ = trainer.parse_batch(records, SIZE)
    np.testing.assert_allclose(plain.numpy(), (pixels - offset) * scale, rtol=1e-6, atol=1e-6)
    other_run = serialized_example("x", pixels[0], masks[0], offset=offset + 1.0, scale=scale)
    with pytest.raises(tf.errors.InvalidArgumentError, match="different 'pixel_offset' values: the split mixes"):
        trainer.parse_batch(tf.concat([records, [other_run]], 0), SIZE)


def test_records_with_float_pixels_are_refused_before_training(tmp_path):
    """A split written by a Transform that stored float32 pixels is named, with what to do."""
    import tensorflow as tf

    folder = artifacts.split_dir(tmp_path, "train")
    folder.mkdir(parents=True)
    feature = {"image": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5] * (SIZE * SIZE * 3))),
               "mask": tf.train.Feature(int64_list=tf.train.Int64List(value=[0] * (SIZE * SIZE)))}
    with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    with pytest.raises(BadInputError, match=r"data-00000-of-00001.tfrecord.gz record 0: feature 'image' is not one "
                                            r"serialized uint8 tensor.*rerun Transform"):
        trainer.check_split(str(tmp_path), "train", SIZE)


def dihedral_moves(image: np.ndarray, flip: bool, rot90: bool) -> list[np.ndarray]:
    """Every distinct placement augment_batch may give `image`, made with tf.reverse and tf.image.rot90
    (with both flips and turns, 16 combinations give the 8 symmetries of a square)."""
    import tensorflow as tf

    moves = []
    for left_right in (False, True) if flip else (False,):
        for up_down in (False, True) if flip else (False,):
            for turns in range(4) if rot90 else (0,):
                moved = tf.reverse(image, [1]) if left_right else tf.constant(image)
                moved = tf.reverse(moved, [0]) if up_down else moved
                moved = tf.image.rot90(moved, turns).numpy()
                if not any(np.array_equal(moved, seen) for seen in moves):
                    moves.append(moved)
    return moves


@pytest.mark.parametrize("flip, rot90, expected", [(True, True, 8), (True, False, 4), (False, True, 4)])
def test_augmentation_draws_each_flip_and_turn_exactly(flip, rot90, expected):
    """Each example comes out as one of the flips/turns of the reference ops, all of them occur."""
    import tensorflow as tf

    images = np.arange(64 * 6 * 6 * 3, dtype=np.float32).reshape(64, 6, 6, 3)  # every pixel distinct
    masks = (np.arange(64 * 36).reshape(64, 6, 6) % 7).astype(np.int32)
    tf.random.set_seed(3)
    aug_images, aug_masks = trainer.augment_batch(tf.constant(images), tf.constant(masks), flip=flip, rot90=rot90, zoom=0.0)
    assert aug_masks.dtype == tf.int32
    used = set()
    for image, mask, out_image, out_mask in zip(images, masks, aug_images.numpy(), aug_masks.numpy()):
        both, out = np.concatenate([image, mask[..., None]], -1), np.concatenate([out_image, out_mask[..., None]], -1)
        matches = [i for i, moved in enumerate(dihedral_moves(both, flip, rot90)) if np.array_equal(moved, out)]
        assert len(matches) == 1  # image and mask moved the same way, as one of the reference moves
        used.add(matches[0])
    assert len(used) == expected


@pytest.mark.parametrize("cache", [False, True])
def test_augmented_training_batches_keep_every_pixel(tiny_transform, cache):
    """Flips and turns only move pixels: per epoch the label counts equal the unaugmented ones."""
    files = artifacts.split_files(tiny_transform["transformed"], "train")
    plain = trainer.make_dataset(files, image_size=SIZE, batch_size=3, training=False)
    moved = trainer.make_dataset(files, image_size=SIZE, batch_size=3, training=True, shuffle_buffer=8, cache=cache,
                                 augment={"flip": True, "rot90": True, "zoom": 0.0}, seed=1)

    def totals(dataset):
        batches = list(dataset)
        labels = np.bincount(np.concatenate([m.numpy().ravel() for _, m in batches]), minlength=256)
        return labels, sum(float(i.numpy().sum()) for i, _ in batches)

    expected_labels, expected_sum = totals(plain)
    for _ in range(2):  # a cached dataset is augmented afresh each epoch
        labels, pixel_sum = totals(moved)
        np.testing.assert_array_equal(labels, expected_labels)
        assert pixel_sum == pytest.approx(expected_sum, rel=1e-5)
    batches = list(moved)  # training hands on batches as they finish: the short one may come first
    assert sorted(int(images.shape[0]) for images, _ in batches) == [1, 3]
    assert all(images.shape[1:] == (SIZE, SIZE, 3) and masks.dtype.name == "int32" for images, masks in batches)


def test_fit_inputs_repeat_the_whole_train_split_each_epoch_and_evaluate_without_autotuning(tiny_transform):
    """One iterator serves the whole fit: the train input never ends, and each run of
    steps_per_epoch batches is one whole pass over the split (the last batch short, as before)."""
    import tensorflow as tf

    files = {split: artifacts.split_files(tiny_transform["transformed"], split) for split in ("train", "eval")}
    plain = list(trainer.make_dataset(files["train"], image_size=SIZE, batch_size=3, training=False))
    records = sum(int(images.shape[0]) for images, _ in plain)
    expected_labels = np.bincount(np.concatenate([m.numpy().ravel() for _, m in plain]), minlength=256)
    train, evaluation, steps = trainer.fit_inputs(files, image_size=SIZE, batch_size=3,
                                                  train_config=train_config(augment_zoom=0.0), num_records=records)
    assert steps == -(-records // 3)
    assert int(train.cardinality()) == int(tf.data.INFINITE_CARDINALITY)
    batches = iter(train)
    for _ in range(3):
        epoch = [next(batches) for _ in range(steps)]
        assert sum(int(images.shape[0]) for images, _ in epoch) == records
        labels = np.bincount(np.concatenate([m.numpy().ravel() for _, m in epoch]), minlength=256)
        np.testing.assert_array_equal(labels, expected_labels)
    assert evaluation.options().autotune.enabled is False  # Keras frees an eval iterator per validation
    assert train.options().autotune.enabled is not False
    assert sum(int(images.shape[0]) for images, _ in evaluation) > 0


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
    assert "image_size 64 needs (64, 64, 3)" in capsys.readouterr().err
    assert not (tmp_path / "train" / "model").exists()


# ---------------------------------------------------------------- training plan (pure functions)


def test_min_steps_raises_the_epochs_of_a_small_dataset_and_scales_patience():
    # 144 train examples, batch 16: 9 steps per epoch; 12 epochs = 108 steps < 500.
    plan = trainer.plan_training(144, batch_size=16, epochs=12, min_steps=500, patience=4)
    assert plan == {"records": 144, "configured_epochs": 12, "epochs": 56, "steps_per_epoch": 9, "steps": 504,
                    "early_stopping_patience": 19}
    # Enough steps already (800 examples: 50 per epoch, 600 steps): nothing changes.
    assert trainer.plan_training(800, batch_size=16, epochs=12, min_steps=500, patience=4) == {
        "records": 800, "configured_epochs": 12, "epochs": 12, "steps_per_epoch": 50, "steps": 600, "early_stopping_patience": 4}
    assert trainer.plan_training(5, batch_size=16, epochs=3, min_steps=0, patience=0)["epochs"] == 3


def test_auto_bn_momentum_averages_over_a_third_of_an_epoch_within_limits():
    assert trainer.fitted_bn_momentum(9, 504) == 0.75  # window 3 steps, raised to the minimum 4
    assert trainer.fitted_bn_momentum(60, 720) == pytest.approx(0.95)  # window 20 steps
    assert trainer.fitted_bn_momentum(60, 100) == pytest.approx(0.9)  # window 10: a tenth of a short run
    assert trainer.fitted_bn_momentum(5000, 100000) == pytest.approx(0.99)  # Keras's default for long epochs


def test_class_weights_are_inverse_sqrt_frequency_normalised_and_capped():
    weights = trainer.class_weights_from_counts([900, 90, 10])
    f = np.array([0.9, 0.09, 0.01])
    expected = 1 / np.sqrt(f) / np.sqrt(f).sum()
    np.testing.assert_allclose(weights, expected, rtol=1e-3)
    assert float(np.dot(f, weights)) == pytest.approx(1.0, rel=1e-3)  # the loss keeps its scale
    capped = trainer.class_weights_from_counts([10**8, 1, 0])
    assert capped[1] == trainer.MAX_CLASS_WEIGHT and capped[2] == 1.0


def test_cosine_schedule_warms_up_then_decays_to_zero_and_constant_stays():
    config = train_config(learning_rate=0.01, lr_schedule="cosine", warmup_fraction=0.1)
    schedule = trainer.learning_rate(config, 100)
    rates = [float(schedule(step)) for step in (0, 5, 10, 55, 100)]
    assert rates == pytest.approx([0.0, 0.005, 0.01, 0.005, 0.0], abs=1e-6)
    assert trainer.learning_rate(train_config(learning_rate=0.01, lr_schedule="constant"), 100) == 0.01


def test_resumed_checkpoint_and_early_stopping_continue_from_the_history(tmp_path):
    import keras

    previous = [{"epoch": 0, "val_iou": 0.4, "val_loss": 0.9}, {"epoch": 1, "val_iou": 0.6, "val_loss": 0.8},
                {"epoch": 2, "val_iou": 0.5, "val_loss": 0.7}]
    callbacks = trainer.make_callbacks(tmp_path, monitor="val_iou", patience=3, previous=previous)
    checkpoint = next(c for c in callbacks if isinstance(c, keras.callbacks.ModelCheckpoint))
    stopping = next(c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping))
    stopping.on_train_begin()
    assert (checkpoint.best, checkpoint.mode) == (0.6, "max")
    assert (stopping.best, stopping.best_epoch, stopping.wait) == (0.6, 1, 1)  # one epoch since the best
    by_loss = trainer.make_callbacks(tmp_path, monitor="val_loss", patience=3, previous=previous)
    stopping = next(c for c in by_loss if isinstance(c, keras.callbacks.EarlyStopping))
    stopping.on_train_begin()
    assert (stopping.best, stopping.wait) == (0.7, 0)


def test_scan_masks_counts_records_and_pixels_and_rejects_unknown_labels(tmp_path):
    masks = np.zeros((3, SIZE, SIZE), np.int64)
    masks[0, :4] = 1
    masks[1, 0, 0] = 255
    write_transformed(tmp_path / "ok", "train", np.zeros((3, SIZE, SIZE, 3), np.uint8), masks)
    records, pixels = trainer.scan_masks(artifacts.split_files(tmp_path / "ok", "train"), SIZE, 2)
    assert records == 3 and pixels == [3 * SIZE * SIZE - 4 * SIZE - 1, 4 * SIZE]
    masks[2, 5, 5] = 3
    write_transformed(tmp_path / "bad", "train", np.zeros((3, SIZE, SIZE, 3), np.uint8), masks)
    with pytest.raises(BadInputError, match=r"data-00000-of-00001.tfrecord.gz: mask label 3 outside 0..1 and 255"):
        trainer.scan_masks(artifacts.split_files(tmp_path / "bad", "train"), SIZE, 2)


# ---------------------------------------------------------------- batch norm in a short run


def squares(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark noise with one bright rectangle per image (the foreground), as transformed uint8 pixels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 103, (num, SIZE, SIZE, 3)).astype(np.uint8)
    masks = np.zeros((num, SIZE, SIZE), np.int64)
    for i in range(num):
        h, w = rng.integers(8, 16, 2)
        y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
        images[i, y : y + h, x : x + w] += 128
        masks[i, y : y + h, x : x + w] = 1
    return images, masks


@pytest.fixture(scope="module")
def short_bn_runs(tiny_transform, tmp_path_factory):
    """The same 60-step batch-norm training (32 train examples, batch 8) three ways: the default
    (`bn_momentum: auto`), Keras's default momentum 0.99, and 0.99 with the statistics recalibrated
    after training. Per setup: the summary and the exported model's eval scores in inference mode
    and in training mode."""
    import keras

    root = tmp_path_factory.mktemp("short_bn")
    data = root / "transformed"
    write_transformed(data, "train", *squares(32, 0))
    write_transformed(data, "eval", *squares(16, 1))
    config = train_config(epochs=2, batch_size=8, min_steps=60, early_stopping_patience=0, learning_rate=0.01)
    eval_batches = trainer.make_dataset(artifacts.split_files(data, "eval"), image_size=SIZE, batch_size=8, training=False)
    runs = {}
    for name, momentum, recalibration in (("auto", "auto", 0), ("keras_default", 0.99, 0), ("recalibrated", 0.99, 50)):
        out = root / name
        result = run_trainer(tiny_transform, out, transformed=data,
                             model_config={**MODEL_CONFIG, "batch_norm": True, "bn_momentum": momentum},
                             train_config={**config, "bn_recalibration_batches": recalibration})
        model = keras.saving.load_model(out / "model" / artifacts.KERAS_MODEL_FILE, compile=False)
        runs[name] = {"result": result, "inference": trainer.score(model, eval_batches, 2),
                      "training": trainer.score(model, eval_batches, 2, training=True)}
    return runs


def gaps(run: dict) -> dict[str, float]:
    """Training-mode minus inference-mode score of the exported model on the same eval batches."""
    return {metric: run["training"][metric] - run["inference"][metric] for metric in ("iou", "pixel_accuracy")}


def test_short_run_inference_mode_scores_what_training_mode_scores(short_bn_runs):
    run = short_bn_runs["auto"]
    assert run["result"]["plan"]["steps"] == 60 and run["result"]["bn_momentum"] == 0.75
    assert run["result"]["bn_recalibration_batches"] == 0  # the default: the fitted momentum alone
    assert run["result"]["metrics"]["val_iou"] == pytest.approx(run["inference"]["iou"], abs=1e-6)
    assert all(abs(gap) < 0.05 for gap in gaps(run).values()), run


def test_keras_default_momentum_fails_the_same_check(short_bn_runs):
    # The control for the test above: 60 steps at momentum 0.99 leave the moving statistics 55%
    # at their initial values, so inference mode is far from training mode on the same data.
    run = short_bn_runs["keras_default"]
    assert run["result"]["bn_momentum"] == 0.99 and run["result"]["bn_recalibration_batches"] == 0
    assert gaps(run)["iou"] > 0.2 and gaps(run)["pixel_accuracy"] > 0.05, run


def test_recalibration_repairs_the_statistics_of_momentum_099(short_bn_runs):
    run = short_bn_runs["recalibrated"]
    assert run["result"]["bn_recalibration_batches"] == 4  # the whole train split, 4 batches of 8
    assert all(abs(gap) < 0.05 for gap in gaps(run).values()), run
    assert run["inference"]["iou"] > short_bn_runs["keras_default"]["inference"]["iou"] + 0.2


# ------------------------------------------------------------------ validation every few epochs


def test_validation_epochs_are_every_nth_and_the_last():
    assert trainer.validation_epochs(4, 1) == 1
    assert trainer.validation_epochs(5, 2) == [2, 4, 5] and trainer.validation_epochs(6, 3) == [3, 6]


def test_epochs_that_were_not_validated_neither_checkpoint_nor_count_for_early_stopping(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.stop_training = False  # as fit sets it
    best = tmp_path / "best.weights.h5"
    checkpoint = trainer.best_checkpoint_callback(best, "val_iou", None)
    early = trainer.early_stopping_callback("val_iou", 1, [])
    for callback in (checkpoint, early):
        callback.set_model(model)
        callback.on_train_begin()
    logs = [{"loss": 1.0}, {"loss": 0.9, "val_iou": 0.5}, {"loss": 0.8}, {"loss": 0.7}, {"loss": 0.6, "val_iou": 0.4}]
    saved, stopped = [], []
    for epoch, epoch_logs in enumerate(logs):
        mtime = best.stat().st_mtime_ns if best.exists() else None
        for callback in (checkpoint, early):
            callback.on_epoch_begin(epoch)
            callback.on_epoch_end(epoch, epoch_logs)
        saved.append(best.exists() and best.stat().st_mtime_ns != mtime)
        stopped.append(bool(model.stop_training))
    # Keras's own ModelCheckpoint saves an epoch without the monitor unconditionally (epochs 0, 2, 3).
    assert saved == [False, True, False, False, False]
    assert stopped == [False, False, False, False, True]  # patience 1 counts the validations only


def test_history_of_a_run_validated_every_second_epoch(tiny_transform, tmp_path):
    result = run_trainer(tiny_transform, tmp_path, train_config=train_config(epochs=3, validation_freq=2))
    history = trainer.read_history(tmp_path / "model_run" / trainer.HISTORY_FILE)  # CSVLogger writes "NA"
    assert [("val_iou" in row) for row in history] == [False, True, True]
    assert result["best_epoch"] in (2, 3) and result["epochs"] == 3
