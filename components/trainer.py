"""Trainer: streams transformed TFRecords into the U-Net, survives preemption, exports for serving.

- Input: `tf.data` over the transformed examples (`image` uint8 S*S*3 pixels with their per-channel
  normalisation, `mask` int64 S*S, GZIP; components/transform.py):
  parallel interleave over shards, shuffle, batch, vectorised parse, augmentation, prefetch. It
  streams; `cache` (off by default) keeps parsed batches in memory for small datasets.
  `crop_size` > 0 trains on random patches of that size at the Transform's resolution (a third
  centred on foreground, as nnU-Net samples), validates and exports on whole images: detail of
  large images survives at the cost of a small one.
- Devices: MirroredStrategy over every visible GPU when there are two or more, the default strategy
  otherwise; `distribution: mirrored` forces MirroredStrategy over the local devices;
  `distribution: multi_worker` picks MultiWorkerMirroredStrategy, which reads the cluster from the
  TF_CONFIG that the launcher (e.g. a Kubeflow training operator) sets: only its chief writes the
  backup and publishes. `batch_size` is per replica. mixed_float16 on GPU (`mixed_precision:
  auto`), float32 head; optional XLA (`jit_compile`).
- Training length and schedule: `min_steps` raises the epochs of a small dataset until
  epochs * steps per epoch >= min_steps (early-stopping patience scales with them); Adam with a
  linear warm-up and cosine decay over those planned steps (`lr_schedule: cosine`) or a constant rate.
- Selection: the best checkpoint and early stopping follow `monitor` (default the foreground IoU the
  Evaluator's gate uses, higher is better), and both resume with the history of a preempted run.
- Batch norm in short runs: BN momentum fitted to the steps per epoch (`model.bn_momentum: auto`),
  so inference mode scores what training mode optimised; optionally (`bn_recalibration_batches`)
  the moving statistics are recomputed after training as exact averages over train batches.
- Imbalance: `loss: dice_bce` adds a soft Dice over the foreground classes; `class_weights: auto`
  weights the cross-entropy by the inverse square root of each class's pixel frequency in the
  train split (one pass over its masks), capped.
- Encoders: `model.encoder` mobilenet_v2 / resnet50 trains core.encoders' U-Net on that backbone,
  from `model.encoder_weights` when given (loaded before training; a bad file is BadInputError),
  with the backbone frozen for the first `model.encoder_freeze_epochs` epochs.
- Preemption: `backup_dir` (stable, outside the temporary output, keyed by the caller) holds the
  BackupAndRestore state, the best checkpoint, the CSV history and the TensorBoard logs, so a
  rerun resumes at its last completed epoch with its history intact; it is removed after success.
- Outputs (published together, atomically): Model (`serving_model/` SavedModel with the transform
  embedded + `model.keras`, both float32) and ModelRun (TensorBoard logs, history CSV, curves PNG).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from segpipe.components.core import artifacts
from segpipe.components.core.encoders import training_side, uses_patches
from segpipe.components.core.errors import BadInputError, TrainingError

log = logging.getLogger(__name__)

STATE_DIR = "state"  # BackupAndRestore's folder inside backup_dir
BACKUP_METADATA_FILE = "training_metadata.json"  # BackupAndRestore's epoch counter inside STATE_DIR
RUN_DIR = "run"  # history, logs and best checkpoint inside backup_dir
HISTORY_FILE = "history.csv"
CURVES_FILE = "training_curves.png"
LOGS_DIR = "logs"
BEST_WEIGHTS_FILE = "best.weights.h5"
# `train.monitor` -> direction of improvement (the Keras metric names of core/model.py's
# segmentation_metrics, with Keras's `val_` prefix for the eval split).
MONITOR_MODES = {"val_iou": "max", "val_pixel_accuracy": "max", "val_dice": "max", "val_loss": "min"}
MAX_CLASS_WEIGHT = 10.0  # larger inverse-sqrt weights would let a handful of pixels dominate the loss
FOREGROUND_CROPS = 1 / 3  # share of training patches centred on a foreground pixel (train.crop_size > 0)
BN_WINDOW_STEPS = (4.0, 100.0)  # auto BN momentum: the averaging window 1 / (1 - momentum) in steps, clipped


# ---------------------------------------------------------------- input pipeline


def feature_spec(image_size: int) -> dict[str, Any]:
    """The transformed example as Transform writes it (docs/components.md, Transform), flat; the
    `image` bytes are decoded by transform.decode_pixels."""
    import tensorflow as tf

    from segpipe.components.transform import PIXEL_OFFSET_KEY, PIXEL_SCALE_KEY

    return {
        artifacts.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
        PIXEL_OFFSET_KEY: tf.io.FixedLenFeature([3], tf.float32),
        PIXEL_SCALE_KEY: tf.io.FixedLenFeature([3], tf.float32),
        artifacts.MASK_KEY: tf.io.FixedLenFeature([image_size * image_size], tf.int64),
    }


def parse_batch(serialized: Any, image_size: int, augment: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """A batch of serialized examples -> (model input float32 [B, S, S, 3], masks int32 [B, S, S]).

    The stored uint8 pixels become the model input by transform.normalize_pixels, the rule the
    serving transform applies. With `augment` (augment_batch's keyword arguments) flips, turns and
    patches move the uint8 pixels, normalize_pixels converts them (augment_batch's `offset`,
    `scale`), and the zoom resamples the model input (TF's bilinear resize is ~2x slower on uint8
    than on float32). Draws and values are those of augment_batch on the model input.
    """
    import tensorflow as tf

    from segpipe.components.transform import (PIXEL_OFFSET_KEY, PIXEL_SCALE_KEY, decode_pixels, normalize_pixels,
                                              record_scaling)

    features = tf.io.parse_example(serialized, feature_spec(image_size))
    offset, scale = record_scaling(features[PIXEL_OFFSET_KEY], features[PIXEL_SCALE_KEY])
    pixels = decode_pixels(features[artifacts.IMAGE_KEY], image_size)
    masks = tf.reshape(tf.cast(features[artifacts.MASK_KEY], tf.int32), [-1, image_size, image_size])
    if augment:
        return augment_batch(pixels, masks, **augment, offset=offset, scale=scale)
    return normalize_pixels(pixels, offset, scale), masks


def dihedral_sources(size: int) -> Any:
    """[16, S*S] int32: for each flip/turn combination, the flat source pixel of every output pixel.

    Row lr * 8 + ud * 4 + k is a left-right flip (lr), then an up-down flip (ud), then k
    counter-clockwise quarter turns (tf.image.rot90's direction) of an S x S image.
    """
    import numpy as np

    pixels = np.arange(size * size, dtype=np.int32).reshape(size, size)
    rows = []
    for lr in (0, 1):
        for ud in (0, 1):
            for k in range(4):
                moved = pixels[:, ::-1] if lr else pixels
                moved = moved[::-1] if ud else moved
                rows.append(np.rot90(moved, k).ravel())
    return np.stack(rows)


def crop_origins(masks: Any, crop: int) -> tuple[Any, Any]:
    """[B] top and left corners of one crop x crop patch per example of `masks` [B, S, S].

    A share FOREGROUND_CROPS of the patches is centred on a labelled pixel of a foreground class
    that the example contains, each present class equally likely (nnU-Net's oversampling: a rare
    class would otherwise be in few random patches); the rest, and examples without foreground,
    are placed uniformly.
    """
    import tensorflow as tf

    batch, size = tf.shape(masks)[0], int(masks.shape[1])
    span = size - crop + 1
    top = tf.random.uniform([batch], 0, span, dtype=tf.int32)
    left = tf.random.uniform([batch], 0, span, dtype=tf.int32)
    flat = tf.reshape(masks, [batch, -1])
    classes = tf.reduce_max(tf.where(flat == artifacts.IGNORE_LABEL, 0, flat)) + 1  # ids 1..K-1 present anywhere
    present = tf.reduce_any(flat[:, None, :] == tf.range(1, tf.maximum(classes, 2))[None, :, None], axis=-1)
    has_foreground = tf.reduce_any(present, axis=-1)
    chosen = tf.random.categorical(tf.math.log(tf.cast(present, tf.float32)), 1, dtype=tf.int32)[:, 0] + 1
    on_class = tf.where(flat == chosen[:, None], 0.0, -math.inf)
    pixel = tf.random.categorical(tf.where(has_foreground[:, None], on_class, 0.0), 1, dtype=tf.int32)[:, 0]
    centred = tf.random.uniform([batch]) < FOREGROUND_CROPS
    use = centred & has_foreground
    top = tf.where(use, tf.clip_by_value(pixel // size - crop // 2, 0, span - 1), top)
    left = tf.where(use, tf.clip_by_value(pixel % size - crop // 2, 0, span - 1), left)
    return top, left


def select_pixels(images: Any, masks: Any, sources: Any, picks: Any) -> tuple[Any, Any]:
    """augment_batch's one selection of pixels (compiled with XLA there).

    `sources` [B, P*P]: the flat batch pixel of each output pixel of `images` [B, S, S, C] and
    `masks` [B, S, S]; the masks take sources[:, picks] when `picks` [P*P] is given (the zoom's
    nearest neighbours).
    """
    import tensorflow as tf

    batch, side, channels = tf.shape(sources)[0], math.isqrt(int(sources.shape[1])), int(images.shape[-1])
    flat = tf.reshape(images, [-1, channels])
    images = tf.reshape(tf.gather(flat, tf.reshape(sources, [-1])), [batch, side, side, channels])
    mask_sources = sources if picks is None else tf.gather(sources, picks, axis=1)
    return images, tf.reshape(tf.gather(tf.reshape(masks, [-1]), tf.reshape(mask_sources, [-1])), [batch, side, side])


def nearest_sources(side: int, cut: Any, start: Any) -> Any:
    """[side] int32: the source row (or column) of each output row when `cut` rows from `start` are
    resized to `side` nearest-neighbour, by tf.image.resize's rule (half-pixel centres)."""
    import tensorflow as tf

    ratio = tf.cast(cut, tf.float32) / side
    return start + tf.minimum(tf.cast(tf.floor((tf.range(side, dtype=tf.float32) + 0.5) * ratio), tf.int32), cut - 1)


def augment_batch(
    images: Any, masks: Any, *, flip: bool, rot90: bool, zoom: float, crop: int = 0, offset: Any = None,
    scale: Any = None,
) -> tuple[Any, Any]:
    """Random per-example patches, flips and 90-degree rotations, a per-batch zoom-in crop; identical
    on image and mask.

    `images` [B, S, S, C] of any dtype, `masks` [B, S, S] int, S static. With `offset` and `scale`
    (per channel, parse_batch's stored uint8 pixels) the moved pixels are normalised
    (transform.normalize_pixels) before the zoom, so bytes move and floats are resampled; the zoom
    returns float32.
    `crop` > 0 cuts one crop x crop patch per example at the stored resolution (crop_origins); the
    outputs are then [B, crop, crop, ...]. Each example draws a left-right flip, an up-down flip
    (p = 0.5 each, `flip`) and 0-3 quarter turns (`rot90`); patch and moves together are one
    selection of pixels, so the batch moves with a single gather per tensor (computing every
    candidate and selecting with tf.where cost ~8x more).
    The zoom resamples the image bilinearly and the mask nearest-neighbour, so class ids (and 255)
    survive; the mask's zoom is a selection of the moved pixels too, so its moves and zoom are one
    gather (tf.image.resize's nearest on the mask cost more than the bilinear image zoom).
    """
    import tensorflow as tf

    from segpipe.components.transform import normalize_pixels

    batch, size = tf.shape(images)[0], int(images.shape[1])
    side = training_side(size, crop)
    no_flip = tf.zeros([batch], tf.int32)
    left_right = tf.cast(tf.random.uniform([batch]) < 0.5, tf.int32) if flip else no_flip
    up_down = tf.cast(tf.random.uniform([batch]) < 0.5, tf.int32) if flip else no_flip
    turns = tf.random.uniform([batch], 0, 4, dtype=tf.int32) if rot90 else no_flip
    sources = tf.gather(tf.constant(dihedral_sources(side)), left_right * 8 + up_down * 4 + turns)
    if side < size:  # patch pixel (r, c) -> stored pixel (top + r, left + c)
        top, left = crop_origins(masks, side)
        sources = (top[:, None] + sources // side) * size + left[:, None] + sources % side
    sources += tf.range(batch)[:, None] * (size * size)  # into the flat batch
    picks = None
    if zoom > 0:
        # One zoom per batch (a random crop resized back). Per-example tf.image.crop_and_resize
        # would make grappler log a cost-model warning every epoch on CPU.
        zoomed = 1.0 - tf.random.uniform([], 0.0, zoom)
        cut = tf.maximum(1, tf.cast(tf.round(zoomed * side), tf.int32))
        top = tf.random.uniform([], 0, side - cut + 1, dtype=tf.int32)
        left = tf.random.uniform([], 0, side - cut + 1, dtype=tf.int32)
        picks = tf.reshape(nearest_sources(side, cut, top)[:, None] * side + nearest_sources(side, cut, left), [-1])
    # Compiled with XLA: at 128 px the two gathers of a batch of 16 took 1.0 ms of CPU against 2.6
    # with TF's kernels. The normalisation stays outside: fused into the XLA gather it cost more
    # than TF's tiled kernel (transform.normalize_pixels). Traced once per dataset.
    images, masks = tf.function(select_pixels, jit_compile=True)(images, masks, sources, picks)
    if offset is not None:
        images = normalize_pixels(images, offset, scale)
    if zoom > 0:
        images = tf.image.resize(images[:, top : top + cut, left : left + cut], [side, side], method="bilinear")
    return images, masks


def make_dataset(
    files: list[str],
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    shuffle_buffer: int = 0,
    cache: bool = False,
    augment: Mapping[str, Any] | None = None,
    seed: int | None = None,
    num_records: int | None = None,
) -> Any:
    """Streaming (images, masks) batches from GZIP TFRecord shards.

    Training: shards and records shuffled (reshuffled each epoch; `shuffle_buffer` 0 shuffles shards
    only), then augmented with `augment` ({"flip", "rot90", "zoom"}, optional "crop": training
    patches, see augment_batch); parallel stages hand on whatever finishes first
    (deterministic=False), so one slow shard or batch never stalls the rest. Eval: file order, no augmentation. Parsing is vectorised per batch (one parse_example
    call per batch).
    `num_records` declares the length (ceil(num_records / batch_size) batches; tf.data fails if the
    data disagrees): Keras then ends each epoch after exactly that many steps instead of running one
    more step into the end of the data, which advances the optimizer's step counter (and so the
    learning-rate schedule) without an update. fit_inputs repeats the training input so that one
    iterator serves the whole fit.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    dataset = tf.data.Dataset.from_tensor_slices(list(files))
    if training:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=min(len(files), 8) or 1,
        num_parallel_calls=autotune,
        deterministic=not training,
    )
    if training and shuffle_buffer > 0:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, num_parallel_calls=autotune)
    if num_records is not None:
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(math.ceil(num_records / batch_size)))
    augmentation = None
    crop = int(augment.get("crop", 0)) if augment else 0
    if training and augment and (augment["flip"] or augment["rot90"] or augment["zoom"] > 0 or uses_patches(image_size, crop)):
        augmentation = {"flip": bool(augment["flip"]), "rot90": bool(augment["rot90"]), "zoom": float(augment["zoom"]),
                        "crop": crop}
    # Parse and augment in one map (one hop between tf.data threads per batch) unless the parsed
    # batches are cached, which must happen before the random augmentation.
    parallel = {"num_parallel_calls": autotune, "deterministic": not training}
    if augmentation and not cache:
        dataset = dataset.map(lambda records: parse_batch(records, image_size, augmentation), **parallel)
    else:
        dataset = dataset.map(lambda records: parse_batch(records, image_size), **parallel)
        if cache:
            dataset = dataset.cache()
        if augmentation:
            dataset = dataset.map(lambda x, y: augment_batch(x, y, **augmentation), **parallel)
    dataset = dataset.prefetch(autotune)
    if not training:
        # Keras makes a new iterator for every evaluation, and freeing one that tf.data's autotuning
        # had run left both cores idle for about 4 s in 4 of 9 epochs of the demo (bench_trainer's
        # epoch stalls). Without autotuning, each AUTOTUNE parallel stage runs one call per core (at
        # most 16) and prefetch sizes its own buffer, which is enough for a pass that feeds no trainer.
        options = tf.data.Options()
        options.autotune.enabled = False
        dataset = dataset.with_options(options)
    return dataset


# ---------------------------------------------------------------- input checks


def first_example(path: str) -> Any | None:
    """The first tf.train.Example of a GZIP shard, or None when the shard is empty."""
    import tensorflow as tf
    from tensorflow.core.example import example_pb2

    for record in tf.data.TFRecordDataset(path, compression_type="GZIP").take(1):
        return example_pb2.Example.FromString(record.numpy())
    return None


def check_split(transformed_examples_uri: str, split: str, image_size: int) -> list[str]:
    """Shard list of a split whose first record is a transformed example of `image_size`
    (transform.serialized_example's layout, which parse_batch reads); BadInputError otherwise."""
    import numpy as np
    import tensorflow as tf

    from segpipe.components.transform import PIXEL_OFFSET_KEY, PIXEL_SCALE_KEY

    files = artifacts.split_files(transformed_examples_uri, split)
    folder = artifacts.split_dir(transformed_examples_uri, split)
    if not files:
        raise BadInputError(f"{folder}: no {artifacts.SHARD_PATTERN} shards; the {split} split is empty")
    for path in files:
        example = first_example(path)
        if example is None:
            continue
        features = example.features.feature
        rerun = f"rerun Transform with transform.image_size={image_size}"
        stored = features[artifacts.IMAGE_KEY].bytes_list.value if artifacts.IMAGE_KEY in features else []
        try:
            pixels = tf.io.parse_tensor(stored[0], tf.uint8).numpy() if len(stored) == 1 else None
        except tf.errors.InvalidArgumentError:
            pixels = None
        if pixels is None:  # e.g. float32 pixels written by a Transform before uint8 storage
            raise BadInputError(f"{path} record 0: feature '{artifacts.IMAGE_KEY}' is not one serialized uint8 "
                                f"tensor (tf.io.serialize_tensor); {rerun}")
        if pixels.shape != (image_size, image_size, 3):
            raise BadInputError(f"{path} record 0: feature '{artifacts.IMAGE_KEY}' holds pixels of shape "
                                f"{pixels.shape}, the model input of image_size {image_size} needs "
                                f"{(image_size, image_size, 3)}; {rerun}")
        if not np.array_equal(np.frombuffer(stored[0][-pixels.size:], np.uint8), pixels.ravel()):
            raise BadInputError(f"{path} record 0: feature '{artifacts.IMAGE_KEY}' does not end with its pixels "
                                f"(transform.decode_pixels reads them there); {rerun}")
        for key, kind, expected in (
            (PIXEL_OFFSET_KEY, "float_list", 3),
            (PIXEL_SCALE_KEY, "float_list", 3),
            (artifacts.MASK_KEY, "int64_list", image_size * image_size),
        ):
            found = len(getattr(features[key], kind).value) if key in features else None
            if found != expected:
                raise BadInputError(
                    f"{path} record 0: feature '{key}' has {found} values, the model input of image_size "
                    f"{image_size} needs {expected} ({kind}); {rerun}"
                )
        return files
    raise BadInputError(f"{folder}: every shard is empty; the {split} split has no records")


def scan_masks(files: list[str], image_size: int, num_classes: int) -> tuple[int, list[int]]:
    """(records, pixels per class 0..K-1 with 255 excluded) of a split: one pass parsing masks only.

    A label outside 0..K-1 and 255 is BadInputError naming the shard (it would silently count as
    no class in the loss and the metrics).
    """
    import numpy as np
    import tensorflow as tf

    spec = {artifacts.MASK_KEY: tf.io.FixedLenFeature([image_size * image_size], tf.int64)}
    records, counts = 0, np.zeros(num_classes, np.int64)
    for path in files:
        batches = tf.data.TFRecordDataset(path, compression_type="GZIP").batch(256)
        for masks in batches.map(lambda rows: tf.io.parse_example(rows, spec)[artifacts.MASK_KEY]):
            labels = masks.numpy().ravel()
            labels = labels[labels != artifacts.IGNORE_LABEL]
            bad = labels[(labels < 0) | (labels >= num_classes)]
            if bad.size:
                raise BadInputError(f"{path}: mask label {int(bad[0])} outside 0..{num_classes - 1} and "
                                    f"{artifacts.IGNORE_LABEL}; data.num_classes is {num_classes}")
            records += int(masks.shape[0])
            counts += np.bincount(labels, minlength=num_classes)
    return records, [int(c) for c in counts]


# ---------------------------------------------------------------- training plan


def plan_training(train_records: int, *, batch_size: int, epochs: int, min_steps: int, patience: int) -> dict[str, int]:
    """Epochs, steps and early-stopping patience for a split of `train_records` examples.

    steps_per_epoch = ceil(records / batch); epochs = max(configured, ceil(min_steps / steps_per_epoch)),
    so a small dataset still gets min_steps optimizer steps. Patience (in epochs) scales by the same
    factor, so it covers the same share of the run.
    """
    steps_per_epoch = max(1, math.ceil(train_records / batch_size))
    planned = max(epochs, math.ceil(min_steps / steps_per_epoch))
    return {
        "records": train_records,
        "configured_epochs": epochs,
        "epochs": planned,
        "steps_per_epoch": steps_per_epoch,
        "steps": planned * steps_per_epoch,
        "early_stopping_patience": math.ceil(patience * planned / epochs),
    }


def fitted_bn_momentum(steps_per_epoch: int, total_steps: int) -> float:
    """BN momentum 1 - 1/w for an averaging window w = min(steps_per_epoch / 3, total_steps / 10).

    With w a third of an epoch, the moving statistics at an epoch's end weigh that epoch's start by
    e^-3 only, so each epoch's eval (and the checkpoint chosen on it) sees statistics of the weights
    being evaluated. w is clipped to BN_WINDOW_STEPS: at 300+ steps per epoch this is Keras's 0.99.
    """
    low, high = BN_WINDOW_STEPS
    window = min(max(min(steps_per_epoch / 3, total_steps / 10), low), high)
    return round(1.0 - 1.0 / window, 4)


def class_weights_from_counts(counts: list[int]) -> list[float]:
    """Inverse square-root frequency weights: w_c = f_c^(-1/2) / sum_k f_k^(1/2), capped at MAX_CLASS_WEIGHT.

    f_c = pixels of class c / all labelled pixels. The normalisation keeps the pixel-weighted mean
    sum_c f_c w_c = 1 (before the cap), so the loss keeps its scale; a class with no pixel gets 1
    (it never occurs as a label, so its weight is never used).
    """
    total = float(sum(counts))
    if total <= 0:
        return [1.0] * len(counts)
    norm = sum(math.sqrt(c / total) for c in counts)
    return [round(min(1.0 / (math.sqrt(c / total) * norm), MAX_CLASS_WEIGHT), 4) if c else 1.0 for c in counts]


def learning_rate(train_config: Mapping[str, Any], total_steps: int) -> Any:
    """The optimizer's rate: constant, or linear warm-up from 0 then cosine decay to 0 at `total_steps`.

    The schedule is a function of the optimizer's step counter, which BackupAndRestore restores, so a
    resumed run continues the same curve.
    """
    import keras

    rate = float(train_config["learning_rate"])
    if train_config["lr_schedule"] == "constant":
        return rate
    warmup = int(round(total_steps * float(train_config["warmup_fraction"])))
    decay_steps = max(1, total_steps - warmup)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(rate, decay_steps)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps, warmup_target=rate, warmup_steps=warmup)


# ---------------------------------------------------------------- devices


def select_strategy(distribution: str) -> Any:
    """The tf.distribute strategy of `train.distribution`.

    multi_worker: MultiWorkerMirrored over the TF_CONFIG cluster. mirrored: Mirrored over every
    local GPU, or over every logical CPU device when there is no GPU (one replica each; a process
    has several CPU devices only when it configures them). auto: Mirrored over >= 2 GPUs, else the
    default one-device strategy.
    """
    import tensorflow as tf

    if distribution == "multi_worker":
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as exc:  # "Collective ops must be configured at program startup"
            raise TrainingError(
                f"train.distribution multi_worker: {exc}; TensorFlow already ran in this process, so the "
                "trainer must be the first TensorFlow work of its process (one process per worker)"
            ) from None
        # Two calls Keras 3's fit makes fail under MultiWorkerMirrored, so reduce is adapted on this
        # strategy object: fit reduces its first (images, masks) batch in one call over the tuple
        # (Mirrored's reduce maps over a structure, MultiWorkerMirrored's takes one value), and it
        # reduces each step's scalar logs along axis 0, which a scalar does not have: a scalar
        # becomes a 1-vector, so the reduction is the mean over the replicas, as Keras means it.
        reduce = strategy.reduce

        def reduce_each(op: Any, value: Any, axis: int | None = None) -> Any:
            def one(v: Any) -> Any:
                if axis is not None and strategy.experimental_local_results(v)[0].shape.rank == 0:
                    v = strategy.run(lambda x: tf.reshape(x, [1]), args=(v,))
                return reduce(op, v, axis=axis)

            return tf.nest.map_structure(one, value)

        strategy.reduce = reduce_each
        return strategy
    gpus = tf.config.list_logical_devices("GPU")
    if distribution == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if len(gpus) >= 2:
        return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus])
    return tf.distribute.get_strategy()


def select_precision(mode: str) -> str:
    """Keras dtype policy: mixed_float16 on GPU for `auto`, always for `on`, never for `off`."""
    import tensorflow as tf

    if mode == "on" or (mode == "auto" and tf.config.list_physical_devices("GPU")):
        return "mixed_float16"
    return "float32"


# ---------------------------------------------------------------- model


def model_input_size(image_size: int, crop: int) -> int | None:
    """create_model's size for training: None (any size) when it trains on crop x crop patches of
    image_size inputs and validates on whole ones, else image_size."""
    return None if uses_patches(image_size, crop) else image_size


def create_model(image_size: int | None, num_classes: int, model_config: Mapping[str, Any]) -> Any:
    """The U-Net of `model_config`, whose `bn_momentum` is a number (train_model resolves `auto`).

    `image_size` None builds it for any input size (divisible by its total stride): a model that
    trains on patches (train.crop_size) and validates on whole images. The exported copy is
    built at the Transform's size (float32_copy), so serving sees the same model either way.

    With a backbone (`encoder` other than unet) `model_config` also holds `input_scale` and
    `input_offset`, the Transform's pixel scaling (train_model reads it from the transform graph).
    A `model_config` without the encoder fields (as written before backbones) is the plain U-Net.
    """
    from segpipe.components.core.encoders import UNET, build_encoder_unet
    from segpipe.components.core.model import build_unet

    if model_config.get("encoder", UNET) != UNET:
        return build_encoder_unet(
            str(model_config["encoder"]),
            input_shape=(image_size, image_size, 3),
            num_classes=artifacts.output_channels(num_classes),
            base_filters=int(model_config["base_filters"]),
            batch_norm=bool(model_config["batch_norm"]),
            dropout=float(model_config["dropout"]),
            bn_momentum=float(model_config["bn_momentum"]),
            alpha=float(model_config["encoder_alpha"]),
            input_scale=model_config["input_scale"],
            input_offset=model_config["input_offset"],
        )
    return build_unet(
        input_shape=(image_size, image_size, 3),
        num_classes=artifacts.output_channels(num_classes),
        base_filters=int(model_config["base_filters"]),
        depth=int(model_config["depth"]),
        batch_norm=bool(model_config["batch_norm"]),
        dropout=float(model_config["dropout"]),
        bn_momentum=float(model_config["bn_momentum"]),
    )


def encoder_input_range(encoder: str, transform_graph_uri: str) -> dict[str, list[float]]:
    """{"input_scale", "input_offset"} per channel with pixel / 255 = x * scale + offset for the
    Transform's output x ({} for the plain U-Net, which learns on x as it is).

    Read off the transform graph itself by transforming a black and a white image, so it holds for
    x / 255 (scale 1, offset 0) and for the train split's standardisation (scale std, offset mean).
    """
    import numpy as np
    import tensorflow as tf

    from segpipe.components.core.encoders import UNET
    from segpipe.components.transform import load_serving_transform

    if encoder == UNET:
        return {}
    images = [tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(value, tf.uint8))) for value in (0, 255)]
    black, white = load_serving_transform(transform_graph_uri).transform_image(tf.stack(images)).numpy()[:, 0, 0]
    scale = 1.0 / (np.asarray(white, np.float64) - np.asarray(black, np.float64))
    return {"input_scale": [float(v) for v in scale], "input_offset": [float(v) for v in -black * scale]}


