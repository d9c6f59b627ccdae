"""What a person looks at after a run: a prediction grid PNG and one self-contained HTML report.

The grid is the tutorial's figure (input, true mask, predicted mask per row), best and worst test
examples. The report gathers, from the artifacts of one run: the gate with every check, the
metrics against the baseline, IoU and Dice per class with the confusion matrix, the prediction
grid, the training curves and history, the plan (every planned or set field and why), a data summary (examples per split, quarantined and
skipped records and why, image sizes, validation anomalies), the infra validation (how the model
served in a TensorFlow-only process), where the model was pushed, and a link to every artifact.
Images are embedded as data URIs and there is no script, so the report is one file that opens
anywhere and can be mailed or attached to a ticket.

Each section is built on its own: a missing or unreadable artifact costs that section a line
saying so, never the whole report.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from segpipe.components import evaluator, example_validator, plan, statistics_gen, trainer, tuner
from segpipe.components.core import artifacts
from segpipe.components.core import metrics as seg_metrics
from segpipe.components.core.data_format import LABELS_FILE, read_labels
from segpipe.components.core.errors import BadInputError
from segpipe.components.core.visual import GRID_FILE
from segpipe.components.example_gen import SKIPPED_FILE
from segpipe.components.pusher import PUSH_RESULT_FILE

log = logging.getLogger(__name__)

_BOUND_SIGN = {"min": "≥", "max": "≤"}

MAX_LISTED = 20  # quarantined or skipped records named one by one; the rest are counted
_NUMBER = re.compile(r"^(–|[+−-]?[\d,]*\.?\d+%?)$")  # cells that align right

# Section titles, in page order (tests look for each one in the rendered page).
GATE = "Gate"
METRICS = "Metrics"
PER_CLASS = "Per-class metrics"
PREDICTIONS = "Predictions"
TRAINING = "Training"
PLAN = "Plan"
DATA = "Data"
INFRA = "Infra validation"
PUSH = "Push"
ARTIFACTS = "Artifacts"
SECTION_TITLES = (GATE, METRICS, PER_CLASS, PREDICTIONS, TRAINING, PLAN, DATA, INFRA, PUSH, ARTIFACTS)

METRIC_ROWS = (
    (seg_metrics.PIXEL_ACCURACY, "Pixel accuracy"),
    (seg_metrics.FOREGROUND_IOU, "Foreground IoU"),
    (seg_metrics.MEAN_IOU, "Mean IoU (incl. background)"),
    (seg_metrics.DICE, "Dice (foreground)"),
    (seg_metrics.ALL_BACKGROUND_ACCURACY, "Pixel accuracy of predicting all background"),
)

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;max-width:1080px;
  margin:24px auto;padding:0 20px;line-height:1.45;font-size:15px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
h3{margin:20px 0 6px} nav{margin:8px 0 4px} nav a{margin-right:14px}
table{border-collapse:collapse;margin:6px 0 12px} caption{text-align:left;color:#59636e;padding:2px 0}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.cm{min-width:72px} small,.muted{color:#59636e}
.pass{color:#1a7f37;font-weight:600} .fail{color:#cf222e;font-weight:600}
.badge{display:inline-block;padding:2px 12px;border-radius:14px;color:#fff;font-weight:600}
.blessed{background:#1a7f37} .rejected{background:#cf222e}
.cols{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
img{max-width:100%;height:auto;border:1px solid #d0d7de;margin:6px 0} img.grid{max-width:560px}
code{background:#f6f8fa;padding:0 3px;border-radius:3px;word-break:break-all} a{overflow-wrap:anywhere}
"""


# ------------------------------------------------------------------ HTML pieces


