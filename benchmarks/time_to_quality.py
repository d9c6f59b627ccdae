"""Time to the quality target: segpipe's trainer against TFX's Trainer (tf_keras 2), on data unlike the demo.

Section 7 of bench_trainer.py. Issue 13 asks for segpipe's ratio to TFX's Trainer "in images/s and
in time to the quality target". Section 4 measures the images/s (the same step on the same input:
level); this one measures what the recipe adds. On each dataset, generated here and unlike the demo
in kind, the real Transform (64 px) feeds three trainings of one U-Net (the demo profile's: 16
filters, depth 3, batch norm, batch 16) from the same augmented tf.data input (trainer.fit_inputs):

- `segpipe`: components/trainer.train_model with segpipe's defaults (default.yaml + the demo
  profile, no warm start), every callback included (best checkpoint, backup, TensorBoard, CSV log);
- `tf_keras_segpipe_recipe`: the same U-Net in tf_keras (what TFX's Trainer runs) with segpipe's
  recipe copied: its loss function, Adam over its warm-up + cosine schedule of the same planned
  steps, its fitted BN momentum, early stopping on val IoU with the same patience. Only the
  framework differs, so this side's time is what segpipe's recipe costs under TFX;
- `tf_keras_stock`: a TFX run_fn with the Keras segmentation tutorial's recipe: Adam(1e-3) at a
  constant rate, binary cross-entropy, Keras's BN momentum 0.99, for up to STOCK_STEPS_FACTOR x
  segpipe's planned steps, no early stopping (a stock TFX Trainer has no plan to stop by).

Every side validates on the eval split after each epoch, compiled, as Keras does. The eval IoU of
each epoch is segpipe's foreground IoU (`val_iou`; for the tf_keras sides trainer.score, the same
definition, with the clock paused). Two quality targets, each TARGET_FRACTION of a best eval IoU:
- `any_side`: of the best that any side reached (the strict one: it may be above what segpipe's
  planned steps reach, when a side trained longer does better);
- `segpipe`: of the best segpipe's own run reached: the quality segpipe delivers, and the time
  each side takes to deliver it.
A side's time to a target is the training wall time from the start of fit to the end of the first
epoch at or above it (steps beside it: they do not depend on the machine's speed).
The sides run one after the other (too long to alternate), so their seconds carry the host's drift;
the load average is recorded around each.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convergence import IMAGE_SIZE, demo_configs, thin_curves, transform  # noqa: E402
from generated_datasets import few_grayscale_wide  # noqa: E402

log = logging.getLogger("time_to_quality")

TARGET_FRACTION = 0.95
STOCK_STEPS_FACTOR = 2
SIDES = ("segpipe", "tf_keras_segpipe_recipe", "tf_keras_stock")
# name -> (rng -> (image, mask)); both binary (one sigmoid channel on every side).
DATASETS: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "thin_curves": thin_curves,  # RGB 128x128, 2-3 px curves on texture (~5% of the pixels)
    "grayscale_96x160": lambda rng: few_grayscale_wide(rng, 0),  # non-square gray: a textured ellipse on a gradient
}
COUNTS, QUICK_COUNTS = {"train": 150, "eval": 50}, {"train": 24, "eval": 8}


# ---------------------------------------------------------------- the curve and its target


def epoch_clock(base: type, score: Callable[[], float] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> Any:
    """A Keras callback (`base`: Keras 3's or tf_keras's Callback class) whose `curve` gets, per
    epoch, the seconds since fit began and the eval IoU: `score()` run with the clock paused, or
    else the epoch's logged val_iou."""

    class EpochClock(base):
        def __init__(self) -> None:
            super().__init__()
            self.curve: list[dict[str, float]] = []
            self.started = self.paused = 0.0

        def on_train_begin(self, logs: Any = None) -> None:
            self.started, self.paused = clock(), 0.0

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            now = clock()
            iou = score() if score is not None else float((logs or {})["val_iou"])
            self.curve.append({"epoch": epoch + 1, "seconds": round(now - self.started - self.paused, 2),
                               "iou": round(float(iou), 4)})
            self.paused += clock() - now

    return EpochClock()


