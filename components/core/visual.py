"""Colours for class-id masks: one palette for `segpipe predict` overlays and the run report."""
from __future__ import annotations

import numpy as np

from segpipe.components.core.artifacts import IGNORE_LABEL

# Class colours (class 0 = background is never tinted in overlays).
PALETTE = np.array(
    [[0, 0, 0], [255, 64, 64], [64, 200, 64], [64, 96, 255], [255, 200, 0], [200, 64, 255], [0, 220, 220], [255, 128, 0]],
    dtype=np.uint8,
)
IGNORE_COLOUR = (128, 128, 128)
OVERLAY_ALPHA = 0.5


def mask_to_rgb(mask: np.ndarray) -> np.ndarray:
    """Class ids -> palette colours, ignore (255) -> grey."""
    rgb = PALETTE[np.asarray(mask, dtype=np.int64) % len(PALETTE)]
    rgb[np.asarray(mask) == IGNORE_LABEL] = IGNORE_COLOUR
    return rgb.astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with every foreground pixel blended towards its class colour."""
    colours = PALETTE[mask % len(PALETTE)].astype(np.float32)
    out = image.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return out.round().astype(np.uint8)
