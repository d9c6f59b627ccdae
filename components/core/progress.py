"""Training progress a person can follow: one line per epoch, and a bar within the epoch on a terminal.

The epoch line goes through segpipe's logging (so it reaches the terminal and the run's log file):

    epoch 3/12  loss=0.4123  val_loss=0.3990  val_iou=0.5512  val_pixel_accuracy=0.9310  12.3s  ETA 1m51s

ETA is the mean epoch time times the epochs left (early stopping may end sooner); the first epoch,
slow with graph tracing, is left out of the mean once a later one is known. The bar
(tqdm) is drawn only where the progress logger's lines reach a terminal (a handler whose stream is
a TTY), never into a log file or a pipe; `terminal_stream` makes the same choice for the tools'
bars (demo data, import, predict). Keras's own progress output is meant to be off
(`fit(verbose=0)`). This module imports Keras only when the callback is made.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Mapping, TextIO

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """45s, 1m05s, 2h03m: rounded to what a person reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_epoch_line(epoch: int, epochs: int, logs: Mapping[str, Any], seconds: float, eta: float | None) -> str:
    """`epoch k/N  loss=…  val_<metric>=…  12.3s  ETA 1m05s` (`epoch` counts from 1; no ETA after the last)."""
    values = [("loss", logs["loss"])] if "loss" in logs else []
    values += sorted((k, v) for k, v in logs.items() if k.startswith("val_"))
    parts = [f"epoch {epoch}/{epochs}", *(f"{k}={float(v):.4f}" for k, v in values), f"{seconds:.1f}s"]
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return "  ".join(parts)


def terminal_stream(logger: logging.Logger) -> TextIO | None:
    """The TTY stream that `logger`'s INFO lines reach through its handlers, or None (a file, a pipe)."""
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.FileHandler) or stream is None or handler.level > logging.INFO:
                continue
            try:
                if stream.isatty():
                    return stream
            except (AttributeError, ValueError):  # a closed or non-file stream
                continue
        current = current.parent if current.propagate else None
    return None


def epoch_progress(*, clock: Callable[[], float] = time.monotonic, bar_stream: TextIO | None | str = "auto") -> Any:
    """The Keras callback: epoch lines through this module's logger, a tqdm bar on a terminal.

    `bar_stream`: "auto" finds the terminal when training starts (`terminal_stream`), None never
    draws a bar; `clock` is for tests.
    """
    return _epoch_progress_class()(clock=clock, bar_stream=bar_stream)


@functools.cache
def _epoch_progress_class() -> type:
    import keras

    class EpochProgress(keras.callbacks.Callback):
        """Times each epoch; the step count of the first epoch sizes the bar of the next ones."""

        def __init__(self, *, clock: Callable[[], float], bar_stream: TextIO | None | str) -> None:
            super().__init__()
            self.clock = clock
            self.bar_stream = bar_stream
            self.durations: list[float] = []
            self.steps: int | None = None
            self.bar: Any = None
            self.started = 0.0
            self.seen = 0
            self.stream: TextIO | None = None

        def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
            self.stream = terminal_stream(log) if self.bar_stream == "auto" else self.bar_stream
            self.steps = self.params.get("steps")  # None for a stream of unknown length

        def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.started = self.clock()
            self.seen = 0
            if self.stream is not None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.params['epochs']}", unit="step",
                                file=self.stream, leave=False, mininterval=0.5)

        def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.seen = batch + 1
            if self.bar is not None:
                if logs and "loss" in logs:
                    self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)
                self.bar.update(1)

        def on_test_begin(self, logs: Mapping[str, Any] | None = None) -> None:
            if self.bar is not None:
                self.bar.set_description_str(f"{self.bar.desc} eval")

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            self._close_bar()
            seconds = self.clock() - self.started
            self.durations.append(seconds)
            self.steps = self.steps or self.seen or None
            epochs = int(self.params["epochs"])
            left = epochs - (epoch + 1)
            steady = self.durations[1:] or self.durations  # the first epoch also traces the graph
            eta = sum(steady) / len(steady) * left if left > 0 else None
            log.info("%s", format_epoch_line(epoch + 1, epochs, logs or {}, seconds, eta))

        def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
            self._close_bar()  # an epoch cut short (an exception, a stop request)

        def _close_bar(self) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return EpochProgress
