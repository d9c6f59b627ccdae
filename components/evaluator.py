"""Evaluator: exact metrics of the served model on the raw `test` split, the blessing gate, and hints.

The raw test examples go through the exported `serving_default` signature (PNG/JPEG bytes in,
`probabilities` out), so what is measured is exactly what TensorFlow Serving will answer, transform
included. Each prediction is scored at its mask's own size, the way `segpipe predict` returns it:
the S x S probabilities resized bilinearly to the example's height and width, then the class rule
(core/serving.py `class_mask_at_size`), against the original mask (255 ignored). These native
metrics are the ones the gate reads. The same metrics at the model's S x S input (true masks
resized nearest neighbour, Transform's rule for training masks) are kept under
`model_resolution`: the gap between the two is what the resize costs.

Inference runs on Beam with `RunInference` and a small ModelHandler that loads the SavedModel once
per worker (Beam's TFModelHandlerTensor loads Keras models, not a SavedModel signature taking
strings). Per-example confusion matrices are summed with a CombineGlobally, so every metric is
exact over all pixels (see core/metrics.py); per-example IoU ranks the worst (and best) examples.

When a baseline model is given (the latest blessed model), it is evaluated on the same records in
the same Beam pipeline, and the gate checks the candidate does not regress beyond `max_regression`.
A refused model comes with hints (the blessing's `hints`): its weakest class, whether training
was still improving when it stopped (from the ModelRun's history, when given), and whether the
resize to S x S loses too much.

With TFLite variants requested (push.tflite), the candidate is converted here (core/edge.py) into
the evaluation's `tflite/` folder, each file scored on the same test records with the TFLite
interpreter, the same native-size rule, and its size and per-image latency recorded; the gate adds
"tflite <variant> mean IoU drop <= max_tflite_drop" per variant. The Pusher copies these files, so
the pushed file is the one scored.
"""
from __future__ import annotations

import base64
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from segpipe.components.core import artifacts, metrics as seg_metrics
from segpipe.components.core.data_format import class_label, class_names
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
BASELINE = "baseline"
PER_EXAMPLE_FILE = "per_example_iou.jsonl"
NUM_GRID_EXAMPLES = 4  # best and worst rows each in the prediction grid
INFERENCE_BATCH_SIZE = 16
REGRESSION_TOLERANCE = 1e-12  # float slack so "exactly max_regression worse" passes
# A native mean IoU this much below the model-resolution one means the resize to S x S costs more
# than training on can win back: the hint suggests a larger transform.image_size.
RESOLUTION_GAP = 0.05
CLASS_NAMES = "class_names"  # metrics.json: labels.json's name per class id (None where it has none)
HINTS = "hints"  # blessing.json and metrics.json: what to try next for a refused model
NATIVE, MODEL_SIZE = 0, 1  # the two confusion matrices of every score, stacked
SCALARS = seg_metrics.SCALAR_METRICS
TFLITE = "tflite"  # metrics.json: per variant its file, size, latency, metrics and drop
TFLITE_DROP = "mean_iou_drop"  # candidate native mean IoU minus the variant's


# ------------------------------------------------------------------ the gate


def _pair(value: float, other: float) -> tuple[str, str]:
    """Format two numbers with 3 decimals, or more if 3 would make unequal numbers look equal."""
    for digits in (3, 6, 10):
        a, b = f"{value:.{digits}f}", f"{other:.{digits}f}"
        if a != b:
            return a, b
    return repr(float(value)), repr(float(other))


def decide_blessing(metrics: dict[str, Any], baseline: dict[str, Any] | None, **gate: Any) -> tuple[bool, list[str]]:
    """(blessed, reasons it is not) of `gate_checks` with the same gate parameters."""
    return verdict(gate_checks(metrics, baseline, **gate))


def verdict(checks: list[dict[str, Any]]) -> tuple[bool, list[str]]:
    """(blessed, the failed checks' reasons)."""
    reasons = [check["reason"] for check in checks if not check["passed"]]
    return not reasons, reasons


