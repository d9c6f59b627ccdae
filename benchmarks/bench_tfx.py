"""`segpipe run` against the same DAG built from stock TFX 1.16 components, one after the other.

segpipe's goal: its whole default run on the demo data takes at most half the time of the same DAG
made of stock TFX components (LocalDagRunner), at the same or better test metrics. One invocation:

1. `segpipe demo-data --num 1000 --out DIR` writes the demo span once (1,000 images, as the default
   run generates); both sides read these TFRecords.
2. segpipe: `segpipe run --root ROOT_A --data 'DIR/span-{SPAN}/*.tfrecord*'` (profile auto), wall
   seconds of the process, seconds per step from its progress lines, test metrics of the pushed
   version (native resolution, and at the model's S x S under `model_resolution`).
3. TFX: benchmarks/tfx_pipeline.py run by the TFX virtualenv's Python (`--tfx-python`) in a
   subprocess: ImportExampleGen (hash buckets 8/1/1 on the id: train/eval/test), StatisticsGen,
   SchemaGen, ExampleValidator, Transform (PNG decode, bilinear antialiased resize, / 255; mask
   nearest), Trainer (tf_keras run_fn), Evaluator (TFMA: pixel accuracy and foreground IoU over
   every pixel of the S x S transformed masks, gated at segpipe's thresholds), Pusher to a folder;
   Beam --runner=FnApiRunner. The recipe is segpipe's *effective* one from step 2: default.yaml
   plus the Plan artifact's choices (input size, U-Net width/depth/batch norm, batch, epochs and
   min_steps, loss, augmentation), with the trainer's Adam, warm-up + cosine schedule, seed, BN
   momentum rule, best-val_iou checkpoint and early stopping. Seconds per component come from
   LocalDagRunner's "Component X is running / finished" log lines.
4. The TFX model is scored with segpipe's own code (core/serving.class_mask_at_size,
   core/metrics.confusion_matrix / summarize, the Evaluator's nearest-resized truth) on the TFX
   test split: at each mask's native size, and at S x S.

segpipe's pushed model is also scored, through its serving signature, on the TFX test split: the
two splits hash the ids differently, so only these figures compare the two models on the same
images, and the goal's "same or better metrics" is judged on them.

It prints whole-run and per-step seconds, test pixel accuracy and foreground IoU of both sides and
the ratio segpipe / TFX (goal <= 0.5 at the same or better metrics), with the load average before
and after each run and the CPU model.

TFX 1.16 declares Requires-Python <3.11; its wheels are pure Python and its other dependencies are
segpipe's versions, so it was installed on Python 3.11 with --ignore-requires-python (a
configuration TFX does not support), into its own virtualenv, never segpipe's. `pip install` of
the same requirements into the new virtualenv was still resolving after 15 minutes, while
`pip download` (segpipe's pip 26) resolved them in 30 s; so the downloaded set was installed as it
is, without a second resolution (`pip check` then reported no broken requirement):

    python3.11 -m venv /work/tfxvenv
    grep -iE '^(tensorflow|tensorflow-transform|tensorflow-data-validation|tfx-bsl|ml-metadata|apache-beam|numpy|protobuf|pyarrow|tf-keras|keras|tensorflow-metadata|tensorflow-serving-api|tensorboard|ml-dtypes)==' \\
        constraints.txt > /tmp/tfx-constraints.txt
    pip download --ignore-requires-python -c /tmp/tfx-constraints.txt -d /tmp/tfxdl/wheels \\
        tfx==1.16.0 ml-pipelines-sdk==1.16.0 "tensorflow-model-analysis>=0.47,<0.48" tensorflow-serving-api==2.16.1 tf-keras==2.16.0
    /work/tfxvenv/bin/pip install --ignore-requires-python --no-deps --no-index /tmp/tfxdl/wheels/*.whl
    /work/tfxvenv/bin/pip install --no-deps --no-index --no-build-isolation /tmp/tfxdl/wheels/*.tar.gz
    /work/tfxvenv/bin/pip install dill==0.4.1   # TFT imports dill; nothing in the set declares it (Beam 2.72 dropped it)

Run it with segpipe's Python on a quiet machine (the two runs took 3.5 minutes together on 2 cores):

    python benchmarks/bench_tfx.py --json          # writes benchmarks/results/tfx.json
    python benchmarks/bench_tfx.py --quick         # 48 images, 32 px, one epoch: checks that it runs

`--tfx-recipe stock` trains the TFX side with the Keras segmentation tutorial's recipe instead of
segpipe's (Adam at a constant rate, Keras's BN momentum 0.99; the same U-Net, loss, batch,
augmentation, checkpoint and early stopping), for `--tfx-steps-factor` times segpipe's planned
steps: what a TFX user who did not copy segpipe's schedule runs, and how many steps it needs for
segpipe's test metrics. `--json` then writes benchmarks/results/tfx_stock.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import parse_steps, pushed_metrics  # noqa: E402
from bench_plan import newest, segpipe  # noqa: E402
from bench_quality import set_flags  # noqa: E402
from run_all import machine_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tfx.json"
STOCK_RESULTS = RESULTS.with_name("tfx_stock.json")
STOCK_RECIPE = {"lr_schedule": "constant", "bn_momentum": 0.99}  # the Keras tutorial's
TFX_PIPELINE = Path(__file__).resolve().parent / "tfx_pipeline.py"
GOAL_RATIO = 0.5
QUICK_SETTINGS = {"transform.image_size": 32, "model.base_filters": 4, "model.depth": 2, "train.epochs": 1,
                  "train.min_steps": 0, "evaluation.pixel_accuracy_threshold": 0.0, "evaluation.min_foreground_iou": 0.0}
# segpipe step -> the stock TFX component doing that work (None: TFX's DAG has no such step).
STEP_PAIRS = {
    "example_gen": "ImportExampleGen", "statistics_gen": "StatisticsGen", "previous_statistics": None,
    "schema_gen": "SchemaGen", "example_validator": "ExampleValidator", "plan": None, "transform": "Transform",
    "latest_model": None, "trainer": "Trainer", "evaluator": "Evaluator", "infra_validator": None,
    "pusher": "Pusher",
}
METRICS = ("pixel_accuracy", "foreground_iou")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run `command` (the TFX side) with `env` over this environment; (wall seconds, completed process)."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})
    return time.perf_counter() - start, done


# ---------------------------------------------------------------- the two runs


def run_segpipe(data: Path, root: Path, settings: dict[str, Any]) -> dict[str, Any]:
    before = load()
    seconds, done = segpipe("run", "--root", str(root), "--data", str(data / "span-{SPAN}/*.tfrecord*"),
                            *set_flags(settings))
    if done.returncode not in (0, 3):
        raise RuntimeError(f"segpipe run exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    evaluation = newest(root, "artifacts/evaluator/*/evaluation/metrics.json")
    plan = newest(root, "artifacts/plan/*/plan/plan.json")
    trainer = newest(root, "artifacts/trainer/*/result.json")
    model_resolution = json.loads(evaluation.read_text()).get("model_resolution", {}) if evaluation else {}
    return {
        "exit_code": done.returncode, "wall_seconds": round(seconds, 1), "load_before": before, "load_after": load(),
        "steps": {name: s["seconds"] for name, s in parse_steps(done.stdout).items()},
        "metrics": {k: pushed_metrics(root).get(k) for k in METRICS},
        "num_test_examples": pushed_metrics(root).get("num_examples"),
        "model_resolution_metrics": {k: model_resolution.get(k) for k in METRICS},
        "plan_overrides": json.loads(plan.read_text())["overrides"] if plan else {},
        "trainer": json.loads(trainer.read_text()) if trainer else None,
    }


def recipe_of(settings: dict[str, Any], plan_overrides: dict[str, Any],
              trainer_plan: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The TFX side's recipe from segpipe's effective configuration; what it cannot mirror.

    The epochs are the ones segpipe's trainer planned (min_steps already applied, patience scaled):
    the TFX train split (another hash) differs by a few images, and min_steps would otherwise add
    an epoch there for a handful of missing steps.
    """
    from segpipe.pipeline.config import load_config

    cfg = load_config(overrides={**settings, **plan_overrides})
    t, m = cfg.train, cfg.model
    epochs, patience = t.epochs, t.early_stopping_patience
    if trainer_plan:
        epochs, patience = trainer_plan["epochs"], trainer_plan["early_stopping_patience"]
    recipe = {
        "image_size": cfg.transform.image_size, "base_filters": m.base_filters, "depth": m.depth,
        "batch_norm": m.batch_norm, "batch_size": t.batch_size, "epochs": epochs, "min_steps": 0,
        "early_stopping_patience": patience, "learning_rate": t.learning_rate,
        "warmup_fraction": t.warmup_fraction if t.lr_schedule == "cosine" else 0.0, "seed": t.seed,
        "shuffle_buffer": t.shuffle_buffer, "augment_flip": t.augment_flip, "augment_rot90": t.augment_rot90,
        "augment_zoom": t.augment_zoom, "pixel_accuracy_threshold": cfg.evaluation.pixel_accuracy_threshold,
        "min_foreground_iou": cfg.evaluation.min_foreground_iou,
    }
    unmirrored = []
    if t.loss != "bce":
        unmirrored.append(f"segpipe trained with loss {t.loss}, the TFX side with binary cross-entropy")
    if t.class_weights != "none":
        unmirrored.append(f"segpipe weighted the cross-entropy (class_weights {t.class_weights}), the TFX side did not")
    if t.lr_schedule != "cosine":
        unmirrored.append(f"segpipe's schedule is {t.lr_schedule}; the TFX side decays without warm-up")
    if m.dropout or m.encoder != "unet" or t.crop_size or t.cache or t.jit_compile:
        unmirrored.append("segpipe used dropout / an encoder / crops / cache / XLA, which the TFX side does not")
    return recipe, unmirrored


