"""The `segpipe` command: help for every subcommand, fast startup, argparse errors exit 2."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from segpipe.pipeline.cli import build_parser, main


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every (sub)command path, e.g. ("import", "oxford-pets"), found by walking the parser."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths.extend(_command_paths(child, prefix + (name,)))
    return paths


COMMANDS = _command_paths(build_parser())


def test_the_foundation_commands_are_registered():
    assert {("demo-data",), ("import", "oxford-pets"), ("import", "folders"), ("config",)} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) or "segpipe" for p in COMMANDS])
def test_help_exits_0(path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: segpipe {' '.join(path)}".rstrip())


def test_console_script_help_is_fast_and_imports_no_heavy_library():
    """`segpipe --help` must not import TensorFlow, Beam or TFX libraries (they take seconds)."""
    code = (
        "import sys, pipeline.cli as cli\n"
        "heavy = [m for m in ('tensorflow', 'apache_beam', 'tensorflow_transform', "
        "'tensorflow_data_validation', 'kfp', 'keras') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    help_run = subprocess.run(["segpipe", "--help"], capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "demo-data" in help_run.stdout


@pytest.mark.parametrize(
    "argv",
    [[], ["no-such-command"], ["import"], ["import", "folders", "--images", "x"], ["demo-data", "--num", "many"]],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: segpipe" in capsys.readouterr().err
