"""ExampleValidator: every anomaly kind stops the pipeline with a report; drift; tolerance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segpipe.components.core import artifacts
from segpipe.components.core.data_format import encode_example, encode_png, write_span
from segpipe.components.core.errors import DataAnomalyError
from segpipe.components.example_gen import run_example_gen
from segpipe.components.example_validator import (
    DRIFT_ANOMALIES_FILE,
    SUMMARY_HTML,
    SUMMARY_JSON,
    SUMMARY_TEXT,
    validate_examples,
)
from segpipe.components.schema_gen import import_schema
from segpipe.components.statistics_gen import generate_statistics

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "schema.pbtxt"
BEAM = ["--runner=FnApiRunner"]
ANOMALOUS = {"wrong-channels": "image_channels", "sizes": "size_mismatch", "mask-values": "mask_values",
             "no-mask": "missing_feature"}


def _record(example_id: str, rng: np.random.Generator, image_shape=(40, 40, 3), mask_shape=(40, 40), mask_max=1) -> bytes:
    image = rng.integers(0, 255, size=image_shape, dtype=np.uint8)
    mask = rng.integers(0, mask_max + 1, size=mask_shape, dtype=np.uint8)
    return encode_example(example_id, encode_png(image), encode_png(mask))


def _without_mask(record: bytes) -> bytes:
    import tensorflow as tf

    example = tf.train.Example.FromString(record)
    del example.features.feature[artifacts.MASK_KEY]
    return example.SerializeToString()


def _pipeline(root: Path, dag_params, examples_uri: Path | None = None) -> dict[str, str]:
    """ExampleGen (unless given), StatisticsGen and the imported schema under `root`."""
    uris = {name: str(root / name) for name in ("examples", "statistics", "schema", "anomalies")}
    if examples_uri is None:
        run_example_gen(**dag_params("example_gen", input_pattern=str(root / "data" / "span-{SPAN}" / "*.tfrecord*"), examples_uri=uris["examples"], beam_args=BEAM))
    else:
        uris["examples"] = str(examples_uri)
    generate_statistics(uris["examples"], uris["statistics"], beam_args=BEAM)
    import_schema(str(SCHEMA), uris["schema"])
    return uris


@pytest.fixture(scope="module")
def anomalous_run(tmp_path_factory, dag_params) -> dict[str, str]:
    """16 good examples and one of each per-example anomaly kind, through ExampleGen and StatisticsGen."""
    root = tmp_path_factory.mktemp("anomalous")
    rng = np.random.default_rng(5)
    records = [_record(f"ok-{i}", rng) for i in range(16)]
    records += [
        _record("wrong-channels", rng, image_shape=(40, 40, 4)),
        _record("sizes", rng, mask_shape=(40, 36)),
        _record("mask-values", rng, mask_max=3),
        _without_mask(_record("no-mask", rng)),
    ]
    write_span(root / "data", 1, records)
    return _pipeline(root, dag_params)


@pytest.fixture
def validate(dag_params):
    """`validate(uris, **overrides)`: the ExampleValidator as the DAG calls it."""

    def _validate(uris: dict[str, str], **kwargs) -> dict:
        params = dag_params("example_validator", **kwargs)
        return validate_examples(uris["statistics"], uris["schema"], uris["examples"], uris["anomalies"], **params)

    return _validate


def _split_ids(examples_uri: str) -> set[str]:
    import tensorflow as tf

    files = [f for s in artifacts.SPLITS for f in artifacts.split_files(examples_uri, s)]
    records = tf.data.TFRecordDataset(files, "GZIP").as_numpy_iterator()
    return {tf.train.Example.FromString(r).features.feature["id"].bytes_list.value[0].decode() for r in records}


def test_each_anomaly_kind_stops_the_pipeline_with_a_published_report(anomalous_run, validate):
    with pytest.raises(DataAnomalyError) as raised:
        validate(anomalous_run, max_invalid_fraction=0.0)

    anomalies = Path(anomalous_run["anomalies"])
    message = str(raised.value)
    assert "data gate FAILED" in message and f"report: {anomalies / SUMMARY_TEXT}" in message
    assert raised.value.exit_code == 2
    text = (anomalies / SUMMARY_TEXT).read_text()
    page = (anomalies / SUMMARY_HTML).read_text()
    for example_id, kind in ANOMALOUS.items():
        line = next(line for line in text.splitlines() if f"QUARANTINED:{kind}" in line)
        assert line.startswith("ERROR") and example_id in line and "x1" in line
        assert f"QUARANTINED:{kind}" in page and example_id in page
    summary = json.loads((anomalies / SUMMARY_JSON).read_text())
    assert summary["quarantined"] == 4 and summary["examples"] == 20
    assert summary["invalid_fraction"] == pytest.approx(0.2)
    for split in artifacts.SPLITS:
        assert (artifacts.split_dir(anomalies, split) / artifacts.ANOMALIES_FILE).is_file()
    assert artifacts.read_info(anomalies).type == artifacts.ANOMALIES
    assert _split_ids(anomalous_run["examples"]) == {f"ok-{i}" for i in range(16)}  # none leaked


def test_quarantine_within_tolerance_passes_and_still_lists_the_ids(anomalous_run, validate):
    result = validate(anomalous_run, max_invalid_fraction=0.25)

    assert result["passed"] and result["quarantined"] == 4
    quarantined = [f for f in result["findings"] if f["kind"].startswith("QUARANTINED")]
    assert {f["example_ids"][0] for f in quarantined} == set(ANOMALOUS)
    assert not any(f["blocking"] for f in result["findings"])
    assert "data gate passed" in (Path(anomalous_run["anomalies"]) / SUMMARY_TEXT).read_text()


def test_missing_feature_in_a_split_is_caught_by_tfdv_schema_validation(tmp_path, validate, dag_params):
    """An Examples artifact not made by ExampleGen (or a new ExampleGen bug) still cannot pass."""
    import tensorflow as tf

    rng = np.random.default_rng(9)
    examples_uri = tmp_path / "examples"
    with artifacts.publish(examples_uri, artifacts.EXAMPLES, producer="test") as (tmp, info):
        for split, n in ((artifacts.TRAIN, 8), (artifacts.EVAL, 2), (artifacts.TEST, 2)):
            folder = artifacts.split_dir(tmp, split)
            folder.mkdir()
            records = [_record(f"{split}-{i}", rng) for i in range(n)]
            if split == artifacts.TRAIN:
                records[3] = _without_mask(records[3])
            with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
                for record in records:
                    writer.write(record)
            info["counts"][split] = n
        info["counts"][artifacts.QUARANTINE] = 0
    uris = _pipeline(tmp_path, dag_params, examples_uri)

    with pytest.raises(DataAnomalyError, match=r"FEATURE_TYPE_LOW_FRACTION_PRESENT \[train/mask\] x1"):
        validate(uris)
    anomalies_proto = (artifacts.split_dir(uris["anomalies"], artifacts.TRAIN) / artifacts.ANOMALIES_FILE).read_text()
    assert 'key: "mask"' in anomalies_proto


@pytest.fixture(scope="module")
def drift_runs(tmp_path_factory, write_tiny_span, dag_params) -> tuple[dict[str, str], dict[str, str]]:
    """Two clean spans of 130 examples whose image sizes differ (40x48, then 64x64)."""
    runs = []
    for span, size in ((1, (40, 48)), (2, (64, 64))):
        root = tmp_path_factory.mktemp(f"drift{span}")
        write_tiny_span(root / "data", span, num=130, size=size, seed=span)
        runs.append(_pipeline(root, dag_params))
    return runs[0], runs[1]


def test_drift_against_the_previous_span_stops_the_pipeline(drift_runs, validate):
    previous, current = drift_runs
    with pytest.raises(DataAnomalyError, match=r"DRIFT_JENSEN_SHANNON \[train/height\]"):
        validate(current, previous_statistics_uri=previous["statistics"], drift_threshold=0.1)
    text = (Path(current["anomalies"]) / SUMMARY_TEXT).read_text()
    assert "[train/width]" in text and "foreground_fraction" not in text
    drift_proto = artifacts.split_dir(current["anomalies"], artifacts.TRAIN) / DRIFT_ANOMALIES_FILE
    assert "JENSEN_SHANNON_DIVERGENCE" in drift_proto.read_text()


def test_same_distribution_passes_and_threshold_zero_disables_drift(drift_runs, validate):
    previous, current = drift_runs
    assert validate(previous, previous_statistics_uri=previous["statistics"], drift_threshold=0.1)["passed"]
    result = validate(current, previous_statistics_uri=previous["statistics"], drift_threshold=0.0)
    assert result["passed"] and not [f for f in result["findings"] if f["kind"].startswith("DRIFT")]


def test_drift_is_not_estimated_from_too_few_examples(anomalous_run, drift_runs, validate):
    result = validate(drift_runs[1], previous_statistics_uri=anomalous_run["statistics"], drift_threshold=0.1)
    (note,) = [f for f in result["findings"] if f["kind"].startswith("DRIFT")]
    assert not note["blocking"] and "drift not checked" in note["description"]
