"""Model quality on data unlike the demo: the default run, a 4x-budget reference and a classic baseline.

For each generated dataset (benchmarks/generated_datasets.py: thin vessels on 512x512 images, four
classes with a rare one, texture-defined regions of equal brightness, 60 grayscale 96x160 images)
and for the built-in demo data, side by side in one invocation:
(a) `default`: `segpipe run` as a user runs it (profile auto, the default budget), only
    `data.num_classes` set;
(b) `reference`: four times the budget plus settings chosen by hand for the dataset (longer
    training, and per dataset e.g. a larger input size for thin structures, class weights for
    the rare class);
(c) `baseline`: a classic non-learned segmenter fitted on the train split: the better (on train) of
    nearest class-mean colour and the best grayscale threshold(s).
Every figure is the Evaluator's native-resolution test-split metric (the baseline is scored on the
same test examples with the same confusion-matrix code). Printed: mean IoU, per-class IoU, wall
seconds, default / reference and default / baseline. Goals: default >= 0.95 x reference on every
dataset, the U-Net beats the baseline on every dataset, and the demo keeps >= 0.95 pixel accuracy
and >= 0.9 foreground IoU.

    python benchmarks/bench_quality.py --json benchmarks/results/quality.json
    python benchmarks/bench_quality.py --datasets few_grayscale_96x160 demo --budget-minutes 2
    python benchmarks/bench_quality.py --quick      # tiny data and budget: checks the script runs

A full run trains ten models within their budgets (10 and 40 minutes of estimated training each by
default): hours on 2 CPU cores; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from bench_plan import newest, segpipe
from generated_datasets import DATASETS, write_dataset

log = logging.getLogger("bench_quality")

DEMO = "demo"
DEMO_GOALS = {"pixel_accuracy": 0.95, "foreground_iou": 0.9}
REFERENCE_BUDGET_FACTOR = 4
# Hand-chosen settings of the reference runs, on top of the 4x budget: what a practitioner who had
# looked at the data would set (longer training everywhere; the dataset's own difficulty below).
REFERENCE_SETTINGS: dict[str, dict[str, Any]] = {
    "*": {"train.min_steps": 2000, "train.early_stopping_patience": 10},
    "thin_structures_512": {"transform.image_size": 512},  # 2-4 px vessels vanish below the native size
    "four_classes_one_rare": {"train.class_weights": "auto"},
}


# ------------------------------------------------------------------ runs


def set_flags(settings: dict[str, Any]) -> list[str]:
    return [flag for key, value in settings.items() for flag in ("--set", f"{key}={value}")]


def pipeline_run(root: Path, data: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """`segpipe run` on a fresh root over `data` (a span folder): wall seconds and test metrics."""
    load = os.getloadavg()[0]
    pattern = str(data.parent / "span-{SPAN}" / "*.tfrecord.gz")
    seconds, done = segpipe("run", "--root", str(root), "--data", pattern, *set_flags(settings))
    if done.returncode not in (0, 3):  # 3: trained and evaluated, the gate refused it
        raise RuntimeError(f"segpipe run exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    metrics = json.loads(newest(root, "artifacts/evaluator/*/evaluation/metrics.json").read_text())
    plan_file = newest(root, "artifacts/plan/*/plan/plan.json")
    plan = {c["field"]: c["value"] for c in json.loads(plan_file.read_text())["choices"]} if plan_file else {}
    return {
        "exit_code": done.returncode, "seconds": round(seconds, 1), "load_before": round(load, 2),
        "mean_iou": metrics["mean_iou"], "iou_per_class": metrics["iou_per_class"],
        "pixel_accuracy": metrics["pixel_accuracy"], "foreground_iou": metrics["foreground_iou"],
        "plan": plan,
    }


# ------------------------------------------------------------------ classic baseline


def split_examples(span: Path, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) of the span's examples that ExampleGen puts in `split` (the same id hash)."""
    import tensorflow as tf

    from segpipe.components.core.data_format import decode_image, parse_example
    from segpipe.components.example_gen import assign_split, split_order
    from segpipe.pipeline.config import load_config

    order = split_order(dataclasses.asdict(load_config().data.splits))
    for path in sorted(span.glob("*.tfrecord.gz")):
        for record in tf.data.TFRecordDataset(str(path), compression_type="GZIP").as_numpy_iterator():
            example_id, image, mask = parse_example(record)
            if assign_split(example_id, order) == split:
                pixels, labels = np.atleast_3d(decode_image(image)).astype(np.float64), decode_image(mask)
                pixels = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels[..., :3]
                yield pixels, (labels if labels.ndim == 2 else labels[..., 0]).astype(np.int64)


