"""Pictures of class-id masks: one palette for `segpipe predict` overlays, the Evaluator's prediction
grid and the run report."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segpipe.components.core.artifacts import IGNORE_LABEL

# Class colours (class 0 = background is never tinted in overlays).
PALETTE = np.array(
    [[0, 0, 0], [255, 64, 64], [64, 200, 64], [64, 96, 255], [255, 200, 0], [200, 64, 255], [0, 220, 220], [255, 128, 0]],
    dtype=np.uint8,
)
IGNORE_COLOUR = (128, 128, 128)
OVERLAY_ALPHA = 0.5
GRID_FILE = "predictions.png"  # the Evaluator's best/worst grid, inside the ModelEvaluation artifact


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


@dataclass(frozen=True)
class GridRow:
    """One row of the prediction grid: the model's-eye input and both masks at the same size."""

    title: str
    image: np.ndarray  # H x W x 3 uint8
    true_mask: np.ndarray  # H x W class ids, 255 = ignore
    pred_mask: np.ndarray  # H x W class ids


def plot_prediction_grid(rows: list[GridRow], out_path: str | os.PathLike, *, title: str = "") -> Path:
    """Save the input / true mask / predicted mask grid (one row per example) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out_path = Path(out_path)
    n = max(len(rows), 1)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, ax_row in zip(rows, axes):
        ax_row[0].imshow(row.image)
        ax_row[1].imshow(mask_to_rgb(row.true_mask), interpolation="nearest")
        ax_row[2].imshow(mask_to_rgb(row.pred_mask), interpolation="nearest")
        for ax, text in zip(ax_row, (row.title, "true mask", "predicted mask")):
            ax.set_title(text, fontsize=9)
    if title:
        fig.suptitle(title, y=1.0)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return out_path
