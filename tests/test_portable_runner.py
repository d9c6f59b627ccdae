"""The Beam steps through Beam's portable job API, with SDK workers in their own processes.

This is the path Flink, Spark and Dataflow take: the pipeline is translated to protos, submitted
to a job service, and its functions are unpickled and run by SDK workers that share nothing with
the launching process but the installed packages and the file system. Here the job service is
Beam's local one and the workers come from an external worker pool, each a subprocess started in
its own (empty) working directory, so a function that does not pickle, a module a worker cannot
import or a path relative to the launcher's working directory fails here as it would on a cluster.

Every step's outputs must equal the in-process FnApiRunner's on the same input: the same split
membership and shard record sets, the same statistics, the same transformed examples, the same
evaluation metrics. Both runners get relative URIs from a working directory that is not the
workers': the step must hand its workers absolute paths (nothing may land in the workers' own).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from segpipe.components.core import artifacts
from segpipe.components.transform import PIXEL_OFFSET_KEY, PIXEL_SCALE_KEY

IN_PROCESS = ["--runner=FnApiRunner"]
RUNNERS = ("in_process", "portable")
START_TIMEOUT = 60.0  # seconds for a service to listen (it imports Beam; slow on a loaded machine)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(process: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[2]} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{process.args[2]} did not listen on port {port} within {START_TIMEOUT:.0f}s")


@pytest.fixture(scope="module")
def portable_args(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """`beam_args` for a local job service and an external worker pool, both stopped afterwards.

    The pool starts each SDK worker as `python -c ...` found on PATH, so PATH leads with this
    interpreter's folder: the workers import segpipe from the same environment, as workers do from
    the segpipe image on a cluster.
    """
    folder = tmp_path_factory.mktemp("portable")
    worker_cwd = folder / "worker_cwd"
    worker_cwd.mkdir()
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    job_port, pool_port = _free_port(), _free_port()
    services = {
        "job_service": ([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                         f"--port={job_port}"], job_port),
        "worker_pool": ([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                         f"--service_port={pool_port}"], pool_port),
    }
    started: list[tuple[subprocess.Popen, Path]] = []
    try:
        for name, (command, _) in services.items():
            log_path = folder / f"{name}.log"
            with open(log_path, "w") as log_file:
                process = subprocess.Popen(command, cwd=worker_cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # its own group: its workers stop with it
            started.append((process, log_path))
        for (process, log_path), (_, port) in zip(started, services.values()):
            _wait_listening(process, port, log_path)
        yield [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{pool_port}",
        ]
        assert not any(worker_cwd.iterdir()), f"a worker wrote into its working directory: {list(worker_cwd.iterdir())}"
    finally:
        for process, _ in started:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process, _ in started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


# ------------------------------------------------------------------ inputs shared by the steps


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory: pytest.TempPathFactory, write_tiny_span) -> Path:
    """Two spans: 40 examples of 40x48 in three shards, and 8 of 30x44 that fall below the minimum
    size (quarantined)."""
    root = tmp_path_factory.mktemp("raw")
    write_tiny_span(root / "data", 0, num=40, size=(40, 48), num_shards=3)
    write_tiny_span(root / "data", 1, num=8, size=(30, 44))
    return root / "data"


def _runner_args(name: str, portable_args: list[str]) -> list[str]:
    return portable_args if name == "portable" else IN_PROCESS


@pytest.fixture(scope="module")
def example_gen_runs(tmp_path_factory, dag_params, raw_data: Path, portable_args: list[str]) -> dict[str, tuple[Path, dict]]:
    """ExampleGen under both runners from the same spans: {runner: (Examples URI, result)}."""
    from segpipe.components.example_gen import run_example_gen

    root = tmp_path_factory.mktemp("example_gen")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        pattern = os.path.relpath(raw_data, root) + "/span-{SPAN}/*.tfrecord*"
        for name in RUNNERS:
            runs[name] = (root / name, run_example_gen(**dag_params(
                "example_gen", input_pattern=pattern, examples_uri=name, num_spans=2,
                splits={"train": 60, "eval": 20, "test": 20}, beam_args=_runner_args(name, portable_args),
            )))
    return runs


@pytest.fixture(scope="module")
def schema_uri(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("schema")
    (folder / artifacts.SCHEMA_FILE).write_text(
        "".join(f'feature {{ name: "{key}" type: BYTES }}\n' for key in (artifacts.IMAGE_KEY, artifacts.MASK_KEY, artifacts.ID_KEY))
    )
    return folder


# ------------------------------------------------------------------ comparisons


def _split_records(examples_uri: Path, split: str) -> Counter:
    import tensorflow as tf

    files = artifacts.split_files(examples_uri, split)
    return Counter(record.numpy() for record in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def _ids(records: Counter) -> set[str]:
    from segpipe.components.core.data_format import parse_proto

    return {parse_proto(r).features.feature[artifacts.ID_KEY].bytes_list.value[0].decode() for r in records}


def _assert_stats_equal(a, b, where: str) -> None:
    """Two statistics protos field by field; floats may differ in their last bits (summation order)."""
    from google.protobuf import json_format

    def walk(x, y, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            assert x.keys() == y.keys(), f"{path}: fields {sorted(x)} != {sorted(y)}"
            for key in x:
                walk(x[key], y[key], f"{path}.{key}")
        elif isinstance(x, list) and isinstance(y, list):
            assert len(x) == len(y), f"{path}: {len(x)} != {len(y)} entries"
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif isinstance(x, float) or isinstance(y, float):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12), f"{path}: {x} != {y}"
        else:
            assert x == y, f"{path}: {x!r} != {y!r}"

    walk(json_format.MessageToDict(a), json_format.MessageToDict(b), where)


# ------------------------------------------------------------------ the steps


def test_example_gen_splits_the_same(example_gen_runs: dict) -> None:
    (local_uri, local), (portable_uri, portable) = example_gen_runs["in_process"], example_gen_runs["portable"]
    assert portable == local
    assert local["counts"]["quarantine"] == 8 and local["counts"]["test"] > 0
    for split in (*artifacts.SPLITS, artifacts.QUARANTINE):
        records = _split_records(local_uri, split)
        assert _split_records(portable_uri, split) == records, f"split {split} differs"
        assert len(records) == local["counts"][split]
    assert _ids(_split_records(portable_uri, artifacts.QUARANTINE)) == {f"s1-{i}" for i in range(8)}
    assert artifacts.read_info(portable_uri).extra == artifacts.read_info(local_uri).extra


def test_statistics_gen_computes_the_same_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    example_gen_runs: dict, portable_args: list[str]) -> None:
    from segpipe.components.statistics_gen import DERIVED, RAW, generate_statistics, load_stats

    monkeypatch.chdir(tmp_path)
    examples_uri = os.path.relpath(example_gen_runs["in_process"][0], tmp_path)
    local, portable = (generate_statistics(examples_uri, name, beam_args=_runner_args(name, portable_args))
                       for name in RUNNERS)
    assert portable["num_examples"] == local["num_examples"] and portable["splits"] == local["splits"]
    for split in local["splits"]:
        for view in (RAW, DERIVED):
            _assert_stats_equal(load_stats(tmp_path / "portable", split, view), load_stats(tmp_path / "in_process", split, view),
                                f"{split}/{view}")


def _transformed(transformed_uri: Path, graph_uri: Path, split: str) -> dict[str, dict[str, np.ndarray]]:
    import tensorflow as tf
    import tensorflow_transform as tft

    spec = tft.TFTransformOutput(str(graph_uri)).transformed_feature_spec()
    out = {}
    for record in tf.data.TFRecordDataset(artifacts.split_files(transformed_uri, split), compression_type="GZIP"):
        features = tf.io.parse_single_example(record, spec)
        out[features[artifacts.ID_KEY].numpy().decode()] = {k: v.numpy() for k, v in features.items() if k != artifacts.ID_KEY}
    return out


def test_transform_writes_the_same_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                            example_gen_runs: dict, schema_uri: Path, portable_args: list[str]) -> None:
    from segpipe.components.transform import run_transform

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="segpipe.components.core.beam")
    examples_uri = os.path.relpath(example_gen_runs["in_process"][0], tmp_path)
    results, reports = {}, {}
    for name in RUNNERS:
        caplog.clear()
        # standardize: the analyzers (a full pass over train) run too, not only the per-example map
        results[name] = run_transform(examples_uri, os.path.relpath(schema_uri, tmp_path), f"{name}/transformed",
                                      f"{name}/graph", image_size=16, standardize=True,
                                      beam_args=_runner_args(name, portable_args))
        reports[name] = [r.getMessage() for r in caplog.records if "Beam pipeline done" in r.getMessage()]
    assert results["portable"] == results["in_process"]
    # the runner returns while a portable job runs: the counters line still comes, once, when it is done
    train = results["in_process"]["counts"][artifacts.TRAIN]
    for name in RUNNERS:
        assert len(reports[name]) == 1 and f"records[train]={train}" in reports[name][0], (name, reports[name])
    for split in (artifacts.TRAIN, artifacts.EVAL):
        local = _transformed(tmp_path / "in_process" / "transformed", tmp_path / "in_process" / "graph", split)
        portable = _transformed(tmp_path / "portable" / "transformed", tmp_path / "portable" / "graph", split)
        assert portable.keys() == local.keys() and len(local) == results["in_process"]["counts"][split]
        for example_id, features in local.items():
            np.testing.assert_array_equal(portable[example_id][artifacts.MASK_KEY], features[artifacts.MASK_KEY])
            assert portable[example_id][artifacts.IMAGE_KEY] == features[artifacts.IMAGE_KEY], (split, example_id)
            # mean and variance are float sums whose order depends on the bundles
            for key in (PIXEL_OFFSET_KEY, PIXEL_SCALE_KEY):
                np.testing.assert_allclose(portable[example_id][key], features[key], rtol=1e-5,
                                           err_msg=f"{split} {example_id} {key}")


def test_evaluator_scores_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, example_gen_runs: dict,
                                   rule_models: dict, dag_params, portable_args: list[str]) -> None:
    from segpipe.components.evaluator import PER_EXAMPLE_FILE, evaluate_model

    monkeypatch.chdir(tmp_path)
    examples_uri = os.path.relpath(example_gen_runs["in_process"][0], tmp_path)
    outputs = {}
    for name in RUNNERS:
        # with a baseline: two RunInference branches in one pipeline, as in a retraining run
        result = evaluate_model(**dag_params(
            "evaluator", model_uri=os.path.relpath(rule_models["bright"], tmp_path), examples_uri=examples_uri,
            evaluation_uri=f"{name}/evaluation", blessing_uri=f"{name}/blessing",
            baseline_model_uri=os.path.relpath(rule_models["background"], tmp_path), model_run_uri=None,
            num_classes=2, beam_args=_runner_args(name, portable_args),
        ))
        evaluation = tmp_path / name / "evaluation"
        outputs[name] = (
            result,
            json.loads((evaluation / artifacts.EVALUATION_FILE).read_text()),
            sorted((evaluation / PER_EXAMPLE_FILE).read_text().splitlines()),
            json.loads((tmp_path / name / "blessing" / artifacts.BLESSING_FILE).read_text()),
        )
    local, portable = outputs["in_process"], outputs["portable"]
    assert local[1]["num_examples"] == example_gen_runs["in_process"][1]["counts"]["test"]
    assert local[1]["baseline"]["num_examples"] == local[1]["num_examples"]
    assert portable == local
