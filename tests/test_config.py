"""Typed configuration: layers, profiles, and one-line errors that name the field (exit 2)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from segpipe.pipeline.cli import main
from segpipe.pipeline.config import ConfigError, load_config, parse_override, with_overrides

BAD_CONFIGS = [
    ("unknown top-level key", "trainer:\n  epochs: 3\n", "trainer: unknown key"),
    ("unknown nested key", "train:\n  epoch: 3\n", "train.epoch: unknown key"),
    ("wrong type", "train:\n  epochs: ten\n", "train.epochs: expected int, got str 'ten'"),
    ("bool for int", "train:\n  batch_size: true\n", "train.batch_size: expected int, got bool"),
    ("section not a mapping", "model: 3\n", "model: expected a mapping"),
    ("below minimum", "train:\n  epochs: 0\n", "train.epochs: 0 is below the minimum 1"),
    ("not a choice", "train:\n  loss: mse\n", "train.loss: 'mse' is not one of bce, dice_bce"),
    ("threshold above 1", "evaluation:\n  pixel_accuracy_threshold: 1.5\n",
     "evaluation.pixel_accuracy_threshold: 1.5 is above the maximum 1.0"),
    ("threshold below 0", "evaluation:\n  min_foreground_iou: -0.1\n",
     "evaluation.min_foreground_iou: -0.1 is below the minimum 0.0"),
    ("image size vs depth", "transform:\n  image_size: 100\nmodel:\n  depth: 3\n",
     "transform.image_size: 100 is not divisible by 2**model.depth = 8"),
    ("pattern without span", "data:\n  input_pattern: 'data/*.tfrecord'\n", "data.input_pattern"),
    ("list for string", "pipeline_name: [a, b]\n", "pipeline_name: expected str, got list"),
    ("bad yaml", "train:\n  epochs: [1, 2\n", "not valid YAML"),
    ("unsafe yaml tag", "train: !!python/object/apply:os.system ['echo unsafe']\n", "not valid YAML"),
    ("not a mapping", "- a\n- b\n", "expected a mapping of sections, got list"),
    ("unknown profile", "profile: huge\n", "profile: 'huge' is not one of auto, demo, seed"),
    ("bad device", "train:\n  device: tpu\n", "train.device: 'tpu' is not auto, cpu:N or gpu:N"),
    ("no budget", "train:\n  budget_minutes: 0\n", "train.budget_minutes: 0.0 is below the minimum 0.5"),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_load_config_rejects_with_the_field_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


@pytest.mark.parametrize("text, message", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["config", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("segpipe: config error:") and message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(ConfigError, match="nowhere.yaml: cannot read config"):
        load_config(tmp_path / "nowhere.yaml")
    assert main(["config", "--config", str(tmp_path / "nowhere.yaml")]) == 2
    assert "nowhere.yaml: cannot read config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=-1", "train.epochs: -1 is below the minimum 1"),
        ("model.depth=8", "transform.image_size: 128 is not divisible by 2**model.depth = 256"),
        ("train.nope=1", "train.nope: unknown key"),
        ("epochs", "expected SECTION.FIELD=VALUE"),
    ],
)
def test_cli_set_overrides_are_validated(capsys, override, message):
    assert main(["config", "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_profiles_and_layers(tmp_path):
    assert load_config().profile == "auto"  # no preset: the plan step chooses from the data
    demo = load_config(profile="demo")
    assert demo.profile == "demo"
    assert (demo.transform.image_size, demo.model.base_filters, demo.model.depth) == (64, 16, 3)
    assert demo.model.batch_norm is True

    seed = load_config(profile="seed")
    assert (seed.transform.image_size, seed.model.base_filters, seed.model.depth) == (128, 64, 4)
    assert (seed.train.batch_size, seed.train.epochs) == (16, 20)

    user = tmp_path / "mine.yaml"
    user.write_text("profile: seed\ntrain:\n  epochs: 7\n  learning_rate: 1\n")
    cfg = load_config(user, overrides={"train.epochs": 2, "root": str(tmp_path / "r")})
    assert cfg.profile == "seed" and cfg.transform.image_size == 128
    assert cfg.train.epochs == 2  # --set beats the file
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.data_root == str(tmp_path / "r" / "data")
    assert cfg.serving_dir == str(tmp_path / "r" / "serving")
    assert cfg.input_pattern == str(tmp_path / "r" / "data" / "span-{SPAN}" / "*.tfrecord*")


def test_config_is_frozen_and_with_overrides_revalidates():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    assert with_overrides(cfg, {"train.epochs": 3}).train.epochs == 3
    with pytest.raises(ConfigError, match="evaluation.max_regression: 2.0 is above the maximum 1.0"):
        with_overrides(cfg, {"evaluation.max_regression": 2})


def test_parse_override_reads_yaml_scalars():
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("data.span=null") == ("data.span", None)
    assert parse_override("beam.pipeline_args=[--runner=FnApiRunner]") == (
        "beam.pipeline_args", ["--runner=FnApiRunner"])
    assert parse_override("kubeflow.image=") == ("kubeflow.image", "")


def test_default_yaml_is_safe_loadable_package_data_and_complete():
    from importlib import resources

    text = (resources.files("segpipe.pipeline") / "default.yaml").read_text()
    raw = yaml.safe_load(text)
    fields = {f.name for f in dataclasses.fields(load_config()) if not f.metadata.get("derived")}
    assert set(raw) == fields
    assert Path(str(resources.files("segpipe.pipeline") / "profiles" / "demo.yaml")).is_file()


def test_cli_config_show_prints_the_effective_config(capsys):
    assert main(["config", "--profile", "seed", "--set", "train.epochs=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["profile"] == "seed" and shown["train"]["epochs"] == 3
    assert shown["model"]["base_filters"] == 64


def test_explicit_names_what_the_user_set_and_nothing_else(tmp_path):
    assert load_config().explicit == ()
    assert load_config(profile="seed").explicit == ()  # a profile's preset is not the user's setting
    user = tmp_path / "mine.yaml"
    user.write_text("profile: demo\nmodel:\n  depth: 3\nkubeflow:\n  gpu_node_selector: {pool: gpu}\n")
    cfg = load_config(user, overrides={"train.epochs": 20, "train": {"loss": "bce"}})
    assert cfg.explicit == ("kubeflow.gpu_node_selector", "model.depth", "train.epochs", "train.loss")
    assert "explicit" not in cfg.as_dict()  # not a config value: `segpipe config` output loads again

    flagged = with_overrides(cfg, {"transform.image_size": 96})  # the run flags of `segpipe run`
    assert "transform.image_size" in flagged.explicit and flagged.transform.image_size == 96
    planned = with_overrides(cfg, {"train.batch_size": 8}, explicit=False)  # the plan's own overrides
    assert planned.train.batch_size == 8 and planned.explicit == cfg.explicit
