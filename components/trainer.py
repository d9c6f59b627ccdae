"""Trainer: streams transformed TFRecords into the U-Net, survives preemption, exports for serving.

- Input: `tf.data` over the transformed examples (`image` float32 S*S*3, `mask` int64 S*S, GZIP):
  parallel interleave over shards, shuffle, batch, vectorised parse, augmentation, prefetch. It
  streams; `cache` (off by default) keeps parsed batches in memory for small datasets.
- Devices: MirroredStrategy over every visible GPU when there are two or more, the default strategy
  otherwise; `distribution: multi_worker` picks MultiWorkerMirroredStrategy, which reads the cluster
  from the TF_CONFIG that the launcher (e.g. a Kubeflow training operator) sets. mixed_float16 on
  GPU (`mixed_precision: auto`), float32 head; optional XLA (`jit_compile`).
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
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError, TrainingError

log = logging.getLogger(__name__)

STATE_DIR = "state"  # BackupAndRestore's folder inside backup_dir
RUN_DIR = "run"  # history, logs and best checkpoint inside backup_dir
HISTORY_FILE = "history.csv"
CURVES_FILE = "training_curves.png"
LOGS_DIR = "logs"
BEST_WEIGHTS_FILE = "best.weights.h5"
MONITOR = "val_loss"


# ---------------------------------------------------------------- input pipeline


def feature_spec(image_size: int) -> dict[str, Any]:
    """The transformed example as Transform writes it (docs/components.md, Transform), flat."""
    import tensorflow as tf

    return {
        artifacts.IMAGE_KEY: tf.io.FixedLenFeature([image_size * image_size * 3], tf.float32),
        artifacts.MASK_KEY: tf.io.FixedLenFeature([image_size * image_size], tf.int64),
    }


def parse_batch(serialized: Any, image_size: int) -> tuple[Any, Any]:
    """A batch of serialized examples -> (images float32 [B, S, S, 3], masks int32 [B, S, S])."""
    import tensorflow as tf

    features = tf.io.parse_example(serialized, feature_spec(image_size))
    images = tf.reshape(features[artifacts.IMAGE_KEY], [-1, image_size, image_size, 3])
    masks = tf.reshape(tf.cast(features[artifacts.MASK_KEY], tf.int32), [-1, image_size, image_size])
    return images, masks


def augment_batch(images: Any, masks: Any, *, flip: bool, rot90: bool, zoom: float) -> tuple[Any, Any]:
    """Random per-example flips and 90-degree rotations, a per-batch zoom-in crop; identical on image and mask.

    Vectorised over the batch; masks are resampled nearest-neighbour so class ids (and 255) survive.
    """
    import tensorflow as tf

    size = tf.shape(images)[0]
    masks = tf.cast(masks[..., None], tf.float32)

    def choose(flag: Any, a: Any, b: Any) -> Any:
        return tf.where(flag[:, None, None, None], a, b)

    if flip:
        for axis in (2, 1):  # left-right, up-down
            flag = tf.random.uniform([size]) < 0.5
            images, masks = choose(flag, tf.reverse(images, [axis]), images), choose(flag, tf.reverse(masks, [axis]), masks)
    if rot90:
        turns = tf.random.uniform([size], 0, 4, dtype=tf.int32)
        rotated_images, rotated_masks = images, masks
        for k in (1, 2, 3):
            rotated_images = choose(turns == k, tf.image.rot90(images, k), rotated_images)
            rotated_masks = choose(turns == k, tf.image.rot90(masks, k), rotated_masks)
        images, masks = rotated_images, rotated_masks
    if zoom > 0:
        # One zoom per batch (a random crop resized back). Per-example tf.image.crop_and_resize
        # would make grappler log a cost-model warning every epoch on CPU.
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        out_size = images.shape[1:3].as_list() if images.shape[1:3].is_fully_defined() else [height, width]
        side = 1.0 - tf.random.uniform([], 0.0, zoom)
        crop_h = tf.maximum(1, tf.cast(tf.round(side * tf.cast(height, tf.float32)), tf.int32))
        crop_w = tf.maximum(1, tf.cast(tf.round(side * tf.cast(width, tf.float32)), tf.int32))
        top = tf.random.uniform([], 0, height - crop_h + 1, dtype=tf.int32)
        left = tf.random.uniform([], 0, width - crop_w + 1, dtype=tf.int32)
        images = tf.image.resize(images[:, top : top + crop_h, left : left + crop_w], out_size, method="bilinear")
        masks = tf.image.resize(masks[:, top : top + crop_h, left : left + crop_w], out_size, method="nearest")
    return images, tf.cast(tf.round(masks[..., 0]), tf.int32)


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
) -> Any:
    """Streaming (images, masks) batches from GZIP TFRecord shards.

    Training: shards and records shuffled (reshuffled each epoch; `shuffle_buffer` 0 shuffles shards
    only), then augmented with `augment` ({"flip", "rot90", "zoom"}). Eval: file order, no augmentation. Parsing is vectorised per batch (one parse_example call per batch).
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
    dataset = dataset.map(lambda records: parse_batch(records, image_size), num_parallel_calls=autotune)
    if cache:
        dataset = dataset.cache()
    if training and augment and (augment["flip"] or augment["rot90"] or augment["zoom"] > 0):
        options = {"flip": bool(augment["flip"]), "rot90": bool(augment["rot90"]), "zoom": float(augment["zoom"])}
        dataset = dataset.map(lambda x, y: augment_batch(x, y, **options), num_parallel_calls=autotune)
    return dataset.prefetch(autotune)