def compile_model(
    model: Any, num_classes: int, train_config: Mapping[str, Any], *, total_steps: int, class_weights: list[float] | None
) -> None:
    """Adam (one fused kernel per variable, see core.optimizers) on the learning-rate schedule + the
    configured loss + pixel accuracy / IoU / Dice (all ignore 255)."""
    from segpipe.components.core.model import get_loss, segmentation_metrics
    from segpipe.components.core.optimizers import FusedAdam

    model.compile(
        optimizer=FusedAdam(learning_rate(train_config, total_steps)),
        loss=replica_mean_loss(get_loss(train_config["loss"], class_weights)),
        metrics=segmentation_metrics(num_classes),
        jit_compile=bool(train_config["jit_compile"]),
    )


def replica_mean_loss(loss: Any) -> Any:
    """`loss` (a SegmentationLoss) divided by the replicas in sync of the strategy it runs under.

    The strategy sums the replicas' gradients, so each replica's loss must be its share of the
    global batch's mean. Keras 3 divides only inside its own batch reduction, which a loss returning
    a scalar (segpipe's losses are already means over a batch's valid pixels) skips: without this,
    N replicas would step with N times the gradient and log N times the loss. One replica: unchanged.
    """
    import tensorflow as tf

    class ReplicaMeanLoss(type(loss)):
        def call(self, y_true: Any, y_pred: Any) -> Any:
            return super().call(y_true, y_pred) / tf.distribute.get_strategy().num_replicas_in_sync

    return ReplicaMeanLoss(loss.kind, loss.class_weights)


