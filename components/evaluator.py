"""Evaluator: exact metrics of the served model on the raw `test` split, and the blessing gate.

The raw test examples go through the exported `serving_default` signature (PNG/JPEG bytes in,
`class_mask` out), so what is measured is exactly what TensorFlow Serving will answer, transform
included. True masks are resized to the model's S x S with nearest neighbour, the rule Transform
uses for training masks. Inference runs on Beam with `RunInference` and a small ModelHandler that
loads the SavedModel once per worker (Beam's TFModelHandlerTensor loads Keras models, not a
SavedModel signature taking strings). Per-example confusion matrices are summed with a
CombineGlobally, so every metric is exact over all pixels (see components/seg_metrics.py); per-
example IoU ranks the worst (and best) examples.

When a baseline model is given (the latest blessed model), it is evaluated on the same records in
the same Beam pipeline, and the gate checks the candidate does not regress beyond `max_regression`.
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
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
BASELINE = "baseline"
PER_EXAMPLE_FILE = "per_example_iou.jsonl"
NUM_GRID_EXAMPLES = 4  # best and worst rows each in the prediction grid
INFERENCE_BATCH_SIZE = 16
REGRESSION_TOLERANCE = 1e-12  # float slack so "exactly max_regression worse" passes
SCALARS = seg_metrics.SCALAR_METRICS


# ------------------------------------------------------------------ the gate


def _pair(value: float, other: float) -> tuple[str, str]:
    """Format two numbers with 3 decimals, or more if 3 would make unequal numbers look equal."""
    for digits in (3, 6, 10):
        a, b = f"{value:.{digits}f}", f"{other:.{digits}f}"
        if a != b:
            return a, b
    return repr(float(value)), repr(float(other))


def decide_blessing(
    metrics: dict[str, Any],
    baseline: dict[str, Any] | None,
    *,
    pixel_accuracy_threshold: float,
    min_foreground_iou: float,
    max_regression: float,
) -> tuple[bool, list[str]]:
    """(blessed, reasons it is not): absolute thresholds (equal passes) and the baseline rule."""
    return verdict(gate_checks(metrics, baseline, pixel_accuracy_threshold=pixel_accuracy_threshold,
                               min_foreground_iou=min_foreground_iou, max_regression=max_regression))


def verdict(checks: list[dict[str, Any]]) -> tuple[bool, list[str]]:
    """(blessed, the failed checks' reasons)."""
    reasons = [check["reason"] for check in checks if not check["passed"]]
    return not reasons, reasons


def gate_checks(
    metrics: dict[str, Any],
    baseline: dict[str, Any] | None,
    *,
    pixel_accuracy_threshold: float,
    min_foreground_iou: float,
    max_regression: float,
) -> list[dict[str, Any]]:
    """Every check of the gate, passed or not: {name, metric, value, bound, passed, reason}.

    The blessing stores them all, so the report shows the whole gate and not only its failures.
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
    return checks


# ------------------------------------------------------------------ Beam pieces


def make_model_handler(saved_model_dir: str, batch_size: int = INFERENCE_BATCH_SIZE) -> Any:
    """A RunInference ModelHandler: encoded image bytes -> PredictionResult(bytes, class_mask)."""
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

            masks = serving.predict_bytes(model, list(batch))[serving.CLASS_MASK]
            return [PredictionResult(example, mask.astype(np.uint8)) for example, mask in zip(batch, masks)]

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


def resize_mask(mask_png: bytes, size: int, example_id: str) -> np.ndarray:
    """Decode a mask PNG and resize it to size x size with nearest neighbour (255 stays 255)."""
    from PIL import Image

    from segpipe.components.core.data_format import decode_image

    mask = decode_image(mask_png)
    if mask.ndim != 2:
        raise BadInputError(f"test example {example_id}: mask must have one channel, has shape {mask.shape}")
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST))


def score_example(keyed_result: tuple[tuple[str, bytes, bytes], Any], size: int, num_classes: int) -> dict[str, Any]:
    """Confusion matrix and IoU of one example (plus what the grid needs to draw it)."""
    (example_id, image_bytes, mask_bytes), result = keyed_result
    truth = resize_mask(mask_bytes, size, example_id)
    try:
        cm = seg_metrics.confusion_matrix(truth, result.inference, num_classes)
    except ValueError as exc:
        raise BadInputError(f"test example {example_id}: {exc}") from None
    return {
        "id": example_id,
        "cm": cm,
        "iou": seg_metrics.example_iou(cm),
        "image": image_bytes,
        "truth": truth,
        "pred": result.inference,
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

    from segpipe.components.core.beam import beam_pipeline

    with beam_pipeline(beam_args) as pipeline:
        examples = (
            pipeline
            | "Files" >> beam.Create(files)
            | "Read" >> beam.io.ReadAllFromTFRecord()
            | "Parse" >> beam.Map(parse_test_record)
        )
        for name, (saved_model_dir, size) in models.items():
            add_model_branch(examples, name, saved_model_dir, size, num_classes, num_keep, scratch)
    results = {}
    for name in models:
        loaded = {}
        for kind in ("cm", "count", "worst", "best"):
            with open(scratch / f"{name}-{kind}.json") as fh:
                loaded[kind] = _from_json(json.load(fh))
        results[name] = loaded
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
    cm = result["cm"] if result["cm"] is not None else np.zeros((num_classes, num_classes), np.int64)
    summary = {"model": model.saved_model_dir, "image_size": model.image_size, "num_examples": int(result["count"])}
    summary.update(seg_metrics.summarize(cm))
    summary["worst_examples"] = [{"id": i, "iou": iou} for iou, i, _ in result["worst"][:num_worst]]
    return summary


def grid_rows(result: dict[str, Any]) -> list[Any]:
    from PIL import Image

    from segpipe.components.core.data_format import decode_image
    from segpipe.components.core.visual import GridRow

    rows = []
    worst = result["worst"][:NUM_GRID_EXAMPLES]
    worst_ids = {i for _, i, _ in worst}
    best = [t for t in result["best"] if t[1] not in worst_ids][:NUM_GRID_EXAMPLES]
    for label, items in (("best", best), ("worst", worst)):
        for rank, (iou, example_id, score) in enumerate(items, 1):
            size = score["truth"].shape[0]
            image = Image.fromarray(decode_image(score["image"])).convert("RGB").resize((size, size), Image.BILINEAR)
            rows.append(GridRow(f"{label} {rank}: {example_id} (IoU {iou:.3f})", np.asarray(image),
                                score["truth"], score["pred"]))
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
    max_regression: float,
    num_worst_examples: int,
    beam_args: list[str],
    inputs: tuple[str | None, ...] = (),
) -> dict:
    """Evaluate raw example files (see module docstring); publishes ModelEvaluation and ModelBlessing."""
    from segpipe.components.core.visual import GRID_FILE, plot_prediction_grid

    if not files:
        raise BadInputError("no test records to evaluate")
    models = [describe_model(CANDIDATE, model_uri, num_classes)]
    if baseline_model_uri:
        models.append(describe_model(BASELINE, baseline_model_uri, num_classes))
    gate = {
        "pixel_accuracy_threshold": pixel_accuracy_threshold,
        "min_foreground_iou": min_foreground_iou,
        "max_regression": max_regression,
    }
    parameters = {**gate, "num_classes": num_classes, "num_worst_examples": num_worst_examples, "beam_args": beam_args}
    num_keep = max(num_worst_examples, NUM_GRID_EXAMPLES)
    with artifacts.publish(evaluation_uri, artifacts.MODEL_EVALUATION, producer="evaluator",
                           parameters=parameters, inputs=(model_uri, baseline_model_uri, *inputs)) as (out, info):
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
        baseline = summaries.get(BASELINE)
        checks = gate_checks(metrics, baseline, **gate)
        blessed, reasons = verdict(checks)
        plot_prediction_grid(grid_rows(raw[CANDIDATE]), out / GRID_FILE,
                             title=f"test IoU: best and worst of {metrics['num_examples']}")
        metrics.update(num_classes=num_classes, baseline=baseline, gate=gate, blessed=blessed, reasons=reasons, checks=checks,
                       best_examples=[{"id": i, "iou": iou} for iou, i, _ in raw[CANDIDATE]["best"][:num_worst_examples]],
                       grid=GRID_FILE, per_example=PER_EXAMPLE_FILE)
        (out / artifacts.EVALUATION_FILE).write_text(json.dumps(metrics, indent=2))
        info["counts"] = {"examples": metrics["num_examples"], "pixels": metrics["num_pixels"]}
        info["extra"].update(blessed=blessed, **{k: metrics[k] for k in SCALARS})
    publish_blessing(blessing_uri, {"blessed": blessed, "reasons": reasons, "checks": checks, "model": model_uri,
                                    "baseline_model": baseline_model_uri}, evaluation_uri, parameters)
    log.info("evaluation: %s -> %s%s", {k: metrics[k] for k in SCALARS},
             "blessed" if blessed else "NOT blessed: ", "; ".join(reasons))
    return {"blessed": blessed, "reasons": reasons, "metrics": {k: metrics[k] for k in (*SCALARS, seg_metrics.NUM_EXAMPLES)}}


def publish_blessing(blessing_uri: str, record: dict[str, Any], evaluation_uri: str, parameters: dict[str, Any]) -> None:
    """The ModelBlessing artifact: what the Pusher (and Kubeflow's condition) reads.

    `record`: blessed, reasons, checks (every gate check, passed or not), model, baseline_model.
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
    num_classes: int,
    pixel_accuracy_threshold: float,
    min_foreground_iou: float,
    max_regression: float,
    num_worst_examples: int,
    beam_args: list[str],
) -> dict:
    """The Evaluator component: the Examples artifact's `test` split through `evaluate_files`.

    Returns {"blessed": bool, "reasons": [...], "metrics": {...}}.
    """
    files = artifacts.split_files(examples_uri, artifacts.TEST)
    if not files:
        raise BadInputError(f"{artifacts.split_dir(examples_uri, artifacts.TEST)}: no test shards to evaluate")
    return evaluate_files(
        model_uri, files, evaluation_uri, blessing_uri,
        baseline_model_uri=baseline_model_uri, num_classes=num_classes,
        pixel_accuracy_threshold=pixel_accuracy_threshold, min_foreground_iou=min_foreground_iou,
        max_regression=max_regression, num_worst_examples=num_worst_examples, beam_args=beam_args,
        inputs=(examples_uri,),
    )
