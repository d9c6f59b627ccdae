"""Batch inference on raw TFRecords with Beam RunInference (`segpipe infer`).

Reads TFRecord files in segpipe's raw format (`tf.train.Example{image, mask, id}`; the mask may be
absent and is never read), sends each image through the model's `serving_default` signature the
way `segpipe predict` does (PNG/JPEG RGB bytes as they are, anything else re-encoded as RGB PNG
first), and writes one InferenceResult artifact at `--out`:

- `masks/<name>.png`: the class ids (0..K-1) at the image's own size: the S x S probabilities
  resized bilinearly, then the class rule (core/serving.py `class_mask_at_size`), so the masks are
  the ones `segpipe predict` writes and the Evaluator scores. `<name>` is the id when it is a plain
  file name (ASCII letters, digits, `._-`, at most 100 characters), else a cleaned-up id plus
  a digest of the id's bytes, so distinct ids never share a file.
- `predictions-SSSSS-of-NNNNN.tfrecord.gz`: one `tf.train.Example` per image: `id` (the id's
  bytes), `mask` (the same PNG), `mask_file` (its path inside the artifact), `class_pixels`
  (int64 [K], pixels per class id) and `model_version` (the serving version number, 0 when the
  model is not a pushed version).
- `failures.json`: the records that were skipped, each with its id (when readable), file and reason.

The artifact appears complete or not at all (core/artifacts.py `publish`); an existing `--out` is
replaced only when it is itself an InferenceResult (a rerun). A bad record (not an Example, no
image, an unreadable or oversized image, one the serving graph cannot decode, or an id that
occurs more than once: the id names its mask file) is skipped and listed, never dropped silently;
the rest are written.

Inference runs on the configured Beam runner (`beam.pipeline_args`), with a ModelHandler that loads
the SavedModel once per worker through core/serving.py, like the Evaluator's; a batch the graph
rejects is retried image by image, so one bad image fails alone. The pipeline's BulkInferrer
(components/bulk_inferrer.py) runs the same pipeline and publishes the same artifact through
`publish_inference`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

MASKS_DIR = "masks"
PREDICTIONS_PREFIX = "predictions"
PREDICTIONS_SUFFIX = ".tfrecord.gz"
FAILURES_FILE = "failures.json"
# Feature keys of the prediction examples (`id` and `mask` as in the raw format).
MASK_FILE_KEY = "mask_file"
CLASS_PIXELS_KEY = "class_pixels"
MODEL_VERSION_KEY = "model_version"
NOT_A_VERSION = 0  # model_version of a model that is not a pushed serving version (those start at 1)
MAX_BATCH_SIZE = 16  # images per serving call; Beam batches adaptively up to this
COUNTERS = "segpipe.infer"  # Beam counter namespace, reported on the terminal
FAILED = "failed"
MAX_LOGGED = 20  # skipped records named one per line; failures.json has them all

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
DIGEST_TAIL = re.compile(r".*-[0-9a-f]{12}")  # what a digested name ends with; plain names never do


def resolve_data(pattern: str) -> list[str]:
    """--data as a glob, one TFRecord file, or a folder (the `*.tfrecord*` files directly inside)."""
    if any(c in pattern for c in "*?["):
        files = sorted(p for p in glob.glob(pattern) if Path(p).is_file())
    elif Path(pattern).is_dir():
        files = sorted(str(p) for p in Path(pattern).glob("*.tfrecord*") if p.is_file())
    else:
        files = [pattern] if Path(pattern).is_file() else []
    if not files:
        raise BadInputError(f"--data {pattern}: matches no TFRecord files (a glob, a file or a folder of them)")
    return files


def mask_file_name(raw_id: bytes) -> str:
    """The id as a file name when it is a plain one, else a cleaned-up id plus a digest of its bytes."""
    from segpipe.components.core.data_format import display_id

    text = display_id(raw_id)
    if PLAIN_NAME.fullmatch(text) and not DIGEST_TAIL.fullmatch(text):
        return f"{text}.png"
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:80] or "id"
    return f"{cleaned}-{hashlib.sha256(raw_id).hexdigest()[:12]}.png"


def failure(file: str, raw_id: bytes | None, reason: str) -> dict[str, Any]:
    from segpipe.components.core.data_format import display_id

    return {"id": None if raw_id is None else display_id(raw_id), "file": file, "reason": reason}


# ------------------------------------------------------------------ Beam pieces


def read_record(item: tuple[str, bytes]) -> Iterator[Any]:
    """(file, record) -> ((id bytes, file, height, width), bytes to send), or a tagged failure.

    The bytes to send follow `segpipe predict`'s rule (core/serving.py `image_for_serving`); only the
    header of a PNG/JPEG in RGB is read here, the serving graph decodes it.
    """
    import apache_beam as beam

    from segpipe.components.core.data_format import MissingFeatureError, parse_image_raw
    from segpipe.components.core.serving import image_for_serving

    file, record = item
    try:
        raw_id, image = parse_image_raw(record)
    except MissingFeatureError as exc:
        yield beam.pvalue.TaggedOutput(FAILED, failure(file, exc.raw_id, str(exc)))
        return
    except ValueError as exc:  # not an Example at all: no id to name it by
        yield beam.pvalue.TaggedOutput(FAILED, failure(file, None, f"record: {exc}"))
        return
    try:
        prepared = image_for_serving(image, decode=False)
    except ValueError as exc:
        yield beam.pvalue.TaggedOutput(FAILED, failure(file, raw_id, str(exc)))
        return
    yield (raw_id, file, prepared.height, prepared.width), prepared.data


def predict_each(model: Any, images: list[bytes]) -> list[Any]:
    """float32 [S, S, C] probabilities per image, or the reason an image failed (a str).

    A batch the serving graph rejects is split until only the images it rejects on their own fail.
    """
    from segpipe.components.core import serving

    try:
        return list(serving.predict_bytes(model, images)[serving.PROBABILITIES].astype(np.float32))
    except Exception as exc:  # noqa: BLE001 - TensorFlow raises InvalidArgumentError and friends
        if len(images) == 1:
            return [f"the serving signature could not decode this image ({type(exc).__name__})"]
        half = len(images) // 2
        return predict_each(model, images[:half]) + predict_each(model, images[half:])


def make_model_handler(saved_model_dir: str) -> Any:
    """A RunInference ModelHandler: bytes to send -> PredictionResult(bytes, probabilities or reason)."""
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult

    class ServingBytesHandler(ModelHandler):
        """Loads the SavedModel once per worker; calls `serving_default` on a batch of image bytes."""

        def __init__(self, path: str) -> None:
            super().__init__(min_batch_size=1, max_batch_size=MAX_BATCH_SIZE)
            self._path = path

        def load_model(self) -> Any:
            from segpipe.components.core import serving

            return serving.load_serving_model(self._path)

        def run_inference(self, batch: Sequence[bytes], model: Any, inference_args: dict | None = None) -> Iterable[Any]:
            return [PredictionResult(item, result) for item, result in zip(batch, predict_each(model, list(batch)))]

        def get_num_bytes(self, batch: Sequence[bytes]) -> int:
            return sum(len(item) for item in batch)

        def get_metrics_namespace(self) -> str:  # RunInference's own counters: not segpipe's terminal line
            return "segpipe_infer"

    return ServingBytesHandler(saved_model_dir)


def to_mask(keyed: tuple[tuple[bytes, str, int, int], Any]) -> tuple[bytes, dict[str, Any]]:
    """(id bytes, outcome): the mask PNG at the image's own size, or the failure."""
    from segpipe.components.core.data_format import encode_png
    from segpipe.components.core.serving import class_mask_at_size

    (raw_id, file, height, width), result = keyed
    if isinstance(result.inference, str):
        return raw_id, {"file": file, FAILED: failure(file, raw_id, result.inference)}
    probabilities = result.inference
    mask = class_mask_at_size(probabilities, height, width)
    classes = artifacts.data_classes(probabilities.shape[-1])
    counts = np.bincount(mask.ravel(), minlength=classes)[:classes]
    return raw_id, {"file": file, "mask": encode_png(mask), "counts": [int(c) for c in counts]}


