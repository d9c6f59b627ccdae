"""Shared fixtures: tests build their own tiny data (no downloads).

Never `import tests...` (apache-beam[gcp] ships a stray top-level `tests` package); share helpers
through fixtures here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

# Quiet TensorFlow's C++ logs in test output; set before any test imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _tiny_example(rng: np.random.Generator, height: int, width: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy RGB image with one bright rectangle per foreground class and its exact mask."""
    image = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    for cls in range(1, num_classes):
        h, w = rng.integers(height // 4, height // 2), rng.integers(width // 4, width // 2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        image[y : y + h, x : x + w] = np.clip(
            rng.integers(150, 255, size=(h, w, 3)) // cls, 0, 255
        ).astype(np.uint8)
        mask[y : y + h, x : x + w] = cls
    return image, mask


@pytest.fixture(scope="session")
def dag_params() -> Callable[..., dict]:
    """`dag_params(node, **kwargs)`: the parameters the DAG gives `node` under the default config,
    updated with `kwargs`, so a test calls a component exactly as both runners do (component
    functions carry no defaults of their own)."""
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.pipeline import create_pipeline, nodes_by_name

    cfg = load_config()
    nodes = nodes_by_name(create_pipeline(cfg))

    def _params(node: str, **kwargs: object) -> dict:
        return {**nodes[node].params(cfg), **kwargs}

    return _params


@pytest.fixture(scope="session")  # a pure function: usable from fixtures of any scope
def write_tiny_span() -> Callable[..., Path]:
    """`write_tiny_span(data_root, span, num=16, size=(40, 48), num_classes=2, seed=0, compress=True)`.

    Writes a span of raw examples in segpipe's format (ids `s<span>-<i>`) plus labels.json and
    returns the span folder.
    """
    from segpipe.components.core.data_format import encode_example, encode_png, write_labels, write_span

    def _write(
        data_root: str | os.PathLike,
        span: int,
        num: int = 16,
        size: tuple[int, int] = (40, 48),
        num_classes: int = 2,
        seed: int = 0,
        compress: bool = True,
        num_shards: int = 1,
    ) -> Path:
        rng = np.random.default_rng(seed * 1000 + span)

        def records():
            for i in range(num):
                image, mask = _tiny_example(rng, size[0], size[1], num_classes)
                yield encode_example(f"s{span}-{i}", encode_png(image), encode_png(mask))

        write_labels(data_root, {0: "background", **{c: f"class{c}" for c in range(1, num_classes)}})
        folder, _ = write_span(data_root, span, records(), num_shards=num_shards, compress=compress)
        return folder

    return _write


def _export_constant_rule_model(model_uri: Path, transform_graph_uri: Path, image_size: int, weight: float, bias: float) -> Path:
    """A 1x1-conv sigmoid "U-Net" p = sigmoid(weight * mean(rgb) + bias), exported like a trained one."""
    import keras

    from segpipe.components.core.artifacts import KERAS_MODEL_FILE, SAVED_MODEL_DIR
    from segpipe.components.core.serving import export_serving_model

    inputs = keras.Input((image_size, image_size, 3))
    layer = keras.layers.Conv2D(1, 1, activation="sigmoid", name="rule")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.full((1, 1, 3, 1), weight / 3, np.float32), np.array([bias], np.float32)])
    model_uri.mkdir(parents=True)
    model.save(model_uri / KERAS_MODEL_FILE)
    export_serving_model(model, str(transform_graph_uri), model_uri / SAVED_MODEL_DIR, image_size=image_size, num_classes=2)
    return model_uri


