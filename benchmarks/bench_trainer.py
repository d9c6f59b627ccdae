"""Trainer benchmarks, side by side in one run.

1. Input pipeline: training images/s of the trainer's tf.data (transformed GZIP TFRecords, streamed)
   vs the same model fitted on the same images held in numpy arrays (the tutorial's way), same
   steps, same process, alternating; the ratio of the medians (and of the best runs). Goal: ratio
   >= 0.95. 1,024 images by default, about the demo's train split: with 256 an epoch is 16 steps
   and the per-epoch start-up of each side weighs on the ratio (it read 0.62 at 256, 0.945 at 1,024).
   On a shared host whose speed jumps between two levels (seen here: about 130 and 195 images/s
   for the same side and work) the wall-clock ratio depends on which side lands in the slow
   phase; the per-CPU-second ratio, printed beside it, counts the input pipeline's extra work.
2. Peak memory (VmHWM, one subprocess each; a tiny U-Net at 128 px so data, not weights, dominates)
   of the trainer's input path training on N vs 10N images; goal <= 1.2. The numpy way (every image
   in memory) is measured beside it for contrast.
3. `--gpu`: the seed model (128 px, 64 filters, depth 4) training throughput under mixed_float16
   and the fraction of the GPU's peak FLOP rate, counting 3x the analytic forward FLOPs per step.
   Needs only Keras 3 (any backend): on a machine without TensorFlow run it with
   KERAS_BACKEND=jax or torch.
4. FLOP/s and TFX's Keras: the default run's model on the demo (64 px U-Net, base_filters 16,
   depth 3, batch norm, batch 8) trained from the same tf.data input by segpipe (Keras 3)
   and, as the stand-in for TFX's Trainer, by tf_keras 2.16 (Keras 2, what `tf.keras` is under TFX)
   with the same architecture (checked: equal parameter counts), optimizer and binary cross-entropy,
   alternating in one process; the medians of the repeats (the best runs beside them). Each side's
   training FLOP/s (3 x forward FLOPs counted from the
   model's convolution layers x images/s) is set against the CPU's fp32 peak, measured:
   benchmarks/fma_peak.c, compiled for this CPU (`cc -O3 -march=native`), runs independent chains
   of fused multiply-adds on the widest vectors on every CPU the process may use (best of 5) and
   times a chain of dependent adds for the clock. /proc/cpuinfo alone cannot give it: in a VM
   `cpu MHz` is the base (TSC) clock, and AMD Zen 4 accepts AVX-512 but executes it on two 256-bit
   FMA units. On this machine (AMD EPYC family 25 model 17, Zen 4) cpuinfo says 2.596 GHz and
   avx512f, 2 x 2.596 x 64 = 332 GFLOP/s, while the probe measured 32 FLOPs per cycle (the same
   with 256-bit and 512-bit FMAs) at about 3.5 GHz: 226-234 GFLOP/s on 2 cores. The computed
   figure is printed beside it (logical CPUs x `cpu MHz` x FLOPs per cycle from the widest vector
   flag: avx512f 64, except 32 on AMD family 25; avx2 + fma 32; avx 16; else sse 8), and is the
   peak when no C compiler is found. As a check, TensorFlow's own fp32 matmul (3072^2, every
   core) is timed and printed as a fraction of the peak: a fraction above 1 would mean a wrong peak.
   Last, TensorFlow's profiler traces one more segpipe epoch: op time per kernel family (forward and
   backward convolutions, batch norm, Adam, ...) and the convolutions' GFLOP/s of op time.
5. Variants of the training step: the model and input the default run trains on the demo data (the
   auto plan's 64 px U-Net, base_filters 16, depth 3, batch norm, batch 8, the trainer's
   create_model, FusedAdam, schedule, loss, metrics and augmented make_dataset) under one change each:
   jit_compile, steps_per_execution 8, batch 16 / 32, Keras 3's own Adam (what the trainer ran
   before FusedAdam), Keras 3's own BatchNormalization (before core/batch_norm's fused kernel) and,
   for contrast, no batch norm, alternating
   in one process; oneDNN off and 2 intra-op / 1 inter-op threads, which TensorFlow reads from the
   environment when it loads, in child processes alternating with a child baseline. Each prints the
   median images/s, % of the CPU's peak (as in 4.), the ratio to its baseline, the same per CPU-second
   of the process (steadier on a shared machine; blind to a change of parallelism) and the first and
   last training loss of its trajectory.
6. Epoch stalls: the demo model fitted with validation every epoch, as fit_model feeds it now
   (trainer.fit_inputs: the train split repeated, one iterator for the whole fit; eval without
   tf.data autotuning) and as it did before (a new autotuned train and eval iterator every epoch),
   alternating. Per side: wall seconds per epoch, the CPU the machine left idle during each epoch
   (/proc/stat, both cores) and the epochs that stalled (more than 25% of the CPU idle: an epoch that
   only trains and validates keeps both cores busy). Before the change 4 of 9 demo epochs spent
   about 4 s with both cores idle.
7. Time to the quality target (benchmarks/time_to_quality.py's docstring): on two generated
   datasets unlike the demo, segpipe's trainer against tf_keras with segpipe's recipe copied and
   against tf_keras with the Keras tutorial's stock recipe (constant Adam, cross-entropy, BN
   momentum 0.99), same U-Net and input: the seconds and steps each side needs to reach 95% of the
   best eval IoU any side reached and of segpipe's best, and segpipe's ratio to each. About 13
   minutes on 2 cores.

    python benchmarks/bench_trainer.py [--json out.json]
    python benchmarks/bench_trainer.py --quick        # tiny sizes, one repeat: checks that it runs
    python benchmarks/bench_trainer.py --gpu --json gpu.json
    python benchmarks/bench_trainer.py --skip-memory --skip-pipeline --skip-frameworks --epochs 1 --variant-repeats 5
    python benchmarks/bench_trainer.py --only-time-to-quality --json ttq.json
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import shutil
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
    from segpipe.components.core.optimizers import FusedAdam

    keras.utils.set_random_seed(0)
    model = build_unet((size, size, 3), 1, base_filters=base_filters, depth=depth, batch_norm=batch_norm)
    model.compile(optimizer=FusedAdam(1e-3), loss=get_loss("bce"), metrics=segmentation_metrics(2),
                  jit_compile=jit)
    return model


# ---------------------------------------------------------------- 1. input pipeline ratio


def timed_fit(model, data, epochs: int, **kwargs) -> float:
    model.fit(data, epochs=1, verbose=0, **kwargs)  # warm-up: tracing, first pass over the files
    start = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0, **kwargs)
    return time.perf_counter() - start


def timed_epochs(model: Any, data: Any, epochs: int, warm_up: bool, **fit: Any) -> tuple[float, float, list[float]]:
    """(wall seconds, CPU seconds of this process, per-epoch training loss) of `epochs` epochs, after
    one untimed epoch when `warm_up` (tracing, XLA compilation, the first pass over the files).

    CPU seconds count the work, not the waiting for cores that other processes hold: on a shared
    machine their ratios are steadier than the wall clock's (but blind to a change of parallelism)."""
    losses = []
    if warm_up:
        losses += model.fit(data, epochs=1, verbose=0, **fit).history["loss"]
    start, cpu_start = time.perf_counter(), time.process_time()
    history = model.fit(data, epochs=epochs, verbose=0, **fit).history
    return time.perf_counter() - start, time.process_time() - cpu_start, losses + history["loss"]