def run_tfx(python: str, data: Path, root: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    root.mkdir(parents=True)
    recipe_file, out_file, log_file = root / "recipe.json", root / "result.json", root / "tfx.log"
    recipe_file.write_text(json.dumps(recipe, indent=2))
    # A folder of its own: TFX packages every module beside its module_file into the user-code wheel.
    module = root / "module" / TFX_PIPELINE.name
    module.parent.mkdir()
    shutil.copy(TFX_PIPELINE, module)
    # The TFX virtualenv's tools first on PATH (TFX builds the module file into a wheel with them).
    bin_dir = Path(python).parent
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(bin_dir.parent)}
    before, started_at = load(), time.time()
    seconds, done = timed([python, str(module), "--data", str(data), "--root", str(root / "run"),
                           "--recipe", str(recipe_file), "--out", str(out_file)], env)
    log_file.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"the TFX pipeline exited {done.returncode} (log: {log_file}):\n{done.stderr[-4000:]}")
    result = json.loads(out_file.read_text())
    # Wall seconds from the process start to the end of LocalDagRunner.run (imports included, as in
    # `segpipe run`'s), without the test-split scoring that follows it in the same process.
    return {"wall_seconds": round(result["finished_at"] - started_at, 1), "process_seconds": round(seconds, 1),
            "load_before": before, "load_after": load(), **result}


