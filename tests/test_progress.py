"""The trainer's progress callback: epoch lines with ETA, and a tqdm bar only on a terminal."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest

from segpipe.components.core import progress
from segpipe.components.core.progress import epoch_progress, format_duration, format_epoch_line, terminal_stream


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class StepClock:
    """Returns the given times in order: the callback reads the clock at each epoch's begin and end."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (45, "45s"), (59.6, "1m00s"), (65, "1m05s"),
                                           (3599, "59m59s"), (3725, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_epoch_line_shows_loss_and_eval_metrics_only():
    logs = {"loss": 0.41234, "iou": 0.5, "val_loss": 0.39901, "val_iou": 0.55123}
    assert format_epoch_line(3, 12, logs, 12.34, 111) == "epoch 3/12  loss=0.4123  val_iou=0.5512  val_loss=0.3990  12.3s  ETA 1m51s"
    assert format_epoch_line(12, 12, logs, 2.0, None).endswith("val_loss=0.3990  2.0s")


def tiny_fit(callback, *, epochs: int = 2, initial_epoch: int = 0):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.random.default_rng(0).random((16, 4)), np.zeros((16, 1))
    return model.fit(x, y, batch_size=4, epochs=epochs, initial_epoch=initial_epoch, validation_data=(x[:4], y[:4]),
                     callbacks=[callback], verbose=0)


def epoch_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == progress.log.name]


def test_one_line_per_epoch_with_eta_from_the_mean_epoch_time(caplog):
    # Epochs of 10 s, 4 s and 6 s: the first ETA can only use the first epoch; later ones leave it
    # out (graph tracing makes it slow).
    with caplog.at_level(logging.INFO, logger=progress.log.name):
        history = tiny_fit(epoch_progress(clock=StepClock(0, 10, 10, 14, 14, 20), bar_stream=None), epochs=3)
    losses, val_losses = history.history["loss"], history.history["val_loss"]
    assert epoch_lines(caplog) == [
        f"epoch 1/3  loss={losses[0]:.4f}  val_loss={val_losses[0]:.4f}  10.0s  ETA 20s",
        f"epoch 2/3  loss={losses[1]:.4f}  val_loss={val_losses[1]:.4f}  4.0s  ETA 4s",
        f"epoch 3/3  loss={losses[2]:.4f}  val_loss={val_losses[2]:.4f}  6.0s",
    ]


def test_a_resumed_run_counts_epochs_from_where_it_resumed(caplog):
    with caplog.at_level(logging.INFO, logger=progress.log.name):
        tiny_fit(epoch_progress(clock=StepClock(0, 6, 6, 10), bar_stream=None), epochs=3, initial_epoch=1)
    lines = epoch_lines(caplog)
    assert [line.split("  ")[0] for line in lines] == ["epoch 2/3", "epoch 3/3"]
    assert lines[0].endswith("6.0s  ETA 6s") and lines[1].endswith("4.0s")


@pytest.mark.parametrize("stream_type, bar", [(io.StringIO, False), (FakeTTY, True)])
def test_bar_only_where_the_lines_reach_a_terminal(stream_type, bar):
    stream = stream_type()
    handler = logging.StreamHandler(stream)
    progress.log.addHandler(handler)
    progress.log.setLevel(logging.INFO)
    try:
        tiny_fit(epoch_progress())
    finally:
        progress.log.removeHandler(handler)
        progress.log.setLevel(logging.NOTSET)
    text = stream.getvalue()
    assert [line.split("  ")[0] for line in text.replace("\r", "\n").splitlines() if "  loss=" in line] == [
        "epoch 1/2", "epoch 2/2"]
    assert ("\r" in text and "step/s" in text) == bar
    if not bar:
        assert text.count("\n") == 2 and len(text.splitlines()) == 2  # the two epoch lines, nothing else


def test_terminal_stream_follows_propagation_and_skips_files_and_quiet_handlers(tmp_path):
    parent, child = logging.getLogger("progress_test"), logging.getLogger("progress_test.child")
    parent.propagate = False  # the chain ends here, whatever the root logger holds
    tty, quiet_tty = FakeTTY(), FakeTTY()
    file_handler = logging.FileHandler(tmp_path / "x.log")
    quiet = logging.StreamHandler(quiet_tty)
    quiet.setLevel(logging.WARNING)  # would not show the INFO epoch lines
    child.addHandler(file_handler)
    child.addHandler(quiet)
    try:
        assert terminal_stream(child) is None
        parent.addHandler(logging.StreamHandler(tty))
        assert terminal_stream(child) is tty
        child.propagate = False
        assert terminal_stream(child) is None
    finally:
        child.propagate = parent.propagate = True
        child.handlers.clear()
        parent.handlers.clear()
        file_handler.close()
