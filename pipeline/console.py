"""What the `segpipe` command shows on the terminal, and the log file that keeps everything else.

A default command prints segpipe's own lines only:

- segpipe's loggers (`segpipe.*`) at INFO (DEBUG with `-v`), and Python warnings raised in
  segpipe's own files: the terminal and the log file.
- everything else: other libraries' logging (TensorFlow, absl, Beam, TFDV, kfp), Python warnings
  from library code (`logging.captureWarnings`), and whatever is written to file descriptor 2
  (TensorFlow's C++ logging, TFDV's import notice): the log file only. `-v` shows it on the
  terminal as well.

The log file: `segpipe run` writes `<root>/logs/<run_id>.log` (the command opens
`<root>/logs/segpipe-run-<time>-<pid>.log` before anything is imported and the local runner moves it
to the run's name with `move_log` once the run id exists). Other commands that take `--root` write
`<root>/logs/segpipe-<command>-<time>-<pid>.log` when that root already exists (a read-only command
never creates one), and keep no log otherwise. A log that stayed empty is removed at exit.

How: C++ code writes to fd 2 directly, so `session` points fd 2 at the log file (os.dup2) before
TensorFlow is first imported, and the terminal handler writes to a dup of the original fd 2. With
`-v`, fd 2 is a pipe whose reader thread copies each chunk to both the log file and the terminal.
Everything is restored when the session ends, so the CLI's one-line errors and tracebacks, printed
after it, reach the terminal, and repeated `main()` calls in one process (the tests) stay independent.
"""
from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Iterator, TextIO

from segpipe.components.core.errors import SegpipeError
from segpipe.pipeline.config import ConfigError

log = logging.getLogger(__name__)

LOGS_DIR = "logs"  # under the pipeline root
OWN_LOGGER = "segpipe"
TERMINAL_FORMAT = "%(asctime)s %(message)s"
TERMINAL_WARNING_FORMAT = "%(asctime)s %(levelname)s %(message)s"
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# TensorFlow's C++ INFO chatter (e.g. one "End of sequence" line per epoch) stays out of the log
# file; its warnings and errors are kept. `-v` keeps TensorFlow's own default (everything).
TF_LOG_LEVEL = ("TF_CPP_MIN_LOG_LEVEL", "1")

_SOURCE_DIRS = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep
                     for name in ("components", "pipeline", "schemas"))


def command_log_path(root: str | os.PathLike, command: str, *, create: bool) -> Path | None:
    """`<root>/logs/segpipe-<command>-<time>-<pid>.log`; None when the root is absent and not `create`."""
    root = Path(root)
    if not create and not root.is_dir():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return root / LOGS_DIR / f"segpipe-{command}-{stamp}-{os.getpid()}.log"


def is_own_record(record: logging.LogRecord) -> bool:
    """segpipe's loggers, and Python warnings whose location is one of segpipe's files."""
    if record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + "."):
        return True
    return record.name == "py.warnings" and record.getMessage().startswith(_SOURCE_DIRS)


