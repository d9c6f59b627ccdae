"""InfraValidator: the blessed model served by a fresh TensorFlow-only process, before any push.

Real serving processes every time: a good rule model passes with its figures; a corrupt variables
file, a graph that needs this Python process (tf.py_function) and outputs of the wrong dtype and
shape are refused with named reasons; the memory limit and both timeouts stop the process; the
Pusher pushes only an infra-blessed model and records the figures; in a tiny pipeline run a
refusal exits 3 with nothing pushed, and the step is cached on its inputs.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from segpipe.components import infra_validator, pusher
from segpipe.components.core import artifacts
from segpipe.components.core.data_format import encode_example, encode_png
from segpipe.components.core.serving import SERVING_INFO_FILE, list_version_numbers
from segpipe.pipeline.config import ConfigError, load_config
from segpipe.pipeline.pipeline import Ref, create_pipeline, nodes_by_name

NUM_TEST_EXAMPLES = 3  # fewer than the batch of 8: the canary batch repeats them


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Examples artifact whose test split holds a few 40x48 raw examples."""
    import tensorflow as tf

    uri = tmp_path_factory.mktemp("infra_examples") / "examples"
    folder = artifacts.split_dir(uri, artifacts.TEST)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
        for i in range(NUM_TEST_EXAMPLES):
            image = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
            mask = (image.mean(axis=-1) > 127).astype(np.uint8)
            writer.write(encode_example(f"test-{i}", encode_png(image), encode_png(mask)))
    return uri


def make_blessing(root: Path, blessed: bool) -> Path:
    uri = root / f"blessing-{blessed}"
    uri.mkdir(parents=True, exist_ok=True)
    (uri / artifacts.BLESSING_FILE).write_text(json.dumps({"blessed": blessed, "reasons": []}))
    return uri


def validate(model: Path, examples: Path, out: Path, dag_params, *, blessed: bool = True, **overrides) -> dict:
    """The component called as the DAG calls it, with fewer timed requests."""
    params = dag_params("infra_validator", **{"num_requests": 3, **overrides})
    return infra_validator.validate_infra(str(model), str(examples), str(make_blessing(out.parent, blessed)),
                                          str(out), **params)


def recorded(out: Path) -> dict:
    return json.loads((out / artifacts.INFRA_BLESSING_FILE).read_text())


def save_module(module, root: Path) -> Path:
    """A tf.Module with a `serve` tf.function saved as a Model artifact's serving_model/."""
    import tensorflow as tf

    tf.saved_model.save(module, str(root / artifacts.SAVED_MODEL_DIR), signatures={"serving_default": module.serve})
    return root


@pytest.fixture(scope="module")
def good_run(rule_models, examples, tmp_path_factory, dag_params) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("infra_good") / "infra_blessing"
    return out, validate(rule_models["bright"], examples, out, dag_params)


# ------------------------------------------------------------------ a model that serves


def test_good_model_is_blessed_with_every_check_and_its_figures(good_run):
    out, result = good_run
    record = recorded(out)
    assert result["blessed"] is True and result["reasons"] == []
    names = [c["name"] for c in record["checks"]]
    assert names == ["loads in a TensorFlow-only process",
                     "batch of 1: outputs follow the serving contract", "batch of 1: outputs equal the in-process predictions",
                     "batch of 8: outputs follow the serving contract", "batch of 8: outputs equal the in-process predictions"]
    assert all(c["passed"] for c in record["checks"])
    figures = result["figures"]
    assert 0 < figures["load_seconds"] < 300
    assert figures["peak_memory_mb"] > 50  # TensorFlow itself is resident
    assert figures["memory_limit_mb"] == load_config().infra_validation.memory_limit_mb
    assert set(figures["latency_ms"]) == {"1", "8"}
    for size in ("1", "8"):
        latency = figures["latency_ms"][size]
        assert latency["requests"] == 3 and 0 < latency["p50_ms"] <= latency["p99_ms"]
    info = artifacts.read_info(out)
    assert info.type == artifacts.INFRA_BLESSING and info.extra["blessed"] is True
    assert (out / infra_validator.SERVING_LOG_FILE).is_file()