def test_examples(files: list[str]) -> list[tuple[str, bytes, bytes]]:
    """(id, image PNG, mask PNG) of every record of the TFX test split's files."""
    from segpipe.components.core.data_format import parse_example
    from segpipe.components.example_gen import iter_records

    examples = []
    for path in files:
        for index, record, problem in iter_records(path):
            if problem:
                raise RuntimeError(f"{path} record {index}: {problem}")
            examples.append(parse_example(record))
    return examples


def score(examples: list[tuple[str, bytes, bytes]], probabilities: dict[str, np.ndarray], size: int) -> dict[str, Any]:
    """segpipe's metrics of S x S x 1 `probabilities` (by id) against the examples' masks: native size and S x S."""
    from segpipe.components.core import metrics as seg_metrics
    from segpipe.components.core.serving import class_mask_at_size
    from segpipe.components.evaluator import decode_mask, resize_nearest

    if len(examples) != len(probabilities):
        raise RuntimeError(f"{len(examples)} test records, {len(probabilities)} answers")
    native, small = np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64)
    for example_id, _, mask_png in examples:
        truth, prob = decode_mask(mask_png, example_id), probabilities[example_id]
        native += seg_metrics.confusion_matrix(truth, class_mask_at_size(prob, *truth.shape), 2)
        small += seg_metrics.confusion_matrix(resize_nearest(truth, size), class_mask_at_size(prob, size, size), 2)
    pick = lambda cm: {k: seg_metrics.summarize(cm)[k] for k in METRICS}  # noqa: E731
    return {"metrics": pick(native), "model_resolution_metrics": pick(small), "num_examples": len(examples)}


