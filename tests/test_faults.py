"""Fault injection through the real runner: nothing is lost, nothing is published by mistake.

Bad input files, every quarantine (schema anomaly) kind, SIGKILL during Transform, training and
Push followed by a rerun, a model below the gate, and bad config / CLI input. Everything goes
through `segpipe run` (in-process `pipeline.cli.main`, or a `segpipe` subprocess where the test
kills it). Data and models are tiny: 32x32 images, a 4-filter depth-2 U-Net, 1-2 epochs.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from segpipe.components.core import artifacts
from segpipe.components.core.data_format import encode_example, encode_png, write_labels, write_span
from segpipe.pipeline.cli import main

@pytest.fixture(scope="session")
def run_args(tiny_pipeline_overrides):
    """`run_args(root, **more)`: `segpipe run` arguments for the shared tiny config on `root`.

    On top of conftest's tiny overrides: no warm start, so a later run's new serving version does
    not retrain an unchanged model.
    """

    def _args(root: Path, **more: object) -> list[str]:
        overrides = tiny_pipeline_overrides(root, **{"train.warm_start": False, **more})
        args = ["run", "--root", overrides.pop("root")]
        for key, value in overrides.items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        return args

    return _args


def good_example(rng: np.random.Generator, example_id: str, size: int = 32) -> bytes:
    image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    y, x = rng.integers(0, size // 2, 2)
    image[y : y + size // 2, x : x + size // 2] = 220
    mask[y : y + size // 2, x : x + size // 2] = 1
    return encode_example(example_id, encode_png(image), encode_png(mask))


def write_good_span(data_root: Path, span: int, num: int, *, compress: bool = True, num_shards: int = 1) -> Path:
    rng = np.random.default_rng(span)
    write_labels(data_root, {0: "background", 1: "object"})
    folder, _ = write_span(
        data_root, span, (good_example(rng, f"s{span}-{i}") for i in range(num)), num_shards=num_shards, compress=compress
    )
    return folder


def published_artifacts(root: Path) -> list[Path]:
    """Every artifact folder under the root that carries its metadata file (i.e. is published)."""
    return sorted(p.parent for p in (root / "artifacts").glob(f"*/*/*/{artifacts.METADATA_FILE}"))


def assert_no_half_artifacts(root: Path) -> None:
    """Every visible artifact folder is published; anything unpublished is a hidden temp folder."""
    for node_dir in (root / "artifacts").glob("*/*/"):
        for output in node_dir.iterdir():
            if output.is_dir() and not output.name.startswith("."):
                assert artifacts.is_published(output), f"{output}: visible but has no {artifacts.METADATA_FILE}"


def hidden_temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp-*")) if folder.exists() else []


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and '<dir>' for folders): a byte-level snapshot."""
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def serving_versions(serving: Path) -> list[str]:
    return sorted(p.name for p in serving.iterdir() if p.name.isdigit()) if serving.exists() else []


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ bad input files


def _truncate_mid_record(span_folder: Path) -> Path:
    shard = sorted(span_folder.glob("part-*"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 20])  # the last record loses its tail and footer
    return shard


def _flip_byte(span_folder: Path) -> Path:
    shard = sorted(span_folder.glob("part-*"))[0]
    data = bytearray(shard.read_bytes())
    data[12 + 40] ^= 0xFF  # inside record 0's payload (after its 12-byte length header)
    shard.write_bytes(bytes(data))
    return shard


def _add_non_tfrecord(span_folder: Path) -> Path:
    stray = span_folder / "notes.tfrecord"
    stray.write_text("these are my labelling notes, not TFRecords\n" * 4)
    return stray


@pytest.mark.parametrize(
    "inject, expected",
    [
        (_truncate_mid_record, "truncated record"),
        (_flip_byte, "record 0: corrupted record"),
        (_add_non_tfrecord, "record 0: not a TFRecord file"),
    ],
    ids=["truncated-shard", "flipped-byte", "non-tfrecord-file"],
)
def test_bad_input_file_is_named_and_nothing_is_published(tmp_path, capsys, inject, expected, run_args):
    root = tmp_path / "root"
    span = write_good_span(root / "data", 1, 12, compress=False, num_shards=2)
    bad_file = inject(span)
    code, out, err = run_cli(run_args(root), capsys)
    assert code == 2, err
    assert str(bad_file) in err and expected in err
    assert "Traceback" not in err
    assert published_artifacts(root) == []
    assert hidden_temps(root / "artifacts") == []  # the failed step cleaned up its temp output
    assert not (root / "serving").exists()
    assert re.search(r"\[1/\d+\] example_gen +failed", out)


