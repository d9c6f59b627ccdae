"""CLI paths are relative to the current directory; paths inside a config keep their documented base.

Every test runs from a fresh cwd (tmp_path) and passes relative paths, then checks where they
landed: in the effective config, in the files written, and in the data a command read.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segpipe.components.core import artifacts
from segpipe.components.core.errors import EXIT_BAD_INPUT, EXIT_OK
from segpipe.pipeline.cli import build_parser, config_from_args, main

# Gates any model passes (tiny evaluations); the same fields tiny_pipeline_overrides sets.
OPEN_GATE = ["--set", "evaluation.pixel_accuracy_threshold=0.0", "--set", "evaluation.min_foreground_iou=0.0",
             "--set", "evaluation.max_regression=1.0"]


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cfg(*argv: str):
    """The effective config of `segpipe config ARGV`."""
    return config_from_args(build_parser().parse_args(["config", *argv]))


def _set_flags(overrides: dict) -> list[str]:
    """tiny_pipeline_overrides as --set flags (its `root` is passed as --root by the caller)."""
    return [a for key, value in overrides.items() if key != "root" for a in ("--set", f"{key}={json.dumps(value)}")]


def test_config_and_root_are_read_relative_to_cwd(cwd, capsys):
    (cwd / "conf").mkdir()
    (cwd / "conf" / "mine.yaml").write_text("train:\n  epochs: 7\n")
    assert main(["config", "--config", "conf/mine.yaml", "--root", "runs/r1"]) == EXIT_OK
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["root"] == str(cwd / "runs" / "r1")
    assert shown["train"]["epochs"] == 7  # the relative --config was found and read


def test_config_file_paths_keep_their_base_and_absolute_cli_paths_win(cwd, tmp_path_factory):
    (cwd / "mine.yaml").write_text(
        "data:\n  root: mydata\n  input_pattern: 'span-{SPAN}/*.tfrecord'\n"
        "push:\n  serving_dir: serv\nvalidation:\n  schema_path: schemas/s.pbtxt\n"
    )
    cfg = _cfg("--config", "mine.yaml", "--root", "r")
    root = cwd / "r"
    assert cfg.root == str(root)
    assert cfg.data_root == str(root / "mydata")  # data.root: relative to root
    assert cfg.input_pattern == str(root / "mydata" / "span-{SPAN}" / "*.tfrecord")  # relative to data.root
    assert cfg.serving_dir == str(root / "serv")
    assert cfg.schema_path == str(root / "schemas" / "s.pbtxt")

    elsewhere = tmp_path_factory.mktemp("elsewhere")
    cfg = _cfg("--config", "mine.yaml", "--root", "r", "--set", f"data.root={elsewhere}",
               "--set", f"push.serving_dir={elsewhere / 'serving'}")
    assert cfg.data_root == str(elsewhere) and cfg.serving_dir == str(elsewhere / "serving")
    # URIs are absolute too: neither made local nor joined to the root.
    cfg = _cfg("--root", "gs://bucket/segpipe")
    assert cfg.root == "gs://bucket/segpipe" and cfg.data_root == "gs://bucket/segpipe/data"


def test_run_data_pattern_is_relative_to_cwd_not_data_root(cwd, write_tiny_span, tiny_pipeline_overrides, capsys):
    write_tiny_span(cwd / "mydata", 1, num=4)
    args = build_parser().parse_args(["run", "--root", "r", "--data", "mydata/span-{SPAN}/*"])
    assert args.data == str(cwd / "mydata" / "span-{SPAN}" / "*")
    assert _cfg("--root", "r", "--set", f"data.input_pattern={args.data}").input_pattern == args.data

    # The run lists the relative data (span 1 is found there) and stops at the missing span 2,
    # before any Beam step; it generates no demo data, as --data is the user's data.
    argv = ["run", "--root", "r", "--data", "mydata/span-{SPAN}/*", "--span", "2",
            *_set_flags(tiny_pipeline_overrides("r"))]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{cwd}/mydata/span-{{SPAN}}/*: no files for span 2 (spans with files: 1)" in err
    assert not (cwd / "r" / "data").exists()


def test_evaluate_reads_relative_data_model_and_baseline_and_writes_relative_out(cwd, rule_models, write_tiny_span, capsys):
    shutil.copytree(rule_models["bright"], cwd / "models" / "bright")
    shutil.copytree(rule_models["background"], cwd / "models" / "background")
    write_tiny_span(cwd / "mydata", 1, num=6)
    argv = ["evaluate", "--model", "models/bright", "--baseline", "models/background",
            "--data", "mydata/span-1/*.tfrecord*", "--out", "evals/e1", "--root", "r", *OPEN_GATE]
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert f"evaluation written to {cwd / 'evals' / 'e1'}" in out
    metrics = json.loads((cwd / "evals" / "e1" / "evaluation" / artifacts.EVALUATION_FILE).read_text())
    assert metrics["num_examples"] == 6  # every example of the relative --data
    assert metrics["model"].startswith(str(cwd / "models" / "bright"))
    assert metrics["baseline"]["model"].startswith(str(cwd / "models" / "background"))
    assert (cwd / "evals" / "e1" / "blessing" / artifacts.BLESSING_FILE).is_file()


def test_predict_reads_relative_model_and_images_and_writes_relative_out(cwd, rule_models, capsys):
    shutil.copytree(rule_models["bright"], cwd / "models" / "bright")
    (cwd / "imgs").mkdir()
    Image.fromarray(np.full((24, 20, 3), 200, np.uint8)).save(cwd / "imgs" / "a.png")
    assert main(["predict", "--model", "models/bright", "imgs", "--out", "preds"]) == EXIT_OK
    assert f"to {cwd / 'preds'}" in capsys.readouterr().out
    mask = np.asarray(Image.open(cwd / "preds" / "a_mask.png"))
    assert mask.shape == (24, 20) and mask.min() > 0  # a bright image is foreground everywhere


def test_train_writes_model_and_model_run_under_relative_out(cwd, tiny_transform, rule_models, tiny_pipeline_overrides, capsys):
    shutil.copytree(tiny_transform["transformed"], cwd / "t" / "transformed")
    shutil.copytree(tiny_transform["graph"], cwd / "t" / "graph")
    shutil.copytree(rule_models["bright"], cwd / "models" / "bright")
    argv = ["train", "--transformed", "t/transformed", "--transform-graph", "t/graph", "--out", "trained",
            "--model", "models/bright", "--root", "r", *_set_flags(tiny_pipeline_overrides("r"))]
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert artifacts.read_info(cwd / "trained" / "model").type == artifacts.MODEL
    assert artifacts.read_info(cwd / "trained" / "model_run").type == artifacts.MODEL_RUN
    # The warm-start input was read from the relative --model (a 1x1 conv: another architecture).
    assert str(cwd / "models" / "bright" / artifacts.KERAS_MODEL_FILE) in out
    assert (cwd / "r" / ".trainer_backups").is_dir()  # the default resume state is under the relative --root


def test_train_applies_a_plan_below_explicit_settings(cwd, tiny_transform, tiny_pipeline_overrides, capsys):
    plan = cwd / "p" / "plan"
    plan.mkdir(parents=True)
    (plan / "plan.json").write_text(json.dumps({"overrides": {"train.epochs": 2, "train.batch_size": 4}}))
    overrides = tiny_pipeline_overrides("r")
    del overrides["train.epochs"]  # left to the plan; train.batch_size stays set explicitly (8)
    argv = ["train", "--transformed", str(tiny_transform["transformed"]), "--transform-graph",
            str(tiny_transform["graph"]), "--out", "trained", "--plan", "p/plan", *_set_flags(overrides)]
    assert main(argv) == EXIT_OK
    result = json.loads(capsys.readouterr().out.rsplit("\nwrote ", 1)[0])
    records = result["plan"]["records"]
    assert result["plan"]["configured_epochs"] == 2  # from the plan
    assert result["plan"]["steps_per_epoch"] == -(-records // 8)  # the explicit batch size, not the plan's 4


def test_output_files_and_data_roots_are_relative_to_cwd(cwd):
    assert main(["demo-data", "--num", "2", "--out", "d"]) == EXIT_OK
    assert sorted(p.name for p in (cwd / "d").iterdir() if p.is_dir()) == ["span-1"]
    assert main(["compile", "--out-file", "k/pipeline.yaml", "--root", "r"]) == EXIT_OK
    spec = next(yaml.safe_load_all((cwd / "k" / "pipeline.yaml").read_text()))  # the pipeline spec document
    assert spec["pipelineInfo"]["name"] == "segpipe"