def find_keras_model(base_model_uri: str) -> Path:
    """model.keras inside a Model artifact or a serving version folder."""
    path = Path(base_model_uri) / artifacts.KERAS_MODEL_FILE
    if not path.is_file():
        raise BadInputError(f"{path}: base model for warm start not found (expected a Model artifact or serving version)")
    return path


def same_shape(one: Sequence[int | None], other: Sequence[int | None]) -> bool:
    """Equal shapes, a None (any size: a model that trains on patches) matching every size."""
    return len(one) == len(other) and all(a is None or b is None or a == b for a, b in zip(one, other))


def warm_start(model: Any, base_model_uri: str | None) -> dict[str, Any]:
    """Copy a base model's weights into `model` when compatible.

    Different input/output shapes: BadInputError (the base model belongs to other data). Same I/O
    but another architecture (encoder, depth, filters, batch norm): logged, fresh start. The model's
    name says its encoder (`unet`, `unet_mobilenet_v2`, ...), so backbones never mix. The fixed
    (non-trainable) layers keep this run's values: the encoder's input conversion follows this
    run's Transform.
    """
    import keras

    if not base_model_uri:
        return {"used": False, "reason": "no base model"}
    path = find_keras_model(base_model_uri)
    try:
        base = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # a corrupt or foreign file: the message names it
        raise BadInputError(f"{path}: cannot load base model ({exc})") from None
    if not same_shape(base.input_shape, model.input_shape) or not same_shape(base.output_shape, model.output_shape):
        raise BadInputError(
            f"{path}: base model maps {base.input_shape} -> {base.output_shape}, this training needs "
            f"{model.input_shape} -> {model.output_shape}; disable train.warm_start or pass a matching base model"
        )
    base_shapes = [tuple(w.shape) for w in base.weights]
    shapes = [tuple(w.shape) for w in model.weights]
    if base.name != model.name or base_shapes != shapes:
        differs = (f"{base.name} vs {model.name}" if base.name != model.name
                   else f"{len(base_shapes)} vs {len(shapes)} weight tensors")
        reason = f"architecture differs from {path} ({differs}); fresh start"
        log.warning("warm start skipped: %s", reason)
        return {"used": False, "reason": reason}
    fixed = {layer.name: layer.get_weights() for layer in model.layers if not layer.trainable}
    model.set_weights(base.get_weights())
    for name, weights in fixed.items():
        model.get_layer(name).set_weights(weights)
    log.info("warm start from %s", path)
    return {"used": True, "reason": f"initialised from {path}"}