def quality_targets(curves: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """TARGET_FRACTION of the best eval IoU any side reached (`any_side`) and of segpipe's (`segpipe`)."""
    def best(*names: str) -> float:
        return max(row["iou"] for name in names for row in curves[name])

    return {"any_side": round(TARGET_FRACTION * best(*curves), 4), "segpipe": round(TARGET_FRACTION * best("segpipe"), 4)}


def reached(curve: list[dict[str, float]], target: float, steps_per_epoch: int) -> dict[str, float] | None:
    """The first epoch at or above `target`: {"epoch", "steps", "seconds"}; None when none is."""
    for row in curve:
        if row["iou"] >= target:
            return {"epoch": row["epoch"], "steps": row["epoch"] * steps_per_epoch, "seconds": row["seconds"]}
    return None


def time_ratio(segpipe: dict[str, Any], other: dict[str, Any], target: str) -> dict[str, Any]:
    """segpipe's seconds (and steps) to `target` over the other side's. A side that never reached
    it bounds the ratio by its whole run: segpipe / other < segpipe's time / other's total."""
    mine, theirs = segpipe["reached"][target], other["reached"][target]
    if mine and theirs:
        return {"seconds": round(mine["seconds"] / theirs["seconds"], 3), "steps": round(mine["steps"] / theirs["steps"], 3)}
    if mine:
        return {"seconds_below": round(mine["seconds"] / other["seconds"], 3), "steps_below": round(mine["steps"] / other["steps"], 3)}
    if theirs:
        return {"seconds_above": round(segpipe["seconds"] / theirs["seconds"], 3), "steps_above": round(segpipe["steps"] / theirs["steps"], 3)}
    return {}


# ---------------------------------------------------------------- the three sides


def tf_keras_loss(kind: str) -> Any:
    """segpipe's loss function (core/model.LOSSES) as a tf_keras loss: the same tensor function.

    A subclass of Loss, not a plain function: tf_keras wraps functions in a LossFunctionWrapper that
    squeezes the [B, S, S, 1] prediction to the mask's rank, which segpipe's loss does not expect."""
    import tf_keras

    from segpipe.components.core.model import LOSSES

    class SegpipeLoss(tf_keras.losses.Loss):
        def call(self, y_true: Any, y_pred: Any) -> Any:
            return LOSSES[kind](y_true, y_pred, None)

    return SegpipeLoss(name=kind)


def train_segpipe(data: Path, graph: Path, out: Path, configs: tuple[dict, dict]) -> tuple[dict, list[dict]]:
    """trainer.train_model as the pipeline calls it, an epoch clock appended to its callbacks."""
    from unittest import mock

    import keras

    from segpipe.components import trainer

    clock = epoch_clock(keras.callbacks.Callback)
    make_callbacks = trainer.make_callbacks
    with mock.patch.object(trainer, "make_callbacks", lambda *a, **k: [*make_callbacks(*a, **k), clock]):
        summary = trainer.train_model(
            str(data), str(graph), str(out / "model"), str(out / "model_run"), base_model_uri=None,
            backup_dir=str(out / "backup"), num_classes=2, image_size=IMAGE_SIZE,
            model_config=configs[0], train_config=configs[1])
    return summary, clock.curve


def train_tf_keras(data: Path, configs: tuple[dict, dict], plan: dict[str, int], *, stock: bool,
                   bn_momentum: float) -> list[dict]:
    """One tf_keras side on segpipe's input: segpipe's recipe (`stock` False) or the tutorial's."""
    import tensorflow as tf
    import tf_keras

    from bench_trainer import tf_keras_unet
    from segpipe.components import trainer
    from segpipe.components.core import artifacts

    model_config, train_config = configs
    files = {split: artifacts.split_files(data, split) for split in (artifacts.TRAIN, artifacts.EVAL)}
    train, evaluation, steps_per_epoch = trainer.fit_inputs(
        files, image_size=IMAGE_SIZE, batch_size=int(train_config["batch_size"]), train_config=train_config,
        num_records=plan["records"])
    tf_keras.utils.set_random_seed(int(train_config["seed"]))
    model = tf_keras_unet(IMAGE_SIZE, int(model_config["base_filters"]), int(model_config["depth"]),
                          bool(model_config["batch_norm"]), bn_momentum=0.99 if stock else bn_momentum)
    callbacks = [epoch_clock(tf_keras.callbacks.Callback, lambda: trainer.score(model, evaluation, 2)["iou"])]
    if stock:
        def as_float(images: Any, masks: Any) -> tuple[Any, Any]:  # tf_keras's BCE wants the prediction's shape
            return images, tf.cast(masks[..., None], tf.float32)

        rate, loss, epochs = 1e-3, tf_keras.losses.BinaryCrossentropy(), STOCK_STEPS_FACTOR * plan["epochs"]
        train, validation = train.map(as_float), evaluation.map(as_float)
    else:
        total, peak = plan["steps"], float(train_config["learning_rate"])
        warmup = int(round(total * float(train_config["warmup_fraction"])))  # trainer.learning_rate's schedule
        rate = tf_keras.optimizers.schedules.CosineDecay(0.0, max(1, total - warmup), warmup_target=peak,
                                                         warmup_steps=warmup)
        loss, epochs, validation = tf_keras_loss(str(train_config["loss"])), plan["epochs"], evaluation
        if plan["early_stopping_patience"] > 0:
            callbacks.insert(0, tf_keras.callbacks.EarlyStopping(monitor="val_iou", mode="max",
                                                                 patience=plan["early_stopping_patience"]))
    model.compile(optimizer=tf_keras.optimizers.Adam(rate), loss=loss,
                  metrics=[tf_keras.metrics.BinaryIoU(target_class_ids=[1], name="iou")])
    model.fit(train, steps_per_epoch=steps_per_epoch, epochs=epochs, validation_data=validation,
              callbacks=callbacks, verbose=0)
    return callbacks[-1].curve


def segpipe_configs(quick: bool) -> tuple[dict, dict]:
    """segpipe's defaults for this model: default.yaml + the demo profile, no warm start."""
    model_config, train_config = demo_configs()
    train_config = {**train_config, "warm_start": False}
    if quick:
        train_config.update(epochs=2, min_steps=0)
    return model_config, train_config


# ---------------------------------------------------------------- the run


def load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_dataset(name: str, workdir: Path, quick: bool, seed: int) -> dict[str, Any]:
    """The three sides on one dataset: curves, target, each side's time to it, the ratios."""
    data, graph, fractions = transform(workdir / name, DATASETS[name], QUICK_COUNTS if quick else COUNTS, seed)
    configs = segpipe_configs(quick)
    sides: dict[str, dict[str, Any]] = {}
    before = load()
    summary, curve = train_segpipe(data, graph, workdir / name / "segpipe", configs)
    plan = summary["plan"]
    sides["segpipe"] = {"curve": curve, "load": [before, load()]}
    for side, stock in (("tf_keras_segpipe_recipe", False), ("tf_keras_stock", True)):
        log.info("%s: training %s", name, side)
        before = load()
        sides[side] = {"curve": train_tf_keras(data, configs, plan, stock=stock, bn_momentum=summary["bn_momentum"]),
                       "load": [before, load()]}
    targets = quality_targets({side: row["curve"] for side, row in sides.items()})
    for row in sides.values():
        last = row["curve"][-1]
        steps = last["epoch"] * plan["steps_per_epoch"]
        row.update(epochs=last["epoch"], steps=steps, seconds=last["seconds"],
                   best_iou=max(r["iou"] for r in row["curve"]), seconds_per_step=round(last["seconds"] / steps, 4),
                   reached={name: reached(row["curve"], target, plan["steps_per_epoch"])
                            for name, target in targets.items()})
    return {"train_pixel_fractions": fractions, "plan": plan, "bn_momentum": summary["bn_momentum"],
            "loss": configs[1]["loss"], "target_iou": targets, "sides": sides,
            "ratios": {name: {side: time_ratio(sides["segpipe"], sides[side], name) for side in SIDES[1:]}
                       for name in targets}}


def warm_up() -> None:
    """One step of a tiny model in Keras 3 and in tf_keras: what a process pays once per framework
    (the first graph, kernel and allocator set-up) is then in no side's time."""
    import keras
    import tf_keras

    from bench_trainer import tf_keras_unet
    from segpipe.components.core.model import build_unet

    images, masks = np.zeros((2, 16, 16, 3), np.float32), np.zeros((2, 16, 16, 1), np.float32)
    for model in (build_unet((16, 16, 3), 1, base_filters=2, depth=1, batch_norm=True),
                  tf_keras_unet(16, 2, 1, True)):
        optimizer = (keras if isinstance(model, keras.Model) else tf_keras).optimizers.Adam()
        model.compile(optimizer=optimizer, loss="binary_crossentropy")
        model.fit(images, masks, epochs=1, verbose=0)


def bench_time_to_quality(workdir: Path, quick: bool, datasets: list[str] | None = None) -> dict[str, Any]:
    model_config, _ = segpipe_configs(quick)
    warm_up()
    return {"image_size": IMAGE_SIZE, "counts": QUICK_COUNTS if quick else COUNTS, "target_fraction": TARGET_FRACTION,
            "stock_steps_factor": STOCK_STEPS_FACTOR,
            "model": f"base_filters {model_config['base_filters']}, depth {model_config['depth']}, "
                     f"batch_norm {model_config['batch_norm']}",
            "datasets": {name: bench_dataset(name, workdir, quick, seed)
                         for seed, name in enumerate(datasets or DATASETS)}}


def ratio_text(ratio: dict[str, Any], unit: str) -> str:
    if unit in ratio:
        return f"{ratio[unit]}"
    if f"{unit}_below" in ratio:
        return f"< {ratio[f'{unit}_below']}"
    return f"> {ratio[f'{unit}_above']}" if f"{unit}_above" in ratio else "-"


def print_time_to_quality(results: dict[str, Any]) -> None:
    print(f"time to the quality target ({results['model']}, {results['image_size']} px, "
          f"{results['counts']['train']} train / {results['counts']['eval']} eval images; targets "
          f"{results['target_fraction']:.0%} of the best eval IoU of any side / of segpipe's)")
    print(f"{'  dataset / side':<36}{'steps':>6}{'s':>8}{'s/step':>8}{'best IoU':>9}"
          f"{'to target: steps':>17}{'s':>8}{'ratio s':>9}{'steps':>9}")
    for name, d in results["datasets"].items():
        print(f"  {name} (segpipe: loss {d['loss']}, {d['plan']['steps']} planned steps, BN momentum {d['bn_momentum']})")
        for target, iou in d["target_iou"].items():
            print(f"    target {target}: IoU {iou}")
            for side, row in d["sides"].items():
                hit, ratio = row["reached"][target], d["ratios"][target].get(side)
                print(f"{'      ' + side:<36}{row['steps']:>6}{row['seconds']:>8}{row['seconds_per_step']:>8}"
                      f"{row['best_iou']:>9}{hit['steps'] if hit else 'never':>17}{hit['seconds'] if hit else '-':>8}"
                      f"{ratio_text(ratio, 'seconds') if ratio is not None else '':>9}"
                      f"{ratio_text(ratio, 'steps') if ratio is not None else '':>9}")
    print("  ratio = segpipe's time (steps) to the target / that side's; '<' when that side never reached it "
          "(its whole run bounds the ratio), '>' when segpipe did not")
