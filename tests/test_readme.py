"""Every command in README.md and docs/*.md works as written, and README stays the front door.

Pages are read in order (README.md, then docs/*.md by name). In each fenced block:

- ```bash / sh / shell / console: every command (continuations joined, `$ ` prompts and
  `# comments` dropped, `&&` / `;` / `|` chains split). A `segpipe ...` command runs in-process
  through `segpipe.pipeline.cli.main`, with the block's sandbox as the current directory, and must
  exit 0 (or a code EXPECTED_EXIT allows, with its reason) without a traceback. A command that needs
  a cluster or minutes of training is instead parsed by the real parser (`build_parser()`) for the
  reason PARSE_ONLY gives. Other programs are handled as EXTERNAL says: checked (a script and its
  flags exist, a file exists), parsed (the segpipe arguments of `docker run segpipe:...`), run
  (`saved_model_cli`), or left out for the reason stated there.
- ```python: executed in the sandbox, except the blocks COMPILE_ONLY names (compiled only).
- ```yaml: loaded as a segpipe config file (`load_config`); ```json: parsed.

Sandboxes. Each block gets a fresh folder holding what the pages call the reader's own files:
`my/images`, `my/masks`, `my/labels.json`, `my/new_images`, `my_photos/`, an Oxford-IIIT Pet
layout in `pets/`, and `mine.yaml`. A block that needs a trained model (NEEDS_MODEL) and does not
train one itself runs instead in the shared workspace: the same files plus a `segpipe_root` where
one tiny `segpipe run` has pushed version 1, used by those blocks in page order, like a reader who
did README's first session and reads on.

Rewrites that keep it fast and contained, nothing else: a `segpipe run` that runs gets
conftest's `tiny_pipeline_overrides` as `--set` flags and at most MAX_DEMO_IMAGES demo images;
`demo-data --num N` writes at most MAX_DEMO_IMAGES; an absolute path is re-rooted inside the
sandbox; an unquoted glob expands as a shell would.

The pages themselves: README is at most MAX_README_LINES lines and starts with the two one-line
commands (install + run on the demo data, install + tests; `.ci/run` runs the second verbatim), its
table names every subcommand of `segpipe --help`, every `segpipe.*` name in a page imports, every
relative link resolves, and the path rule is stated in docs/configuration.md only.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import inspect
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from segpipe.pipeline.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
PATHS_PAGE = REPO / "docs" / "configuration.md"  # the one page that states how paths resolve

MAX_README_LINES = 300
FIRST_COMMANDS = (
    "pip install -c constraints.txt -e . && segpipe run",  # install + run on the demo data
    'pip install -c constraints.txt -e ".[test]" && pytest',  # install + the tests (.ci/run)
)
MAX_DEMO_IMAGES = 32  # enough for non-empty eval and test splits of the demo data

SHELL = {"bash", "sh", "shell", "console"}
CHAIN = {"&&", ";", "||", "|"}

# The block whose `segpipe run` commands run for real (with tiny overrides): the front door.
PIPELINE_BLOCKS = {("README.md", "A first session")}

# segpipe commands that are parsed, not run: (pattern on the command, reason).
PARSE_ONLY: list[tuple[str, str]] = [
    (r"^segpipe (submit|schedule)\b",
     "needs a Kubeflow Pipelines deployment; tests/test_kubeflow.py runs both against a local stand-in for its API"),
    (r"^segpipe train\b",
     "trains with the profile's settings for minutes; tests/test_trainer.py runs the trainer on tiny data"),
    (r"^segpipe run\b",
     ("trains with the page's settings for minutes; README's first session runs `segpipe run` here on tiny data, "
      "and tests/test_pipeline_local.py, test_retraining.py and test_own_data.py cover its flags")),
]

# Commands allowed to exit with another code than 0, and why.
EXPECTED_EXIT: list[tuple[str, set[int], str]] = [
    (r"^segpipe evaluate\b", {0, 3}, "the tiny workspace model may well fail the default gate: exit 3 is its verdict"),
]

# Blocks that need a model (or artifacts of an earlier run) and so run in the workspace.
NEEDS_MODEL = re.compile(
    r"segpipe_root/(serving|artifacts|data/span-1/)|^segpipe (runs|lineage|gc|serving|predict|evaluate|train|schema infer)\b",
    re.MULTILINE,
)

# Python blocks that are compiled only, by a phrase they contain, and why.
COMPILE_ONLY = {"localhost:8501": "talks to a running TensorFlow Serving",
                "localhost:8500": "talks to a running TensorFlow Serving's gRPC port"}

# Programs other than segpipe that the pages use: how each is checked, and why it is not run.
EXTERNAL = {
    "pip": "installs into the environment; .ci/run runs README's install + test command in a fresh virtualenv",
    "pytest": "the test suite itself, run by .ci/run",
    "docker": "no Docker engine here; tests/test_dockerfile.py checks the Dockerfile, the segpipe arguments are parsed",
    "mkdir": "prepares the Oxford-IIIT Pet download, which is not fetched here (the sandbox holds a fake one)",
    "tar": "unpacks the Oxford-IIIT Pet download, which is not fetched here (the sandbox holds a fake one)",
    "curl": "talks to a running TensorFlow Serving",
    "kubectl": "needs a Kubernetes cluster with KServe; tests/test_deploy.py checks the manifest against KServe's CRD",
    "python": "benchmarks run for up to an hour: the script and every flag given must exist",
    "saved_model_cli": "run for real",
}


# ------------------------------------------------------------------ reading the pages


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    lang: str
    heading: str  # the nearest heading above the block
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Command:
    line: int  # 1-based line in the page
    raw: str  # the command as written (one segment of a chain)
    words: tuple[str, ...]


def read_blocks(text: str, page: str) -> list[Block]:
    """Fenced blocks with their language and the heading above them."""
    blocks: list[Block] = []
    heading, fence, lang, start, body = "", None, "", 0, []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, lang, start, body = "```", stripped[3:].strip().lower(), number, []
            elif raw.startswith("#"):
                heading = raw.lstrip("#").strip()
        elif stripped.startswith("```"):
            blocks.append(Block(page, start, lang, heading, "\n".join(body)))
            fence = None
        else:
            body.append(raw)
    assert fence is None, f"{page}: fenced block opened at line {start} is never closed"
    return blocks


def split_commands(block: Block) -> list[Command]:
    """The commands of a shell block (see the module docstring)."""
    commands: list[Command] = []
    pending, start = "", 0
    for offset, raw in enumerate(block.text.splitlines(), 1):
        stripped = raw.strip()
        if not pending:
            start = block.line + offset
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line, pending = (pending + stripped).removeprefix("$ "), ""
        if not line or line.startswith("#"):
            continue
        assert "<<" not in line, f"{block.page}:{start}: heredocs are not checked; put the code in a python block"
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        segment: list[str] = []
        for word in [*lexer, ";"]:
            if word in CHAIN:
                if segment:
                    commands.append(Command(start, line, tuple(segment)))
                segment = []
            else:
                segment.append(word)
    return commands


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in read_blocks(page.read_text(), str(page.relative_to(REPO)))]


BLOCKS = all_blocks()


def rule(table: list[tuple], text: str) -> tuple | None:
    return next((row for row in table if re.search(row[0], text)), None)


# ------------------------------------------------------------------ the reader's files


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_reader_files(folder: Path) -> None:
    """The files the pages call the reader's own (see the module docstring)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):  # three classes: background, "stripes" (1), "dots" (2)
        mask = np.zeros((40, 48), np.uint8)
        mask[5:20, 4 + i : 24 + i] = 1
        mask[24:36, 20:44] = 2
        image = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
        image[mask == 1] = 160
        image[mask == 2] = 240
        _png(folder / "my" / "images" / f"scan_{i:03d}.png", image)
        _png(folder / "my" / "masks" / f"scan_{i:03d}.png", mask)
    (folder / "my" / "labels.json").write_text(json.dumps({"0": "background", "1": "stripes", "2": "dots"}))
    for i, (height, width) in enumerate([(40, 56), (70, 50)]):
        photo = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        _png(folder / "my_photos" / f"photo_{i}.png", photo)
        _png(folder / "my" / "new_images" / f"new_{i}.png", photo)
    for i in range(3):  # Oxford-IIIT Pet layout: RGB JPEGs and trimaps (1 pet, 2 background, 3 border)
        trimap = np.full((40, 48), 2, np.uint8)
        trimap[10:30, 10:38] = 3
        trimap[12:28, 12:36] = 1
        image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        (folder / "pets" / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / "pets" / "images" / f"cat_{i}.jpg", quality=95)
        _png(folder / "pets" / "annotations" / "trimaps" / f"cat_{i}.png", trimap)
    (folder / "mine.yaml").write_text("data:\n  num_classes: 3\ntrain:\n  epochs: 3\n")