def class_checks(metrics: dict[str, Any], min_class_iou: float) -> list[dict[str, Any]]:
    """IoU_k >= min_class_iou for every foreground class k; a class never predicted is named as such.

    A class in neither the truth nor the prediction has no IoU: it is recorded, and passes, because
    the test split cannot show anything about it (the other checks still apply). min_class_iou 0
    lets every class pass, one never predicted included.
    """
    ious = metrics.get(seg_metrics.IOU_PER_CLASS) or []
    names = metrics.get(CLASS_NAMES) or []
    cm = metrics.get(seg_metrics.CONFUSION_MATRIX)
    collapsed = set(seg_metrics.never_predicted(np.asarray(cm))) if cm is not None else set()
    checks = []
    for k in range(1, len(ious)):
        label, value = class_label(k, names), ious[k]
        name = f"{label} IoU >= minimum"
        if k in collapsed and min_class_iou > 0:
            reason = f"{label} is never predicted"
        elif value is None:
            reason, name = "", f"{name} (not in the test split)"
        else:
            shown, limit = _pair(value, min_class_iou)
            reason = f"{label} IoU {shown} < minimum {limit}" if value < min_class_iou else ""
        checks.append({"name": name, "metric": seg_metrics.IOU_PER_CLASS, "class": k, "value": value,
                       "bound": min_class_iou, "passed": not reason, "reason": reason})
    return checks


def gate_checks(
    metrics: dict[str, Any],
    baseline: dict[str, Any] | None,
    *,
    pixel_accuracy_threshold: float,
    min_foreground_iou: float,
    max_regression: float,
    min_class_iou: float | None,
    max_tflite_drop: float | None = None,
) -> list[dict[str, Any]]:
    """Every check of the gate, passed or not: {name, metric, value, bound, passed, reason}.

    The blessing stores them all, so the report shows the whole gate and not only its failures.
    `min_class_iou` None leaves out the per-class checks (artifacts from before they existed), and
    `max_tflite_drop` None the TFLite checks (no variant requested, or artifacts from before them);
    otherwise every variant in metrics' `tflite` is checked.
    """
    checks = []
    minimums = ((seg_metrics.PIXEL_ACCURACY, "pixel accuracy", pixel_accuracy_threshold, "threshold"),
                (seg_metrics.FOREGROUND_IOU, "foreground IoU", min_foreground_iou, "minimum"))
    for key, name, bound, word in minimums:
        value = metrics.get(key)
        if value is None:
            reason = f"{name} is undefined (no labelled or no foreground pixels in the test split)"
        else:
            shown, limit = _pair(value, bound)
            reason = f"{name} {shown} < {word} {limit}" if value < bound else ""
        checks.append({"name": f"{name} >= {word}", "metric": key, "value": value, "bound": bound,
                       "passed": not reason, "reason": reason})
    if min_class_iou is not None:
        checks.extend(class_checks(metrics, min_class_iou))
    for key, name, _, _ in minimums if baseline is not None else ():
        value, base = metrics.get(key), baseline.get(key)
        if value is None or base is None:
            continue
        reason = ""
        if base - value > max_regression + REGRESSION_TOLERANCE:
            shown, base_shown = _pair(value, base)
            reason = (f"{name} {shown} is {base - value:.3f} below the baseline's {base_shown} "
                      f"(max regression {max_regression:.3f})")
        checks.append({"name": f"{name} regression vs baseline", "metric": key, "value": value,
                       "bound": base - max_regression, "passed": not reason, "reason": reason})
    if max_tflite_drop is not None:
        checks.extend(tflite_checks(metrics.get(TFLITE) or {}, max_tflite_drop))
    return checks


def tflite_checks(tflite: dict[str, dict[str, Any]], max_tflite_drop: float) -> list[dict[str, Any]]:
    """One check per TFLite variant: the candidate's native mean IoU minus the variant's <= the bound."""
    checks = []
    for variant, result in tflite.items():
        drop = result.get(TFLITE_DROP)
        if drop is None:
            reason = f"tflite {variant} mean IoU drop is undefined (no labelled pixels in the test split)"
        else:
            shown, limit = _pair(drop, max_tflite_drop)
            reason = (f"tflite {variant} mean IoU drop {shown} > maximum {limit}"
                      if drop > max_tflite_drop + REGRESSION_TOLERANCE else "")
        checks.append({"name": f"tflite {variant} mean IoU drop <= max_tflite_drop", "metric": TFLITE_DROP,
                       "variant": variant, "value": drop, "bound": max_tflite_drop, "direction": "max", "passed": not reason,
                       "reason": reason})
    return checks


