"""segpipe infer: RunInference over raw TFRecords; masks at native size equal predict's; bad records named."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.components.core import artifacts
from segpipe.components.core.data_format import encode_example, encode_png
from segpipe.components.core.errors import EXIT_BAD_INPUT, EXIT_OK, BadInputError
from segpipe.components.tools import infer, predict
from segpipe.pipeline.cli import main

BEAM_ARGS = ["--runner=FnApiRunner"]


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """Dark noise with a bright rectangle: the `bright` rule model finds the rectangle."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    image[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = 230
    return image


def png(image: np.ndarray, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def unlabelled(example_id: bytes, image: bytes) -> bytes:
    """A raw example without a mask: what images to infer on usually are."""
    from tensorflow.core.example import example_pb2, feature_pb2

    feature = {key: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value]))
               for key, value in ((artifacts.ID_KEY, example_id), (artifacts.IMAGE_KEY, image))}
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString()


def write_records(path: Path, records: list[bytes]) -> Path:
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path), "GZIP" if path.suffix == ".gz" else "") as writer:
        for record in records:
            writer.write(record)
    return path


def read_predictions(result: Path) -> dict[bytes, dict]:
    import tensorflow as tf
    from tensorflow.core.example import example_pb2

    rows = {}
    for file in infer.prediction_files(result):
        for record in tf.data.TFRecordDataset(file, compression_type="GZIP").as_numpy_iterator():
            feature = example_pb2.Example.FromString(record).features.feature
            raw_id = feature[artifacts.ID_KEY].bytes_list.value[0]
            rows[raw_id] = {
                "mask": feature[artifacts.MASK_KEY].bytes_list.value[0],
                "mask_file": feature[infer.MASK_FILE_KEY].bytes_list.value[0].decode(),
                "class_pixels": list(feature[infer.CLASS_PIXELS_KEY].int64_list.value),
                "model_version": list(feature[infer.MODEL_VERSION_KEY].int64_list.value),
            }
    return rows


# Sizes and modes unlike the model's 32 x 32 RGB input: wide, tall, odd, grayscale, RGBA, palette, JPEG.
IMAGES = {
    b"wide": (scene(40, 96, 0), "RGB", "PNG"),
    b"tall": (scene(81, 30, 1), "RGB", "PNG"),
    b"gray": (scene(45, 45, 2), "L", "PNG"),
    b"alpha": (scene(33, 50, 3), "RGBA", "PNG"),
    b"palette": (scene(28, 36, 4), "P", "PNG"),
    b"photo": (scene(53, 37, 5), "RGB", "JPEG"),
}


def test_masks_at_native_size_equal_segpipe_predict(tmp_path: Path, rule_models: dict) -> None:
    """The same images as TFRecords (half of them without a mask) and as files: the same masks."""
    records = []
    files = tmp_path / "files"
    files.mkdir()
    for i, (name, (image, mode, fmt)) in enumerate(IMAGES.items()):
        data = png(image, mode, fmt)
        truth = encode_png(np.zeros(image.shape[:2], np.uint8))
        records.append(encode_example(name.decode(), data, truth) if i % 2 else unlabelled(name, data))
        (files / f"{name.decode()}.{fmt.lower()}").write_bytes(data)
    data = tmp_path / "data"
    write_records(data / "part-0.tfrecord.gz", records[:3])
    write_records(data / "part-1.tfrecord", records[3:])

    out = tmp_path / "result"
    result = infer.infer_records(rule_models["bright"], infer.resolve_data(str(data / "part-*")), out, beam_args=BEAM_ARGS)
    assert (result["written"], result["failed"], result["model_version"]) == (len(IMAGES), [], infer.NOT_A_VERSION)
    predicted = predict.predict_images(rule_models["bright"], [files], tmp_path / "predict")
    assert predicted["failed"] == []

    rows = read_predictions(out)
    assert set(rows) == set(IMAGES)
    for name, (image, _, _) in IMAGES.items():
        row = rows[name]
        mask = np.asarray(Image.open(out / row["mask_file"]))
        assert row["mask_file"] == f"{infer.MASKS_DIR}/{name.decode()}.png"
        assert mask.shape == image.shape[:2], name
        np.testing.assert_array_equal(mask, np.asarray(Image.open(tmp_path / "predict" / f"{name.decode()}_mask.png")))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["mask"]))), mask)
        assert row["class_pixels"] == np.bincount(mask.ravel(), minlength=2).tolist()
        assert row["model_version"] == [infer.NOT_A_VERSION]
    # The rectangle is found at the native size (the rule model is near perfect on it).
    wide = np.asarray(Image.open(out / rows[b"wide"]["mask_file"]))
    assert wide[20, 48] == 1 and wide[2, 2] == 0
    info = artifacts.read_info(out)
    assert (info.type, info.counts) == (artifacts.INFERENCE_RESULT, {"images": len(IMAGES), "failed": 0})
    assert json.loads((out / infer.FAILURES_FILE).read_text()) == []


