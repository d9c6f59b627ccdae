"""Pusher: versioned, atomic, never overwriting, untouched when not blessed; serving list/rollback."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from segpipe.components.core import artifacts
from segpipe.components.core.serving import SERVING_INFO_FILE, latest_blessed_model, list_version_numbers, resolve_saved_model

from segpipe.components import pusher
from segpipe.components.core.errors import BadInputError
from segpipe.pipeline import cli

REPO = Path(__file__).resolve().parent.parent


def make_model(root: Path, name: str, payload: str) -> Path:
    """A Model artifact layout with a fake SavedModel (the pusher copies bytes, it does not load)."""
    model = root / name
    saved = model / artifacts.SAVED_MODEL_DIR
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_text(f"graph {payload}")
    for i in range(4):
        (saved / "variables" / f"part-{i}").write_text(f"{payload} weights {i}" * 100)
    (model / artifacts.KERAS_MODEL_FILE).write_text(f"keras {payload}")
    return model


def make_blessing(root: Path, name: str, blessed: bool, reasons: tuple[str, ...] = ()) -> Path:
    uri = root / name
    uri.mkdir(parents=True)
    (uri / artifacts.BLESSING_FILE).write_text(json.dumps({"blessed": blessed, "reasons": list(reasons)}))
    return uri


def make_evaluation(root: Path, accuracy: float) -> Path:
    uri = root / f"eval-{accuracy}"
    uri.mkdir(parents=True)
    metrics = {"pixel_accuracy": accuracy, "foreground_iou": 0.7, "mean_iou": 0.8, "num_examples": 4}
    (uri / artifacts.EVALUATION_FILE).write_text(json.dumps(metrics))
    return uri


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with the sha256 of its bytes ('dir' for folders)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def blessed(tmp_path: Path) -> Path:
    return make_blessing(tmp_path, "blessing-yes", True)


def push(tmp_path: Path, model: Path, blessing: Path, serving: Path, n: int, keep_last: int = 0, **kwargs) -> dict:
    return pusher.push_model(str(model), str(blessing), str(tmp_path / f"pushed-{n}"), serving_dir=str(serving),
                             keep_last=keep_last, **kwargs)


def test_unblessed_model_leaves_serving_dir_byte_identical(tmp_path: Path, blessed: Path) -> None:
    serving = tmp_path / "serving"
    push(tmp_path, make_model(tmp_path, "m1", "one"), blessed, serving, 1)
    before = snapshot(serving)
    mtimes = {p: p.stat().st_mtime_ns for p in serving.rglob("*")}
    no = make_blessing(tmp_path, "blessing-no", False, ("pixel accuracy 0.812 < threshold 0.900",))
    result = push(tmp_path, make_model(tmp_path, "m2", "two"), no, serving, 2)
    assert result == {"pushed": False, "version": None, "path": None}
    assert snapshot(serving) == before
    assert {p: p.stat().st_mtime_ns for p in serving.rglob("*")} == mtimes
    record = json.loads((tmp_path / "pushed-2" / pusher.PUSH_RESULT_FILE).read_text())
    assert record["pushed"] is False and record["reasons"] == ["pixel accuracy 0.812 < threshold 0.900"]
    assert artifacts.read_info(tmp_path / "pushed-2").type == artifacts.PUSHED_MODEL


def test_unblessed_model_does_not_create_serving_dir(tmp_path: Path) -> None:
    no = make_blessing(tmp_path, "blessing-no", False)
    push(tmp_path, make_model(tmp_path, "m", "x"), no, tmp_path / "serving", 1)
    assert not (tmp_path / "serving").exists()


def test_versions_increase_and_carry_model_and_info(tmp_path: Path, blessed: Path) -> None:
    serving = tmp_path / "serving"
    evaluation = make_evaluation(tmp_path, 0.93)
    results = [
        push(tmp_path, make_model(tmp_path, f"m{i}", f"p{i}"), blessed, serving, i,
             evaluation_uri=str(evaluation), run_info={"run_id": f"run-{i}", "spans": [i]})
        for i in range(1, 4)
    ]
    assert [r["version"] for r in results] == [1, 2, 3]
    assert list_version_numbers(serving) == [1, 2, 3]
    v2 = serving / "2"
    assert (v2 / "saved_model.pb").read_text() == "graph p2"
    assert (v2 / artifacts.KERAS_MODEL_FILE).read_text() == "keras p2"
    info = json.loads((v2 / SERVING_INFO_FILE).read_text())
    assert info["version"] == 2 and info["run_id"] == "run-2" and info["spans"] == [2]
    assert info["metrics"]["pixel_accuracy"] == 0.93
    assert info["code_version"] == artifacts.code_version()
    assert latest_blessed_model(serving) == str(serving / "3")


def test_version_is_max_plus_one_and_never_overwritten(tmp_path: Path, blessed: Path) -> None:
    serving = tmp_path / "serving"
    (serving / "7" / "variables").mkdir(parents=True)
    (serving / "7" / "saved_model.pb").write_text("old seven")
    (serving / "7" / SERVING_INFO_FILE).write_text("{}")
    (serving / ".push-tmp-99-deadbeef").mkdir()  # a hidden temp folder is not a version
    result = push(tmp_path, make_model(tmp_path, "m", "new"), blessed, serving, 1)
    assert result["version"] == 8
    assert (serving / "7" / "saved_model.pb").read_text() == "old seven"
    assert list_version_numbers(serving) == [7, 8]


def test_push_interrupted_midway_leaves_no_partial_version(
    tmp_path: Path, blessed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serving = tmp_path / "serving"
    push(tmp_path, make_model(tmp_path, "m1", "one"), blessed, serving, 1)

    def copy_half_then_fail(src: Path, dst: Path) -> None:
        (dst / "variables").mkdir(parents=True)
        (dst / "saved_model.pb").write_bytes((src / "saved_model.pb").read_bytes())
        raise OSError("disk full")

    monkeypatch.setattr(pusher, "copy_tree", copy_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        push(tmp_path, make_model(tmp_path, "m2", "two"), blessed, serving, 2)
    assert list_version_numbers(serving) == [1]
    assert [p.name for p in serving.iterdir() if p.name.startswith(pusher.TMP_PREFIX)] == []
    assert not (tmp_path / "pushed-2").exists()
    monkeypatch.undo()
    assert push(tmp_path, make_model(tmp_path, "m3", "three"), blessed, serving, 3)["version"] == 2
    assert (serving / "2" / "saved_model.pb").read_text() == "graph three"


def test_push_killed_midway_is_invisible_and_cleaned_up(tmp_path: Path, blessed: Path) -> None:
    serving = tmp_path / "serving"
    push(tmp_path, make_model(tmp_path, "m1", "one"), blessed, serving, 1)
    marker = tmp_path / "copying"
    script = textwrap.dedent(
        f"""
        import shutil, time
        from pathlib import Path
        from segpipe.components import pusher

        def slow_copy(src, dst):
            dst.mkdir()
            shutil.copy2(src / "saved_model.pb", dst / "saved_model.pb")
            Path({str(marker)!r}).write_text("started")
            time.sleep(60)

        pusher.copy_tree = slow_copy
        pusher.push_model({str(make_model(tmp_path, "m2", "two"))!r}, {str(blessed)!r},
                          {str(tmp_path / "pushed-killed")!r}, serving_dir={str(serving)!r}, keep_last=0)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, "push subprocess ended before copying"
            assert time.monotonic() < deadline, "push subprocess never started copying"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    stale = [p.name for p in serving.iterdir() if p.name.startswith(pusher.TMP_PREFIX)]
    assert len(stale) == 1  # the killed push left its hidden temp folder ...
    assert list_version_numbers(serving) == [1]  # ... but no visible version
    assert latest_blessed_model(serving) == str(serving / "1")
    assert push(tmp_path, make_model(tmp_path, "m3", "three"), blessed, serving, 3)["version"] == 2
    assert not (serving / stale[0]).exists()


