"""Exit codes and the errors that carry them (README "Exit codes").

Components raise these with a message naming the file, record or field; the CLI prints the
message on one line (no traceback) and exits with `exit_code`. The codes are defined here once;
the CLI, the local runner's run records and the error classes all use these constants.
"""
from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_FAILURE = 1  # an internal or training failure
EXIT_BAD_INPUT = 2  # bad input, configuration or data; also argparse usage errors
EXIT_NOT_BLESSED = 3  # the candidate model failed the evaluation gate
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it


class SegpipeError(Exception):
    """An expected failure with a message meant for the user."""

    exit_code = EXIT_FAILURE


class BadInputError(SegpipeError):
    """Bad input, configuration or data (including skipped files and data anomalies)."""

    exit_code = EXIT_BAD_INPUT


class DataAnomalyError(BadInputError):
    """The data gate stopped the pipeline; the message points at the anomalies report."""


class TrainingError(SegpipeError):
    """Training failed (e.g. NaN loss); the message names the epoch and step."""

    exit_code = EXIT_FAILURE


class NotBlessedError(SegpipeError):
    """The candidate model did not pass the evaluation gate; nothing was pushed."""

    exit_code = EXIT_NOT_BLESSED


class DiskFullError(BadInputError):
    """The disk filled up: nothing half-written was published, completed steps stay cached."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, as an OSError or inside another error's text (shutil.Error's list of
    failed copies, a TensorFlow OpError from a checkpoint write)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_full_error(exc: BaseException, doing: str) -> DiskFullError:
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    return DiskFullError(f"disk full while {doing}{where}: nothing half-written was kept; free space "
                         "(e.g. `segpipe gc`) and rerun, completed steps are reused")
