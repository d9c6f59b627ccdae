"""The BulkInferrer node: after a push, the newest span scored by the pushed version, in one
InferenceResult artifact equal to `segpipe infer`'s, cached, skipped without a push, in lineage."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.components import bulk_inferrer
from segpipe.components.core import artifacts
from segpipe.components.core.data_format import encode_example, encode_png, write_labels, write_span
from segpipe.components.core.errors import BadInputError
from segpipe.components.pusher import PUSH_RESULT_FILE
from segpipe.components.tools import infer
from segpipe.pipeline import metadata as md
from segpipe.pipeline.cli import main
from segpipe.pipeline.config import load_config
from segpipe.pipeline.local_runner import run_pipeline
from segpipe.pipeline.pipeline import create_pipeline

BROKEN = "broken-scan"  # its image is no image at all: quarantined by ExampleGen, skipped by the node
SIZES = [(40, 48), (36, 52), (56, 34)]  # native sizes unlike the model's 32 x 32 input


def scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark noise with one bright rectangle, and its mask."""
    image = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[y : y + height // 3, x : x + width // 3] = 220
    mask[y : y + height // 3, x : x + width // 3] = 1
    return image, mask


def write_span_with_a_broken_image(data_root: Path, span: int, num: int) -> dict[str, tuple[int, int]]:
    """`num` good examples of several sizes plus one whose image bytes are garbage; returns id -> size."""
    rng = np.random.default_rng(span)
    sizes, records = {}, []
    for i in range(num):
        height, width = SIZES[i % len(SIZES)]
        image, mask = scene(rng, height, width)
        sizes[f"s{span}-{i}"] = (height, width)
        records.append(encode_example(f"s{span}-{i}", encode_png(image), encode_png(mask)))
    records.append(encode_example(BROKEN, b"\x89PNG\r\n\x1a\nnot an image", encode_png(np.zeros((40, 40), np.uint8))))
    write_labels(data_root, {0: "background", 1: "object"})
    write_span(data_root, span, records)
    return sizes


def read_rows(result: Path) -> dict[str, dict]:
    """The prediction examples by id, with every documented feature."""
    import tensorflow as tf
    from tensorflow.core.example import example_pb2

    rows = {}
    for record in tf.data.TFRecordDataset(infer.prediction_files(result), compression_type="GZIP").as_numpy_iterator():
        feature = example_pb2.Example.FromString(record).features.feature
        assert set(feature) == {artifacts.ID_KEY, artifacts.MASK_KEY, infer.MASK_FILE_KEY, infer.CLASS_PIXELS_KEY,
                                infer.MODEL_VERSION_KEY}
        rows[feature[artifacts.ID_KEY].bytes_list.value[0].decode()] = {
            "mask": feature[artifacts.MASK_KEY].bytes_list.value[0],
            "mask_file": feature[infer.MASK_FILE_KEY].bytes_list.value[0].decode(),
            "class_pixels": list(feature[infer.CLASS_PIXELS_KEY].int64_list.value),
            "model_version": list(feature[infer.MODEL_VERSION_KEY].int64_list.value),
        }
    return rows


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, tiny_pipeline_overrides):
    """One tiny run with bulk_inference.enabled that pushes version 1."""
    root = tmp_path_factory.mktemp("bulk") / "root"
    sizes = write_span_with_a_broken_image(root / "data", 1, num=23)
    overrides = tiny_pipeline_overrides(root, **{
        "bulk_inference.enabled": True,
        "validation.max_invalid_fraction": 0.1,  # the broken image is quarantined, the run goes on
        "infra_validation.batch_sizes": [1],  # one canary request: seconds off the run
        "infra_validation.num_requests": 1,
    })
    run = run_pipeline(load_config(overrides=overrides))
    assert run.status == "pushed" and run.pushed_version == 1, run.message
    return root, overrides, run, sizes


def _step(run, node: str):
    [step] = [s for s in run.steps if s.node == node]
    return step


def test_the_node_scores_the_newest_span_like_segpipe_infer(pushed_run, tmp_path):
    root, _, run, sizes = pushed_run
    step = _step(run, "bulk_inferrer")
    assert step.state == "done"
    assert step.result["counts"] == {"images": len(sizes), "failed": 1}
    assert (step.result["inferred"], step.result["version"], step.result["span"]) == (True, 1, 1)
    assert step.result["failed_ids"] == [BROKEN]

    out = Path(step.outputs["inference_result_uri"])
    info = artifacts.read_info(out)
    assert info.type == artifacts.INFERENCE_RESULT and info.counts == {"images": len(sizes), "failed": 1}
    assert info.extra["model"] == str(root / "serving" / "1")
    [failure] = json.loads((out / infer.FAILURES_FILE).read_text())
    assert failure["id"] == BROKEN and "not a readable image" in failure["reason"]

    # Every split of ExampleGen's output, the quarantine (where the broken image went) included.
    files = info.parameters["files"]
    examples = Path(_step(run, "example_gen").outputs["examples_uri"])
    assert sorted(files) == sorted(str(p) for p in examples.glob("Split-*/data-*.tfrecord.gz"))
    assert any("Split-quarantine" in f for f in files)

    rows = read_rows(out)
    assert set(rows) == set(sizes)
    for example_id, (height, width) in sizes.items():
        row = rows[example_id]
        mask = np.asarray(Image.open(out / row["mask_file"]))
        assert mask.shape == (height, width), example_id
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["mask"]))), mask)
        assert row["class_pixels"] == np.bincount(mask.ravel(), minlength=2).tolist()
        assert row["model_version"] == [1]

    # `segpipe infer` with the same version on the same files writes the same masks and examples.
    cli = infer.infer_records(root / "serving" / "1", files, tmp_path / "cli", beam_args=["--runner=FnApiRunner"])
    assert cli["written"] == len(sizes) and [f["id"] for f in cli["failed"]] == [BROKEN]
    assert read_rows(tmp_path / "cli") == rows
    for row in rows.values():
        assert (tmp_path / "cli" / row["mask_file"]).read_bytes() == (out / row["mask_file"]).read_bytes()


