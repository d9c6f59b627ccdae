"""StatisticsGen (both views, HTML report) and the schema: import, parse errors, `schema infer`."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError
from segpipe.components.example_gen import run_example_gen
from segpipe.components.schema_gen import import_schema, infer_schema_draft, load_schema
from segpipe.components.statistics_gen import (
    DERIVED,
    DERIVED_FEATURES,
    REPORT_FILE,
    generate_statistics,
    load_stats,
)

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "schema.pbtxt"


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory, write_tiny_span, dag_params) -> dict[str, Path]:
    """One ExampleGen + StatisticsGen run over 24 examples of 40x48 px, shared by this module."""
    root = tmp_path_factory.mktemp("stats")
    write_tiny_span(root / "data", 1, num=24, size=(40, 48))
    run_example_gen(**dag_params("example_gen", input_pattern=str(root / "data" / "span-{SPAN}" / "*.tfrecord*"), examples_uri=str(root / "examples")))
    generate_statistics(str(root / "examples"), str(root / "statistics"), beam_args=["--runner=FnApiRunner"])
    return {"examples": root / "examples", "statistics": root / "statistics", "root": root}


def _examples(examples_uri: Path, split: str) -> list:
    import tensorflow as tf

    files = artifacts.split_files(examples_uri, split)
    return [tf.train.Example.FromString(r) for r in tf.data.TFRecordDataset(files, "GZIP").as_numpy_iterator()]


def _feature(stats, name: str):
    (feature,) = [f for f in stats.datasets[0].features if ".".join(f.path.step) == name]
    return feature


def test_raw_statistics_count_every_split_and_carry_image_statistics(stats_run):
    counts = artifacts.read_info(stats_run["examples"]).counts
    for split in artifacts.SPLITS:
        stats = load_stats(stats_run["statistics"], split)
        assert stats.datasets[0].num_examples == counts[split]
        assert {".".join(f.path.step) for f in stats.datasets[0].features} == {"image", "mask", "id"}
    train = load_stats(stats_run["statistics"], artifacts.TRAIN)
    for name in ("image", "mask"):
        custom = {c.name: c for c in _feature(train, name).custom_stats}
        assert custom["domain_info"].str == "image_domain {}"
        assert custom["image_max_height"].num == 40 and custom["image_max_width"].num == 48
        assert [(b.label, b.sample_count) for b in custom["image_format_histogram"].rank_histogram.buckets] == [
            ("png", counts[artifacts.TRAIN])
        ]
    assert artifacts.read_info(stats_run["statistics"]).type == artifacts.STATISTICS


def test_derived_statistics_match_numpy_on_the_same_pixels(stats_run):
    examples = _examples(stats_run["examples"], artifacts.TRAIN)
    images = [np.asarray(Image.open(io.BytesIO(e.features.feature["image"].bytes_list.value[0]))) for e in examples]
    masks = [np.asarray(Image.open(io.BytesIO(e.features.feature["mask"].bytes_list.value[0]))) for e in examples]
    derived = load_stats(stats_run["statistics"], artifacts.TRAIN, DERIVED)

    assert {".".join(f.path.step) for f in derived.datasets[0].features} == set(DERIVED_FEATURES)
    expected = {
        "height": np.mean([m.shape[0] for m in masks]),
        "width": np.mean([m.shape[1] for m in masks]),
        "foreground_fraction": np.mean([(m == 1).mean() for m in masks]),
        "mean_intensity": np.mean([i.astype(np.float64).mean() for i in images]),
    }
    for name, value in expected.items():
        assert _feature(derived, name).num_stats.mean == pytest.approx(value, rel=1e-4), name
    fractions = [(m == 1).mean() for m in masks]
    assert _feature(derived, "foreground_fraction").num_stats.min == pytest.approx(min(fractions), rel=1e-4)


def test_html_report_names_splits_and_features(stats_run):
    report = (stats_run["statistics"] / REPORT_FILE).read_text()
    for text in ("Split train", "Split eval", "Split test", "image_max_width", *DERIVED_FEATURES, ">mask<"):
        assert text in report, text
    assert "facets-overview" in report  # TFDV's Facets view rendered without IPython


def test_statistics_need_examples(tmp_path):
    with pytest.raises(BadInputError, match="no split holds"):
        generate_statistics(str(tmp_path / "nothing"), str(tmp_path / "stats"), beam_args=[])
    assert not (tmp_path / "stats").exists()


# ------------------------------------------------------------------ schema


def test_curated_schema_requires_one_value_of_each_feature():
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = load_schema(SCHEMA)
    by_name = {f.name: f for f in schema.feature}
    assert set(by_name) == {"image", "mask", "id"}
    for feature in by_name.values():
        assert feature.type == schema_pb2.BYTES
        assert feature.presence.min_fraction == 1.0
        assert (feature.value_count.min, feature.value_count.max) == (1, 1)
    assert by_name["image"].HasField("image_domain") and by_name["mask"].HasField("image_domain")


def test_import_schema_publishes_the_file_with_its_comments(tmp_path):
    result = import_schema(str(SCHEMA), str(tmp_path / "schema"))
    published = tmp_path / "schema" / artifacts.SCHEMA_FILE
    assert published.read_text() == SCHEMA.read_text()
    assert result["features"] == ["image", "mask", "id"]
    info = artifacts.read_info(tmp_path / "schema")
    assert info.type == artifacts.SCHEMA and info.parameters["sha256"] == result["sha256"]


def test_import_schema_rejects_unparsable_or_incomplete_schemas(tmp_path):
    broken = tmp_path / "broken.pbtxt"
    broken.write_text('feature { name: "image" type: BYTES\n')
    with pytest.raises(BadInputError, match=rf"{broken}: not a Schema text proto"):
        import_schema(str(broken), str(tmp_path / "schema"))
    partial = tmp_path / "partial.pbtxt"
    partial.write_text('feature { name: "image" type: BYTES }\n')
    with pytest.raises(BadInputError, match=rf"{partial}: schema lacks feature\(s\) mask, id"):
        import_schema(str(partial), str(tmp_path / "schema"))
    with pytest.raises(BadInputError, match="schema file not found"):
        import_schema(str(tmp_path / "missing.pbtxt"), str(tmp_path / "schema"))
    assert not (tmp_path / "schema").exists()


def test_schema_infer_cli_writes_a_reviewable_draft(stats_run, tmp_path):
    from segpipe.pipeline.cli import main

    out = tmp_path / "drafts" / "schema.pbtxt"
    assert main(["schema", "infer", "--stats", str(stats_run["statistics"]), "--out-file", str(out)]) == 0
    draft = load_schema(out)
    by_name = {f.name: f for f in draft.feature}
    assert set(by_name) == {"image", "mask", "id"}
    assert by_name["image"].HasField("image_domain")
    assert not by_name["id"].domain and not draft.string_domain  # ids are not enumerated
    assert [p.name for p in out.parent.iterdir()] == ["schema.pbtxt"]  # no temp file left
    stats_file = artifacts.split_dir(stats_run["statistics"], artifacts.EVAL) / artifacts.STATS_FILE
    assert infer_schema_draft(stats_file, tmp_path / "eval.pbtxt")["features"] == ["id", "image", "mask"]
    assert main(["schema", "infer", "--stats", str(tmp_path / "none"), "--out-file", str(out)]) == 2