@dataclass(frozen=True)
class ArtifactLink:
    """One artifact of the run, for the report's index."""

    step: str
    name: str
    type: str
    uri: str
    state: str = ""  # done | cached (the runner's step state), empty when unknown


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def _read_info(uri: str | os.PathLike | None) -> artifacts.ArtifactInfo | None:
    if uri is None or not artifacts.is_published(uri):
        return None
    return artifacts.read_info(uri)


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    """A cell's text: 4 decimals for floats, digit groups for counts, a dash for undefined."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return _esc(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> str:
    """An HTML table; header and cells are HTML already (escape text with _esc / _fmt)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(content: str) -> str:
    """Pre-built cells (with attributes) pass through; numbers align right, text left."""
    if content.startswith("<td"):
        return content
    bare = re.sub(r"<[^>]+>", "", content)
    return f'<td class="num">{content}</td>' if _NUMBER.match(bare) else f"<td>{content}</td>"


def _img_tag(path: Path, alt: str, css_class: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="{css_class}" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _href(target: str | os.PathLike, base_dir: Path) -> str:
    """A link relative to the report's folder, so a copied or remounted root keeps working."""
    relative = os.path.relpath(Path(target).resolve(), base_dir.resolve())
    return urllib.parse.quote(Path(relative).as_posix())


def _link(target: str | os.PathLike, base_dir: Path, text: str | None = None) -> str:
    return f'<a href="{_href(target, base_dir)}">{_esc(text if text is not None else target)}</a>'


def _result(passed: bool) -> str:
    return '<td class="pass">pass</td>' if passed else '<td class="fail">FAIL</td>'


def _section(title: str, build: Callable[[], str]) -> str:
    """One titled section; a failure while building it is shown there instead of losing the report."""
    try:
        body = build()
    except Exception as exc:  # the report is read after the run: show what broke and carry on
        log.exception("run report: the %s section failed", title)
        body = f'<p class="fail">This section could not be built: {_esc(type(exc).__name__)}: {_esc(exc)}</p>'
    return f'<section id="{_anchor(title)}"><h2>{_esc(title)}</h2>{body}</section>'


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


# ------------------------------------------------------------------ gate and metrics


@dataclass(frozen=True)
class GateCheck:
    """One rule of the gate as the report shows it (formatted value and threshold)."""

    name: str
    value: str
    threshold: str
    passed: bool


def gate_checks(metrics: Mapping[str, Any], blessing: Mapping[str, Any]) -> list[GateCheck]:
    """Every check of the gate, passed or not, as the blessing (or metrics.json) records them.

    Artifacts written before the checks were recorded get them recomputed by the Evaluator's own
    `gate_checks` from the gate parameters in metrics.json, so the rule is never restated here
    (without per-class checks when the gate recorded no `min_class_iou`: it had none then).
    """
    recorded = blessing.get("checks", metrics.get("checks"))
    if recorded is None and metrics.get("gate"):
        gate = {"min_class_iou": None, **metrics["gate"]}
        recorded = evaluator.gate_checks(dict(metrics), metrics.get("baseline"), **gate)
    # A check is a lower bound unless it says "max" (the TFLite drop); older artifacts have no direction.
    return [GateCheck(str(c["name"]), _fmt(c["value"]), f"{_BOUND_SIGN[c.get('direction', 'min')]} {_fmt(c['bound'])}",
                      bool(c["passed"])) for c in recorded or []]


def verdict_badge(blessing: Mapping[str, Any]) -> str:
    if blessing.get("blessed"):
        return '<span class="badge blessed">BLESSED</span>'
    return '<span class="badge rejected">NOT BLESSED</span>'


def gate_section(metrics: Mapping[str, Any], blessing: Mapping[str, Any]) -> str:
    rows = [[_esc(c.name), c.value, c.threshold, _result(c.passed)] for c in gate_checks(metrics, blessing)]
    reasons = "".join(f"<li>{_esc(r)}</li>" for r in blessing.get("reasons") or [])
    hints = "".join(f"<li>{_esc(h)}</li>" for h in blessing.get(evaluator.HINTS) or [])
    baseline = metrics.get("baseline")
    max_regression = (metrics.get("gate") or {}).get("max_regression")
    base_text = (f"baseline model <code>{_esc(baseline.get('model', '?'))}</code> (max regression "
                 f"{_fmt(max_regression)})" if baseline else "no baseline model, so the regression checks did not apply")
    small = metrics.get(seg_metrics.MODEL_RESOLUTION)
    where = (f"each mask at its own size; mean IoU {_fmt(metrics.get(seg_metrics.MEAN_IOU))} there against "
             f"{_fmt(small.get(seg_metrics.MEAN_IOU))} at the model's {_fmt(metrics.get('image_size'))} px input"
             if small else f"at {_fmt(metrics.get('image_size'))} px")
    return (
        f"<p>{verdict_badge(blessing)} on {_fmt(metrics.get(seg_metrics.NUM_EXAMPLES))} test examples "
        f"({_fmt(metrics.get(seg_metrics.NUM_PIXELS))} labelled pixels, {where}); {base_text}.</p>"
        + (_table(["Check", "Value", "Threshold", "Result"], rows) if rows else "<p>No gate parameters recorded.</p>")
        + (f"<p>Why it was not blessed:</p><ul>{reasons}</ul>" if reasons else "")
        + (f"<p>What to try next:</p><ul class='hints'>{hints}</ul>" if hints else "")
    )


def metrics_section(metrics: Mapping[str, Any]) -> str:
    baseline = metrics.get("baseline") or {}
    rows = []
    for key, label in METRIC_ROWS:
        value, base = metrics.get(key), baseline.get(key)
        delta = f"{value - base:+.4f}" if value is not None and base is not None else "–"
        rows.append([_esc(label), _fmt(value), _fmt(base), delta])
    return _table(["Metric", "Candidate", "Baseline", "Δ vs baseline"], rows)


# ------------------------------------------------------------------ per class


def class_names(data_root: str | os.PathLike | None, num_classes: int) -> list[str]:
    """Names for class ids 0..K-1 from the data's labels.json; ids where it has none (or no file)."""
    labels: dict[int, str] = {}
    if data_root is not None and (Path(data_root) / LABELS_FILE).is_file():
        try:
            labels = read_labels(data_root)
        except BadInputError as exc:  # the run does not read labels.json; a broken one costs only names
            log.warning("run report: %s", exc)
    return [labels.get(k, f"class {k}") for k in range(num_classes)]


def per_class_table(metrics: Mapping[str, Any], cm: np.ndarray, names: Sequence[str]) -> str:
    iou, dice = metrics.get(seg_metrics.IOU_PER_CLASS) or [], metrics.get(seg_metrics.DICE_PER_CLASS) or []
    rows = []
    for k, name in enumerate(names):
        rows.append([str(k), _esc(name), _fmt(_at(iou, k)), _fmt(_at(dice, k)),
                     _fmt(int(cm[k].sum())), _fmt(int(cm[:, k].sum()))])
    return _table(["Id", "Class", "IoU", "Dice", "True pixels", "Predicted pixels"], rows,
                  "–: in neither truth nor prediction (left out of the means).")


def _at(values: Sequence[Any], index: int) -> Any:
    return values[index] if index < len(values) else None


def confusion_table(cm: np.ndarray, names: Sequence[str]) -> str:
    """Counts with their share of the true class; the shading follows that share."""
    header = ["true \\ predicted", *(_esc(n) for n in names), "total"]
    rows = []
    for k, name in enumerate(names):
        total = int(cm[k].sum())
        cells = [_cm_cell(int(count), count / total if total else 0.0) for count in cm[k]]
        rows.append([f"<b>{_esc(name)}</b>", *cells, _fmt(total)])
    return _table(header, rows, "Confusion matrix: rows true, columns predicted; share of the row.")


def _cm_cell(count: int, share: float) -> str:
    alpha = 0.08 + 0.6 * share
    colour = "#fff" if alpha > 0.4 else "#1f2328"
    return (f'<td class="cm" style="background:rgba(9,105,218,{alpha:.2f});color:{colour}">'
            f"{count:,}<br><small style=\"color:{colour}\">{share:.1%}</small></td>")


def per_class_section(metrics: Mapping[str, Any], data_root: str | os.PathLike | None) -> str:
    if seg_metrics.CONFUSION_MATRIX not in metrics:
        return f"<p>No confusion matrix in {_esc(artifacts.EVALUATION_FILE)}.</p>"
    cm = np.asarray(metrics[seg_metrics.CONFUSION_MATRIX], dtype=np.int64)
    names = class_names(data_root, len(cm))
    source = (f"names from {_esc(LABELS_FILE)}" if data_root and (Path(data_root) / LABELS_FILE).is_file()
              else f"no {_esc(LABELS_FILE)}: classes by id")
    return (f'<p class="muted">{source}.</p><div class="cols"><div>{per_class_table(metrics, cm, names)}</div>'
            f"<div>{confusion_table(cm, names)}</div></div>")


# ------------------------------------------------------------------ predictions and training


def predictions_section(evaluation_uri: str | os.PathLike, metrics: Mapping[str, Any]) -> str:
    grid = Path(evaluation_uri) / GRID_FILE
    image = (_img_tag(grid, "best and worst test predictions", "grid") if grid.is_file()
             else f"<p>No {_esc(GRID_FILE)} in the evaluation artifact.</p>")
    lists = []
    for key, title in (("worst_examples", "Worst test examples"), ("best_examples", "Best test examples")):
        rows = [[_esc(e.get("id")), _fmt(e.get("iou"))] for e in metrics.get(key) or []]
        if rows:
            lists.append(_table(["Example", "IoU"], rows, title))
    legend = "<p class='muted'>Per row: the input, the true mask and the predicted mask (IoU of the foreground).</p>"
    return legend + f"<div class='cols'><div>{image}</div><div>{''.join(lists)}</div></div>"


def history_table(history: Sequence[Mapping[str, float]], best_epoch: int | None) -> str:
    """One row per epoch: each metric on train then on eval (`val_`), the best epoch in bold."""
    names = sorted({k for row in history for k in row if k != "epoch" and not k.startswith("val_")},
                   key=lambda k: (k != "loss", k))
    columns = [c for name in names for c in (name, f"val_{name}")]
    rows = []
    for row in history:
        epoch = int(row["epoch"]) + 1
        cells = [_fmt(row.get(c)) for c in columns]
        if epoch == best_epoch:
            cells = [f"<b>{c}</b>" for c in cells]
        rows.append([str(epoch), *cells])
    header = ["Epoch", *(c.replace("val_", "eval ") if c.startswith("val_") else f"train {c}" for c in columns)]
    return _table(header, rows, "Bold: the best epoch (by train.monitor, an eval metric), whose weights were exported.")


def training_section(model_run_uri: str | os.PathLike | None) -> str:
    if model_run_uri is None:
        return "<p>The trainer did not run.</p>"
    run = Path(model_run_uri)
    info = _read_info(run)
    extra = info.extra if info else {}
    warm = extra.get("warm_start") or {}
    summary = (f"<p>{_fmt(extra.get('epochs'))} epoch(s), best epoch {_fmt(extra.get('best_epoch'))}"
               f"{'; resumed after epoch ' + _fmt(extra.get('initial_epoch')) if extra.get('initial_epoch') else ''}; "
               f"{_fmt(extra.get('parameters'))} parameters; precision {_fmt(extra.get('precision'))}; "
               f"warm start: {_esc(warm.get('reason', '–'))}.</p>")
    curves = run / trainer.CURVES_FILE
    image = _img_tag(curves, "training curves") if curves.is_file() else f"<p>No {_esc(trainer.CURVES_FILE)}.</p>"
    history = trainer.read_history(run / trainer.HISTORY_FILE)
    table = history_table(history, extra.get("best_epoch")) if history else f"<p>No {_esc(trainer.HISTORY_FILE)}.</p>"
    return summary + image + table


# ------------------------------------------------------------------ plan


def plan_section(plan_uri: str | os.PathLike | None) -> str:
    """The recipe the Plan step fixed: every field with its value, where it came from and why."""
    if plan_uri is None:
        return "<p>No Plan artifact given.</p>"
    document = _read_json(Path(plan_uri) / plan.PLAN_FILE)
    if document is None:
        return f"<p>No {_esc(plan.PLAN_FILE)} in the Plan artifact.</p>"
    estimate = document.get("estimate") or {}
    over = "" if estimate.get("within_budget", True) else " (over the budget)"
    rows = [[f"<code>{_esc(c.get('field'))}</code>", _esc(json.dumps(c.get("value"))), _esc(c.get("source")),
             _esc(c.get("reason"))] for c in document.get("choices") or []]
    return (f"<p>Profile {_esc(document.get('profile'))}, planned for {_esc(document.get('device'))} within "
            f"{_fmt(document.get('budget_minutes'))} minutes: estimated {_fmt(estimate.get('minutes'))} minutes of "
            f"training, {_fmt(estimate.get('steps'))} steps{over}.</p>"
            + _table(["Field", "Value", "From", "Why"], rows))


def tuner_html(hyperparameters_uri: str | os.PathLike | None) -> str:
    """The Tuner's choice (what the Trainer took over the plan) and its trials; "" when it did not run."""
    if hyperparameters_uri is None:
        return ""
    document = _read_json(Path(hyperparameters_uri) / tuner.HYPERPARAMETERS_FILE)
    if document is None:
        return f"<p>No {_esc(tuner.HYPERPARAMETERS_FILE)} in the Hyperparameters artifact.</p>"
    chosen = [[f"<code>{_esc(name)}</code>", _esc(json.dumps(value))] for name, value in
              sorted((document.get("values") or {}).items())]
    trials = [[_esc(t.get("trial")), _esc(json.dumps(t.get("values"), sort_keys=True)), _esc(t.get("status")),
               _fmt(t.get("objective"))] for t in document.get("trials") or []]
    return (f"<h3>Tuner</h3><p>{len(trials)} trial(s), stopped by {_esc(document.get('stopped'))}; the Trainer took "
            "the best trial's values over the plan's (a field you set keeps your value).</p>"
            + _table(["Field", "Tuned value"], chosen)
            + _table(["Trial", "Values", "Status", _esc((document.get("objective") or {}).get("name"))], trials))


# ------------------------------------------------------------------ data


def split_counts_table(counts: Mapping[str, int]) -> str:
    """Examples per split in canonical order, then quarantine and any other count ExampleGen kept."""
    rank = {name: i for i, name in enumerate((*artifacts.SPLITS, artifacts.QUARANTINE))}
    order = sorted(counts, key=lambda name: (rank.get(name, len(rank)), name))
    total = sum(counts.get(name, 0) for name in order if name in rank) or 1
    rows = []
    for name in order:
        share = f"{counts[name] / total:.1%}" if name in rank else "–"
        rows.append([_esc(name), _fmt(counts[name]), share])
    return _table(["Split", "Examples", "Share"], rows)


def reasons_table(reasons: Mapping[str, int], caption: str) -> str:
    rows = [[_esc(kind), _fmt(n)] for kind, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))]
    return _table(["Reason", "Count"], rows, caption)


