"""ExampleValidator: the data gate before Transform.

Three checks, one report:
- schema: TFDV validates each split's statistics against the curated schema (presence, types,
  value counts, image formats). An empty train split fails; an empty eval or test split is noted.
- drift: the train split's derived features (height, width, foreground fraction, mean intensity)
  against the previous span's, with TFDV's Jensen-Shannon comparator; `drift_threshold` 0
  disables it. Below MIN_DRIFT_EXAMPLES examples a histogram estimate is noise, so the check is
  skipped and the report says so.
- quarantine: the examples ExampleGen set aside (with their reasons and ids) as a fraction of all
  examples read, against `max_invalid_fraction`.

The Anomalies artifact holds TFDV's anomalies protos per split plus `anomalies.txt`,
`anomalies.html` and `anomalies.json` (each finding's kind, split, feature, count, example ids).
It is published first; then, if any check failed, DataAnomalyError stops the pipeline with the
summary and the report's path.
"""
from __future__ import annotations

import html
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from segpipe.components.core import artifacts
from segpipe.components.core.data_format import display_id
from segpipe.components.core.errors import BadInputError, DataAnomalyError
from segpipe.components.schema_gen import load_schema
from segpipe.components.statistics_gen import DERIVED, DERIVED_FEATURES, RAW, load_stats, stats_path, stats_splits

log = logging.getLogger(__name__)

PRODUCER = "ExampleValidator"
DRIFT_ANOMALIES_FILE = "drift_anomalies.pbtxt"  # in Split-train/
SUMMARY_TEXT, SUMMARY_HTML, SUMMARY_JSON = "anomalies.txt", "anomalies.html", "anomalies.json"
MIN_DRIFT_EXAMPLES = 100  # per side; fewer make a 10-bucket Jensen-Shannon estimate noise
MAX_IDS = 20  # example ids listed per finding
DRIFT = "DRIFT_JENSEN_SHANNON"
EMPTY_SPLIT = "EMPTY_SPLIT"
QUARANTINED = "QUARANTINED"


@dataclass
class Finding:
    """One line of the report. `blocking` findings stop the pipeline."""

    kind: str
    split: str
    feature: str
    description: str
    blocking: bool
    count: int | None = None
    example_ids: list[str] = field(default_factory=list)

    def line(self) -> str:
        what = f"{self.kind} [{self.split}{'/' + self.feature if self.feature else ''}]"
        count = f" x{self.count}" if self.count is not None else ""
        ids = f"; ids: {', '.join(self.example_ids)}" if self.example_ids else ""
        level = "ERROR" if self.blocking else "note"
        return f"{level} {what}{count}: {self.description}{ids}"


# ------------------------------------------------------------------ checks


def _schema_findings(split: str, stats: Any, anomalies: Any) -> Iterator[Finding]:
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    dataset = stats.datasets[0] if stats.datasets else None
    if anomalies.data_missing or dataset is None or dataset.num_examples == 0:
        yield Finding(EMPTY_SPLIT, split, "", f"split {split} has no examples", blocking=split == artifacts.TRAIN)
        return
    present = {".".join(f.path.step): f for f in dataset.features}
    for name, info in sorted(anomalies.anomaly_info.items()):
        for reason in info.reason:
            kind = anomalies_pb2.AnomalyInfo.Type.Name(reason.type)
            yield Finding(kind, split, name, reason.description, True, _affected(kind, dataset, present.get(name)))
    for reason in anomalies.dataset_anomaly_info.reason:
        kind = anomalies_pb2.AnomalyInfo.Type.Name(reason.type)
        yield Finding(kind, split, "", reason.description, blocking=True)


def _affected(kind: str, dataset: Any, feature: Any) -> int | None:
    """How many examples a presence anomaly affects (examples without the feature)."""
    if "PRESENT" not in kind and "MISSING" not in kind:
        return None
    if feature is None or feature.WhichOneof("stats") is None:
        return int(dataset.num_examples)
    stats = getattr(feature, feature.WhichOneof("stats"))
    return int(dataset.num_examples - stats.common_stats.num_non_missing)


def drift_schema(derived_stats: Any, threshold: float) -> Any:
    """A schema of the derived features whose Jensen-Shannon comparators carry `threshold`."""
    import tensorflow_data_validation as tfdv

    schema = tfdv.infer_schema(derived_stats)
    for feature in schema.feature:
        if feature.name in DERIVED_FEATURES:
            feature.drift_comparator.jensen_shannon_divergence.threshold = threshold
    return schema