def test_lineage_links_the_result_to_the_serving_version_and_the_examples(pushed_run, capsys):
    root, _, run, _ = pushed_run
    out = _step(run, "bulk_inferrer").outputs["inference_result_uri"]
    meta = md.Metadata.from_config(load_config(overrides={"root": str(root)}))
    [execution] = [e for e in meta.run_executions(run.run_id) if e["node"] == "bulk_inferrer"]
    assert execution["inputs"]["serving_version"] == str(root / "serving" / "1")
    assert execution["inputs"]["examples_uri"] == _step(run, "example_gen").outputs["examples_uri"]
    assert execution["outputs"] == {"inference_result_uri": out}

    assert main(["lineage", str(Path(out) / infer.MASKS_DIR), "--root", str(root)]) == 0
    lineage = capsys.readouterr().out
    first, *rest = lineage.splitlines()
    assert first.startswith("InferenceResult") and "<- bulk_inferrer" in first
    assert any(line.strip().startswith("ServingModel") and "<- pusher" in line for line in rest)
    assert "<- example_gen" in lineage and "<- trainer" in lineage and "spans [1]" in lineage


def as_first_seen(cfg) -> list:
    """The real DAG with its resolvers answering as before the first push (an empty serving dir):
    the same inputs as the first run, so every step may be reused."""
    return [dataclasses.replace(node, fn=lambda **_: None) if node.is_resolver else node for node in create_pipeline(cfg)]


