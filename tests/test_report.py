"""Reports: the prediction grid PNG and the HTML run report built from a run's artifacts.

The report tests write small artifacts by hand (the files each component publishes, with made-up
numbers) and read the report back through an HTML parser, section by section and table by table.
"""
from __future__ import annotations

import csv
import json
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.components import example_validator, statistics_gen, trainer
from segpipe.components.core import artifacts
from segpipe.components.core.data_format import write_labels
from segpipe.components.core import visual
from segpipe.components.core.visual import IGNORE_COLOUR, PALETTE, mask_to_rgb
from segpipe.components.evaluator import gate_checks, refusal_hints, verdict
from segpipe.components.example_gen import SKIPPED_FILE
from segpipe.components.pusher import PUSH_RESULT_FILE
from segpipe.components.tools import report


def grid_rows(n: int) -> list[visual.GridRow]:
    image = np.zeros((16, 16, 3), np.uint8)
    truth = np.zeros((16, 16), np.uint8)
    truth[4:8, 4:8] = 1
    truth[0] = 255
    return [visual.GridRow(f"worst {i}", image, truth, np.roll(truth, i, axis=1) % 255) for i in range(n)]


def test_mask_colours() -> None:
    rgb = mask_to_rgb(np.array([[0, 1, 2, 255]]))
    assert rgb[0].tolist() == [PALETTE[0].tolist(), PALETTE[1].tolist(), PALETTE[2].tolist(), list(IGNORE_COLOUR)]


def test_grid_png_has_one_row_per_example(tmp_path: Path) -> None:
    one = visual.plot_prediction_grid(grid_rows(1), tmp_path / "one.png")
    four = visual.plot_prediction_grid(grid_rows(4), tmp_path / "four.png", title="best and worst")
    h1, h4 = Image.open(one).height, Image.open(four).height
    assert Image.open(four).format == "PNG"
    assert 3.5 * h1 < h4 < 4.5 * h1


# ------------------------------------------------------------------ reading the report back