def bench_pipeline(args: argparse.Namespace, workdir: Path) -> dict:
    from segpipe.components.trainer import make_dataset

    num = args.pipeline_images
    images, masks = make_data(num, args.size)
    files = write_records(workdir / "pipeline", images, masks)
    masks32 = masks.astype(np.int32)
    # Declared length (num_records) as the trainer's input has it; measured: no speed difference.
    dataset = make_dataset(files, image_size=args.size, batch_size=args.batch_size, training=True, shuffle_buffer=256,
                           num_records=num)
    sides = {"numpy": (compiled_model(args.size, args.base_filters, args.depth, True), images,
                       {"y": masks32, "batch_size": args.batch_size, "shuffle": True}),
             "tfdata": (compiled_model(args.size, args.base_filters, args.depth, True), dataset, {"shuffle": False})}
    rates: dict[str, list[float]] = {"tfdata": [], "numpy": []}
    cpu_rates: dict[str, list[float]] = {"tfdata": [], "numpy": []}
    for repeat in range(args.repeats):  # alternate to share any machine-load drift
        for name, (model, data, fit) in sides.items():
            seconds, cpu_seconds, _ = timed_epochs(model, data, args.epochs, warm_up=repeat == 0, **fit)
            rates[name].append(num * args.epochs / seconds)
            cpu_rates[name].append(num * args.epochs / cpu_seconds)
    best = {k: max(v) for k, v in rates.items()}
    median = {k: float(np.median(v)) for k, v in rates.items()}
    cpu = {k: float(np.median(v)) for k, v in cpu_rates.items()}
    return {
        "images": num, "size": args.size, "epochs_timed": args.epochs, "batch_size": args.batch_size,
        "tfdata_images_per_s": round(median["tfdata"], 1), "numpy_images_per_s": round(median["numpy"], 1),
        "ratio": round(median["tfdata"] / median["numpy"], 3), "best_ratio": round(best["tfdata"] / best["numpy"], 3),
        "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "images_per_cpu_s": {k: round(v, 1) for k, v in cpu.items()}, "cpu_ratio": round(cpu["tfdata"] / cpu["numpy"], 3),
        "cpu_runs": {k: [round(x, 1) for x in v] for k, v in cpu_rates.items()},
    }


# ---------------------------------------------------------------- 6. epoch stalls


STALL_IDLE_SHARE = 0.25


