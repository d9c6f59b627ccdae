"""Batch throughput: `segpipe infer` (Beam RunInference on TFRecords) vs `segpipe predict` (image files).

The same images, written once as PNG files (predict's input) and once as raw TFRecords (infer's),
go through the same exported model; each command runs end to end as a user runs it (model load,
reading, inference, resizing to each image's own size, writing), and the images per second of its
wall time are printed side by side. predict also writes an overlay per image; infer writes the
prediction examples. Every infer mask is compared with predict's for the same image.

The data set is unlike the demo data in kind: grayscale PNGs of 4 classes (thin lines, a rare
small blob) at many sizes and aspect ratios (1:4 to 4:1, 40-320 px), half of the records without
a mask. The model has the demo profile's architecture with a 4-class softmax head and untrained
weights (throughput does not depend on them), exported with a real Transform graph.

    python benchmarks/bench_infer.py --json benchmarks/results/infer.json
    python benchmarks/bench_infer.py --num 24 --repeats 1         # a smoke test
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from segpipe.components.core import artifacts  # noqa: E402

log = logging.getLogger("bench_infer")
NUM_CLASSES = 4
BEAM_ARGS = ["--runner=FnApiRunner"]  # pipeline/default.yaml's beam.pipeline_args


def make_images(num: int, seed: int = 0) -> list[tuple[str, Any, Any]]:
    """(id, grayscale image HxW, mask HxW) with thin lines of classes 1-2 and a rare blob of class 3."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        ratio = 4.0 ** rng.uniform(-1, 1)
        height = int(np.clip(rng.integers(40, 321), 40, 320))
        width = int(np.clip(height * ratio, 40, 320))
        image = rng.normal(90, 25, (height, width)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((height, width), np.uint8)
        for cls, count in ((1, 3), (2, 2)):
            for _ in range(count):
                if rng.random() < 0.5:
                    row = int(rng.integers(0, height - 2))
                    mask[row : row + 2, :] = cls
                else:
                    col = int(rng.integers(0, width - 2))
                    mask[:, col : col + 2] = cls
        if rng.random() < 0.2:
            y, x = int(rng.integers(0, height - 6)), int(rng.integers(0, width - 6))
            mask[y : y + 6, x : x + 6] = 3
        image[mask > 0] = (60 * mask[mask > 0] + 40).astype(np.uint8)
        out.append((f"scan-{i:04d}", image, mask))
    return out


def build_transform_graph(workdir: Path, records: list[tuple[str, bytes, bytes]], image_size: int) -> Path:
    """A real Transform run (x / 255) on a small raw Examples artifact: the graph the export embeds."""
    import tensorflow as tf

    from segpipe.components.core.data_format import encode_example
    from segpipe.components.transform import run_transform

    examples = workdir / "examples"
    for split, part in ((artifacts.TRAIN, records[:6]), (artifacts.EVAL, records[6:8])):
        folder = artifacts.split_dir(examples, split)
        folder.mkdir(parents=True)
        with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
            for example_id, image, mask in part:
                writer.write(encode_example(example_id, image, mask))
    schema = workdir / "schema"
    schema.mkdir()
    (schema / artifacts.SCHEMA_FILE).write_text(
        "".join(f'feature {{ name: "{key}" type: BYTES }}\n' for key in (artifacts.IMAGE_KEY, artifacts.MASK_KEY, artifacts.ID_KEY)))
    graph = workdir / "transform_graph"
    run_transform(str(examples), str(schema), str(workdir / "transformed"), str(graph), image_size=image_size,
                  standardize=False, beam_args=BEAM_ARGS)
    return graph


def export_model(workdir: Path, records: list[tuple[str, bytes, bytes]]) -> tuple[Path, dict[str, Any]]:
    """An untrained U-Net of the demo profile's shape with a 4-class head, as a Model artifact."""
    import keras

    from segpipe.components.core.model import build_unet
    from segpipe.components.core.serving import export_serving_model
    from segpipe.pipeline.config import load_config

    cfg = load_config(profile="demo")
    size, m = cfg.transform.image_size, cfg.model
    graph = build_transform_graph(workdir, records, size)
    keras.utils.set_random_seed(0)
    model = build_unet((size, size, 3), artifacts.output_channels(NUM_CLASSES), base_filters=m.base_filters,
                       depth=m.depth, batch_norm=m.batch_norm, dropout=m.dropout)
    model_dir = workdir / "model"
    export_serving_model(model, str(graph), model_dir / artifacts.SAVED_MODEL_DIR, image_size=size,
                         num_classes=NUM_CLASSES)
    return model_dir, {"image_size": size, "base_filters": m.base_filters, "depth": m.depth,
                       "parameters": int(model.count_params()), "num_classes": NUM_CLASSES}


def write_inputs(workdir: Path, images: list[tuple[str, Any, Any]]) -> tuple[Path, Path]:
    """The same PNGs as files and as TFRecords (4 GZIP shards, every second record without a mask)."""
    import tensorflow as tf
    from tensorflow.core.example import example_pb2, feature_pb2

    from segpipe.components.core.data_format import encode_example, encode_png

    files_dir, records_dir = workdir / "images", workdir / "records"
    files_dir.mkdir()
    records_dir.mkdir()
    writers = [tf.io.TFRecordWriter(str(records_dir / f"part-{i}.tfrecord.gz"), "GZIP") for i in range(4)]
    for index, (example_id, image, mask) in enumerate(images):
        data = encode_png(image)
        (files_dir / f"{example_id}.png").write_bytes(data)
        if index % 2:
            record = encode_example(example_id, data, encode_png(mask))
        else:  # images to infer on usually come without a mask
            feature = {key: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value]))
                       for key, value in ((artifacts.ID_KEY, example_id.encode()), (artifacts.IMAGE_KEY, data))}
            record = example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString()
        writers[index % len(writers)].write(record)
    for writer in writers:
        writer.close()
    return files_dir, records_dir


