"""ExampleGen: span resolution, deterministic splits, per-example checks, every bad-input case."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segpipe.components.core import artifacts
from segpipe.components.core.data_format import encode_example, encode_png, span_dir, write_span
from segpipe.components.core.errors import BadInputError
from segpipe.components.example_gen import assign_split, resolve_spans, run_example_gen, split_order

PATTERN = "span-{SPAN}/*.tfrecord*"
SPLITS = split_order({"train": 80, "eval": 10, "test": 10})


def _pattern(root: Path) -> str:
    return str(root / PATTERN)


def _read_split(examples_uri: Path, split: str) -> list[bytes]:
    import tensorflow as tf

    files = artifacts.split_files(examples_uri, split)
    return list(tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator())


def _ids(records: list[bytes]) -> list[str]:
    import tensorflow as tf

    return [tf.train.Example.FromString(r).features.feature["id"].bytes_list.value[0].decode() for r in records]


def _good_record(example_id: str, size: tuple[int, int] = (40, 40), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
    mask = (rng.random(size) > 0.5).astype(np.uint8)
    return encode_example(example_id, encode_png(image), encode_png(mask))


def _write_raw_tfrecord(path: Path, records: list[bytes]) -> list[int]:
    """Uncompressed TFRecord file; returns each record's byte offset."""
    import tensorflow as tf

    offsets, offset = [], 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
            offsets.append(offset)
            offset += len(record) + 16
    return offsets


def _assert_nothing_published(examples_uri: Path) -> None:
    assert not examples_uri.exists()
    assert not [p for p in examples_uri.parent.iterdir() if p.name.startswith(f".{examples_uri.name}")]


# ------------------------------------------------------------------ spans and splits (no Beam)


def test_resolve_spans_latest_given_last_k_numeric_order(tmp_path, write_tiny_span):
    for span in (1, 2, 9, 10):
        write_tiny_span(tmp_path, span, num=1)
    hidden = tmp_path / ".span-11.tmp-abc123"  # a span still being written
    hidden.mkdir()
    (hidden / "part-00000-of-00001.tfrecord.gz").write_bytes(b"partial")
    pattern = _pattern(tmp_path)

    assert resolve_spans(pattern, None, 1) == [10]  # numeric: 10 after 9, hidden 11 ignored
    assert resolve_spans(pattern, 9, 1) == [9]
    assert resolve_spans(pattern, None, 3) == [2, 9, 10]
    assert resolve_spans(pattern, 9, 2) == [2, 9]
    with pytest.raises(BadInputError, match="no files for span 5"):
        resolve_spans(pattern, 5, 1)
    with pytest.raises(BadInputError, match="num_spans=5 but only 4"):
        resolve_spans(pattern, None, 5)
    with pytest.raises(BadInputError, match="no files match"):
        resolve_spans(str(tmp_path / "other-{SPAN}/*.tfrecord*"), None, 1)


def test_split_is_deterministic_weighted_and_independent_of_dict_order():
    ids = [f"img-{i}" for i in range(4000)]
    first = [assign_split(i, SPLITS) for i in ids]
    reordered = split_order({"test": 10, "train": 80, "eval": 10})
    assert [assign_split(i, reordered) for i in ids] == first
    fractions = {name: first.count(name) / len(ids) for name, _ in SPLITS}
    assert fractions["train"] == pytest.approx(0.8, abs=0.03)
    assert fractions["eval"] == pytest.approx(0.1, abs=0.02)
    assert fractions["test"] == pytest.approx(0.1, abs=0.02)