# ---------------------------------------------------------------- input checks


def first_example(path: str) -> Any | None:
    """The first tf.train.Example of a GZIP shard, or None when the shard is empty."""
    import tensorflow as tf
    from tensorflow.core.example import example_pb2

    for record in tf.data.TFRecordDataset(path, compression_type="GZIP").take(1):
        return example_pb2.Example.FromString(record.numpy())
    return None


def check_split(transformed_examples_uri: str, split: str, image_size: int) -> list[str]:
    """Shard list of a split whose first record matches `image_size`; BadInputError otherwise."""
    files = artifacts.split_files(transformed_examples_uri, split)
    folder = artifacts.split_dir(transformed_examples_uri, split)
    if not files:
        raise BadInputError(f"{folder}: no {artifacts.SHARD_PATTERN} shards; the {split} split is empty")
    for path in files:
        example = first_example(path)
        if example is None:
            continue
        features = example.features.feature
        for key, kind, expected in (
            (artifacts.IMAGE_KEY, "float_list", image_size * image_size * 3),
            (artifacts.MASK_KEY, "int64_list", image_size * image_size),
        ):
            found = len(getattr(features[key], kind).value) if key in features else None
            if found != expected:
                raise BadInputError(
                    f"{path} record 0: feature '{key}' has {found} values, the model input of image_size "
                    f"{image_size} needs {expected} ({kind}); rerun Transform with transform.image_size={image_size}"
                )
        return files
    raise BadInputError(f"{folder}: every shard is empty; the {split} split has no records")


# ---------------------------------------------------------------- devices


def select_strategy(distribution: str) -> Any:
    """MultiWorkerMirrored on request; Mirrored over >= 2 GPUs; the default strategy otherwise."""
    import tensorflow as tf

    if distribution == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
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


def create_model(image_size: int, num_classes: int, model_config: Mapping[str, Any]) -> Any:
    from segpipe.components.core.model import build_unet

    return build_unet(
        input_shape=(image_size, image_size, 3),
        num_classes=artifacts.output_channels(num_classes),
        base_filters=int(model_config["base_filters"]),
        depth=int(model_config["depth"]),
        batch_norm=bool(model_config["batch_norm"]),
        dropout=float(model_config["dropout"]),
    )


def compile_model(model: Any, num_classes: int, train_config: Mapping[str, Any]) -> None:
    """Adam + the configured loss + pixel accuracy / IoU / Dice (all ignore label 255)."""
    import keras

    from segpipe.components.core.model import get_loss, segmentation_metrics

    model.compile(
        optimizer=keras.optimizers.Adam(float(train_config["learning_rate"])),
        loss=get_loss(train_config["loss"]),
        metrics=segmentation_metrics(num_classes),
        jit_compile=bool(train_config["jit_compile"]),
    )


def find_keras_model(base_model_uri: str) -> Path:
    """model.keras inside a Model artifact or a serving version folder."""
    path = Path(base_model_uri) / artifacts.KERAS_MODEL_FILE
    if not path.is_file():
        raise BadInputError(f"{path}: base model for warm start not found (expected a Model artifact or serving version)")
    return path


def warm_start(model: Any, base_model_uri: str | None) -> dict[str, Any]:
    """Copy a base model's weights into `model` when compatible.

    Different input/output shapes: BadInputError (the base model belongs to other data). Same I/O
    but another architecture (depth, filters, batch norm): logged, fresh start.
    """
    import keras

    if not base_model_uri:
        return {"used": False, "reason": "no base model"}
    path = find_keras_model(base_model_uri)
    try:
        base = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # a corrupt or foreign file: the message names it
        raise BadInputError(f"{path}: cannot load base model ({exc})") from None
    if tuple(base.input_shape) != tuple(model.input_shape) or tuple(base.output_shape) != tuple(model.output_shape):
        raise BadInputError(
            f"{path}: base model maps {base.input_shape} -> {base.output_shape}, this training needs "
            f"{model.input_shape} -> {model.output_shape}; disable train.warm_start or pass a matching base model"
        )
    base_shapes = [tuple(w.shape) for w in base.weights]
    shapes = [tuple(w.shape) for w in model.weights]
    if base_shapes != shapes:
        reason = f"architecture differs from {path} ({len(base_shapes)} vs {len(shapes)} weight tensors); fresh start"
        log.warning("warm start skipped: %s", reason)
        return {"used": False, "reason": reason}
    model.set_weights(base.get_weights())
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
            rows[int(row["epoch"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return [rows[epoch] for epoch in sorted(rows)]


def make_callbacks(backup_dir: Path, *, patience: int, best_so_far: float | None) -> list[Any]:
    """NaN guard, epoch lines, best-val_loss checkpoint, TensorBoard, CSV log, early stop, backup/restore.

    BackupAndRestore comes last so that an epoch counts as done only after its logs are written.
    """
    import keras

    from segpipe.components.core.progress import epoch_progress

    run = backup_dir / RUN_DIR
    callbacks = [
        raise_on_nan_callback(),
        epoch_progress(),
        keras.callbacks.ModelCheckpoint(
            str(run / BEST_WEIGHTS_FILE),
            monitor=MONITOR,
            mode="min",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.TensorBoard(log_dir=str(run / LOGS_DIR), update_freq="epoch", profile_batch=0),
        keras.callbacks.CSVLogger(str(run / HISTORY_FILE), append=True),
    ]
    if patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=MONITOR, mode="min", patience=patience))
    callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir / STATE_DIR), delete_checkpoint=False))
    return callbacks