def test_served_outputs_are_compared_with_the_in_process_predictions():
    probabilities = np.full((2, 4, 4, 1), 0.9, np.float32)
    reference = {"probabilities": probabilities, "class_mask": np.ones((2, 4, 4), np.int32)}
    same = {"probabilities": probabilities + 5e-6, "class_mask": np.ones((2, 4, 4), np.int32)}
    assert infra_validator.prediction_mismatch(same, reference) == ""
    drifted = {**same, "probabilities": probabilities + 1e-3}
    assert "differ from the in-process predictions by up to 0.001" in infra_validator.prediction_mismatch(drifted, reference)
    flipped = {**same, "class_mask": np.zeros((2, 4, 4), np.int32)}
    assert "class_mask differs from the in-process predictions in 32 pixels" in infra_validator.prediction_mismatch(flipped, reference)
    # A pixel exactly at the decision boundary may fall either way without failing the check.
    tie = {"probabilities": np.full((1, 1, 1, 1), 0.5, np.float32), "class_mask": np.zeros((1, 1, 1), np.int32)}
    assert infra_validator.prediction_mismatch({**tie, "class_mask": np.ones((1, 1, 1), np.int32)}, tie) == ""


# ------------------------------------------------------------------ models that do not serve


def test_corrupt_variables_fail_to_load_with_a_named_reason(rule_models, examples, tmp_path, dag_params):
    model = tmp_path / "corrupt"
    shutil.copytree(rule_models["bright"], model)
    [data] = (model / artifacts.SAVED_MODEL_DIR / "variables").glob("variables.data-*")
    data.write_bytes(b"\x5a" * data.stat().st_size)  # same size, wrong bytes
    result = validate(model, examples, tmp_path / "infra", dag_params)
    assert result["blessed"] is False
    [reason] = result["reasons"]
    assert reason.startswith("the model does not load in a TensorFlow-only process:")
    assert "checksum" in reason
    assert [c["name"] for c in recorded(tmp_path / "infra")["checks"]] == ["loads in a TensorFlow-only process"]
    assert "Traceback" in (tmp_path / "infra" / infra_validator.SERVING_LOG_FILE).read_text()


def test_a_graph_that_needs_this_python_process_is_refused(examples, tmp_path, dag_params):
    """tf.py_function works where the model was made and in no model server: it is caught here."""
    import tensorflow as tf

    class PyFunctionModel(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes):
            size = tf.shape(image_bytes)[0]
            probabilities = tf.py_function(lambda n: np.full((int(n), 4, 4, 1), 0.25, np.float32), [size], tf.float32)
            probabilities = tf.reshape(probabilities, [-1, 4, 4, 1])
            return {"probabilities": probabilities, "class_mask": tf.cast(probabilities[..., 0] > 0.5, tf.int32)}

    model = save_module(PyFunctionModel(), tmp_path / "pyfunc")
    loaded = tf.saved_model.load(str(model / artifacts.SAVED_MODEL_DIR))
    assert loaded.signatures["serving_default"](image_bytes=tf.constant([b"x"]))["probabilities"].shape == (1, 4, 4, 1)
    result = validate(model, examples, tmp_path / "infra", dag_params)
    assert result["blessed"] is False
    assert result["reasons"][-1].startswith("serving_default fails on a batch of 1:")
    assert "EagerPyFunc" in result["reasons"][-1]


def test_outputs_of_the_wrong_dtype_and_shape_are_refused(examples, tmp_path, dag_params):
    import tensorflow as tf

    class WrongOutputs(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes):
            probabilities = tf.fill(tf.stack([tf.shape(image_bytes)[0], 4, 4, 1]), tf.constant(0.75, tf.float64))
            return {"probabilities": probabilities, "class_mask": tf.ones(tf.shape(probabilities)[:2], tf.int64)}

    result = validate(save_module(WrongOutputs(), tmp_path / "wrong"), examples, tmp_path / "infra", dag_params)
    assert result["blessed"] is False
    assert "batch of 1: 'probabilities' is float64, expected float32" in result["reasons"][0]
    assert "'class_mask' is int64, expected int32" in result["reasons"][0]
    assert result["reasons"][1].startswith("batch of 8: 'probabilities' is float64")
    checks = {c["name"]: c for c in recorded(tmp_path / "infra")["checks"]}
    assert checks["loads in a TensorFlow-only process"]["passed"]
    assert not any("in-process" in name for name in checks)  # nothing to compare against a broken contract


def test_a_model_without_serving_default_is_refused(examples, tmp_path, dag_params):
    import tensorflow as tf

    class OtherSignature(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes):
            return {"probabilities": tf.zeros(tf.stack([tf.shape(image_bytes)[0], 4, 4, 1]))}

    module = OtherSignature()
    tf.saved_model.save(module, str(tmp_path / "other" / artifacts.SAVED_MODEL_DIR), signatures={"predict": module.serve})
    result = validate(tmp_path / "other", examples, tmp_path / "infra", dag_params)
    assert result["reasons"] == ["the model does not load in a TensorFlow-only process: "
                                 "LookupError: no 'serving_default' signature (has: predict)"]