def test_empty_span_is_refused_and_nothing_is_published(tmp_path, capsys, run_args):
    root = tmp_path / "root"
    write_good_span(root / "data", 1, 12)
    empty_folder, count = write_span(root / "data", 2, iter(()), num_shards=1)
    assert count == 0 and list(empty_folder.glob("part-*"))
    code, _, err = run_cli(run_args(root), capsys)
    assert code == 2
    assert "span(s) [2] hold no readable examples" in err and str(root / "data") in err
    assert published_artifacts(root) == []
    assert not (root / "serving").exists()
    assert main(["runs", "--root", str(root)]) == 0
    assert "bad_input" in capsys.readouterr().out


# ------------------------------------------------------------------ schema anomalies


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def anomalous_records() -> dict[str, bytes]:
    """One example per quarantine kind of ExampleGen, keyed by the kind it must be reported as."""
    import tensorflow as tf

    rgb = np.full((32, 32, 3), 200, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    missing_mask = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode_png(rgb)])),
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"bad-missing_feature"])),
    })).SerializeToString()
    records = {
        "image_undecodable": (b"definitely not an image", encode_png(mask)),
        "image_channels": (_png(np.full((32, 32, 4), 100, np.uint8), "RGBA"), encode_png(mask)),
        "mask_undecodable": (encode_png(rgb), b"garbage mask bytes"),
        "mask_channels": (encode_png(rgb), encode_png(rgb)),
        "mask_values": (encode_png(rgb), encode_png(np.full((32, 32), 7, np.uint8))),
        "size_mismatch": (encode_png(rgb), encode_png(np.zeros((32, 40), np.uint8))),
        "too_small": (encode_png(rgb[:16, :16]), encode_png(mask[:16, :16])),
    }
    out = {kind: encode_example(f"bad-{kind}", image, m) for kind, (image, m) in records.items()}
    out["missing_feature"] = missing_mask
    return out


def read_ids(files: list[str]) -> set[str]:
    import tensorflow as tf

    ids = set()
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example = tf.train.Example.FromString(record.numpy())
        ids.add(example.features.feature[artifacts.ID_KEY].bytes_list.value[0].decode())
    return ids


@pytest.mark.slow
def test_every_anomaly_kind_stops_at_the_validator_and_never_reaches_training(tmp_path, capsys, run_args,
                                                                              tiny_pipeline_overrides):
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.local_runner import run_pipeline
    from segpipe.pipeline.pipeline import create_pipeline

    root = tmp_path / "root"
    bad = anomalous_records()
    rng = np.random.default_rng(3)
    good = {f"good-{i}": good_example(rng, f"good-{i}") for i in range(24)}
    write_labels(root / "data", {0: "background", 1: "object"})
    write_span(root / "data", 1, [*good.values(), *bad.values()])

    code, out, err = run_cli(run_args(root), capsys)
    assert code == 2
    assert "data gate FAILED" in err and "Traceback" not in err
    assert re.search(r"\[5/\d+\] example_validator    failed", out) and "transform " not in out
    [anomalies] = [p for p in published_artifacts(root) if p.parent.parent.name == "example_validator"]
    findings = {f["kind"]: f for f in json.loads((anomalies / "anomalies.json").read_text())["findings"]}
    for kind in bad:
        finding = findings[f"QUARANTINED:{kind}"]
        assert finding["blocking"] and finding["example_ids"] == [f"bad-{kind}"], finding
    assert not (root / "artifacts" / "transform").exists() and not (root / "artifacts" / "trainer").exists()

    # Within a tolerance the run goes on, and the quarantined examples stay out of every split
    # that Transform (and so training) reads.
    cfg = load_config(overrides=tiny_pipeline_overrides(
        root, **{"train.warm_start": False, "validation.max_invalid_fraction": 0.5}))
    nodes = create_pipeline(cfg)
    upto_transform = nodes[: [n.name for n in nodes].index("transform") + 1]
    result = run_pipeline(cfg, nodes=upto_transform)
    transformed = result.steps[-1].outputs["transformed_examples_uri"]
    examples = result.steps[0].outputs["examples_uri"]
    trained_on = read_ids([f for s in (artifacts.TRAIN, artifacts.EVAL) for f in artifacts.split_files(transformed, s)])
    every_split = read_ids([f for s in artifacts.SPLITS for f in artifacts.split_files(examples, s)])
    assert every_split == set(good)
    assert trained_on and trained_on <= set(good) and not trained_on & {f"bad-{k}" for k in bad}
    assert read_ids(artifacts.split_files(examples, artifacts.QUARANTINE)) == {f"bad-{k}" for k in bad}


# ------------------------------------------------------------------ SIGKILL, then rerun