def test_cached_on_model_and_examples_and_skipped_without_a_push(pushed_run):
    root, overrides, first, _ = pushed_run
    cfg = load_config(overrides=overrides)
    again = run_pipeline(cfg, nodes=as_first_seen(cfg))
    states = {step.node: step.state for step in again.steps}
    assert states["pusher"] == states["bulk_inferrer"] == "cached", states
    assert _step(again, "bulk_inferrer").outputs == _step(first, "bulk_inferrer").outputs
    assert _step(again, "bulk_inferrer").result == _step(first, "bulk_inferrer").result

    # A gate no model passes: nothing is pushed, so nothing is scored (recorded as canceled).
    strict = load_config(overrides={**overrides, "evaluation.pixel_accuracy_threshold": 1.0,
                                    "evaluation.min_foreground_iou": 1.0})
    rejected = run_pipeline(strict, nodes=as_first_seen(strict))
    assert rejected.status == "not_blessed"
    assert [_step(rejected, n).state for n in ("infra_validator", "pusher", "bulk_inferrer")] == ["skipped"] * 3
    meta = md.Metadata.from_config(cfg)
    [execution] = [e for e in meta.run_executions(rejected.run_id) if e["node"] == "bulk_inferrer"]
    assert execution["state"] == md.CANCELED and execution["outputs"] == {}


def test_no_push_gives_an_empty_result_and_a_vanished_version_an_error(tmp_path):
    """What a runner without conditions (kfp.local) hands the node when the model was not blessed."""
    examples = tmp_path / "examples"
    with artifacts.publish(examples, artifacts.EXAMPLES, producer="test") as (out, info):
        artifacts.split_dir(out, artifacts.TRAIN).mkdir()
        (artifacts.split_dir(out, artifacts.TRAIN) / "data-00000-of-00001.tfrecord.gz").write_bytes(b"")
        info["extra"]["spans"] = [3]
    pushed = tmp_path / "pushed"
    with artifacts.publish(pushed, artifacts.PUSHED_MODEL, producer="test") as (out, _):
        (out / PUSH_RESULT_FILE).write_text(json.dumps({"pushed": False, "version": None, "path": None,
                                                        "reasons": ["pixel_accuracy 0.5 < 0.9"]}))
    result = bulk_inferrer.infer_examples(str(pushed), str(examples), str(tmp_path / "result"), beam_args=[])
    assert result == {"inferred": False, "version": None, "span": 3, "counts": {"images": 0, "failed": 0},
                      "failed_ids": []}
    info = artifacts.read_info(tmp_path / "result")
    assert info.type == artifacts.INFERENCE_RESULT and "pixel_accuracy 0.5 < 0.9" in info.extra["skipped"]

    (pushed / PUSH_RESULT_FILE).write_text(json.dumps({"pushed": "yes"}))
    with pytest.raises(BadInputError, match="field 'pushed' must be true or false"):
        bulk_inferrer.infer_examples(str(pushed), str(examples), str(tmp_path / "again"), beam_args=[])
    gone = tmp_path / "serving" / "4"  # pruned by push.keep_last before the step ran
    (pushed / PUSH_RESULT_FILE).write_text(json.dumps({"pushed": True, "version": 4, "path": str(gone)}))
    with pytest.raises(BadInputError, match="serving version 4 that the Pusher wrote is gone"):
        bulk_inferrer.infer_examples(str(pushed), str(examples), str(tmp_path / "again"), beam_args=[])
    assert not (tmp_path / "again").exists()


def test_several_spans_read_the_newest_spans_own_files(tmp_path, write_tiny_span):
    for span in (1, 2, 10):
        write_tiny_span(tmp_path / "data", span, num=2, num_shards=2)
    pattern = str(tmp_path / "data" / "span-{SPAN}" / "*.tfrecord*")
    read = sorted(str(p) for s in (2, 10) for p in (tmp_path / "data" / f"span-{s}").iterdir())
    examples = tmp_path / "examples"
    with artifacts.publish(examples, artifacts.EXAMPLES, producer="test",
                           parameters={"input_pattern": pattern}) as (_, info):
        info["extra"].update(spans=[2, 10], files=read)
    span, files = bulk_inferrer.newest_span_files(examples)
    assert span == 10 and files == [f for f in read if "/span-10/" in f] and len(files) == 2
