"""Trainer benchmarks, side by side in one run.

1. Input pipeline: training images/s of the trainer's tf.data (transformed GZIP TFRecords, streamed)
   vs the same model fitted on the same images held in numpy arrays (the tutorial's way), same
   steps, same process. Goal: ratio >= 0.95.
2. Peak memory (VmHWM, one subprocess each; a tiny U-Net at 128 px so data, not weights, dominates)
   of the trainer's input path training on N vs 10N images; goal <= 1.2. The numpy way (every image
   in memory) is measured beside it for contrast.
3. `--gpu`: the seed model (128 px, 64 filters, depth 4) training throughput under mixed_float16
   and the fraction of the GPU's peak FLOP rate, counting 3x the analytic forward FLOPs per step.
   Needs only Keras 3 (any backend): on a machine without TensorFlow run it with
   KERAS_BACKEND=jax or torch.
4. FLOP/s and TFX's Keras: the model of 1. trained from the same tf.data input by segpipe (Keras 3)
   and, as the stand-in for TFX's Trainer, by tf_keras 2.16 (Keras 2, what `tf.keras` is under TFX)
   with the same architecture (checked: equal parameter counts), optimizer and binary cross-entropy,
   alternating in one process. Each side's training FLOP/s (3 x forward FLOPs counted from the
   model's convolution layers x images/s) is set against the CPU's peak from /proc/cpuinfo:
   logical CPUs x `cpu MHz` x fp32 FLOPs per cycle from the widest vector flag (avx512f: 16 lanes x
   2 for the fused multiply-add x 2 FMA units = 64; avx2 + fma: 32; avx: 16; else sse: 8). Assumed:
   two full-width FMA units per core and the reported clock sustained; a core that splits 512-bit
   operations in two 256-bit halves, or SMT siblings counted as CPUs, would halve the true peak.

    python benchmarks/bench_trainer.py [--json out.json]
    python benchmarks/bench_trainer.py --quick        # tiny sizes, one repeat: checks that it runs
    python benchmarks/bench_trainer.py --gpu --json gpu.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("bench_trainer")

H100_SXM_DENSE_FP16_TFLOPS = 989.4  # NVIDIA datasheet, dense (no sparsity)


# ---------------------------------------------------------------- data


def make_data(num: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark noise with one bright square per image; the square is the foreground."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.35, (num, size, size, 3)).astype(np.float32)
    masks = np.zeros((num, size, size), np.int64)
    for i in range(num):
        side = int(rng.integers(size // 4, size // 2))
        y, x = rng.integers(0, size - side, 2)
        images[i, y : y + side, x : x + side] += 0.6
        masks[i, y : y + side, x : x + side] = 1
    return images, masks


def write_records(folder: Path, images: np.ndarray, masks: np.ndarray, shards: int = 4) -> list[str]:
    """Transformed-examples shards exactly as Transform writes them: `images` in [0, 1] stored as
    uint8 pixels with the x / 255 normalisation."""
    import tensorflow as tf

    from segpipe.components.transform import UNIT_SCALE, serialized_example

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"data-{i:05d}-of-{shards:05d}.tfrecord.gz") for i in range(shards)]
    writers = [tf.io.TFRecordWriter(p, "GZIP") for p in paths]
    for i, (image, mask) in enumerate(zip(images, masks)):
        pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
        writers[i % shards].write(serialized_example(str(i), pixels, mask, offset=[0.0] * 3, scale=[UNIT_SCALE] * 3))
    for writer in writers:
        writer.close()
    return paths


def compiled_model(size: int, base_filters: int, depth: int, batch_norm: bool, jit: bool = False):
    import keras

    from segpipe.components.core.model import build_unet, get_loss, segmentation_metrics

    keras.utils.set_random_seed(0)
    model = build_unet((size, size, 3), 1, base_filters=base_filters, depth=depth, batch_norm=batch_norm)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=get_loss("bce"), metrics=segmentation_metrics(2),
                  jit_compile=jit)
    return model


# ---------------------------------------------------------------- 1. input pipeline ratio


def timed_fit(model, data, epochs: int, **kwargs) -> float:
    model.fit(data, epochs=1, verbose=0, **kwargs)  # warm-up: tracing, first pass over the files
    start = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0, **kwargs)
    return time.perf_counter() - start


def bench_pipeline(args: argparse.Namespace, workdir: Path) -> dict:
    from segpipe.components.trainer import make_dataset

    images, masks = make_data(args.images, args.size)
    files = write_records(workdir / "pipeline", images, masks)
    masks32 = masks.astype(np.int32)
    rates: dict[str, list[float]] = {"tfdata": [], "numpy": []}
    for _ in range(args.repeats):  # alternate to share any machine-load drift
        model = compiled_model(args.size, args.base_filters, args.depth, True)
        seconds = timed_fit(model, images, args.epochs, y=masks32, batch_size=args.batch_size, shuffle=True)
        rates["numpy"].append(args.images * args.epochs / seconds)
        model = compiled_model(args.size, args.base_filters, args.depth, True)
        dataset = make_dataset(files, image_size=args.size, batch_size=args.batch_size, training=True, shuffle_buffer=256)
        rates["tfdata"].append(args.images * args.epochs / timed_fit(model, dataset, args.epochs))
    best = {k: max(v) for k, v in rates.items()}
    return {
        "images": args.images, "size": args.size, "epochs_timed": args.epochs, "batch_size": args.batch_size,
        "tfdata_images_per_s": round(best["tfdata"], 1), "numpy_images_per_s": round(best["numpy"], 1),
        "ratio": round(best["tfdata"] / best["numpy"], 3), "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }


# ---------------------------------------------------------------- 2. peak memory


def memory_child(args: argparse.Namespace) -> None:
    """Train one epoch from `--files-dir` (tfdata) or from arrays loaded whole (numpy); print max RSS."""
    model = compiled_model(args.size, args.base_filters, args.depth, True)
    files = sorted(str(p) for p in Path(args.files_dir).glob("data-*.tfrecord.gz"))
    if args.memory_child == "tfdata":
        from segpipe.components.trainer import make_dataset

        model.fit(make_dataset(files, image_size=args.size, batch_size=args.batch_size, training=True, shuffle_buffer=256), epochs=1, verbose=0)
    else:  # the tutorial's way: every image in memory first
        from segpipe.components.trainer import make_dataset

        pairs = list(make_dataset(files, image_size=args.size, batch_size=args.batch_size, training=False))
        images = np.concatenate([p[0].numpy() for p in pairs])
        masks = np.concatenate([p[1].numpy() for p in pairs])
        model.fit(images, masks, batch_size=args.batch_size, epochs=1, verbose=0)
    print(json.dumps({"max_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). ru_maxrss would carry the parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_memory_child(args: argparse.Namespace, mode: str, files_dir: Path) -> float:
    command = [sys.executable, __file__, "--memory-child", mode, "--files-dir", str(files_dir),
               "--size", str(args.memory_size), "--base-filters", "4", "--depth", "2",
               "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["max_rss_mb"])


def bench_memory(args: argparse.Namespace, workdir: Path) -> dict:
    result: dict = {"n": args.memory_n, "size": args.memory_size, "model": "base_filters 4, depth 2"}
    dirs = {}
    for factor in (1, 10):
        images, masks = make_data(args.memory_n * factor, args.memory_size, seed=factor)
        dirs[factor] = workdir / f"memory_{factor}"
        write_records(dirs[factor], images, masks)
        del images, masks
    for mode in ("tfdata", "numpy"):
        small, large = (run_memory_child(args, mode, dirs[f]) for f in (1, 10))
        result[mode] = {"peak_mb_n": round(small, 1), "peak_mb_10n": round(large, 1), "ratio": round(large / small, 3)}
    return result


# ---------------------------------------------------------------- 3. GPU throughput


def forward_flops(model) -> float:
    """2 * multiply-adds of every convolution (the U-Net's cost; pooling/activations are noise)."""
    total = 0.0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in ("Conv2D", "Conv2DTranspose"):
            continue
        kh, kw, cin, cout = layer.kernel.shape if kind == "Conv2D" else (*layer.kernel.shape[:2], layer.kernel.shape[3], layer.kernel.shape[2])
        h, w = (layer.output.shape[1:3] if kind == "Conv2D" else layer.input.shape[1:3])
        total += 2.0 * h * w * kh * kw * cin * cout
    return total


def bench_gpu(args: argparse.Namespace) -> dict:
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    results = {"backend": keras.backend.backend(), "policy": "mixed_float16", "peak_tflops": args.peak_tflops, "runs": []}
    for batch in args.gpu_batches:
        model = compiled_model(128, 64, 4, False, jit=True if keras.backend.backend() != "torch" else False)
        flops = forward_flops(model)
        images, masks = make_data(batch * args.gpu_steps, 128)
        seconds = timed_fit(model, images, args.epochs, y=masks.astype(np.int32), batch_size=batch, shuffle=False)
        rate = batch * args.gpu_steps * args.epochs / seconds
        achieved = rate * 3 * flops / 1e12
        results["forward_gflops_per_image"] = round(flops / 1e9, 2)
        results["runs"].append({"batch": batch, "images_per_s": round(rate, 1), "train_tflops": round(achieved, 1),
                                "fraction_of_peak": round(achieved / args.peak_tflops, 4)})
        log.info("batch %d: %.1f images/s, %.1f TFLOP/s", batch, rate, achieved)
    return results


# ---------------------------------------------------------------- 4. FLOP/s and tf_keras


FP32_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("avx", 16))  # with "fma" for avx2; see the docstring


