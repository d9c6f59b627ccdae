"""Serving latency: the exported SavedModel on PNG bytes vs the bare Keras model on decoded arrays.

Side by side in one process, for the seed model (128 px, the tutorial's 31M-parameter U-Net; goal:
latency ratio <= 1.2) and the demo model (64 px; reported), at batch 1 and 32:
- `exported/bytes`: `serving_default` of the SavedModel that components/export.py writes, fed raw
  PNG bytes of demo images (96-256 px); it decodes, resizes and normalises with the embedded TFT
  graph, then runs the U-Net. This is what TensorFlow Serving runs.
- `keras/arrays`: the same Keras model (same weights) called with `predict_on_batch` on images that
  were decoded, resized and normalised beforehand (outside the timing), the tutorial's way.
- `exported/tensor`: the SavedModel's `serve_tensor` signature on those arrays (isolates the
  transform's share).
Weights are untrained (latency does not depend on them). Each variant gets warm-up calls, then the
variants are called in turns (so load changes hit all of them alike) and the median is reported.

    python benchmarks/bench_serving.py --json serving.json
    python benchmarks/bench_serving.py --quick            # a smoke test: fewer repeats, no seed batch 32
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
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from segpipe.components.core import artifacts  # noqa: E402

log = logging.getLogger("bench_serving")
GOAL_RATIO = 1.2  # seed model, exported/bytes over keras/arrays
LARGE_BATCH = 8  # from this batch size on: fewer repeats, one warm-up, no serve_tensor variant
SCHEMA_TEXT = "".join(f'feature {{ name: "{key}" type: BYTES }}\n' for key in ("image", "mask", "id"))


def demo_pngs(num: int, seed: int = 0) -> list[tuple[bytes, bytes, str]]:
    """(image PNG, mask PNG, id) of `num` demo examples at their native sizes."""
    from segpipe.components.core.data_format import encode_png
    from segpipe.components.tools.demo_data import iter_demo_examples

    return [(encode_png(image), encode_png(mask), example_id) for example_id, image, mask in iter_demo_examples(num, seed)]


def build_transform_graph(workdir: Path, records: list[tuple[bytes, bytes, str]], image_size: int) -> Path:
    """A real Transform run (x / 255) on a small raw Examples artifact: the graph the export embeds."""
    import tensorflow as tf

    from segpipe.components.core.data_format import encode_example
    from segpipe.components.transform import run_transform

    examples = workdir / "examples"
    for split, part in ((artifacts.TRAIN, records[:-2]), (artifacts.EVAL, records[-2:])):
        folder = artifacts.split_dir(examples, split)
        folder.mkdir(parents=True)
        with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
            for image, mask, example_id in part:
                writer.write(encode_example(example_id, image, mask))
    schema = workdir / "schema"
    schema.mkdir()
    (schema / artifacts.SCHEMA_FILE).write_text(SCHEMA_TEXT)
    graph = workdir / "transform_graph"
    run_transform(str(examples), str(schema), str(workdir / "transformed"), str(graph), image_size=image_size,
                  standardize=False, beam_args=["--runner=FnApiRunner"])
    return graph


def decoded_arrays(pngs: list[bytes], image_size: int) -> Any:
    """The tutorial's input: decoded, resized (bilinear, antialias) and / 255, as numpy."""
    import numpy as np
    import tensorflow as tf

    out = []
    for data in pngs:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        out.append(tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True) / 255.0)
    return np.stack([t.numpy() for t in out]).astype(np.float32)


def input_description(records: list[tuple[bytes, bytes, str]]) -> str:
    import io

    from PIL import Image

    sizes = [Image.open(io.BytesIO(image)).size for image, _, _ in records]
    sides = [side for size in sizes for side in size]
    return f"{len(records)} demo PNGs, sides {min(sides)}-{max(sides)} px"


