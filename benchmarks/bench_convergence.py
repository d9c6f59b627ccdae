"""Trainer convergence on data unlike the demo: the old training settings against the new defaults.

Two generated datasets, each written as raw examples and run through the real Transform (64 px):
1. `rare3_gray`: grayscale 96x160 (non-square, squashed to 64x64 by Transform), 3 classes: large
   textured ellipses (class 1, ~15% of the pixels) and small bright spots (class 2, ~3%);
2. `thin_curves`: RGB 128x128, binary, 2-3 px wide random curves on a textured background (~5%).

Each trains, side by side in one invocation, the demo profile's U-Net (64 px, 16 filters, depth
3, batch norm, batch 16, 12 epochs) three ways:
- `old`: the settings before this change: BN momentum 0.99 (Keras's), constant learning rate,
  checkpoint and early stopping on `val_loss`, plain cross-entropy, no class weights, no
  `min_steps`, no BN recalibration;
- `new_12_epochs`: the new defaults at the old length (`train.min_steps: 0`), to separate the
  effect of the BN, schedule, loss and selection changes from that of training longer;
- `new`: the new defaults (`min_steps` raises the epochs of these small splits);
- `new_class_weights`, `new_recalibrated`: the new defaults with `train.class_weights: auto` or
  `train.bn_recalibration_batches: 50`, the two options left off by default (these figures are why).
For each: the exported model's eval foreground IoU in inference mode against training mode (BN
normalising with each batch's own statistics), per-class IoU, pixel accuracy, steps and seconds.
Results go to benchmarks/results/convergence.json. Run it on a quiet machine (it waits, up to
`--wait` seconds, for the 1-minute load average to fall below `--max-load`); 8-10 minutes on
2 cores.

    python benchmarks/bench_convergence.py [--json benchmarks/results/convergence.json]
    python benchmarks/bench_convergence.py --quick   # tiny sizes: checks that the script runs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("bench_convergence")

IMAGE_SIZE = 64
VARIANTS = ("old", "new_12_epochs", "new", "new_class_weights", "new_recalibrated")


# ---------------------------------------------------------------- data


def textured_background(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """A smooth random gradient plus pixel noise, values about 20..120."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    gradient = 40 * (rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx)
    noise = rng.normal(0, 12, (height, width, channels))
    return np.clip(70 + gradient[..., None] + noise, 0, 255)


def rare3_gray(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale 96x160: 1-2 textured ellipses (class 1) and 10-16 small bright spots (class 2)."""
    height, width = 96, 160
    image = textured_background(rng, height, width, 1)[..., 0]
    mask = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(20, height - 20), rng.uniform(30, width - 30)
        ry, rx = rng.uniform(12, 24), rng.uniform(20, 40)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[inside] = np.clip(135 + rng.normal(0, 18, inside.sum()), 0, 255)
        mask[inside] = 1
    for _ in range(rng.integers(10, 17)):
        cy, cx, radius = rng.uniform(4, height - 4), rng.uniform(4, width - 4), rng.uniform(2.5, 4.0)
        spot = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[spot] = np.clip(200 + rng.normal(0, 15, spot.sum()), 0, 255)
        mask[spot] = 2
    return image.astype(np.uint8), mask


def thin_curves(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RGB 128x128: 2-4 cubic Bezier curves 2-3 px wide, a little brighter than the background."""
    size = 128
    image = textured_background(rng, size, size, 3)
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    t = np.linspace(0, 1, 300)[:, None]
    for _ in range(rng.integers(2, 5)):
        p = rng.uniform(0, size, (4, 2))
        curve = ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3])
        radius = rng.uniform(1.0, 1.6)
        for y, x in curve[::3]:
            y0, x0 = int(y), int(x)
            window = (slice(max(0, y0 - 3), y0 + 4), slice(max(0, x0 - 3), x0 + 4))
            near = (yy[window] - y) ** 2 + (xx[window] - x) ** 2 <= radius**2
            mask[window][near] = 1
    colour = rng.uniform(50, 80, 3)
    image[mask == 1] += colour + rng.normal(0, 10, ((mask == 1).sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


DATASETS: dict[str, tuple[Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]], int]] = {
    "rare3_gray": (rare3_gray, 3),
    "thin_curves": (thin_curves, 2),
}