def gray(image: np.ndarray) -> np.ndarray:
    return np.clip(image.mean(axis=-1), 0, 255).astype(np.int64)


class NearestMeanColour:
    """Each pixel gets the class whose mean train colour is nearest."""

    name = "nearest class-mean colour"

    def fit(self, examples: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> NearestMeanColour:
        sums, counts = np.zeros((num_classes, 3)), np.zeros(num_classes)
        for image, mask in examples:
            valid = mask < num_classes
            np.add.at(sums, mask[valid], image[valid])
            counts += np.bincount(mask[valid], minlength=num_classes)
        self.means = sums / np.maximum(counts, 1)[:, None]
        return self

    def predict(self, image: np.ndarray) -> np.ndarray:
        return np.argmin(((image[..., None, :] - self.means) ** 2).sum(-1), axis=-1)


class GrayThresholds:
    """Classes ordered by mean train brightness, split by brightness thresholds; for two classes the
    single threshold and side that maximise train mean IoU (searched over all 256 levels)."""

    name = "grayscale threshold(s)"

    def fit(self, examples: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> GrayThresholds:
        hist = np.zeros((num_classes, 256))
        for image, mask in examples:
            valid = mask < num_classes
            np.add.at(hist, (mask[valid], gray(image)[valid]), 1)
        levels = np.arange(256)
        means = (hist * levels).sum(1) / np.maximum(hist.sum(1), 1)
        self.order = np.argsort(means)
        sorted_means = means[self.order]
        self.cuts = (sorted_means[1:] + sorted_means[:-1]) / 2
        if num_classes == 2:
            self.cuts = np.array([self._best_binary_cut(hist)])
        return self

    def _best_binary_cut(self, hist: np.ndarray) -> float:
        """The cut (between levels) that maximises mean IoU with class order self.order."""
        low, high = hist[self.order[0]], hist[self.order[1]]
        best, best_cut = -1.0, 127.5
        for cut in range(1, 256):
            tp_low, fn_low = low[:cut].sum(), low[cut:].sum()  # low class predicted below the cut
            tp_high, fn_high = high[cut:].sum(), high[:cut].sum()
            iou_low = tp_low / max(tp_low + fn_low + fn_high, 1)
            iou_high = tp_high / max(tp_high + fn_high + fn_low, 1)
            if (iou_low + iou_high) / 2 > best:
                best, best_cut = (iou_low + iou_high) / 2, cut - 0.5
        return best_cut

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.order[np.searchsorted(self.cuts, gray(image))]


def score(model: Any, examples: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> dict[str, Any]:
    from segpipe.components.core import metrics

    cm = sum(metrics.confusion_matrix(mask, model.predict(image), num_classes) for image, mask in examples)
    return metrics.summarize(cm)


def classic_baseline(span: Path, num_classes: int) -> dict[str, Any]:
    started = time.perf_counter()
    train, test = list(split_examples(span, "train")), list(split_examples(span, "test"))
    candidates = [NearestMeanColour().fit(train, num_classes), GrayThresholds().fit(train, num_classes)]
    best = max(candidates, key=lambda model: score(model, train, num_classes)["mean_iou"])
    summary = score(best, test, num_classes)
    return {"method": best.name, "seconds": round(time.perf_counter() - started, 1),
            "mean_iou": summary["mean_iou"], "iou_per_class": summary["iou_per_class"],
            "pixel_accuracy": summary["pixel_accuracy"], "foreground_iou": summary["foreground_iou"],
            "test_examples": len(test)}


# ------------------------------------------------------------------ one dataset


def make_data(workdir: Path, name: str, quick: bool) -> tuple[Path, int]:
    """The dataset's span folder and class count."""
    if name == DEMO:
        _seconds, done = segpipe("demo-data", "--num", "120" if quick else "1000", "--out", str(workdir / "data"))
        if done.returncode:
            raise RuntimeError(f"segpipe demo-data failed:\n{done.stderr[-3000:]}")
        return workdir / "data" / "span-1", 2
    dataset = DATASETS[name]
    return write_dataset(workdir / "data", dataset, num=min(dataset.num, 40) if quick else None), dataset.num_classes


def bench_dataset(workdir: Path, name: str, budget: float, budget_given: bool, quick: bool) -> dict[str, Any]:
    span, num_classes = make_data(workdir, name, quick)
    common: dict[str, Any] = {"data.num_classes": num_classes}
    if quick:  # one short epoch: the script's plumbing, not the figures
        common |= {"train.epochs": 1, "train.min_steps": 0}
    reference = {**common, "train.budget_minutes": budget * REFERENCE_BUDGET_FACTOR,
                 **REFERENCE_SETTINGS["*"], **REFERENCE_SETTINGS.get(name, {})}
    if quick:
        reference |= {"train.min_steps": 0, "train.early_stopping_patience": 0, "transform.image_size": 64}
    default = {**common, "train.budget_minutes": budget} if budget_given else common
    result = {"num_classes": num_classes, "reference_settings": reference}
    result["default"] = pipeline_run(workdir / "default", span, default)
    result["reference"] = pipeline_run(workdir / "reference", span, reference)
    result["baseline"] = classic_baseline(span, num_classes)
    d, r, b = (result[k]["mean_iou"] for k in ("default", "reference", "baseline"))
    result["default_over_reference"] = round(d / r, 3) if r else None
    result["default_over_baseline"] = round(d / b, 3) if b else None
    result["goals"] = {"default_at_least_0.95_reference": bool(r and d >= 0.95 * r), "unet_beats_baseline": d > b}
    if name == DEMO:
        result["goals"] |= {f"demo_{k}_at_least_{v}": result["default"][k] >= v for k, v in DEMO_GOALS.items()}
    print_dataset(name, result, flush=True)
    return result


def _iou_list(values: list[float | None]) -> str:
    return "[" + " ".join("  -  " if v is None else f"{v:.3f}" for v in values) + "]"


def print_dataset(name: str, result: dict[str, Any], flush: bool = False) -> None:
    print(f"\n{name} ({result['num_classes']} classes)")
    print(f"  {'run':<10} {'mean IoU':>8}  {'per-class IoU':<34} {'wall s':>7}  notes")
    for kind in ("default", "reference", "baseline"):
        run = result[kind]
        notes = run.get("method") or f"exit {run['exit_code']}, load {run['load_before']}"
        print(f"  {kind:<10} {run['mean_iou']:8.3f}  {_iou_list(run['iou_per_class']):<34} {run['seconds']:7.0f}  {notes}")
    print(f"  default / reference {result['default_over_reference']}   default / baseline "
          f"{result['default_over_baseline']}   goals {result['goals']}", flush=flush)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=[*DATASETS, DEMO], default=[*DATASETS, DEMO])
    parser.add_argument("--budget-minutes", type=float, default=0.0,
                        help="the default run's train.budget_minutes (0: the configuration's default); "
                             "the reference gets 4x")
    parser.add_argument("--quick", action="store_true", help="40 images, one epoch: checks the script runs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from segpipe.pipeline.config import load_config

    if args.quick and not args.budget_minutes:
        args.budget_minutes = 0.5
    budget_given = bool(args.budget_minutes)
    budget = args.budget_minutes or load_config().train.budget_minutes
    results: dict[str, Any] = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "load_average_at_start": os.getloadavg()},
        "budget_minutes": budget, "reference_budget_minutes": budget * REFERENCE_BUDGET_FACTOR,
        "quick": args.quick, "datasets": {},
    }
    for name in args.datasets:
        workdir = Path(tempfile.mkdtemp(prefix=f"bench_quality-{name}-"))
        try:
            results["datasets"][name] = bench_dataset(workdir, name, budget, budget_given, args.quick)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        every = [goal for entry in results["datasets"].values() for goal in entry["goals"].values()]
        results["all_goals_met"] = all(every)
        results["complete"] = len(results["datasets"]) == len(args.datasets)
        if args.json:  # after every dataset: a long run that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True, default=float) + "\n")
    print(f"\nall goals met: {results['all_goals_met']} (budget {budget} min, reference {budget * 4} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
