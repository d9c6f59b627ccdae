"""Transform: TensorFlow Transform on Beam turns raw examples into model-ready tensors.

`preprocessing_fn` decodes the PNG/JPEG image, resizes it to `image_size` (bilinear, antialias) and
rounds it to uint8 pixels, which are stored as they are. The normalisation is not applied to the
stored pixels but described beside them: per-channel `pixel_offset` and `pixel_scale` with
model input = (pixel - offset) * scale (`normalize_pixels`, the one rule the trainer's parse, the
serving transform and the edge graph all apply). Without standardisation that is x / 255 (offset 0,
scale 1 / 255); with `standardize=True` offset and scale are 255 * mean and 1 / (255 * std) of the
pixels / 255 per channel, from full-pass TFT analyzers over the *train* split. The mask is decoded,
resized nearest-neighbour (class ids and the 255 ignore label survive untouched) and cast to int64.

Outputs (both published atomically, together):
- Transform graph artifact = the TFT output dir: `tft.TFTransformOutput(transform_graph_uri)` loads
  it (`transform_fn/`, `transformed_metadata/`, and `metadata/` holding the raw feature spec).
- Transformed examples artifact: `Split-train/` and `Split-eval/` with GZIP `data-*.tfrecord.gz`
  shards (at most RECORDS_PER_SHARD records each) of tf.train.Example: `image` bytes (one
  `tf.io.serialize_tensor` of the uint8 [S, S, 3] HWC pixels: `tf.io.parse_tensor(value, tf.uint8)`
  reads one, `decode_pixels` a batch), `pixel_offset` and `pixel_scale` float32 lists (3 each, the
  same in every record of one run), `mask` int64 list (S*S), `id` bytes. A 128 px image takes 48 KiB
  before GZIP (float32 took 192 KiB). The `test` split is NOT transformed: the Evaluator feeds raw
  test bytes through the model's serving signature, which runs this same graph.

Serving contract of the transform graph:
- Inputs (`RAW_FEATURE_SPEC`): `image`, `mask`, `id`, each a scalar tf.string per example
  (batched: shape [N]). At serving only `image` is fed (`RAW_SERVING_KEYS`); the mask branch turns
  the empty string fed for an absent `mask` into an all-ignore (255) mask instead of failing to
  decode it.
- For export, use `load_serving_transform(uri)`: a plain `tf.Module` over the same SavedModel with
  `transform_image(image_bytes) -> float32 [N, S, S, 3]`, the model input (feeds empty `mask`/`id`
  itself, decodes the pixels and normalises them as the trainer does). Track it with
  `keras.export.ExportArchive.track` and call it in the endpoint. TFT's `transform_features_layer()`
  returns the stored form (serialized pixels, offset, scale), is a Keras 2 (`tf_keras`) model and
  re-traces its call under autograph when saved (15-40 s here): never mix it into a Keras 3 model graph.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from segpipe.components.core import artifacts
from segpipe.components.core.beam import beam_pipeline, worker_path
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

# Raw inputs of the transform graph (scalar bytes per example) and what serving feeds.
RAW_KEYS = (artifacts.IMAGE_KEY, artifacts.MASK_KEY, artifacts.ID_KEY)
RAW_SERVING_KEYS = (artifacts.IMAGE_KEY,)

# Images per record batch and TF call. Fixed: tfx-bsl's adaptive batching grows batches towards
# 1,000 records, and 1,000 decoded 128 px images with their masks cost ~0.4 GiB per batch.
DEFAULT_BATCH_SIZE = 64
MAP_PARALLELISM = 16  # tf.map_fn parallel_iterations: per-image decodes run concurrently
# Transformed records per output shard: a few hundred images already make several shards, which
# the trainer reads in parallel (measured in benchmarks/bench_input.py); 128 records of 128 px
# uint8 images are 3-6 MB compressed.
RECORDS_PER_SHARD = 128
STD_EPSILON = 1e-6  # on the variance of pixels / 255: keeps a constant channel from dividing by zero
# Per-channel normalisation stored beside the pixels (model input = (pixel - offset) * scale).
PIXEL_OFFSET_KEY = "pixel_offset"
PIXEL_SCALE_KEY = "pixel_scale"
UNIT_SCALE = 1.0 / 255.0  # the scale of x / 255 (offset 0): transform.standardize false
TELEMETRY = ["segpipe", "transform"]


def raw_feature_spec() -> dict[str, Any]:
    """The raw example as TFT sees it: three scalar byte strings."""
    import tensorflow as tf

    return {key: tf.io.FixedLenFeature([], tf.string) for key in RAW_KEYS}


def decode_resize_image(encoded: Any, image_size: int) -> Any:
    """[N] PNG/JPEG bytes -> uint8 [N, S, S, 3] (bilinear, antialias, rounded to the nearest level)."""
    import tensorflow as tf

    def _one(data: Any) -> Any:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        resized = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
        return tf.saturate_cast(tf.round(resized), tf.uint8)

    return tf.map_fn(
        _one,
        encoded,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
        parallel_iterations=MAP_PARALLELISM,
    )


def encode_pixels(pixels: Any) -> Any:
    """uint8 [N, S, S, 3] -> [N] tf.string, one serialized TensorProto per image (the `image` feature)."""
    import tensorflow as tf

    return tf.map_fn(tf.io.serialize_tensor, pixels, fn_output_signature=tf.TensorSpec([], tf.string))


def decode_pixels(serialized: Any, image_size: int) -> Any:
    """[N] `image` features -> uint8 [N, S, S, 3] in one op for the whole batch.

    A serialized uint8 TensorProto ends with its raw content (`tensor_content`, the proto's last
    field; dtype and shape come first), so the last S*S*3 bytes of each value are the pixels.
    tf.io.parse_tensor would read one value per call. The trainer's check_split verifies the first
    record with parse_tensor before training reads a split this way.
    """
    import tensorflow as tf

    size = image_size * image_size * 3
    return tf.reshape(tf.io.decode_raw(serialized, tf.uint8)[:, -size:], [-1, image_size, image_size, 3])


def normalize_pixels(pixels: Any, offset: Any, scale: Any) -> Any:
    """The model input: float32 (pixel - offset) * scale per channel.

    `pixels` [N, H, W, 3] uint8, or float in pixel units (a zoomed batch); `offset`, `scale` [3]
    per channel (or scalars), for a batch of records as `record_scaling` gives them. The trainer,
    the serving transform and the edge graph all call this, so what the model trained on is what
    it is served. Each image is one row against a tiled H*W*3 row of offsets and scales: TF's
    broadcast of a 3-vector over [N, H, W, 3] costs ~4x more on CPU (measured at 128 px).
    """
    import tensorflow as tf

    pixels = tf.cast(pixels, tf.float32)
    shape = tf.shape(pixels)
    row = shape[1] * shape[2]

    def tiled(values: Any) -> Any:
        return tf.tile(tf.broadcast_to(tf.cast(values, tf.float32), [3]), [row])

    flat = tf.reshape(pixels, [shape[0], -1])
    return tf.ensure_shape(tf.reshape((flat - tiled(offset)) * tiled(scale), shape), pixels.shape)


def record_scaling(offset: Any, scale: Any) -> tuple[Any, Any]:
    """The per-channel (offset, scale) [3] of a batch of records from their [N, 3] features.

    One Transform run writes the same values into every record, so any row serves the batch; the
    assertion turns a split that mixes several runs into an error instead of a silently wrong
    input. reduce_max picks that row and is defined for an empty batch.
    """
    import tensorflow as tf

    rows = []
    for key, values in ((PIXEL_OFFSET_KEY, offset), (PIXEL_SCALE_KEY, scale)):
        row = tf.reduce_max(values, axis=0)
        check = tf.debugging.assert_equal(values, tf.broadcast_to(row, tf.shape(values)), message=(
            f"transformed records of one batch carry different '{key}' values: the split mixes the "
            "output of several Transform runs"))
        with tf.control_dependencies([check]):
            rows.append(tf.identity(row))
    return rows[0], rows[1]


def decode_resize_mask(encoded: Any, image_size: int) -> Any:
    """[N] PNG bytes -> int64 [N, S, S] class ids (nearest neighbour, 255 kept).

    An empty string (what TFT feeds for an absent `mask` at serving time) becomes an all-ignore mask,
    so the serving graph never fails on the mask branch it does not return.
    """
    import tensorflow as tf

    def _decode(data: Any) -> Any:
        mask = tf.io.decode_image(data, channels=1, expand_animations=False)
        mask = tf.image.resize(mask, [image_size, image_size], method="nearest")
        return tf.reshape(mask, [image_size, image_size])

    def _one(data: Any) -> Any:
        return tf.cond(
            tf.strings.length(data) > 0,
            lambda: _decode(data),
            lambda: tf.fill([image_size, image_size], tf.constant(artifacts.IGNORE_LABEL, tf.uint8)),
        )

    masks = tf.map_fn(
        _one,
        encoded,
        fn_output_signature=tf.TensorSpec([image_size, image_size], tf.uint8),
        parallel_iterations=MAP_PARALLELISM,
    )
    return tf.cast(masks, tf.int64)


def pixel_scaling(pixels: Any, standardize: bool) -> tuple[Any, Any]:
    """Per-channel (offset, scale), each float32 [3], of `normalize_pixels` for uint8 `pixels`.

    x / 255 without `standardize`; with it (x / 255 - mean_c) / sqrt(var_c + STD_EPSILON), mean and
    variance over every pixel of the whole train split (TFT analyzers), as offset 255 * mean_c and
    scale 1 / (255 * sqrt(var_c + STD_EPSILON)).
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    if not standardize:
        return tf.zeros([3], tf.float32), tf.fill([3], tf.constant(UNIT_SCALE, tf.float32))
    units = tf.reshape(tf.cast(pixels, tf.float32) * UNIT_SCALE, [-1, 3])  # every pixel is one instance
    mean = tft.mean(units, reduce_instance_dims=False, name="channel_mean")
    variance = tft.var(units, reduce_instance_dims=False, name="channel_var")
    return mean * 255.0, UNIT_SCALE / tf.sqrt(variance + STD_EPSILON)


