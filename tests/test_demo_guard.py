"""Demo data only when asked: segpipe never trains on synthetic images when the user named data.

The failure this guards against: in a folder holding `span-1/`, `segpipe run --root ../other
--data "span-{SPAN}/*.tfrecord.gz"` generated 1,000 demo images under `../other/data`, trained on
them and pushed, exit 0. Whenever a pattern or a data root is given, segpipe reads exactly that.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.components.core import artifacts
from segpipe.pipeline.cli import main


@pytest.fixture
def run_argv(tiny_pipeline_overrides):
    def _argv(root: Path, *extra: str, **more: object) -> list[str]:
        overrides = tiny_pipeline_overrides(root, **more)
        argv = ["run", "--root", str(overrides.pop("root")), *extra]
        for key, value in overrides.items():
            argv += ["--set", f"{key}={json.dumps(value)}"]
        return argv

    return _argv


def _examples_seen(root: Path) -> set[str]:
    """Example ids in every published Examples artifact under the root (all splits)."""
    import tensorflow as tf

    from segpipe.components.core.data_format import parse_example

    ids = set()
    for info in (root / "artifacts" / "example_gen").glob(f"*/examples/{artifacts.METADATA_FILE}"):
        for record in tf.data.TFRecordDataset(sorted(map(str, info.parent.rglob("*.tfrecord.gz"))), "GZIP"):
            ids.add(parse_example(record.numpy())[0])
    return ids


def test_relative_data_with_another_root_trains_on_the_users_data_only(tmp_path, monkeypatch, write_tiny_span, run_argv):
    work = tmp_path / "work"
    write_tiny_span(work, 1, num=24, size=(32, 32))
    monkeypatch.chdir(work)
    code = main(run_argv(Path("../myroot2"), "--data", "span-{SPAN}/*.tfrecord.gz"))
    root = tmp_path / "myroot2"
    assert code == 0
    assert not (root / "data").exists()  # no demo span was generated
    seen = _examples_seen(root)
    assert seen and all(example_id.startswith("s1-") for example_id in seen)


@pytest.mark.parametrize(
    "extra, more",
    [
        (("--data", "nothing-here/span-{SPAN}/*.tfrecord.gz"), {}),
        ((), {"data.root": "my_data"}),
        ((), {"data.input_pattern": "batch-{SPAN}/*.tfrecord.gz"}),
    ],
    ids=["--data", "data.root", "data.input_pattern"],
)
def test_named_data_that_matches_nothing_is_exit_2_naming_the_path_and_no_demo(tmp_path, monkeypatch, capsys,
                                                                              run_argv, extra, more):
    monkeypatch.chdir(tmp_path)
    code = main(run_argv(Path("root"), *extra, **more))
    err = capsys.readouterr().err
    assert code == 2
    resolved = {"--data": str(tmp_path / "nothing-here"), "data.root": str(tmp_path / "root" / "my_data"),
                "data.input_pattern": str(tmp_path / "root" / "data" / "batch-")}
    key = "--data" if extra else next(iter(more))
    assert resolved[key] in err and "no files match" in err
    assert not (tmp_path / "root" / "data").exists() or not any((tmp_path / "root" / "data").glob("span-*"))
    assert not (tmp_path / "root" / "serving").exists()


def test_demo_flag_cannot_be_combined_with_named_data(tmp_path, monkeypatch, capsys, run_argv):
    monkeypatch.chdir(tmp_path)
    code = main(run_argv(Path("root"), "--demo", "--data", "span-{SPAN}/*"))
    assert code == 2 and "--demo" in capsys.readouterr().err
    assert not (tmp_path / "root" / "data").exists()


def test_plain_run_on_a_fresh_root_says_it_generated_the_demo(tmp_path, monkeypatch, capsys, run_argv):
    monkeypatch.chdir(tmp_path)
    code = main(run_argv(Path("root"), "--demo-size", "24"))
    out = capsys.readouterr().out
    assert code == 0
    assert "no data given: generated the built-in demo dataset (24 synthetic images)" in out
    assert (tmp_path / "root" / "data" / "span-1").is_dir()