def check_drift(current: Any, previous: Any, threshold: float) -> tuple[Any, list[Finding]]:
    """TFDV's Jensen-Shannon comparison of two derived-statistics protos: (anomalies, findings)."""
    import tensorflow_data_validation as tfdv

    anomalies = tfdv.validate_statistics(current, drift_schema(current, threshold), previous_statistics=previous)
    findings = []
    for info in anomalies.drift_skew_info:
        name = ".".join(info.path.step)
        for m in info.drift_measurements:
            if m.value > m.threshold:
                text = f"Jensen-Shannon divergence {m.value:.3f} vs the previous span, above {m.threshold:g}"
                findings.append(Finding(DRIFT, artifacts.TRAIN, name, text, blocking=True))
    return anomalies, findings


def _drift(statistics_uri: str, previous_uri: str, threshold: float) -> tuple[Any | None, list[Finding]]:
    """Drift of the train split against the previous statistics, or a note why it was not checked."""
    if not stats_path(previous_uri, artifacts.TRAIN, DERIVED).is_file():
        note = f"previous statistics {previous_uri} have no derived train statistics; drift not checked"
        return None, [Finding(DRIFT, artifacts.TRAIN, "", note, blocking=False)]
    current = load_stats(statistics_uri, artifacts.TRAIN, DERIVED)
    previous = load_stats(previous_uri, artifacts.TRAIN, DERIVED)
    sizes = [s.datasets[0].num_examples if s.datasets else 0 for s in (current, previous)]
    if min(sizes) < MIN_DRIFT_EXAMPLES:
        note = (
            f"drift not checked: {sizes[0]} current and {sizes[1]} previous train examples, "
            f"below the {MIN_DRIFT_EXAMPLES} a Jensen-Shannon estimate needs"
        )
        return None, [Finding(DRIFT, artifacts.TRAIN, "", note, blocking=False)]
    return check_drift(current, previous, threshold)


def quarantined_examples(examples_uri: str) -> list[tuple[str, str]]:
    """(id, reason) of every quarantined example, read from the quarantine split."""
    import tensorflow as tf

    files = artifacts.split_files(examples_uri, artifacts.QUARANTINE)
    if not files:
        return []
    found = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator():
        features = tf.train.Example.FromString(record).features.feature
        ids = features[artifacts.ID_KEY].bytes_list.value if artifacts.ID_KEY in features else []
        reason = features[artifacts.REASON_KEY].bytes_list.value[0].decode("utf-8", errors="replace")
        found.append((display_id(ids[0]) if ids else "", reason))
    return found


def _quarantine_findings(examples_uri: str, max_invalid_fraction: float) -> tuple[list[Finding], dict[str, Any]]:
    counts = artifacts.read_info(examples_uri).counts
    total = sum(int(counts.get(s, 0)) for s in (*artifacts.SPLITS, artifacts.QUARANTINE))
    quarantined = quarantined_examples(examples_uri)
    fraction = len(quarantined) / total if total else 0.0
    blocking = fraction > max_invalid_fraction
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for example_id, reason in quarantined:
        by_kind.setdefault(reason.split(":", 1)[0], []).append((example_id, reason))
    findings = []
    for kind, items in sorted(by_kind.items()):
        detail = items[0][1].split(":", 1)[-1].strip()
        text = f"quarantined by ExampleGen, e.g. {detail}"
        ids = [i for i, _ in items if i][:MAX_IDS]
        findings.append(Finding(f"{QUARANTINED}:{kind}", artifacts.QUARANTINE, "", text, blocking, len(items), ids))
    if counts.get("skipped"):
        text = f"{counts['skipped']} unreadable record(s) skipped by ExampleGen (skip_bad_records); see its skipped list"
        findings.append(Finding("SKIPPED_RECORDS", "input", "", text, blocking=False, count=int(counts["skipped"])))
    summary = {"quarantined": len(quarantined), "examples": total, "invalid_fraction": fraction}
    return findings, summary


# ------------------------------------------------------------------ report


def render_text(findings: list[Finding], summary: dict[str, Any]) -> str:
    verdict = "FAILED" if summary["blocking"] else "passed"
    head = (
        f"segpipe data gate {verdict}: {summary['blocking']} blocking finding(s); "
        f"quarantined {summary['quarantined']} of {summary['examples']} examples "
        f"({summary['invalid_fraction']:.2%}, max {summary['max_invalid_fraction']:.2%})"
    )
    return "\n".join([head, *(f.line() for f in findings)]) + "\n"


