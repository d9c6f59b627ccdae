"""The Tuner: a KerasTuner search on tiny transformed data, its artifact, and the Trainer taking its values."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.components import tuner
from segpipe.components.core import artifacts


def test_the_budget_stops_the_search_after_the_first_epoch_of_the_first_trial(tmp_path, dag_params, tiny_transform):
    """Called with the DAG's trainer parameters on the shared 32-px Transform output (4 train, 4 eval): a
    budget spent before the first epoch ends lets that epoch finish and starts no second trial."""
    params = dag_params("trainer")
    model_config = {**params["model_config"], "base_filters": 4, "depth": 2}
    train_config = {**params["train_config"], "epochs": 2, "min_steps": 0, "batch_size": 4,
                    "early_stopping_patience": 0}
    out = tmp_path / "hyperparameters"
    result = tuner.tune_hyperparameters(
        str(tiny_transform["transformed"]), str(tiny_transform["graph"]), str(out), num_classes=2, image_size=32,
        model_config=model_config, train_config=train_config, max_trials=5, budget_minutes=1e-6, trial_fraction=1.0,
        search_space={"model.base_filters": [2, 4], "train.augment_flip": [True, False]})
    document = json.loads((out / tuner.HYPERPARAMETERS_FILE).read_text())
    [trial] = document["trials"]  # no second trial started
    assert trial["epochs"] == 1 and not trial["complete"]  # of 2 planned: stopped at the first epoch's end
    assert result["stopped"] == document["stopped"] == tuner.STOPPED_BUDGET
    assert document["values"] == trial["values"] == tuner.read_values(str(out))
    assert isinstance(trial["values"]["train.augment_flip"], bool)  # KerasTuner hands booleans back as 0/1
    assert [p.name for p in tmp_path.iterdir()] == ["hyperparameters"]  # no temp folder is left


def test_an_unreadable_artifact_names_the_file(tmp_path):
    from segpipe.components.core.errors import BadInputError

    (tmp_path / tuner.HYPERPARAMETERS_FILE).write_text("{}")
    with pytest.raises(BadInputError, match=tuner.HYPERPARAMETERS_FILE):
        tuner.read_values(str(tmp_path))


def write_hyperparameters(uri: Path, values: dict) -> str:
    with artifacts.publish(uri, artifacts.HYPERPARAMETERS, producer="test") as (tmp, _):
        (tmp / tuner.HYPERPARAMETERS_FILE).write_text(json.dumps({"values": values}))
    return str(uri)


def test_the_trainer_takes_the_tuned_values_after_the_plan_but_never_over_a_field_the_user_set(tmp_path):
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.pipeline import nodes_by_name, create_pipeline, planned_config

    cfg = load_config(overrides={"root": str(tmp_path), "tuner.enabled": True, "train.loss": "bce"})
    trainer = nodes_by_name(create_pipeline(cfg))["trainer"]
    with artifacts.publish(tmp_path / "plan", artifacts.PLAN, producer="test") as (tmp, _):
        (tmp / "plan.json").write_text(json.dumps({"overrides": {"model.base_filters": 16, "train.batch_size": 4}}))
    tuned = write_hyperparameters(tmp_path / "tuned", {"model.base_filters": 8, "train.loss": "dice_bce"})
    run = planned_config(trainer, cfg, {"plan": str(tmp_path / "plan"), "hyperparameters": tuned})
    assert run.model.base_filters == 8 and run.train.batch_size == 4  # the tuner over the plan, the plan elsewhere
    assert run.train.loss == "bce"  # set by the user: the tuner's value is dropped
    assert "train.loss" not in nodes_by_name(create_pipeline(cfg))["tuner"].params(cfg)["search_space"]


@pytest.mark.slow
def test_a_tiny_pipeline_tunes_then_trains_with_the_best_width_and_reruns_from_cache(
        tmp_path, write_tiny_span, tiny_pipeline_overrides):
    from segpipe.components.tools.report import tuner_html
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.local_runner import LocalRunner
    from segpipe.pipeline.pipeline import create_pipeline

    root = tmp_path / "root"
    write_tiny_span(root / "data", 1, num=24, size=(40, 40))
    overrides = tiny_pipeline_overrides(root)
    overrides.pop("model.base_filters")  # left to the plan, then the tuner
    overrides.update({"tuner.enabled": True, "tuner.max_trials": 2, "tuner.base_filters": [2, 4],
                      "tuner.learning_rate": [0.001, 0.003], "tuner.loss": ["bce", "dice_bce"],
                      "tuner.augment_flip": [], "tuner.augment_rot90": [], "tuner.augment_zoom": [],
                      "train.learning_rate": 0.002, "train.loss": "bce"})  # set by you: not searched
    cfg = load_config(overrides=overrides)
    nodes = create_pipeline(cfg)
    nodes = nodes[: [n.name for n in nodes].index("trainer") + 1]  # the gate and the push are tested elsewhere
    runner = LocalRunner(cfg, nodes=nodes)
    steps = {s.node: s for s in runner.run()}
    order = list(steps)
    assert order.index("transform") < order.index("tuner") < order.index("trainer")

    uri = steps["tuner"].outputs["hyperparameters_uri"]
    document = json.loads((Path(uri) / tuner.HYPERPARAMETERS_FILE).read_text())
    assert document["search_space"] == {"model.base_filters": [2, 4]}  # learning rate and loss were set
    trials = document["trials"]
    assert sorted(t["values"]["model.base_filters"] for t in trials) == [2, 4] and document["stopped"] == "max_trials"
    for trial in trials:
        assert trial["status"] == "completed" and trial["epochs"] == 1 and trial["complete"]
        assert 0.0 <= trial["objective"] <= 1.0 and trial["seconds"] > 0
    best = max(trials, key=lambda t: t["objective"])
    assert document["values"] == best["values"] and document["best"]["trial"] == best["trial"]
    assert document["objective"] == {"name": "val_iou", "direction": "max"}
    assert artifacts.read_info(uri).type == artifacts.HYPERPARAMETERS
    assert sorted(p.name for p in Path(uri).parent.iterdir()) == ["hyperparameters", "result.json"]
    assert not (Path(uri) / tuner.SEARCH_DIR).exists()  # KerasTuner's working files stayed in the temp output
    model = artifacts.read_info(steps["trainer"].outputs["model_uri"])
    assert model.parameters["model_config"]["base_filters"] == document["values"]["model.base_filters"]
    train = model.parameters["train_config"]
    assert train["learning_rate"] == 0.002 and train["loss"] == "bce"  # yours, though the tuner has candidates

    executions = {e["node"]: e for e in runner.metadata.run_executions(runner.run_id)}
    assert executions["tuner"]["outputs"]["hyperparameters_uri"] == str(Path(uri).resolve())
    assert executions["trainer"]["inputs"]["hyperparameters"] == str(Path(uri).resolve())
    assert "<code>model.base_filters</code>" in tuner_html(uri)

    again = {s.node: s.state for s in LocalRunner(cfg, nodes=nodes).run()}
    assert again["tuner"] == "cached" and again["trainer"] == "cached"