# ------------------------------------------------------------------ what to try next


def refusal_hints(metrics: dict[str, Any], history: Sequence[dict[str, float]], train_config: dict[str, Any]) -> list[str]:
    """What a refused model's numbers suggest trying next, most specific first.

    - the weakest foreground class present in the test split (its IoU and pixel count);
    - under-training: the metric the trainer selects its checkpoint on was best at the last epoch,
      so more epochs would likely still help;
    - resolution: native mean IoU more than RESOLUTION_GAP below the model-resolution one.
    `history` is the ModelRun's per-epoch rows and `train_config` the train settings it recorded
    (empty when there is no ModelRun, as for `segpipe evaluate`).
    """
    hints = (weakest_class_hint(metrics, train_config), training_hint(history, train_config), resolution_hint(metrics))
    return [hint for hint in hints if hint]


def weakest_class_hint(metrics: dict[str, Any], train_config: dict[str, Any]) -> str:
    cm = metrics.get(seg_metrics.CONFUSION_MATRIX)
    ious = metrics.get(seg_metrics.IOU_PER_CLASS) or []
    if cm is None:
        return ""
    cm = np.asarray(cm, dtype=np.int64)
    pixels = seg_metrics.true_pixels(cm)
    present = [(ious[k], k) for k in range(1, len(ious)) if ious[k] is not None and pixels[k] > 0]
    if not present:
        return ""
    iou, k = min(present)
    never = " and is never predicted" if k in seg_metrics.never_predicted(cm) else ""
    hint = (f"weakest class: {class_label(k, metrics.get(CLASS_NAMES) or [])} has IoU {iou:.3f} on "
            f"{int(pixels[k]):,} test pixels ({pixels[k] / cm.sum():.1%} of the labelled pixels){never}: "
            "add training examples that show it")
    # Runs recorded before class weights existed trained without them.
    if train_config.get("loss") == "bce" and train_config.get("class_weights", "none") == "none":
        hint += "; train.loss=dice_bce weighs every class's overlap equally, where bce weighs pixels"
    return hint


def training_hint(history: Sequence[dict[str, float]], train_config: dict[str, Any]) -> str:
    # The trainer keeps the checkpoint that is best on `monitor` (runs that did not record one: val_loss).
    monitor = str(train_config.get("monitor", "val_loss"))
    sign = -1.0 if monitor.endswith("loss") else 1.0  # larger `sign * value` is better
    values = [(int(row["epoch"]) + 1, sign * row[monitor]) for row in history if monitor in row]
    if len(values) < 2 or values[-1][1] <= max(value for _, value in values[:-1]):
        return ""
    epochs = values[-1][0]
    return (f"training was still improving when it stopped: {monitor} {sign * values[-2][1]:.4f} -> "
            f"{sign * values[-1][1]:.4f} in the last of {epochs} epochs, the best so far: "
            f"train longer (e.g. train.epochs={2 * epochs})")


def resolution_hint(metrics: dict[str, Any]) -> str:
    native = metrics.get(seg_metrics.MEAN_IOU)
    small = (metrics.get(seg_metrics.MODEL_RESOLUTION) or {}).get(seg_metrics.MEAN_IOU)
    if native is None or small is None or small - native <= RESOLUTION_GAP:
        return ""
    size = int(metrics["image_size"])
    return (f"resolution: mean IoU at each mask's own size is {native:.3f}, {small - native:.3f} below the "
            f"{small:.3f} at the model's {size} x {size} input, so detail is lost in the resize: "
            f"try a larger transform.image_size (e.g. {2 * size})")


