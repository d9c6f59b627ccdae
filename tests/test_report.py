"""Reports: the prediction grid PNG and the HTML run report built from a run's artifacts."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from segpipe.components.core import artifacts

from segpipe.components.tools import report
from segpipe.components.core.visual import IGNORE_COLOUR, PALETTE, mask_to_rgb


def grid_rows(n: int) -> list[report.GridRow]:
    image = np.zeros((16, 16, 3), np.uint8)
    truth = np.zeros((16, 16), np.uint8)
    truth[4:8, 4:8] = 1
    truth[0] = 255
    return [report.GridRow(f"worst {i}", image, truth, np.roll(truth, i, axis=1) % 255) for i in range(n)]


def test_mask_colours() -> None:
    rgb = mask_to_rgb(np.array([[0, 1, 2, 255]]))
    assert rgb[0].tolist() == [PALETTE[0].tolist(), PALETTE[1].tolist(), PALETTE[2].tolist(), list(IGNORE_COLOUR)]


def test_grid_png_has_one_row_per_example(tmp_path: Path) -> None:
    one = report.plot_prediction_grid(grid_rows(1), tmp_path / "one.png")
    four = report.plot_prediction_grid(grid_rows(4), tmp_path / "four.png", title="best and worst")
    h1, h4 = Image.open(one).height, Image.open(four).height
    assert Image.open(four).format == "PNG"
    assert 3.5 * h1 < h4 < 4.5 * h1


def write_artifacts(root: Path, blessed: bool) -> dict[str, Path]:
    evaluation, blessing, pushed, anomalies, run = (root / n for n in ("ev", "bl", "push", "anom", "run"))
    for folder in (evaluation, blessing, pushed, anomalies, run):
        folder.mkdir(parents=True)
    metrics = {
        "pixel_accuracy": 0.8123, "foreground_iou": 0.61, "mean_iou": 0.7, "dice": 0.75,
        "all_background_accuracy": 0.85, "iou_per_class": [0.79, 0.61], "num_examples": 9, "num_pixels": 9216,
        "image_size": 32, "gate": {"pixel_accuracy_threshold": 0.9, "min_foreground_iou": 0.5, "max_regression": 0.01},
        "baseline": {"model": "/serving/3", "pixel_accuracy": 0.9, "foreground_iou": 0.6},
        "worst_examples": [{"id": "<img-7>", "iou": 0.12}],
    }
    (evaluation / artifacts.EVALUATION_FILE).write_text(json.dumps(metrics))
    report.plot_prediction_grid(grid_rows(2), evaluation / report.GRID_FILE)
    reasons = [] if blessed else ["pixel accuracy 0.812 < threshold 0.900"]
    (blessing / artifacts.BLESSING_FILE).write_text(json.dumps({"blessed": blessed, "reasons": reasons}))
    record = {"pushed": blessed, "version": 4 if blessed else None, "path": "/serving/4" if blessed else None,
              "serving_dir": "/serving"}
    (pushed / "pushed_model.json").write_text(json.dumps(record))
    (anomalies / artifacts.ANOMALIES_FILE).write_text(
        'anomaly_info { key: "image_height" value { description: "Image height 12 < 32 in 3 examples." '
        'severity: ERROR short_description: "small" } }\n'
    )
    report.plot_prediction_grid(grid_rows(1), run / "training_curves.png")
    return {"evaluation_uri": evaluation, "blessing_uri": blessing, "pushed_model_uri": pushed,
            "anomalies_uri": anomalies, "model_run_uri": run, "statistics_uri": root / "stats"}


def test_run_report_not_blessed(tmp_path: Path) -> None:
    path = report.write_run_report(tmp_path / "report.html", **write_artifacts(tmp_path, blessed=False))
    text = path.read_text()
    assert "NOT BLESSED" in text and "pixel accuracy 0.812 &lt; threshold 0.900" in text
    row = re.search(r"<tr><td>Pixel accuracy</td>(.*?)</tr>", text).group(1)
    assert re.findall(r"<td>(.*?)</td>", row) == ["0.8123", "0.9000", "0.9000", "-0.0877"]
    assert "Image height 12 &lt; 32 in 3 examples." in text
    assert "&lt;img-7&gt;: IoU 0.1200" in text  # ids are escaped
    assert "Not pushed; the serving directory /serving is unchanged." in text
    assert text.count("data:image/png;base64,") == 2  # the grid and the training curves
    assert (tmp_path / "stats").resolve().as_uri() in text


def test_run_report_blessed_and_pushed(tmp_path: Path) -> None:
    arts = write_artifacts(tmp_path, blessed=True)
    path = report.write_run_report(tmp_path / "out" / "report.html", evaluation_uri=arts["evaluation_uri"],
                                   blessing_uri=arts["blessing_uri"], pushed_model_uri=arts["pushed_model_uri"])
    text = path.read_text()
    assert "NOT BLESSED" not in text and "BLESSED" in text
    assert "Pushed as version 4" in text and "No anomalies artifact given." in text