def score_tfx(result: dict[str, Any], size: int) -> dict[str, Any]:
    """segpipe's metrics of the TFX model on the TFX test split: native size and S x S."""
    if not result.get("pushed"):
        return {"metrics": {}, "model_resolution_metrics": {}, "num_examples": 0}
    saved = np.load(result["probabilities"])
    probabilities = {i: p[..., None] for i, p in zip(saved["ids"].tolist(), saved["probabilities"])}
    return score(test_examples(result["test_files"]), probabilities, size)


def score_segpipe_on_tfx_split(serving_dir: Path, result: dict[str, Any], size: int) -> dict[str, Any]:
    """segpipe's pushed model, through its serving signature, on the TFX test split: the same images
    the TFX model is scored on (the two splits hash the ids differently)."""
    from segpipe.components.core.serving import load_serving, predict_probabilities

    if not result.get("pushed") or not serving_dir.is_dir():
        return {}
    model, examples = load_serving(serving_dir), test_examples(result["test_files"])
    probabilities = {}
    for start in range(0, len(examples), 32):
        batch = examples[start:start + 32]
        for (example_id, _, _), prob in zip(batch, predict_probabilities(model, [image for _, image, _ in batch])):
            probabilities[example_id] = prob
    return score(examples, probabilities, size)


def segpipe_parameters(recipe: dict[str, Any]) -> int:
    from segpipe.components.core.model import build_unet

    size = recipe["image_size"]
    return int(build_unet((size, size, 3), 1, base_filters=recipe["base_filters"], depth=recipe["depth"],
                          batch_norm=recipe["batch_norm"]).count_params())


# ---------------------------------------------------------------- report