def cpu_jiffies() -> tuple[int, int]:
    """(idle, total) jiffies of the whole machine so far, from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user..steal


def bench_epoch_stalls(args: argparse.Namespace, workdir: Path) -> dict:
    import keras
    import tensorflow as tf

    from segpipe.components.core import artifacts
    from segpipe.components.trainer import augment_options, fit_inputs, make_dataset

    num, eval_num = args.pipeline_images, max(8, args.pipeline_images // 10)
    images, masks = make_data(num + eval_num, args.size, seed=1)
    files = {artifacts.TRAIN: write_records(workdir / "stalls" / "train", images[:num], masks[:num]),
             artifacts.EVAL: write_records(workdir / "stalls" / "eval", images[num:], masks[num:], shards=1)}
    _, train_config = default_run_configs(True)
    batch = int(train_config["batch_size"])
    autotuned = tf.data.Options()
    autotuned.autotune.enabled = True  # undoes make_dataset's eval setting: the input as it was

    def per_epoch_iterators() -> tuple[Any, Any, dict]:
        train = make_dataset(files[artifacts.TRAIN], image_size=args.size, batch_size=batch, training=True,
                             shuffle_buffer=int(train_config["shuffle_buffer"]), augment=augment_options(train_config),
                             seed=int(train_config["seed"]), num_records=num)
        evaluation = make_dataset(files[artifacts.EVAL], image_size=args.size, batch_size=batch, training=False)
        return train, evaluation.with_options(autotuned), {}

    def one_iterator() -> tuple[Any, Any, dict]:
        train, evaluation, steps = fit_inputs(files, image_size=args.size, batch_size=batch, train_config=train_config,
                                              num_records=num)
        return train, evaluation, {"steps_per_epoch": steps}

    class EpochClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[dict[str, float]] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start, self.jiffies = time.perf_counter(), cpu_jiffies()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            (idle0, total0), (idle1, total1) = self.jiffies, cpu_jiffies()
            self.epochs.append({"seconds": time.perf_counter() - self.start,
                                "idle_share": (idle1 - idle0) / max(1, total1 - total0)})

    sides = {"one_iterator": one_iterator, "per_epoch_iterators": per_epoch_iterators}
    models = {name: compiled_model(args.size, args.base_filters, args.depth, True) for name in sides}
    epochs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for repeat in range(args.repeats):  # alternate to share any machine-load drift
        for name, inputs in sides.items():
            train, evaluation, fit = inputs()
            clock = EpochClock()
            models[name].fit(train, validation_data=evaluation, epochs=args.stall_epochs + (repeat == 0), verbose=0,
                             shuffle=False, callbacks=[clock], **fit)
            epochs[name] += clock.epochs[1:] if repeat == 0 else clock.epochs  # not the tracing epoch
    result: dict = {"images": num, "eval_images": eval_num, "size": args.size, "batch_size": batch,
                    "stall_idle_share": STALL_IDLE_SHARE}
    for name, rows in epochs.items():
        seconds = [r["seconds"] for r in rows]
        result[name] = {"epochs": len(rows), "seconds_per_epoch": round(float(np.median(seconds)), 2),
                        "total_seconds": round(sum(seconds), 1),
                        "stalled_epochs": sum(r["idle_share"] > STALL_IDLE_SHARE for r in rows),
                        "idle_share": round(float(np.mean([r["idle_share"] for r in rows])), 3),
                        "runs": [[round(r["seconds"], 2), round(r["idle_share"], 3)] for r in rows]}
    result["ratio"] = round(result["one_iterator"]["total_seconds"] / result["per_epoch_iterators"]["total_seconds"], 3)
    return result


def print_epoch_stalls(st: dict) -> None:
    a, b = st["one_iterator"], st["per_epoch_iterators"]
    print(f"epoch stalls ({st['images']} train / {st['eval_images']} eval images, {st['size']} px, batch "
          f"{st['batch_size']}, validation every epoch)")
    print(f"{'':<34}{'one iterator':>18}{'per epoch':>18}{'ratio':>8}")
    print(f"{'  seconds of the timed epochs':<34}{a['total_seconds']:>18}{b['total_seconds']:>18}{st['ratio']:>8}")
    print(f"{'  median seconds per epoch':<34}{a['seconds_per_epoch']:>18}{b['seconds_per_epoch']:>18}")
    print(f"{'  CPU left idle (mean share)':<34}{a['idle_share']:>18.1%}{b['idle_share']:>18.1%}")
    print(f"{'  stalled epochs (> 25% idle)':<34}{str(a['stalled_epochs']) + ' of ' + str(a['epochs']):>18}"
          f"{str(b['stalled_epochs']) + ' of ' + str(b['epochs']):>18}")


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
FMA_PEAK_SOURCE = Path(__file__).resolve().parent / "fma_peak.c"
PEAK_RUNS = 5  # the peak is the best of these (the host's speed jumps between two levels)
MATMUL_SIZE = 3072  # square fp32 matmul for TensorFlow's own ceiling on this CPU


def cpuinfo_field(text: str, name: str) -> str:
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.split(":", 1)[0].strip() == name), "")


def fp32_flops_per_cycle(text: str) -> tuple[int, str]:
    """(fp32 FLOPs per cycle and core, why) from the ISA flags of /proc/cpuinfo `text`.

    AMD family 25 with avx512f is Zen 4, which executes 512-bit instructions on its 256-bit FMA
    units (two per core), so it peaks at the AVX2 rate; Zen 3, the same family, has no AVX-512."""
    flags = set(cpuinfo_field(text, "flags").split())
    zen4 = cpuinfo_field(text, "vendor_id") == "AuthenticAMD" and cpuinfo_field(text, "cpu family") == "25"
    for flag, flops in FP32_FLOPS_PER_CYCLE:
        if flag in flags and (flag != "avx2" or "fma" in flags):
            if flag == "avx512f" and zen4:
                return 32, "avx512f on AMD Zen 4 (family 25): 512-bit operations on two 256-bit FMA units"
            return flops, flag
    return 8, "sse"


def c_compiler() -> str | None:
    """The C compiler fma_peak.c is built with, if the machine has one."""
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.lru_cache(maxsize=None)
def measured_fma_peak(threads: int) -> dict | None:
    """benchmarks/fma_peak.c compiled for this CPU and run on `threads` threads: the best of
    PEAK_RUNS runs' fp32 GFLOP/s and the clock it measured; None (with the reason logged) when no C
    compiler is found or the probe fails."""
    compiler = c_compiler()
    if compiler is None:
        log.warning("no C compiler: the CPU's peak is computed from /proc/cpuinfo only")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "fma_peak"
        built = subprocess.run([compiler, "-O3", "-march=native", "-pthread", str(FMA_PEAK_SOURCE), "-o", str(probe)],
                               capture_output=True, text=True, check=False)
        if built.returncode:
            log.warning("fma_peak.c did not compile (%s): peak computed only", built.stderr.strip()[-300:])
            return None
        runs = []
        for _ in range(PEAK_RUNS):
            done = subprocess.run([str(probe), str(threads)], capture_output=True, text=True, check=False)
            if done.returncode:
                log.warning("fma_peak exited %d: peak computed only", done.returncode)
                return None
            runs.append(json.loads(done.stdout))
    best = max(runs, key=lambda r: r["gflops"])
    return {"gflops": best["gflops"], "clock_ghz": best["clock_ghz"], "vector_bits": best["vector_bits"],
            "threads": threads, "runs_gflops": [r["gflops"] for r in runs], "compiler": Path(compiler).name}


def cpu_peak(cpuinfo: str | None = None, measure: bool = True) -> dict:
    """fp32 peak of the CPUs this process may use (docstring, section 4): measured by fma_peak.c when
    `measure` and a C compiler allow it, else computed as CPUs x clock x FLOPs per cycle."""
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    mhz = [float(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    per_cycle, isa = fp32_flops_per_cycle(text)
    cpus = len(os.sched_getaffinity(0))
    clock_ghz = max(mhz) / 1000 if mhz else float("nan")
    computed = round(cpus * clock_ghz * per_cycle, 1)
    result = {"cpus": cpus, "clock_ghz": round(clock_ghz, 3), "isa": isa, "fp32_flops_per_cycle": per_cycle,
              "computed_peak_gflops": computed, "measured": measured_fma_peak(cpus) if measure else None}
    if result["measured"]:
        m = result["measured"]
        result["computed_at_measured_clock_gflops"] = round(cpus * m["clock_ghz"] * per_cycle, 1)
        result["peak_gflops"], result["peak_source"] = m["gflops"], "measured (fma_peak.c)"
    else:
        result["peak_gflops"], result["peak_source"] = computed, "computed from /proc/cpuinfo"
    return result


def tf_matmul_gflops(size: int = MATMUL_SIZE, runs: int = 5) -> float:
    """The best GFLOP/s of TensorFlow's fp32 matmul of two size x size matrices on every core: what
    the stack's best-tuned kernel reaches on this CPU, a check on the peak (it cannot exceed it)."""
    import tensorflow as tf

    a, b = tf.random.normal([size, size], seed=1), tf.random.normal([size, size], seed=2)
    matmul = tf.function(tf.linalg.matmul)
    matmul(a, b).numpy()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(3):
            out = matmul(a, b)
        out.numpy()
        best = min(best, (time.perf_counter() - start) / 3)
    return round(2.0 * size**3 / best / 1e9, 1)


