"""The trainer's input pipeline alone: images/s per CPU core, against what a GPU would need.

Data: a real Transform run (components/transform.py, FnApiRunner) over generated images unlike the
demo: 3 classes (bright discs, dark bars, a textured background), sizes 48-240 px on each side,
every other image grayscale, some masks with a 255 border. Each run transforms them to 64 and
128 px in a temp dir.

Measured: `trainer.make_dataset` exactly as `fit_model` builds it over that output (training mode,
shuffle buffer 256, batch 16), with and without the `train.augment_*` defaults (flip, rot90, zoom
0.1); no model. One subprocess per core count, pinned to 1 core or to every core
(os.sched_setaffinity before TensorFlow starts, which sizes tf.data's and TF's thread pools),
times every variant over whole epochs after a short warm-up, alternating them `--repeats` times
and keeping the best of each. "before" is float32 storage: the same examples in the same shards as
Transform wrote them before it stored uint8 pixels (x / 255 of the unrounded resize), read by
the previous parse (kept below) with the trainer's augmentation on the floats; "after" is the
current trainer over the current Transform output (uint8 pixels; flips, turns and the mask's
nearest-neighbour zoom are one XLA-compiled selection of pixels that also normalises, then the
bilinear image zoom). "tf-gather" is the same storage with the trainer's augmentation before XLA
(TF gather kernels for the moves, tf.image.resize nearest for the mask zoom), with augmentation
only: "xla gain" is after / tf-gather. "read" is the GZIP read alone (the floor each layout pays);
the shard bytes of both layouts are reported too.

Needed rate: the seed U-Net (64 filters, depth 4) at that size keeping an H200 at 40% of its bf16
rate: 790 TFLOP/s x 0.4 / (3 x forward FLOPs per image), the forward FLOPs counted from the
model's convolution layers (benchmarks/bench_trainer.py: forward_flops).

    python benchmarks/bench_input.py            # 1,024 train images, ~6 minutes on 2 idle cores
    python benchmarks/bench_input.py --quick    # 256 images, short timings: a smoke run
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from segpipe.components.core import artifacts  # noqa: E402

log = logging.getLogger("bench_input")

H200_BF16_TFLOPS = 790.0  # dense bf16 rate assumed for an H200
GPU_UTILISATION = 0.4
SIZES = (64, 128)
BATCH_SIZE = 16
SHUFFLE_BUFFER = 256
AUGMENT = {"flip": True, "rot90": True, "zoom": 0.1}  # the train.augment_* defaults of default.yaml
SCHEMA_TEXT = "".join(f'feature {{ name: "{key}" type: BYTES }}\n' for key in ("image", "mask", "id"))
RESULTS = REPO / "benchmarks" / "results" / "input.json"


# ---------------------------------------------------------------- data


def generated_example(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (grayscale HxW or colour HxWx3 uint8) and its 3-class mask (0, 1, 2, 255)."""
    height, width = (int(v) for v in rng.integers(48, 241, 2))
    yy, xx = np.mgrid[:height, :width]
    texture = 90 + 40 * np.sin(xx / rng.uniform(3, 9)) * np.cos(yy / rng.uniform(3, 9)) + rng.normal(0, 12, (height, width))
    image, mask = texture, np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):  # class 1: bright discs
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(6, min(height, width) / 3)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image, mask = np.where(disc, 200 + rng.normal(0, 10, disc.shape), image), np.where(disc, 1, mask)
    for _ in range(int(rng.integers(1, 3))):  # class 2: dark bars
        top, left = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        bar = (slice(top, top + int(rng.integers(4, 12))), slice(left, left + int(rng.integers(width // 4, width))))
        image[bar], mask[bar] = 25 + rng.normal(0, 5, image[bar].shape), 2
    if index % 3 == 0:
        mask[:2], mask[-2:] = artifacts.IGNORE_LABEL, artifacts.IGNORE_LABEL
    image = np.clip(image, 0, 255).astype(np.uint8)
    if index % 2:  # colour: a per-image tint, so the three channels differ
        image = np.clip(image[..., None] * rng.uniform(0.6, 1.2, 3), 0, 255).astype(np.uint8)
    return image, mask


def write_examples(root: Path, num_train: int, num_eval: int) -> tuple[Path, Path]:
    """An Examples artifact (one shard per split) and a Schema artifact under `root`."""
    import tensorflow as tf

    from segpipe.components.core.data_format import encode_example, encode_png

    rng = np.random.default_rng(11)
    examples = root / "examples"
    index = 0
    for split, count in ((artifacts.TRAIN, num_train), (artifacts.EVAL, num_eval)):
        folder = artifacts.split_dir(examples, split)
        folder.mkdir(parents=True)
        with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
            for _ in range(count):
                image, mask = generated_example(rng, index)
                writer.write(encode_example(f"{split}-{index}", encode_png(image), encode_png(mask)))
                index += 1
    schema = root / "schema"
    schema.mkdir()
    (schema / artifacts.SCHEMA_FILE).write_text(SCHEMA_TEXT)
    return examples, schema


def transform(root: Path, examples: Path, schema: Path, size: int) -> tuple[Path, float]:
    """Transformed examples at `size` (x / 255), and Transform's wall time."""
    from segpipe.components.transform import run_transform

    out = root / f"transformed_{size}"
    start = time.perf_counter()
    run_transform(str(examples), str(schema), str(out), str(root / f"graph_{size}"), image_size=size,
                  standardize=False, beam_args=["--runner=FnApiRunner"])
    return out, time.perf_counter() - start


def float_copy(files: list[str], examples: Path, folder: Path) -> list[str]:
    """The records of `files` in the float32 layout, shard for shard: what Transform wrote before it
    stored uint8 pixels (decode, bilinear antialias resize, / 255, unrounded; same mask and id)."""
    import tensorflow as tf

    from segpipe.components.core.data_format import parse_example

    raw = {}
    for path in artifacts.split_files(examples, artifacts.TRAIN):
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            example_id, image, _ = parse_example(record.numpy())
            raw[example_id] = image
    folder.mkdir(parents=True)
    out = []
    for path in files:
        target = str(folder / Path(path).name)
        with tf.io.TFRecordWriter(target, "GZIP") as writer:
            for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                feature = tf.train.Example.FromString(record.numpy()).features.feature
                size = math.isqrt(len(feature["mask"].int64_list.value))
                image = tf.io.decode_image(raw[feature["id"].bytes_list.value[0].decode()], channels=3, expand_animations=False)
                image = tf.image.resize(image, [size, size], method="bilinear", antialias=True) / 255.0
                floats = {"mask": feature["mask"], "id": feature["id"],
                          "image": tf.train.Feature(float_list=tf.train.FloatList(value=image.numpy().ravel()))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=floats)).SerializeToString())
        out.append(target)
    return out


def shard_bytes(files: list[str]) -> int:
    return sum(os.path.getsize(path) for path in files)


# ---------------------------------------------------------------- the previous input pipeline


def previous_parse_batch(serialized: Any, image_size: int) -> tuple[Any, Any]:
    """The trainer's parse of float32 records: the flat float image reshaped, the mask cast."""
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([image_size * image_size * 3], tf.float32),
            "mask": tf.io.FixedLenFeature([image_size * image_size], tf.int64)}
    features = tf.io.parse_example(serialized, spec)
    images = tf.reshape(features["image"], [-1, image_size, image_size, 3])
    return images, tf.reshape(tf.cast(features["mask"], tf.int32), [-1, image_size, image_size])


def previous_augment_batch(images: Any, masks: Any, *, flip: bool, rot90: bool, zoom: float) -> tuple[Any, Any]:
    """The trainer's augmentation before XLA (no patches): flips and turns as TF gathers of the flat
    batch, the zoom by tf.image.resize (bilinear image, nearest mask)."""
    import tensorflow as tf

    from segpipe.components.trainer import dihedral_sources

    batch, size, channels = tf.shape(images)[0], int(images.shape[1]), int(images.shape[-1])
    if flip or rot90:
        no_flip = tf.zeros([batch], tf.int32)
        left_right = tf.cast(tf.random.uniform([batch]) < 0.5, tf.int32) if flip else no_flip
        up_down = tf.cast(tf.random.uniform([batch]) < 0.5, tf.int32) if flip else no_flip
        turns = tf.random.uniform([batch], 0, 4, dtype=tf.int32) if rot90 else no_flip
        sources = tf.gather(tf.constant(dihedral_sources(size)), left_right * 8 + up_down * 4 + turns)
        sources = tf.reshape(sources + tf.range(batch)[:, None] * (size * size), [-1])
        images = tf.reshape(tf.gather(tf.reshape(images, [-1, channels]), sources), [batch, size, size, channels])
        masks = tf.reshape(tf.gather(tf.reshape(masks, [-1]), sources), [batch, size, size])
    if zoom > 0:
        cut = tf.maximum(1, tf.cast(tf.round((1.0 - tf.random.uniform([], 0.0, zoom)) * size), tf.int32))
        top = tf.random.uniform([], 0, size - cut + 1, dtype=tf.int32)
        left = tf.random.uniform([], 0, size - cut + 1, dtype=tf.int32)
        images = tf.image.resize(images[:, top : top + cut, left : left + cut], [size, size], method="bilinear")
        masks = tf.image.resize(masks[:, top : top + cut, left : left + cut, None], [size, size], method="nearest")[..., 0]
    return images, masks


def previous_uint8_parse(serialized: Any, image_size: int, augment: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """The trainer's parse of uint8 records before XLA: moves on the uint8 pixels, normalisation, zoom."""
    import tensorflow as tf

    from segpipe.components.trainer import feature_spec
    from segpipe.components.transform import (PIXEL_OFFSET_KEY, PIXEL_SCALE_KEY, decode_pixels, normalize_pixels,
                                              record_scaling)

    features = tf.io.parse_example(serialized, feature_spec(image_size))
    offset, scale = record_scaling(features[PIXEL_OFFSET_KEY], features[PIXEL_SCALE_KEY])
    pixels = decode_pixels(features["image"], image_size)
    masks = tf.reshape(tf.cast(features["mask"], tf.int32), [-1, image_size, image_size])
    if augment:
        pixels, masks = previous_augment_batch(pixels, masks, **{**augment, "zoom": 0.0})
    images = normalize_pixels(pixels, offset, scale)
    if augment and augment["zoom"] > 0:
        images, masks = previous_augment_batch(images, masks, flip=False, rot90=False, zoom=augment["zoom"])
    return images, masks


def previous_make_dataset(files: list[str], parse: Callable[[Any], tuple[Any, Any]]) -> Any:
    """The trainer's training input with another parse: the same stages, parse and augment in one map."""
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    dataset = tf.data.Dataset.from_tensor_slices(list(files)).shuffle(len(files), reshuffle_each_iteration=True)
    dataset = dataset.interleave(lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
                                 cycle_length=min(len(files), 8), num_parallel_calls=autotune, deterministic=False)
    dataset = dataset.shuffle(SHUFFLE_BUFFER, reshuffle_each_iteration=True).batch(BATCH_SIZE, num_parallel_calls=autotune)
    return dataset.map(parse, num_parallel_calls=autotune, deterministic=False).prefetch(autotune)


# ---------------------------------------------------------------- one measurement per process


def build(variant: str, files: list[str], size: int, augment: bool) -> Any:
    import tensorflow as tf

    from segpipe.components import trainer

    if variant in ("read", "read_float"):
        return tf.data.Dataset.from_tensor_slices(files).interleave(
            lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"), cycle_length=min(len(files), 8),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE)
    options = AUGMENT if augment else None
    if variant == "before":
        from segpipe.components.trainer import augment_batch

        def parse(records: Any) -> tuple[Any, Any]:
            images, masks = previous_parse_batch(records, size)
            return augment_batch(images, masks, **options) if options else (images, masks)

        return previous_make_dataset(files, parse)
    if variant == "tf_gather":
        return previous_make_dataset(files, lambda records: previous_uint8_parse(records, size, options))
    return trainer.make_dataset(files, image_size=size, batch_size=BATCH_SIZE, training=True,
                                shuffle_buffer=SHUFFLE_BUFFER, augment=options)


def timed(dataset: Any, seconds: float) -> float:
    """Images/s over whole epochs for at least `seconds`, after a short warm-up (thread pools, page cache)."""
    for _ in dataset.take(8):
        pass
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in dataset:
            images += int((batch[0] if isinstance(batch, tuple) else batch).shape[0])
    return images / (time.perf_counter() - start)


def child(args: argparse.Namespace) -> None:
    """Pinned to `--cores` cores before TensorFlow loads; times every job of `--jobs` (a JSON list of
    [variant, files dir, size, augment]) `--repeats` times, alternating; prints the best of each."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.cores)
    tf.config.threading.set_inter_op_parallelism_threads(args.cores)
    jobs = json.loads(args.jobs)
    datasets = [build(variant, sorted(str(p) for p in Path(folder).glob(artifacts.SHARD_PATTERN)), size, augment)
                for variant, folder, size, augment in jobs]
    best = [0.0] * len(jobs)
    for _ in range(args.repeats):  # alternating shares any drift of the machine's load
        best = [max(rate, timed(dataset, args.seconds)) for rate, dataset in zip(best, datasets)]
    print(json.dumps({"images_per_s": best}))


def measure(args: argparse.Namespace, cores: int, jobs: list[tuple[str, str, int, bool]]) -> list[float]:
    """Best images/s of each job, in one subprocess pinned to `cores` cores."""
    command = [sys.executable, __file__, "--child", "--cores", str(cores), "--jobs", json.dumps(jobs),
               "--seconds", str(args.seconds), "--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return [float(rate) for rate in json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]]


# ---------------------------------------------------------------- needed rate


def needed_rate(size: int) -> dict[str, float]:
    """Images/s the seed U-Net at `size` needs to keep an H200 at GPU_UTILISATION of its bf16 rate."""
    import keras

    from bench_trainer import forward_flops
    from segpipe.components.core.model import build_unet

    flops = forward_flops(build_unet((size, size, 3), 1, base_filters=64, depth=4))
    keras.backend.clear_session()
    return {"forward_gflops_per_image": round(flops / 1e9, 2),
            "images_per_s": round(H200_BF16_TFLOPS * 1e12 * GPU_UTILISATION / (3 * flops), 1)}


# ---------------------------------------------------------------- CLI


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    num_train, num_eval = (256, 32) if args.quick else (1024, 64)
    examples, schema = write_examples(root, num_train, num_eval)
    all_cores = len(os.sched_getaffinity(0))
    results: dict[str, Any] = {
        "quick": args.quick, "images": {"train": num_train, "eval": num_eval}, "batch_size": BATCH_SIZE,
        "augment": AUGMENT, "cores_available": all_cores, "repeats": args.repeats, "seconds_per_timing": args.seconds,
        "load_average_before": round(os.getloadavg()[0], 2),
        "gpu": {"bf16_tflops": H200_BF16_TFLOPS, "utilisation": GPU_UTILISATION},
        "sizes": {},
    }
    jobs: list[tuple[str, str, int, bool]] = []
    for size in SIZES:
        transformed, seconds = transform(root, examples, schema, size)
        files = artifacts.split_files(transformed, artifacts.TRAIN)
        floats = float_copy(files, examples, root / f"float32_{size}")
        after, before = str(Path(files[0]).parent), str(Path(floats[0]).parent)
        jobs += [("read_float", before, size, False), ("read", after, size, False)]
        jobs += [(variant, folder, size, augment) for augment in (False, True)
                 for variant, folder in (("before", before), ("after", after))]
        jobs.append(("tf_gather", after, size, True))
        results["sizes"][str(size)] = {"transform_seconds": round(seconds, 1), "shards": len(files),
                                       "train_shard_bytes": {"before": shard_bytes(floats), "after": shard_bytes(files)},
                                       "needed": needed_rate(size), "rates": []}
    for cores in sorted({1, all_cores}):
        rates = dict(zip(jobs, measure(args, cores, jobs)))
        for size in SIZES:
            row = results["sizes"][str(size)]["rates"]
            pick = {(v, a): r for (v, _, s, a), r in rates.items() if s == size}
            row.append({"cores": cores, "augment": None, "read_before_images_per_s": round(pick[("read_float", False)], 1),
                        "read_images_per_s": round(pick[("read", False)], 1)})
            for augment in (False, True):
                before, after = pick[("before", augment)], pick[("after", augment)]
                row.append({"cores": cores, "augment": augment, "before_images_per_s": round(before, 1),
                            "after_images_per_s": round(after, 1), "speedup": round(after / before, 2)})
                if augment:
                    row[-1].update({"tf_gather_images_per_s": round(pick[("tf_gather", True)], 1),
                                    "xla_speedup": round(after / pick[("tf_gather", True)], 2)})
                log.info("%d px, %d core(s), augment %s: before %.0f, after %.0f images/s", size, cores, augment, before, after)
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    return results


def report(results: dict[str, Any]) -> str:
    lines = [f"{'size':>5} {'cores':>5} {'augment':>8} {'read/core':>15} {'before/core':>12} {'after/core':>11} "
             f"{'speedup':>8} {'tf-gather/core':>15} {'xla gain':>9} {'H200 needs':>11} {'cores needed':>13}"]
    for size, row in results["sizes"].items():
        needed = row["needed"]["images_per_s"]
        read = {r["cores"]: (r["read_before_images_per_s"], r["read_images_per_s"]) for r in row["rates"] if r["augment"] is None}
        for r in (r for r in row["rates"] if r["augment"] is not None):
            per_core = {k: r[f"{k}_images_per_s"] / r["cores"] for k in ("before", "after")}
            reads = "/".join(f"{v / r['cores']:.0f}" for v in read[r["cores"]])
            gather = f"{r['tf_gather_images_per_s'] / r['cores']:.0f}" if r["augment"] else "-"
            gain = f"{r['xla_speedup']:.2f}" if r["augment"] else "-"
            lines.append(f"{size:>5} {r['cores']:>5} {'yes' if r['augment'] else 'no':>8} {reads:>15} "
                         f"{per_core['before']:>12.0f} {per_core['after']:>11.0f} {r['speedup']:>8.2f} {gather:>15} "
                         f"{gain:>9} {needed:>11.0f} {math.ceil(needed / per_core['after']):>13}")
        stored = row["train_shard_bytes"]
        lines.append(f"      {size} px: seed U-Net {row['needed']['forward_gflops_per_image']} GFLOPs forward/image; "
                     f"{row['shards']} train shards; {stored['before'] / 2**20:.1f} MiB float32 before, "
                     f"{stored['after'] / 2**20:.1f} MiB uint8 after (GZIP)")
    lines.append(f"images/s per core (read: before/after; tf-gather: after's storage with the augmentation as TF "
                 f"gathers and resizes, xla gain = after / tf-gather); H200 needs = {H200_BF16_TFLOPS:.0f} TFLOP/s x {GPU_UTILISATION} / (3 x forward FLOPs); "
                 f"goal >= 1000/core at 128 px with augmentation; load average {results['load_average_before']} -> "
                 f"{results['load_average_after']}{' (quick: smoke figures)' if results['quick'] else ''}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 images, 1 s timings, one repeat: a smoke run")
    parser.add_argument("--json", default=str(RESULTS), help="where to write the results")
    parser.add_argument("--repeats", type=int, default=None, help="timings per figure, best kept (default 2, quick 1)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per figure (default 5, quick 1)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.seconds = args.seconds or (1.0 if args.quick else 5.0)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp))
    print(report(results))
    artifacts.write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