def test_split_is_stable_across_processes():
    """Another interpreter with another hash seed assigns the same splits (no Python hash())."""
    ids = [f"img-{i}" for i in range(200)]
    code = (
        "import json, sys; from segpipe.components.example_gen import assign_split, split_order;"
        "s = split_order({'train': 80, 'eval': 10, 'test': 10});"
        "print(json.dumps([assign_split(i, s) for i in json.loads(sys.argv[1])]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], env=env, check=True, capture_output=True, text=True)
    assert json.loads(out.stdout) == [assign_split(i, SPLITS) for i in ids]


def test_bad_split_weights_are_rejected():
    with pytest.raises(BadInputError, match="splits.eval"):
        split_order({"train": 80, "eval": -1})
    with pytest.raises(BadInputError, match="quarantine"):
        split_order({"train": 80, "quarantine": 1})
    with pytest.raises(BadInputError, match="sum to 0"):
        split_order({"train": 0})


# ------------------------------------------------------------------ Beam runs


def test_splits_hold_the_input_records_and_stay_put_when_data_is_added(tmp_path, write_tiny_span, dag_params):
    """Span 1 GZIP, span 2 uncompressed: both read; span 1's ids keep their splits."""
    data = tmp_path / "data"
    write_tiny_span(data, 1, num=16)
    first = run_example_gen(**dag_params("example_gen", input_pattern=_pattern(data), examples_uri=str(tmp_path / "ex1")))

    assert first["spans"] == [1]
    assert sum(first["counts"][s] for s in artifacts.SPLITS) == 16
    assert first["counts"]["quarantine"] == 0 and first["counts"]["skipped"] == 0
    before = {}
    for split in artifacts.SPLITS:
        ids = _ids(_read_split(tmp_path / "ex1", split))
        assert all(assign_split(i, SPLITS) == split for i in ids)
        before.update(dict.fromkeys(ids, split))
    assert sorted(before) == sorted(f"s1-{i}" for i in range(16))
    info = artifacts.read_info(tmp_path / "ex1")
    assert info.type == artifacts.EXAMPLES and info.extra["spans"] == [1]
    assert info.counts == first["counts"]

    write_tiny_span(data, 2, num=16, compress=False)
    second = run_example_gen(**dag_params("example_gen", input_pattern=_pattern(data), examples_uri=str(tmp_path / "ex2"), num_spans=2))
    assert second["spans"] == [1, 2]
    assert sum(second["counts"][s] for s in artifacts.SPLITS) == 32
    after = {i: s for s in artifacts.SPLITS for i in _ids(_read_split(tmp_path / "ex2", s))}
    assert {i: after[i] for i in before} == before


def test_invalid_examples_are_quarantined_with_reasons(tmp_path, dag_params):
    rng = np.random.default_rng(3)
    rgb = lambda h, w: rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)  # noqa: E731
    binary = lambda h, w: (rng.random((h, w)) > 0.5).astype(np.uint8)  # noqa: E731
    bad = {
        "gray": encode_example("gray", encode_png(binary(40, 40) * 200), encode_png(binary(40, 40))),
        "rgba": encode_example("rgba", encode_png(np.dstack([rgb(40, 40), binary(40, 40)])), encode_png(binary(40, 40))),
        "sizes": encode_example("sizes", encode_png(rgb(40, 40)), encode_png(binary(40, 44))),
        "values": encode_example("values", encode_png(rgb(40, 40)), encode_png(binary(40, 40) * 7)),
        "rgbmask": encode_example("rgbmask", encode_png(rgb(40, 40)), encode_png(rgb(40, 40))),
        "small": encode_example("small", encode_png(rgb(20, 40)), encode_png(binary(20, 40))),
        "broken": encode_example("broken", b"\x89PNG not really", encode_png(binary(40, 40))),
    }
    expected = {
        "gray": "image_channels", "rgba": "image_channels", "sizes": "size_mismatch", "values": "mask_values",
        "rgbmask": "mask_channels", "small": "too_small", "broken": "image_undecodable", "nomask": "missing_feature",
    }
    no_mask = _good_record("nomask")
    import tensorflow as tf

    example = tf.train.Example.FromString(no_mask)
    del example.features.feature["mask"]
    bad["nomask"] = example.SerializeToString()
    ignore = np.where(binary(40, 40) > 0, 255, 1).astype(np.uint8)  # 255 = ignore is allowed
    good = [_good_record(f"ok-{i}", seed=i) for i in range(6)]
    good.append(encode_example("ignore-ok", encode_png(rgb(40, 40)), encode_png(ignore)))
    write_span(tmp_path / "data", 1, [*good, *bad.values()])

    result = run_example_gen(**dag_params("example_gen", input_pattern=_pattern(tmp_path / "data"), examples_uri=str(tmp_path / "ex"), min_image_size=32))

    quarantined = {}
    for record in _read_split(tmp_path / "ex", artifacts.QUARANTINE):
        features = tf.train.Example.FromString(record).features.feature
        reason = features[artifacts.REASON_KEY].bytes_list.value[0].decode()
        quarantined[features["id"].bytes_list.value[0].decode()] = reason.split(":", 1)[0]
    assert quarantined == expected
    kept = {i for s in artifacts.SPLITS for i in _ids(_read_split(tmp_path / "ex", s))}
    assert kept == {f"ok-{i}" for i in range(6)} | {"ignore-ok"}
    assert result["counts"]["quarantine"] == len(expected)
    reasons = artifacts.read_info(tmp_path / "ex").extra["quarantine_reasons"]
    assert reasons == {k: list(expected.values()).count(k) for k in set(expected.values())}