def read_training(model_run_uri: str | None) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """(per-epoch history, train settings) of a ModelRun artifact; ([], {}) without one."""
    from segpipe.components.trainer import HISTORY_FILE, read_history

    if not model_run_uri or not artifacts.is_published(model_run_uri):
        return [], {}
    info = artifacts.read_info(model_run_uri)
    return read_history(Path(model_run_uri) / HISTORY_FILE), dict(info.parameters.get("train_config") or {})


# ------------------------------------------------------------------ Beam pieces


def make_model_handler(saved_model_dir: str, batch_size: int = INFERENCE_BATCH_SIZE) -> Any:
    """A RunInference ModelHandler: encoded image bytes -> PredictionResult(bytes, probabilities S x S x C)."""
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult

    class ServingSignatureHandler(ModelHandler):
        """Loads the SavedModel once per worker and calls `serving_default` on a batch of bytes."""

        def __init__(self, path: str) -> None:
            super().__init__(min_batch_size=1, max_batch_size=batch_size)
            self._path = path

        def load_model(self) -> Any:
            from segpipe.components.core import serving

            return serving.load_serving_model(self._path)

        def run_inference(self, batch: Sequence[bytes], model: Any, inference_args: dict | None = None) -> Iterable[Any]:
            from segpipe.components.core import serving

            probabilities = serving.predict_bytes(model, list(batch))[serving.PROBABILITIES].astype(np.float32)
            return [PredictionResult(example, probs) for example, probs in zip(batch, probabilities)]

        def get_num_bytes(self, batch: Sequence[bytes]) -> int:
            return sum(len(item) for item in batch)

        def get_metrics_namespace(self) -> str:
            return "segpipe_evaluator"

    return ServingSignatureHandler(saved_model_dir)


def parse_test_record(record: bytes) -> tuple[str, bytes, bytes]:
    from segpipe.components.core.data_format import parse_example

    try:
        return parse_example(record)
    except ValueError as exc:
        raise BadInputError(f"test record: {exc}") from None


def decode_mask(mask_png: bytes, example_id: str) -> np.ndarray:
    """The mask at its own size (H x W class ids, 255 = ignore)."""
    from segpipe.components.core.data_format import decode_image

    mask = decode_image(mask_png)
    if mask.ndim != 2:
        raise BadInputError(f"test example {example_id}: mask must have one channel, has shape {mask.shape}")
    return mask.astype(np.uint8)


def resize_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """size x size with nearest neighbour (255 stays 255): the model-resolution truth."""
    from PIL import Image

    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


def score_example(keyed_result: tuple[tuple[str, bytes, bytes], Any], size: int, num_classes: int) -> dict[str, Any]:
    """Confusion matrices of one example, stacked [native, model size]; native IoU; grid material.

    Native: the probabilities resized to the mask's own size, as `segpipe predict` answers.
    """
    from segpipe.components.core.data_format import encode_png
    from segpipe.components.core.serving import class_mask_at_size

    (example_id, image_bytes, mask_bytes), result = keyed_result
    truth = decode_mask(mask_bytes, example_id)
    native = class_mask_at_size(result.inference, *truth.shape)
    try:
        cm = np.stack([seg_metrics.confusion_matrix(truth, native, num_classes),
                       seg_metrics.confusion_matrix(resize_nearest(truth, size),
                                                    class_mask_at_size(result.inference, size, size), num_classes)])
    except ValueError as exc:
        raise BadInputError(f"test example {example_id}: {exc}") from None
    return {
        "id": example_id,
        "cm": cm,
        "iou": seg_metrics.example_iou(cm[NATIVE]),
        "image": image_bytes,
        "mask": mask_bytes,
        "pred": encode_png(native),
    }


def sum_confusion(matrices: Iterable[np.ndarray]) -> np.ndarray | None:
    """CombineGlobally function: the elementwise sum (None for an empty split)."""
    total = None
    for cm in matrices:
        total = cm.astype(np.int64) if total is None else total + cm
    return total


