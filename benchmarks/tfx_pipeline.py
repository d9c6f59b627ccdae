"""The demo DAG built from stock TFX 1.16 components, for benchmarks/bench_tfx.py.

Run by the Python of a separate TFX virtualenv (bench_tfx.py's docstring says how it is installed),
never by segpipe's: this file imports TFX, TFT, TFMA and tf_keras (the Keras 2 that TFX's Trainer
and TFMA require) and nothing of segpipe. It is also the TFX `module_file` of the Transform
(`preprocessing_fn`) and the Trainer (`run_fn`).

    ImportExampleGen -> StatisticsGen -> SchemaGen -> ExampleValidator -> Transform -> Trainer
    -> Evaluator (TFMA, gate) -> Pusher (to a folder), LocalDagRunner, Beam --runner=FnApiRunner.

The recipe (image size, U-Net, batch, epochs, schedule, augmentation, gate) comes from a JSON file
the caller writes from segpipe's effective configuration, so both sides train the same thing. After
the run, the pushed model's serving signature scores the raw test split; the probabilities are
written with the per-component seconds (from LocalDagRunner's "Component X is running / is
finished" log lines) to `--out`, and bench_tfx.py scores them with segpipe's metric code.

    /work/tfxvenv/bin/python benchmarks/tfx_pipeline.py --data DIR --root ROOT --recipe R.json --out OUT.json
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras is tf_keras, as TFX 1.16 expects
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("tfx_pipeline")

IMAGE_KEY, MASK_KEY, ID_KEY = "image", "mask", "id"
SPLIT_BUCKETS = {"train": 8, "eval": 1, "test": 1}  # segpipe's 80/10/10 (TFX hashes the id with farmhash)
BN_WINDOW_STEPS = (4.0, 100.0)  # segpipe trainer's auto BN momentum (components/trainer.py), copied: no segpipe here
COMPONENT_LINE = re.compile(r"Component (\S+) is (running|finished)\.")


# ---------------------------------------------------------------- Transform (module_file)


def preprocessing_fn(inputs: dict[str, Any], custom_config: dict[str, Any]) -> dict[str, Any]:
    """Decode the PNG image, resize it bilinear (antialias) to S x S, round to pixel levels, / 255;
    decode the PNG mask and resize it nearest neighbour (segpipe's Transform, stored as TFT does:
    float32 image and int64 mask feature lists)."""
    import tensorflow as tf

    size = int(custom_config["image_size"])

    def image(data: Any) -> Any:
        decoded = tf.io.decode_png(data, channels=3)
        resized = tf.image.resize(decoded, [size, size], method="bilinear", antialias=True)
        return tf.round(resized) / 255.0

    def mask(data: Any) -> Any:
        def decode() -> Any:
            decoded = tf.io.decode_png(data, channels=1)
            return tf.cast(tf.reshape(tf.image.resize(decoded, [size, size], method="nearest"), [size, size]), tf.int64)

        # Serving feeds no mask (TFT supplies an empty string): an all-ignore mask instead of a decode error.
        return tf.cond(tf.strings.length(data) > 0, decode, lambda: tf.fill([size, size], tf.constant(255, tf.int64)))

    return {
        IMAGE_KEY: tf.map_fn(image, tf.reshape(inputs[IMAGE_KEY], [-1]),
                             fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32)),
        MASK_KEY: tf.map_fn(mask, tf.reshape(inputs[MASK_KEY], [-1]),
                            fn_output_signature=tf.TensorSpec([size, size], tf.int64)),
    }


# ---------------------------------------------------------------- Trainer (module_file)


def unet(size: int, base_filters: int, depth: int, batch_norm: bool, bn_momentum: float) -> Any:
    """segpipe's core/model.build_unet rebuilt layer for layer in tf_keras (one sigmoid channel)."""
    import tf_keras
    from tf_keras import layers

    def block(x: Any, filters: int, name: str) -> Any:
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm, name=f"{name}_conv{i}")(x)
            if batch_norm:
                x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn{i}")(x)
            x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
        return x

    inputs = tf_keras.Input((size, size, 3), name=IMAGE_KEY)
    x, skips = inputs, []
    for level in range(1, depth + 1):
        skip = block(x, base_filters * 2 ** (level - 1), f"enc{level}")
        skips.append(skip)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(skip)
    x = block(x, base_filters * 2**depth, "bottleneck")
    for level in range(depth, 0, -1):
        filters = base_filters * 2 ** (level - 1)
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"dec{level}_up")(x)
        x = block(layers.Concatenate(name=f"dec{level}_concat")([x, skips[level - 1]]), filters, f"dec{level}")
    head = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="head")(x)
    return tf_keras.Model(inputs, head, name="unet")


