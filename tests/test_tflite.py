"""TFLite edge export: conversion, the input contract, scoring in the Evaluator's gate, the pushed files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segpipe.components import pusher
from segpipe.components.core import artifacts, edge, serving
from segpipe.components.core.errors import BadInputError
from segpipe.components.evaluator import evaluate_model, read_records, tflite_checks

GATE = {"pixel_accuracy_threshold": 0.9, "min_foreground_iou": 0.5, "min_class_iou": 0.3, "max_regression": 0.01}
VARIANTS = [edge.FLOAT16, edge.INT8]


def write_examples(root: Path, write_tiny_span) -> Path:
    """An Examples artifact: 12 test examples of 40 x 48 px and 8 train examples (int8 calibration)."""
    examples = root / "examples"
    for split, span, num in ((artifacts.TEST, 0, 12), (artifacts.TRAIN, 1, 8)):
        folder = write_tiny_span(root / "data", span, num=num, size=(40, 48))
        target = artifacts.split_dir(examples, split)
        target.mkdir(parents=True)
        for shard in sorted(folder.glob("*.tfrecord*")):
            shutil.copy(shard, target / f"data-{shard.name.split('.')[0]}.tfrecord.gz")
    assert artifacts.split_files(examples, artifacts.TEST) and artifacts.split_files(examples, artifacts.TRAIN)
    return examples


def evaluate(root: Path, model: Path, examples: Path, max_tflite_drop: float, variants=VARIANTS) -> tuple[dict, dict]:
    evaluate_model(str(model), str(examples), str(root / "evaluation"), str(root / "blessing"),
                   baseline_model_uri=None, model_run_uri=None, num_classes=2, **GATE, num_worst_examples=2,
                   tflite_variants=list(variants), max_tflite_drop=max_tflite_drop, beam_args=["--runner=FnApiRunner"])
    return (json.loads((root / "evaluation" / artifacts.EVALUATION_FILE).read_text()),
            json.loads((root / "blessing" / artifacts.BLESSING_FILE).read_text()))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, rule_models: dict, write_tiny_span) -> dict:
    root = tmp_path_factory.mktemp("tflite")
    examples = write_examples(root, write_tiny_span)
    metrics, blessing = evaluate(root, rule_models["bright"], examples, max_tflite_drop=1.0)
    return {"root": root, "examples": examples, "metrics": metrics, "blessing": blessing}


def test_both_variants_load_with_the_documented_contract(evaluated: dict) -> None:
    folder = evaluated["root"] / "evaluation" / edge.TFLITE_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["model_float16.tflite", "model_int8.tflite"]
    for variant in VARIANTS:
        model = edge.EdgeModel(folder / edge.tflite_file_name(variant))
        assert list(model.input["shape"]) == [1, 32, 32, 3] and model.input["dtype"] == np.float32
        assert list(model.output["shape"]) == [1, 32, 32, 1] and model.output["dtype"] == np.float32
        result = evaluated["metrics"]["tflite"][variant]
        assert result["bytes"] == (folder / edge.tflite_file_name(variant)).stat().st_size > 0
        assert result["file"] == f"tflite/model_{variant}.tflite"
        assert result["latency_ms"]["images"] == 12 and result["latency_ms"]["p50"] > 0
        assert result["num_pixels"] == evaluated["metrics"]["num_pixels"]  # native size, ignore label excluded


def test_float16_agrees_with_the_saved_model_on_99_percent_of_pixels(evaluated: dict, rule_models: dict) -> None:
    records = read_records(artifacts.split_files(evaluated["examples"], artifacts.TEST))
    loaded = serving.load_serving_model(rule_models["bright"] / artifacts.SAVED_MODEL_DIR)
    served = serving.predict_bytes(loaded, [image for _, image, _ in records])[serving.PROBABILITIES]
    model = edge.EdgeModel(evaluated["root"] / "evaluation" / edge.TFLITE_DIR / "model_float16.tflite")
    same = total = 0
    for (_, image, _), reference in zip(records, served):
        mine = model.predict(edge.decoded_images([image], 32)[0])
        same += int((serving.class_mask_at_size(mine, 40, 48) == serving.class_mask_at_size(reference, 40, 48)).sum())
        total += 40 * 48
    assert same / total >= 0.99
    drop = evaluated["metrics"]["tflite"][edge.FLOAT16]["mean_iou_drop"]
    assert abs(drop) < 0.01


def test_int8_drop_is_reported_and_gated(evaluated: dict, rule_models: dict, tmp_path: Path) -> None:
    metrics, blessing = evaluated["metrics"], evaluated["blessing"]
    drop = metrics["tflite"][edge.INT8]["mean_iou_drop"]
    assert drop == pytest.approx(metrics["mean_iou"] - metrics["tflite"][edge.INT8]["mean_iou"])
    names = [c["name"] for c in blessing["checks"]]
    assert "tflite int8 mean IoU drop <= max_tflite_drop" in names and blessing["blessed"] is True
    assert metrics["gate"]["max_tflite_drop"] == 1.0
    assert drop > 0  # full-integer quantisation moves some border pixels of this model
    _, refused = evaluate(tmp_path, rule_models["bright"], evaluated["examples"], max_tflite_drop=drop / 2,
                          variants=[edge.INT8])
    assert refused["blessed"] is False
    assert [r for r in refused["reasons"] if r.startswith("tflite int8 mean IoU drop")] == refused["reasons"]


def test_drop_check_equal_passes_above_fails() -> None:
    checks = tflite_checks({"int8": {"mean_iou_drop": 0.02}, "float16": {"mean_iou_drop": 0.0201}}, 0.02)
    assert [c["passed"] for c in checks] == [True, False]
    assert checks[1]["reason"] == "tflite float16 mean IoU drop 0.020100 > maximum 0.020000"


def test_pushed_version_holds_the_scored_files(evaluated: dict, rule_models: dict, tmp_path: Path) -> None:
    evaluation = evaluated["root"] / "evaluation"
    result = pusher.push_model(str(rule_models["bright"]), str(evaluated["root"] / "blessing"), str(tmp_path / "pushed"),
                               serving_dir=str(tmp_path / "serving"), evaluation_uri=str(evaluation), keep_last=0)
    version = Path(result["path"])
    for variant in VARIANTS:
        name = edge.tflite_file_name(variant)
        assert (version / name).read_bytes() == (evaluation / edge.TFLITE_DIR / name).read_bytes()
    info = json.loads((version / serving.SERVING_INFO_FILE).read_text())
    assert {v: t["bytes"] for v, t in info["tflite"].items()} == {
        v: evaluated["metrics"]["tflite"][v]["bytes"] for v in VARIANTS}
    assert serving.latest_blessed_model(tmp_path / "serving") == str(version)  # still a complete version


def test_a_changed_scored_file_is_not_pushed(evaluated: dict, rule_models: dict, tmp_path: Path) -> None:
    evaluation = tmp_path / "evaluation"
    shutil.copytree(evaluated["root"] / "evaluation", evaluation)
    (evaluation / edge.TFLITE_DIR / "model_int8.tflite").write_bytes(b"truncated")
    with pytest.raises(BadInputError, match="model_int8.tflite: the TFLite int8 file the evaluation scored"):
        pusher.push_model(str(rule_models["bright"]), str(evaluated["root"] / "blessing"), str(tmp_path / "pushed"),
                          serving_dir=str(tmp_path / "serving"), evaluation_uri=str(evaluation), keep_last=0)
    assert not (tmp_path / "serving").exists() or not list((tmp_path / "serving").iterdir())


def test_a_transform_other_than_x_over_255_is_refused(evaluated: dict, rule_models: dict, tmp_path: Path) -> None:
    """A SavedModel whose graph before the network differs from x / 255 (here: another network's
    Keras file beside it, the same mismatch a standardising transform makes) is not converted."""
    mixed = tmp_path / "mixed"
    shutil.copytree(rule_models["bright"], mixed)
    shutil.copy(rule_models["inverted"] / artifacts.KERAS_MODEL_FILE, mixed / artifacts.KERAS_MODEL_FILE)
    records = read_records(artifacts.split_files(evaluated["examples"], artifacts.TEST))
    with pytest.raises(edge.UnsupportedTransformError, match="transform.standardize: false"):
        edge.export_tflite(mixed / artifacts.SAVED_MODEL_DIR, tmp_path / "out", VARIANTS,
                           check_images=[r[1] for r in records], calibration_images=[r[1] for r in records])
    assert not (tmp_path / "out").exists()


def test_unknown_variant_is_named() -> None:
    with pytest.raises(BadInputError, match=r"push.tflite: unknown TFLite variant\(s\) \['int4'\]"):
        edge.check_variants(["float16", "int4"])


def test_config_names_a_bad_variant_and_feeds_the_evaluator(dag_params) -> None:
    from segpipe.pipeline.config import ConfigError, load_config

    assert load_config().push.tflite == ()  # default: no edge files
    with pytest.raises(ConfigError, match=r"push.tflite: \['int8', 'int8'\] must list distinct variants"):
        load_config(overrides={"push.tflite": ["int8", "int8"]})
    with pytest.raises(ConfigError, match="push.tflite"):
        load_config(overrides={"push.tflite": ["int4"]})
    params = dag_params("evaluator")
    assert params["tflite_variants"] == [] and 0 <= params["max_tflite_drop"] <= 1