def encode_prediction(raw_id: bytes, mask_png: bytes, mask_file: str, counts: list[int], version: int) -> bytes:
    """One prediction example (see the module docstring for its features)."""
    from tensorflow.core.example import example_pb2, feature_pb2

    def _bytes(value: bytes) -> feature_pb2.Feature:
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value]))

    def _ints(values: list[int]) -> feature_pb2.Feature:
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=values))

    feature = {
        artifacts.ID_KEY: _bytes(raw_id),
        artifacts.MASK_KEY: _bytes(mask_png),
        MASK_FILE_KEY: _bytes(mask_file.encode("utf-8")),
        CLASS_PIXELS_KEY: _ints(counts),
        MODEL_VERSION_KEY: _ints([version]),
    }
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString()


def write_mask(grouped: tuple[bytes, list[dict[str, Any]]], masks_dir: str, version: int) -> Iterator[Any]:
    """Write one id's mask file and yield its prediction example; an id seen twice fails every time."""
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    raw_id, outcomes = grouped
    outcomes = list(outcomes)
    if len(outcomes) > 1:
        files = sorted({outcome["file"] for outcome in outcomes})
        reason = (f"id occurs {len(outcomes)} times in the input ({', '.join(files)}); the id names the mask "
                  "file, so none of them was written")
        for outcome in outcomes:
            yield beam.pvalue.TaggedOutput(FAILED, failure(outcome["file"], raw_id, reason))
        return
    outcome = outcomes[0]
    if FAILED in outcome:
        yield beam.pvalue.TaggedOutput(FAILED, outcome[FAILED])
        return
    name = mask_file_name(raw_id)
    with open(os.path.join(masks_dir, name), "wb") as fh:  # inside the unpublished artifact folder
        fh.write(outcome["mask"])
    Metrics.counter(COUNTERS, "images").inc()
    yield encode_prediction(raw_id, outcome["mask"], f"{MASKS_DIR}/{name}", outcome["counts"], version)


