"""The raw TFRecord format: write with data_format, read back with tf.data, compare pixels exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest

from segpipe.components.core import data_format
from segpipe.components.core.errors import BadInputError


def _arrays(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, size=(height, width), dtype=np.uint8)
    mask[0, :3] = 255  # ignore pixels survive the round trip
    return image, mask


@pytest.mark.parametrize("compress", [True, False])
def test_span_round_trip_through_tf_data(tmp_path, compress):
    import tensorflow as tf

    originals = {f"ex-{i}": _arrays(i, 20 + i, 31 - i) for i in range(5)}
    records = (
        data_format.encode_example(key, data_format.encode_png(img), data_format.encode_png(msk))
        for key, (img, msk) in originals.items()
    )
    folder, count = data_format.write_span(tmp_path, 3, records, num_shards=2, compress=compress)

    suffix = ".tfrecord.gz" if compress else ".tfrecord"
    files = sorted(str(p) for p in folder.iterdir())
    assert count == 5 and folder == tmp_path / "span-3"
    assert [p.rsplit("/", 1)[1] for p in files] == [f"part-0000{i}-of-00002{suffix}" for i in range(2)]

    spec = {key: tf.io.FixedLenFeature([], tf.string) for key in ("image", "mask", "id")}
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP" if compress else "")
    seen = {}
    for serialized in dataset:
        parsed = tf.io.parse_single_example(serialized, spec)
        image = tf.io.decode_png(parsed["image"], channels=3).numpy()
        mask = tf.io.decode_png(parsed["mask"], channels=1).numpy()[..., 0]
        seen[parsed["id"].numpy().decode()] = (image, mask)
        # the pure-Python parser agrees with tf.io
        key, image_bytes, mask_bytes = data_format.parse_example(serialized.numpy())
        np.testing.assert_array_equal(data_format.decode_image(image_bytes), image)
        np.testing.assert_array_equal(data_format.decode_image(mask_bytes), mask)
    assert seen.keys() == originals.keys()
    for key, (image, mask) in originals.items():
        np.testing.assert_array_equal(seen[key][0], image)
        np.testing.assert_array_equal(seen[key][1], mask)


def test_gzip_spans_hold_encoded_images_in_stored_blocks_that_any_gzip_reader_opens(tmp_path):
    """PNG bytes do not deflate, so the GZIP files store them (level 0): about as large as the
    records themselves, and still GZIP for Python's gzip module, TF and Beam."""
    import gzip

    rng = np.random.default_rng(0)
    records = [data_format.encode_example(f"ex-{i}", data_format.encode_png(rng.integers(0, 256, (64, 64, 3), np.uint8)),
                                          data_format.encode_png(rng.integers(0, 2, (64, 64), np.uint8)))
               for i in range(8)]
    folder, _ = data_format.write_span(tmp_path, 1, records)
    [shard] = folder.iterdir()
    framed = sum(len(r) + 16 for r in records)  # TFRecord framing: length, two CRCs
    assert len(gzip.decompress(shard.read_bytes())) == framed
    # Stored blocks: a few bytes of header per 64 KiB block, where deflate at level 6 would spend
    # its time matching and save next to nothing on these bytes.
    assert framed <= shard.stat().st_size <= framed * 1.01


def test_write_span_refuses_existing_span_and_leaves_no_partial_folder(tmp_path):
    data_format.write_span(tmp_path, 1, [data_format.encode_example("a", b"x", b"y")])
    with pytest.raises(BadInputError, match="span-1: span 1 already exists"):
        data_format.write_span(tmp_path, 1, [])

    def failing():
        yield data_format.encode_example("b", b"x", b"y")
        raise RuntimeError("generator failed mid-span")

    with pytest.raises(RuntimeError):
        data_format.write_span(tmp_path, 2, failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["span-1"]


def test_parse_example_names_the_missing_feature():
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    example.features.feature["image"].bytes_list.value.append(b"png")
    example.features.feature["id"].bytes_list.value.append(b"x")
    with pytest.raises(ValueError, match="missing feature 'mask'"):
        data_format.parse_example(example.SerializeToString())
    with pytest.raises(ValueError, match="not a tf.train.Example"):
        data_format.parse_example(b"\xff\xff\xff")


def test_labels_round_trip_and_malformed_file(tmp_path):
    data_format.write_labels(tmp_path, {1: "pet", 0: "background"})
    assert json.loads((tmp_path / "labels.json").read_text()) == {"0": "background", "1": "pet"}
    assert data_format.read_labels(tmp_path) == {0: "background", 1: "pet"}
    (tmp_path / "labels.json").write_text("[1, 2]")
    with pytest.raises(BadInputError, match="labels.json: expected a JSON object"):
        data_format.read_labels(tmp_path)
    with pytest.raises(BadInputError, match="labels file not found"):
        data_format.read_labels(tmp_path / "nowhere")


def test_next_span_is_numeric_and_ignores_temporary_folders(tmp_path):
    assert data_format.next_span(tmp_path / "missing") == 1
    for name in ("span-2", "span-10", ".span-11.tmp-abcd", "span-x", "span-007"):
        (tmp_path / name).mkdir()
    assert data_format.list_spans(tmp_path) == [2, 10]
    assert data_format.next_span(tmp_path) == 11