def augment(images: Any, masks: Any, *, flip: bool, rot90: bool, zoom: float) -> Any:
    """Per example: left-right and up-down flips (p = 0.5 each), 0-3 quarter turns; per batch: a
    zoom-in crop of up to `zoom` resized back (bilinear image, nearest mask). segpipe's augmentation."""
    import tensorflow as tf

    size = int(images.shape[1])
    both = tf.concat([images, tf.cast(masks[..., None], tf.float32)], axis=-1)

    def one(example: Any) -> Any:
        if flip:
            example = tf.image.random_flip_up_down(tf.image.random_flip_left_right(example))
        if rot90:
            example = tf.image.rot90(example, tf.random.uniform([], 0, 4, dtype=tf.int32))
        return example

    if flip or rot90:
        both = tf.map_fn(one, both)
    images, masks = both[..., :3], both[..., 3:]
    if zoom > 0:
        cut = tf.maximum(1, tf.cast(tf.round((1.0 - tf.random.uniform([], 0.0, zoom)) * size), tf.int32))
        top = tf.random.uniform([], 0, size - cut + 1, dtype=tf.int32)
        left = tf.random.uniform([], 0, size - cut + 1, dtype=tf.int32)
        images = tf.image.resize(images[:, top:top + cut, left:left + cut], [size, size], method="bilinear")
        masks = tf.image.resize(masks[:, top:top + cut, left:left + cut], [size, size], method="nearest")
    return images, masks


def count_records(patterns: list[str]) -> int:
    import tensorflow as tf

    files = [f for p in patterns for f in tf.io.gfile.glob(p)]
    return int(tf.data.TFRecordDataset(files, compression_type="GZIP").reduce(0, lambda n, _: n + 1))


