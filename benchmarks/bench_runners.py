"""Beam runners side by side: the four Beam steps in-process (FnApiRunner) and through Beam's
portable job API with SDK workers in their own processes (the path Flink, Spark and Dataflow take).

The portable side is Beam's local job service plus an external worker pool, both subprocesses on
this machine: it measures what the portable path itself costs (pipeline translation, job
submission, a fresh SDK worker per job that imports Beam and TensorFlow, every element crossing a
gRPC data channel), not what a cluster would gain from more machines. The services are started
once, before any timing; their start-up is reported on its own line.

The dataset is not the demo's: wide images (width 2-3x the height, 48-96 px high), grey (R = G = B),
three classes: thin 1-3 px curves (class 1, in every image) and small discs (class 2, in about one
image in five). Every step reads the same input under both runners (StatisticsGen, Transform and
the Evaluator read the in-process ExampleGen's output) and their record counts must agree. The
Evaluator scores an untrained 3-class U-Net: only its speed matters here.

    python benchmarks/bench_runners.py --num 300 --json benchmarks/results/runners.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from segpipe.components.core import artifacts  # noqa: E402

log = logging.getLogger("bench_runners")
IN_PROCESS = ["--runner=FnApiRunner"]
LABELS = {0: "background", 1: "curve", 2: "disc"}
IMAGE_SIZE = 64
NUM_SHARDS = 4
START_TIMEOUT = 120.0


# ------------------------------------------------------------------ data unlike the demo's


def thin_structure_example(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A wide grey image with 2-4 thin bright curves (class 1) and, in ~1 in 5, 1-2 dark discs (class 2)."""
    height = int(rng.integers(48, 97))
    width = int(height * rng.uniform(2.0, 3.0))
    yy, xx = np.mgrid[0:height, 0:width]
    grey = 90 + 25 * np.sin(xx / rng.uniform(15, 40)) + rng.normal(0, 12, (height, width))
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        # y = a + b sin(x / c): a curve across the whole width, 1-3 px thick
        a, b, c = rng.uniform(0.2, 0.8) * height, rng.uniform(3, height / 4), rng.uniform(8, 30)
        thickness = rng.uniform(0.5, 1.5)
        on_curve = np.abs(yy - (a + b * np.sin(xx / c))) <= thickness
        mask[on_curve] = 1
        grey[on_curve] = rng.uniform(170, 230)
    if rng.random() < 0.2:
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(3, 6)
            cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            mask[disc] = 2
            grey[disc] = rng.uniform(20, 45)
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), mask


def write_dataset(data_root: Path, num: int, seed: int) -> dict[str, Any]:
    from segpipe.components.core.data_format import encode_example, encode_png, write_labels, write_span

    rng = np.random.default_rng(seed)
    shapes: list[tuple[int, int]] = []
    with_disc = 0

    def records() -> Iterator[bytes]:
        nonlocal with_disc
        for i in range(num):
            image, mask = thin_structure_example(rng)
            shapes.append(mask.shape)
            with_disc += int((mask == 2).any())
            yield encode_example(f"thin-{i:05d}", encode_png(image), encode_png(mask))

    write_labels(data_root, LABELS)
    write_span(data_root, 0, records(), num_shards=NUM_SHARDS)
    heights, widths = zip(*shapes)
    return {"num_images": num, "height": [min(heights), max(heights)], "width": [min(widths), max(widths)],
            "num_classes": len(LABELS), "images_with_class_2": with_disc, "shards": NUM_SHARDS}