def quarantine_html(examples_uri: str | os.PathLike, info: artifacts.ArtifactInfo) -> str:
    total = int(info.counts.get(artifacts.QUARANTINE, 0))
    if not total:
        return "<h3>Quarantine</h3><p>No example was quarantined.</p>"
    listed = example_validator.quarantined_examples(str(examples_uri))[:MAX_LISTED]
    rows = [[_esc(i or "(no id)"), _esc(reason)] for i, reason in listed]
    more = f" (the first {len(listed)} of {total})" if total > len(listed) else ""
    return ("<h3>Quarantine</h3><p>Examples kept out of training because they would break it.</p>"
            + reasons_table(info.extra.get("quarantine_reasons") or {}, "By reason")
            + _table(["Example", "Reason"], rows, f"Quarantined examples{more}"))


def skipped_html(examples_uri: str | os.PathLike, info: artifacts.ArtifactInfo) -> str:
    reasons = info.extra.get("skipped_reasons") or {}
    if not reasons:
        return ""
    path = Path(examples_uri) / SKIPPED_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    entries = [json.loads(line) for line in lines[:MAX_LISTED]]
    rows = [[_esc(e["file"]), _fmt(e["record"]), _esc(e["problem"])] for e in entries]
    return ("<h3>Skipped records</h3><p>Unreadable records skipped (<code>data.skip_bad_records</code>).</p>"
            + reasons_table(reasons, "By problem")
            + _table(["File", "Record", "Problem"], rows, f"The first {len(rows)} of {len(lines)} in {_esc(SKIPPED_FILE)}"))