def push_version(serving: Path, model: Path, version: int) -> Path:
    """A complete pushed version folder, as the pusher lays it out."""
    from segpipe.components.core.serving import SERVING_INFO_FILE

    folder = serving / str(version)
    shutil.copytree(model / artifacts.SAVED_MODEL_DIR, folder)
    (folder / SERVING_INFO_FILE).write_text(json.dumps({"version": version}))
    return folder


def test_bad_records_are_named_and_skipped_the_rest_written(tmp_path: Path, rule_models: dict, monkeypatch, capsys) -> None:
    """Through the CLI, with paths relative to the current directory and a serving dir as --model."""
    good = png(scene(30, 44, 7))
    truncated = good[: len(good) // 2]  # a PNG header PIL accepts, a body the serving graph cannot decode
    records = [
        unlabelled(b"good-1", good),
        unlabelled("scan/07 é".encode(), png(scene(24, 24, 8))),  # not a plain file name
        b"not a tf.train.Example at all",
        _only_id(b"no-image"),
        unlabelled(b"garbage", b"\x89PNG\r\n\x1a\nnot really"),
        unlabelled(b"truncated", truncated),
        unlabelled(b"twice", good),
        unlabelled(b"twice", png(scene(20, 20, 9))),
    ]
    write_records(tmp_path / "in" / "batch.tfrecord", records)
    serving = tmp_path / "serving"
    push_version(serving, rule_models["bright"], 1)
    push_version(serving, rule_models["bright"], 4)
    monkeypatch.chdir(tmp_path)
    code = main(["infer", "--model", "serving", "--data", "in/*.tfrecord", "--out", "result", "--root", "root"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert "6 of 8 record(s) skipped" in err and "the rest were written" in err
    for named in ("no-image", "garbage", "truncated", "twice", "a record of"):
        assert named in err, named
    assert "not a tf.train.Example" in err and "missing feature 'image'" in err
    assert "could not decode this image" in err and "occurs 2 times" in err

    out = tmp_path / "result"
    failures = json.loads((out / infer.FAILURES_FILE).read_text())
    assert sorted(f["id"] or "" for f in failures) == ["", "garbage", "no-image", "truncated", "twice", "twice"]
    rows = read_predictions(out)
    assert set(rows) == {b"good-1", "scan/07 é".encode()}
    odd = rows["scan/07 é".encode()]["mask_file"]
    assert odd.startswith(f"{infer.MASKS_DIR}/scan_07-") and (out / odd).is_file()
    assert sorted(p.name for p in (out / infer.MASKS_DIR).iterdir()) == sorted(
        [Path(odd).name, "good-1.png"])
    assert {row["model_version"][0] for row in rows.values()} == {4}  # a serving dir means its latest


def _only_id(example_id: bytes) -> bytes:
    from tensorflow.core.example import example_pb2, feature_pb2

    feature = {artifacts.ID_KEY: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[example_id]))}
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString()


def test_output_folder_rules(tmp_path: Path, rule_models: dict, write_tiny_span) -> None:
    span = write_tiny_span(tmp_path / "data", 1, num=3, size=(36, 28))
    files = infer.resolve_data(str(span))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="not the output of segpipe infer"):
        infer.infer_records(rule_models["bright"], files, foreign, beam_args=BEAM_ARGS)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(BadInputError, match="a data span"):
        infer.infer_records(rule_models["bright"], files, span / "out", beam_args=BEAM_ARGS)
    with pytest.raises(BadInputError, match="the serving directory"):
        infer.infer_records(rule_models["bright"], files, tmp_path / "serving" / "results", beam_args=BEAM_ARGS,
                            protected=[(tmp_path / "serving", "the serving directory")])

    out = tmp_path / "result"
    infer.infer_records(rule_models["bright"], files, out, beam_args=BEAM_ARGS)
    (out / infer.MASKS_DIR / "stale.png").write_bytes(b"from an earlier run")
    # A rerun replaces the earlier result as a whole; a model that breaks the contract changes nothing.
    with pytest.raises(BadInputError, match="not a SavedModel"):
        infer.infer_records(tmp_path / "mine", files, out, beam_args=BEAM_ARGS)
    assert (out / infer.MASKS_DIR / "stale.png").exists()
    again = infer.infer_records(rule_models["background"], files, out, beam_args=BEAM_ARGS)
    assert again["written"] == 3 and not (out / infer.MASKS_DIR / "stale.png").exists()
    assert all(row["class_pixels"][1] == 0 for row in read_predictions(out).values())
    # Its own predictions are raw-looking TFRecords: reading them back into the same folder is refused.
    with pytest.raises(BadInputError, match="holds the input file"):
        infer.infer_records(rule_models["bright"], infer.prediction_files(out), out, beam_args=BEAM_ARGS)