def _write_bad_files(folder: Path) -> dict[str, str]:
    """One file per bad-input case beside a good one; returns {file name: what the error must say}."""
    folder.mkdir(parents=True)
    _write_raw_tfrecord(folder / "good.tfrecord", [_good_record(f"g-{i}", seed=i) for i in range(4)])
    (folder / "csv.tfrecord").write_text("id,image,mask\n1,cat.png,cat_mask.png\n")
    truncated = folder / "cut.tfrecord.gz"  # a GZIP shard cut in half, as by an interrupted copy
    _write_raw_tfrecord(truncated, [_good_record(f"t-{i}", seed=10 + i) for i in range(3)])
    compressed = gzip.compress(truncated.read_bytes())
    truncated.write_bytes(compressed[: len(compressed) // 2])
    offsets = _write_raw_tfrecord(folder / "crc.tfrecord", [_good_record(f"c-{i}", seed=20 + i) for i in range(3)])
    data = bytearray((folder / "crc.tfrecord").read_bytes())
    data[offsets[1] + 12 + 30] ^= 0xFF
    (folder / "crc.tfrecord").write_bytes(bytes(data))
    _write_raw_tfrecord(folder / "proto.tfrecord", [_good_record("n-0", seed=30), b"\xff\xfe definitely not a proto"])
    # Of two records with one id, the later one (by file path, then index) is the duplicate.
    _write_raw_tfrecord(folder / "z-dup.tfrecord", [_good_record("d-0", seed=40), _good_record("g-2", seed=41)])
    return {
        "csv.tfrecord": "record 0: not a TFRecord file",
        "cut.tfrecord.gz": "record 1: unreadable GZIP stream",
        "crc.tfrecord": "record 1: corrupted record (bad data checksum)",
        "proto.tfrecord": "record 1: not a tf.train.Example",
        "z-dup.tfrecord": f"record 1: duplicate id 'g-2' (first seen in {folder / 'good.tfrecord'} record 2)",
    }


def test_every_bad_input_case_is_named_by_file_and_record_and_nothing_is_published(tmp_path, dag_params):
    folder = span_dir(tmp_path / "data", 1)
    expected = _write_bad_files(folder)
    examples_uri = tmp_path / "out" / "examples"
    examples_uri.parent.mkdir()

    with pytest.raises(BadInputError) as raised:
        run_example_gen(**dag_params("example_gen", input_pattern=_pattern(tmp_path / "data"), examples_uri=str(examples_uri)))

    message = str(raised.value)
    assert message.startswith("5 bad record(s), nothing published")
    for name, problem in expected.items():
        assert f"{folder / name} {problem}" in message
    _assert_nothing_published(examples_uri)


def test_no_matching_files_fails_before_beam(tmp_path, dag_params):
    examples_uri = tmp_path / "examples"
    with pytest.raises(BadInputError, match="no files match"):
        run_example_gen(**dag_params("example_gen", input_pattern=_pattern(tmp_path / "data"), examples_uri=str(examples_uri)))
    assert not examples_uri.exists()


def test_truncated_uncompressed_file_names_the_record_where_it_ends(tmp_path, dag_params):
    folder = span_dir(tmp_path / "data", 1)
    folder.mkdir(parents=True)
    records = [_good_record(f"t-{i}", seed=i) for i in range(3)]
    offsets = _write_raw_tfrecord(folder / "part.tfrecord", records)
    (folder / "part.tfrecord").write_bytes((folder / "part.tfrecord").read_bytes()[: offsets[2] + 40])
    with pytest.raises(BadInputError, match=r"part.tfrecord record 2: truncated record"):
        run_example_gen(**dag_params("example_gen", input_pattern=_pattern(tmp_path / "data"), examples_uri=str(tmp_path / "examples")))


def test_skip_bad_records_counts_logs_and_keeps_the_rest(tmp_path, caplog, dag_params):
    folder = span_dir(tmp_path / "data", 1)
    folder.mkdir(parents=True)
    good = [_good_record(f"g-{i}", seed=i) for i in range(5)]
    offsets = _write_raw_tfrecord(folder / "a.tfrecord", [*good[:3], b"\xff\xfe not a proto", good[3]])
    data = bytearray((folder / "a.tfrecord").read_bytes())
    data[offsets[1] + 12 + 30] ^= 0xFF  # g-1 fails its CRC; the reader continues with record 2
    (folder / "a.tfrecord").write_bytes(bytes(data))
    _write_raw_tfrecord(folder / "b.tfrecord", [good[4], _good_record("g-0", seed=99)])  # duplicate g-0
    (folder / "c.tfrecord").write_text("not a tfrecord at all")

    with caplog.at_level("WARNING", logger="segpipe.components.example_gen"):
        result = run_example_gen(**dag_params("example_gen", input_pattern=_pattern(tmp_path / "data"), examples_uri=str(tmp_path / "ex"), skip_bad_records=True))

    kept = {i for s in artifacts.SPLITS for i in _ids(_read_split(tmp_path / "ex", s))}
    assert kept == {"g-0", "g-2", "g-3", "g-4"}
    assert result["counts"]["skipped"] == 4
    skipped = [json.loads(line) for line in (tmp_path / "ex" / "skipped_records.jsonl").read_text().splitlines()]
    assert {(Path(s["file"]).name, s["record"]) for s in skipped} == {
        ("a.tfrecord", 1), ("a.tfrecord", 3), ("b.tfrecord", 1), ("c.tfrecord", 0)
    }
    info = artifacts.read_info(tmp_path / "ex")
    assert info.counts["skipped"] == 4 and sum(info.extra["skipped_reasons"].values()) == 4
    assert "skipped 4 bad record(s)" in caplog.text and "b.tfrecord record 1" in caplog.text
