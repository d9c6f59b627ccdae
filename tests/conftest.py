"""Shared fixtures: tests build their own tiny data (no downloads).

Never `import tests...` (apache-beam[gcp] ships a stray top-level `tests` package); share helpers
through fixtures here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

# Quiet TensorFlow's C++ logs in test output; set before any test imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _tiny_example(rng: np.random.Generator, height: int, width: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy RGB image with one bright rectangle per foreground class and its exact mask."""
    image = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    for cls in range(1, num_classes):
        h, w = rng.integers(height // 4, height // 2), rng.integers(width // 4, width // 2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        image[y : y + h, x : x + w] = np.clip(
            rng.integers(150, 255, size=(h, w, 3)) // cls, 0, 255
        ).astype(np.uint8)
        mask[y : y + h, x : x + w] = cls
    return image, mask


@pytest.fixture
def write_tiny_span() -> Callable[..., Path]:
    """`write_tiny_span(data_root, span, num=16, size=(40, 48), num_classes=2, seed=0, compress=True)`.

    Writes a span of raw examples in segpipe's format (ids `s<span>-<i>`) plus labels.json and
    returns the span folder.
    """
    from components.data_format import encode_example, encode_png, write_labels, write_span

    def _write(
        data_root: str | os.PathLike,
        span: int,
        num: int = 16,
        size: tuple[int, int] = (40, 48),
        num_classes: int = 2,
        seed: int = 0,
        compress: bool = True,
        num_shards: int = 1,
    ) -> Path:
        rng = np.random.default_rng(seed * 1000 + span)

        def records():
            for i in range(num):
                image, mask = _tiny_example(rng, size[0], size[1], num_classes)
                yield encode_example(f"s{span}-{i}", encode_png(image), encode_png(mask))

        write_labels(data_root, {0: "background", **{c: f"class{c}" for c in range(1, num_classes)}})
        folder, _ = write_span(data_root, span, records(), num_shards=num_shards, compress=compress)
        return folder

    return _write