def median_latencies(variants: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant, called in turns after `warmup` calls each."""
    for call in variants.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_model(profile: str, args: argparse.Namespace, records: list[tuple[bytes, bytes, str]], workdir: Path) -> dict[str, Any]:
    """Export an untrained model of the profile's architecture and time the three variants."""
    import keras
    import numpy as np
    import tensorflow as tf

    from segpipe.components.core.serving import BYTES_INPUT, SERVING_BYTES, SERVING_TENSOR, TENSOR_INPUT, export_serving_model
    from segpipe.components.core.model import build_unet
    from segpipe.pipeline.config import load_config

    cfg = load_config(profile=profile)
    size, m = cfg.transform.image_size, cfg.model
    name = profile
    pngs = [image for image, _, _ in records[:32]]
    folder = workdir / name
    folder.mkdir()
    graph = build_transform_graph(folder, records, size)
    keras.utils.set_random_seed(0)
    model = build_unet((size, size, 3), 1, base_filters=m.base_filters, depth=m.depth, batch_norm=m.batch_norm,
                       dropout=m.dropout)
    export_dir = export_serving_model(model, str(graph), folder / "serving_model", image_size=size, num_classes=2)
    loaded = tf.saved_model.load(export_dir)
    serve_bytes, serve_tensor = loaded.signatures[SERVING_BYTES], loaded.signatures[SERVING_TENSOR]

    result: dict[str, Any] = {"profile": profile, "image_size": size, "parameters": int(model.count_params()),
                              "base_filters": m.base_filters, "depth": m.depth, "batches": {}}
    arrays_all = decoded_arrays(pngs, size)
    for batch in args.batches:
        idx = [i % len(pngs) for i in range(batch)]
        batch_bytes = tf.constant([pngs[i] for i in idx])
        arrays = arrays_all[idx]
        arrays_tensor = tf.constant(arrays)
        exported = serve_bytes(**{BYTES_INPUT: batch_bytes})["probabilities"].numpy()
        bare = model.predict_on_batch(arrays)
        max_diff = float(np.abs(exported - np.asarray(bare)).max())
        variants = {
            "exported_bytes": lambda: serve_bytes(**{BYTES_INPUT: batch_bytes})["probabilities"].numpy(),
            "keras_arrays": lambda: np.asarray(model.predict_on_batch(arrays)),
        }
        if batch < LARGE_BATCH:  # the transform's share; at large batches its cost is the same per image
            variants["exported_tensor"] = lambda: serve_tensor(**{TENSOR_INPUT: arrays_tensor})["probabilities"].numpy()
        large = batch >= LARGE_BATCH
        repeats = args.repeats_large if large else args.repeats
        seconds = median_latencies(variants, 1 if large else args.warmup, repeats)
        entry: dict[str, Any] = {f"{k}_ms": round(v * 1000, 3) for k, v in seconds.items()}
        entry.update(repeats=repeats, ratio=round(seconds["exported_bytes"] / seconds["keras_arrays"], 4),
                     max_abs_diff=max_diff)
        if "exported_tensor" in seconds:
            entry["ratio_tensor"] = round(seconds["exported_tensor"] / seconds["keras_arrays"], 4)
        result["batches"][str(batch)] = entry
        tensor = f"  exported/tensor {entry['exported_tensor_ms']:9.1f} ms" if "exported_tensor_ms" in entry else ""
        print(f"{name:>5} batch {batch:>3}: exported/bytes {entry['exported_bytes_ms']:9.1f} ms  "
              f"keras/arrays {entry['keras_arrays_ms']:9.1f} ms{tensor}  ratio {entry['ratio']:.3f}  "
              f"(max |diff| {max_diff:.1e})", flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--models", nargs="+", choices=("seed", "demo"), default=["seed", "demo"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per variant at batch < 8")
    parser.add_argument("--repeats-large", type=int, default=3, help="timed calls per variant at batch >= 8")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per variant at batch < 8 (1 above)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test, not a measurement: seed model at batch 1 only, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.repeats_large, args.warmup = 3, 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    records = demo_pngs(34)  # 32 distinct images for batch 32, plus 2 for the eval split
    with tempfile.TemporaryDirectory(prefix="bench_serving-") as tmp:
        models = {}
        for name in args.models:
            batches = args.batches
            if args.quick and name == "seed":  # 31M parameters: batch 32 takes a minute a call on 2 cores
                batches = [b for b in batches if b < LARGE_BATCH]
            models[name] = bench_model(name, argparse.Namespace(**{**vars(args), "batches": batches}), records,
                                       Path(tmp))
    results = {"goal_ratio": GOAL_RATIO, "models": models, "input": input_description(records[:32])}
    if "seed" in models:
        worst = max(b["ratio"] for b in models["seed"]["batches"].values())
        results["seed_worst_ratio"] = worst
        print(f"seed model worst ratio exported/bytes over keras/arrays: {worst:.3f} (goal <= {GOAL_RATIO})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
