"""One top-level import package, `segpipe`, mapped from the repository's top-level folders.

Run from outside the repository: inside it, Python would find `components/` and `pipeline/` as
top-level packages through the current directory and hide a packaging mistake.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_installed_package_imports_from_anywhere_and_generic_names_do_not(tmp_path):
    ok = _python(
        "import segpipe.components.core.artifacts as a, segpipe.pipeline.cli, segpipe.schemas\n"
        "from segpipe.pipeline.config import load_config\n"
        "cfg = load_config()\n"
        "print(cfg.profile, a.code_version())",
        tmp_path,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    for generic in ("components", "pipeline", "schemas"):
        probe = _python(f"import {generic}", tmp_path)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, f"`import {generic}` works: {probe}"


def test_the_wheel_holds_exactly_one_top_level_package(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "components", "pipeline", "schemas"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("segpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"segpipe"}
    for data in ("segpipe/pipeline/default.yaml", "segpipe/pipeline/profiles/demo.yaml", "segpipe/schemas/schema.pbtxt"):
        assert data in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "segpipe = segpipe.pipeline.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()