def serialized_example(example_id: str, pixels: Any, mask: Any, *, offset: Any, scale: Any) -> bytes:
    """One transformed tf.train.Example as the Beam pipeline writes it, from numpy values: for tools
    and tests that make transformed examples without running Transform.

    `pixels` uint8 [S, S, 3], `mask` [S, S] class ids, `offset` and `scale` 3 floats each.
    """
    import numpy as np
    import tensorflow as tf

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"{example_id}: pixels must be uint8 [S, S, 3], got {pixels.dtype} {pixels.shape}")
    feature = {
        artifacts.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.serialize_tensor(pixels).numpy()])),
        PIXEL_OFFSET_KEY: tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(offset, np.float32).ravel())),
        PIXEL_SCALE_KEY: tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(scale, np.float32).ravel())),
        artifacts.MASK_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(mask, np.int64).ravel())),
        artifacts.ID_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[example_id.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def load_serving_transform(transform_graph_uri: str) -> Any:
    """The transform graph as a `tf.Module` whose `transform_image([N] bytes)` gives the model input,
    float32 [N, S, S, 3].

    Empty strings stand in for the raw `mask` and `id` (the mask branch maps them to 255); the
    stored pixels are decoded and normalised exactly as the trainer's parse_batch does.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    output = tft.TFTransformOutput(transform_graph_uri)
    size = int(output.transformed_feature_spec()[artifacts.MASK_KEY].shape[0])  # the image is bytes: no shape
    module = tf.Module(name="serving_transform")
    module.transform_graph = tf.saved_model.load(output.transform_savedmodel_dir)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def transform_image(image_bytes: Any) -> Any:
        absent = tf.fill(tf.shape(image_bytes), "")
        raw = {key: absent for key in RAW_KEYS}
        raw[artifacts.IMAGE_KEY] = image_bytes
        stored = module.transform_graph.transform_fn(raw)
        offset, scale = record_scaling(stored[PIXEL_OFFSET_KEY], stored[PIXEL_SCALE_KEY])
        images = normalize_pixels(decode_pixels(stored[artifacts.IMAGE_KEY], size), offset, scale)
        return tf.ensure_shape(images, [None, size, size, 3])

    module.transform_image = transform_image
    return module


def make_preprocessing_fn(image_size: int, standardize: bool) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The TFT preprocessing_fn for `image_size` (see the module docstring for its contract)."""
    import tensorflow as tf

    def preprocessing_fn(inputs: Mapping[str, Any]) -> dict[str, Any]:
        pixels = decode_resize_image(inputs[artifacts.IMAGE_KEY], image_size)
        offset, scale = pixel_scaling(pixels, standardize)
        per_example = [tf.shape(pixels)[0], 3]  # TFT outputs are batched: the same 3 values in every record
        return {
            artifacts.IMAGE_KEY: encode_pixels(pixels),
            PIXEL_OFFSET_KEY: tf.broadcast_to(offset, per_example),
            PIXEL_SCALE_KEY: tf.broadcast_to(scale, per_example),
            artifacts.MASK_KEY: decode_resize_mask(inputs[artifacts.MASK_KEY], image_size),
            artifacts.ID_KEY: tf.identity(inputs[artifacts.ID_KEY]),
        }

    return preprocessing_fn


def check_schema(schema_uri: str) -> Path:
    """The Schema artifact must declare the raw features this transform reads."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    path = Path(schema_uri) / artifacts.SCHEMA_FILE
    try:
        schema = text_format.Parse(path.read_text(), schema_pb2.Schema())
    except FileNotFoundError:
        raise BadInputError(f"{path}: schema file not found") from None
    except text_format.ParseError as exc:
        raise BadInputError(f"{path}: not a schema text proto ({exc})") from None
    declared = {feature.name for feature in schema.feature}
    missing = [key for key in RAW_KEYS if key not in declared]
    if missing:
        raise BadInputError(f"{path}: schema lacks feature(s) {missing} that Transform reads")
    return path


def input_files(examples_uri: str, split: str) -> list[str]:
    files = artifacts.split_files(examples_uri, split)
    if not files:
        raise BadInputError(
            f"{artifacts.split_dir(examples_uri, split)}: no {artifacts.SHARD_PATTERN} shards in the Examples artifact"
        )
    return files


def build_transform_pipeline(
    pipeline: Any,
    patterns: Mapping[str, str],
    preprocessing_fn: Callable,
    transform_graph_dir: str,
    transformed_examples_dir: str,
) -> None:
    """Analyze on `train`, transform every split in `patterns`, write the graph and the TFRecords.

    Each split is read through ONE file pattern (its shards' glob), never a list of files: tfx-bsl
    reads a list as one Read per file joined by a Flatten, and the FnApiRunner materialises a
    multi-input Flatten, i.e. holds every raw example of the split in memory (peak RSS grew by
    0.35 MiB per 128 px image, measured with benchmarks/bench_transform.py). One pattern is one
    Read that streams.
    """
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io
    from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder
    from tfx_bsl.public import tfxio

    raw_metadata = dataset_metadata.DatasetMetadata.from_feature_spec(raw_feature_spec())

    def read(split: str, stage: str) -> tuple[Any, Any]:
        source = tfxio.TFExampleRecord(patterns[split], schema=raw_metadata.schema, telemetry_descriptors=TELEMETRY)
        batches = source.BeamSource(batch_size=DEFAULT_BATCH_SIZE)
        return pipeline | f"{stage}[{split}]" >> batches, source.TensorAdapterConfig()

    encoder = RecordBatchToExamplesEncoder()  # C++: no Python tf.Example building per record

    def encode(batch_and_passthrough: tuple[Any, Any]) -> list[bytes]:
        record_batch, _ = batch_and_passthrough
        return encoder.encode(record_batch)

    # Analysis reads train on its own so that the transform stages stream from disk instead of
    # holding the whole split in memory until the analyzers finish.
    transform_fn = read(artifacts.TRAIN, "ReadForAnalysis") | "Analyze" >> tft_beam.AnalyzeDataset(preprocessing_fn)
    _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_graph_dir)
    metadata_io.write_metadata(raw_metadata, str(Path(transform_graph_dir) / "metadata"))

    for split in patterns:
        transformed, _ = (read(split, "Read"), transform_fn) | f"Transform[{split}]" >> tft_beam.TransformDataset(
            output_record_batches=True
        )
        _ = (
            transformed
            | f"Encode[{split}]" >> beam.FlatMap(encode)
            | f"Count[{split}]" >> beam.Map(count_record, split)
            | f"Write[{split}]" >> beam.io.Write(
                tfrecord_sink(artifacts.shard_prefix(transformed_examples_dir, split), RECORDS_PER_SHARD)
            )
        )


def tfrecord_sink(prefix: str, records_per_shard: int) -> Any:
    """Beam's GZIP TFRecord sink (`<prefix>-SSSSS-of-NNNNN.tfrecord.gz`) that starts a new shard every
    `records_per_shard` records.

    Several shards let the trainer inflate and parse them in parallel (one GZIP stream is read by
    one thread). The roll-over streams: a fixed `num_shards` would first group the whole split in
    one place (in memory on the FnApiRunner). Beam's finalize step still names the shards and
    drops the files of failed bundle attempts.
    """
    from apache_beam.coders import BytesCoder
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.tfrecordio import _TFRecordSink  # WriteToTFRecord's sink, which has no roll-over option

    sink = _TFRecordSink(prefix, BytesCoder(), ".tfrecord.gz", 0, None, CompressionTypes.GZIP)
    sink.max_records_per_shard = records_per_shard  # FileBasedSink's roll-over, honoured by Beam's Write
    return sink


def count_record(record: bytes, split: str) -> bytes:
    """Counts written records per split as a Beam metric (read back after the run)."""
    from apache_beam.metrics import Metrics

    Metrics.counter("segpipe.transform", f"records[{split}]").inc()
    return record


def query_counts(result: Any, splits: list[str]) -> dict[str, int]:
    from apache_beam.metrics.metric import MetricsFilter

    counts = {split: 0 for split in splits}
    for split in splits:
        query = result.metrics().query(MetricsFilter().with_namespace("segpipe.transform").with_name(f"records[{split}]"))
        counts[split] = int(sum(c.committed if c.committed is not None else c.attempted for c in query["counters"]))
    return counts


def run_transform(
    examples_uri: str,
    schema_uri: str,
    transformed_examples_uri: str,
    transform_graph_uri: str,
    *,
    image_size: int,
    standardize: bool,
    beam_args: list[str],
) -> dict:
    """Analyze `train`, transform `train` and `eval`; publish the graph and the examples together.

    Returns `{"counts": {"train": n, "eval": m}, "standardize": bool, "image_size": S}`. A failure
    anywhere (including inside Beam) leaves nothing at either output URI.
    """
    import tensorflow_transform.beam as tft_beam

    schema_path = check_schema(schema_uri)
    splits = [artifacts.TRAIN, artifacts.EVAL]
    files = {split: input_files(examples_uri, split) for split in splits}
    parameters = {
        "image_size": image_size,
        "standardize": standardize,
        "beam_args": list(beam_args),
    }
    inputs = (examples_uri, schema_uri)
    with artifacts.publish(
        transform_graph_uri, artifacts.TRANSFORM_GRAPH, producer="Transform", parameters=parameters, inputs=inputs
    ) as (graph_dir, graph_info), artifacts.publish(
        transformed_examples_uri,
        artifacts.TRANSFORMED_EXAMPLES,
        producer="Transform",
        parameters=parameters,
        inputs=inputs,
    ) as (examples_dir, examples_info):
        # Workers read and write these paths: relative ones would resolve in each worker's own directory.
        tft_temp = worker_path(graph_dir / ".tft_tmp")
        worker_patterns = {split: worker_path(artifacts.split_dir(examples_uri, split) / artifacts.SHARD_PATTERN)
                           for split in files}  # matches exactly the shards input_files found
        pipeline = beam_pipeline(beam_args)
        with tft_beam.Context(temp_dir=tft_temp, desired_batch_size=DEFAULT_BATCH_SIZE):
            build_transform_pipeline(
                pipeline, worker_patterns, make_preprocessing_fn(image_size, standardize), worker_path(graph_dir),
                worker_path(examples_dir),
            )
            result = pipeline.run()
            result.wait_until_finish()
        shutil.rmtree(tft_temp, ignore_errors=True)
        counts = query_counts(result, splits)
        if not counts.get(artifacts.TRAIN):  # e.g. workers that could not see the input files
            raise BadInputError(f"transform: 0 {artifacts.TRAIN} records transformed from {files[artifacts.TRAIN][:3]}; "
                                "nothing published")
        for info in (graph_info, examples_info):
            info["counts"] = dict(counts)
            info["extra"].update(
                image_size=image_size,
                standardize=standardize,
                schema=str(schema_path),
                raw_serving_keys=list(RAW_SERVING_KEYS),
            )
    log.info("transform: %s (image_size=%d, standardize=%s)", counts, image_size, standardize)
    return {"counts": counts, "standardize": standardize, "image_size": image_size}