# ---------------------------------------------------------------- callbacks


def raise_on_nan_callback() -> Any:
    """Fail fast with the epoch and step instead of TerminateOnNaN's silent stop."""
    import keras

    class RaiseOnNaN(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.epoch = epoch

        def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise TrainingError(
                    f"training loss became {float(loss)} at epoch {self.epoch + 1} step {batch + 1}; "
                    "lower train.learning_rate or check the transformed data for NaN/inf"
                )

    return RaiseOnNaN()


def read_history(path: Path) -> list[dict[str, float]]:
    """CSVLogger rows, one per epoch (a repeated epoch after a resume keeps its last row)."""
    if not path.is_file():
        return []
    rows: dict[int, dict[str, float]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            # "NA": CSVLogger's value for an eval metric of an epoch that was not validated.
            rows[int(row["epoch"])] = {k: float(v) for k, v in row.items() if v not in ("", "NA", None)}
    return [rows[epoch] for epoch in sorted(rows)]


def best_index(values: list[float], mode: str) -> int:
    """Index of the first best value (a later equal value is no improvement, as in Keras)."""
    pick = max if mode == "max" else min
    return pick(range(len(values)), key=values.__getitem__)


def early_stopping_callback(monitor: str, patience: int, previous: list[float]) -> Any:
    """EarlyStopping that resumes its count: the best value and the epochs since it come from the
    history of the epochs completed before a preemption (Keras would start counting afresh)."""
    import keras

    mode = MONITOR_MODES[monitor]

    class ResumableEarlyStopping(validated_epochs_only(keras.callbacks.EarlyStopping, monitor)):
        def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
            super().on_train_begin(logs)
            if previous:
                best = best_index(previous, mode)
                self.best, self.best_epoch, self.wait = previous[best], best, len(previous) - 1 - best

    return ResumableEarlyStopping(monitor=monitor, mode=mode, patience=patience)


def validated_epochs_only(callback_class: type, monitor: str) -> type:
    """`callback_class` (a Keras callback) seeing only the epochs that were validated: with
    train.validation_freq > 1 the others have no `monitor` value, and Keras's ModelCheckpoint would
    then save unconditionally and EarlyStopping would count an epoch it could not judge."""

    class ValidatedEpochsOnly(callback_class):
        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            if logs and monitor in logs:
                super().on_epoch_end(epoch, logs)

    return ValidatedEpochsOnly


def encoder_freeze_callback(freeze_epochs: int) -> Any:
    """Trains the first `freeze_epochs` epochs with the backbone (`encoder` sub-model) frozen, then all of it.

    Frozen, the backbone's weights stay as loaded and its batch norm runs in inference mode (Keras's
    transfer-learning rule), so a random decoder does not wreck pretrained features. The optimizer is
    built over every variable before the first epoch, so its state has one layout in both phases and
    BackupAndRestore resumes either; the epoch number alone decides the phase, so a resumed run
    freezes exactly as long as an uninterrupted one. Training ends with the backbone trainable.
    """
    import keras

    from segpipe.components.core.encoders import encoder_of

    class FreezeEncoder(keras.callbacks.Callback):
        def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
            if not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)

        def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.set_frozen(epoch < freeze_epochs, epoch)

        def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
            self.set_frozen(False, None)

        def set_frozen(self, frozen: bool, epoch: int | None) -> None:
            encoder = encoder_of(self.model)
            if encoder.trainable != frozen:
                return
            encoder.trainable = not frozen
            self.model.make_train_function(force=True)  # the step function captured the old variable list
            if epoch is not None:
                log.info("epoch %d: backbone %s", epoch + 1, "frozen" if frozen else "unfrozen")

    return FreezeEncoder()


def best_checkpoint_callback(path: Path, monitor: str, initial: float | None) -> Any:
    """ModelCheckpoint of the best weights among the validated epochs (validated_epochs_only)."""
    import keras

    best_validated = validated_epochs_only(keras.callbacks.ModelCheckpoint, monitor)
    return best_validated(str(path), monitor=monitor, mode=MONITOR_MODES[monitor], save_best_only=True,
                          save_weights_only=True, initial_value_threshold=initial)


def validation_epochs(epochs: int, freq: int) -> int | list[int]:
    """Keras fit's `validation_freq`: every `freq` epochs and always the last (1-indexed), so the
    final weights can be chosen."""
    return 1 if freq <= 1 else sorted({*range(freq, epochs + 1, freq), epochs})


def make_callbacks(
    backup_dir: Path, *, monitor: str, patience: int, previous: list[dict[str, float]], write_dir: Path | None = None,
) -> list[Any]:
    """NaN guard, epoch lines, best-`monitor` checkpoint, TensorBoard, CSV log, early stop, backup/restore.

    `previous` is the history of the epochs completed before a resume: the checkpoint and early
    stopping continue from its best value. BackupAndRestore comes last so that an epoch counts as
    done only after its logs are written. Every file goes under `write_dir` (default `backup_dir`);
    the state is restored from `backup_dir`.
    """
    import keras

    from segpipe.components.core.progress import epoch_progress

    mode = MONITOR_MODES[monitor]
    values = [row[monitor] for row in previous if monitor in row]
    write_dir = write_dir or backup_dir
    run = write_dir / RUN_DIR
    callbacks = [
        raise_on_nan_callback(),
        epoch_progress(),
        best_checkpoint_callback(run / BEST_WEIGHTS_FILE, monitor, values[best_index(values, mode)] if values else None),
        keras.callbacks.TensorBoard(log_dir=str(run / LOGS_DIR), update_freq="epoch", profile_batch=0),
        keras.callbacks.CSVLogger(str(run / HISTORY_FILE), append=True),
    ]
    if patience > 0:
        callbacks.append(early_stopping_callback(monitor, patience, values))
    callbacks.append(backup_callback(backup_dir / STATE_DIR, write_dir / STATE_DIR))
    return callbacks


def backup_callback(read_dir: Path, write_dir: Path) -> Any:
    """BackupAndRestore that restores from `read_dir` and saves into `write_dir`, each save atomic.

    Every worker of a multi-worker run restores the chief's state (`read_dir`, the shared backup)
    and only the chief saves there; the others save into their own scratch folder (TF's pattern for
    non-chief workers). A save writes the epoch's weights under a new name, then points
    training_metadata.json at them with one rename, then deletes the older weights, so a kill at
    any moment leaves a matching epoch counter and weights (Keras's own callback overwrites the
    weights first and the counter afterwards).
    """
    import keras

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        def _load_model(self) -> None:
            meta = read_dir / BACKUP_METADATA_FILE
            if meta.is_file():  # a backup of Keras's own layout names no file: its latest.weights.h5
                self._weights_path = str(read_dir / json.loads(meta.read_text()).get("weights", "latest.weights.h5"))
            super()._load_model()

        def _save_model(self) -> None:
            write_dir.mkdir(parents=True, exist_ok=True)
            name = f"epoch-{self._current_epoch}.weights.h5"
            partial = write_dir / f".partial-{name}"  # Keras requires the .weights.h5 ending
            self.model.save_weights(str(partial), overwrite=True)
            os.replace(partial, write_dir / name)
            artifacts.write_json_atomic(write_dir / BACKUP_METADATA_FILE,
                                        {"epoch": self._current_epoch, "batch": 0, "weights": name})
            for old in write_dir.glob("epoch-*.weights.h5"):
                if old.name != name:
                    old.unlink(missing_ok=True)

    return AtomicBackupAndRestore(str(read_dir), delete_checkpoint=False)


def resumed_epoch(backup_dir: Path) -> int:
    """Completed epochs recorded by BackupAndRestore (0 for a fresh run)."""
    meta = backup_dir / STATE_DIR / BACKUP_METADATA_FILE
    return int(json.loads(meta.read_text())["epoch"]) if meta.is_file() else 0


# ---------------------------------------------------------------- batch norm and scoring


def nested_layers(model: Any) -> list[Any]:
    """Every layer of `model`, those of its sub-models too (a backbone's batch norm lives in one)."""
    found = []
    for layer in model.layers:
        found += [layer, *(nested_layers(layer) if hasattr(layer, "layers") else [])]
    return found


def recalibrate_batch_norm(model: Any, dataset: Any, max_batches: int) -> int:
    """Set every BN layer's moving mean and variance to the exact average of its batch statistics
    over up to `max_batches` batches of `dataset` (precise BN); returns the batches used.

    The moving averages lag behind the weights and start at mean 0 / variance 1, so after a short
    run inference mode normalises differently from the training mode the weights were optimised
    in. Here the batches run forward in training mode with momentum 0 (each call leaves exactly that
    batch's statistics in the moving variables) and dropout off as at inference; no gradient step.
    The average is weighted by batch size. 0 when the model has no BN layer or max_batches is 0.
    """
    import keras
    import numpy as np

    norms = [layer for layer in nested_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms or max_batches <= 0:
        return 0
    dropouts = [layer for layer in nested_layers(model) if isinstance(layer, keras.layers.Dropout)]
    momenta, rates = [layer.momentum for layer in norms], [layer.rate for layer in dropouts]
    sums = [[np.zeros(layer.moving_mean.shape), np.zeros(layer.moving_variance.shape)] for layer in norms]
    batches, images_seen = 0, 0
    try:
        for layer in norms:
            layer.momentum = 0.0
        for layer in dropouts:
            layer.rate = 0.0
        for images, _ in dataset.take(max_batches):
            model(images, training=True)  # eager: reads the momentum and rate set above
            size = int(images.shape[0])
            for (mean, variance), layer in zip(sums, norms):
                mean += size * layer.moving_mean.numpy()
                variance += size * layer.moving_variance.numpy()
            batches, images_seen = batches + 1, images_seen + size
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    for (mean, variance), layer in zip(sums, norms):
        layer.moving_mean.assign(mean / max(images_seen, 1))
        layer.moving_variance.assign(variance / max(images_seen, 1))
    return batches


def score(model: Any, dataset: Any, num_classes: int, *, training: bool = False, loss: Any = None) -> dict[str, Any]:
    """Eval metrics of `model` over `dataset` from counts summed over every batch.

    Returns {"pixel_accuracy", "iou", "dice"} (core/model.py's definitions, as `val_*` in the
    history), "iou_per_class" (None for a class in neither truth nor prediction) and "loss" (the
    batch-size weighted mean, when `loss` is given). training=True runs BN in training mode (each
    batch normalised with its own statistics) and restores the weights afterwards, which measures
    how far inference mode is from what training saw.
    """
    import numpy as np

    from segpipe.components.core.model import (
        SegmentationMetric,
        dice_from_counts,
        iou_from_counts,
        pixel_accuracy_from_counts,
    )

    metric = SegmentationMetric("iou", num_classes)
    snapshot = model.get_weights() if training else None
    loss_sum, seen = 0.0, 0
    try:
        for images, masks in dataset:
            probs = model(images, training=training)
            metric.update_state(masks, probs)
            if loss is not None:
                loss_sum += float(loss(masks, probs)) * int(images.shape[0])
            seen += int(images.shape[0])
    finally:
        if snapshot is not None:
            model.set_weights(snapshot)
    counts = {key: variable.value for key, variable in metric.counts.items()}
    intersection = np.asarray(counts["intersection"], np.float64)
    union = np.asarray(counts["predicted"], np.float64) + np.asarray(counts["target"], np.float64) - intersection
    result = {
        "pixel_accuracy": float(pixel_accuracy_from_counts(counts)),
        "iou": float(iou_from_counts(counts)),
        "dice": float(dice_from_counts(counts)),
        "iou_per_class": [float(i / u) if u > 0 else None for i, u in zip(intersection, union)],
    }
    if loss is not None:
        result["loss"] = loss_sum / max(seen, 1)
    return result


# ---------------------------------------------------------------- outputs


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss and IoU per epoch, train vs eval (matplotlib Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(row["epoch"]) + 1 for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "iou")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [row.get(prefix + metric, float("nan")) for row in history]
            ax.plot(epochs, values, style, marker="o", label=f"{'eval' if prefix else 'train'} {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def split_count(uri: str, split: str) -> int | None:
    """Record count from the producer's metadata (Transform writes it), without reading the data."""
    if not artifacts.is_published(uri):
        return None
    count = artifacts.read_info(uri).counts.get(split)
    return int(count) if count is not None else None


def float32_copy(model: Any, image_size: int, num_classes: int, model_config: Mapping[str, Any]) -> Any:
    """The trained weights in a float32, strategy-free model: what serving and warm starts load."""
    import keras

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        copy = create_model(image_size, num_classes, model_config)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    copy.set_weights(model.get_weights())
    return copy


# ---------------------------------------------------------------- the component


def train_model(
    transformed_examples_uri: str,
    transform_graph_uri: str,
    model_uri: str,
    model_run_uri: str,
    *,
    base_model_uri: str | None,
    backup_dir: str,
    num_classes: int,
    image_size: int,
    model_config: dict,
    train_config: dict,
) -> dict:
    """Train the U-Net on `train`, select on `eval`, publish Model and ModelRun.

    Returns {"chief": True, "epochs", "initial_epoch", "best_epoch", "metrics" (the exported model on
    eval, in inference mode), "best_epoch_metrics" (the history's eval row that chose the checkpoint),
    "iou_per_class", "plan" (epochs and steps), "monitor", "bn_momentum", "encoder", "bn_recalibration_batches",
    "class_weights", "warm_start", "strategy", "replicas", "precision", "parameters", "counts"}.
    A non-chief worker of a multi-worker run (TF_CONFIG) trains its share, publishes nothing and
    returns {"chief": False, "epochs", "initial_epoch", "plan", "strategy", "replicas", "precision"}.
    """
    import keras

    from segpipe.components.core.encoders import UNET, crop_size_problem, input_size_problem, load_encoder_weights

    depth, encoder = int(model_config["depth"]), str(model_config.get("encoder", UNET))  # see create_model
    if encoder == UNET and image_size % 2**depth:
        raise BadInputError(f"image_size {image_size} is not divisible by 2**model.depth = {2**depth}")
    if input_size_problem(encoder, image_size):
        raise BadInputError(input_size_problem(encoder, image_size))
    crop = int(train_config.get("crop_size", 0))
    if crop_size_problem(crop, image_size, depth=depth, encoder=encoder):
        raise BadInputError(crop_size_problem(crop, image_size, depth=depth, encoder=encoder))
    # Before any TensorFlow op: MultiWorkerMirrored configures the collectives of the process.
    strategy = select_strategy(str(train_config["distribution"]))
    files = {split: check_split(transformed_examples_uri, split, image_size) for split in (artifacts.TRAIN, artifacts.EVAL)}
    keras.utils.set_random_seed(int(train_config["seed"]))
    backup = Path(backup_dir)
    initial_epoch = resumed_epoch(backup)
    if initial_epoch:
        log.info("resuming from %s after %d completed epoch(s)", backup, initial_epoch)
    monitor = str(train_config["monitor"])

    precision = select_precision(str(train_config["mixed_precision"]))
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        # Only the chief writes the backup and publishes. Another worker of a multi-worker run
        # saves its callbacks' files into a scratch folder of its own, removed when it ends.
        chief = bool(strategy.extended.should_checkpoint)
        write_dir = backup if chief else Path(tempfile.mkdtemp(prefix="segpipe-worker-"))
        (write_dir / RUN_DIR).mkdir(parents=True, exist_ok=True)
        plan, class_weights = plan_run(files[artifacts.TRAIN], transformed_examples_uri, image_size=image_size,
                                       num_classes=num_classes, train_config=train_config,
                                       replicas=int(strategy.num_replicas_in_sync))
        momentum = model_config["bn_momentum"]
        if momentum == "auto":
            momentum = fitted_bn_momentum(plan["steps_per_epoch"], plan["steps"])
        run_model_config = {**model_config, "bn_momentum": float(momentum),
                            **encoder_input_range(encoder, transform_graph_uri)}
        with strategy.scope():
            model = create_model(model_input_size(image_size, crop), num_classes, run_model_config)
            if encoder != UNET and model_config["encoder_weights"]:  # the warm start below replaces them if it applies
                load_encoder_weights(model, str(model_config["encoder_weights"]))
            warm = warm_start(model, base_model_uri if train_config["warm_start"] else None)
            compile_model(model, num_classes, train_config, total_steps=plan["steps"], class_weights=class_weights)
        try:
            history = fit_model(model, files, backup, image_size=image_size, train_config=train_config,
                                strategy=strategy, epochs=plan["epochs"], patience=plan["early_stopping_patience"],
                                num_records=plan["records"], write_dir=write_dir,
                                freeze_epochs=int(model_config["encoder_freeze_epochs"]) if encoder != UNET else 0)
        finally:
            if not chief:
                shutil.rmtree(write_dir, ignore_errors=True)
        if not chief:
            log.info("worker %s: trained through epoch %d; the chief exports and publishes",
                     strategy.cluster_resolver.task_id, int(history[-1]["epoch"]) + 1)
            return {"chief": False, "epochs": int(history[-1]["epoch"]) + 1, "initial_epoch": initial_epoch,
                    "plan": plan, "strategy": type(strategy).__name__,
                    "replicas": int(strategy.num_replicas_in_sync), "precision": precision}
        best_weights = backup / RUN_DIR / BEST_WEIGHTS_FILE
        if best_weights.is_file():
            model.load_weights(str(best_weights))
        serving = float32_copy(model, image_size, num_classes, run_model_config)
        recalibrated, final = finish_model(serving, files, image_size=image_size, num_classes=num_classes,
                                           train_config=train_config, loss=model.loss)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    mode = MONITOR_MODES[monitor]
    best = history[best_index([row.get(monitor, -math.inf if mode == "max" else math.inf) for row in history], mode)]
    summary = {
        "chief": True,
        "epochs": len(history),
        "initial_epoch": initial_epoch,
        "best_epoch": int(best["epoch"]) + 1,
        "metrics": {f"val_{key}": final[key] for key in ("loss", "pixel_accuracy", "iou", "dice")},
        "best_epoch_metrics": {k: v for k, v in best.items() if k.startswith("val_")},
        "iou_per_class": final["iou_per_class"],
        "plan": plan,
        "monitor": monitor,
        "bn_momentum": float(momentum) if model_config["batch_norm"] or encoder != UNET else None,
        "encoder": encoder,
        "bn_recalibration_batches": recalibrated,
        "class_weights": class_weights,
        "warm_start": warm,
        "strategy": type(strategy).__name__,
        "replicas": int(strategy.num_replicas_in_sync),
        "precision": precision,
        "parameters": int(serving.count_params()),
        "counts": {split: split_count(transformed_examples_uri, split) for split in files},
    }
    parameters = {"model_config": dict(model_config), "train_config": dict(train_config),
                  "num_classes": num_classes, "image_size": image_size}
    publish_outputs(serving, history, summary, transformed_examples_uri, transform_graph_uri, model_uri, model_run_uri,
                    backup=backup, base_model_uri=base_model_uri, image_size=image_size, num_classes=num_classes,
                    parameters=parameters)
    shutil.rmtree(backup, ignore_errors=True)
    log.info("trained %d epoch(s); best epoch %d by %s; exported model on eval: %s", summary["epochs"],
             summary["best_epoch"], monitor, summary["metrics"])
    return summary


def plan_run(
    train_files: list[str], transformed_examples_uri: str, *, image_size: int, num_classes: int,
    train_config: Mapping[str, Any], replicas: int,
) -> tuple[dict[str, int], list[float] | None]:
    """The training plan (plan_training) and the class weights (None unless `class_weights: auto`).

    The train split's masks are read once when the weights need its class frequencies or when the
    producer recorded no record count.
    """
    records = split_count(transformed_examples_uri, artifacts.TRAIN)
    class_weights = None
    if train_config["class_weights"] == "auto" or records is None:
        records, pixels = scan_masks(train_files, image_size, num_classes)
        if train_config["class_weights"] == "auto":
            class_weights = class_weights_from_counts(pixels)
            log.info("class weights %s from train pixel counts %s", class_weights, pixels)
    plan = plan_training(records, batch_size=int(train_config["batch_size"]) * replicas,
                         epochs=int(train_config["epochs"]), min_steps=int(train_config["min_steps"]),
                         patience=int(train_config["early_stopping_patience"]))
    if plan["epochs"] > plan["configured_epochs"]:
        log.info("train.min_steps %d: %d epochs of %d steps instead of %d (early-stopping patience %d)",
                 int(train_config["min_steps"]), plan["epochs"], plan["steps_per_epoch"], plan["configured_epochs"],
                 plan["early_stopping_patience"])
    return plan, class_weights


def finish_model(
    serving: Any, files: Mapping[str, list[str]], *, image_size: int, num_classes: int,
    train_config: Mapping[str, Any], loss: Any,
) -> tuple[int, dict[str, Any]]:
    """BN recalibration on train batches as training drew them, then the eval score of the result.

    The batches are shuffled and augmented like the training input: the weights were optimised
    normalising that distribution (measured: statistics of unaugmented batches score slightly worse).
    Returns (batches used for recalibration, score() of the exported model on eval in inference mode).
    """
    batch_size = int(train_config["batch_size"])  # per replica: the batch size BN normalised over
    train = make_dataset(files[artifacts.TRAIN], image_size=image_size, batch_size=batch_size, training=True,
                         shuffle_buffer=int(train_config["shuffle_buffer"]), augment=augment_options(train_config),
                         seed=int(train_config["seed"]))
    recalibrated = recalibrate_batch_norm(serving, train, int(train_config["bn_recalibration_batches"]))
    if recalibrated:
        log.info("batch-norm statistics recomputed over %d train batch(es)", recalibrated)
    evaluation = make_dataset(files[artifacts.EVAL], image_size=image_size, batch_size=batch_size, training=False)
    return recalibrated, score(serving, evaluation, num_classes, loss=loss)


def augment_options(train_config: Mapping[str, Any]) -> dict[str, Any]:
    """make_dataset's `augment` from the `train.augment_*` fields and `train.crop_size`."""
    return {
        "flip": bool(train_config["augment_flip"]),
        "rot90": bool(train_config["augment_rot90"]),
        "zoom": float(train_config["augment_zoom"]),
        "crop": int(train_config.get("crop_size", 0)),
    }


def fit_inputs(
    files: Mapping[str, list[str]], *, image_size: int, batch_size: int, train_config: Mapping[str, Any],
    num_records: int,
) -> tuple[Any, Any, int]:
    """(train, evaluation, steps_per_epoch) for model.fit over global batches of `batch_size`.

    The train split is repeated and fit reads ceil(num_records / batch_size) batches of it per epoch
    (the declared epoch length), so Keras keeps one iterator, and tf.data's autotuning, for the whole
    fit. Without `steps_per_epoch` it made a new one every epoch, and freeing the old one left both
    cores idle for about 4 s in 4 of 9 epochs of the demo (bench_trainer's epoch stalls). Each
    epoch is still one whole pass over the split, reshuffled, its last batch short as before.
    """
    common = {"image_size": image_size, "batch_size": batch_size, "cache": bool(train_config["cache"])}
    train = make_dataset(files[artifacts.TRAIN], training=True, shuffle_buffer=int(train_config["shuffle_buffer"]),
                         augment=augment_options(train_config), seed=int(train_config["seed"]),
                         num_records=num_records, **common)
    evaluation = make_dataset(files[artifacts.EVAL], training=False, **common)
    return train.repeat(), evaluation, int(train.cardinality())  # the length make_dataset declared


def fit_model(
    model: Any, files: Mapping[str, list[str]], backup: Path, *, image_size: int, train_config: Mapping[str, Any],
    strategy: Any, epochs: int, patience: int, num_records: int, write_dir: Path, freeze_epochs: int,
) -> list[dict[str, float]]:
    """model.fit with the resumable callbacks; returns the per-epoch history written under `write_dir`
    (the full history, resumed runs too, when `write_dir` is the backup: the chief's).

    `num_records` is the train split's length, so each epoch is exactly the planned steps. The
    batches are global (`train.batch_size` per replica x replicas); under MultiWorkerMirrored every
    worker builds the same input and keeps its replicas' share of each batch (sharding by DATA).
    Sharding by FILE would give workers unequal shares of unequal shards, so their step counts
    would differ from the planned, declared epoch length (and a single shard cannot be split at all).
    `freeze_epochs` > 0 trains the first epochs with the backbone frozen (encoder_freeze_callback).
    The eval split is scored every `train.validation_freq` epochs and after the last; `patience`
    (in epochs) then counts ceil(patience / validation_freq) validations.
    """
    import tensorflow as tf

    freq = int(train_config["validation_freq"])
    batch_size = int(train_config["batch_size"]) * int(strategy.num_replicas_in_sync)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train, evaluation, steps_per_epoch = fit_inputs(files, image_size=image_size, batch_size=batch_size,
                                                    train_config=train_config, num_records=num_records)
    train, evaluation = train.with_options(options), evaluation.with_options(options)
    previous = [row for row in read_history(backup / RUN_DIR / HISTORY_FILE) if int(row["epoch"]) < resumed_epoch(backup)]
    history_path = write_dir / RUN_DIR / HISTORY_FILE
    callbacks = make_callbacks(backup, monitor=str(train_config["monitor"]), patience=math.ceil(patience / freq),
                               previous=previous, write_dir=write_dir)
    if freeze_epochs > 0:  # before BackupAndRestore (last), which restores the optimizer it builds
        callbacks.insert(len(callbacks) - 1, encoder_freeze_callback(freeze_epochs))
    with warnings.catch_warnings():
        # The streamed eval TFRecords have no declared length, so each evaluation ends by running
        # out of data; Keras warns about that every epoch although it is the intended end.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        # verbose=0: the epoch_progress callback reports instead. shuffle=False: make_dataset already
        # shuffles; Keras cannot shuffle a tf.data input and warns when asked to (its default).
        try:
            model.fit(train, validation_data=evaluation, validation_freq=validation_epochs(epochs, freq),
                      epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=0, shuffle=False)
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as exc:
            if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
                raise
            raise lost_peer_error(exc, backup) from None
    history = read_history(history_path)
    if not history:
        raise TrainingError(f"{history_path}: training produced no completed epoch")
    return history


def lost_peer_error(exc: Exception, backup: Path) -> TrainingError:
    """The failure of a multi-worker fit whose collectives lost a peer: TensorFlow's health check
    aborts them (UNAVAILABLE) once a worker stops answering, on every survivor."""
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    peers = ", ".join(f"{kind} {address}" for kind, addresses in cluster.items() for address in addresses)
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return TrainingError(
        f"train.distribution multi_worker: a worker of the cluster ({peers or 'TF_CONFIG'}) stopped answering "
        f"during training ({reason}). The backup in {backup} holds {resumed_epoch(backup)} completed epoch(s): "
        "restart every worker with the same TF_CONFIG and they resume from it")


def publish_outputs(
    serving: Any,
    history: list[dict[str, float]],
    summary: dict[str, Any],
    transformed_examples_uri: str,
    transform_graph_uri: str,
    model_uri: str,
    model_run_uri: str,
    *,
    backup: Path,
    base_model_uri: str | None,
    image_size: int,
    num_classes: int,
    parameters: dict[str, Any],
) -> None:
    """Model (SavedModel + model.keras) and ModelRun (logs, history, curves), both or neither."""
    from segpipe.components.core.serving import export_serving_model

    common = {"producer": "Trainer", "parameters": parameters,
              "inputs": (transformed_examples_uri, transform_graph_uri, base_model_uri)}
    with artifacts.publish(model_uri, artifacts.MODEL, **common) as (model_dir, model_info), \
            artifacts.publish(model_run_uri, artifacts.MODEL_RUN, **common) as (run_dir, run_info):
        export_serving_model(serving, transform_graph_uri, model_dir / artifacts.SAVED_MODEL_DIR,
                             image_size=image_size, num_classes=num_classes)
        serving.save(str(model_dir / artifacts.KERAS_MODEL_FILE))
        run = backup / RUN_DIR
        shutil.copy2(run / HISTORY_FILE, run_dir / HISTORY_FILE)
        if (run / LOGS_DIR).is_dir():
            shutil.copytree(run / LOGS_DIR, run_dir / LOGS_DIR)
        plot_curves(history, run_dir / CURVES_FILE)
        for info in (model_info, run_info):
            info["counts"] = {k: v for k, v in summary["counts"].items() if v is not None}
            info["extra"].update({k: v for k, v in summary.items() if k != "counts"})
            info["extra"]["image_size"] = image_size
            info["extra"]["num_classes"] = num_classes
