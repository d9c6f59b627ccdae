"""Every short `segpipe` command in README.md runs as written.

Commands are taken from fenced ```bash / ```sh / ```console blocks: each line (continuations joined,
a leading `$ ` prompt and trailing `# comments` dropped) and each `&&`-chained part that starts with
`segpipe `. Each block runs in order in its own fresh sandbox folder (the reader's current
directory), in-process through `pipeline.cli.main`, and must exit 0. Two rewrites keep it cheap and
contained, nothing else: `demo-data --num N` writes at most 16 images, and an absolute path is
re-rooted inside the sandbox. The sandbox holds `my/images`, `my/masks` and `my/labels.json`, the
reader's own data the README's import examples point at. Commands that need a cluster, a download
or minutes of training are skipped by the explicit list SKIP below, each with the test that
covers it instead.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from segpipe.pipeline.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
MAX_DEMO_IMAGES = 16

# The only commands not run here, and why (pattern searched in the command line).
SKIP: dict[str, str] = {
    # Trains a model (minutes on 2 cores): tests/test_own_data.py, test_pipeline_local.py, test_faults.py.
    r"^segpipe run\b": "trains a model",
    # Need a Kubeflow Pipelines deployment: tests/test_kubeflow.py runs them against a stub API.
    r"^segpipe (submit|schedule)\b": "needs a Kubeflow cluster",
    # Needs the Oxford-IIIT Pet download (800 MB): tests/test_importers.py builds a fake one.
    r"^segpipe import oxford-pets\b": "needs the Oxford-IIIT Pet download",
    # Need a trained, pushed model or earlier runs: tests/test_own_data.py, test_predict.py,
    # test_evaluator.py, test_pusher.py and test_pipeline_local.py run them on one.
    r"^segpipe (predict|evaluate|lineage|runs|gc|serving rollback)\b": "needs a trained model",
    # Placeholders the reader fills in (`<root>`, `path/to/...`) cannot run as written.
    r"<[^>]+>|\bpath/to/": "placeholder",
}


@dataclass(frozen=True)
class Command:
    line: int  # 1-based line in README.md
    block: int  # index of the fenced block
    text: str


def extract_commands(text: str) -> list[Command]:
    """`segpipe ...` commands from the shell code blocks of a Markdown text."""
    commands: list[Command] = []
    in_block, runnable, block, pending, start = False, False, -1, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_block, runnable = not in_block, stripped[3:].strip().lower() in SHELL_LANGUAGES
            block += in_block
            pending = ""
            continue
        if not (in_block and runnable):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line, pending = (pending + stripped).removeprefix("$ "), ""
        for part in re.split(r"\s&&\s|;\s", line):
            part = part.strip()
            if part.startswith("segpipe ") or part == "segpipe":
                words = shlex.split(part, comments=True)
                commands.append(Command(start, block, shlex.join(words)))
    return commands


def skip_reason(command: str) -> str | None:
    for pattern, reason in SKIP.items():
        if re.search(pattern, command):
            return reason
    return None


def rewrite(words: list[str], sandbox: Path) -> list[str]:
    """Cap demo-data sizes and keep absolute paths inside the sandbox (see the module docstring)."""
    out = []
    for index, word in enumerate(words):
        if index and words[index - 1] == "--num" and words[1] == "demo-data":
            word = str(min(int(word), MAX_DEMO_IMAGES))
        elif word.startswith("/"):
            word = str(sandbox / word.lstrip("/"))
        out.append(word)
    return out


def make_own_data(folder: Path) -> None:
    """A few image/mask pairs where the README's import examples look for the reader's data."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(4):
        mask = np.zeros((40, 40), np.uint8)
        mask[10:30, 5 + i : 25 + i] = 1
        image = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
        image[mask == 1] = 200
        Image.fromarray(image).save(folder / "images" / f"img{i}.png")
        Image.fromarray(mask).save(folder / "masks" / f"img{i}.png")
    (folder / "labels.json").write_text(json.dumps({"0": "background", "1": "object"}))


def test_extractor_reads_shell_blocks_only():
    text = "\n".join([
        "```bash", "segpipe demo-data --num 5   # five", "pip install x && segpipe --help", "```",
        "```python", "segpipe config", "```",
        "```", "segpipe runs", "```",
        "```sh", "$ segpipe compile --out p.yaml \\", "    --image img:1", "echo segpipe no", "```",
    ])
    found = [(c.block, c.text) for c in extract_commands(text)]
    assert found == [(0, "segpipe demo-data --num 5"), (0, "segpipe --help"),
                     (3, "segpipe compile --out p.yaml --image img:1")]


def test_readme_has_the_first_hour_commands():
    commands = [c.text for c in extract_commands(README.read_text())]
    assert "segpipe run" in commands  # the first command: install and run on the demo data
    assert any(c.startswith("segpipe ") for c in commands)


def _blocks() -> list[list[Command]]:
    blocks: dict[int, list[Command]] = {}
    for command in extract_commands(README.read_text()):
        blocks.setdefault(command.block, []).append(command)
    return [cmds for cmds in blocks.values() if any(skip_reason(c.text) is None for c in cmds)]


BLOCKS = _blocks()


@pytest.mark.skipif(not BLOCKS, reason="README.md has no runnable segpipe command yet")
@pytest.mark.parametrize("commands", BLOCKS, ids=[f"README-line-{cmds[0].line}" for cmds in BLOCKS] or None)
def test_readme_block_runs_as_written(commands, tmp_path, monkeypatch, capsys):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    make_own_data(sandbox / "my")
    monkeypatch.chdir(sandbox)
    for command in commands:
        if skip_reason(command.text):
            continue
        argv = rewrite(shlex.split(command.text), sandbox)[1:]
        try:
            code = main(argv)
        except SystemExit as exc:  # --help and argparse errors exit through SystemExit
            code = exc.code
        captured = capsys.readouterr()
        assert code == 0, f"README line {command.line}: `{command.text}` exited {code}\n{captured.err[-2000:]}"
        assert "Traceback" not in captured.err