def write_examples(uri: Path, make: Callable, counts: dict[str, int], seed: int) -> dict[str, float]:
    """Raw train/eval splits in segpipe's format; returns the class pixel fractions of train."""
    import tensorflow as tf

    from segpipe.components.core import artifacts
    from segpipe.components.core.data_format import encode_example, encode_png

    rng = np.random.default_rng(seed)
    pixels: dict[int, int] = {}
    for split, num in counts.items():
        folder = artifacts.split_dir(uri, split)
        folder.mkdir(parents=True)
        with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
            for i in range(num):
                image, mask = make(rng)
                if split == artifacts.TRAIN:
                    for label, count in zip(*np.unique(mask, return_counts=True)):
                        pixels[int(label)] = pixels.get(int(label), 0) + int(count)
                writer.write(encode_example(f"{split}-{i}", encode_png(image), encode_png(mask)))
    total = sum(pixels.values())
    return {str(label): round(count / total, 4) for label, count in sorted(pixels.items())}


def transform(root: Path, make: Callable, counts: dict[str, int], seed: int) -> tuple[Path, Path, dict]:
    """Raw examples -> the real Transform at IMAGE_SIZE: (transformed examples, transform graph, fractions)."""
    from segpipe.components.core import artifacts
    from segpipe.components.transform import run_transform

    fractions = write_examples(root / "examples", make, counts, seed)
    schema = root / "schema"
    schema.mkdir()
    (schema / artifacts.SCHEMA_FILE).write_text(
        "".join(f'feature {{ name: "{key}" type: BYTES }}\n' for key in (artifacts.IMAGE_KEY, artifacts.MASK_KEY, artifacts.ID_KEY)))
    run_transform(str(root / "examples"), str(schema), str(root / "transformed"), str(root / "graph"),
                  image_size=IMAGE_SIZE, standardize=False, beam_args=["--runner=FnApiRunner"])
    return root / "transformed", root / "graph", fractions


# ---------------------------------------------------------------- training


def demo_configs() -> tuple[dict, dict]:
    """(model_config, train_config) of the demo profile, read once per benchmark run."""
    from segpipe.pipeline.config import load_config

    cfg = load_config(profile="demo")
    return dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.train)


def variant_configs(name: str, quick: bool, base: tuple[dict, dict]) -> tuple[dict, dict]:
    """(model_config, train_config) of a variant, from the demo profile's `base`."""
    model, train = dict(base[0]), dict(base[1])
    train["warm_start"] = False
    if name == "old":
        model["bn_momentum"] = 0.99
        train.update(lr_schedule="constant", monitor="val_loss", loss="bce", class_weights="none", min_steps=0,
                     bn_recalibration_batches=0)
    elif name == "new_12_epochs":
        train["min_steps"] = 0
    elif name == "new_class_weights":
        train["class_weights"] = "auto"
    elif name == "new_recalibrated":
        train["bn_recalibration_batches"] = 50
    if quick:
        train["epochs"] = 2
        train["min_steps"] = min(train["min_steps"], 12)
    return model, train