def cpu_peak(cpuinfo: str | None = None) -> dict:
    """fp32 peak of the CPUs this process may use: logical CPUs x clock x FLOPs per cycle (docstring)."""
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    mhz = [float(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    per_cycle, isa = 8, "sse"
    for flag, flops in FP32_FLOPS_PER_CYCLE:
        if flag in flags and (flag != "avx2" or "fma" in flags):
            per_cycle, isa = flops, flag
            break
    cpus = len(os.sched_getaffinity(0))
    clock_ghz = max(mhz) / 1000 if mhz else float("nan")
    return {"cpus": cpus, "clock_ghz": round(clock_ghz, 3), "isa": isa, "fp32_flops_per_cycle": per_cycle,
            "peak_gflops": round(cpus * clock_ghz * per_cycle, 1)}


def tf_keras_unet(size: int, base_filters: int, depth: int) -> Any:
    """core/model.build_unet (no batch norm, one sigmoid channel) rebuilt layer for layer in tf_keras."""
    import tf_keras
    from tf_keras import layers

    def conv_block(x: Any, filters: int) -> Any:
        for _ in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        return x

    inputs = tf_keras.Input((size, size, 3))
    x, skips = inputs, []
    for level in range(depth):
        x = conv_block(x, base_filters * 2**level)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = conv_block(x, base_filters * 2**depth)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base_filters * 2**level, 2, strides=2, padding="same")(x)
        x = conv_block(layers.Concatenate()([x, skips[level]]), base_filters * 2**level)
    return tf_keras.Model(inputs, layers.Conv2D(1, 1, activation="sigmoid", dtype="float32")(x))


def bench_frameworks(args: argparse.Namespace, workdir: Path) -> dict:
    """images/s and training FLOP/s of segpipe (Keras 3) vs tf_keras on the trainer's tf.data input."""
    import tensorflow as tf
    import tf_keras

    from segpipe.components.trainer import make_dataset

    images, masks = make_data(args.images, args.size, seed=1)
    files = write_records(workdir / "frameworks", images, masks)

    def dataset() -> Any:
        return make_dataset(files, image_size=args.size, batch_size=args.batch_size, training=True, shuffle_buffer=256)

    segpipe_model = compiled_model(args.size, args.base_filters, args.depth, False)
    tf_keras.utils.set_random_seed(0)
    keras2_model = tf_keras_unet(args.size, args.base_filters, args.depth)
    if keras2_model.count_params() != segpipe_model.count_params():
        raise RuntimeError(f"tf_keras U-Net has {keras2_model.count_params()} parameters, segpipe's "
                           f"{segpipe_model.count_params()}: not the same model")
    keras2_model.compile(optimizer=tf_keras.optimizers.Adam(1e-3), loss=tf_keras.losses.BinaryCrossentropy(),
                         metrics=[tf_keras.metrics.BinaryIoU(target_class_ids=[1], name="iou")])
    # tf_keras's cross-entropy wants the mask shaped like the [B, S, S, 1] prediction.
    keras2_input = dataset().map(lambda x, y: (x, tf.cast(y[..., None], tf.float32)))
    flops = forward_flops(segpipe_model)
    rates: dict[str, list[float]] = {"segpipe": [], "tf_keras": []}
    for _ in range(args.repeats):  # alternate to share any machine-load drift
        rates["segpipe"].append(args.images * args.epochs / timed_fit(segpipe_model, dataset(), args.epochs))
        rates["tf_keras"].append(args.images * args.epochs / timed_fit(keras2_model, keras2_input, args.epochs))
    peak = cpu_peak()
    result: dict = {"images": args.images, "size": args.size, "model": f"base_filters {args.base_filters}, depth {args.depth}",
                    "forward_gflops_per_image": round(flops / 1e9, 3), "cpu": peak,
                    "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()}}
    for name, values in rates.items():
        gflops = max(values) * 3 * flops / 1e9
        result[name] = {"images_per_s": round(max(values), 1), "train_gflops": round(gflops, 1),
                        "fraction_of_peak": round(gflops / peak["peak_gflops"], 4)}
    result["ratio"] = round(result["segpipe"]["images_per_s"] / result["tf_keras"]["images_per_s"], 3)
    return result


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--images", type=int, default=256, help="images for the pipeline ratio")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--base-filters", type=int, default=16)  # the demo profile's model
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-n", type=int, default=64)
    parser.add_argument("--memory-size", type=int, default=128, help="image size of the memory runs (tiny model)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-frameworks", action="store_true", help="skip 4. (FLOP/s, tf_keras side by side)")
    parser.add_argument("--quick", action="store_true", help="32 px, 48 images, one timed epoch, one repeat: a smoke run")
    parser.add_argument("--gpu", action="store_true", help="seed-model GPU throughput instead of the CPU benchmarks")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--gpu-steps", type=int, default=24, help="steps per timed epoch")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_DENSE_FP16_TFLOPS)
    parser.add_argument("--memory-child", choices=("tfdata", "numpy"), help=argparse.SUPPRESS)
    parser.add_argument("--files-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.size, args.epochs, args.repeats, args.memory_n, args.memory_size = 48, 32, 1, 1, 8, 32
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    if args.gpu:
        results = {"gpu": bench_gpu(args)}
        rows = [f"batch {r['batch']:>3}: {r['images_per_s']:>8.1f} images/s  {r['train_tflops']:>6.1f} TFLOP/s  "
                f"{100 * r['fraction_of_peak']:.1f}% of {args.peak_tflops:.0f}" for r in results["gpu"]["runs"]]
        print(f"seed U-Net, {results['gpu']['backend']} backend, mixed_float16, "
              f"{results['gpu']['forward_gflops_per_image']} GFLOPs forward/image\n" + "\n".join(rows))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = {} if args.skip_pipeline else {"pipeline": bench_pipeline(args, Path(tmp))}
            if not args.skip_memory:
                results["memory"] = bench_memory(args, Path(tmp))
            if not args.skip_frameworks:
                results["frameworks"] = bench_frameworks(args, Path(tmp))
        print(f"{'measure':<34}{'trainer tf.data':>18}{'numpy (tutorial)':>18}{'ratio':>8}  goal")
        if "pipeline" in results:
            p = results["pipeline"]
            print(f"{'train images/s':<34}{p['tfdata_images_per_s']:>18}{p['numpy_images_per_s']:>18}{p['ratio']:>8}  >= 0.95")
        if "memory" in results:
            m = results["memory"]
            n_label, n10_label = f"N={m['n']}", f"10N={10 * m['n']}"
            print(f"{'peak RSS MB (VmHWM)':<34}{n_label:>18}{n10_label:>18}{'ratio':>8}  goal")
            for mode in ("tfdata", "numpy"):
                label = {"tfdata": "  trainer tf.data (streamed)", "numpy": "  numpy (tutorial, loaded whole)"}[mode]
                print(f"{label:<34}{m[mode]['peak_mb_n']:>18}{m[mode]['peak_mb_10n']:>18}"
                      f"{m[mode]['ratio']:>8}  {'<= 1.2' if mode == 'tfdata' else '(contrast)'}")
        if "frameworks" in results:
            f, cpu = results["frameworks"], results["frameworks"]["cpu"]
            print(f"{'same model, same tf.data input':<34}{'segpipe (Keras 3)':>18}{'tf_keras (TFX)':>18}{'ratio':>8}")
            print(f"{'  train images/s':<34}{f['segpipe']['images_per_s']:>18}{f['tf_keras']['images_per_s']:>18}{f['ratio']:>8}")
            print(f"{'  train GFLOP/s (3x forward)':<34}{f['segpipe']['train_gflops']:>18}{f['tf_keras']['train_gflops']:>18}")
            print(f"{'  fraction of CPU fp32 peak':<34}{f['segpipe']['fraction_of_peak']:>18.2%}{f['tf_keras']['fraction_of_peak']:>18.2%}"
                  f"  peak {cpu['peak_gflops']} GFLOP/s = {cpu['cpus']} CPUs x {cpu['clock_ghz']} GHz x "
                  f"{cpu['fp32_flops_per_cycle']} ({cpu['isa']}); {f['forward_gflops_per_image']} GFLOPs forward/image")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
