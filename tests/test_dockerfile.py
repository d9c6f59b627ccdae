"""Static checks of the Dockerfile (no Docker engine here): base image, lock, user, entrypoint."""
from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    pairs = []
    for item in logical:
        keyword, _, args = item.partition(" ")
        pairs.append((keyword.upper(), args.strip()))
    return pairs


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions()


def _pinned(package: str) -> str:
    match = re.search(rf"^{package}==([^\s;]+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE | re.IGNORECASE)
    assert match, f"constraints.txt does not pin {package}"
    return match.group(1)


def test_base_image_is_the_tensorflow_gpu_image_matching_the_lock(instructions):
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms == ["tensorflow/tensorflow:2.16.2-gpu"]
    assert froms[0].split(":")[1].removesuffix("-gpu") == _pinned("tensorflow")


def test_segpipe_is_installed_with_the_lock_after_copying_it(instructions):
    keywords = [k for k, _ in instructions]
    installs = [i for i, (k, args) in enumerate(instructions) if k == "RUN" and "pip install" in args]
    assert installs, "no pip install in the Dockerfile"
    for index in installs:
        assert re.search(r"(-c|--constraint)[ =]constraints\.txt", instructions[index][1])
    copies_lock = [i for i, (k, args) in enumerate(instructions) if k == "COPY" and "constraints.txt" in args.split()]
    assert copies_lock and copies_lock[0] < installs[0]
    assert keywords.index("FROM") == 0


def test_copied_sources_exist_and_are_not_docker_ignored(instructions):
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()]
    for keyword, args in instructions:
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
            name = source.rstrip("/")
            assert not any(fnmatch.fnmatch(name, pattern) for pattern in ignored), f"{source} is in .dockerignore"
    for package in ("components", "pipeline", "schemas"):
        assert any(k == "COPY" and f"{package}/" in a.split() for k, a in instructions), f"{package}/ not copied"


def test_runs_as_a_non_root_user_after_the_install(instructions):
    users = [(i, args) for i, (k, args) in enumerate(instructions) if k == "USER"]
    assert users, "no USER instruction: the image would run as root"
    last_index, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    last_run = max(i for i, (k, _) in enumerate(instructions) if k == "RUN")
    assert last_index > last_run


def test_entrypoint_is_the_segpipe_command_in_exec_form(instructions):
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["segpipe"]