@pytest.fixture(scope="session")
def tiny_transform(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real Transform run shared by the session: 32 px, x / 255 (no analyzers), binary.

    Returns the URIs {"examples", "schema", "transformed", "graph"}; the raw Examples artifact holds
    4 train and 4 eval examples of 40x40 px (ids `train-<i>`, `eval-<i>`).
    """
    import tensorflow as tf

    from segpipe.components.core import artifacts
    from segpipe.components.core.data_format import encode_example, encode_png
    from segpipe.components.transform import run_transform

    root = tmp_path_factory.mktemp("tiny_transform")
    rng = np.random.default_rng(7)
    examples_uri = root / "examples"
    for split in (artifacts.TRAIN, artifacts.EVAL):
        folder = artifacts.split_dir(examples_uri, split)
        folder.mkdir(parents=True)
        with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
            for i in range(4):
                image, mask = _tiny_example(rng, 40, 40, 2)
                writer.write(encode_example(f"{split}-{i}", encode_png(image), encode_png(mask)))
    schema_uri = root / "schema"
    schema_uri.mkdir()
    (schema_uri / artifacts.SCHEMA_FILE).write_text(
        "".join(f'feature {{ name: "{key}" type: BYTES }}\n' for key in (artifacts.IMAGE_KEY, artifacts.MASK_KEY, artifacts.ID_KEY))
    )
    uris = {"examples": examples_uri, "schema": schema_uri, "transformed": root / "transformed", "graph": root / "transform_graph"}
    run_transform(
        str(examples_uri), str(schema_uri), str(uris["transformed"]), str(uris["graph"]),
        image_size=32, standardize=False, beam_args=["--runner=FnApiRunner"],
    )
    return uris


@pytest.fixture(scope="session")
def rule_models(tmp_path_factory: pytest.TempPathFactory, tiny_transform: dict[str, Path]) -> dict[str, Path]:
    """Model artifacts (serving_model/ + model.keras) of deterministic binary models, image size 32.

    Exported with components.export on a real TFT graph (x / 255, no analyzers), so they serve
    exactly like trained models. "bright": foreground where the mean resized RGB value > 0.5 (almost
    perfect on `write_tiny_span` data, whose rectangles are bright on a dark background);
    "background": background everywhere; "inverted": foreground where the image is dark.
    """
    root = tmp_path_factory.mktemp("rule_models")
    graph_uri = tiny_transform["graph"]
    rules = {"bright": (30.0, -15.0), "background": (0.0, -10.0), "inverted": (-30.0, 15.0)}
    return {name: _export_constant_rule_model(root / name, graph_uri, 32, w, b) for name, (w, b) in rules.items()}


@pytest.fixture
def kfp_stub_server():
    """A tiny stand-in for the Kubeflow Pipelines v2beta1 REST API on 127.0.0.1.

    Yields `(url, requests)`: every request is recorded as a dict (method, path, auth header, JSON
    body). A path containing a substring listed in `refuse` (mutable; the fixture's third element)
    gets HTTP 403. Serves in a daemon thread; shut down after the test.
    """
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests: list[dict] = []
    refuse: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            body = json.loads(raw) if raw else None
            requests.append({"method": self.command, "path": self.path,
                             "auth": self.headers.get("Authorization"), "body": body})
            status, out = 200, {}
            if any(part in self.path for part in refuse):
                status, out = 403, {"error": "forbidden", "code": 7, "message": "forbidden"}
            elif self.path.startswith("/apis/v2beta1/experiments"):
                out = ({"experiments": [], "total_size": 0} if self.command == "GET"
                       else {"experiment_id": "exp-1", "display_name": body["display_name"]})
            elif self.path.startswith("/apis/v2beta1/runs"):
                out = {"run_id": "run-1", "display_name": (body or {}).get("display_name", "")}
            elif self.path.startswith("/apis/v2beta1/recurringruns"):
                out = {"recurring_run_id": "recurring-1", "display_name": (body or {}).get("display_name", "")}
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

        def log_message(self, *args: object) -> None:  # keep test output clean
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests, refuse
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def tiny_segpipe(tiny_pipeline_overrides) -> Callable[..., Callable[..., int]]:
    """`tiny_segpipe(root, **more)`: a function running `segpipe <argv...> --root root` with the tiny
    overrides (plus `more`), returning the exit code: for tests that drive several commands on a root."""
    import json

    from segpipe.pipeline.cli import main

    def _make(root: str | os.PathLike, **more: object) -> Callable[..., int]:
        overrides = tiny_pipeline_overrides(root, **more)
        sets = [a for key, value in overrides.items() if key != "root" for a in ("--set", f"{key}={json.dumps(value)}")]
        return lambda *argv: main([*argv, "--root", str(root), *sets])

    return _make


@pytest.fixture(scope="session")
def tiny_pipeline_overrides() -> Callable[..., dict]:
    """`tiny_pipeline_overrides(root, **more)`: config overrides for a full pipeline run in seconds.

    32 px images, a 4-filter depth-2 U-Net, one epoch, gates that any model passes (tests that need
    a rejection override them).
    """

    def _make(root: str | os.PathLike, **more: object) -> dict:
        return {
            "root": str(root),
            "transform.image_size": 32,
            "model.base_filters": 4,
            "model.depth": 2,
            "model.batch_norm": False,
            "train.epochs": 1,
            "train.min_steps": 0,  # one epoch, however few steps it has
            "train.batch_size": 8,
            "train.early_stopping_patience": 0,
            "evaluation.pixel_accuracy_threshold": 0.0,
            "evaluation.min_foreground_iou": 0.0,
            "evaluation.min_class_iou": 0.0,
            "evaluation.max_regression": 1.0,
            "evaluation.num_worst_examples": 2,
            **more,
        }

    return _make