def time_call(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare_masks(images: list[tuple[str, Any, Any]], predict_out: Path, infer_out: Path) -> int:
    """How many infer masks differ from predict's for the same image (0 expected)."""
    import numpy as np
    from PIL import Image

    from segpipe.components.tools.infer import MASKS_DIR

    return sum(
        not np.array_equal(np.asarray(Image.open(predict_out / f"{example_id}_mask.png")),
                           np.asarray(Image.open(infer_out / MASKS_DIR / f"{example_id}.png")))
        for example_id, _, _ in images
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--num", type=int, default=240, help="images (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command, alternating (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from segpipe.components.tools.infer import infer_records, resolve_data
    from segpipe.components.tools.predict import predict_images

    images = make_images(args.num)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_infer-") as tmp:
        work = Path(tmp)
        files_dir, record_files = write_inputs(work, images)
        from segpipe.components.core.data_format import encode_png

        model_dir, model_info = export_model(work, [(i, encode_png(im), encode_png(m)) for i, im, m in images[:8]])
        times: dict[str, list[float]] = {"predict": [], "infer": []}
        for repeat in range(args.repeats):
            runs = {
                "predict": lambda: predict_images(model_dir, [files_dir], work / f"predict-{repeat}", overwrite=True),
                "infer": lambda: infer_records(model_dir, resolve_data(str(record_files)), work / f"infer-{repeat}",
                                               beam_args=BEAM_ARGS),
            }
            for name in (("predict", "infer") if repeat % 2 == 0 else ("infer", "predict")):
                times[name].append(time_call(runs[name]))
                print(f"run {repeat + 1}: {name:8} {len(images) / times[name][-1]:7.1f} images/s "
                      f"({times[name][-1]:.1f} s)", flush=True)
        differing = compare_masks(images, work / "predict-0", work / "infer-0")
    load_after = os.getloadavg()
    seconds = {name: statistics.median(values) for name, values in times.items()}
    rates = {name: len(images) / value for name, value in seconds.items()}
    print(f"{len(images)} images: predict (PNG files) {rates['predict']:.1f} images/s | "
          f"infer (TFRecords, Beam {BEAM_ARGS[0].split('=')[1]}) {rates['infer']:.1f} images/s | "
          f"infer / predict {rates['infer'] / rates['predict']:.2f}; masks differing: {differing}")
    results = {
        "images": len(images), "input": describe(images), "model": model_info, "beam_args": BEAM_ARGS,
        "cpu_count": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after], "repeats": args.repeats,
        "seconds": {k: [round(v, 2) for v in vals] for k, vals in times.items()},
        "images_per_second": {k: round(v, 2) for k, v in rates.items()},
        "ratio_infer_over_predict": round(rates["infer"] / rates["predict"], 3),
        "masks_differing": differing,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


def describe(images: list[tuple[str, Any, Any]]) -> str:
    heights = [im.shape[0] for _, im, _ in images]
    widths = [im.shape[1] for _, im, _ in images]
    return (f"{len(images)} grayscale PNGs, {NUM_CLASSES} classes (thin lines, a rare blob), heights "
            f"{min(heights)}-{max(heights)} px, widths {min(widths)}-{max(widths)} px")


if __name__ == "__main__":
    sys.exit(main())
