"""The terminal shows segpipe's own lines; library output goes to the log file (`-v`: both).

Each command runs in a subprocess, so file descriptor 2 is the real one and TensorFlow's C++
logging takes the path it takes for a user.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from segpipe.pipeline import console

SEGPIPE = "import sys; from segpipe.pipeline.cli import main; sys.exit(main())"

# What a first `segpipe run` printed before the console module: TensorFlow's C++ registration
# errors (fd 2), google-api-core's FutureWarning (Python warnings), Beam's crcmod warning (root
# logger), TFDV's IPython notice (sys.stderr at import), Keras's shuffle warning, RunInference's
# resource warning.
NOISE = ("Unable to register cu", "FutureWarning", "crcmod", "Unable to import IPython", "shuffle=True",
         "Resource module is not available")


def run_segpipe(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # a user's environment
    return subprocess.run([sys.executable, "-c", SEGPIPE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_log(result: subprocess.CompletedProcess, root: Path) -> Path:
    """The run's log file, `<root>/logs/<run id>.log`, as `segpipe run` announces it."""
    path = Path(re.search(r"^log: (.+)$", result.stdout, re.M).group(1))
    assert path.parent == root.resolve() / console.LOGS_DIR and re.fullmatch(r"run-[\w-]+\.log", path.name)
    finished = re.search(r"^run (run-\S+): ", result.stdout, re.M)
    assert finished is None or path.name == f"{finished.group(1)}.log"
    return path