def print_table(results: dict[str, Any]) -> None:
    a, b = results["segpipe"], results["tfx"]
    print(f"TFX Trainer recipe: {results['tfx_recipe']}, {results['recipe']['epochs']} epochs "
          f"({results['tfx_steps_factor']} x segpipe's planned steps)")
    print(f"{'':<34}{'segpipe':>10}{'TFX 1.16':>10}{'ratio':>8}")
    print(f"{'whole run, wall seconds':<34}{a['wall_seconds']:>10.1f}{b['wall_seconds']:>10.1f}"
          f"{results['ratio']:>8.3f}  (goal <= {GOAL_RATIO})")
    for step, component in STEP_PAIRS.items():
        mine, theirs = a["steps"].get(step), b["components"].get(component) if component else None
        label = f"  {step}" + (f" / {component}" if component else " (segpipe only)")
        ratio = f"{mine / theirs:>8.3f}" if mine is not None and theirs else ""
        print(f"{label:<34}{'' if mine is None else f'{mine:.1f}':>10}{'' if theirs is None else f'{theirs:.1f}':>10}{ratio}")
    matched = results["matched_steps"]
    print(f"{'  matched steps together':<34}{matched['segpipe']:>10.1f}{matched['tfx']:>10.1f}{matched['ratio']:>8.3f}")
    for step in sorted(set(a["steps"]) - set(STEP_PAIRS)):
        print(f"{'  ' + step + ' (segpipe only)':<34}{a['steps'][step]:>10.1f}")
    for key in ("metrics", "model_resolution_metrics"):
        where = "native size" if key == "metrics" else f"{results['recipe']['image_size']} px"
        for name in METRICS:
            mine, theirs = a[key].get(name), b["scored"][key].get(name)
            print(f"{f'test {name} ({where})':<34}{'' if mine is None else f'{mine:.4f}':>10}"
                  f"{'' if theirs is None else f'{theirs:.4f}':>10}")
    same = a.get("on_tfx_test_split") or {}
    for name in METRICS if same else ():
        print(f"{f'  same images: {name} (native)':<34}{same['metrics'][name]:>10.4f}"
              f"{b['scored']['metrics'][name]:>10.4f}  (both on the TFX test split, {same['num_examples']} images)")
    print(f"load average before/after: segpipe {a['load_before']} -> {a['load_after']}, "
          f"TFX {b['load_before']} -> {b['load_after']}; CPU: {results['cpu']} x {results['cpus']}")
    print(f"goal met (ratio <= {GOAL_RATIO} and metrics not worse): {results['goal_met']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", nargs="?", const=str(RESULTS), help=f"write the results (default file {RESULTS})")
    parser.add_argument("--tfx-python", default="/work/tfxvenv/bin/python", help="Python of the TFX virtualenv")
    parser.add_argument("--demo-size", type=int, default=1000, help="demo images (segpipe run's default: 1000)")
    parser.add_argument("--quick", action="store_true", help="48 images, 32 px, tiny U-Net, one epoch: a smoke test")
    parser.add_argument("--keep", action="store_true", help="keep the data and both pipeline roots (printed)")
    parser.add_argument("--tfx-recipe", choices=("segpipe", "stock"), default="segpipe",
                        help="the TFX Trainer's recipe: segpipe's effective one, or the Keras tutorial's stock one")
    parser.add_argument("--tfx-steps-factor", type=float, default=1.0,
                        help="the TFX side trains this many times segpipe's planned epochs (and patience)")
    args = parser.parse_args(argv)
    if args.json == str(RESULTS) and args.tfx_recipe == "stock":
        args.json = str(STOCK_RESULTS)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.tfx_python).exists():
        parser.error(f"--tfx-python {args.tfx_python}: not found; install TFX as this file's docstring says")
    settings = QUICK_SETTINGS if args.quick else {}
    demo_size = min(args.demo_size, 48) if args.quick else args.demo_size
    workdir = Path(tempfile.mkdtemp(prefix="bench_tfx-"))
    data = workdir / "data"
    try:
        gen_seconds, gen = segpipe("demo-data", "--num", str(demo_size), "--out", str(data))
        if gen.returncode:
            raise RuntimeError(f"segpipe demo-data failed:\n{gen.stderr[-3000:]}")
        print(f"demo data: {demo_size} images in {gen_seconds:.0f}s; segpipe run ...", flush=True)
        segpipe_run = run_segpipe(data, workdir / "segpipe", settings)
        recipe, unmirrored = recipe_of(settings, segpipe_run["plan_overrides"],
                                       (segpipe_run["trainer"] or {}).get("plan"))
        if args.tfx_recipe == "stock":
            recipe.update(STOCK_RECIPE)
            unmirrored.append("the TFX side trains with the Keras tutorial's stock recipe: Adam at a constant rate, "
                              "BN momentum 0.99 (segpipe: warm-up + cosine, BN momentum fitted to the run)")
        if args.tfx_steps_factor != 1.0:
            epochs = recipe["epochs"]
            recipe["epochs"] = max(1, round(epochs * args.tfx_steps_factor))
            recipe["early_stopping_patience"] = math.ceil(recipe["early_stopping_patience"] * recipe["epochs"] / epochs)
            unmirrored.append(f"the TFX side trains {recipe['epochs']} epochs, segpipe {epochs}")
        print(f"segpipe run {segpipe_run['wall_seconds']:.0f}s; TFX with {json.dumps(recipe)} ...", flush=True)
        tfx_run = run_tfx(args.tfx_python, data, workdir / "tfx", recipe)
        tfx_run["scored"] = score_tfx(tfx_run, recipe["image_size"])
        segpipe_run["on_tfx_test_split"] = score_segpipe_on_tfx_split(workdir / "segpipe" / "serving", tfx_run,
                                                                      recipe["image_size"])
    except Exception:
        print(f"failed; data and pipeline roots kept in {workdir}", file=sys.stderr)
        raise
    for temporary in ("test_files", "probabilities", "model"):  # paths under the removed work folder
        tfx_run.pop(temporary, None)
    ratio = segpipe_run["wall_seconds"] / tfx_run["wall_seconds"]
    # Compared on the same images (the TFX test split) when segpipe pushed a model; else each on its own.
    mine = (segpipe_run["on_tfx_test_split"] or segpipe_run)["metrics"]
    metrics_ok = all((mine.get(k) or 0.0) >= (tfx_run["scored"]["metrics"].get(k) or 0.0) for k in METRICS)
    results = {
        "quick": args.quick, "demo_size": demo_size, "demo_data_seconds": round(gen_seconds, 1),
        "cpu": machine_description()["cpu"], "cpus": len(os.sched_getaffinity(0)), "recipe": recipe,
        "segpipe": segpipe_run, "tfx": tfx_run, "ratio": round(ratio, 3),
        "matched_steps": matched_steps(segpipe_run["steps"], tfx_run["components"]),
        "goal_ratio": GOAL_RATIO, "goal_met": ratio <= GOAL_RATIO and metrics_ok, "metrics_not_worse": metrics_ok,
        "tfx_recipe": args.tfx_recipe, "tfx_steps_factor": args.tfx_steps_factor,
        "parameters": {"segpipe": segpipe_parameters(recipe),
                       "tfx": (tfx_run.get("training") or {}).get("parameters")},
        "differences": differences(unmirrored),
        "tfx_install": "tfx 1.16.0 + ml-pipelines-sdk 1.16.0 installed on Python 3.11 with pip "
                       "--ignore-requires-python (TFX declares Requires-Python <3.11: not a supported configuration)",
    }
    if results["parameters"]["segpipe"] != results["parameters"]["tfx"]:
        results["differences"].append(f"parameter counts differ: {results['parameters']}")
    mine, theirs = (segpipe_run["trainer"] or {}).get("plan") or {}, tfx_run.get("training") or {}
    if mine.get("records") != theirs.get("train_records"):
        results["differences"].append(
            f"train split: segpipe {mine.get('records')} images ({mine.get('steps')} steps), TFX "
            f"{theirs.get('train_records')} images ({theirs.get('steps')} steps); test split: segpipe "
            f"{segpipe_run['num_test_examples']}, TFX {tfx_run['scored']['num_examples']} images")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.keep:
        print(f"data and pipeline roots kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def matched_steps(steps: dict[str, float], components: dict[str, float]) -> dict[str, Any]:
    """Seconds of the steps both DAGs run (segpipe's plan, previous_statistics, latest_model and
    infra_validator left out) and their ratio."""
    pairs = [(s, c) for s, c in STEP_PAIRS.items() if c and s in steps and c in components]
    mine, theirs = sum(steps[s] for s, _ in pairs), sum(components[c] for _, c in pairs)
    return {"steps": [s for s, _ in pairs], "segpipe": round(mine, 1), "tfx": round(theirs, 1),
            "ratio": round(mine / theirs, 3) if theirs else None}


def differences(unmirrored: list[str]) -> list[str]:
    """What differs between the two runs besides the frameworks (measured ones are added by main)."""
    return [
        *unmirrored,
        "test split: segpipe buckets the id by SHA-256, TFX's ImportExampleGen by farmhash: same 80/10/10 "
        "weights, different images in each split (each side is scored on its own test split, and segpipe also "
        "on the TFX one)",
        "TFX stores transformed images as float32 feature lists (TFT's way), segpipe as uint8 pixels",
        "TFX Trainer: tf_keras (Keras 2) with its Adam; segpipe: Keras 3 with its FusedAdam (same update rule)",
        "TFX's gate is TFMA at the S x S transformed masks; segpipe's Evaluator scores at each mask's native size "
        "(both sides are also scored here with segpipe's code at native size and at S x S)",
        "segpipe's DAG also runs plan, previous_statistics, latest_model and infra_validator (a canary load in a "
        "fresh process); TFX's InfraValidator needs a TF Serving binary or Docker, absent here, so the TFX DAG has none",
        "TFX Transform runs with disable_statistics=True and transforms train and eval only, as segpipe's does",
        "TFX Trainer's augmentation is per-example tf.image flips/rot90 (map_fn) + a per-batch zoom; segpipe "
        "draws the same moves with one gather per batch",
    ]


if __name__ == "__main__":
    sys.exit(main())
