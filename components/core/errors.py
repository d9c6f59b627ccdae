"""Errors that carry their CLI exit code (README "Exit codes").

Components raise these with a message naming the file, record or field; the CLI prints the
message on one line (no traceback) and exits with `exit_code`.
"""
from __future__ import annotations


class SegpipeError(Exception):
    """An expected failure with a message meant for the user."""

    exit_code = 1


class BadInputError(SegpipeError):
    """Bad input, configuration or data (including skipped files and data anomalies)."""

    exit_code = 2


class DataAnomalyError(BadInputError):
    """The data gate stopped the pipeline; the message points at the anomalies report."""


class TrainingError(SegpipeError):
    """Training failed (e.g. NaN loss); the message names the epoch and step."""

    exit_code = 1


class NotBlessedError(SegpipeError):
    """The candidate model did not pass the evaluation gate; nothing was pushed."""

    exit_code = 3