def rank_key(score: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """(IoU, id, score): Top.Of orders by (IoU, id), so ties break by id, deterministically."""
    return (score["iou"], score["id"], score)


def _to_json(value: Any) -> Any:
    """JSON-able form of branch results: arrays and bytes tagged so `_from_json` restores them."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        if "__bytes__" in value:
            return base64.b64decode(value["__bytes__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _save_result(value: Any, path: str) -> None:
    """Beam branch results go to JSON files in our scratch folder (never pickle)."""
    with open(path, "w") as fh:
        json.dump(_to_json(value), fh)


def add_model_branch(examples: Any, name: str, saved_model_dir: str, size: int, num_classes: int,
                     num_keep: int, scratch: Path) -> None:
    """RunInference + scoring for one model; results land as JSON files in `scratch`."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

    scores = (
        examples
        | f"{name}/KeyByExample" >> beam.Map(lambda ex: (ex, ex[1]))
        | f"{name}/RunInference" >> RunInference(KeyedModelHandler(make_model_handler(saved_model_dir)))
        | f"{name}/Score" >> beam.Map(score_example, size, num_classes)
    )
    _ = (
        scores
        | f"{name}/Confusion" >> beam.Map(lambda s: s["cm"])
        | f"{name}/SumConfusion" >> beam.CombineGlobally(sum_confusion)
        | f"{name}/SaveConfusion" >> beam.Map(_save_result, str(scratch / f"{name}-cm.json"))
    )
    _ = (
        scores
        | f"{name}/Count" >> beam.combiners.Count.Globally()
        | f"{name}/SaveCount" >> beam.Map(_save_result, str(scratch / f"{name}-count.json"))
    )
    for kind, reverse in (("worst", True), ("best", False)):
        _ = (
            scores
            | f"{name}/Key{kind}" >> beam.Map(rank_key)
            | f"{name}/Top{kind}" >> beam.combiners.Top.Of(num_keep, key=lambda t: (t[0], t[1]), reverse=reverse)
            | f"{name}/Save{kind}" >> beam.Map(_save_result, str(scratch / f"{name}-{kind}.json"))
        )
    _ = (
        scores
        | f"{name}/PerExample" >> beam.Map(lambda s: json.dumps({"id": s["id"], "iou": s["iou"]}))
        | f"{name}/WritePerExample" >> beam.io.WriteToText(
            str(scratch / f"{name}-{PER_EXAMPLE_FILE}"), shard_name_template="", num_shards=1
        )
    )


def run_evaluation_pipeline(files: list[str], models: dict[str, tuple[str, int]], num_classes: int,
                            num_keep: int, scratch: Path, beam_args: list[str]) -> dict[str, dict[str, Any]]:
    """One Beam pipeline: read the records once, one RunInference branch per model."""
    import apache_beam as beam

    from segpipe.components.core.beam import beam_pipeline, worker_path

    with beam_pipeline(beam_args) as pipeline:
        # Workers open these paths: relative ones would resolve in each worker's own directory.
        examples = (
            pipeline
            | "Files" >> beam.Create([worker_path(f) for f in files])
            | "Read" >> beam.io.ReadAllFromTFRecord()
            | "Parse" >> beam.Map(parse_test_record)
        )
        for name, (saved_model_dir, size) in models.items():
            add_model_branch(examples, name, worker_path(saved_model_dir), size, num_classes, num_keep,
                             Path(worker_path(scratch)))
    results = {}
    for name in models:
        loaded = {}
        for kind in ("cm", "count", "worst", "best"):
            with open(scratch / f"{name}-{kind}.json") as fh:
                loaded[kind] = _from_json(json.load(fh))
        results[name] = loaded
    return results


# ------------------------------------------------------------------ TFLite variants


def read_records(files: Sequence[str], limit: int | None = None) -> list[tuple[str, bytes, bytes]]:
    """(id, image bytes, mask bytes) of the records in GZIP TFRecord shards, in file order."""
    import tensorflow as tf

    dataset = tf.data.TFRecordDataset(list(files), compression_type="GZIP")
    if limit is not None:
        dataset = dataset.take(limit)
    return [parse_test_record(record) for record in dataset.as_numpy_iterator()]


def score_tflite(path: Path, records: Sequence[tuple[str, bytes, bytes]], num_classes: int) -> dict[str, Any]:
    """Native and model-size metrics of one TFLite file, with the rule `score_example` applies."""
    from segpipe.components.core import edge
    from segpipe.components.core.serving import class_mask_at_size

    model = edge.EdgeModel(path)
    size = model.image_size
    cm = np.zeros((2, num_classes, num_classes), np.int64)
    latencies = []
    for example_id, image_bytes, mask_bytes in records:
        truth = decode_mask(mask_bytes, example_id)
        probabilities, ms = model.timed_predict(edge.decoded_images([image_bytes], size)[0])
        latencies.append(ms)
        try:
            cm[NATIVE] += seg_metrics.confusion_matrix(truth, class_mask_at_size(probabilities, *truth.shape), num_classes)
            cm[MODEL_SIZE] += seg_metrics.confusion_matrix(resize_nearest(truth, size),
                                                           class_mask_at_size(probabilities, size, size), num_classes)
        except ValueError as exc:
            raise BadInputError(f"test example {example_id}: {exc}") from None
    summary = seg_metrics.summarize(cm[NATIVE])
    summary[seg_metrics.MODEL_RESOLUTION] = seg_metrics.summarize(cm[MODEL_SIZE])
    summary["latency_ms"] = {"p50": float(np.percentile(latencies, 50)), "mean": float(np.mean(latencies)),
                             "images": len(latencies), "threads": 1}
    return summary


def evaluate_tflite(model: ModelUnderTest, files: Sequence[str], calibration_files: Sequence[str], out: Path,
                    variants: Sequence[str], num_classes: int, reference: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Convert the candidate into `out` (core/edge.py) and score every variant against `reference`."""
    from segpipe.components.core import edge

    records = read_records(files)
    calibration = [image for _, image, _ in read_records(calibration_files, edge.NUM_CALIBRATION_IMAGES)]
    written = edge.export_tflite(model.saved_model_dir, out, variants, check_images=[r[1] for r in records],
                                 calibration_images=calibration)
    results = {}
    for variant, file_info in written.items():
        summary = score_tflite(out / file_info["file"], records, num_classes)
        base, mine = reference.get(seg_metrics.MEAN_IOU), summary.get(seg_metrics.MEAN_IOU)
        drop = None if base is None or mine is None else base - mine
        results[variant] = {"file": f"{edge.TFLITE_DIR}/{file_info['file']}", "bytes": file_info["bytes"],
                            TFLITE_DROP: drop, **summary}
        log.info("tflite %s: %d bytes, mean IoU %s (drop %s), p50 %.2f ms/image", variant, file_info["bytes"],
                 mine, drop, summary["latency_ms"]["p50"])
    return results


# ------------------------------------------------------------------ assembling outputs


@dataclass(frozen=True)
class ModelUnderTest:
    name: str
    saved_model_dir: str
    image_size: int


def describe_model(name: str, uri: str, num_classes: int) -> ModelUnderTest:
    """Load the model once in the driver to check its contract and read its input size S."""
    from segpipe.components.core.serving import load_serving

    model = load_serving(uri)
    if model.num_classes != num_classes:
        raise BadInputError(f"{model.path}: the {name} model predicts {model.num_classes} classes, the data has {num_classes}")
    return ModelUnderTest(name, str(model.path), model.image_size)


def summarize_model(model: ModelUnderTest, result: dict[str, Any], num_classes: int, num_worst: int) -> dict[str, Any]:
    """Native metrics at the top level, the same set at the model's input size under `model_resolution`."""
    cm = result["cm"] if result["cm"] is not None else np.zeros((2, num_classes, num_classes), np.int64)
    summary = {"model": model.saved_model_dir, "image_size": model.image_size, "num_examples": int(result["count"])}
    summary.update(seg_metrics.summarize(cm[NATIVE]))
    summary[seg_metrics.MODEL_RESOLUTION] = seg_metrics.summarize(cm[MODEL_SIZE])
    summary["worst_examples"] = [{"id": i, "iou": iou} for iou, i, _ in result["worst"][:num_worst]]
    return summary


def grid_rows(result: dict[str, Any]) -> list[Any]:
    """Best and worst examples at their own size: the input, its mask, the native prediction."""
    from PIL import Image

    from segpipe.components.core.data_format import decode_image
    from segpipe.components.core.visual import GridRow

    rows = []
    worst = result["worst"][:NUM_GRID_EXAMPLES]
    worst_ids = {i for _, i, _ in worst}
    best = [t for t in result["best"] if t[1] not in worst_ids][:NUM_GRID_EXAMPLES]
    for label, items in (("best", best), ("worst", worst)):
        for rank, (iou, example_id, score) in enumerate(items, 1):
            image = np.asarray(Image.fromarray(decode_image(score["image"])).convert("RGB"))
            rows.append(GridRow(f"{label} {rank}: {example_id} (IoU {iou:.3f})", image,
                                decode_image(score["mask"]), decode_image(score["pred"])))
    return rows


def evaluate_files(
    model_uri: str,
    files: list[str],
    evaluation_uri: str,
    blessing_uri: str,
    *,
    baseline_model_uri: str | None,
    num_classes: int,
    pixel_accuracy_threshold: float,
    min_foreground_iou: float,
    min_class_iou: float,
    max_regression: float,
    num_worst_examples: int,
    tflite_variants: Sequence[str],
    max_tflite_drop: float,
    beam_args: list[str],
    model_run_uri: str | None = None,
    calibration_files: list[str] | None = None,
    inputs: tuple[str | None, ...] = (),
) -> dict:
    """Evaluate raw example files (see module docstring); publishes ModelEvaluation and ModelBlessing.

    `model_run_uri` (the trainer's ModelRun, optional: `segpipe evaluate` has none) lets a refusal
    say whether training was still improving. `calibration_files` (train records) calibrate the int8
    TFLite variant; without them (`segpipe evaluate`) the evaluated records do, which is logged.
    """
    from segpipe.components.core import edge
    from segpipe.components.core.visual import GRID_FILE, plot_prediction_grid

    if not files:
        raise BadInputError("no test records to evaluate")
    tflite_variants = edge.check_variants(tflite_variants)
    if edge.INT8 in tflite_variants and not calibration_files:
        log.warning("int8 TFLite calibrated on the evaluated records (no train records given)")
        calibration_files = files
    models = [describe_model(CANDIDATE, model_uri, num_classes)]
    if baseline_model_uri:
        models.append(describe_model(BASELINE, baseline_model_uri, num_classes))
    gate = {
        "pixel_accuracy_threshold": pixel_accuracy_threshold,
        "min_foreground_iou": min_foreground_iou,
        "min_class_iou": min_class_iou,
        "max_regression": max_regression,
        **({"max_tflite_drop": max_tflite_drop} if tflite_variants else {}),
    }
    parameters = {**gate, "num_classes": num_classes, "num_worst_examples": num_worst_examples, "beam_args": beam_args,
                  "tflite_variants": tflite_variants}
    num_keep = max(num_worst_examples, NUM_GRID_EXAMPLES)
    names = class_names(files, num_classes)
    with artifacts.publish(evaluation_uri, artifacts.MODEL_EVALUATION, producer="evaluator", parameters=parameters,
                           inputs=(model_uri, baseline_model_uri, model_run_uri, *inputs)) as (out, info):
        scratch = out / ".beam"
        scratch.mkdir()
        raw = run_evaluation_pipeline(files, {m.name: (m.saved_model_dir, m.image_size) for m in models},
                                      num_classes, num_keep, scratch, beam_args)
        shutil.move(str(scratch / f"{CANDIDATE}-{PER_EXAMPLE_FILE}"), str(out / PER_EXAMPLE_FILE))
        summaries = {m.name: summarize_model(m, raw[m.name], num_classes, num_worst_examples) for m in models}
        shutil.rmtree(scratch)
        metrics = summaries[CANDIDATE]
        if metrics["num_examples"] == 0:
            raise BadInputError(f"test split has no records ({', '.join(files[:3])})")
        metrics[CLASS_NAMES] = names
        baseline = summaries.get(BASELINE)
        if tflite_variants:
            metrics[TFLITE] = evaluate_tflite(models[0], files, calibration_files, out / edge.TFLITE_DIR,
                                              tflite_variants, num_classes, metrics)
        checks = gate_checks(metrics, baseline, **gate)
        blessed, reasons = verdict(checks)
        hints = [] if blessed else refusal_hints(metrics, *read_training(model_run_uri))
        plot_prediction_grid(grid_rows(raw[CANDIDATE]), out / GRID_FILE,
                             title=f"test IoU: best and worst of {metrics['num_examples']}")
        metrics.update(num_classes=num_classes, baseline=baseline, gate=gate, blessed=blessed, reasons=reasons,
                       checks=checks, hints=hints,
                       best_examples=[{"id": i, "iou": iou} for iou, i, _ in raw[CANDIDATE]["best"][:num_worst_examples]],
                       grid=GRID_FILE, per_example=PER_EXAMPLE_FILE)
        (out / artifacts.EVALUATION_FILE).write_text(json.dumps(metrics, indent=2))
        info["counts"] = {"examples": metrics["num_examples"], "pixels": metrics[seg_metrics.NUM_PIXELS]}
        info["extra"].update(blessed=blessed, **{k: metrics[k] for k in SCALARS})
    publish_blessing(blessing_uri, {"blessed": blessed, "reasons": reasons, "checks": checks, HINTS: hints,
                                    "model": model_uri, "baseline_model": baseline_model_uri}, evaluation_uri, parameters)
    log.info("evaluation: %s -> %s%s", {k: metrics[k] for k in SCALARS},
             "blessed" if blessed else "NOT blessed: ", "; ".join(reasons))
    for hint in hints:
        log.info("to try next: %s", hint)
    return {"blessed": blessed, "reasons": reasons, HINTS: hints,
            "metrics": {k: metrics[k] for k in (*SCALARS, seg_metrics.NUM_EXAMPLES)}}


def publish_blessing(blessing_uri: str, record: dict[str, Any], evaluation_uri: str, parameters: dict[str, Any]) -> None:
    """The ModelBlessing artifact: what the Pusher (and Kubeflow's condition) reads.

    `record`: blessed, reasons, checks (every gate check, passed or not), hints (what to try next
    when not blessed), model, baseline_model.
    """
    with artifacts.publish(blessing_uri, artifacts.MODEL_BLESSING, producer="evaluator",
                           parameters=parameters, inputs=(evaluation_uri,)) as (out, info):
        (out / artifacts.BLESSING_FILE).write_text(json.dumps(record, indent=2))
        info["extra"].update(blessed=record["blessed"], reasons=record["reasons"])


def evaluate_model(
    model_uri: str,
    examples_uri: str,
    evaluation_uri: str,
    blessing_uri: str,
    *,
    baseline_model_uri: str | None,
    model_run_uri: str | None,
    num_classes: int,
    pixel_accuracy_threshold: float,
    min_foreground_iou: float,
    min_class_iou: float,
    max_regression: float,
    num_worst_examples: int,
    tflite_variants: Sequence[str],
    max_tflite_drop: float,
    beam_args: list[str],
) -> dict:
    """The Evaluator component: the Examples artifact's `test` split through `evaluate_files`.

    TFLite variants (if any) are calibrated on the `train` split.

    Returns {"blessed": bool, "reasons": [...], "hints": [...], "metrics": {...}}.
    """
    files = artifacts.split_files(examples_uri, artifacts.TEST)
    if not files:
        raise BadInputError(f"{artifacts.split_dir(examples_uri, artifacts.TEST)}: no test shards to evaluate")
    return evaluate_files(
        model_uri, files, evaluation_uri, blessing_uri,
        baseline_model_uri=baseline_model_uri, num_classes=num_classes,
        pixel_accuracy_threshold=pixel_accuracy_threshold, min_foreground_iou=min_foreground_iou,
        min_class_iou=min_class_iou, max_regression=max_regression, num_worst_examples=num_worst_examples,
        tflite_variants=tflite_variants, max_tflite_drop=max_tflite_drop, beam_args=beam_args,
        model_run_uri=model_run_uri, calibration_files=artifacts.split_files(examples_uri, artifacts.TRAIN),
        inputs=(examples_uri,),
    )