def test_no_records_and_no_files_are_exit_2(tmp_path: Path, rule_models: dict, monkeypatch, capsys) -> None:
    write_records(tmp_path / "empty.tfrecord", [])
    monkeypatch.chdir(tmp_path)
    model = str(rule_models["bright"])
    assert main(["infer", "--model", model, "--data", "empty.tfrecord", "--out", "out", "--root", "r"]) == EXIT_BAD_INPUT
    assert "no records to infer" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["infer", "--model", model, "--data", "nothing/*.gz", "--out", "out", "--root", "r"]) == EXIT_BAD_INPUT
    assert "matches no TFRecord files" in capsys.readouterr().err


def test_mask_file_names_are_plain_ids_or_digested_and_never_collide() -> None:
    assert infer.mask_file_name(b"scan_001.v2") == "scan_001.v2.png"
    odd = [b"a/b", b"a:b", b"a b", b"..", "é".encode(), b"\xff\xfe", b"x" * 101, b"", b"-lead",
           b"looks-0123456789ab"]
    names = [infer.mask_file_name(raw) for raw in odd]
    assert len(set(names)) == len(names)
    for name in names:
        assert infer.DIGEST_TAIL.fullmatch(name.removesuffix(".png")), name
        assert "/" not in name and not name.startswith(".") and len(name) < 120
    # A plain id can never equal a digested name: ids shaped like one are digested too.
    assert infer.mask_file_name(b"a_b-" + infer.mask_file_name(b"a/b")[4:16].encode()) not in names


def test_cli_writes_one_line_and_exit_0(tmp_path: Path, rule_models: dict, write_tiny_span, monkeypatch, capsys) -> None:
    write_tiny_span(tmp_path / "data", 2, num=2, size=(30, 30))
    monkeypatch.chdir(tmp_path)
    code = main(["infer", "--model", str(rule_models["bright"]), "--data", "data/span-2", "--out", "preds",
                 "--root", "r"])
    out = capsys.readouterr().out
    assert code == EXIT_OK and "wrote 2 mask(s)" in out and str(tmp_path / "preds") in out
    assert len(read_predictions(tmp_path / "preds")) == 2
