"""What a person looks at after a run: a prediction grid PNG and one self-contained HTML report.

The grid is the tutorial's figure (input, true mask, predicted mask per row), best and worst test
examples. The report gathers, from the artifacts of one run, the metrics against the gate's
thresholds and the baseline, the blessing with every reason, the data-validation anomalies, links to
the statistics and training run, and where the model was pushed. Images are embedded (base64) so
the report is one file that can be mailed or attached to a ticket.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.components.core import artifacts
from segpipe.components.core.visual import mask_to_rgb

log = logging.getLogger(__name__)

GRID_FILE = "predictions.png"
METRIC_ROWS = (
    ("pixel_accuracy", "Pixel accuracy", "pixel_accuracy_threshold"),
    ("foreground_iou", "Foreground IoU", "min_foreground_iou"),
    ("mean_iou", "Mean IoU (incl. background)", None),
    ("dice", "Dice (foreground)", None),
    ("all_background_accuracy", "Pixel accuracy of predicting all background", None),
)


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


# ------------------------------------------------------------------ HTML run report


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _link(uri: str | os.PathLike) -> str:
    path = Path(uri).resolve()
    return f'<a href="{html.escape(path.as_uri())}">{html.escape(str(uri))}</a>'


def metrics_section(metrics: dict[str, Any], blessing: dict[str, Any]) -> str:
    gate = metrics.get("gate", {})
    baseline = metrics.get("baseline") or {}
    rows = ["<tr><th>Metric</th><th>Candidate</th><th>Threshold</th><th>Baseline</th><th>Δ vs baseline</th></tr>"]
    for key, label, gate_key in METRIC_ROWS:
        value, base = metrics.get(key), baseline.get(key)
        delta = value - base if isinstance(value, (int, float)) and isinstance(base, (int, float)) else None
        threshold = gate.get(gate_key) if gate_key else None
        rows.append(
            f"<tr><td>{label}</td><td>{_fmt(value)}</td><td>{_fmt(threshold)}</td>"
            f"<td>{_fmt(base)}</td><td>{'–' if delta is None else f'{delta:+.4f}'}</td></tr>"
        )
    verdict = "BLESSED" if blessing.get("blessed") else "NOT BLESSED"
    colour = "#1a7f37" if blessing.get("blessed") else "#cf222e"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in blessing.get("reasons", []))
    per_class = ", ".join(f"{i}: {_fmt(v)}" for i, v in enumerate(metrics.get("iou_per_class", [])))
    worst = "".join(
        f"<li>{html.escape(str(e['id']))}: IoU {_fmt(e['iou'])}</li>" for e in metrics.get("worst_examples", [])
    )
    return (
        f'<h2>Evaluation <span style="color:{colour}">{verdict}</span></h2>'
        + (f"<ul>{reasons}</ul>" if reasons else "<p>Every check of the gate passed.</p>")
        + f"<p>{metrics.get('num_examples', '?')} test examples, {metrics.get('num_pixels', '?')} labelled pixels "
        + f"at {metrics.get('image_size', '?')}×{metrics.get('image_size', '?')}; "
        + f"max regression vs baseline {_fmt(gate.get('max_regression'))}; baseline model: "
        + f"{html.escape(str(baseline.get('model', 'none')))}.</p>"
        + f"<table border=1 cellpadding=4 style='border-collapse:collapse'>{''.join(rows)}</table>"
        + f"<p>IoU per class: {per_class}</p><h3>Worst test examples</h3><ul>{worst}</ul>"
    )


def anomalies_section(anomalies_uri: str | os.PathLike | None) -> str:
    """Feature -> description lines of the ExampleAnomalies artifact (text proto)."""
    if anomalies_uri is None:
        return "<h2>Data validation</h2><p>No anomalies artifact given.</p>"
    path = Path(anomalies_uri) / artifacts.ANOMALIES_FILE
    if not path.is_file():
        return f"<h2>Data validation</h2><p>{_link(anomalies_uri)}: no {artifacts.ANOMALIES_FILE}.</p>"
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    anomalies = text_format.Parse(path.read_text(), anomalies_pb2.Anomalies())
    items = [
        f"<li><b>{html.escape(name)}</b>: {html.escape(info.description or info.short_description)}</li>"
        for name, info in sorted(anomalies.anomaly_info.items())
    ]
    if anomalies.HasField("dataset_anomaly_info"):
        items.append(f"<li><b>dataset</b>: {html.escape(anomalies.dataset_anomaly_info.description)}</li>")
    body = f"<ul>{''.join(items)}</ul>" if items else "<p>No anomalies.</p>"
    return f"<h2>Data validation</h2><p>{_link(anomalies_uri)}</p>{body}"


def push_section(pushed_model_uri: str | os.PathLike | None) -> str:
    if pushed_model_uri is None:
        return "<h2>Push</h2><p>The pusher did not run.</p>"
    record = _read_json(Path(pushed_model_uri) / "pushed_model.json") or {}
    if record.get("pushed"):
        return f"<h2>Push</h2><p>Pushed as version {record['version']}: {_link(record['path'])}</p>"
    return f"<h2>Push</h2><p>Not pushed; the serving directory {html.escape(str(record.get('serving_dir', '?')))} is unchanged.</p>"


def model_run_section(model_run_uri: str | os.PathLike | None) -> str:
    if model_run_uri is None:
        return ""
    pngs = sorted(Path(model_run_uri).glob("*.png"))
    return f"<h2>Training</h2><p>{_link(model_run_uri)}</p>" + "".join(_img_tag(p, p.stem) for p in pngs)


def write_run_report(
    out_path: str | os.PathLike,
    *,
    evaluation_uri: str | os.PathLike,
    blessing_uri: str | os.PathLike,
    pushed_model_uri: str | os.PathLike | None = None,
    statistics_uri: str | os.PathLike | None = None,
    anomalies_uri: str | os.PathLike | None = None,
    model_run_uri: str | os.PathLike | None = None,
) -> Path:
    """Write the run's HTML report from its artifacts; returns its path."""
    metrics = _read_json(Path(evaluation_uri) / artifacts.EVALUATION_FILE) or {}
    blessing = _read_json(Path(blessing_uri) / artifacts.BLESSING_FILE) or {}
    grid = Path(evaluation_uri) / GRID_FILE
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>segpipe run report</title></head>",
        "<body style='font-family:sans-serif;max-width:960px;margin:auto'>",
        f"<h1>segpipe run report</h1><p>Written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; "
        f"evaluation {_link(evaluation_uri)}.</p>",
        metrics_section(metrics, blessing),
        _img_tag(grid, "best and worst test predictions") if grid.is_file() else "",
        push_section(pushed_model_uri),
        anomalies_section(anomalies_uri),
        f"<h2>Data statistics</h2><p>{_link(statistics_uri)}</p>" if statistics_uri else "",
        model_run_section(model_run_uri),
        "</body></html>",
    ]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts))
    log.info("run report written to %s", out_path)
    return out_path
