"""Evaluator: the gate's rules, exact metrics through the served signature on Beam, CLI evaluate."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segpipe.components.core import artifacts, metrics as seg_metrics
from segpipe.components.core.errors import BadInputError
from segpipe.components.evaluator import decide_blessing, evaluate_model, gate_checks
from segpipe.pipeline import cli

GATE = {"pixel_accuracy_threshold": 0.9, "min_foreground_iou": 0.5, "max_regression": 0.01}
BEAM_ARGS = ["--runner=FnApiRunner"]


def test_gate_lists_every_check_passed_or_not() -> None:
    metrics = {"pixel_accuracy": 0.95, "foreground_iou": 0.52}
    checks = gate_checks(metrics, {"pixel_accuracy": 0.955, "foreground_iou": 0.6}, **GATE)
    assert [(c["metric"], c["passed"]) for c in checks] == [
        ("pixel_accuracy", True), ("foreground_iou", True), ("pixel_accuracy", True), ("foreground_iou", False),
    ]
    assert checks[0]["bound"] == 0.9 and checks[0]["reason"] == ""
    assert checks[3]["bound"] == pytest.approx(0.59) and "below the baseline" in checks[3]["reason"]
    assert len(gate_checks(metrics, None, **GATE)) == 2  # no baseline: no regression checks


def test_threshold_equal_passes_just_below_fails() -> None:
    assert decide_blessing({"pixel_accuracy": 0.9, "foreground_iou": 0.5}, None, **GATE) == (True, [])
    blessed, reasons = decide_blessing({"pixel_accuracy": 0.812, "foreground_iou": 0.5}, None, **GATE)
    assert not blessed and reasons == ["pixel accuracy 0.812 < threshold 0.900"]
    below = np.nextafter(0.9, 0.0)
    blessed, reasons = decide_blessing({"pixel_accuracy": below, "foreground_iou": 0.7}, None, **GATE)
    assert not blessed and reasons == ["pixel accuracy 0.8999999999999999 < threshold 0.9"]
    blessed, reasons = decide_blessing({"pixel_accuracy": 0.8996, "foreground_iou": 0.7}, None, **GATE)
    assert reasons == ["pixel accuracy 0.899600 < threshold 0.900000"]  # never "0.900 < 0.900"
    blessed, reasons = decide_blessing({"pixel_accuracy": 0.95, "foreground_iou": 0.49}, None, **GATE)
    assert reasons == ["foreground IoU 0.490 < minimum 0.500"]


def test_undefined_foreground_iou_is_not_blessed() -> None:
    blessed, reasons = decide_blessing({"pixel_accuracy": 1.0, "foreground_iou": None}, None, **GATE)
    assert not blessed and reasons[0].startswith("foreground IoU is undefined")


def test_baseline_regression_rule() -> None:
    base = {"pixel_accuracy": 0.95, "foreground_iou": 0.80}
    at_limit = {"pixel_accuracy": 0.94, "foreground_iou": 0.79}  # exactly max_regression worse: passes
    assert decide_blessing(at_limit, base, **GATE) == (True, [])
    better = {"pixel_accuracy": 0.99, "foreground_iou": 0.9}
    assert decide_blessing(better, base, **GATE) == (True, [])
    worse = {"pixel_accuracy": 0.935, "foreground_iou": 0.70}
    blessed, reasons = decide_blessing(worse, base, **GATE)
    assert not blessed
    assert reasons == [
        "pixel accuracy 0.935 is 0.015 below the baseline's 0.950 (max regression 0.010)",
        "foreground IoU 0.700 is 0.100 below the baseline's 0.800 (max regression 0.010)",
    ]


def write_test_split(span_folder: Path, examples_uri: Path) -> dict[str, tuple[bytes, bytes]]:
    """Copy a raw span into `Split-test/` in two shards, masks with a 255 (ignore) top row."""
    import tensorflow as tf

    from segpipe.components.core.data_format import decode_image, encode_example, encode_png, parse_example

    files = sorted(str(p) for p in span_folder.glob("*.tfrecord*"))
    written = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example_id, image, mask_bytes = parse_example(record.numpy())
        mask = decode_image(mask_bytes).copy()
        mask[0, :] = artifacts.IGNORE_LABEL
        written[example_id] = (image, encode_png(mask))
    folder = artifacts.split_dir(examples_uri, artifacts.TEST)
    folder.mkdir(parents=True)
    ids = sorted(written)
    for shard in range(2):
        path = folder / f"data-{shard:05d}-of-00002.tfrecord.gz"
        with tf.io.TFRecordWriter(str(path), "GZIP") as writer:
            for example_id in ids[shard::2]:
                writer.write(encode_example(example_id, *written[example_id]))
    return written


def expected_confusion(model_dir: Path, written: dict[str, tuple[bytes, bytes]]) -> tuple[np.ndarray, dict[str, float]]:
    """Reference: the signature called directly, masks resized with PIL nearest, counts summed."""
    from PIL import Image

    from segpipe.components.core import serving
    from segpipe.components.core.data_format import decode_image

    loaded = serving.load_serving_model(model_dir / artifacts.SAVED_MODEL_DIR)
    ids = sorted(written)
    masks = serving.predict_bytes(loaded, [written[i][0] for i in ids])[serving.CLASS_MASK]
    total = np.zeros((2, 2), np.int64)
    per_example = {}
    for example_id, pred in zip(ids, masks):
        truth = np.asarray(Image.fromarray(decode_image(written[example_id][1])).resize((32, 32), Image.NEAREST))
        cm = seg_metrics.confusion_matrix(truth, pred, 2)
        per_example[example_id] = seg_metrics.example_iou(cm)
        total += cm
    return total, per_example


@pytest.fixture
def test_split(tmp_path: Path, write_tiny_span) -> tuple[Path, dict]:
    span = write_tiny_span(tmp_path / "data", 0, num=12, size=(40, 48))
    examples_uri = tmp_path / "examples"
    return examples_uri, write_test_split(span, examples_uri)


def run_evaluator(tmp_path: Path, model: Path, examples_uri: Path, baseline: Path | None = None, **gate) -> dict:
    return evaluate_model(
        str(model), str(examples_uri), str(tmp_path / "evaluation"), str(tmp_path / "blessing"),
        baseline_model_uri=str(baseline) if baseline else None, num_classes=2,
        **{**GATE, **gate}, num_worst_examples=3, beam_args=BEAM_ARGS,
    )


def test_metrics_are_exact_over_all_test_pixels(tmp_path: Path, rule_models: dict, test_split: tuple) -> None:
    examples_uri, written = test_split
    result = run_evaluator(tmp_path, rule_models["bright"], examples_uri)
    cm, per_example = expected_confusion(rule_models["bright"], written)
    metrics = json.loads((tmp_path / "evaluation" / artifacts.EVALUATION_FILE).read_text())
    assert metrics["confusion_matrix"] == cm.tolist()
    assert metrics["num_examples"] == 12 and metrics["image_size"] == 32
    assert metrics["num_pixels"] == 12 * 32 * 31  # the ignored top row is excluded
    assert metrics["pixel_accuracy"] == pytest.approx(seg_metrics.pixel_accuracy(cm), abs=0)
    assert metrics["all_background_accuracy"] == pytest.approx(seg_metrics.all_background_accuracy(cm), abs=0)
    assert metrics["foreground_iou"] == pytest.approx(seg_metrics.foreground_iou(cm), abs=0)
    assert metrics["pixel_accuracy"] > 0.95 > metrics["all_background_accuracy"]  # the rule model is good
    worst = sorted(per_example.items(), key=lambda kv: (kv[1], kv[0]))[:3]
    assert [(e["id"], e["iou"]) for e in metrics["worst_examples"]] == [(i, pytest.approx(v)) for i, v in worst]
    lines = (tmp_path / "evaluation" / "per_example_iou.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(written)
    assert (tmp_path / "evaluation" / metrics["grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blessing = json.loads((tmp_path / "blessing" / artifacts.BLESSING_FILE).read_text())
    assert blessing["blessed"] is True and blessing["reasons"] == [] and result["blessed"] is True
    assert [c["passed"] for c in blessing["checks"]] == [True, True]  # every check recorded, not only failures
    assert artifacts.read_info(tmp_path / "blessing").type == artifacts.MODEL_BLESSING
    assert artifacts.read_info(tmp_path / "evaluation").type == artifacts.MODEL_EVALUATION


def test_cli_evaluate_regression_against_baseline_is_not_blessed(
    tmp_path: Path, rule_models: dict, test_split: tuple, capsys: pytest.CaptureFixture
) -> None:
    examples_uri, written = test_split
    serving = tmp_path / "serving"  # --model as a serving dir means its highest version
    shutil.copytree(rule_models["background"] / artifacts.SAVED_MODEL_DIR, serving / "4")
    (serving / "4" / "segpipe.json").write_text("{}")  # what makes it a pushed version
    pattern = str(artifacts.split_dir(examples_uri, artifacts.TEST) / "*.tfrecord.gz")
    out = tmp_path / "cli"
    argv = ["evaluate", "--model", str(serving), "--data", pattern, "--baseline", str(rule_models["bright"]),
            "--out", str(out), "--root", str(tmp_path), "--set", "evaluation.pixel_accuracy_threshold=0.0",
            "--set", "evaluation.min_foreground_iou=0.0", "--set", "data.num_classes=2"]
    assert cli.main(argv) == 3
    assert "NOT blessed" in capsys.readouterr().out
    metrics = json.loads((out / "evaluation" / artifacts.EVALUATION_FILE).read_text())
    assert metrics["model"] == str(serving / "4")
    # Predicting background everywhere scores exactly the all-background accuracy, foreground IoU 0.
    assert metrics["pixel_accuracy"] == metrics["all_background_accuracy"]
    assert metrics["foreground_iou"] == 0.0
    cm, _ = expected_confusion(rule_models["bright"], written)
    assert metrics["baseline"]["confusion_matrix"] == cm.tolist()  # baseline evaluated on the same pixels
    blessing = json.loads((out / "blessing" / artifacts.BLESSING_FILE).read_text())
    assert blessing["blessed"] is False
    assert [r.split(" is ")[0] for r in blessing["reasons"]] == [
        f"pixel accuracy {metrics['pixel_accuracy']:.3f}", "foreground IoU 0.000"]
    assert all("below the baseline's" in r for r in blessing["reasons"])


def test_missing_test_split_is_bad_input(tmp_path: Path, rule_models: dict) -> None:
    (tmp_path / "examples").mkdir()
    with pytest.raises(BadInputError, match="Split-test: no test shards"):
        run_evaluator(tmp_path, rule_models["bright"], tmp_path / "examples")
    assert not (tmp_path / "evaluation").exists() and not (tmp_path / "blessing").exists()


def test_bad_mask_label_names_the_example_and_publishes_nothing(tmp_path: Path, rule_models: dict) -> None:
    import tensorflow as tf

    from segpipe.components.core.data_format import encode_example, encode_png

    folder = artifacts.split_dir(tmp_path / "examples", artifacts.TEST)
    folder.mkdir(parents=True)
    mask = np.zeros((32, 32), np.uint8)
    mask[3, 3] = 7
    with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
        writer.write(encode_example("bad-1", encode_png(np.zeros((32, 32, 3), np.uint8)), encode_png(mask)))
    with pytest.raises(BadInputError, match="test example bad-1: true mask has label 7 outside 0..1"):
        run_evaluator(tmp_path, rule_models["bright"], tmp_path / "examples")
    assert not (tmp_path / "evaluation").exists() and not (tmp_path / "blessing").exists()


def test_model_class_count_must_match_the_data(tmp_path: Path, rule_models: dict, test_split: tuple) -> None:
    examples_uri, _ = test_split
    with pytest.raises(BadInputError, match="predicts 2 classes, the data has 3"):
        evaluate_model(
            str(rule_models["bright"]), str(examples_uri), str(tmp_path / "evaluation"), str(tmp_path / "blessing"),
            baseline_model_uri=None, num_classes=3, **GATE, num_worst_examples=3, beam_args=BEAM_ARGS,
        )