def test_concurrent_pushes_get_distinct_versions(tmp_path: Path, blessed: Path) -> None:
    serving = tmp_path / "serving"
    models = [make_model(tmp_path, f"m{i}", f"p{i}") for i in range(4)]
    results: list[dict] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(push(tmp_path, models[i], blessed, serving, i)))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["version"] for r in results) == [1, 2, 3, 4]
    payloads = {(serving / str(v) / "saved_model.pb").read_text() for v in range(1, 5)}
    assert payloads == {f"graph p{i}" for i in range(4)}


def test_keep_last_prunes_oldest_versions(tmp_path: Path, blessed: Path) -> None:
    serving = tmp_path / "serving"
    for i in range(1, 5):
        push(tmp_path, make_model(tmp_path, f"m{i}", f"p{i}"), blessed, serving, i, keep_last=2)
    assert list_version_numbers(serving) == [3, 4]
    assert sorted(p.name for p in serving.iterdir() if p.is_dir()) == ["3", "4"]


def test_rollback_repushes_as_new_highest_version(tmp_path: Path, blessed: Path) -> None:
    serving = tmp_path / "serving"
    for i in (1, 2):
        push(tmp_path, make_model(tmp_path, f"m{i}", f"p{i}"), blessed, serving, i, run_info={"run_id": f"r{i}"})
    result = pusher.rollback(serving, 1)
    assert result["version"] == 3
    assert (serving / "3" / "saved_model.pb").read_text() == "graph p1"
    assert (serving / "3" / artifacts.KERAS_MODEL_FILE).read_text() == "keras p1"
    info = json.loads((serving / "3" / SERVING_INFO_FILE).read_text())
    assert info["rolled_back_from"] == 1 and info["version"] == 3 and info["run_id"] == "r1"
    assert (serving / "1" / "saved_model.pb").read_text() == "graph p1"  # the source stays
    with pytest.raises(BadInputError, match="no such version.*available: 1, 2, 3"):
        pusher.rollback(serving, 9)