def run_fn(fn_args: Any) -> None:
    """Train the recipe's U-Net on the transformed examples; export serving and transform signatures."""
    import tensorflow as tf
    import tensorflow_transform as tft
    import tf_keras
    from tfx_bsl.public import tfxio

    recipe = fn_args.custom_config
    size, batch, seed = int(recipe["image_size"]), int(recipe["batch_size"]), int(recipe["seed"])
    tf_keras.utils.set_random_seed(seed)
    transform_output = tft.TFTransformOutput(fn_args.transform_output)
    schema = transform_output.transformed_metadata.schema

    def dataset(files: list[str], training: bool) -> Any:
        options = tfxio.TensorFlowDatasetOptions(batch_size=batch, label_key=MASK_KEY, shuffle=training,
                                                 shuffle_buffer_size=int(recipe["shuffle_buffer"]),
                                                 shuffle_seed=seed, num_epochs=None if training else 1)
        data = fn_args.data_accessor.tf_dataset_factory(files, options, schema)
        data = data.map(lambda features, labels: (features[IMAGE_KEY], labels), num_parallel_calls=tf.data.AUTOTUNE)
        if training:
            moves = {"flip": recipe["augment_flip"], "rot90": recipe["augment_rot90"], "zoom": float(recipe["augment_zoom"])}
            return data.map(lambda x, y: augment(x, y, **moves), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
        return data.map(lambda x, y: (x, tf.cast(y[..., None], tf.float32))).prefetch(2)

    # segpipe's plan_training: epochs raised until epochs x steps per epoch >= min_steps, patience scaled.
    records = count_records(fn_args.train_files)
    steps_per_epoch = max(1, math.ceil(records / batch))
    epochs = max(int(recipe["epochs"]), math.ceil(int(recipe["min_steps"]) / steps_per_epoch))
    patience = math.ceil(int(recipe["early_stopping_patience"]) * epochs / int(recipe["epochs"]))
    total = epochs * steps_per_epoch
    window = min(max(min(steps_per_epoch / 3, total / 10), BN_WINDOW_STEPS[0]), BN_WINDOW_STEPS[1])
    # "auto": segpipe's fitted momentum; a number (the stock recipe's Keras default 0.99) as given.
    bn_momentum = round(1.0 - 1.0 / window, 4) if recipe.get("bn_momentum", "auto") == "auto" else float(recipe["bn_momentum"])
    model = unet(size, int(recipe["base_filters"]), int(recipe["depth"]), bool(recipe["batch_norm"]), bn_momentum)
    warmup = int(round(total * float(recipe["warmup_fraction"])))
    rate = float(recipe["learning_rate"])
    if recipe.get("lr_schedule", "cosine") == "constant":  # the stock recipe: Adam at a constant rate
        schedule = rate
    elif warmup:
        schedule = tf_keras.optimizers.schedules.CosineDecay(0.0, max(1, total - warmup), warmup_target=rate,
                                                             warmup_steps=warmup)
    else:
        schedule = tf_keras.optimizers.schedules.CosineDecay(rate, total)
    model.compile(optimizer=tf_keras.optimizers.Adam(schedule), loss=tf_keras.losses.BinaryCrossentropy(),
                  metrics=[tf_keras.metrics.BinaryAccuracy(name="pixel_accuracy"),
                           tf_keras.metrics.BinaryIoU(target_class_ids=[1], name="iou")])
    os.makedirs(fn_args.model_run_dir, exist_ok=True)
    best = os.path.join(fn_args.model_run_dir, "best.weights.h5")
    callbacks = [tf_keras.callbacks.ModelCheckpoint(best, monitor="val_iou", mode="max", save_best_only=True,
                                                    save_weights_only=True)]
    if patience > 0:  # 0 disables early stopping, as in segpipe
        callbacks.append(tf_keras.callbacks.EarlyStopping(monitor="val_iou", mode="max", patience=patience))
    history = model.fit(dataset(fn_args.train_files, True), steps_per_epoch=steps_per_epoch, epochs=epochs,
                        validation_data=dataset(fn_args.eval_files, False), callbacks=callbacks, verbose=2)
    model.load_weights(best)
    Path(fn_args.model_run_dir, "training.json").write_text(json.dumps({
        "train_records": records, "steps_per_epoch": steps_per_epoch, "epochs_planned": epochs,
        "epochs_run": len(history.history["loss"]), "steps": total, "patience": patience,
        "bn_momentum": bn_momentum, "parameters": int(model.count_params()),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()}}, indent=2))

    model.tft_layer = transform_output.transform_features_layer()
    raw_spec = transform_output.raw_feature_spec()
    serving_spec = {IMAGE_KEY: raw_spec[IMAGE_KEY]}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(serialized: Any) -> dict[str, Any]:
        features = model.tft_layer(tf.io.parse_example(serialized, serving_spec))
        return {"probabilities": model(features[IMAGE_KEY])}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def transform_features(serialized: Any) -> dict[str, Any]:
        return model.tft_layer(tf.io.parse_example(serialized, raw_spec))

    model.save(fn_args.serving_model_dir, save_format="tf",
               signatures={"serving_default": serve, "transform_features": transform_features})


# ---------------------------------------------------------------- the pipeline


