"""The plan (`profile: auto`) against the fixed `demo` profile, and the plans for data unlike the demo.

Default run, side by side from one invocation:
1. `segpipe demo-data` (1000 images, 2 classes), then `segpipe run --profile demo` and `segpipe run`
   (the default, `profile: auto`) on two fresh roots holding copies of that span: wall time, the
   trainer's seconds, the test metrics, and the plan the auto run chose with its time estimate;
2. three generated datasets unlike the demo (512x512 thin curvilinear structures; 4 classes, one of
   them rare; 60 grayscale images of 96x160), each run through ExampleGen and StatisticsGen and
   then the Plan step alone: the plan printed and recorded, nothing trained.

`--calibrate` instead times training steps of several U-Nets on random tensors (batch 8, batch
norm, Adam) and fits the cost model's three constants (`components/plan.py`: seconds per
multiply-accumulate, per activation value and per image), printing measured against predicted.

    python benchmarks/bench_plan.py --json benchmarks/results/plan_demo.json
    python benchmarks/bench_plan.py --plans-only      # step 2 only (a minute)
    python benchmarks/bench_plan.py --calibrate
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from generated_datasets import DATASETS, write_dataset

log = logging.getLogger("bench_plan")

CALIBRATION_NETS = [  # (size, depth, base_filters)
    (32, 2, 8), (64, 3, 8), (64, 3, 16), (64, 3, 32), (96, 3, 16), (128, 4, 8), (128, 4, 16), (128, 4, 32),
    (192, 4, 16), (256, 5, 16),
]
GOALS = {"pixel_accuracy": 0.95, "foreground_iou": 0.9}


# ------------------------------------------------------------------ calibration


def time_training(size: int, depth: int, filters: int, batch: int = 8, images: int = 96, repeats: int = 3) -> float:
    """Seconds per training image of one U-Net on random tensors: the fastest of `repeats` epochs
    after a first one that traces the graph (the fastest, since other processes only slow it)."""
    import keras

    from segpipe.components.core.model import build_unet, get_loss

    rng = np.random.default_rng(0)
    x = rng.random((images, size, size, 3), dtype=np.float32)
    y = (rng.random((images, size, size)) > 0.5).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = build_unet((size, size, 3), 1, base_filters=filters, depth=depth, batch_norm=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=get_loss("bce"))
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
        times.append((time.perf_counter() - started) / images)
    return min(times)


def fit_nonnegative(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares coefficients, all >= 0: the best fit over every subset of the columns whose
    unconstrained solution is non-negative (a handful of columns, so trying them all is cheap)."""
    best, best_error = np.zeros(design.shape[1]), float(np.sum(target**2))
    for subset in itertools.chain.from_iterable(
            itertools.combinations(range(design.shape[1]), k) for k in range(1, design.shape[1] + 1)):
        solution, *_ = np.linalg.lstsq(design[:, subset], target, rcond=None)
        if (solution < 0).any():
            continue
        coefficients = np.zeros(design.shape[1])
        coefficients[list(subset)] = solution
        error = float(np.sum((design @ coefficients - target) ** 2))
        if error < best_error:
            best, best_error = coefficients, error
    return best