def image_sizes_table(statistics_uri: str | os.PathLike) -> str:
    """Min / median / max height and width per split, from StatisticsGen's derived statistics."""
    rows = []
    for split in statistics_gen.stats_splits(statistics_uri):
        dataset = statistics_gen.load_stats(statistics_uri, split, statistics_gen.DERIVED).datasets[0]
        by_name = {".".join(f.path.step) or f.name: f.num_stats for f in dataset.features}
        cells = []
        for name in (statistics_gen.HEIGHT, statistics_gen.WIDTH):
            stats = by_name.get(name)
            cells += [_fmt(int(v)) for v in (stats.min, stats.median, stats.max)] if stats else ["–"] * 3
        rows.append([_esc(split), _fmt(int(dataset.num_examples)), *cells])
    header = ["Split", "Examples", "Height min", "median", "max", "Width min", "median", "max"]
    return _table(header, rows, "Image sizes in pixels (quarantined examples are not in the statistics).")


def validation_html(anomalies_uri: str | os.PathLike | None, base_dir: Path) -> str:
    """The data gate's verdict and findings, from the ExampleValidator's JSON summary."""
    if anomalies_uri is None:
        return "<h3>Validation</h3><p>No anomalies artifact given.</p>"
    summary = _read_json(Path(anomalies_uri) / example_validator.SUMMARY_JSON)
    if summary is None:
        return f"<h3>Validation</h3><p>No {_esc(example_validator.SUMMARY_JSON)} in the anomalies artifact.</p>"
    findings = summary.get("findings") or []
    rows = [['<td class="fail">ERROR</td>' if f.get("blocking") else "note", _esc(f.get("kind")),
             _esc(f.get("split")), _esc(f.get("feature") or "–"), _fmt(f.get("count")), _esc(f.get("description")),
             _esc(", ".join(f.get("example_ids") or []))] for f in findings]
    blocking = int(summary.get("blocking") or 0)
    head = (f"<p>Data gate {'<b class=fail>failed</b>' if blocking else '<b class=pass>passed</b>'}: "
            f"{blocking} blocking finding(s); quarantined {_fmt(summary.get('quarantined'))} of "
            f"{_fmt(summary.get('examples'))} examples ({_pct(summary.get('invalid_fraction'))}, "
            f"max {_pct(summary.get('max_invalid_fraction'))}).</p>")
    page = Path(anomalies_uri) / example_validator.SUMMARY_HTML
    link = f"<p>Full list: {_link(page, base_dir, 'validation report')}.</p>" if page.is_file() else ""
    table = (_table(["Level", "Kind", "Split", "Feature", "Count", "Description", "Example ids"], rows)
             if rows else "<p>No findings.</p>")
    return "<h3>Validation</h3>" + head + table + link