class _TerminalFormatter(logging.Formatter):
    """`HH:MM:SS message` for INFO and below; warnings and errors say their level."""

    def __init__(self) -> None:
        super().__init__(TERMINAL_FORMAT, "%H:%M:%S")
        self._loud = logging.Formatter(TERMINAL_WARNING_FORMAT, "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return self._loud.format(record) if record.levelno >= logging.WARNING else super().format(record)


class _Tee(threading.Thread):
    """With -v: fd 2 is this pipe; each chunk goes to the log file and to the terminal."""

    def __init__(self, log_fd: int, terminal: TextIO, lock: threading.RLock) -> None:
        super().__init__(name="segpipe-stderr-tee", daemon=True)
        self.read_fd, self.write_fd = os.pipe()
        self.log_fd, self.terminal, self.lock = log_fd, terminal, lock

    def run(self) -> None:
        while chunk := os.read(self.read_fd, 65536):
            os.write(self.log_fd, chunk)
            with self.lock:  # the terminal handler's lock: no line cut in two
                self.terminal.write(chunk.decode("utf-8", "replace"))
                self.terminal.flush()
        os.close(self.read_fd)


class _Session:
    """One command's redirection; `start` and `stop` undo each other exactly."""

    def __init__(self, verbose: bool, log_path: Path | None) -> None:
        self.verbose = verbose
        self.log_path = log_path
        self.log_fd: int | None = None
        self.tee: _Tee | None = None

    # ---------------------------------------------------------------- start

    def start(self) -> None:
        self._open_log()
        self._start_logging()
        self._redirect_fd2()

    def _open_log(self) -> None:
        if self.log_path is None:
            return
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:  # an unwritable root: the command itself reports it, naming the path
            self.log_path = None

    def _start_logging(self) -> None:
        sys.stderr.flush()
        # The terminal: a dup of fd 2 when sys.stderr is on it; else whatever stream replaced
        # sys.stderr (pytest's capture), which fd 2 does not reach anyway.
        try:
            on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):
            on_fd2 = False
        self.saved_fd2 = os.dup(2)
        self.terminal: TextIO = (
            open(self.saved_fd2, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                 errors="backslashreplace", closefd=False)
            if on_fd2 else sys.stderr
        )
        self.terminal_handler = logging.StreamHandler(self.terminal)
        if self.verbose:
            self.terminal_handler.setFormatter(logging.Formatter(VERBOSE_FORMAT, "%H:%M:%S"))
        else:
            self.terminal_handler.setFormatter(_TerminalFormatter())
            self.terminal_handler.addFilter(is_own_record)
        self.file_handler: logging.Handler | None = None
        if self.log_fd is not None:
            stream = open(self.log_fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            self.file_handler = logging.StreamHandler(stream)
            self.file_handler.setFormatter(logging.Formatter(FILE_FORMAT))

        root, own = logging.getLogger(), logging.getLogger(OWN_LOGGER)
        self.saved_levels = (root.level, own.level)
        root.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        own.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        for handler in self._handlers():
            root.addHandler(handler)
        self.captured_warnings = warnings.showwarning is getattr(logging, "_showwarning", None)
        logging.captureWarnings(True)

        name, level = TF_LOG_LEVEL
        self.saved_tf_level = os.environ.get(name)
        if not self.verbose:
            os.environ.setdefault(name, level)
        # A hard crash (segfault in a C++ kernel) still shows its Python stack on the terminal.
        self.faulthandler_enabled = faulthandler.is_enabled()
        if not self.faulthandler_enabled and on_fd2:
            faulthandler.enable(self.terminal)

    def _redirect_fd2(self) -> None:
        sys.stderr.flush()
        if self.verbose and self.log_fd is None:
            return  # nothing to keep: library output stays on the terminal
        if self.verbose:
            self.tee = _Tee(self.log_fd, self.terminal, self.terminal_handler.lock)
            os.dup2(self.tee.write_fd, 2)
            os.close(self.tee.write_fd)
            self.tee.start()
            return
        if self.log_fd is not None:
            os.dup2(self.log_fd, 2)
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def _handlers(self) -> list[logging.Handler]:
        return [h for h in (self.terminal_handler, self.file_handler) if h is not None]

    # ---------------------------------------------------------------- moving and stopping

    def move_log(self, path: Path) -> Path | None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path is not None:
            try:
                os.replace(self.log_path, path)  # the open descriptors follow the file
            except OSError as exc:
                log.warning("keeping the log at %s (cannot move it to %s: %s)", self.log_path, path, exc)
                return self.log_path
            self.log_path = path
            return path
        return None

    def stop(self, exc: BaseException | None) -> None:
        if exc is not None and self.file_handler is not None:
            # The log ends with how the command ended (a traceback for an internal failure only);
            # the terminal gets the CLI's own message.
            expected = isinstance(exc, (SegpipeError, ConfigError, KeyboardInterrupt))
            text = (f"{type(exc).__name__}: {exc}" if expected else
                    "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
            self.file_handler.handle(logging.makeLogRecord(
                {"name": OWN_LOGGER, "levelno": logging.ERROR, "levelname": "ERROR",
                 "msg": "command ended with %s", "args": (text,)}))
        sys.stderr.flush()
        os.dup2(self.saved_fd2, 2)
        if self.tee is not None:
            self.tee.join(timeout=5)  # fd 2 no longer holds the pipe: the reader sees its end
        if not self.faulthandler_enabled and faulthandler.is_enabled():
            faulthandler.disable()
        name, _ = TF_LOG_LEVEL
        if self.saved_tf_level is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = self.saved_tf_level
        if not self.captured_warnings:
            logging.captureWarnings(False)
        root, own = logging.getLogger(), logging.getLogger(OWN_LOGGER)
        for handler in self._handlers():
            root.removeHandler(handler)
            handler.flush()
        root.setLevel(self.saved_levels[0])
        own.setLevel(self.saved_levels[1])
        if self.terminal is not sys.stderr:
            self.terminal.close()
        os.close(self.saved_fd2)
        if self.file_handler is not None:
            self.file_handler.stream.close()
        if self.log_fd is not None:
            os.close(self.log_fd)
            if self.log_path is not None and self.log_path.is_file() and self.log_path.stat().st_size == 0:
                self.log_path.unlink()


_active: _Session | None = None


@contextlib.contextmanager
def session(*, verbose: bool, log_path: Path | None) -> Iterator[Path | None]:
    """Terminal and log file for one command; yields the log file's path (None: no log kept).

    Enter it before TensorFlow is imported: TensorFlow's C++ logging writes to the fd 2 it finds.
    """
    global _active
    if _active is not None:
        raise RuntimeError("a console session is already active")
    current = _Session(verbose, log_path)
    current.start()
    _active = current
    try:
        yield current.log_path
    except BaseException as exc:
        _active = None
        current.stop(exc)
        raise
    _active = None
    current.stop(None)


def active_log_path() -> Path | None:
    """The log file the running command writes (None: no session or no log kept)."""
    return _active.log_path if _active is not None else None


def move_log(path: str | os.PathLike) -> Path | None:
    """Move the active session's log file to `path` (it keeps growing there); returns the new path.

    None without an active session or log file: library callers (tests, notebooks) keep their
    own logging.
    """
    return _active.move_log(Path(path)) if _active is not None else None