def train_and_score(data: Path, graph: Path, out: Path, num_classes: int, configs: tuple[dict, dict]) -> dict[str, Any]:
    """One training run; the exported model scored on eval in inference and in training mode."""
    import keras

    from segpipe.components import trainer
    from segpipe.components.core import artifacts

    model_config, train_config = configs
    started = time.monotonic()
    summary = trainer.train_model(
        str(data), str(graph), str(out / "model"), str(out / "model_run"), base_model_uri=None,
        backup_dir=str(out / "backup"), num_classes=num_classes, image_size=IMAGE_SIZE,
        model_config=model_config, train_config=train_config)
    seconds = time.monotonic() - started
    model = keras.saving.load_model(out / "model" / artifacts.KERAS_MODEL_FILE, compile=False)
    batches = trainer.make_dataset(artifacts.split_files(data, artifacts.EVAL), image_size=IMAGE_SIZE,
                                   batch_size=int(train_config["batch_size"]), training=False)
    inference = trainer.score(model, batches, num_classes)
    training = trainer.score(model, batches, num_classes, training=True)

    def rounded(values: dict) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else [None if x is None else round(x, 4) for x in v])
                for k, v in values.items()}

    return {
        "seconds": round(seconds, 1),
        "steps": summary["plan"]["steps_per_epoch"] * summary["epochs"],
        "planned_steps": summary["plan"]["steps"],
        "epochs": summary["epochs"],
        "best_epoch": summary["best_epoch"],
        "monitor": summary["monitor"],
        "bn_momentum": summary["bn_momentum"],
        "class_weights": summary["class_weights"],
        "inference": rounded(inference),
        "training_mode": rounded(training),
    }


# ---------------------------------------------------------------- the run


def wait_for_quiet(max_load: float, wait: float) -> float:
    """The 1-minute load average once it is below `max_load` (or after `wait` seconds)."""
    deadline = time.monotonic() + wait
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        log.info("load %.2f >= %.2f: waiting", os.getloadavg()[0], max_load)
        time.sleep(30)
    return os.getloadavg()[0]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"cpus": os.cpu_count(), "image_size": IMAGE_SIZE, "quick": args.quick,
                               "load_before": round(wait_for_quiet(args.max_load, args.wait), 2), "datasets": {}}
    base = demo_configs()
    started = time.monotonic()
    loads = []
    for index, (name, (make, num_classes)) in enumerate(DATASETS.items()):
        counts = {"train": 24, "eval": 8} if args.quick else {"train": 150, "eval": 50}
        data, graph, fractions = transform(workdir / name, make, counts, seed=index)
        entry = {"num_classes": num_classes, "counts": counts, "train_pixel_fractions": fractions, "variants": {}}
        for variant in VARIANTS:
            log.info("%s: training %s", name, variant)
            entry["variants"][variant] = train_and_score(data, graph, workdir / name / variant, num_classes,
                                                         variant_configs(variant, args.quick, base))
            loads.append(os.getloadavg()[0])
        results["datasets"][name] = entry
    results["seconds"] = round(time.monotonic() - started, 1)
    results["load_during"] = {"min": round(min(loads), 2), "max": round(max(loads), 2)}
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"eval split, exported model; {results['cpus']} CPUs, load {results['load_before']} before, "
          f"{results['load_during']['min']}-{results['load_during']['max']} during, {results['seconds']}s")
    header = f"{'dataset':<12}{'variant':<18}{'steps':>6}{'sec':>7}{'IoU inf':>9}{'IoU train':>10}" \
             f"{'acc inf':>9}{'acc train':>10}  per-class IoU (inference)"
    print(header)
    for name, entry in results["datasets"].items():
        for variant, r in entry["variants"].items():
            inf, tr = r["inference"], r["training_mode"]
            per_class = " ".join("-" if v is None else f"{v:.2f}" for v in inf["iou_per_class"])
            print(f"{name:<12}{variant:<18}{r['steps']:>6}{r['seconds']:>7}{inf['iou']:>9.3f}{tr['iou']:>10.3f}"
                  f"{inf['pixel_accuracy']:>9.3f}{tr['pixel_accuracy']:>10.3f}  {per_class}")


def write_json(results: dict[str, Any], path: Path) -> None:
    """Written next to its destination, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(results, indent=2) + "\n")
    temp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "convergence.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets; results are not written")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait until the 1-minute load is below this")
    parser.add_argument("--wait", type=float, default=1800.0, help="wait at most this many seconds for it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench_convergence_") as workdir:
        results = run(args, Path(workdir))
    print_table(results)
    if not args.quick:
        write_json(results, args.json)
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
