"""The `segpipe` command: help for every subcommand, fast startup, consistent flags, exit codes."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from segpipe.components.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NOT_BLESSED,
    BadInputError,
    NotBlessedError,
    SegpipeError,
)
from segpipe.pipeline import cli
from segpipe.pipeline.cli import build_parser, cli_path, main


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
    assert info.value.code == EXIT_BAD_INPUT
    assert "usage: segpipe" in capsys.readouterr().err


def _options(path: tuple[str, ...]) -> list[argparse.Action]:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


PATH_METAVARS = {"DIR", "FILE", "PATTERN", "PATH"}


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) or "segpipe" for p in COMMANDS])
def test_path_arguments_are_made_absolute_and_flags_mean_one_thing(path):
    """A path metavar <=> made absolute against the cwd; --out is a folder, --out-file a file, --model a folder."""
    for action in _options(path):
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert (action.metavar in PATH_METAVARS) == (action.type is cli_path), f"{' '.join(path)} {name}"
        expected = {"--out": "DIR", "--out-file": "FILE", "--model": "DIR", "--baseline": "DIR", "--data": "PATTERN"}
        if name in expected:
            assert action.metavar == expected[name], f"{' '.join(path)} {name}"


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_config_show", interrupted)
    assert main(["config"]) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err.strip() == "segpipe: interrupted"


def test_error_classes_carry_the_shared_exit_codes():
    assert (SegpipeError.exit_code, BadInputError.exit_code, NotBlessedError.exit_code) == (
        EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_NOT_BLESSED) == (1, 2, 3)


@pytest.mark.parametrize("argv", [["compile", "--out", "x.yaml"], ["serving", "list", "--serving", "s"]])
def test_abbreviated_flags_are_refused_at_every_level(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