def test_a_wrong_class_mask_shape_is_refused():
    outputs = {"probabilities": np.zeros((8, 4, 4, 1), np.float32), "class_mask": np.zeros((8, 4), np.int32)}
    assert infra_validator.contract_problems(outputs, 8, 1) == ["'class_mask' has shape [8, 4], expected [8, 4, 4]"]
    three_classes = {"probabilities": np.zeros((8, 4, 4, 1), np.float32), "class_mask": np.zeros((8, 4, 4), np.int32)}
    assert infra_validator.contract_problems(three_classes, 8, 3) == [
        "'probabilities' has shape [8, 4, 4, 1], expected [N=8, S, S, C=3]"]
    assert infra_validator.contract_problems({"scores": np.zeros(1)}, 1, 1) == [
        "no 'probabilities' output (it returns scores)", "no 'class_mask' output (it returns scores)"]


# ------------------------------------------------------------------ limits


def test_the_memory_limit_is_enforced(rule_models, examples, tmp_path, dag_params):
    result = validate(rule_models["bright"], examples, tmp_path / "infra", dag_params, memory_limit_mb=256)
    assert result["blessed"] is False
    [reason] = result["reasons"]
    assert "ran out of memory while loading the model under infra_validation.memory_limit_mb = 256 MB" in reason
    assert result["figures"]["load_seconds"] is None and result["figures"]["memory_limit_mb"] == 256


def test_the_load_timeout_kills_the_serving_process(rule_models, examples, tmp_path, dag_params):
    started = time.monotonic()
    result = validate(rule_models["bright"], examples, tmp_path / "infra", dag_params, load_timeout_seconds=0.2)
    assert time.monotonic() - started < 30  # killed, not waited for
    assert result["reasons"] == ["the model did not load within 0.2 s (infra_validation.load_timeout_seconds)"]


def test_the_request_timeout_kills_a_hanging_model(examples, tmp_path, dag_params):
    import tensorflow as tf

    class Hangs(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes):
            start = tf.timestamp()
            end = tf.while_loop(lambda t: t - start < 120.0, lambda t: tf.timestamp(), [start])
            probabilities = tf.zeros(tf.stack([tf.shape(image_bytes)[0], 4, 4, 1])) + tf.cast(end - start, tf.float32) * 0
            return {"probabilities": probabilities, "class_mask": tf.cast(probabilities[..., 0] > 0.5, tf.int32)}

    started = time.monotonic()
    result = validate(save_module(Hangs(), tmp_path / "hangs"), examples, tmp_path / "infra", dag_params,
                      request_timeout_seconds=3.0)
    assert time.monotonic() - started < 60
    assert result["reasons"] == ["the canary requests did not finish within 3 s (infra_validation.request_timeout_seconds)"]
    assert result["figures"]["load_seconds"] is not None and result["figures"]["latency_ms"] == {}


def test_latency_and_peak_memory_limits_refuse_with_the_figures(rule_models, examples, tmp_path, dag_params):
    result = validate(rule_models["bright"], examples, tmp_path / "infra", dag_params,
                      max_p99_latency_ms=1e-6, max_peak_memory_mb=1.0)
    assert result["blessed"] is False
    reasons = result["reasons"]
    assert [r.split(":")[0] for r in reasons[:2]] == ["batch of 1", "batch of 8"]
    assert all("p99 latency" in r and "(infra_validation.max_p99_latency_ms)" in r for r in reasons[:2])
    assert reasons[2].startswith("peak resident memory") and reasons[2].endswith("> 1 MB (infra_validation.max_peak_memory_mb)")
    assert len(reasons) == 3  # the p50 limit is off (0): reported, never checked
    assert result["figures"]["latency_ms"]["8"]["p50_ms"] > 0


def test_a_model_the_evaluator_refused_is_not_started(rule_models, examples, tmp_path, dag_params):
    result = validate(rule_models["bright"], examples, tmp_path / "infra", dag_params, blessed=False)
    assert result == {"blessed": False, "reasons": ["the Evaluator did not bless the model, so it was not started"],
                      "figures": {}}
    assert not (tmp_path / "infra" / infra_validator.SERVING_LOG_FILE).exists()