def eval_config(recipe: dict[str, Any]) -> Any:
    """TFMA on the raw test split, every pixel one binary prediction: label = the transformed S x S
    mask (the model's `transform_features` signature), prediction = the S x S x 1 probabilities;
    TFMA's BinaryAccuracy (pixel accuracy) and ThreatScore (TP / (TP + FP + FN): the foreground
    IoU) at threshold 0.5, gated at segpipe's evaluation thresholds."""
    import tensorflow_model_analysis as tfma
    from google.protobuf import wrappers_pb2

    def gate(lower: float) -> Any:
        return tfma.MetricThreshold(value_threshold=tfma.GenericValueThreshold(lower_bound={"value": lower}))

    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name="serving_default", preprocessing_function_names=["transform_features"],
                                    label_key=MASK_KEY, prediction_key="probabilities")],
        slicing_specs=[tfma.SlicingSpec()],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="BinaryAccuracy", threshold=gate(float(recipe["pixel_accuracy_threshold"]))),
            tfma.MetricConfig(class_name="ThreatScore", threshold=gate(float(recipe["min_foreground_iou"]))),
        ])],
        options=tfma.Options(include_default_metrics=wrappers_pb2.BoolValue(value=False)),
    )


def create_pipeline(data_dir: str, root: str, recipe: dict[str, Any]) -> Any:
    from tfx import v1 as tfx

    splits = [tfx.proto.SplitConfig.Split(name=name, hash_buckets=n) for name, n in SPLIT_BUCKETS.items()]
    example_gen = tfx.components.ImportExampleGen(
        input_base=data_dir,
        input_config=tfx.proto.Input(splits=[tfx.proto.Input.Split(name="raw", pattern="span-{SPAN}/*.tfrecord*")]),
        output_config=tfx.proto.Output(split_config=tfx.proto.SplitConfig(splits=splits, partition_feature_name=ID_KEY)))
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs["statistics"], infer_feature_shape=True)
    example_validator = tfx.components.ExampleValidator(statistics=statistics_gen.outputs["statistics"],
                                                        schema=schema_gen.outputs["schema"])
    # segpipe's Transform computes no statistics of its output and transforms train and eval only.
    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"], schema=schema_gen.outputs["schema"], module_file=__file__,
        splits_config=tfx.proto.SplitsConfig(analyze=["train"], transform=["train", "eval"]),
        custom_config={"image_size": recipe["image_size"]}, disable_statistics=True)
    trainer = tfx.components.Trainer(
        module_file=__file__, examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"], schema=schema_gen.outputs["schema"],
        train_args=tfx.proto.TrainArgs(splits=["train"]), eval_args=tfx.proto.EvalArgs(splits=["eval"]),
        custom_config=recipe)
    evaluator = tfx.components.Evaluator(examples=example_gen.outputs["examples"], model=trainer.outputs["model"],
                                         eval_config=eval_config(recipe), example_splits=["test"])
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"], model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=os.path.join(root, "serving"))))
    return tfx.dsl.Pipeline(
        pipeline_name="segpipe_tfx", pipeline_root=os.path.join(root, "pipeline"),
        components=[example_gen, statistics_gen, schema_gen, example_validator, transform, trainer, evaluator, pusher],
        enable_cache=False,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            os.path.join(root, "metadata.sqlite")),
        beam_pipeline_args=["--runner=FnApiRunner"])


