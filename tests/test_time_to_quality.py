"""The time-to-quality measurement of benchmarks/bench_trainer.py (section 7, benchmarks/time_to_quality.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def ttq():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("time_to_quality_under_test", BENCHMARKS / "time_to_quality.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def curve(*ious: float, seconds_per_epoch: float = 2.0) -> list[dict[str, float]]:
    return [{"epoch": i + 1, "seconds": seconds_per_epoch * (i + 1), "iou": iou} for i, iou in enumerate(ious)]


def test_targets_are_a_fraction_of_the_best_iou_of_any_side_and_of_segpipes_and_each_side_reaches_them_at_its_first_epoch_above(ttq):
    curves = {"segpipe": curve(0.2, 0.6, 0.7, 0.69), "other": curve(0.1, 0.3, 0.5, 0.7, 0.8, seconds_per_epoch=1.5)}
    targets = ttq.quality_targets(curves)
    assert targets == {"any_side": pytest.approx(ttq.TARGET_FRACTION * 0.8), "segpipe": pytest.approx(ttq.TARGET_FRACTION * 0.7)}
    assert ttq.reached(curves["segpipe"], targets["segpipe"], steps_per_epoch=10) == {"epoch": 3, "steps": 30, "seconds": 6.0}
    assert ttq.reached(curves["other"], targets["segpipe"], steps_per_epoch=10) == {"epoch": 4, "steps": 40, "seconds": 6.0}
    assert ttq.reached(curves["segpipe"], targets["any_side"], steps_per_epoch=10) is None


def test_ratio_is_bounded_by_the_whole_run_of_a_side_that_never_reached_the_target(ttq):
    segpipe = {"reached": {"t": {"steps": 30, "seconds": 6.0}}, "steps": 50, "seconds": 10.0}
    slower = {"reached": {"t": {"steps": 60, "seconds": 15.0}}, "steps": 100, "seconds": 25.0}
    never = {"reached": {"t": None}, "steps": 100, "seconds": 20.0}
    assert ttq.time_ratio(segpipe, slower, "t") == {"seconds": 0.4, "steps": 0.5}
    assert ttq.time_ratio(segpipe, never, "t") == {"seconds_below": 0.3, "steps_below": 0.3}
    assert ttq.time_ratio({**segpipe, "reached": {"t": None}}, slower, "t") == {"seconds_above": 0.667, "steps_above": 0.833}
    assert ttq.ratio_text(ttq.time_ratio(segpipe, never, "t"), "seconds") == "< 0.3"


def test_epoch_clock_leaves_the_scoring_time_out_of_the_training_time(ttq):
    import keras

    now = [100.0]

    def score() -> float:  # scoring takes 10 s of the fake clock
        now[0] += 10.0
        return 0.5

    callback = ttq.epoch_clock(keras.callbacks.Callback, score, clock=lambda: now[0])
    callback.on_train_begin()
    for _ in range(3):
        now[0] += 2.0  # an epoch of training and validation
        callback.on_epoch_end(len(callback.curve))
    assert [row["seconds"] for row in callback.curve] == [2.0, 4.0, 6.0]
    assert [row["iou"] for row in callback.curve] == [0.5, 0.5, 0.5]
    logged = ttq.epoch_clock(keras.callbacks.Callback, clock=lambda: now[0])
    logged.on_train_begin()
    logged.on_epoch_end(0, {"val_iou": 0.25})
    assert logged.curve == [{"epoch": 1, "seconds": 0.0, "iou": 0.25}]


@pytest.mark.parametrize("kind", ["bce", "dice_bce"])
def test_tf_keras_side_trains_on_segpipes_own_loss(ttq, kind):
    import tensorflow as tf

    from segpipe.components.core.model import get_loss

    rng = np.random.default_rng(3)
    masks = tf.constant(rng.integers(0, 2, (2, 8, 8)), tf.int64)
    probs = tf.constant(rng.uniform(0.05, 0.95, (2, 8, 8, 1)), tf.float32)
    assert float(ttq.tf_keras_loss(kind)(masks, probs)) == pytest.approx(float(get_loss(kind)(masks, probs)), rel=1e-6)