# Runs `segpipe` in a child process that can pause at one point (after training epoch 1 is
# backed up, or halfway through copying a model into the serving dir), writing a marker file
# when it gets there, so the test kills it at that exact moment.
LAUNCHER = r"""
import shutil, sys, time
pause, marker, argv = sys.argv[1], sys.argv[2], sys.argv[3:]

def hold():
    open(marker, "w").close()
    time.sleep(600)

if pause == "training":
    import keras
    from segpipe.components import trainer
    make_callbacks = trainer.make_callbacks

    class HoldAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # runs after BackupAndRestore saved the epoch
            hold()

    trainer.make_callbacks = lambda *a, **k: [*make_callbacks(*a, **k), HoldAfterFirstEpoch()]
elif pause == "push":
    from segpipe.components import pusher

    def half_copy(src, dst):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("variables"))
        hold()

    pusher.copy_tree = half_copy
from segpipe.pipeline.cli import main
sys.exit(main(argv))
"""


def start_segpipe(argv: list[str], pause: str, marker: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, pause, str(marker), *argv],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )


def wait_for(condition, proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"segpipe exited {proc.returncode} before the kill point:\n{log_path.read_text()[-3000:]}")
        if time.time() > deadline:
            kill_group(proc)
            raise AssertionError(f"kill point not reached in {timeout}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child and anything it started (its own session), then reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float = 400) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"segpipe did not finish in {timeout}s:\n{log_path.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def killed_three_times(tmp_path_factory, run_args):
    """One root, four `segpipe run` processes: killed in Transform, in training, in Push; then rerun.

    Returns what each stage looked like right after its kill (artifact states, serving dir).
    """
    work = tmp_path_factory.mktemp("killed")
    root = work / "root"
    write_good_span(root / "data", 1, 24)
    argv = run_args(root, **{"train.epochs": 2})
    serving = root / "serving"
    seen: dict[str, dict] = {"root": root, "logs": {}}

    # 1. Transform: kill once its temporary output folder exists.
    log1, marker = work / "run1.log", work / "never"
    proc = start_segpipe(argv, "none", marker, log1)
    wait_for(lambda: bool(hidden_temps(root / "artifacts" / "transform")), proc, log1)
    time.sleep(1.0)  # let it write into the temp folder
    kill_group(proc)
    seen["transform"] = {
        "temps": hidden_temps(root / "artifacts" / "transform"),
        "published": [p.parent.parent.name for p in published_artifacts(root)],
        "result_files": sorted((root / "artifacts").glob("transform/*/result.json")),
    }
    assert_no_half_artifacts(root)

    # 2. Training: kill right after epoch 1 was completed and backed up.
    log2, marker = work / "run2.log", work / "trained-one-epoch"
    proc = start_segpipe(argv, "training", marker, log2)
    wait_for(marker.exists, proc, log2)
    kill_group(proc)
    seen["training"] = {
        "published": [p.parent.parent.name for p in published_artifacts(root)],
        "backups": sorted((root / ".trainer_backups").glob("*/state")),
    }
    assert_no_half_artifacts(root)

    # 3. Push: kill halfway through copying the model into the serving dir.
    log3, marker = work / "run3.log", work / "half-copied"
    proc = start_segpipe(argv, "push", marker, log3)
    wait_for(marker.exists, proc, log3)
    kill_group(proc)
    seen["push"] = {
        "versions": serving_versions(serving),
        "entries": sorted(p.name for p in serving.iterdir()),
        "published": [p.parent.parent.name for p in published_artifacts(root)],
    }
    assert_no_half_artifacts(root)

    # 4. Rerun with nothing in the way.
    log4 = work / "run4.log"
    proc = start_segpipe(argv, "none", work / "never", log4)
    seen["rerun_code"] = finish(proc, log4)
    seen["logs"] = {n: p.read_text() for n, p in (("run1", log1), ("run2", log2), ("run3", log3), ("run4", log4))}
    return seen


@pytest.mark.slow
def test_kill_during_transform_leaves_only_hidden_temp_output(killed_three_times):
    seen = killed_three_times["transform"]
    assert seen["temps"], "the kill came before Transform started writing"
    assert all(p.name.startswith(".") and ".tmp-" in p.name for p in seen["temps"])
    assert "transform" not in seen["published"] and seen["result_files"] == []
    assert {"example_gen", "statistics_gen", "schema_gen", "example_validator"} <= set(seen["published"])


@pytest.mark.slow
def test_kill_during_training_resumes_from_the_last_epoch(killed_three_times):
    root = killed_three_times["root"]
    assert "trainer" not in killed_three_times["training"]["published"]
    assert killed_three_times["training"]["backups"], "no BackupAndRestore state survived the kill"
    [result] = (root / "artifacts").glob("trainer/*/result.json")
    summary = json.loads(result.read_text())
    assert summary["initial_epoch"] == 1 and summary["epochs"] == 2
    assert "resuming" in killed_three_times["logs"]["run3"]
    assert not (root / ".trainer_backups").exists() or not any((root / ".trainer_backups").iterdir())


@pytest.mark.slow
def test_kill_during_push_never_shows_a_half_copied_version(killed_three_times):
    seen = killed_three_times["push"]
    assert seen["versions"] == []
    assert [e for e in seen["entries"] if not e.startswith(".")] == []  # only hidden temp + lock
    assert any(e.startswith(".push-tmp-") for e in seen["entries"])
    assert "pusher" not in seen["published"]


@pytest.mark.slow
def test_rerun_after_the_kills_completes_and_pushes_one_whole_version(killed_three_times):
    root = killed_three_times["root"]
    assert killed_three_times["rerun_code"] == 0, killed_three_times["logs"]["run4"][-3000:]
    serving = root / "serving"
    assert serving_versions(serving) == ["1"]
    version = serving / "1"
    for name in ("saved_model.pb", "variables", "model.keras", "segpipe.json"):
        assert (version / name).exists(), name
    assert [e.name for e in serving.iterdir() if e.name.startswith(".push-tmp-")] == []
    assert_no_half_artifacts(root)
    log = killed_three_times["logs"]["run4"]
    assert f"{'trainer':<20} cached" in log and f"{'pusher':<20} done" in log


@pytest.mark.slow
def test_model_below_threshold_is_not_pushed_and_serving_dir_is_untouched(killed_three_times, capsys, run_args):
    root = killed_three_times["root"]
    serving = root / "serving"
    before = tree_digest(serving)
    assert "1/saved_model.pb" in before
    argv = run_args(root, **{"train.epochs": 2, "evaluation.min_foreground_iou": 1.0})
    code, out, err = run_cli([*argv, "--force", "--threshold", "1.0"], capsys)
    assert code == 3, err
    assert "not blessed" in err and "Traceback" not in err
    assert f"{'pusher':<20} skipped" in out
    assert tree_digest(serving) == before


# ------------------------------------------------------------------ bad config and CLI input


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("segpipe")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["config", "--set", "model.wings=2"], "model.wings: unknown key"),
        (["config", "--set", "train.epochs=many"], "train.epochs: expected int"),
        (["config", "--config", "/nonexistent/segpipe.yaml"], "/nonexistent/segpipe.yaml"),
        (["run", "--set", "nosuchsection.x=1"], "nosuchsection"),
    ],
    ids=["unknown-key", "wrong-type", "missing-config-file", "unknown-section"],
)
def test_bad_config_exits_2_with_one_line(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in _one_line_error(capsys.readouterr().err)


def test_bad_yaml_values_in_a_config_file_exit_2(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  epochs: -3\n  batch_size: 8\n")
    assert main(["config", "--config", str(config)]) == 2
    assert "train.epochs" in _one_line_error(capsys.readouterr().err)
    config.write_text("train: [not, a, mapping\n")
    assert main(["config", "--config", str(config)]) == 2
    assert str(config) in _one_line_error(capsys.readouterr().err)


def test_unwritable_output_folder_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should go")
    assert main(["demo-data", "--num", "2", "--out", str(blocker / "data")]) == 2
    assert str(blocker) in _one_line_error(capsys.readouterr().err)
    assert main(["run", "--root", str(blocker / "root")]) == 2
    assert str(blocker) in _one_line_error(capsys.readouterr().err)
    assert blocker.read_text() == "a file where a folder should go"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["predict", "--model", "/nonexistent/model", "--out", "OUT", "x.png"], "/nonexistent/model"),
        (["import", "folders", "--images", "/nonexistent/img", "--masks", "/nonexistent/msk", "--out", "OUT"],
         "/nonexistent/img"),
        (["run", "--root", "ROOT", "--set", "data.root=OUT", "--data", "nowhere-{SPAN}/*.tfrecord"], "nowhere-{SPAN}"),
        (["run", "--root", "ROOT", "--set", "data.root=OUT", "--data", "flat/*.tfrecord"], "no {SPAN} placeholder"),
    ],
    ids=["predict-missing-model", "import-missing-folder", "run-no-matching-files", "run-pattern-without-span"],
)
def test_missing_input_exits_2_with_one_line(argv, expected, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("ROOT", str(tmp_path / "root")) for a in argv]
    assert main(argv) == 2
    assert expected in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv", [["run", "--epochs", "three"], ["run", "--no-such-flag"], ["predict", "--model", "m"]],
    ids=["bad-int", "unknown-flag", "missing-required"],
)
def test_bad_cli_arguments_exit_2_without_traceback(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("segpipe") and "error:" in err.strip().splitlines()[-1]