def resumed_epoch(backup_dir: Path) -> int:
    """Completed epochs recorded by BackupAndRestore (0 for a fresh run)."""
    meta = backup_dir / STATE_DIR / "training_metadata.json"
    return int(json.loads(meta.read_text())["epoch"]) if meta.is_file() else 0


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

    Returns {"epochs", "initial_epoch", "best_epoch", "metrics" (eval at the best epoch),
    "warm_start", "strategy", "replicas", "precision", "parameters", "counts"}.
    """
    import keras

    depth = int(model_config["depth"])
    if image_size % 2**depth:
        raise BadInputError(f"image_size {image_size} is not divisible by 2**model.depth = {2**depth}")
    files = {split: check_split(transformed_examples_uri, split, image_size) for split in (artifacts.TRAIN, artifacts.EVAL)}
    keras.utils.set_random_seed(int(train_config["seed"]))
    backup = Path(backup_dir)
    (backup / RUN_DIR).mkdir(parents=True, exist_ok=True)
    initial_epoch = resumed_epoch(backup)
    if initial_epoch:
        log.info("resuming from %s after %d completed epoch(s)", backup, initial_epoch)

    precision = select_precision(str(train_config["mixed_precision"]))
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        strategy = select_strategy(str(train_config["distribution"]))
        with strategy.scope():
            model = create_model(image_size, num_classes, model_config)
            warm = warm_start(model, base_model_uri if train_config["warm_start"] else None)
            compile_model(model, num_classes, train_config)
        history = fit_model(model, files, backup, image_size=image_size, train_config=train_config, strategy=strategy)
        best_weights = backup / RUN_DIR / BEST_WEIGHTS_FILE
        if best_weights.is_file():
            model.load_weights(str(best_weights))
        serving = float32_copy(model, image_size, num_classes, model_config)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    best = min(history, key=lambda row: row.get(MONITOR, math.inf))
    summary = {
        "epochs": len(history),
        "initial_epoch": initial_epoch,
        "best_epoch": int(best["epoch"]) + 1,
        "metrics": {k: v for k, v in best.items() if k.startswith("val_")},
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
    log.info("trained %d epoch(s); best epoch %d: %s", summary["epochs"], summary["best_epoch"], summary["metrics"])
    return summary


def fit_model(
    model: Any, files: Mapping[str, list[str]], backup: Path, *, image_size: int, train_config: Mapping[str, Any], strategy: Any
) -> list[dict[str, float]]:
    """model.fit with the resumable callbacks; returns the full per-epoch history (resumed runs too)."""
    seed = int(train_config["seed"])
    batch_size = int(train_config["batch_size"]) * int(strategy.num_replicas_in_sync)
    augment = {
        "flip": bool(train_config["augment_flip"]),
        "rot90": bool(train_config["augment_rot90"]),
        "zoom": float(train_config["augment_zoom"]),
    }
    common = {"image_size": image_size, "batch_size": batch_size, "cache": bool(train_config["cache"])}
    train = make_dataset(files[artifacts.TRAIN], training=True, shuffle_buffer=int(train_config["shuffle_buffer"]),
                         augment=augment, seed=seed, **common)
    evaluation = make_dataset(files[artifacts.EVAL], training=False, **common)
    history_path = backup / RUN_DIR / HISTORY_FILE
    previous = [row for row in read_history(history_path) if int(row["epoch"]) < resumed_epoch(backup)]
    best_so_far = min((row[MONITOR] for row in previous if MONITOR in row), default=None)
    callbacks = make_callbacks(backup, patience=int(train_config["early_stopping_patience"]), best_so_far=best_so_far)
    with warnings.catch_warnings():
        # The streamed TFRecords have no known length, so each epoch ends by running out of data;
        # Keras warns about that every epoch although it is the intended end of an epoch.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        # verbose=0: the epoch_progress callback reports instead. shuffle=False: make_dataset already
        # shuffles; Keras cannot shuffle a tf.data input and warns when asked to (its default).
        model.fit(train, validation_data=evaluation, epochs=int(train_config["epochs"]), callbacks=callbacks,
                  verbose=0, shuffle=False)
    history = read_history(history_path)
    if not history:
        raise TrainingError(f"{history_path}: training produced no completed epoch")
    return history


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