# Kernel families of a U-Net training step on CPU (oneDNN names, "_MklNative" dropped); the rest is "other".
OP_FAMILIES = {"Conv2DBackpropFilter": "conv backward (filter)", "Conv2DBackpropInput": "conv backward (input)",
               "Conv2D": "conv forward", "FusedConv2D": "conv forward", "FusedBatchNormGradV3": "batch norm",
               "FusedBatchNormEx": "batch norm", "FusedBatchNormV3": "batch norm", "ResourceApplyAdam": "Adam",
               "ReluGrad": "relu", "Relu": "relu"}


def op_time_shares(model: Any, data: Any, images: int) -> dict:
    """Where one epoch's op time goes: TensorFlow's profiler over `model.fit(data)` (after the timed
    runs: nothing left to trace; `images` per epoch), op durations summed per kernel family and as
    shares of all ops.
    Convolution families also get GFLOP/s of op time (each is about one forward pass's FLOPs)."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TF's own trace format

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        model.fit(data, epochs=1, verbose=0)
        wall = time.perf_counter() - start
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(next(Path(logdir).rglob("*.xplane.pb")).read_bytes())
    seconds: dict[str, float] = {}
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name  # "scope/op:Type" for TF ops
                if ":" not in name or "/" not in name:
                    continue
                kind = name.rsplit(":", 1)[1].replace("_MklNative", "").replace("_Mkl", "")
                family = OP_FAMILIES.get(kind, "other")
                seconds[family] = seconds.get(family, 0.0) + event.duration_ps / 1e12
    total = sum(seconds.values())
    flops = forward_flops(model) * images
    return {"epoch_wall_seconds": round(wall, 2), "op_seconds": round(total, 2), "images": images,
            "families": {f: {"seconds": round(v, 2), "share": round(v / total, 4),
                             **({"gflops_of_op_time": round(flops / v / 1e9, 1)} if f.startswith("conv") else {})}
                         for f, v in sorted(seconds.items(), key=lambda kv: -kv[1])}}


def print_peak(cpu: dict, matmul: dict | None) -> None:
    computed = (f"computed {cpu['computed_peak_gflops']} GFLOP/s = {cpu['cpus']} CPUs x {cpu['clock_ghz']} GHz "
                f"(/proc/cpuinfo) x {cpu['fp32_flops_per_cycle']} ({cpu['isa']})")
    m = cpu.get("measured")
    if m:
        print(f"{'  CPU fp32 peak':<34}{m['gflops']:>18}  GFLOP/s measured (fma_peak.c, {m['threads']} threads, "
              f"{m['vector_bits']}-bit FMAs, best of {m['runs_gflops']}; clock {m['clock_ghz']} GHz)")
        print(f"{'':<34}{'':>18}  {computed}; at the measured clock {cpu['computed_at_measured_clock_gflops']}")
    else:
        print(f"{'  CPU fp32 peak':<34}{cpu['peak_gflops']:>18}  GFLOP/s {computed}")
    if matmul:
        print(f"{'  TensorFlow fp32 matmul':<34}{matmul['gflops']:>18}  GFLOP/s ({matmul['size']}^2, all cores): "
              f"{matmul['fraction_of_peak']:.1%} of the peak")


def tf_keras_unet(size: int, base_filters: int, depth: int, batch_norm: bool, bn_momentum: float = 0.99) -> Any:
    """core/model.build_unet (one sigmoid channel) rebuilt layer for layer in tf_keras, whose batch
    norm is the fused kernel (as TFX's Trainer runs it); 0.99 is Keras's BN momentum."""
    import tf_keras
    from tf_keras import layers

    def conv_block(x: Any, filters: int) -> Any:
        for _ in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm)(x)
            if batch_norm:
                x = layers.BatchNormalization(momentum=bn_momentum)(x)
            x = layers.Activation("relu")(x)
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

    segpipe_model = compiled_model(args.size, args.base_filters, args.depth, args.variant_batch_norm)
    tf_keras.utils.set_random_seed(0)
    keras2_model = tf_keras_unet(args.size, args.base_filters, args.depth, args.variant_batch_norm)
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
    peak, matmul = cpu_peak(), tf_matmul_gflops()
    result: dict = {"images": args.images, "size": args.size, "model": f"base_filters {args.base_filters}, depth {args.depth}",
                    "forward_gflops_per_image": round(flops / 1e9, 3), "cpu": peak,
                    "tf_matmul": {"size": MATMUL_SIZE, "gflops": matmul, "fraction_of_peak": round(matmul / peak["peak_gflops"], 4)},
                    "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()}}
    for name, values in rates.items():  # the median run; the best one beside it
        gflops = float(np.median(values)) * 3 * flops / 1e9
        result[name] = {"images_per_s": round(float(np.median(values)), 1), "best_images_per_s": round(max(values), 1),
                        "train_gflops": round(gflops, 1), "fraction_of_peak": round(gflops / peak["peak_gflops"], 4)}
    result["ratio"] = round(result["segpipe"]["images_per_s"] / result["tf_keras"]["images_per_s"], 3)
    result["batch_norm"], result["batch_size"] = args.variant_batch_norm, args.batch_size
    result["op_time"] = op_time_shares(segpipe_model, dataset(), args.images)
    return result


# ---------------------------------------------------------------- 5. variants of the training step


# Changes to the default run's training step, each tried alone against the baseline (the trainer as it
# is, on the demo data's auto plan). In-process: compile/fit settings; batch 8 is the plan's CPU_BATCH.
STEP_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "jit_compile": {"jit_compile": True},
    "steps_per_execution_8": {"steps_per_execution": 8},
    "batch_16": {"batch_size": 16},
    "batch_32": {"batch_size": 32},
    "no_batch_norm": {"batch_norm": False},  # contrast only (another model): what batch norm costs
    "keras_adam": {"optimizer": "keras_adam"},  # Keras 3's own Adam, about 20 ops per variable
    "keras_batch_norm": {"batch_norm_layer": "keras"},  # Keras 3's own BN layer: moments + x * a + b ops
}
# Settings TensorFlow reads from the environment when it loads: each child process trains the
# baseline under one of them, beside a child without any (the ratio is child to child).
PROCESS_VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {},
    "onednn_off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "threads_intra2_inter1": {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "1"},
}


def default_run_configs(batch_norm: bool) -> tuple[dict, dict]:
    """(model, train) config dicts as the default run trains the demo data: default.yaml with the
    auto plan's choices for it (benchmarks/results/plan_demo.json)."""
    import dataclasses

    from segpipe.components.plan import CPU_BATCH
    from segpipe.pipeline.config import load_config

    cfg = load_config(overrides={"train.loss": "bce", "train.batch_size": CPU_BATCH, "model.batch_norm": batch_norm})
    return dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.train)