class ComponentTimer(logging.Handler):
    """Seconds between LocalDagRunner's 'Component X is running.' and '... is finished.' lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = COMPONENT_LINE.search(record.getMessage())
        if found and found[2] == "running":
            self.started[found[1]] = time.perf_counter()
        elif found and found[1] in self.started:
            self.seconds[found[1]] = round(time.perf_counter() - self.started[found[1]], 2)


def score_test_split(root: str, batch: int = 8) -> dict[str, Any]:
    """The pushed model's serving_default on ExampleGen's raw test records: probabilities by id."""
    import numpy as np
    import tensorflow as tf

    pushed = sorted(glob.glob(os.path.join(root, "serving", "*", "saved_model.pb")))
    files = sorted(glob.glob(os.path.join(root, "pipeline", "ImportExampleGen", "examples", "*", "Split-test", "*")))
    if not pushed:
        return {"pushed": False, "test_files": files}
    serve = tf.saved_model.load(os.path.dirname(pushed[-1])).signatures["serving_default"]
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    ids, probabilities = [], []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        probabilities.append(serve(examples=tf.constant(chunk))["probabilities"].numpy())
        ids += [tf.train.Example.FromString(r).features.feature[ID_KEY].bytes_list.value[0].decode() for r in chunk]
    out = os.path.join(root, "test_probabilities.npz")
    np.savez_compressed(out, ids=np.array(ids), probabilities=np.concatenate(probabilities)[..., 0])
    return {"pushed": True, "model": os.path.dirname(pushed[-1]), "test_files": files, "probabilities": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="data root holding span-N/*.tfrecord.gz (segpipe demo-data --out)")
    parser.add_argument("--root", required=True, help="pipeline root (artifacts, ML Metadata, serving/)")
    parser.add_argument("--recipe", required=True, help="JSON recipe (bench_tfx.py writes it)")
    parser.add_argument("--out", required=True, help="JSON result: seconds per component, test probabilities")
    args = parser.parse_args(argv)
    from absl import logging as absl_logging
    from tfx import v1 as tfx

    absl_logging.set_verbosity(absl_logging.INFO)
    timer = ComponentTimer()
    logging.getLogger().addHandler(timer)
    logging.getLogger().setLevel(logging.INFO)
    recipe = json.loads(Path(args.recipe).read_text())
    start = time.perf_counter()
    pipeline = create_pipeline(os.path.abspath(args.data), os.path.abspath(args.root), recipe)
    tfx.orchestration.LocalDagRunner().run(pipeline)
    pipeline_seconds = time.perf_counter() - start
    finished_at = time.time()  # the caller's wall clock ends here: the scoring below is not TFX's work
    scored = score_test_split(os.path.abspath(args.root))
    training = sorted(glob.glob(os.path.join(args.root, "pipeline", "Trainer", "model_run", "*", "training.json")))
    blessed = glob.glob(os.path.join(args.root, "pipeline", "Evaluator", "blessing", "*", "BLESSED"))
    tfma_metrics = glob.glob(os.path.join(args.root, "pipeline", "Evaluator", "evaluation", "*", "metrics*"))
    Path(args.out).write_text(json.dumps({
        "versions": versions(), "pipeline_seconds": round(pipeline_seconds, 2), "finished_at": finished_at,
        "components": timer.seconds, "blessed": bool(blessed),
        "training": json.loads(Path(training[-1]).read_text()) if training else None,
        "tfma_metrics": tfma_summary(tfma_metrics), **scored}, indent=2))
    return 0


def versions() -> dict[str, str]:
    import tensorflow as tf
    import tensorflow_model_analysis as tfma
    import tensorflow_transform as tft
    import tf_keras
    import tfx

    return {"python": sys.version.split()[0], "tfx": tfx.__version__, "tensorflow": tf.__version__,
            "tensorflow_transform": tft.__version__, "tensorflow_model_analysis": tfma.__version__,
            "tf_keras": tf_keras.__version__}


def tfma_summary(paths: list[str]) -> dict[str, float]:
    """TFMA's overall-slice metric values (its own figures, on the S x S transformed masks)."""
    import tensorflow_model_analysis as tfma

    if not paths:
        return {}
    result = tfma.load_metrics(os.path.dirname(paths[0]))
    values = {}
    for per_slice in result:
        for key_and_value in per_slice.metric_keys_and_values:
            value = key_and_value.value
            if value.HasField("double_value"):
                values[key_and_value.key.name] = value.double_value.value
    return values


if __name__ == "__main__":
    sys.exit(main())
