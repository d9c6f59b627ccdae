"""Transform throughput: TFT on the configured Beam runner vs a plain tf.data pipeline, same images.

Both sides read the same Examples artifact (GZIP TFRecords of demo PNGs, 90% train / 10% eval),
decode, resize (bilinear, antialias) to `--size`, scale by 1/255, serialize tf.train.Example
(`image` float list, `mask` int64 list, `id`) and write GZIP TFRecords. The tf.data baseline is
made strong on purpose: all per-image work, including the tf.Example encoding (`tf.io.encode_proto`),
runs in TF with `num_parallel_calls=AUTOTUNE`; a Python-built tf.Example alone costs ~70 ms here.
TFT's wall time includes everything `run_transform` does (pipeline construction, analysis, the
transform graph export, atomic publishing). Peak memory of Transform at N and 10N runs each size in
its own subprocess over copies of the same demo images under new ids (generating 10N new images
would take longer than the benchmark); the JSON holds the ratio 10N / N next to its goal (<= 1.2).

    python benchmarks/bench_transform.py --num 2000 --size 128 --json bench_transform.json
    python benchmarks/bench_transform.py --num 200 --skip-throughput --memory-num 1000 --size 128
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from segpipe.components.core import artifacts  # noqa: E402

log = logging.getLogger("bench_transform")
SCHEMA_TEXT = "".join(f'feature {{ name: "{key}" type: BYTES }}\n' for key in ("image", "mask", "id"))
EVAL_EVERY = 10  # every 10th example goes to eval, the rest to train
SHARD_SIZE = 250
MEMORY_RATIO_GOAL = 1.2  # Transform's peak RSS at 10N images over that at N: it must not grow with the data


def iter_demo_records(num: int, pool: int, seed: int = 0) -> Iterator[bytes]:
    """`num` raw examples; only `pool` distinct demo images are generated, then reused under new ids."""
    from segpipe.components.core.data_format import encode_png
    from segpipe.components.tools.demo_data import iter_demo_examples

    encoded = [(encode_png(image), encode_png(mask)) for _, image, mask in iter_demo_examples(min(num, pool), seed)]
    return reuse_records(encoded, num)


def reuse_records(encoded: list[tuple[bytes, bytes]], num: int) -> Iterator[bytes]:
    from segpipe.components.core.data_format import encode_example

    for index in range(num):
        image_png, mask_png = encoded[index % len(encoded)]
        yield encode_example(f"bench-{index:06d}", image_png, mask_png)


def read_encoded(examples_uri: Path) -> list[tuple[bytes, bytes]]:
    """(image, mask) bytes of every example in an Examples artifact's train and eval splits."""
    import tensorflow as tf

    from segpipe.components.core.data_format import parse_example

    files = [f for split in (artifacts.TRAIN, artifacts.EVAL) for f in artifacts.split_files(examples_uri, split)]
    return [parse_example(r.numpy())[1:] for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


def write_examples_artifact(examples_uri: Path, records: Iterator[bytes]) -> dict[str, int]:
    """An Examples artifact (train/eval shards) plus its Schema artifact beside it."""
    import tensorflow as tf

    counts = {artifacts.TRAIN: 0, artifacts.EVAL: 0}
    writers: dict[tuple[str, int], Any] = {}
    for index, record in enumerate(records):
        split = artifacts.EVAL if index % EVAL_EVERY == EVAL_EVERY - 1 else artifacts.TRAIN
        shard = counts[split] // SHARD_SIZE
        if (split, shard) not in writers:
            folder = artifacts.split_dir(examples_uri, split)
            folder.mkdir(parents=True, exist_ok=True)
            writers[(split, shard)] = tf.io.TFRecordWriter(str(folder / f"data-{shard:05d}.tfrecord.gz"), "GZIP")
        writers[(split, shard)].write(record)
        counts[split] += 1
    for writer in writers.values():
        writer.close()
    schema_uri = examples_uri.parent / "schema"
    schema_uri.mkdir(exist_ok=True)
    (schema_uri / artifacts.SCHEMA_FILE).write_text(SCHEMA_TEXT)
    return counts


def encode_example_tf(image: Any, mask: Any, example_id: Any) -> Any:
    """tf.train.Example as Transform writes it (image bytes of serialized uint8 pixels, pixel_offset and
    pixel_scale float lists, mask int64 list, id bytes), serialized inside the TF graph."""
    import tensorflow as tf

    def encode(message: str, fields: dict[str, Any]) -> Any:
        values = [v[tf.newaxis] for v in fields.values()]  # encode_proto wants a batch dimension
        sizes = tf.stack([tf.shape(v)[1] for v in values])[tf.newaxis]
        return tf.io.encode_proto(sizes, values, list(fields), f"tensorflow.{message}")[0]

    def feature(kind: str, values: Any) -> Any:
        list_proto = encode(f"{kind.title()}List", {"value": tf.reshape(values, [-1])})
        return encode("Feature", {f"{kind}_list": list_proto[tf.newaxis]})

    from segpipe.components.transform import PIXEL_OFFSET_KEY, PIXEL_SCALE_KEY, UNIT_SCALE

    features = {
        artifacts.IMAGE_KEY: feature("bytes", tf.io.serialize_tensor(image)),
        PIXEL_OFFSET_KEY: feature("float", tf.zeros([3], tf.float32)),
        PIXEL_SCALE_KEY: feature("float", tf.fill([3], tf.constant(UNIT_SCALE, tf.float32))),
        artifacts.MASK_KEY: feature("int64", mask),
        artifacts.ID_KEY: feature("bytes", example_id),
    }
    entries = tf.stack(
        [encode("Features.FeatureEntry", {"key": tf.constant([key]), "value": value[tf.newaxis]}) for key, value in features.items()]
    )
    return encode("Example", {"features": encode("Features", {"feature": entries})[tf.newaxis]})


def run_tf_data(examples_uri: Path, out_dir: Path, size: int) -> int:
    """Plain tf.data: read, parse, decode, resize, round to uint8, encode tf.Example, write GZIP TFRecords."""
    import tensorflow as tf

    spec = {key: tf.io.FixedLenFeature([], tf.string) for key in (artifacts.IMAGE_KEY, artifacts.MASK_KEY, artifacts.ID_KEY)}

    def transform(serialized: Any) -> Any:
        raw = tf.io.parse_single_example(serialized, spec)
        image = tf.io.decode_image(raw[artifacts.IMAGE_KEY], channels=3, expand_animations=False)
        image = tf.saturate_cast(tf.round(tf.image.resize(image, [size, size], method="bilinear", antialias=True)),
                                 tf.uint8)
        mask = tf.io.decode_image(raw[artifacts.MASK_KEY], channels=1, expand_animations=False)
        mask = tf.cast(tf.image.resize(mask, [size, size], method="nearest"), tf.int64)
        return encode_example_tf(image, mask, raw[artifacts.ID_KEY])

    count = 0
    for split in (artifacts.TRAIN, artifacts.EVAL):
        files = artifacts.split_files(examples_uri, split)
        dataset = (
            tf.data.TFRecordDataset(files, compression_type="GZIP", num_parallel_reads=tf.data.AUTOTUNE)
            .map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
            .prefetch(tf.data.AUTOTUNE)
        )
        folder = out_dir / f"Split-{split}"
        folder.mkdir(parents=True)
        with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
            for record in dataset:
                writer.write(record.numpy())
                count += 1
    return count


def check_same_output(tft_uri: Path, tfdata_uri: Path, graph_uri: Path, sample: int = 20) -> float:
    """Max |pixel difference| (uint8 levels) over `sample` train examples found in both outputs; masks
    and pixel scaling must be equal."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_transform as tft

    spec = tft.TFTransformOutput(str(graph_uri)).transformed_feature_spec()

    def records(uri: Path) -> Any:
        files = sorted(str(p) for p in artifacts.split_dir(uri, artifacts.TRAIN).glob("*.tfrecord.gz"))
        return tf.data.TFRecordDataset(files, compression_type="GZIP").map(lambda r: tf.io.parse_single_example(r, spec))

    wanted = {x["id"].numpy(): x for x in records(tft_uri).take(sample)}
    diffs = []
    for other in records(tfdata_uri):
        mine = wanted.get(other["id"].numpy())
        if mine is None:
            continue
        if not np.array_equal(mine["mask"].numpy(), other["mask"].numpy()):
            raise AssertionError(f"mask of {other['id'].numpy()!r} differs between TFT and tf.data")
        for key in ("pixel_offset", "pixel_scale"):
            if not np.array_equal(mine[key].numpy(), other[key].numpy()):
                raise AssertionError(f"{key} of {other['id'].numpy()!r} differs between TFT and tf.data")
        pixels = [tf.io.parse_tensor(x["image"], tf.uint8).numpy().astype(np.int16) for x in (mine, other)]
        diffs.append(float(np.abs(pixels[0] - pixels[1]).max()))
    if len(diffs) != len(wanted):
        raise AssertionError(f"only {len(diffs)} of {len(wanted)} sampled ids found in the tf.data output")
    return max(diffs)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (runner workers), all threads."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_tft(examples_uri: Path, out_root: Path, size: int, standardize: bool, beam_args: list[str]) -> tuple[float, dict]:
    from segpipe.components.transform import run_transform

    start = time.perf_counter()
    result = run_transform(
        str(examples_uri),
        str(examples_uri.parent / "schema"),
        str(out_root / "transformed"),
        str(out_root / "graph"),
        image_size=size,
        standardize=standardize,
        beam_args=beam_args,
    )
    return time.perf_counter() - start, result


def child_memory(args: argparse.Namespace) -> None:
    """Subprocess body: run Transform only, print its peak RSS (and that of runner workers)."""
    work = Path(args.child_workdir)
    seconds, result = time_tft(work / "examples", work / "out", args.size, False, args.beam_args)
    payload = {"num": sum(result["counts"].values()), "seconds": seconds, "peak_rss_mib": peak_rss_mib()}
    print("MEMORY_JSON " + json.dumps(payload), flush=True)


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not getrusage: Linux carries the forking parent's peak
    across exec into ru_maxrss, so a child of this (large) benchmark process would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(num: int, args: argparse.Namespace, workdir: Path) -> dict:
    """Peak RSS of a fresh process that runs only Transform over `num` examples."""
    folder = workdir / f"memory-{num}"
    write_examples_artifact(folder / "examples", reuse_records(read_encoded(workdir / "examples"), num))
    command = [
        sys.executable, __file__, "--size", str(args.size), "--child-num", str(num),
        "--child-workdir", str(folder), f"--beam-args={shlex.join(args.beam_args)}",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEMORY_JSON ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory run for {num} images failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(folder, ignore_errors=True)
    return json.loads(lines[-1].split(" ", 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000, help="demo images (train + eval)")
    parser.add_argument("--size", type=int, default=128, help="transform.image_size")
    parser.add_argument("--pool", type=int, default=2000, help="distinct demo images generated (reused beyond)")
    parser.add_argument("--beam-args", type=shlex.split, default=["--runner=FnApiRunner"],
                        help='Beam args for TFT, one string: --beam-args="--runner=FnApiRunner"')
    parser.add_argument("--multiprocessing-workers", type=int, default=0,
                        help="also time FnApiRunner multi_processing with this many workers (0 = skip)")
    parser.add_argument("--multithreading-workers", type=int, default=0,
                        help="also time FnApiRunner multi_threading with this many workers (0 = skip)")
    parser.add_argument("--memory-num", type=int, default=0, help="peak memory at this N and 10N (0 = skip)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the best wall time per variant counts")
    parser.add_argument("--skip-throughput", action="store_true", help="only the memory runs")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--workdir", help="keep the data here (default: a temp dir, removed)")
    parser.add_argument("--child-num", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.child_num:
        child_memory(args)
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_transform-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run_benchmark(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run_benchmark(args: argparse.Namespace, workdir: Path) -> int:
    examples = workdir / "examples"
    start = time.perf_counter()
    if artifacts.split_dir(examples, artifacts.TRAIN).exists():  # a kept --workdir: reuse its data
        print(f"reusing the demo examples in {examples}")
    else:
        counts = write_examples_artifact(examples, iter_demo_records(args.num, args.pool))
        print(f"wrote {sum(counts.values())} demo examples {counts} in {time.perf_counter() - start:.1f}s")

    results: dict[str, Any] = {"num_images": args.num, "image_size": args.size, "beam_args": args.beam_args}
    if not args.skip_throughput:
        results.update(measure_throughput(args, workdir, examples))
    if args.memory_num:
        memory = [measure_memory(n, args, workdir) for n in (args.memory_num, 10 * args.memory_num)]
        small, large = memory
        results["memory"] = memory
        results["memory_ratio_10n_vs_n"] = large["peak_rss_mib"] / small["peak_rss_mib"]
        results["memory_ratio_goal"] = MEMORY_RATIO_GOAL
        results["memory_mib_per_extra_image"] = (large["peak_rss_mib"] - small["peak_rss_mib"]) / (large["num"] - small["num"])
        for entry in memory:
            print(f"{'memory N=' + str(entry['num']):>22}: peak RSS {entry['peak_rss_mib']:.0f} MiB ({entry['seconds']:.1f} s)")
        print(f"{'memory 10N / N':>22}: {results['memory_ratio_10n_vs_n']:.2f} (goal <= {MEMORY_RATIO_GOAL}); "
              f"{results['memory_mib_per_extra_image'] * 1024:.1f} KiB per extra image")
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average_1_5_15_min": os.getloadavg()}  # other work on the machine skews the times
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


def measure_throughput(args: argparse.Namespace, workdir: Path, examples: Path) -> dict[str, Any]:
    """Wall and CPU seconds per variant (best of interleaved rounds), images/s and the ratios."""

    def tfdata(i: int) -> None:
        out = workdir / f"tfdata-{i}"
        shutil.rmtree(out, ignore_errors=True)
        written = run_tf_data(examples, out, args.size)
        assert written == args.num, (written, args.num)

    def tft_variant(name: str, standardize: bool, beam_args: list[str]) -> Any:
        def run(i: int) -> None:
            _, result = time_tft(examples, workdir / f"{name}-{i}", args.size, standardize, beam_args)
            assert sum(result["counts"].values()) == args.num, result

        return run

    variants = {
        "tf_data": tfdata,
        "tft": tft_variant("tft", False, args.beam_args),
        "tft_standardized": tft_variant("tft_standardized", True, args.beam_args),
    }
    if args.multiprocessing_workers:
        mp_args = [*args.beam_args, "--direct_running_mode=multi_processing",
                   f"--direct_num_workers={args.multiprocessing_workers}"]  # fmt: skip
        variants["tft_multi_processing"] = tft_variant("tft_multi_processing", False, mp_args)
    if args.multithreading_workers:
        mt_args = [*args.beam_args, "--direct_running_mode=multi_threading",
                   f"--direct_num_workers={args.multithreading_workers}"]  # fmt: skip
        variants["tft_multi_threading"] = tft_variant("tft_multi_threading", False, mt_args)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for round_index in range(args.repeats):  # interleaved rounds, so load drift hits every variant
        for name, fn in variants.items():
            wall_start, cpu_start = time.perf_counter(), cpu_seconds()
            fn(round_index)
            wall, used = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
            print(f"  round {round_index} {name}: {wall:.1f} s wall, {used:.1f} s CPU", flush=True)
            if wall < seconds.get(name, float("inf")):
                seconds[name], cpu[name] = wall, used
    max_diff = check_same_output(workdir / "tft-0" / "transformed", workdir / "tfdata-0", workdir / "tft-0" / "graph")

    rates = {name: args.num / value for name, value in seconds.items()}
    results: dict[str, Any] = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "images_per_second": rates,
        "ratio_tft_vs_tf_data": rates["tft"] / rates["tf_data"],
        "ratio_tft_vs_tf_data_by_cpu": cpu["tf_data"] / cpu["tft"],
        "ratio_tft_standardized_vs_tf_data": rates["tft_standardized"] / rates["tf_data"],
        "max_abs_diff_tft_vs_tf_data": max_diff,
    }
    for name in ("tft_multi_processing", "tft_multi_threading"):
        if name in rates:
            results[f"ratio_{name}_vs_tf_data"] = rates[name] / rates["tf_data"]
    for name, rate in rates.items():
        print(f"{name:>22}: {rate:8.1f} images/s  ({seconds[name]:.1f} s wall, {cpu[name]:.1f} s CPU for {args.num})")
    print(f"{'ratio tft / tf.data':>22}: {results['ratio_tft_vs_tf_data']:.2f} (goal >= 0.5)")
    print(f"{'standardized / tf.data':>22}: {results['ratio_tft_standardized_vs_tf_data']:.2f}")
    print(f"{'max |tft - tf.data|':>22}: {max_diff:.2e}")
    return results


if __name__ == "__main__":
    sys.exit(main())
