"""Transform on tiny data: values against PIL, masks exact, train-only statistics, serving, atomicity.

Resize reference: PIL's float ("F" mode) bilinear resize per channel, which is the same antialiased
triangle filter as `tf.image.resize(..., antialias=True)`; measured agreement is ~2e-7, so outputs
must match within 1e-5 (PIL's uint8 resize would only agree within 1/255 because it rounds).
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
RESIZE_ATOL = 1e-5
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
    import tensorflow as tf
    import tensorflow_transform as tft

    spec = tft.TFTransformOutput(str(transform_graph_uri)).transformed_feature_spec()
    files = artifacts.split_files(transformed_uri, split)
    out = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        features = tf.io.parse_single_example(record, spec)
        out[features["id"].numpy().decode()] = {k: v.numpy() for k, v in features.items() if k != "id"}
    return out


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
            image, mask = transformed[example_id]["image"], transformed[example_id]["mask"]
            assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.float32
            np.testing.assert_allclose(image, reference_image(image_bytes), atol=RESIZE_ATOL)
            assert mask.dtype == np.int64
            np.testing.assert_array_equal(mask, reference_mask(mask_bytes))
            assert set(np.unique(mask)) <= set(range(NUM_CLASSES)) | {artifacts.IGNORE_LABEL}
            assert (mask[0] == artifacts.IGNORE_LABEL).all()


def test_standardize_uses_train_statistics_and_serves_image_only(raw_artifacts, tmp_path):
    import keras
    import tensorflow as tf
    import tensorflow_transform as tft

    from segpipe.components.transform import load_serving_transform

    root, written = raw_artifacts
    run(root, standardize=True)

    train_pixels = np.stack([reference_image(img) for img, _ in written[artifacts.TRAIN].values()]).reshape(-1, 3)
    mean, std = train_pixels.astype(np.float64).mean(axis=0), train_pixels.astype(np.float64).std(axis=0)
    transformed_eval = read_transformed(root / "transformed", root / "graph", artifacts.EVAL)
    for example_id, (image_bytes, _) in written[artifacts.EVAL].items():
        expected = (reference_image(image_bytes) - mean) / std  # train statistics, applied to eval
        np.testing.assert_allclose(transformed_eval[example_id]["image"], expected, atol=1e-4)
    transformed_train = read_transformed(root / "transformed", root / "graph", artifacts.TRAIN)
    train_out = np.stack([v["image"] for v in transformed_train.values()]).reshape(-1, 3)
    np.testing.assert_allclose(train_out.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train_out.std(axis=0), 1.0, atol=1e-4)

    # Serving: only raw image bytes are fed; the mask branch must not run into an empty string.
    ids = sorted(written[artifacts.EVAL])
    image_bytes = tf.constant([written[artifacts.EVAL][i][0] for i in ids])
    layer = tft.TFTransformOutput(str(root / "graph")).transform_features_layer()
    served = layer({"image": image_bytes})
    assert set(served) == {"image"}
    expected = np.stack([transformed_eval[i]["image"] for i in ids])
    np.testing.assert_allclose(served["image"].numpy(), expected, atol=1e-5)

    # What the trainer exports: a Keras 3 ExportArchive over the serving module, input `image_bytes`.
    serving = load_serving_transform(str(root / "graph"))
    archive = keras.export.ExportArchive()
    archive.track(serving)
    archive.add_endpoint(
        "serve",
        serving.transform_image,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    archive.write_out(str(tmp_path / "exported"))
    reloaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(reloaded.serve(image_bytes).numpy(), expected, atol=1e-5)


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