def count_failure(record: dict[str, Any]) -> str:
    """A failure as a JSON line, counted (the count reaches the terminal's Beam line)."""
    from apache_beam.metrics import Metrics

    Metrics.counter(COUNTERS, FAILED).inc()
    return json.dumps(record, sort_keys=True)


def run_inference_pipeline(files: list[str], saved_model_dir: str, version: int, out: Path, scratch: Path,
                           beam_args: list[str]) -> None:
    """The Beam pipeline: read, prepare, RunInference, resize, group by id, write masks and examples."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

    from segpipe.components.core.beam import beam_pipeline, worker_path

    # Workers write the masks with plain file calls: `out` must be on a file system they share.
    out, scratch = Path(worker_path(out)), Path(worker_path(scratch))
    with beam_pipeline(beam_args, name="infer") as pipeline:
        read = (
            pipeline
            | "Files" >> beam.Create([worker_path(f) for f in files])
            | "Read" >> beam.io.ReadAllFromTFRecord(with_filename=True)
            | "Prepare" >> beam.FlatMap(read_record).with_outputs(FAILED, main="images")
        )
        written = (
            read.images
            | "RunInference" >> RunInference(KeyedModelHandler(make_model_handler(worker_path(saved_model_dir))))
            | "Mask" >> beam.Map(to_mask)
            | "GroupById" >> beam.GroupByKey()
            | "WriteMasks" >> beam.FlatMap(write_mask, str(out / MASKS_DIR), version).with_outputs(FAILED, main="examples")
        )
        _ = written.examples | "WritePredictions" >> beam.io.WriteToTFRecord(
            str(out / PREDICTIONS_PREFIX), file_name_suffix=PREDICTIONS_SUFFIX
        )
        _ = (
            (read[FAILED], written[FAILED])
            | "Failures" >> beam.Flatten()
            | "CountFailures" >> beam.Map(count_failure)
            | "WriteFailures" >> beam.io.WriteToText(str(scratch / "failures"), shard_name_template="", num_shards=1)
        )


# ------------------------------------------------------------------ the command


def served_version(saved_model: Path) -> int:
    """The serving version number of a pushed version folder, else NOT_A_VERSION."""
    from segpipe.components.core.serving import is_complete_version

    return int(saved_model.name) if is_complete_version(saved_model) else NOT_A_VERSION


def check_output(out: Path, files: Sequence[str], protected: Sequence[tuple[str | os.PathLike, str]]) -> None:
    """BadInputError unless `--out` may receive the artifact (see the module docstring).

    Never a folder segpipe owns or one inside it (the same rule as `segpipe predict`), never a
    folder holding an input file (a later glob over it would read the predictions back), and an
    existing non-empty folder only when it is an earlier InferenceResult.
    """
    from segpipe.components.tools.predict import check_output_dir

    target = out.resolve()
    rerun = target.is_dir() and artifacts.is_published(target) and artifacts.read_info(target).type == artifacts.INFERENCE_RESULT
    if target.is_dir() and any(target.iterdir()) and not rerun:
        raise BadInputError(f"--out {out}: exists and is not the output of segpipe infer; not replacing it "
                            "(choose a new or empty folder)")
    # An earlier result is itself a segpipe artifact: check only the folders above it.
    check_output_dir(target.parent if rerun else target, (), protected)
    for file in files:
        path = Path(file).resolve()
        if path.parent == target or target in path.parents:
            raise BadInputError(f"--out {out}: holds the input file {file}; write the results elsewhere")


def infer_records(
    model_path: str | os.PathLike,
    files: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    beam_args: list[str],
    protected: Sequence[tuple[str | os.PathLike, str]] = (),
) -> dict[str, Any]:
    """Masks and the InferenceResult for raw TFRecord `files` (see the module docstring).

    Refuses (BadInputError, before loading the model) an `out_dir` that `check_output` rejects;
    a model that breaks the serving contract; input files holding no record at all.
    Returns {"total", "written", "failed": [{"id", "file", "reason"}], "path", "model", "model_version"}.
    """
    from segpipe.components.core.serving import load_serving

    if not files:
        raise BadInputError("no TFRecord files given")
    out = Path(out_dir)
    check_output(out, files, protected)
    model = load_serving(model_path)
    return publish_inference(model, files, out, beam_args=beam_args, producer="infer", inputs=(str(model.path),))


def publish_inference(
    model: Any,
    files: Sequence[str],
    out: Path,
    *,
    beam_args: list[str],
    producer: str,
    inputs: tuple[str | os.PathLike | None, ...],
    parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the inference pipeline on `files` with the loaded `model` (core/serving.py ServingModel) and
    publish the InferenceResult at `out`: what `segpipe infer` and the pipeline's BulkInferrer share.

    `inputs` are the artifacts its fingerprint covers, `parameters` what it records beyond the model,
    its version, the files and the Beam options. Returns what `infer_records` returns.
    """
    version = served_version(model.path)
    parameters = {"model": str(model.path), "model_version": version, "files": list(files), "beam_args": beam_args,
                  **(parameters or {})}
    with artifacts.publish(out, artifacts.INFERENCE_RESULT, producer=producer, parameters=parameters,
                           inputs=inputs) as (tmp, info):
        (tmp / MASKS_DIR).mkdir()
        scratch = tmp / ".beam"
        scratch.mkdir()
        run_inference_pipeline(list(files), str(model.path), version, tmp, scratch, beam_args)
        lines = (scratch / "failures").read_text().splitlines()
        failed = sorted((json.loads(line) for line in lines if line), key=lambda f: (f["file"], f["id"] or "", f["reason"]))
        shutil.rmtree(scratch)
        written = sum(1 for _ in (tmp / MASKS_DIR).iterdir())
        if written + len(failed) == 0:
            raise BadInputError(f"{', '.join(files[:3])}: no records to infer")
        (tmp / FAILURES_FILE).write_text(json.dumps(failed, indent=2))
        info["counts"] = {"images": written, FAILED: len(failed)}
        info["extra"].update(model=str(model.path), model_version=version, num_classes=model.num_classes)
    for item in failed[:MAX_LOGGED]:
        log.warning("%s: id %s: %s", item["file"], item["id"] if item["id"] is not None else "(unreadable)", item["reason"])
    if len(failed) > MAX_LOGGED:
        log.warning("... and %d more skipped record(s), all in %s", len(failed) - MAX_LOGGED, out / FAILURES_FILE)
    log.info("%s: %d mask(s) of model %s written to %s, %d record(s) skipped", producer, written, model.path, out,
             len(failed))
    return {"total": written + len(failed), "written": written, "failed": failed, "path": str(out),
            "model": str(model.path), "model_version": version}


def prediction_files(result_uri: str | os.PathLike) -> list[str]:
    """The prediction TFRecord shards of an InferenceResult artifact."""
    return sorted(str(p) for p in Path(result_uri).glob(f"{PREDICTIONS_PREFIX}-*{PREDICTIONS_SUFFIX}"))
