"""Transform on tiny data: values against PIL, masks exact, train-only statistics, serving, atomicity.

Resize reference: PIL's float ("F" mode) bilinear resize per channel, which is the same antialiased
triangle filter as `tf.image.resize(..., antialias=True)`; measured agreement is ~2e-7 of the
range, so the stored uint8 pixels must equal the rounded reference except where the reference lies
on a half level within float error (integer pixels interpolated with halves make such ties often);
there they may be one level off.
Masks must equal PIL's NEAREST resize exactly. The reference resizes TF-decoded pixels (JPEG decoders
differ by a few levels); PNG pixels are checked to decode identically in PIL.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.components.core import artifacts
from segpipe.components.core.data_format import decode_image, encode_example, encode_png, parse_example
from segpipe.components.core.errors import BadInputError

IMAGE_SIZE = 32
NUM_CLASSES = 3
HALF_LEVEL_TIE = 1e-3  # |reference * 255 - (n + 0.5)| below this: a tie that float error may round either way
BEAM_ARGS = ["--runner=FnApiRunner"]
SCHEMA_TEXT = "".join(f'feature {{ name: "{key}" type: BYTES }}\n' for key in ("image", "mask", "id"))


def read_records(folder: Path) -> list[bytes]:
    import tensorflow as tf

    files = sorted(str(p) for p in folder.glob("*.tfrecord*"))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_examples_artifact(span_folder: Path, examples_uri: Path, num_train: int) -> dict[str, dict[str, tuple]]:
    """Split a raw span into Split-train/Split-eval shards; every 4th image as JPEG, masks with a 255 border.

    Returns split -> id -> (image bytes, mask bytes) as written, for the references.
    """
    import tensorflow as tf

    written: dict[str, dict[str, tuple]] = {artifacts.TRAIN: {}, artifacts.EVAL: {}}
    for index, record in enumerate(read_records(span_folder)):
        example_id, image_bytes, mask_bytes = parse_example(record)
        if index % 4 == 1:
            image_bytes = jpeg_bytes(decode_image(image_bytes))
        mask = decode_image(mask_bytes).copy()
        mask[:2, :] = artifacts.IGNORE_LABEL
        split = artifacts.TRAIN if index < num_train else artifacts.EVAL
        written[split][example_id] = (image_bytes, encode_png(mask))
    for split, records in written.items():
        folder = artifacts.split_dir(examples_uri, split)
        folder.mkdir(parents=True)
        with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
            for example_id, (image_bytes, mask_bytes) in records.items():
                writer.write(encode_example(example_id, image_bytes, mask_bytes))
    return written


def write_schema(schema_uri: Path, text: str = SCHEMA_TEXT) -> None:
    schema_uri.mkdir(parents=True)
    (schema_uri / artifacts.SCHEMA_FILE).write_text(text)


def reference_image(image_bytes: bytes) -> np.ndarray:
    """PIL float bilinear resize per channel of the decoded pixels, / 255.

    Pixels come from TF's decoder: PNG decodes identically in PIL and TF, but JPEG decoders differ
    by their IDCT (a few levels), which is not what this reference checks.
    """
    import tensorflow as tf

    pixels = tf.io.decode_image(image_bytes, channels=3).numpy()
    if image_bytes.startswith(b"\x89PNG"):
        np.testing.assert_array_equal(pixels, decode_image(image_bytes))
    image = pixels.astype(np.float32)
    channels = [
        np.asarray(Image.fromarray(image[..., c], mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1) / 255.0


def reference_mask(mask_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(mask_bytes)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST))


def read_transformed(transformed_uri: Path, transform_graph_uri: Path, split: str) -> dict[str, dict[str, np.ndarray]]:
    """id -> the record's features by TFT's own spec, plus `pixels` (uint8, tf.io.parse_tensor),
    `model_input` (what the trainer's parse_batch makes of the record) and `record` (its bytes)."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from segpipe.components.trainer import parse_batch

    spec = tft.TFTransformOutput(str(transform_graph_uri)).transformed_feature_spec()
    files = artifacts.split_files(transformed_uri, split)
    out = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        features = tf.io.parse_single_example(record, spec)
        values = {k: v.numpy() for k, v in features.items() if k != "id"}
        values["pixels"] = tf.io.parse_tensor(features["image"], tf.uint8).numpy()
        values["model_input"] = parse_batch(record[None], IMAGE_SIZE)[0][0].numpy()
        values["record"] = record.numpy()
        out[features["id"].numpy().decode()] = values
    return out


def assert_rounded(pixels: np.ndarray, reference: np.ndarray) -> None:
    """uint8 `pixels` equal round(`reference` [0, 1] * 255), one level off only at half-level ties."""
    levels = reference.astype(np.float64) * 255.0
    off = np.abs(pixels.astype(np.float64) - np.round(levels))
    tie = np.abs(levels - np.floor(levels) - 0.5) < HALF_LEVEL_TIE
    assert off.max() <= 1 and not (off > 0)[~tie].any(), (off.max(), levels[(off > 0) & ~tie][:5])


def float_record_bytes(values: dict) -> int:
    """Size of the record Transform wrote before uint8 storage: float32 x / 255 pixels, same mask."""
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(float_list=tf.train.FloatList(value=(values["pixels"] / 255.0).ravel())),
        "mask": tf.train.Feature(int64_list=tf.train.Int64List(value=values["mask"].ravel())),
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"id"])),
    }
    return len(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


@pytest.fixture
def raw_artifacts(tmp_path, write_tiny_span):
    """An Examples artifact (12 train, 6 eval, 3 classes, JPEGs and 255 borders) and a Schema artifact."""
    span = write_tiny_span(tmp_path / "data", 0, num=18, size=(40, 48), num_classes=NUM_CLASSES, seed=3)
    written = build_examples_artifact(span, tmp_path / "examples", num_train=12)
    write_schema(tmp_path / "schema")
    return tmp_path, written


def run(root: Path, standardize: bool) -> dict:
    from segpipe.components.transform import run_transform

    return run_transform(
        str(root / "examples"),
        str(root / "schema"),
        str(root / "transformed"),
        str(root / "graph"),
        image_size=IMAGE_SIZE,
        standardize=standardize,
        beam_args=BEAM_ARGS,
    )


def test_transform_outputs_match_pil_reference(raw_artifacts, monkeypatch):
    import tensorflow as tf

    from segpipe.components import transform

    root, written = raw_artifacts
    monkeypatch.setattr(transform, "RECORDS_PER_SHARD", 5)  # rolls 12 train / 6 eval records over to new shards
    result = run(root, standardize=False)

    assert result["counts"] == {"train": 12, "eval": 6}
    assert artifacts.read_info(root / "transformed").counts == {"train": 12, "eval": 6}
    assert artifacts.read_info(root / "graph").type == artifacts.TRANSFORM_GRAPH
    assert not artifacts.split_dir(root / "transformed", artifacts.TEST).exists()
    for split, total in ((artifacts.TRAIN, 12), (artifacts.EVAL, 6)):
        per_shard = [sum(1 for _ in tf.data.TFRecordDataset(f, compression_type="GZIP"))
                     for f in artifacts.split_files(root / "transformed", split)]
        assert sum(per_shard) == total and len(per_shard) >= -(-total // 5) and max(per_shard) <= 5, per_shard
    for split in (artifacts.TRAIN, artifacts.EVAL):
        transformed = read_transformed(root / "transformed", root / "graph", split)
        assert set(transformed) == set(written[split])
        for example_id, (image_bytes, mask_bytes) in written[split].items():
            values = transformed[example_id]
            pixels, mask = values["pixels"], values["mask"]
            assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.dtype == np.uint8
            assert_rounded(pixels, reference_image(image_bytes))
            # x / 255 is stored as offset 0, scale 1 / 255, and that is what the trainer feeds the model
            np.testing.assert_array_equal(values["pixel_offset"], [0.0] * 3)
            np.testing.assert_allclose(values["pixel_scale"], [1 / 255] * 3, rtol=1e-7)
            np.testing.assert_allclose(values["model_input"], pixels / 255.0, atol=1e-7)
            # a byte per pixel value: well under half the bytes of the float32 record it replaces
            assert len(values["record"]) < 0.4 * float_record_bytes(values), (len(values["record"]), float_record_bytes(values))
            assert mask.dtype == np.int64
            np.testing.assert_array_equal(mask, reference_mask(mask_bytes))
            assert set(np.unique(mask)) <= set(range(NUM_CLASSES)) | {artifacts.IGNORE_LABEL}
            assert (mask[0] == artifacts.IGNORE_LABEL).all()


def test_standardize_uses_train_statistics_and_serves_image_only(raw_artifacts, tmp_path):
    import keras
    import tensorflow as tf
    import tensorflow_transform as tft

    from segpipe.components.core.model import build_unet
    from segpipe.components.core.serving import PROBABILITIES, export_serving_model, load_serving_model, predict_bytes

    root, written = raw_artifacts
    run(root, standardize=True)

    # The statistics are those of the stored train pixels / 255, applied unchanged to eval.
    transformed_train = read_transformed(root / "transformed", root / "graph", artifacts.TRAIN)
    train_pixels = np.stack([v["pixels"] for v in transformed_train.values()]).reshape(-1, 3) / 255.0
    mean, std = train_pixels.mean(axis=0), train_pixels.std(axis=0)
    transformed_eval = read_transformed(root / "transformed", root / "graph", artifacts.EVAL)
    for example_id, (image_bytes, _) in written[artifacts.EVAL].items():
        values = transformed_eval[example_id]
        assert_rounded(values["pixels"], reference_image(image_bytes))
        np.testing.assert_allclose(values["pixel_offset"], 255.0 * mean, rtol=1e-4)  # TFT sums in float32
        np.testing.assert_allclose(values["pixel_scale"], 1.0 / (255.0 * std), rtol=1e-4)
        np.testing.assert_allclose(values["model_input"], (values["pixels"] / 255.0 - mean) / std, atol=1e-4)
    train_in = np.stack([v["model_input"] for v in transformed_train.values()]).reshape(-1, 3)
    np.testing.assert_allclose(train_in.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train_in.std(axis=0), 1.0, atol=1e-4)

    # Serving: only raw image bytes are fed; the mask branch must not run into an empty string, and
    # the graph returns the stored form of the records.
    ids = sorted(written[artifacts.EVAL])
    image_bytes = tf.constant([written[artifacts.EVAL][i][0] for i in ids])
    layer = tft.TFTransformOutput(str(root / "graph")).transform_features_layer()
    served = layer({"image": image_bytes})
    assert set(served) == {"image", "pixel_offset", "pixel_scale"}
    assert list(served["image"].numpy()) == [tf.io.parse_single_example(transformed_eval[i]["record"], {
        "image": tf.io.FixedLenFeature([], tf.string)})["image"].numpy() for i in ids]

    # What the trainer exports: serving_default on the image bytes equals the Keras model on what the
    # trainer's parse_batch gives for the same records.
    keras.utils.set_random_seed(5)
    model = build_unet((IMAGE_SIZE, IMAGE_SIZE, 3), NUM_CLASSES, base_filters=4, depth=2)
    export_serving_model(model, str(root / "graph"), tmp_path / "exported", image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
    inputs = np.stack([transformed_eval[i]["model_input"] for i in ids])
    outputs = predict_bytes(load_serving_model(tmp_path / "exported"), list(image_bytes.numpy()))
    np.testing.assert_allclose(outputs[PROBABILITIES], np.asarray(model(inputs, training=False)), atol=1e-5)


def test_missing_mask_at_serving_becomes_ignore():
    import tensorflow as tf

    from segpipe.components.transform import decode_resize_mask

    mask = decode_resize_mask(tf.constant([b"", encode_png(np.ones((5, 7), np.uint8))]), 4).numpy()
    assert (mask[0] == artifacts.IGNORE_LABEL).all()
    assert (mask[1] == 1).all()


def test_failure_inside_beam_publishes_nothing(raw_artifacts):
    import tensorflow as tf

    root, _ = raw_artifacts
    bad = artifacts.split_dir(root / "examples", artifacts.EVAL) / "data-00001-of-00001.tfrecord.gz"
    with tf.io.TFRecordWriter(str(bad), "GZIP") as writer:
        writer.write(encode_example("broken", b"not an image", encode_png(np.zeros((8, 8), np.uint8))))

    with pytest.raises(Exception, match="(?i)image"):
        run(root, standardize=False)
    assert sorted(p.name for p in root.iterdir()) == ["data", "examples", "schema"]


def test_bad_inputs_name_the_file(raw_artifacts):
    root, _ = raw_artifacts
    (root / "schema" / artifacts.SCHEMA_FILE).write_text('feature { name: "image" type: BYTES }\n')
    with pytest.raises(BadInputError, match=r"schema\.pbtxt.*\['mask', 'id'\]"):
        run(root, standardize=False)

    (root / "schema" / artifacts.SCHEMA_FILE).write_text(SCHEMA_TEXT)
    for shard in artifacts.split_files(root / "examples", artifacts.EVAL):
        Path(shard).unlink()
    with pytest.raises(BadInputError, match="Split-eval"):
        run(root, standardize=False)
    assert not (root / "transformed").exists() and not (root / "graph").exists()


def test_examples_stream_through_the_in_process_runner(raw_artifacts, monkeypatch):
    """No raw or transformed example is ever held between Beam stages, even with many input shards.

    The in-process FnApiRunner keeps a stage's output in memory whole when the next stage is not
    fused with it (a multi-input Flatten, a GroupByKey): that would make Transform's memory grow with
    the dataset. Every buffer it fills is recorded here, and none may contain an example.
    """
    import tensorflow as tf
    from apache_beam.runners.portability.fn_api_runner import execution

    root, written = raw_artifacts
    for split, records in written.items():  # one record per shard: a list of shards must still stream
        folder = artifacts.split_dir(root / "examples", split)
        for shard in folder.iterdir():
            shard.unlink()
        for index, (example_id, (image_bytes, mask_bytes)) in enumerate(records.items()):
            with tf.io.TFRecordWriter(str(folder / f"data-{index:05d}.tfrecord.gz"), "GZIP") as writer:
                writer.write(encode_example(example_id, image_bytes, mask_bytes))
    held: list[bytes] = []
    for buffer in (execution.ListBuffer, execution.GroupingBuffer):
        def recording(self, data, _append=buffer.append):
            held.append(bytes(data))
            return _append(self, data)

        monkeypatch.setattr(buffer, "append", recording)

    result = run(root, standardize=True)  # standardize: the analysis pass reads train as well

    assert result["counts"] == {"train": 12, "eval": 6}
    assert held, "the runner filled no buffer: this test no longer observes it"
    blob = b"".join(held)
    raw = [image_bytes for records in written.values() for image_bytes, _ in records.values()]
    transformed = [r for split in written for r in read_records(artifacts.split_dir(root / "transformed", split))]
    assert len(transformed) == 18
    assert not [r for r in raw if r in blob], "raw examples were held in memory between Beam stages"
    assert not [r for r in transformed if r in blob], "transformed examples were held in memory between Beam stages"