def tiny_run_flags(tiny_pipeline_overrides: Callable[..., dict]) -> list[str]:
    """conftest's tiny pipeline overrides as `segpipe run` flags (the root stays the command's)."""
    overrides = tiny_pipeline_overrides("unused")
    overrides.pop("root")
    return [part for key, value in overrides.items() for part in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_overrides) -> Path:
    """The reader's files plus `segpipe_root` after one tiny `segpipe run` (version 1 pushed)."""
    folder = tmp_path_factory.mktemp("workspace")
    make_reader_files(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        code = main(["run", "--demo-size", str(MAX_DEMO_IMAGES), *tiny_run_flags(tiny_pipeline_overrides)])
    assert code == 0, "the workspace's tiny `segpipe run` failed"
    assert (folder / "segpipe_root" / "serving" / "1").is_dir()
    return folder


# ------------------------------------------------------------------ running one command


def rewrite(words: list[str], raw: str, sandbox: Path, *, tiny: list[str] | None) -> list[str]:
    """The rewrites of the module docstring; `tiny` is the flag list for a `segpipe run` that runs."""
    out: list[str] = []
    for index, word in enumerate(words):
        if index and words[index - 1] in ("--num", "--demo-size"):
            word = str(min(int(word), MAX_DEMO_IMAGES))
        if word.startswith("/"):
            word = str(sandbox / word.lstrip("/"))
        unquoted = re.search(rf"(^|\s){re.escape(word)}(\s|$)", raw)
        if any(c in word for c in "*?[") and unquoted and glob.glob(word):
            out.extend(sorted(glob.glob(word)))
            continue
        out.append(word)
    if tiny is not None and out[1:2] == ["run"] and "--help" not in out:
        out += [*tiny, *([] if "--demo-size" in out else ["--demo-size", str(MAX_DEMO_IMAGES)])]
    return out


def parse_only(argv: list[str], where: str, capsys) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # --help exits 0; a usage error exits 2 and says why on stderr
        err = capsys.readouterr().err
        assert exc.code == 0, f"{where}: `segpipe {shlex.join(argv)}` does not parse:\n{err[-1500:]}"


def run_segpipe(argv: list[str], text: str, where: str, capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # --help and argparse errors exit through SystemExit
        code = exc.code
    captured = capsys.readouterr()
    allowed = (rule(EXPECTED_EXIT, text) or (None, {0}))[1]
    assert code in allowed, f"{where}: `{text}` exited {code}\n{captured.err[-2500:]}"
    assert "Traceback" not in captured.err, f"{where}: `{text}` printed a traceback\n{captured.err[-2500:]}"


def check_external(words: list[str], raw: str, sandbox: Path, where: str, capsys) -> None:
    program = words[0]
    assert program in EXTERNAL, f"{where}: `{raw}` uses {program!r}; add it to EXTERNAL with how it is checked"
    if program == "pip":
        constraints = words[words.index("-c") + 1]
        assert (REPO / constraints).is_file(), f"{where}: {constraints} does not exist"
        if ".[test]" in words:
            assert re.search(r'"test"\s*:', (REPO / "setup.py").read_text()), f"{where}: setup.py has no test extra"
    elif program == "docker" and words[1] == "build":
        assert (REPO / "Dockerfile").is_file()
    elif program == "docker" and words[1] == "run":
        image = next((i for i, w in enumerate(words) if w.startswith("segpipe:")), None)
        if image is not None:  # the entrypoint is segpipe: the rest are segpipe arguments
            parse_only(rewrite(["segpipe", *words[image + 1 :]], raw, sandbox, tiny=None)[1:], where, capsys)
    elif program == "python":
        script = REPO / words[1]
        assert script.is_file(), f"{where}: {words[1]} does not exist"
        source = script.read_text()
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert f'"{flag}"' in source, f"{where}: {words[1]} has no flag {flag}"
    elif program == "saved_model_cli":
        assert shutil.which(program), f"{where}: {program} is not installed"
        argv = rewrite(words, raw, sandbox, tiny=None)
        result = subprocess.run(argv, cwd=sandbox, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"{where}: `{raw}` exited {result.returncode}\n{result.stderr[-2000:]}"


def run_shell_block(block: Block, sandbox: Path, tiny: list[str], capsys) -> None:
    pipeline_block = (block.page, block.heading) in PIPELINE_BLOCKS
    for command in split_commands(block):
        words, where = list(command.words), f"{block.page}:{command.line}"
        text = shlex.join(words)
        if words[0] != "segpipe":
            check_external(words, command.raw, sandbox, where, capsys)
            continue
        argv = rewrite(words, command.raw, sandbox, tiny=tiny if pipeline_block else None)[1:]
        parse_rule = rule(PARSE_ONLY, text)
        if parse_rule and not (pipeline_block and parse_rule[0] == r"^segpipe run\b"):
            parse_only(argv, where, capsys)
        else:
            run_segpipe(argv, text, where, capsys)


def run_python_block(block: Block, sandbox: Path) -> None:
    code = compile(block.text, block.id, "exec")
    if any(phrase in block.text for phrase in COMPILE_ONLY):
        return
    exec(code, {"__name__": "__docs__"})  # noqa: S102 - the repository's own documentation examples


def check_yaml_block(block: Block, sandbox: Path) -> None:
    from segpipe.pipeline.config import load_config

    path = sandbox / "block.yaml"
    path.write_text(block.text)
    load_config(path)


def needs_model(block: Block) -> bool:
    if (block.page, block.heading) in PIPELINE_BLOCKS:
        return False
    if block.lang in SHELL:
        return any(NEEDS_MODEL.search(shlex.join(c.words)) for c in split_commands(block))
    return bool(NEEDS_MODEL.search(block.text))


CHECKED = [b for b in BLOCKS if b.lang in SHELL | {"python", "yaml", "json"}]


@pytest.mark.parametrize("block", CHECKED, ids=[b.id for b in CHECKED])
def test_block_works_as_written(block, tmp_path, monkeypatch, capsys, request, tiny_pipeline_overrides):
    if block.lang == "json":
        json.loads(block.text)
        return
    if needs_model(block):
        sandbox = request.getfixturevalue("workspace")
    else:
        sandbox = tmp_path / "sandbox"
        make_reader_files(sandbox)
    monkeypatch.chdir(sandbox)
    if block.lang in SHELL:
        run_shell_block(block, sandbox, tiny_run_flags(tiny_pipeline_overrides), capsys)
    elif block.lang == "python":
        run_python_block(block, sandbox)
    else:
        check_yaml_block(block, tmp_path)


# ------------------------------------------------------------------ the pages themselves


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move details to docs/"
    first, second = read_blocks(README.read_text(), "README.md")[:2]
    assert (first.text, second.text) == FIRST_COMMANDS
    assert first.line <= 6 and second.line <= 12, "README must start with the two one-line commands"
    assert FIRST_COMMANDS[1] in (REPO / ".ci" / "run").read_text(), ".ci/run must run README's test command"


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "segpipe") -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                nested = _subcommands(child, f"{prefix} {name}")
                found.extend(nested or [f"{prefix} {name}"])
    return found


def test_readme_table_lists_every_subcommand():
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `segpipe ")]
    listed = {re.match(r"\| `([^`]*)`", row).group(1) for row in rows}
    missing = [c for c in _subcommands(build_parser()) if not any(item.split(" ")[:len(c.split())] == c.split()
                                                                  for item in listed)]
    assert not missing, f"README's command table lacks {missing}"


def test_readme_exit_codes_are_the_defined_ones():
    from segpipe.components.core import errors

    section = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
    defined = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert listed == defined, f"README's exit codes {sorted(listed)} differ from core/errors.py's {sorted(defined)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, in_fence = set(), False
    for line in page.read_text().splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link {target} points at nothing"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: link {target}: no such heading"


def resolve(name: str) -> object:
    """The module or attribute a dotted `segpipe.*` name means; AssertionError when there is none."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attr in parts[split:]:
            assert hasattr(obj, attr), f"{name}: {'.'.join(parts[:split])} has no {attr}"
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"{name} does not import")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_module_paths_and_signatures_are_todays(page):
    """Every `segpipe.<package>...` name in a page imports, and a documented call lists real parameters.

    A call written `segpipe....fn(a, b, *, c, ...)` must name parameters of `fn` in their order and
    every parameter without a default (`...` stands for optional ones left out).
    """
    text = page.read_text()
    for name in sorted(set(re.findall(r"\bsegpipe\.(?:components|pipeline|schemas)(?:\.\w+)*", text))):
        resolve(name)
    for name, args in re.findall(r"`(segpipe\.[\w.]+)\(([^`)]*)\)`", text):
        documented = [a.split("=")[0].strip() for a in args.replace("\n", " ").split(",")]
        documented = [a for a in documented if a not in ("", "*", "...")]
        parameters = inspect.signature(resolve(name)).parameters
        assert documented == [p for p in parameters if p in documented], f"{page.name}: {name}({args}): not its parameters, in order"
        required = [p for p, v in parameters.items() if v.default is inspect.Parameter.empty]
        missing = [p for p in required if p not in documented]
        assert not missing, f"{page.name}: {name}({args}) leaves out required {missing}"


def test_the_path_rule_is_stated_once():
    for page in PAGES:
        if page != PATHS_PAGE:
            assert "current directory" not in page.read_text() and "current working directory" not in page.read_text(), (
                f"{page.name} restates the path rule; link to docs/configuration.md#paths instead"
            )
    assert "## Paths" in PATHS_PAGE.read_text()


def test_extractor_splits_chains_and_keeps_quotes():
    text = "\n".join([
        "# Heading", "```bash", "segpipe demo-data --num 5   # five", "pip install x && segpipe --help",
        "$ segpipe compile --out-file p.yaml \\", "    --image img:1", "segpipe evaluate --data 'a/*.gz'; echo done",
        "```", "```python", "segpipe config", "```",
    ])
    blocks = read_blocks(text, "page.md")
    assert [(b.lang, b.heading, b.line) for b in blocks] == [("bash", "Heading", 2), ("python", "Heading", 9)]
    found = [(c.line, c.words) for c in split_commands(blocks[0])]
    assert found == [
        (3, ("segpipe", "demo-data", "--num", "5")),
        (4, ("pip", "install", "x")),
        (4, ("segpipe", "--help")),
        (5, ("segpipe", "compile", "--out-file", "p.yaml", "--image", "img:1")),
        (7, ("segpipe", "evaluate", "--data", "a/*.gz")),
        (7, ("echo", "done")),
    ]


def test_rewrite_caps_sizes_and_expands_only_unquoted_globs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.gz").write_text("")
    raw = "segpipe evaluate --data 'a/*.gz' --model a/* --out /abs"
    words = shlex.split(raw)
    assert rewrite(words, raw, tmp_path, tiny=None) == [
        "segpipe", "evaluate", "--data", "a/*.gz", "--model", "a/x.gz", "--out", str(tmp_path / "abs")]
    assert rewrite(["segpipe", "demo-data", "--num", "1000"], "", tmp_path, tiny=None)[-1] == str(MAX_DEMO_IMAGES)
    assert rewrite(["segpipe", "run"], "", tmp_path, tiny=["--set", "train.epochs=1"]) == [
        "segpipe", "run", "--set", "train.epochs=1", "--demo-size", str(MAX_DEMO_IMAGES)]
