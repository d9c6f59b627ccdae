"""Evaluator: the gate's rules, hints, exact native and model-resolution metrics through the served
signature on Beam, CLI evaluate."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segpipe.components.core import artifacts, metrics as seg_metrics
from segpipe.components.core.errors import BadInputError
from segpipe.components.core.serving import SERVING_INFO_FILE, class_mask_at_size
from segpipe.components.evaluator import decide_blessing, evaluate_model, gate_checks, refusal_hints
from segpipe.pipeline import cli

GATE = {"pixel_accuracy_threshold": 0.9, "min_foreground_iou": 0.5, "min_class_iou": 0.3, "max_regression": 0.01}
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


THREE_CLASSES = [[50, 2, 0], [4, 30, 0], [6, 1, 0]]  # rows true, columns predicted: class 2 never predicted


def three_class_metrics(names: list) -> dict:
    return {"pixel_accuracy": 0.86, "foreground_iou": 0.4, "class_names": names,
            **{k: v for k, v in seg_metrics.summarize(np.array(THREE_CLASSES)).items()
               if k in ("iou_per_class", "confusion_matrix", "mean_iou")}}


def test_min_class_iou_checks_every_foreground_class_and_names_a_class_never_predicted() -> None:
    gate = {**GATE, "pixel_accuracy_threshold": 0.0, "min_foreground_iou": 0.0}
    checks = gate_checks(three_class_metrics(["background", "cell", "tumour"]), None, **gate)
    per_class = [c for c in checks if c["metric"] == "iou_per_class"]
    assert [(c["class"], c["name"], c["passed"]) for c in per_class] == [
        (1, "class 1 'cell' IoU >= minimum", True), (2, "class 2 'tumour' IoU >= minimum", False)]
    assert per_class[0]["value"] == pytest.approx(30 / 37) and per_class[1]["value"] == 0.0
    assert decide_blessing(three_class_metrics([None, None, None]), None, **gate) == (
        False, ["class 2 is never predicted"])  # no labels.json: the id alone
    low = three_class_metrics(["background", "cell", "tumour"])
    low["iou_per_class"] = [0.9, 0.29, 0.5]
    low["confusion_matrix"] = [[50, 2, 0], [4, 30, 0], [6, 1, 3]]
    assert decide_blessing(low, None, **gate) == (False, ["class 1 'cell' IoU 0.290 < minimum 0.300"])
    low["iou_per_class"] = [0.9, 0.3, 0.5]
    assert decide_blessing(low, None, **gate) == (True, [])  # equal passes
    absent = {**low, "iou_per_class": [0.9, 0.5, None], "confusion_matrix": [[50, 2, 0], [4, 30, 0], [0, 0, 0]]}
    checks = gate_checks(absent, None, **gate)
    assert checks[-1]["name"] == "class 2 'tumour' IoU >= minimum (not in the test split)" and checks[-1]["passed"]
    assert len(gate_checks(absent, None, **{**gate, "min_class_iou": None})) == 2  # a gate without the rule


def test_native_mask_resizes_probabilities_bilinearly_then_takes_the_class() -> None:
    # 2 x 2 -> 4 x 4. PIL's bilinear weights at output (1, 3): rows 0.75 / 0.25, the last column alone,
    # so p = 0.75 * 0.6 + 0.25 * 0.0 = 0.45: background, where nearest of the class mask says foreground.
    probabilities = np.array([[0.9, 0.6], [0.6, 0.0]], np.float32)[..., None]
    assert class_mask_at_size(probabilities, 4, 4).tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert class_mask_at_size(probabilities, 2, 2).tolist() == [[1, 1], [1, 0]]  # own size: the class rule only
    assert class_mask_at_size(probabilities, 1, 1).tolist() == [[1]]  # shrinking averages: p = 0.525
    # Softmax: class 1 wins where 0.7 p > 1 - p, i.e. p > 0.588 (row 1: 0.825 0.731 0.544 0.45).
    softmax = np.concatenate([1 - probabilities, 0.7 * probabilities, 0.3 * probabilities], axis=-1)
    assert class_mask_at_size(softmax, 4, 4).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]


def history(values: list[float], monitor: str = "val_iou") -> list[dict]:
    return [{"epoch": i, "loss": 1.0, monitor: v} for i, v in enumerate(values)]


def test_refusal_hints_name_the_weakest_class_under_training_and_resolution() -> None:
    metrics = three_class_metrics(["background", "cell", "tumour"])
    metrics.update(image_size=32, model_resolution={"mean_iou": metrics["mean_iou"] + 0.06})
    hints = refusal_hints(metrics, history([0.2, 0.3, 0.35]), {"monitor": "val_iou", "loss": "bce", "class_weights": "none"})
    assert hints == [
        "weakest class: class 2 'tumour' has IoU 0.000 on 7 test pixels (7.5% of the labelled pixels) and is never "
        "predicted: add training examples that show it; train.loss=dice_bce weighs every class's overlap equally, "
        "where bce weighs pixels",
        "training was still improving when it stopped: val_iou 0.3000 -> 0.3500 in the last of 3 epochs, the best so "
        "far: train longer (e.g. train.epochs=6)",
        f"resolution: mean IoU at each mask's own size is {metrics['mean_iou']:.3f}, 0.060 below the "
        f"{metrics['mean_iou'] + 0.06:.3f} at the model's 32 x 32 input, so detail is lost in the resize: try a larger "
        "transform.image_size (e.g. 64)",
    ]
    # Not when training had stopped improving, a loss that rose, a gap within RESOLUTION_GAP, or class weights on.
    metrics["model_resolution"]["mean_iou"] = metrics["mean_iou"] + 0.04
    assert refusal_hints(metrics, history([0.2, 0.35, 0.3]), {"monitor": "val_iou", "class_weights": "auto"}) == [
        hints[0].split(";")[0]]
    assert refusal_hints(metrics, history([0.5, 0.6], "val_loss"), {"monitor": "val_loss"}) == [hints[0].split(";")[0]]
    assert "val_loss 0.6000 -> 0.5000" in refusal_hints(metrics, history([0.6, 0.5], "val_loss"), {})[1]
    assert refusal_hints(metrics, history([0.2]), {}) == [hints[0].split(";")[0]]  # one epoch shows no trend


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


def expected_confusion(model_dir: Path, written: dict[str, tuple[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reference: the signature called directly; native = probabilities at the mask's size against the
    mask, model size = class_mask against the mask resized with PIL nearest; counts summed."""
    from PIL import Image

    from segpipe.components.core import serving
    from segpipe.components.core.data_format import decode_image

    loaded = serving.load_serving_model(model_dir / artifacts.SAVED_MODEL_DIR)
    ids = sorted(written)
    outputs = serving.predict_bytes(loaded, [written[i][0] for i in ids])
    native, small = np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64)
    per_example = {}
    for example_id, probs, pred in zip(ids, outputs[serving.PROBABILITIES], outputs[serving.CLASS_MASK]):
        mask = decode_image(written[example_id][1])
        cm = seg_metrics.confusion_matrix(mask, class_mask_at_size(probs, *mask.shape), 2)
        per_example[example_id] = seg_metrics.example_iou(cm)
        native += cm
        truth = np.asarray(Image.fromarray(mask).resize((32, 32), Image.NEAREST))
        small += seg_metrics.confusion_matrix(truth, pred, 2)
    return native, small, per_example