def render_html(findings: list[Finding], summary: dict[str, Any]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("level", "kind", "split", "feature", "count", "description", "example ids"))
    rows = []
    for f in findings:
        cells = ["ERROR" if f.blocking else "note", f.kind, f.split, f.feature,
                 "" if f.count is None else str(f.count), f.description, ", ".join(f.example_ids)]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    title = html.escape(render_text([], summary).strip())
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>segpipe anomalies</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style></head><body>"
        f"<h1>{title}</h1><table><tr>{head}</tr>{''.join(rows)}</table></body></html>\n"
    )


def _write_proto(path: Path, proto: Any) -> None:
    from google.protobuf import text_format

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(proto))


# ------------------------------------------------------------------ the component


def validate_examples(
    statistics_uri: str,
    schema_uri: str,
    examples_uri: str,
    anomalies_uri: str,
    *,
    previous_statistics_uri: str | None = None,
    drift_threshold: float,
    max_invalid_fraction: float,
) -> dict:
    """Run the three checks, publish the Anomalies artifact, then raise DataAnomalyError if any failed.

    Returns {"passed": True, "findings": [...], "quarantined", "examples", "invalid_fraction", "report"}.
    """
    import tensorflow_data_validation as tfdv

    schema = load_schema(Path(schema_uri) / artifacts.SCHEMA_FILE)
    splits = stats_splits(statistics_uri)
    if not splits:
        raise BadInputError(f"{statistics_uri}: no split statistics ({artifacts.STATS_FILE}) found")
    findings: list[Finding] = []
    protos: dict[Path, Any] = {}
    for split in splits:
        stats = load_stats(statistics_uri, split, RAW)
        anomalies = tfdv.validate_statistics(stats, schema)
        protos[artifacts.split_dir(Path(), split) / artifacts.ANOMALIES_FILE] = anomalies
        findings.extend(_schema_findings(split, stats, anomalies))
    if previous_statistics_uri and drift_threshold > 0:
        drift_anomalies, drift_findings = _drift(statistics_uri, previous_statistics_uri, drift_threshold)
        findings.extend(drift_findings)
        if drift_anomalies is not None:
            protos[artifacts.split_dir(Path(), artifacts.TRAIN) / DRIFT_ANOMALIES_FILE] = drift_anomalies
    quarantine, summary = _quarantine_findings(examples_uri, max_invalid_fraction)
    findings.extend(quarantine)
    summary.update(max_invalid_fraction=max_invalid_fraction, blocking=sum(f.blocking for f in findings))
    report = Path(anomalies_uri) / SUMMARY_TEXT
    parameters = {"previous_statistics_uri": previous_statistics_uri, "drift_threshold": drift_threshold,
                  "max_invalid_fraction": max_invalid_fraction}
    inputs = (statistics_uri, schema_uri, examples_uri, previous_statistics_uri)
    with artifacts.publish(anomalies_uri, artifacts.ANOMALIES, producer=PRODUCER, parameters=parameters,
                           inputs=inputs) as (tmp, info):
        for relative, proto in protos.items():
            _write_proto(tmp / relative, proto)
        (tmp / SUMMARY_TEXT).write_text(render_text(findings, summary))
        (tmp / SUMMARY_HTML).write_text(render_html(findings, summary))
        artifacts.write_json_atomic(tmp / SUMMARY_JSON, {**summary, "findings": [asdict(f) for f in findings]})
        info["counts"] = {"findings": len(findings), "blocking": summary["blocking"],
                          "quarantined": summary["quarantined"], "examples": summary["examples"]}
        info["extra"] = {"kinds": sorted({f.kind for f in findings})}
    for finding in findings:
        (log.error if finding.blocking else log.info)("ExampleValidator: %s", finding.line())
    if summary["blocking"]:
        lines = render_text(findings, summary).splitlines()
        shown = "\n  ".join(lines[:8]) + ("\n  ..." if len(lines) > 8 else "")
        raise DataAnomalyError(f"{shown}\n  report: {report} (and {SUMMARY_HTML} beside it)")
    log.info("ExampleValidator: passed; report %s", report)
    return {"passed": True, "findings": [asdict(f) for f in findings], **summary, "report": str(report)}