def calibrate() -> dict[str, Any]:
    from segpipe.components import plan

    rows = []
    for size, depth, filters in CALIBRATION_NETS:
        seconds = time_training(size, depth, filters)
        rows.append({"size": size, "depth": depth, "base_filters": filters, "seconds_per_image": seconds,
                     "macs": plan.unet_macs(size, depth, filters), "activations": plan.unet_activations(size, depth, filters)})
        print(f"{size:4d} px depth {depth} filters {filters:3d}: {seconds * 1000:8.2f} ms/image", flush=True)
    design = np.array([[r["macs"], r["activations"], 1.0] for r in rows])
    measured = np.array([r["seconds_per_image"] for r in rows])
    # Each row divided by its measurement: relative errors, so every net weighs the same.
    per_mac, per_activation, per_image = fit_nonnegative(design / measured[:, None], np.ones_like(measured))
    print(f"SECONDS_PER_MAC = {per_mac:.3g}\nSECONDS_PER_ACTIVATION = {per_activation:.3g}\n"
          f"SECONDS_PER_IMAGE = {per_image:.3g}")
    for row in rows:
        row["predicted"] = per_mac * row["macs"] + per_activation * row["activations"] + per_image
        print(f"{row['size']:4d} px depth {row['depth']} filters {row['base_filters']:3d}: measured "
              f"{row['seconds_per_image'] * 1000:7.2f} ms, predicted {row['predicted'] * 1000:7.2f} ms")
    return {"nets": rows, "seconds_per_mac": per_mac, "seconds_per_activation": per_activation, "seconds_per_image": per_image,
            "cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg()}


# ------------------------------------------------------------------ auto against demo, on the demo data


def segpipe(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run the installed `segpipe` command; (wall seconds, completed process)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    done = subprocess.run(["segpipe", *args], capture_output=True, text=True, env=env, check=False)
    return time.perf_counter() - started, done


def newest(root: Path, pattern: str) -> Path | None:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def step_seconds(stdout: str) -> dict[str, float]:
    """Seconds per step from the runner's progress lines (`[i/N] step  state  seconds`)."""
    import re

    line = re.compile(r"^\[\d+/\d+\]\s+(\S+)\s+(?:done|cached)\s+([\d.]+)s")
    return {m[1]: float(m[2]) for m in map(line.match, stdout.splitlines()) if m}


def pipeline_run(root: Path, label: str, *flags: str) -> dict[str, Any]:
    """`segpipe run` on a root that already holds the data: wall time, steps, test metrics, plan."""
    load_before = os.getloadavg()[0]
    seconds, done = segpipe("run", "--root", str(root), *flags)
    if done.returncode not in (0, 3):
        raise RuntimeError(f"segpipe run ({label}) exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    metrics_file = newest(root, "artifacts/evaluator/*/evaluation/metrics.json")
    metrics = json.loads(metrics_file.read_text()) if metrics_file else {}
    trainer_result = newest(root, "artifacts/trainer/*/result.json")
    plan_file = newest(root, "artifacts/plan/*/plan/plan.json")
    plan_doc = json.loads(plan_file.read_text()) if plan_file else {}
    steps = step_seconds(done.stdout)
    result = {
        "exit_code": done.returncode,
        "run_seconds": round(seconds, 1),
        "trainer_seconds": steps.get("trainer"),
        "steps": steps,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "trainer": {k: v for k, v in json.loads(trainer_result.read_text()).items() if k in ("epochs", "best_epoch")}
        if trainer_result else {},
        "metrics": {k: metrics.get(k) for k in ("pixel_accuracy", "foreground_iou", "mean_iou", "dice")},
        "model_resolution_metrics": {k: (metrics.get("model_resolution") or {}).get(k)
                                     for k in ("pixel_accuracy", "foreground_iou")},
        "plan": {c["field"]: c["value"] for c in plan_doc.get("choices", [])},
        "plan_estimate": plan_doc.get("estimate"),
    }
    print(f"{label:>5}: exit {done.returncode}, {seconds:.0f}s (trainer {steps.get('trainer', 0):.0f}s), "
          f"pixel accuracy {result['metrics']['pixel_accuracy']}, foreground IoU {result['metrics']['foreground_iou']}",
          flush=True)
    return result


def demo_comparison(workdir: Path, num: int) -> dict[str, Any]:
    seconds, done = segpipe("demo-data", "--num", str(num), "--out", str(workdir / "data"))
    if done.returncode:
        raise RuntimeError(f"segpipe demo-data failed:\n{done.stderr[-3000:]}")
    runs = {}
    for label, flags in (("demo", ("--profile", "demo")), ("auto", ())):
        root = workdir / label
        shutil.copytree(workdir / "data", root / "data")
        runs[label] = pipeline_run(root, label, *flags)
    demo, auto = runs["demo"], runs["auto"]
    verdict = {
        "auto_meets_goals": all((auto["metrics"][k] or 0) >= v for k, v in GOALS.items()),
        "demo_meets_goals": all((demo["metrics"][k] or 0) >= v for k, v in GOALS.items()),
        "auto_not_slower": auto["run_seconds"] <= demo["run_seconds"],
        "auto_trainer_not_slower": (auto["trainer_seconds"] or 0) <= (demo["trainer_seconds"] or 0),
    }
    print(f"{'':>5}  {'wall s':>7}  {'trainer s':>9}  {'pix acc':>7}  {'fg IoU':>7}  plan")
    for label, run in runs.items():
        plan_text = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in run["plan"].items()
                              if k in ("transform.image_size", "model.base_filters", "model.depth",
                                       "train.batch_size", "train.epochs", "train.loss"))
        print(f"{label:>5}  {run['run_seconds']:7.0f}  {run['trainer_seconds'] or 0:9.0f}  "
              f"{run['metrics']['pixel_accuracy'] or 0:7.4f}  {run['metrics']['foreground_iou'] or 0:7.4f}  {plan_text}")
    print(json.dumps(verdict))
    return {"demo_images": num, "demo_data_seconds": round(seconds, 1), "goals": GOALS, "runs": runs, **verdict}


# ------------------------------------------------------------------ datasets unlike the demo: their plans


def plan_for(workdir: Path, name: str) -> dict[str, Any]:
    """ExampleGen, StatisticsGen and the Plan step on one generated dataset, through the DAG's parameters."""
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.pipeline import create_pipeline, nodes_by_name

    dataset = DATASETS[name]
    num, num_classes = dataset.num, dataset.num_classes
    root = workdir / name
    write_dataset(root / "data", dataset)
    cfg = load_config(overrides={"root": str(root), "data.num_classes": num_classes, "train.device": "cpu:2"})
    nodes = nodes_by_name(create_pipeline(cfg))
    uris = {"examples_uri": str(root / "examples"), "statistics_uri": str(root / "statistics"),
            "plan_uri": str(root / "plan")}
    nodes["example_gen"].fn(examples_uri=uris["examples_uri"], **nodes["example_gen"].params(cfg))
    nodes["statistics_gen"].fn(uris["examples_uri"], uris["statistics_uri"], **nodes["statistics_gen"].params(cfg))
    nodes["plan"].fn(uris["statistics_uri"], uris["examples_uri"], uris["plan_uri"], **nodes["plan"].params(cfg))
    document = json.loads((root / "plan" / "plan.json").read_text())
    print(f"\n{name}: {num} images, {num_classes} classes; estimate {document['estimate']['minutes']} min "
          f"on {document['device']} (budget {document['budget_minutes']} min)")
    for choice in document["choices"]:
        print(f"  {choice['field']:<32} {choice['value']!s:<9} {choice['reason']}")
    fp = document["fingerprint"]
    return {"images": num, "num_classes": num_classes, "fingerprint": fp, "estimate": document["estimate"],
            "choices": document["choices"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="fit the cost model's constants")
    parser.add_argument("--plans-only", action="store_true", help="only the plans for the generated datasets")
    parser.add_argument("--demo-size", type=int, default=1000, help="demo images (segpipe run's default: 1000)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.calibrate:
        results = calibrate()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="bench_plan-"))
        try:
            results = {"cpus": len(os.sched_getaffinity(0)), "load_average_at_start": os.getloadavg()}
            if not args.plans_only:
                results["demo_data"] = demo_comparison(workdir, args.demo_size)
            results["plans"] = {name: plan_for(workdir, name) for name in DATASETS}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