@pytest.fixture
def test_split(tmp_path: Path, write_tiny_span) -> tuple[Path, dict]:
    span = write_tiny_span(tmp_path / "data", 0, num=12, size=(40, 48))
    examples_uri = tmp_path / "examples"
    return examples_uri, write_test_split(span, examples_uri)


def run_evaluator(tmp_path: Path, model: Path, examples_uri: Path, baseline: Path | None = None,
                  model_run: Path | None = None, num_classes: int = 2, **gate) -> dict:
    return evaluate_model(
        str(model), str(examples_uri), str(tmp_path / "evaluation"), str(tmp_path / "blessing"),
        baseline_model_uri=str(baseline) if baseline else None, model_run_uri=str(model_run) if model_run else None,
        num_classes=num_classes, **{**GATE, "tflite_variants": [], "max_tflite_drop": 0.02, **gate},
        num_worst_examples=3, beam_args=BEAM_ARGS,
    )


def read_outputs(tmp_path: Path) -> tuple[dict, dict]:
    evaluation = json.loads((tmp_path / "evaluation" / artifacts.EVALUATION_FILE).read_text())
    return evaluation, json.loads((tmp_path / "blessing" / artifacts.BLESSING_FILE).read_text())


def test_metrics_are_exact_over_all_test_pixels(tmp_path: Path, rule_models: dict, test_split: tuple) -> None:
    examples_uri, written = test_split
    result = run_evaluator(tmp_path, rule_models["bright"], examples_uri)
    native, small, per_example = expected_confusion(rule_models["bright"], written)
    metrics, blessing = read_outputs(tmp_path)
    assert metrics["confusion_matrix"] == native.tolist()
    assert metrics["model_resolution"]["confusion_matrix"] == small.tolist()
    assert metrics["num_examples"] == 12 and metrics["image_size"] == 32
    assert metrics["num_pixels"] == 12 * 39 * 48  # each mask at its own size, the ignored top row excluded
    assert metrics["model_resolution"]["num_pixels"] == 12 * 32 * 31
    assert metrics["pixel_accuracy"] == pytest.approx(seg_metrics.pixel_accuracy(native), abs=0)
    assert metrics["all_background_accuracy"] == pytest.approx(seg_metrics.all_background_accuracy(native), abs=0)
    assert metrics["foreground_iou"] == pytest.approx(seg_metrics.foreground_iou(native), abs=0)
    assert metrics["model_resolution"]["foreground_iou"] == pytest.approx(seg_metrics.foreground_iou(small), abs=0)
    assert metrics["pixel_accuracy"] > 0.95 > metrics["all_background_accuracy"]  # the rule model is good
    worst = sorted(per_example.items(), key=lambda kv: (kv[1], kv[0]))[:3]
    assert [(e["id"], e["iou"]) for e in metrics["worst_examples"]] == [(i, pytest.approx(v)) for i, v in worst]
    lines = (tmp_path / "evaluation" / "per_example_iou.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(written)
    assert (tmp_path / "evaluation" / metrics["grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert blessing["blessed"] is True and blessing["reasons"] == [] and result["blessed"] is True
    assert blessing["hints"] == [] and result["hints"] == []  # hints are for refused models
    assert [c["passed"] for c in blessing["checks"]] == [True, True, True]  # every check recorded, not only failures
    assert metrics["class_names"] == [None, None]  # no Examples metadata: labels.json is not found
    assert artifacts.read_info(tmp_path / "blessing").type == artifacts.MODEL_BLESSING
    assert artifacts.read_info(tmp_path / "evaluation").type == artifacts.MODEL_EVALUATION


def write_records(folder: Path, examples: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    import tensorflow as tf

    from segpipe.components.core.data_format import encode_example, encode_png

    folder.mkdir(parents=True)
    path = folder / "data-00000-of-00001.tfrecord.gz"
    with tf.io.TFRecordWriter(str(path), "GZIP") as writer:
        for example_id, (image, mask) in sorted(examples.items()):
            writer.write(encode_example(example_id, encode_png(image), encode_png(mask)))
    return path


def write_model_run(uri: Path, val_iou: list[float]) -> Path:
    """A ModelRun as the trainer publishes it: history.csv and the train settings it ran with."""
    lines = ["epoch,loss,val_iou,val_loss"] + [f"{i},{1 - v},{v},{1 - v}" for i, v in enumerate(val_iou)]
    train_config = {"monitor": "val_iou", "loss": "bce", "class_weights": "none"}
    with artifacts.publish(uri, artifacts.MODEL_RUN, producer="Trainer", parameters={"train_config": train_config}) as (tmp, _):
        (tmp / "history.csv").write_text("\n".join(lines) + "\n")
    return uri


def test_native_metrics_count_the_detail_the_resize_loses(tmp_path: Path, rule_models: dict) -> None:
    """One 64 x 64 example for the 32 px "bright" rule model, every count worked out by hand.

    Image: a bright square, rows and columns 16..47 (aligned to the 2 x 2 blocks the resize averages),
    dark elsewhere. Mask: the square (1024 px), thin 1-px lines of foreground on the even rows 2, 4, 6
    (192 px, dark: the model cannot see them), and 255 on rows 56..58 (192 px).
    Model size: PIL nearest keeps the odd rows 2j + 1, so the lines vanish and only row 57 is
    ignored: the square is rows 8..23 (256 px) of 992 labelled pixels, predicted exactly.
    Native: the probabilities resized back put the border between model pixels 7 and 8 at native
    15 / 16 (p = 0.25 / 0.75), so the prediction is the square; the lines are all missed.
    """
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1
    mask[[2, 4, 6], :] = 1
    mask[56:59, :] = artifacts.IGNORE_LABEL
    examples_uri = tmp_path / "examples"
    write_records(artifacts.split_dir(examples_uri, artifacts.TEST), {"thin-0": (image, mask)})
    model_run = write_model_run(tmp_path / "model_run", [0.5, 0.6, 0.7])
    result = run_evaluator(tmp_path, rule_models["bright"], examples_uri, model_run=model_run,
                           pixel_accuracy_threshold=0.99)
    metrics, blessing = read_outputs(tmp_path)
    assert metrics["confusion_matrix"] == [[4096 - 192 - 1216, 0], [192, 1024]]
    assert metrics["num_pixels"] == 4096 - 192
    assert metrics["model_resolution"]["confusion_matrix"] == [[992 - 256, 0], [0, 256]]
    assert metrics["model_resolution"]["pixel_accuracy"] == 1.0 and metrics["model_resolution"]["mean_iou"] == 1.0
    assert metrics["iou_per_class"] == pytest.approx([2688 / 2880, 1024 / 1216])
    assert metrics["worst_examples"] == [{"id": "thin-0", "iou": pytest.approx(1024 / 1216)}]
    # The gate reads the native numbers: 3712 / 3904 = 0.951 fails 0.99 (at 32 px it would pass).
    assert blessing["blessed"] is False and blessing["reasons"] == ["pixel accuracy 0.951 < threshold 0.990"]
    assert blessing["hints"] == result["hints"] == metrics["hints"]
    weakest, training, resolution = blessing["hints"]
    assert weakest.startswith("weakest class: class 1 has IoU 0.842 on 1,216 test pixels (31.1% of the labelled pixels)")
    assert training.startswith("training was still improving when it stopped: val_iou 0.6000 -> 0.7000")
    assert resolution.startswith(f"resolution: mean IoU at each mask's own size is {(2688 / 2880 + 1024 / 1216) / 2:.3f}")
    assert "transform.image_size (e.g. 64)" in resolution


def three_class_model(root: Path, graph_uri: Path) -> Path:
    """Softmax rule model: class 1 where the image is bright, class 0 elsewhere, class 2 never."""
    import keras

    from segpipe.components.core.serving import export_serving_model

    inputs = keras.Input((32, 32, 3))
    layer = keras.layers.Conv2D(3, 1, activation="softmax", name="rule")
    model = keras.Model(inputs, layer(inputs))
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    kernel[..., 0], kernel[..., 1] = -10.0, 10.0  # +-30 * mean(rgb)
    layer.set_weights([kernel, np.array([15.0, -15.0, -50.0], np.float32)])
    return Path(export_serving_model(model, str(graph_uri), root / "serving_model", image_size=32, num_classes=3))


def test_a_class_never_predicted_fails_the_gate_by_name(tmp_path: Path, tiny_transform: dict) -> None:
    from segpipe.components.core.data_format import encode_example, encode_png, write_labels, write_span

    rng = np.random.default_rng(3)
    examples = {}
    for i in range(3):
        image = rng.integers(0, 40, size=(40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        image[4:20, 6:26], mask[4:20, 6:26] = 240, 1
        image[24:36, 28:44], mask[24:36, 28:44] = 110, 2  # mid grey: the rule model calls it background
        examples[f"t-{i}"] = (image, mask)
    data_root = tmp_path / "data"
    write_labels(data_root, {0: "background", 1: "cell", 2: "tumour"})
    span, _ = write_span(data_root, 1, (encode_example(i, encode_png(a), encode_png(b)) for i, (a, b) in examples.items()))
    examples_uri = tmp_path / "examples"
    with artifacts.publish(examples_uri, artifacts.EXAMPLES, producer="ExampleGen") as (tmp, info):
        write_records(artifacts.split_dir(tmp, artifacts.TEST), examples)
        info["extra"] = {"spans": [1], "files": sorted(str(p) for p in span.iterdir())}  # how ExampleGen records them
    model = three_class_model(tmp_path, tiny_transform["graph"])
    result = run_evaluator(tmp_path, model, examples_uri, num_classes=3,
                           pixel_accuracy_threshold=0.0, min_foreground_iou=0.0)
    metrics, blessing = read_outputs(tmp_path)
    assert metrics["class_names"] == ["background", "cell", "tumour"]  # labels.json found through the raw files
    assert metrics["confusion_matrix"][2][2] == 0 and np.asarray(metrics["confusion_matrix"])[:, 2].sum() == 0
    assert result["blessed"] is False and blessing["reasons"] == ["class 2 'tumour' is never predicted"]
    per_class = [(c["name"], c["passed"]) for c in blessing["checks"] if c["metric"] == "iou_per_class"]
    assert per_class == [("class 1 'cell' IoU >= minimum", True), ("class 2 'tumour' IoU >= minimum", False)]
    assert blessing["hints"][0].startswith(
        f"weakest class: class 2 'tumour' has IoU 0.000 on {3 * 12 * 16:,} test pixels")
    assert "and is never predicted" in blessing["hints"][0]
    assert not any(h.startswith("training") for h in blessing["hints"])  # no ModelRun given


def test_cli_evaluate_regression_against_baseline_is_not_blessed(
    tmp_path: Path, rule_models: dict, test_split: tuple, capsys: pytest.CaptureFixture
) -> None:
    examples_uri, written = test_split
    serving = tmp_path / "serving"  # --model as a serving dir means its highest version
    shutil.copytree(rule_models["background"] / artifacts.SAVED_MODEL_DIR, serving / "4")
    (serving / "4" / SERVING_INFO_FILE).write_text("{}")  # what makes a folder a pushed version
    pattern = str(artifacts.split_dir(examples_uri, artifacts.TEST) / "*.tfrecord.gz")
    out = tmp_path / "cli"
    argv = ["evaluate", "--model", str(serving), "--data", pattern, "--baseline", str(rule_models["bright"]),
            "--out", str(out), "--root", str(tmp_path), "--set", "evaluation.pixel_accuracy_threshold=0.0",
            "--set", "evaluation.min_foreground_iou=0.0", "--set", "evaluation.min_class_iou=0.0",
            "--set", "data.num_classes=2"]
    assert cli.main(argv) == 3
    assert "NOT blessed" in capsys.readouterr().out
    metrics = json.loads((out / "evaluation" / artifacts.EVALUATION_FILE).read_text())
    assert metrics["model"] == str(serving / "4")
    # Predicting background everywhere scores exactly the all-background accuracy, foreground IoU 0.
    assert metrics["pixel_accuracy"] == metrics["all_background_accuracy"]
    assert metrics["foreground_iou"] == 0.0
    native, small, _ = expected_confusion(rule_models["bright"], written)
    assert metrics["baseline"]["confusion_matrix"] == native.tolist()  # baseline evaluated on the same pixels
    assert metrics["baseline"]["model_resolution"]["confusion_matrix"] == small.tolist()
    blessing = json.loads((out / "blessing" / artifacts.BLESSING_FILE).read_text())
    assert blessing["blessed"] is False
    assert [r.split(" is ")[0] for r in blessing["reasons"]] == [
        f"pixel accuracy {metrics['pixel_accuracy']:.3f}", "foreground IoU 0.000"]
    assert all("below the baseline's" in r for r in blessing["reasons"])
    assert blessing["hints"][0].startswith("weakest class: class 1 has IoU 0.000")


def test_missing_test_split_is_bad_input(tmp_path: Path, rule_models: dict) -> None:
    (tmp_path / "examples").mkdir()
    with pytest.raises(BadInputError, match="Split-test: no test shards"):
        run_evaluator(tmp_path, rule_models["bright"], tmp_path / "examples")
    assert not (tmp_path / "evaluation").exists() and not (tmp_path / "blessing").exists()


def test_bad_mask_label_names_the_example_and_publishes_nothing(tmp_path: Path, rule_models: dict) -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[3, 3] = 7
    write_records(artifacts.split_dir(tmp_path / "examples", artifacts.TEST), {"bad-1": (np.zeros((32, 32, 3), np.uint8), mask)})
    with pytest.raises(BadInputError, match="test example bad-1: true mask has label 7 outside 0..1"):
        run_evaluator(tmp_path, rule_models["bright"], tmp_path / "examples")
    assert not (tmp_path / "evaluation").exists() and not (tmp_path / "blessing").exists()


def test_model_class_count_must_match_the_data(tmp_path: Path, rule_models: dict, test_split: tuple) -> None:
    examples_uri, _ = test_split
    with pytest.raises(BadInputError, match="predicts 2 classes, the data has 3"):
        run_evaluator(tmp_path, rule_models["bright"], examples_uri, num_classes=3)