# ------------------------------------------------------------------ the portable services


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def portable_services(folder: Path) -> Iterator[tuple[list[str], float]]:
    """(beam_args, start-up seconds) of a local job service and an external worker pool; both are
    stopped on exit. The pool starts workers as `python` from PATH: this interpreter's, first."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    job_port, pool_port = free_port(), free_port()
    commands = [
        ([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", f"--port={job_port}"], job_port),
        ([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"], pool_port),
    ]
    workdir = folder / "worker_cwd"
    workdir.mkdir()
    started = time.perf_counter()
    processes = []
    try:
        for command, _ in commands:
            with open(folder / f"{command[2].rsplit('.', 1)[-1]}.log", "w") as out:
                processes.append(subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
        for process, (command, port) in zip(processes, commands):
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[2]} exited with {process.returncode}; see {folder}")
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command[2]} did not listen on port {port} within {START_TIMEOUT:.0f}s")
                time.sleep(0.2)
        args = ["--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
                "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool_port}"]
        yield args, time.perf_counter() - started
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


# ------------------------------------------------------------------ the steps


def empty_pipeline(beam_args: list[str]) -> None:
    """A pipeline that does nothing: the fixed cost of one job on a runner."""
    import apache_beam as beam

    from segpipe.components.core.beam import beam_pipeline

    with beam_pipeline(beam_args, name="empty") as p:
        _ = p | beam.Create([0]) | beam.Map(abs)


def export_untrained_model(model_uri: Path, graph_uri: Path) -> None:
    import keras

    from segpipe.components.core.model import build_unet
    from segpipe.components.core.serving import export_serving_model

    keras.utils.set_random_seed(0)
    model = build_unet((IMAGE_SIZE, IMAGE_SIZE, 3), artifacts.output_channels(len(LABELS)), base_filters=8, depth=2)
    model_uri.mkdir(parents=True)
    model.save(model_uri / artifacts.KERAS_MODEL_FILE)
    export_serving_model(model, str(graph_uri), model_uri / artifacts.SAVED_MODEL_DIR, image_size=IMAGE_SIZE,
                         num_classes=len(LABELS))


def timed(step: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = step()
    return time.perf_counter() - started, result


def run(num: int, seed: int, work: Path) -> dict[str, Any]:
    # Import every library before timing, so the in-process side does not pay it inside a step
    # (the portable side's workers do pay it, once per job: that is part of the path's cost).
    import apache_beam  # noqa: F401
    import tensorflow  # noqa: F401
    import tensorflow_data_validation  # noqa: F401
    import tensorflow_transform  # noqa: F401

    from segpipe.components.evaluator import evaluate_model
    from segpipe.components.example_gen import run_example_gen
    from segpipe.components.statistics_gen import generate_statistics
    from segpipe.components.transform import run_transform
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.pipeline import create_pipeline, nodes_by_name

    cfg = load_config()
    nodes = nodes_by_name(create_pipeline(cfg))

    def params(node: str, **kwargs: Any) -> dict[str, Any]:
        return {**nodes[node].params(cfg), **kwargs}

    dataset = write_dataset(work / "data", num, seed)
    schema_uri = work / "schema"
    schema_uri.mkdir()
    (schema_uri / artifacts.SCHEMA_FILE).write_text(
        "".join(f'feature {{ name: "{key}" type: BYTES }}\n' for key in (artifacts.IMAGE_KEY, artifacts.MASK_KEY, artifacts.ID_KEY))
    )
    load_before = os.getloadavg()
    with portable_services(work) as (portable_args, startup):
        runners = {"in_process": IN_PROCESS, "portable": portable_args}
        examples = work / "in_process" / "examples"
        graph = work / "in_process" / "graph"
        model = work / "model"

        def example_gen(name: str, args: list[str]) -> Any:
            return run_example_gen(**params(
                "example_gen", input_pattern=str(work / "data" / "span-{SPAN}" / "*.tfrecord*"),
                examples_uri=str(work / name / "examples"), num_classes=len(LABELS), beam_args=args))["counts"]

        def statistics_gen(name: str, args: list[str]) -> Any:
            return generate_statistics(str(examples), str(work / name / "statistics"), beam_args=args)["num_examples"]

        def transform(name: str, args: list[str]) -> Any:
            return run_transform(str(examples), str(schema_uri), str(work / name / "transformed"), str(work / name / "graph"),
                                 image_size=IMAGE_SIZE, standardize=True, beam_args=args)["counts"]

        def evaluator(name: str, args: list[str]) -> Any:
            result = evaluate_model(**params(
                "evaluator", model_uri=str(model), examples_uri=str(examples),
                evaluation_uri=str(work / name / "evaluation"), blessing_uri=str(work / name / "blessing"),
                baseline_model_uri=None, model_run_uri=None, num_classes=len(LABELS), beam_args=args))
            return result["metrics"]

        steps: dict[str, dict[str, Any]] = {}
        for step_name, step in (("empty pipeline", lambda name, args: empty_pipeline(args)),
                                ("example_gen", example_gen), ("statistics_gen", statistics_gen),
                                ("transform", transform), ("evaluator", evaluator)):
            if step_name == "evaluator":
                export_untrained_model(model, graph)
            seconds, outputs = {}, {}
            for name, args in runners.items():
                log.info("%s on %s", step_name, name)
                seconds[name], outputs[name] = timed(lambda: step(name, args))
            if outputs["portable"] != outputs["in_process"]:
                raise AssertionError(f"{step_name}: portable {outputs['portable']} != in-process {outputs['in_process']}")
            steps[step_name] = {**seconds, "ratio": seconds["portable"] / seconds["in_process"], "outputs": outputs["in_process"]}
    load_after = os.getloadavg()
    four = [s for s in steps if s != "empty pipeline"]
    total = {name: sum(steps[s][name] for s in four) for name in runners}
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "dataset": dataset,
        "image_size": IMAGE_SIZE,
        "in_process_args": IN_PROCESS,
        "portable_args": ["--runner=PortableRunner", "--job_endpoint=localhost:<port>", "--environment_type=EXTERNAL",
                          "--environment_config=localhost:<port>"],
        "portable_services_start_seconds": startup,
        "steps": steps,
        "four_steps": {**total, "ratio": total["portable"] / total["in_process"]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=300, help="images in the dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-runners-") as tmp:
        result = run(args.num, args.seed, Path(tmp))
    print(f"{result['dataset']['num_images']} images, load average {result['load_average_before']} before, "
          f"{result['load_average_after']} after; portable services started in {result['portable_services_start_seconds']:.1f} s")
    print(f"{'step':<16}{'in-process s':>14}{'portable s':>12}{'ratio':>8}")
    for name, row in [*result["steps"].items(), ("four steps", result["four_steps"])]:
        print(f"{name:<16}{row['in_process']:>14.1f}{row['portable']:>12.1f}{row['ratio']:>8.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