def test_batch_sizes_are_validated_naming_the_field():
    assert load_config(overrides={"infra_validation.batch_sizes": [2, 4]}).infra_validation.batch_sizes == (2, 4)
    for bad in ([], [0, 8], [8, 8]):
        with pytest.raises(ConfigError, match=r"infra_validation\.batch_sizes"):
            load_config(overrides={"infra_validation.batch_sizes": bad})
    with pytest.raises(ConfigError, match=r"infra_validation\.load_timeout_seconds: must be positive"):
        load_config(overrides={"infra_validation.load_timeout_seconds": 0})


# ------------------------------------------------------------------ the pusher and the DAG


def test_pusher_pushes_only_an_infra_blessed_model_and_records_the_figures(rule_models, good_run, tmp_path):
    good, result = good_run
    refused = tmp_path / "refused"
    with artifacts.publish(refused, artifacts.INFRA_BLESSING, producer="infra_validator") as (out, _):
        (out / artifacts.INFRA_BLESSING_FILE).write_text(json.dumps(
            {"blessed": False, "reasons": ["the model did not load within 1 s"], "checks": [], "figures": {}}))
    serving = tmp_path / "serving"
    evaluator_yes = make_blessing(tmp_path, True)

    def push(infra: Path, n: int) -> dict:
        return pusher.push_model(str(rule_models["bright"]), str(evaluator_yes), str(tmp_path / f"pushed-{n}"),
                                 serving_dir=str(serving), infra_blessing_uri=str(infra), keep_last=0)

    assert push(refused, 1)["pushed"] is False
    assert not serving.exists()
    pushed = json.loads((tmp_path / "pushed-1" / pusher.PUSH_RESULT_FILE).read_text())
    assert pushed["reasons"] == ["the model did not load within 1 s"]
    assert push(good, 2)["version"] == 1
    info = json.loads((serving / "1" / SERVING_INFO_FILE).read_text())
    assert info["infra_validation"] == result["figures"]


def test_dag_gates_the_pusher_on_the_infra_blessing():
    nodes = create_pipeline(load_config())
    names = [n.name for n in nodes]
    assert names.index("evaluator") < names.index("infra_validator") == names.index("pusher") - 1
    by_name = nodes_by_name(nodes)
    infra, push = by_name["infra_validator"], by_name["pusher"]
    assert infra.when == Ref("evaluator", "blessed")
    assert infra.inputs["model_uri"] == Ref("trainer", "model_uri")
    assert infra.outputs == {"infra_blessing_uri": artifacts.INFRA_BLESSING}
    assert push.when == Ref("infra_validator", "blessed")
    assert push.inputs["infra_blessing_uri"] == Ref("infra_validator", "infra_blessing_uri")
    assert not infra.gpu


def _cli_args(overrides: dict) -> list[str]:
    args = ["--root", overrides.pop("root")]
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


@pytest.mark.slow
def test_pipeline_run_refuses_what_does_not_serve_and_pushes_what_does(
    tmp_path, write_tiny_span, tiny_pipeline_overrides, capsys
):
    from segpipe.pipeline.cli import main

    root = tmp_path / "root"
    write_tiny_span(root / "data", 1, num=32, size=(32, 32))
    args = _cli_args(tiny_pipeline_overrides(root, **{"infra_validation.num_requests": 2}))
    strict = ["--set", "infra_validation.max_peak_memory_mb=1"]

    assert main(["run", *args, *strict]) == 3
    captured = capsys.readouterr()
    assert f"{'infra_validator':<20} done" in captured.out and "blessed=false" in captured.out
    assert f"{'pusher':<20} skipped" in captured.out
    assert "infra validation: peak resident memory" in captured.err
    assert list_version_numbers(root / "serving") == []
    report = [line.split("report: ", 1)[1] for line in captured.out.splitlines() if line.startswith("report: ")]
    page = Path(report[0]).read_text()
    assert "Infra validation" in page and "infra_validation.max_peak_memory_mb" in page

    assert main(["run", *args, *strict, "--force"]) == 3  # same model, same limits: the verdict is cached
    assert f"{'infra_validator':<20} cached" in capsys.readouterr().out

    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert f"{'trainer':<20} cached" in out and f"{'infra_validator':<20} done" in out
    assert list_version_numbers(root / "serving") == [1]
    info = json.loads((root / "serving" / "1" / SERVING_INFO_FILE).read_text())
    assert info["infra_validation"]["peak_memory_mb"] > 1 and set(info["infra_validation"]["latency_ms"]) == {"1", "8"}