def _pct(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "–"


def data_section(examples_uri: str | os.PathLike | None, statistics_uri: str | os.PathLike | None,
                 anomalies_uri: str | os.PathLike | None, base_dir: Path) -> str:
    parts = []
    info = _read_info(examples_uri)
    if info is None:
        parts.append("<p>No Examples artifact given.</p>")
    else:
        spans = ", ".join(map(str, info.extra.get("spans") or [])) or "?"
        parts.append(f"<p>Span(s) {_esc(spans)}: {len(info.extra.get('files') or [])} file(s). Shares are of the "
                     "examples read; a skipped record could not be read at all.</p>")
        parts += [split_counts_table(info.counts), quarantine_html(examples_uri, info), skipped_html(examples_uri, info)]
    if statistics_uri is not None:
        report = Path(statistics_uri) / statistics_gen.REPORT_FILE
        link = _link(report, base_dir, "statistics report") if report.is_file() else "statistics"
        parts.append(f"<h3>Image sizes</h3>{image_sizes_table(statistics_uri)}<p>Every feature: {link}.</p>")
    parts.append(validation_html(anomalies_uri, base_dir))
    return "".join(parts)


# ------------------------------------------------------------------ infra validation, push and artifacts


def _figure(value: Any) -> str:
    """Seconds, milliseconds, megabytes and tolerances: 4 significant digits, a dash for none."""
    return "–" if value is None else _esc(f"{value:.4g}" if isinstance(value, float) else value)


def infra_section(infra_blessing_uri: str | os.PathLike | None) -> str:
    """The InfraValidator's verdict: every check, and how the model served (load time, latency, memory)."""
    if infra_blessing_uri is None:
        return "<p>Infra validation did not run.</p>"
    record = _read_json(Path(infra_blessing_uri) / artifacts.INFRA_BLESSING_FILE) or {}
    figures = record.get("figures") or {}
    checks = [[_esc(c["name"]), _figure(c.get("value")), _figure(c.get("limit")), _result(bool(c["passed"]))]
              for c in record.get("checks") or []]
    latency = [[_esc(size), _figure(f.get("p50_ms")), _figure(f.get("p99_ms")), _figure(f.get("requests"))]
               for size, f in (figures.get("latency_ms") or {}).items()]
    reasons = "".join(f"<li>{_esc(r)}</li>" for r in record.get("reasons") or [])
    limit = figures.get("memory_limit_mb")
    return (
        f"<p>{verdict_badge(record)} in a fresh TensorFlow-only serving process: loaded in "
        f"{_figure(figures.get('load_seconds'))} s, peak resident memory {_figure(figures.get('peak_memory_mb'))} MB "
        f"(address-space limit {f'{limit} MB' if limit else 'none'}).</p>"
        + (_table(["Check", "Value", "Limit", "Result"], checks) if checks else "")
        + (_table(["Batch size", "p50 ms", "p99 ms", "Requests"], latency, "Canary request latency") if latency else "")
        + (f"<p>Why it is not served:</p><ul>{reasons}</ul>" if reasons else "")
    )


def push_section(pushed_model_uri: str | os.PathLike | None, base_dir: Path) -> str:
    if pushed_model_uri is None:
        return "<p>The pusher did not run.</p>"
    record = _read_json(Path(pushed_model_uri) / PUSH_RESULT_FILE) or {}
    if record.get("pushed"):
        return f"<p>Pushed as version {_fmt(record.get('version'))}: {_link(record['path'], base_dir)}</p>"
    return f"<p>Not pushed; the serving directory {_esc(record.get('serving_dir', '?'))} is unchanged.</p>"


def artifacts_section(links: Sequence[ArtifactLink], base_dir: Path) -> str:
    """Every artifact with its producing step; paths are shown below their common folder (the root)."""
    if not links:
        return "<p>No artifacts.</p>"
    paths = [Path(a.uri).resolve() for a in links]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    rows = [[_esc(a.step), _esc(a.state or "–"), _esc(a.name), _esc(a.type),
             _link(path, base_dir, path.relative_to(common).as_posix())] for a, path in zip(links, paths)]
    return _table(["Step", "State", "Output", "Type", "Path"], rows, f"Paths under <code>{_esc(common)}</code>")


def given_artifacts(uris: Mapping[str, str | os.PathLike | None]) -> list[ArtifactLink]:
    """The index when the caller passes none: every URI handed to the report, typed from its metadata."""
    links = []
    for name, uri in uris.items():
        info = _read_info(uri)
        if info is not None:
            links.append(ArtifactLink(info.producer, name, info.type, str(uri)))
    return links


# ------------------------------------------------------------------ the page


def _header(run_id: str, message: str, blessing: Mapping[str, Any]) -> str:
    written = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    run = f"Run <code>{_esc(run_id)}</code>; " if run_id else ""
    nav = "".join(f'<a href="#{_anchor(t)}">{_esc(t)}</a>' for t in SECTION_TITLES)
    return (f"<h1>segpipe run report</h1><p>{verdict_badge(blessing)} {_esc(message)}</p>"
            f'<p class="muted">{run}written {written}.</p><nav>{nav}</nav>')


def write_run_report(
    out_path: str | os.PathLike,
    *,
    evaluation_uri: str | os.PathLike,
    blessing_uri: str | os.PathLike,
    infra_blessing_uri: str | os.PathLike | None = None,
    pushed_model_uri: str | os.PathLike | None = None,
    statistics_uri: str | os.PathLike | None = None,
    anomalies_uri: str | os.PathLike | None = None,
    model_run_uri: str | os.PathLike | None = None,
    examples_uri: str | os.PathLike | None = None,
    plan_uri: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    run_id: str = "",
    message: str = "",
    artifact_links: Sequence[ArtifactLink] = (),
) -> Path:
    """Write the run's HTML report from its artifacts (atomically); returns its path.

    `data_root` is where labels.json names the classes; `artifact_links` indexes every artifact of
    the run (default: the artifacts passed here); without `plan_uri` the Plan is the one they list.
    """
    out_path = Path(out_path)
    base_dir = out_path.parent.resolve()
    metrics = _read_json(Path(evaluation_uri) / artifacts.EVALUATION_FILE) or {}
    blessing = _read_json(Path(blessing_uri) / artifacts.BLESSING_FILE) or {}
    infra = _read_json(Path(infra_blessing_uri) / artifacts.INFRA_BLESSING_FILE) if infra_blessing_uri else None
    verdict = {"blessed": bool(blessing.get("blessed")) and (infra or {}).get("blessed", True)}  # both gates
    links = artifact_links or given_artifacts({
        "examples": examples_uri, "statistics": statistics_uri, "anomalies": anomalies_uri,
        "model_run": model_run_uri, "evaluation": evaluation_uri, "blessing": blessing_uri,
        "infra_blessing": infra_blessing_uri, "pushed_model": pushed_model_uri, "plan": plan_uri,
    })
    plan_uri = plan_uri or next((link.uri for link in links if link.type == artifacts.PLAN), None)
    hyperparameters_uri = next((link.uri for link in links if link.type == artifacts.HYPERPARAMETERS), None)
    builders: dict[str, Callable[[], str]] = {
        GATE: lambda: gate_section(metrics, blessing),
        METRICS: lambda: metrics_section(metrics),
        PER_CLASS: lambda: per_class_section(metrics, data_root),
        PREDICTIONS: lambda: predictions_section(evaluation_uri, metrics),
        TRAINING: lambda: training_section(model_run_uri),
        PLAN: lambda: plan_section(plan_uri) + tuner_html(hyperparameters_uri),
        DATA: lambda: data_section(examples_uri, statistics_uri, anomalies_uri, base_dir),
        INFRA: lambda: infra_section(infra_blessing_uri),
        PUSH: lambda: push_section(pushed_model_uri, base_dir),
        ARTIFACTS: lambda: artifacts_section(links, base_dir),
    }
    page = "".join([
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>segpipe run report {_esc(run_id)}</title><style>{STYLE}</style></head><body>",
        _header(run_id, message or ("blessed" if verdict["blessed"] else "not blessed"), verdict),
        *(_section(title, builders[title]) for title in SECTION_TITLES),
        "</body></html>\n",
    ])
    artifacts.atomic_write(out_path, page)
    log.info("run report written to %s", out_path)
    return out_path