def variant_setup(args: argparse.Namespace, files: list[str], variant: dict[str, Any]) -> tuple[Any, Any, int]:
    """(compiled model, training dataset, batch size) of one variant: the trainer's create_model,
    optimizer schedule, loss and metrics (compile_model's, plus steps_per_execution) and make_dataset
    with the run's augmentation and declared length."""
    import keras

    from segpipe.components.core.model import get_loss, segmentation_metrics
    from segpipe.components.core.optimizers import FusedAdam
    from segpipe.components.trainer import (augment_options, create_model, fitted_bn_momentum, learning_rate,
                                            make_dataset, replica_mean_loss)

    model_config, train_config = default_run_configs(bool(variant.get("batch_norm", args.variant_batch_norm)))
    batch = int(variant.get("batch_size", train_config["batch_size"]))
    steps_per_epoch = -(-args.images // batch)
    total_steps = steps_per_epoch * (1 + args.epochs * args.variant_repeats)
    model_config.update(base_filters=args.base_filters, depth=args.depth,
                        bn_momentum=fitted_bn_momentum(steps_per_epoch, total_steps))
    keras.utils.set_random_seed(int(train_config["seed"]))  # every variant starts from the same weights
    from unittest import mock

    import segpipe.components.core.model as unet_module

    layer = keras.layers.BatchNormalization if variant.get("batch_norm_layer") == "keras" else unet_module.FusedBatchNormalization
    with mock.patch.object(unet_module, "FusedBatchNormalization", layer):  # the U-Net's BN layer class
        model = create_model(args.size, 2, model_config)
    adam = keras.optimizers.Adam if variant.get("optimizer") == "keras_adam" else FusedAdam
    model.compile(optimizer=adam(learning_rate(train_config, total_steps)),
                  loss=replica_mean_loss(get_loss(train_config["loss"], None)), metrics=segmentation_metrics(2),
                  jit_compile=bool(variant.get("jit_compile", train_config["jit_compile"])),
                  steps_per_execution=int(variant.get("steps_per_execution", 1)))
    dataset = make_dataset(files, image_size=args.size, batch_size=batch, training=True,
                           shuffle_buffer=int(train_config["shuffle_buffer"]), augment=augment_options(train_config),
                           seed=int(train_config["seed"]), num_records=args.images)
    return model, dataset, batch


def run_variants(args: argparse.Namespace, files: list[str], variants: dict[str, dict[str, Any]], repeats: int) -> dict:
    """Each variant's images/s per repeat (variants alternate within a repeat) and its loss trajectory."""
    built = {name: variant_setup(args, files, variant) for name, variant in variants.items()}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu_rates: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, (model, dataset, _) in built.items():
            seconds, cpu_seconds, loss = timed_epochs(model, dataset, args.epochs, warm_up=repeat == 0, shuffle=False)
            rates[name].append(args.images * args.epochs / seconds)
            cpu_rates[name].append(args.images * args.epochs / cpu_seconds)
            losses[name] += loss
    flops = {name: forward_flops(model) for name, (model, _, _) in built.items()}
    return {name: {"runs": [round(r, 1) for r in rates[name]], "cpu_runs": [round(r, 1) for r in cpu_rates[name]],
                   "loss": [round(x, 4) for x in losses[name]], "batch_size": built[name][2],
                   "forward_gflops_per_image": round(flops[name] / 1e9, 4)}
            for name in variants}


def variant_child(args: argparse.Namespace) -> None:
    """One process variant: the baseline under this process's environment; prints run_variants' row."""
    files = sorted(str(p) for p in Path(args.files_dir).glob("data-*.tfrecord.gz"))
    print(json.dumps(run_variants(args, files, {"baseline": {}}, args.variant_repeats)["baseline"]))


def run_variant_child(args: argparse.Namespace, env: dict[str, str], files_dir: Path) -> dict:
    command = [sys.executable, __file__, "--variant-child", "--files-dir", str(files_dir), "--images", str(args.images),
               "--size", str(args.size), "--base-filters", str(args.base_filters), "--depth", str(args.depth),
               "--epochs", str(args.epochs), "--variant-repeats", "1"]
    if not args.variant_batch_norm:
        command.append("--variant-no-batch-norm")
    done = subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode:
        raise RuntimeError(f"variant child {env} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_variants(args: argparse.Namespace, workdir: Path) -> dict:
    """Images/s, fraction of the CPU's peak and ratio to the baseline of each variant (medians over
    the repeats); the process variants' repeats are one child each, alternating with the others."""
    images, masks = make_data(args.images, args.size, seed=2)
    folder = workdir / "variants"
    files = write_records(folder, images, masks)
    peak, load_before = cpu_peak(), [round(x, 2) for x in os.getloadavg()]
    wanted = {"baseline", *(args.variants or (*STEP_VARIANTS, *PROCESS_VARIANTS))}
    steps = {name: variant for name, variant in STEP_VARIANTS.items() if name in wanted}
    processes = {name: env for name, env in PROCESS_VARIANTS.items() if name in wanted}
    rows = {"in_process": run_variants(args, files, steps, args.variant_repeats)}
    children: dict[str, dict] = {name: {"runs": [], "cpu_runs": [], "loss": []} for name in processes}
    for _ in range(args.variant_repeats if len(processes) > 1 else 0):
        for name, env in processes.items():
            row = run_variant_child(args, env, folder)
            children[name]["runs"] += row["runs"]
            children[name]["cpu_runs"] += row["cpu_runs"]
            children[name]["loss"] = children[name]["loss"] or row["loss"]  # the first child's trajectory
            children[name].update(batch_size=row["batch_size"], forward_gflops_per_image=row["forward_gflops_per_image"])
    if children and children["baseline"]["runs"]:
        rows["subprocess"] = children
    for group in rows.values():
        base = float(np.median(group["baseline"]["runs"]))
        cpu_base = float(np.median(group["baseline"]["cpu_runs"]))
        for row in group.values():
            rate, cpu_rate = float(np.median(row["runs"])), float(np.median(row["cpu_runs"]))
            gflops = rate * 3 * row["forward_gflops_per_image"]
            row.update(images_per_s=round(rate, 1), train_gflops=round(gflops, 1),
                       fraction_of_peak=round(gflops / peak["peak_gflops"], 4), ratio_to_baseline=round(rate / base, 3),
                       images_per_cpu_s=round(cpu_rate, 1), cpu_ratio_to_baseline=round(cpu_rate / cpu_base, 3))
    return {"images": args.images, "size": args.size, "epochs_timed": args.epochs, "repeats": args.variant_repeats,
            "model": f"base_filters {args.base_filters}, depth {args.depth}, batch_norm {args.variant_batch_norm}",
            "cpu": peak, "load_average_before": load_before, "load_average": [round(x, 2) for x in os.getloadavg()],
            **rows}


def print_variants(v: dict) -> None:
    print(f"variants of the training step ({v['model']}, {v['size']} px, median of {v['repeats']}; "
          f"peak {v['cpu']['peak_gflops']} GFLOP/s {v['cpu'].get('peak_source', '')}; load {v['load_average_before']} -> {v['load_average']})")
    print(f"{'  variant':<34}{'batch':>6}{'images/s':>10}{'GFLOP/s':>9}{'of peak':>9}{'ratio':>7}"
          f"{'img/CPU-s':>10}{'ratio':>7}  loss first -> last")
    for group, label in (("in_process", ""), ("subprocess", " (child)")):
        for name, row in v.get(group, {}).items():
            print(f"{'  ' + name + label:<34}{row['batch_size']:>6}{row['images_per_s']:>10}{row['train_gflops']:>9}"
                  f"{row['fraction_of_peak']:>9.1%}{row['ratio_to_baseline']:>7}{row['images_per_cpu_s']:>10}"
                  f"{row['cpu_ratio_to_baseline']:>7}  {row['loss'][0]} -> {row['loss'][-1]}")


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--images", type=int, default=256, help="images of 4. and 5.")
    parser.add_argument("--pipeline-images", type=int, default=1024, help="images of 1. (the input pipeline ratio)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--base-filters", type=int, default=16)  # the demo profile's model
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="of 1. and 4. (the plan's CPU batch)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of 1. and 4.")
    parser.add_argument("--memory-n", type=int, default=64)
    parser.add_argument("--memory-size", type=int, default=128, help="image size of the memory runs (tiny model)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-frameworks", action="store_true", help="skip 4. (FLOP/s, tf_keras side by side)")
    parser.add_argument("--skip-variants", action="store_true", help="skip 5. (variants of the training step)")
    parser.add_argument("--skip-stalls", action="store_true", help="skip 6. (epoch stalls)")
    parser.add_argument("--skip-time-to-quality", action="store_true", help="skip 7. (time to the quality target)")
    parser.add_argument("--only-time-to-quality", action="store_true", help="run 7. alone")
    parser.add_argument("--time-to-quality-quick", action="store_true",
                        help="7. at tiny sizes (implied by --quick): checks that it runs")
    parser.add_argument("--stall-epochs", type=int, default=5, help="timed epochs per side and repeat of 6.")
    parser.add_argument("--variant-repeats", type=int, default=3, help="repeats of 5. (the median is reported)")
    parser.add_argument("--variants", nargs="+", choices=sorted({*STEP_VARIANTS, *PROCESS_VARIANTS} - {"baseline"}),
                        help="only these variants of 5. (and the baseline); default all")
    parser.add_argument("--variant-no-batch-norm", dest="variant_batch_norm", action="store_false",
                        help="4. and 5. on the U-Net without batch norm (the auto plan's demo model has it)")
    parser.add_argument("--quick", action="store_true", help="32 px, 48 images, one timed epoch, one repeat: a smoke run")
    parser.add_argument("--gpu", action="store_true", help="seed-model GPU throughput instead of the CPU benchmarks")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--gpu-steps", type=int, default=24, help="steps per timed epoch")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_DENSE_FP16_TFLOPS)
    parser.add_argument("--memory-child", choices=("tfdata", "numpy"), help=argparse.SUPPRESS)
    parser.add_argument("--files-dir", help=argparse.SUPPRESS)
    parser.add_argument("--variant-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.size, args.epochs, args.repeats, args.memory_n, args.memory_size = 48, 32, 1, 1, 8, 32
        args.pipeline_images = 48
        args.variant_repeats, args.stall_epochs = 1, 2
    if args.only_time_to_quality:
        args.skip_pipeline = args.skip_memory = args.skip_frameworks = args.skip_variants = args.skip_stalls = True
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    if args.variant_child:
        variant_child(args)
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
            if not args.skip_variants:
                results["variants"] = bench_variants(args, Path(tmp))
            if not args.skip_stalls:
                results["stalls"] = bench_epoch_stalls(args, Path(tmp))
            if not args.skip_time_to_quality:
                from time_to_quality import bench_time_to_quality

                results["time_to_quality"] = bench_time_to_quality(Path(tmp), args.quick or args.time_to_quality_quick)
        if "pipeline" in results:
            print(f"{'measure':<34}{'trainer tf.data':>18}{'numpy (tutorial)':>18}{'ratio':>8}  goal")
            p = results["pipeline"]
            print(f"{'train images/s (median)':<34}{p['tfdata_images_per_s']:>18}{p['numpy_images_per_s']:>18}{p['ratio']:>8}  >= 0.95")
            print(f"{'  ratio of the best runs':<34}{'':>18}{'':>18}{p['best_ratio']:>8}")
            cpu = p["images_per_cpu_s"]
            print(f"{'  per CPU-second (median)':<34}{cpu['tfdata']:>18}{cpu['numpy']:>18}{p['cpu_ratio']:>8}")
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
            print(f"{'  train images/s (median)':<34}{f['segpipe']['images_per_s']:>18}{f['tf_keras']['images_per_s']:>18}"
                  f"{f['ratio']:>8}  (best runs {f['segpipe']['best_images_per_s']} / {f['tf_keras']['best_images_per_s']};"
                  f" batch {f['batch_size']}, batch norm {f['batch_norm']})")
            print(f"{'  train GFLOP/s (3x forward)':<34}{f['segpipe']['train_gflops']:>18}{f['tf_keras']['train_gflops']:>18}")
            print(f"{'  fraction of CPU fp32 peak':<34}{f['segpipe']['fraction_of_peak']:>18.2%}{f['tf_keras']['fraction_of_peak']:>18.2%}"
                  f"  >= 35%; {f['forward_gflops_per_image']} GFLOPs forward/image")
            print_peak(cpu, f.get("tf_matmul"))
            if f.get("op_time"):
                ot = f["op_time"]
                print(f"{'  op time of one segpipe epoch':<34}{ot['op_seconds']:>18}  s of ops in {ot['epoch_wall_seconds']} s wall "
                      f"(TensorFlow profiler, {ot['images']} images)")
                for family, row in ot["families"].items():
                    rate = f"  {row['gflops_of_op_time']} GFLOP/s of op time" if "gflops_of_op_time" in row else ""
                    print(f"{'    ' + family:<34}{row['share']:>18.1%}  {row['seconds']} s{rate}")
        if "variants" in results:
            print_variants(results["variants"])
        if "stalls" in results:
            print_epoch_stalls(results["stalls"])
        if "time_to_quality" in results:
            from time_to_quality import print_time_to_quality

            print_time_to_quality(results["time_to_quality"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