def test_blessed_model_without_saved_model_is_bad_input(tmp_path: Path, blessed: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no SavedModel"):
        push(tmp_path, tmp_path / "empty", blessed, tmp_path / "serving", 1)
    with pytest.raises(BadInputError, match="blessing not found"):
        push(tmp_path, tmp_path / "empty", tmp_path / "nowhere", tmp_path / "serving", 1)


def test_resolve_saved_model_layouts(tmp_path: Path, blessed: Path) -> None:
    model = make_model(tmp_path, "m", "x")
    assert resolve_saved_model(model) == model / artifacts.SAVED_MODEL_DIR
    assert resolve_saved_model(model / artifacts.SAVED_MODEL_DIR) == model / artifacts.SAVED_MODEL_DIR
    serving = tmp_path / "serving"
    for i in (1, 2):
        push(tmp_path, model, blessed, serving, i)
    assert resolve_saved_model(serving) == serving / "2"
    with pytest.raises(BadInputError, match="not a SavedModel folder"):
        resolve_saved_model(tmp_path / "nothing")


def test_cli_serving_list_and_rollback(tmp_path: Path, blessed: Path, capsys: pytest.CaptureFixture) -> None:
    serving = tmp_path / "serving"
    evaluation = make_evaluation(tmp_path, 0.9312)
    for i in (1, 2):
        push(tmp_path, make_model(tmp_path, f"m{i}", f"p{i}"), blessed, serving, i, evaluation_uri=str(evaluation))
    assert cli.main(["serving", "rollback", "1", "--serving-dir", str(serving)]) == 0
    assert "version 3 now serves the model of version 1" in capsys.readouterr().out
    assert cli.main(["serving", "list", "--root", str(tmp_path)]) == 0  # serving dir from the config
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
    assert "0.9312" in lines[1] and "rollback of 1" in lines[3]
    assert cli.main(["serving", "rollback", "5", "--serving-dir", str(serving)]) == 2
    assert "no such version" in capsys.readouterr().err
