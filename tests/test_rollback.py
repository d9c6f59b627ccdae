"""A rollback is respected by the next runs: no retrain without new data, no re-push of a withdrawn
model, the rolled-back model as the baseline, and the rollback recorded in ML Metadata.

The failure this guards against: serving held v1-v3; `segpipe serving rollback 1` made v4; the next
plain `segpipe run` (no new data) pushed v5 from v3's cached trainer artifact, silently restoring
the model that was rolled back.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.components.core import artifacts
from segpipe.components.core.serving import SERVING_INFO_FILE, list_version_numbers
from segpipe.components.pusher import PUSH_RESULT_FILE, push_model
from segpipe.pipeline import metadata as md
from segpipe.pipeline.config import load_config


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory, write_tiny_span, tiny_segpipe):
    """Spans 1 and 2 pushed as v1 and v2, then `serving rollback 1` (v3)."""
    root = tmp_path_factory.mktemp("rollback") / "root"
    segpipe = tiny_segpipe(root, **{"train.warm_start": False})

    for span in (1, 2):
        write_tiny_span(root / "data", span, num=24, size=(32, 32), seed=span)
        assert segpipe("run") == 0
    assert segpipe("serving", "rollback", "1") == 0
    return root, segpipe


def _info(root: Path, version: int) -> dict:
    return json.loads((root / "serving" / str(version) / SERVING_INFO_FILE).read_text())


def test_the_rollback_version_records_what_it_withdrew(rolled_back):
    root, _ = rolled_back
    assert list_version_numbers(root / "serving") == [1, 2, 3]
    record = _info(root, 3)
    assert record["rolled_back_from"] == 1 and record["source_model"] == _info(root, 1)["source_model"]
    assert record["rollback"]["withdrawn_versions"] == [2]
    assert record["rollback"]["withdrawn_models"] == [_info(root, 2)["source_model"]]


def test_the_rollback_is_a_run_in_ml_metadata(rolled_back, capsys):
    root, segpipe = rolled_back
    cfg = load_config(overrides={"root": str(root)})
    runs = md.Metadata.from_config(cfg).list_runs()
    (rollback,) = [run for run in runs if run.get("status") == "rolled_back"]
    assert rollback["version"] == 3
    [execution] = md.Metadata.from_config(cfg).run_executions(rollback["run_id"])
    assert execution["node"] == "rollback"
    assert segpipe("runs") == 0 and "rolled_back" in capsys.readouterr().out


def test_no_new_data_stays_no_new_data_after_a_rollback(rolled_back, capsys):
    root, segpipe = rolled_back
    assert segpipe("run") == 0
    out = capsys.readouterr().out
    assert "no new data" in out and "span 2" in out
    assert list_version_numbers(root / "serving") == [1, 2, 3]


def test_a_withdrawn_model_is_never_pushed_again(rolled_back, tmp_path):
    # What a cached trainer hands the Pusher after a rollback: v2's own Model artifact, blessed.
    root, _ = rolled_back
    blessing = tmp_path / "blessing"
    with artifacts.publish(blessing, artifacts.MODEL_BLESSING, producer="test") as (out, _info_):
        (out / artifacts.BLESSING_FILE).write_text(json.dumps({"blessed": True, "reasons": []}))
    result = push_model(_info(root, 2)["source_model"], str(blessing), str(tmp_path / "pushed"),
                        serving_dir=str(root / "serving"), keep_last=0)
    assert result["pushed"] is False and "withdrawn by the rollback to version 1" in result["withdrawn"]
    assert list_version_numbers(root / "serving") == [1, 2, 3]
    recorded = json.loads((tmp_path / "pushed" / PUSH_RESULT_FILE).read_text())
    assert recorded["pushed"] is False and any("withdrawn" in reason for reason in recorded["reasons"])


def test_new_data_after_a_rollback_trains_against_the_rolled_back_baseline(rolled_back, write_tiny_span):
    root, segpipe = rolled_back
    write_tiny_span(root / "data", 3, num=24, size=(32, 32), seed=3)
    assert segpipe("run") == 0
    assert list_version_numbers(root / "serving") == [1, 2, 3, 4]
    pushed = _info(root, 4)
    assert pushed["spans"] == [3] and pushed["source_model"] != _info(root, 2)["source_model"]
    evaluator = root / "artifacts" / "evaluator"
    newest = max(evaluator.glob("*/blessing"), key=lambda path: path.stat().st_mtime).parent  # this run's
    blessing = json.loads((newest / "blessing" / artifacts.BLESSING_FILE).read_text())
    assert Path(blessing["baseline_model"]).resolve() == (root / "serving" / "3").resolve()
    assert json.loads((newest / "evaluation" / artifacts.EVALUATION_FILE).read_text())["baseline"] is not None


@pytest.mark.parametrize("require_new_span, expected", [(True, False), (False, True)])
def test_a_scheduled_kubeflow_run_applies_the_same_rule(rolled_back, require_new_span, expected):
    # The compiled pipeline's first task gates every step with dsl.If(new); kfp.local 2.13 cannot
    # run a dsl.If, so the task's function is called with the JSON its config task produces.
    from segpipe.pipeline import kubeflow

    root, _ = rolled_back
    config = kubeflow.resolve_run_config(json.dumps({"root": str(root)}), "auto", {
        "input_pattern": load_config().data.input_pattern, "span": -1, "pixel_accuracy_threshold": 0.0,
        "epochs": kubeflow.NOT_SET, "image_size": kubeflow.NOT_SET, "root": str(root),
        "require_new_span": require_new_span})
    decision = json.loads(kubeflow.run_new_data_check(config))
    assert decision["new"] is expected
    if not expected:
        assert decision["reason"].startswith("no new data")