class ReportParser(HTMLParser):
    """Section id -> its tables (rows of cell texts), its text, and every link and image."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.current: dict | None = None
        self.cell: list[str] | None = None
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self.current = self.sections.setdefault(attributes["id"], {"tables": [], "text": []})
        elif self.current is not None and tag == "table":
            self.current["tables"].append([])
        elif self.current is not None and tag == "tr":
            self.current["tables"][-1].append([])
        elif self.current is not None and tag in ("td", "th"):
            self.cell = []
        elif tag == "a":
            self.links.append(attributes["href"])
        elif tag == "img":
            self.images.append(attributes["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.current["tables"][-1][-1].append(" ".join(" ".join(self.cell).split()))
            self.cell = None
        elif tag == "section":
            self.current = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)
        if self.current is not None:
            self.current["text"].append(data)


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text())
    return parser


def section(parsed: ReportParser, title: str) -> dict:
    found = parsed.sections[title.lower().replace(" ", "-")]
    return {"tables": found["tables"], "text": " ".join("".join(found["text"]).split())}


# ------------------------------------------------------------------ small artifacts


METRICS = {
    "pixel_accuracy": 0.8123, "foreground_iou": 0.61, "mean_iou": 0.7, "dice": 0.75, "all_background_accuracy": 0.85,
    "iou_per_class": [0.9, 0.61, None], "dice_per_class": [0.95, 0.75, None], "num_classes": 3,
    "confusion_matrix": [[90, 10, 0], [5, 15, 0], [0, 0, 0]], "num_examples": 9, "num_pixels": 120, "image_size": 32,
    "baseline": {"model": "/serving/3", "pixel_accuracy": 0.9, "foreground_iou": 0.6},
    "worst_examples": [{"id": "<img-7>", "iou": 0.12}], "best_examples": [{"id": "img-1", "iou": 0.98}],
}
HISTORY = [
    {"epoch": 0, "loss": 0.7, "val_loss": 0.6, "iou": 0.2, "val_iou": 0.25},
    {"epoch": 1, "loss": 0.5, "val_loss": 0.45, "iou": 0.4, "val_iou": 0.42},
]
COUNTS = {"train": 40, "eval": 5, "test": 5, "quarantine": 2, "skipped": 1}
QUARANTINED = [("img-q1", "too_small: 20x20 is below the minimum side 32"),
               ("img-q2", "mask_values: mask values [7] are outside 0..2 and 255")]
SIZES = {"train": ((32, 40, 64), (30, 48, 96)), "eval": ((32, 32, 32), (48, 48, 48)), "test": ((40, 40, 50), (40, 41, 60))}


def write_examples(uri: Path) -> Path:
    import tensorflow as tf

    with artifacts.publish(uri, artifacts.EXAMPLES, producer="ExampleGen") as (tmp, info):
        folder = artifacts.split_dir(tmp, artifacts.QUARANTINE)
        folder.mkdir(parents=True)
        with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
            for example_id, reason in QUARANTINED:
                feature = {key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
                           for key, value in ((artifacts.ID_KEY, example_id), (artifacts.REASON_KEY, reason))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        (tmp / SKIPPED_FILE).write_text(json.dumps({"file": "/data/span-1/a.tfrecord", "record": 3,
                                                    "problem": "corrupted record (bad data checksum)"}) + "\n")
        info["counts"] = dict(COUNTS)
        info["extra"] = {"spans": [1, 2], "files": ["a", "b", "c"], "quarantine_reasons": {"too_small": 1, "mask_values": 1},
                         "skipped_reasons": {"corrupted record": 1}}
    return uri


def write_statistics(uri: Path) -> Path:
    from tensorflow_metadata.proto.v0 import statistics_pb2

    with artifacts.publish(uri, artifacts.STATISTICS, producer="StatisticsGen") as (tmp, _):
        for split, sizes in SIZES.items():
            dataset = statistics_pb2.DatasetFeatureStatistics(name=split, num_examples=COUNTS[split])
            for name, (low, median, high) in zip((statistics_gen.HEIGHT, statistics_gen.WIDTH), sizes):
                feature = dataset.features.add()
                feature.path.step.append(name)
                feature.num_stats.min, feature.num_stats.median, feature.num_stats.max = low, median, high
            for view, stats in ((statistics_gen.RAW, statistics_pb2.DatasetFeatureStatisticsList()),
                                (statistics_gen.DERIVED, statistics_pb2.DatasetFeatureStatisticsList(datasets=[dataset]))):
                path = statistics_gen.stats_path(tmp, split, view)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(stats.SerializeToString())
        (tmp / statistics_gen.REPORT_FILE).write_text("<html></html>")
    return uri


def write_anomalies(uri: Path) -> Path:
    finding = {"blocking": False, "count": 2, "description": "quarantined by ExampleGen, e.g. 20x20 < 32",
               "example_ids": ["img-q1", "img-q2"], "feature": "", "kind": "QUARANTINED:too_small", "split": "quarantine"}
    summary = {"blocking": 0, "examples": 52, "quarantined": 2, "invalid_fraction": 2 / 52, "max_invalid_fraction": 0.1,
               "findings": [finding]}
    with artifacts.publish(uri, artifacts.ANOMALIES, producer="ExampleValidator") as (tmp, _):
        (tmp / example_validator.SUMMARY_JSON).write_text(json.dumps(summary))
        (tmp / example_validator.SUMMARY_HTML).write_text("<html></html>")
    return uri


def write_model_run(uri: Path) -> Path:
    with artifacts.publish(uri, artifacts.MODEL_RUN, producer="Trainer") as (tmp, info):
        with open(tmp / trainer.HISTORY_FILE, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(HISTORY[0]))
            writer.writeheader()
            writer.writerows(HISTORY)
        visual.plot_prediction_grid(grid_rows(1), tmp / trainer.CURVES_FILE)
        info["extra"] = {"epochs": 2, "best_epoch": 2, "initial_epoch": 0, "parameters": 7469, "precision": "float32",
                         "warm_start": {"used": False, "reason": "no base model"}}
    return uri


REJECTING_GATE = {"pixel_accuracy_threshold": 0.9, "min_foreground_iou": 0.5, "min_class_iou": 0.3, "max_regression": 0.01}
PASSING_GATE = {"pixel_accuracy_threshold": 0.8, "min_foreground_iou": 0.5, "min_class_iou": 0.3, "max_regression": 0.1}


def write_artifacts(root: Path, blessed: bool, record_checks: bool = True) -> dict[str, Path]:
    """Every artifact the report reads. Not blessed: pixel accuracy fails its threshold and the baseline.

    The gate's checks come from the Evaluator's own `gate_checks`; `record_checks=False` writes
    metrics.json and the blessing as they were before the checks were recorded.
    """
    evaluation, blessing, pushed = root / "evaluation", root / "blessing", root / "pushed"
    gate = PASSING_GATE if blessed else REJECTING_GATE
    checks = gate_checks(METRICS, METRICS["baseline"], **gate)
    ok, reasons = verdict(checks)
    assert ok == blessed
    hints = [] if blessed else refusal_hints(METRICS, HISTORY, {"loss": "bce"})
    recorded = {"checks": checks, "hints": hints} if record_checks else {}
    with artifacts.publish(evaluation, artifacts.MODEL_EVALUATION, producer="evaluator") as (tmp, _):
        (tmp / artifacts.EVALUATION_FILE).write_text(json.dumps({**METRICS, "gate": gate, **recorded}))
        visual.plot_prediction_grid(grid_rows(2), tmp / visual.GRID_FILE)
    with artifacts.publish(blessing, artifacts.MODEL_BLESSING, producer="evaluator") as (tmp, _):
        (tmp / artifacts.BLESSING_FILE).write_text(json.dumps({"blessed": blessed, "reasons": reasons, **recorded}))
    record = {"pushed": blessed, "version": 4 if blessed else None, "path": str(root / "serving" / "4") if blessed else None,
              "serving_dir": "/serving"}
    with artifacts.publish(pushed, artifacts.PUSHED_MODEL, producer="Pusher") as (tmp, _):
        (tmp / PUSH_RESULT_FILE).write_text(json.dumps(record))
    return {"evaluation_uri": evaluation, "blessing_uri": blessing, "pushed_model_uri": pushed,
            "examples_uri": write_examples(root / "examples"), "statistics_uri": write_statistics(root / "statistics"),
            "anomalies_uri": write_anomalies(root / "anomalies"), "model_run_uri": write_model_run(root / "model_run")}


@pytest.fixture(scope="module")
def rejected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReportParser, dict[str, Path]]:
    """A report of a run that was not blessed, whose data folder names three classes."""
    root = tmp_path_factory.mktemp("rejected")
    write_labels(root / "data", {0: "background", 1: "cat", 2: "<dog>"})
    uris = write_artifacts(root, blessed=False)
    path = report.write_run_report(root / "reports" / "run-1.html", data_root=root / "data", run_id="run-1",
                                   message="not blessed: pixel accuracy 0.812 < threshold 0.900", **uris)
    return path, parse(path), uris


# ------------------------------------------------------------------ the sections


def test_every_section_in_order(rejected) -> None:
    path, parsed, _ = rejected
    assert list(parsed.sections) == [t.lower().replace(" ", "-") for t in report.SECTION_TITLES]
    text = path.read_text()
    assert "<script" not in text and "run-1" in text and "NOT BLESSED" in text


GATE_TABLE = [
    ["Check", "Value", "Threshold", "Result"],
    ["pixel accuracy >= threshold", "0.8123", "≥ 0.9000", "FAIL"],
    ["foreground IoU >= minimum", "0.6100", "≥ 0.5000", "pass"],
    ["class 1 IoU >= minimum", "0.6100", "≥ 0.3000", "pass"],
    ["class 2 IoU >= minimum (not in the test split)", "–", "≥ 0.3000", "pass"],
    ["pixel accuracy regression vs baseline", "0.8123", "≥ 0.8900", "FAIL"],
    ["foreground IoU regression vs baseline", "0.6100", "≥ 0.5900", "pass"],
]


def test_gate_lists_every_check_with_value_threshold_and_result(rejected) -> None:
    _, parsed, uris = rejected
    gate = section(parsed, report.GATE)
    assert gate["tables"][0] == GATE_TABLE
    assert "pixel accuracy 0.812 < threshold 0.900" in gate["text"]  # the blessing's reasons, verbatim
    assert "is 0.088 below the baseline's 0.900" in gate["text"]
    assert "baseline model /serving/3 (max regression 0.0100)" in gate["text"]
    # What to try next: the blessing's hints, verbatim (weakest class, then the still-falling eval loss).
    hints = json.loads((uris["blessing_uri"] / artifacts.BLESSING_FILE).read_text())["hints"]
    assert [h.split(":")[0] for h in hints] == ["weakest class", "training was still improving when it stopped"]
    assert "What to try next:" in gate["text"] and all(h in gate["text"] for h in hints)


def test_gate_of_artifacts_without_recorded_checks_is_recomputed_by_the_evaluator(tmp_path: Path) -> None:
    uris = write_artifacts(tmp_path, blessed=False, record_checks=False)
    assert "checks" not in json.loads((uris["blessing_uri"] / artifacts.BLESSING_FILE).read_text())
    path = report.write_run_report(tmp_path / "r.html", **uris)
    assert section(parse(path), report.GATE)["tables"][0] == GATE_TABLE
    # A gate from before per-class checks existed (no min_class_iou) gets no per-class rows.
    metrics = json.loads((uris["evaluation_uri"] / artifacts.EVALUATION_FILE).read_text())
    metrics["gate"].pop("min_class_iou")
    (uris["evaluation_uri"] / artifacts.EVALUATION_FILE).write_text(json.dumps(metrics))
    path = report.write_run_report(tmp_path / "old.html", **uris)
    assert section(parse(path), report.GATE)["tables"][0] == [row for row in GATE_TABLE if not row[0].startswith("class")]


def test_metrics_against_the_baseline(rejected) -> None:
    _, parsed, _ = rejected
    rows = section(parsed, report.METRICS)["tables"][0]
    assert rows[1] == ["Pixel accuracy", "0.8123", "0.9000", "-0.0877"]
    assert rows[3] == ["Mean IoU (incl. background)", "0.7000", "–", "–"]


def test_per_class_metrics_use_the_class_names_and_show_the_confusion_matrix(rejected) -> None:
    _, parsed, _ = rejected
    per_class, confusion = section(parsed, report.PER_CLASS)["tables"]
    assert per_class[1:] == [["0", "background", "0.9000", "0.9500", "100", "95"],
                             ["1", "cat", "0.6100", "0.7500", "20", "25"],
                             ["2", "<dog>", "–", "–", "0", "0"]]
    assert confusion[0] == ["true \\ predicted", "background", "cat", "<dog>", "total"]
    assert confusion[1] == ["background", "90 90.0%", "10 10.0%", "0 0.0%", "100"]
    assert confusion[2] == ["cat", "5 25.0%", "15 75.0%", "0 0.0%", "20"]


def test_per_class_metrics_without_labels_name_classes_by_id(tmp_path: Path) -> None:
    uris = write_artifacts(tmp_path, blessed=False)
    path = report.write_run_report(tmp_path / "r.html", data_root=tmp_path / "no-data", **uris)
    per_class = section(parse(path), report.PER_CLASS)
    assert [row[1] for row in per_class["tables"][0][1:]] == ["class 0", "class 1", "class 2"]
    assert "no labels.json" in per_class["text"]


def test_predictions_and_training_curves_are_inlined(rejected) -> None:
    _, parsed, uris = rejected
    grid = (uris["evaluation_uri"] / visual.GRID_FILE).read_bytes()
    curves = (uris["model_run_uri"] / trainer.CURVES_FILE).read_bytes()
    import base64

    inlined = {base64.b64decode(src.split(",", 1)[1]) for src in parsed.images}
    assert inlined == {grid, curves}
    predictions = section(parsed, report.PREDICTIONS)
    assert predictions["tables"] == [[["Example", "IoU"], ["<img-7>", "0.1200"]], [["Example", "IoU"], ["img-1", "0.9800"]]]


def test_training_history_per_epoch(rejected) -> None:
    path, parsed, _ = rejected
    training = section(parsed, report.TRAINING)
    assert training["tables"][0] == [
        ["Epoch", "train loss", "eval loss", "train iou", "eval iou"],
        ["1", "0.7000", "0.6000", "0.2000", "0.2500"],
        ["2", "0.5000", "0.4500", "0.4000", "0.4200"],
    ]
    assert "2 epoch(s), best epoch 2" in training["text"] and "warm start: no base model" in training["text"]
    assert "<tr><td class=\"num\">2</td><td class=\"num\"><b>0.5000</b>" in path.read_text()  # the best epoch


def test_data_summary(rejected) -> None:
    _, parsed, _ = rejected
    data = section(parsed, report.DATA)
    splits, by_reason, quarantined, by_problem, skipped, sizes, findings = data["tables"]
    assert splits[1:] == [["train", "40", "76.9%"], ["eval", "5", "9.6%"], ["test", "5", "9.6%"],
                          ["quarantine", "2", "3.8%"], ["skipped", "1", "–"]]
    assert by_reason[1:] == [["mask_values", "1"], ["too_small", "1"]]
    assert quarantined[1:] == [list(q) for q in QUARANTINED]
    assert by_problem[1:] == [["corrupted record", "1"]]
    assert skipped[1:] == [["/data/span-1/a.tfrecord", "3", "corrupted record (bad data checksum)"]]
    assert sizes[0] == ["Split", "Examples", "Height min", "median", "max", "Width min", "median", "max"]
    assert sizes[1:] == [["train", "40", "32", "40", "64", "30", "48", "96"], ["eval", "5", "32", "32", "32", "48", "48", "48"],
                         ["test", "5", "40", "40", "50", "40", "41", "60"]]
    assert findings[1] == ["note", "QUARANTINED:too_small", "quarantine", "–", "2",
                           "quarantined by ExampleGen, e.g. 20x20 < 32", "img-q1, img-q2"]
    assert "Span(s) 1, 2: 3 file(s)" in data["text"]
    assert "Data gate passed: 0 blocking finding(s); quarantined 2 of 52 examples (3.85%, max 10.00%)" in data["text"]


def test_links_reach_every_artifact(rejected) -> None:
    path, parsed, uris = rejected
    targets = {(path.parent / urllib.parse.unquote(href)).resolve() for href in parsed.links if not href.startswith("#")}
    assert {Path(uri).resolve() for uri in uris.values()} <= targets
    assert (uris["statistics_uri"] / statistics_gen.REPORT_FILE).resolve() in targets
    assert (uris["anomalies_uri"] / example_validator.SUMMARY_HTML).resolve() in targets
    rows = section(parsed, report.ARTIFACTS)["tables"][0]
    assert ["ExampleGen", "–", "examples", artifacts.EXAMPLES] == rows[1][:4]
    assert len(rows) == 1 + len(uris)


def test_given_artifact_links_are_listed_with_their_step_state(tmp_path: Path) -> None:
    uris = write_artifacts(tmp_path, blessed=False)
    links = [report.ArtifactLink("example_gen", "examples", artifacts.EXAMPLES, str(uris["examples_uri"]), "cached"),
             report.ArtifactLink("trainer", "model_run", artifacts.MODEL_RUN, str(uris["model_run_uri"]), "done")]
    path = report.write_run_report(tmp_path / "r.html", artifact_links=links, **uris)
    text = path.read_text()
    rows = section(parse(path), report.ARTIFACTS)["tables"][0]
    assert rows[1:] == [["example_gen", "cached", "examples", artifacts.EXAMPLES, "examples"],
                        ["trainer", "done", "model_run", artifacts.MODEL_RUN, "model_run"]]
    assert f"Paths under <code>{tmp_path.resolve()}</code>" in text


def test_a_broken_artifact_costs_only_its_section(tmp_path: Path) -> None:
    uris = write_artifacts(tmp_path, blessed=False)
    statistics_gen.stats_path(uris["statistics_uri"], "train", statistics_gen.DERIVED).write_bytes(b"not a proto")
    path = report.write_run_report(tmp_path / "r.html", **uris)
    parsed = parse(path)
    assert "This section could not be built: BadInputError" in section(parsed, report.DATA)["text"]
    assert "derived_stats.pb" in section(parsed, report.DATA)["text"]  # the error names the file
    assert section(parsed, report.GATE)["tables"][0][1][-1] == "FAIL"


def test_run_report_blessed_and_pushed(tmp_path: Path) -> None:
    uris = write_artifacts(tmp_path, blessed=True)
    path = report.write_run_report(tmp_path / "out" / "report.html", evaluation_uri=uris["evaluation_uri"],
                                   blessing_uri=uris["blessing_uri"], pushed_model_uri=uris["pushed_model_uri"])
    parsed = parse(path)
    assert "NOT BLESSED" not in path.read_text() and "BLESSED" in section(parsed, report.GATE)["text"]
    assert "Pushed as version 4" in section(parsed, report.PUSH)["text"]
    assert "No Examples artifact given." in section(parsed, report.DATA)["text"]
    assert "The trainer did not run." in section(parsed, report.TRAINING)["text"]
    assert not list(path.parent.glob(".*"))  # written via a temp name, nothing left behind