def tiny_run_args(root: Path, overrides: dict, *more: str) -> list[str]:
    args = ["run", "--root", str(root), *more]
    for key, value in overrides.items():
        if key != "root":
            args += ["--set", f"{key}={json.dumps(value)}"]
    return args


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tiny_pipeline_overrides):
    """One whole `segpipe run` on 40 demo images, default verbosity."""
    root = tmp_path_factory.mktemp("console") / "root"
    result = run_segpipe(tiny_run_args(root, tiny_pipeline_overrides(root), "--demo-size", "40"), root.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_a_default_run_prints_only_segpipe_lines(default_run):
    root, result = default_run
    terminal = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in terminal, noise
    # What it does print: a line per step, per Beam pipeline and per epoch; no progress bar off a TTY.
    assert re.search(r"\[1/\d+\] example_gen +done", result.stdout) and "pushed model:" in result.stdout
    assert "example_gen: Beam pipeline done in" in result.stderr
    assert re.search(r"^\S+ transform: Beam pipeline done in \d+\.\ds; .*records\[train\]=\d+", result.stderr, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d epoch 1/1  loss=\d\.\d{4}  .*val_loss=\d\.\d{4}", result.stderr, re.M)
    assert "\r" not in result.stderr
    # Every stderr line is one of segpipe's: `HH:MM:SS message` (no library logger names).
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in result.stderr.splitlines()), result.stderr


def test_the_run_log_keeps_the_library_output(default_run):
    root, result = default_run
    text = run_log(result, root).read_text()
    for library_line in ("Unable to register cu", "FutureWarning", "crcmod", "Unable to import IPython"):
        assert library_line in text, library_line
    assert "INFO apache_beam" in text  # library INFO logging too
    assert "INFO segpipe.components.core.progress: epoch 1/1" in text  # and segpipe's own lines
    assert list((root / console.LOGS_DIR).iterdir()) == [run_log(result, root)]  # renamed, not copied


def test_a_segpipe_warning_and_the_one_line_error_still_show(tmp_path, tiny_pipeline_overrides):
    root = tmp_path / "root"
    # Five demo images leave the eval split empty: ExampleGen warns, the trainer then refuses.
    result = run_segpipe(tiny_run_args(root, tiny_pipeline_overrides(root), "--demo-size", "5"), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(r"^\d\d:\d\d:\d\d WARNING ExampleGen: split eval is empty", result.stderr, re.M)
    last = result.stderr.splitlines()[-1]
    assert last.startswith("segpipe: ") and "eval split has no records" in last
    for noise in NOISE:
        assert noise not in result.stderr, noise
    text = run_log(result, root).read_text()
    assert "split eval is empty" in text and "command ended with BadInputError" in text


def test_verbose_shows_the_library_output_on_the_terminal_too(tmp_path, tiny_pipeline_overrides):
    root = tmp_path / "root"
    result = run_segpipe(["-v", *tiny_run_args(root, tiny_pipeline_overrides(root), "--demo-size", "5")], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    text = run_log(result, root).read_text()
    for library_line in ("Unable to register cu", "FutureWarning", "crcmod", "Unable to import IPython"):
        assert library_line in result.stderr, library_line
        assert library_line in text, library_line
    assert re.search(r"^\d\d:\d\d:\d\d DEBUG segpipe\.", result.stderr, re.M)  # -v: segpipe's DEBUG lines


# ---------------------------------------------------------------- the mechanics, without TensorFlow

SESSION = """
import logging, os, sys, warnings
from pathlib import Path
from segpipe.pipeline import console

own_file = str(Path(console.__file__).parent / "pipeline.py")
with console.session(verbose=sys.argv[1] == "-v", log_path=Path(sys.argv[2]) if len(sys.argv) > 2 else None):
    os.write(2, b"C++ NOISE\\n")
    sys.stderr.write("PY STDERR\\n")
    logging.getLogger("absl").warning("LIBRARY WARNING")
    logging.getLogger("apache_beam").info("LIBRARY INFO")
    warnings.warn("LIBRARY FUTURE", FutureWarning)
    warnings.warn_explicit("OWN PY WARNING", UserWarning, own_file, 1)
    logging.getLogger("segpipe.example").warning("OWN WARNING")
    logging.getLogger("segpipe.example").info("OWN INFO")
    logging.getLogger("segpipe.example").debug("OWN DEBUG")
print("AFTER", file=sys.stderr)
"""
LIBRARY = ("C++ NOISE", "PY STDERR", "LIBRARY WARNING", "LIBRARY INFO", "LIBRARY FUTURE")
OWN = ("OWN PY WARNING", "OWN WARNING", "OWN INFO")


def run_session(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SESSION, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("verbose", [False, True])
def test_session_routes_each_kind_of_output(tmp_path, verbose):
    log_path = tmp_path / "logs" / "x.log"
    result = run_session(tmp_path, "-v" if verbose else "-", str(log_path))
    assert result.returncode == 0, result.stderr
    text = log_path.read_text()
    for line in (*LIBRARY, *OWN):
        assert line in text, line
        assert (line in result.stderr) == (verbose or line in OWN), line
    assert ("OWN DEBUG" in result.stderr) == verbose and ("OWN DEBUG" in text) == verbose
    assert result.stderr.rstrip().endswith("AFTER") and "AFTER" not in text  # fd 2 restored after the session


def test_without_a_log_file_library_output_is_dropped(tmp_path):
    result = run_session(tmp_path, "-")
    assert result.returncode == 0, result.stderr
    assert all(line not in result.stderr for line in LIBRARY) and all(line in result.stderr for line in OWN)
    assert list(tmp_path.iterdir()) == []


def test_move_log_renames_the_live_file_and_an_empty_log_is_removed(tmp_path, capsys):
    first, moved = tmp_path / "logs" / "segpipe-run.log", tmp_path / "logs" / "run-1.log"
    assert console.move_log(moved) is None  # no session: nothing to move
    with console.session(verbose=False, log_path=first):
        logging.getLogger("segpipe.example").info("before the move")
        assert console.move_log(moved) == moved
        logging.getLogger("segpipe.example").info("after the move")
    assert not first.exists()
    assert "before the move" in moved.read_text() and "after the move" in moved.read_text()
    assert "after the move" in capsys.readouterr().err
    empty = tmp_path / "logs" / "segpipe-config.log"
    with console.session(verbose=False, log_path=empty):
        pass
    assert not empty.exists()


def test_command_log_path_never_creates_a_root_for_other_commands(tmp_path):
    assert console.command_log_path(tmp_path / "absent", "runs", create=False) is None
    path = console.command_log_path(tmp_path, "evaluate", create=False)
    assert path.parent == tmp_path / console.LOGS_DIR and path.name.startswith("segpipe-evaluate-")
    assert console.command_log_path(tmp_path / "new", "run", create=True).parent == tmp_path / "new" / console.LOGS_DIR
