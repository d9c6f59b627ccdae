"""InfraValidator: a blessed model is loaded the way a model server loads it before it is pushed.

TFX's InfraValidator starts the real server; here a fresh Python process stands in for the serving
binary. It imports TensorFlow and nothing else: segpipe, TensorFlow Transform, tfx_bsl, Beam and
Keras are unimportable in it (as if not installed), so a SavedModel that only works because the
training environment has them is caught. The process gets a self-contained script (never a segpipe
module), runs under an address-space limit (RLIMIT_AS, set between fork and exec), loads the Model
artifact's `serving_model/` and answers canary requests through `serving_default`: image bytes of
the raw test split in batches of `batch_sizes`. The checks:

- it loads within `load_timeout_seconds` (process start to a usable signature) and answers every
  canary request within `request_timeout_seconds`;
- every output follows the serving contract: `probabilities` float32 [N, S, S, C] and
  `class_mask` int32 [N, S, S] (C = 1 for two classes, else K);
- the outputs equal this process's in-process predictions on the same batch (`tf.saved_model.load`
  and `serving_default`, the Evaluator's code path): probabilities within PROBABILITY_ATOL, class
  masks exactly (a pixel whose class is a tie within that tolerance may go either way);
- p50/p99 latency per batch size and the peak resident memory (ru_maxrss) stay within their
  limits (a limit of 0 only reports the figure).

Every check, passed or not, and the figures go into the InfraBlessing artifact
(`infra_blessing.json`, with the serving process's log beside it). The Pusher runs only when it is
blessed and records the figures in the pushed version's `segpipe.json`. Canary requests run on the
CPU: CUDA reserves far more address space than any useful RLIMIT_AS.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from segpipe.components.core import artifacts
from segpipe.components.core.data_format import parse_example
from segpipe.components.core.errors import BadInputError
from segpipe.components.core.serving import BYTES_INPUT, CLASS_MASK, PROBABILITIES, SAVED_MODEL_PB, SERVING_BYTES
from segpipe.components.pusher import read_blessing

log = logging.getLogger(__name__)

PROBABILITY_ATOL = 1e-5
# What a model server does not have. Keras is on the list because TensorFlow Serving loads the
# SavedModel's graph, never the Python classes that built it.
BLOCKED_PACKAGES = ("segpipe", "tensorflow_transform", "tfx_bsl", "apache_beam", "keras", "tf_keras")
SERVING_LOG_FILE = "serving_process.log"  # in the InfraBlessing artifact: the process's stderr
EVENT_PREFIX = "segpipe-infra-event "  # marks the serving process's own stdout lines
EXIT_GRACE_SECONDS = 30.0  # after its last answer, the process has this long to exit
# How TensorFlow and Python report an allocation refused under RLIMIT_AS.
MEMORY_ERRORS = ("MemoryError", "bad_alloc", "failed to map segment", "Cannot allocate memory",
                 "Resource exhausted", "ResourceExhaustedError", "OOM when allocating")

# The serving process: TensorFlow only. argv[1] is the request file written by `serve_canaries`.
SERVING_SCRIPT = r'''
import base64, importlib.machinery, json, os, sys, time, traceback

with open(sys.argv[1]) as fh:
    request = json.load(fh)


class NotInstalled:
    """Loader of a blocked package: importing it fails exactly as if it were not installed."""

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

    def exec_module(self, module):
        pass


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in request["blocked"]:
            return importlib.machinery.ModuleSpec(name, NotInstalled())
        return None


sys.meta_path.insert(0, Blocker())


def emit(event, **fields):
    sys.stdout.write(request["prefix"] + json.dumps(dict(event=event, **fields)) + "\n")
    sys.stdout.flush()


stage = "load"
try:
    import numpy as np
    import tensorflow as tf

    model = tf.saved_model.load(request["saved_model"])
    if request["signature"] not in model.signatures:
        raise LookupError(f"no {request['signature']!r} signature (has: {', '.join(model.signatures) or 'none'})")
    serve = model.signatures[request["signature"]]
    emit("loaded")
    latencies = {}
    for size, encoded in request["batches"]:
        stage = f"request:{size}"
        images = [base64.b64decode(item) for item in encoded]

        def call():
            outputs = serve(**{request["input"]: tf.constant(images, dtype=tf.string)})
            return {key: value.numpy() for key, value in outputs.items()}

        outputs = call()  # also the warm-up request
        # Strings as fixed-width bytes, so the parent reads every output without unpickling.
        np.savez(f"{request['outputs_dir']}/batch-{size}.npz",
                 **{key: value.astype("S") if value.dtype == object else value for key, value in outputs.items()})
        times = []
        for _ in range(request["num_requests"]):
            begin = time.perf_counter()
            call()
            times.append((time.perf_counter() - begin) * 1000.0)
        latencies[str(size)] = times
except BaseException as exc:
    traceback.print_exc()
    emit("error", stage=stage, error=f"{type(exc).__name__}: {exc}")
    code = 1
else:
    emit("done", latencies_ms=latencies)
    code = 0
# Everything is reported: skip the interpreter's TensorFlow teardown (1-4 s measured on 2 cores).
sys.stderr.flush()
os._exit(code)
'''


# ------------------------------------------------------------------ the serving process


@dataclass
class ServingRun:
    """What the serving process did: how far it got, its figures, and why it stopped if it failed."""

    load_seconds: float | None = None  # process start to a usable signature (None: never loaded)
    latencies_ms: dict[int, list[float]] = field(default_factory=dict)
    outputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # the warm-up answers
    peak_memory_mb: float | None = None
    failure: str = ""  # the reason, naming the config field when a limit caused it


def _read_event(proc: subprocess.Popen, buffer: bytearray, deadline: float) -> dict[str, Any]:
    """The process's next event line; {"event": "timeout"} or {"event": "exited"} otherwise."""
    fd = proc.stdout.fileno()
    while True:
        while (newline := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            if line.startswith(EVENT_PREFIX.encode()):  # anything else on stdout is library noise
                return json.loads(line[len(EVENT_PREFIX):])
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return {"event": "timeout"}
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return {"event": "timeout"}
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return {"event": "exited"}
        buffer += chunk


def _reap(proc: subprocess.Popen, grace_seconds: float) -> float:
    """Wait for the process (killing it after `grace_seconds`); its peak resident memory in MB."""
    deadline = time.monotonic() + grace_seconds
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() >= deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return usage.ru_maxrss / 1024.0  # Linux reports KB


def _tail(path: Path, lines: int = 40) -> list[str]:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return [line.strip() for line in text.splitlines() if line.strip()][-lines:]


def _summary(error: str, limit: int = 400) -> str:
    """One line of an error: TensorFlow's first line plus its innermost cause and the failing node."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    noise = ("Detected at node", "<stack traces", "Traceback", "[[", "File ")
    causes = [line for line in lines[1:] if not line.startswith(noise)]
    node = re.search(r"\{\{node ([^}]+)\}\}", error)
    text = " ".join([*lines[:1], *causes[-1:]]) + (f" (node {node.group(1)})" if node else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stopped(proc: subprocess.Popen, event: Mapping[str, Any], loaded: bool, log_path: Path,
             memory_limit_mb: int) -> str:
    """Why the process failed: its own error report (`event`) or, after a crash, its exit and stderr."""
    error, stage = event.get("error", ""), event.get("stage", "")
    doing = "answering canary requests" if loaded else "loading the model"
    stderr = _tail(log_path)
    evidence = [error, *stderr]
    if memory_limit_mb and any(marker in text for text in evidence for marker in MEMORY_ERRORS):
        shown = next(t for t in evidence if any(m in t for m in MEMORY_ERRORS))
        return (f"the serving process ran out of memory while {doing} under infra_validation.memory_limit_mb = "
                f"{memory_limit_mb} MB of address space: {_summary(shown)}")
    if error and stage == "load":
        return f"the model does not load in a TensorFlow-only process: {_summary(error)}"
    if error:
        return f"serving_default fails on a batch of {stage.partition(':')[2]}: {_summary(error)}"
    code = proc.returncode
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    # A refused allocation can also surface as a crash without a message naming memory (oneDNN: SIGILL).
    limit = f" under infra_validation.memory_limit_mb = {memory_limit_mb} MB of address space" if memory_limit_mb else ""
    return f"the serving process died while {doing} ({how}){limit}: {stderr[-1] if stderr else 'no output'}"


def serve_canaries(
    saved_model_dir: str | os.PathLike,
    batches: Sequence[tuple[int, list[bytes]]],
    work_dir: Path,
    log_path: Path,
    *,
    num_requests: int,
    load_timeout_seconds: float,
    request_timeout_seconds: float,
    memory_limit_mb: int,
) -> ServingRun:
    """Start the TensorFlow-only serving process, send the canary batches, collect what it did."""
    (work_dir / "outputs").mkdir()
    request_file = work_dir / "request.json"
    request_file.write_text(json.dumps({
        "saved_model": str(saved_model_dir),
        "signature": SERVING_BYTES,
        "input": BYTES_INPUT,
        "batches": [[size, [base64.b64encode(image).decode("ascii") for image in images]] for size, images in batches],
        "num_requests": num_requests,
        "outputs_dir": str(work_dir / "outputs"),
        "blocked": list(BLOCKED_PACKAGES),
        "prefix": EVENT_PREFIX,
    }))
    limit_bytes = memory_limit_mb << 20

    def limit_memory() -> None:  # runs between fork and exec: one system call, nothing else
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}  # on the CPU: see the module docstring
    run = ServingRun()
    started = time.monotonic()
    with open(log_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", SERVING_SCRIPT, str(request_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=work_dir, env=env,
            preexec_fn=limit_memory if memory_limit_mb else None,
        )
    buffer = bytearray()
    try:
        event = _read_event(proc, buffer, started + load_timeout_seconds)
        if event["event"] == "loaded":
            run.load_seconds = time.monotonic() - started
            event = _read_event(proc, buffer, time.monotonic() + request_timeout_seconds)
        if event["event"] == "timeout":
            proc.kill()  # our own child, hung past its deadline
        run.peak_memory_mb = _reap(proc, EXIT_GRACE_SECONDS)
    except BaseException:  # interrupted: never leave the serving process behind
        proc.kill()
        _reap(proc, 0.0)
        raise
    finally:
        proc.stdout.close()
    loaded = run.load_seconds is not None
    if event["event"] == "done":
        run.latencies_ms = {int(size): times for size, times in event["latencies_ms"].items()}
    elif event["event"] == "timeout" and not loaded:
        run.failure = f"the model did not load within {load_timeout_seconds:g} s (infra_validation.load_timeout_seconds)"
    elif event["event"] == "timeout":
        run.failure = (f"the canary requests did not finish within {request_timeout_seconds:g} s "
                       "(infra_validation.request_timeout_seconds)")
    else:  # it reported an error, or died without a word
        run.failure = _stopped(proc, event, loaded, log_path, memory_limit_mb)
    for size, _ in batches:
        path = work_dir / "outputs" / f"batch-{size}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as saved:
                run.outputs[size] = {key: saved[key] for key in saved.files}
    return run


# ------------------------------------------------------------------ canaries and reference


def canary_images(examples_uri: str | os.PathLike, count: int) -> list[bytes]:
    """Image bytes of the first `count` raw test examples (fewer when the split is smaller)."""
    import tensorflow as tf

    folder = artifacts.split_dir(examples_uri, artifacts.TEST)
    files = artifacts.split_files(examples_uri, artifacts.TEST)
    if not files:
        raise BadInputError(f"{folder}: no test shards to build canary requests from")
    images = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP").take(count).as_numpy_iterator():
        try:
            _, image, _ = parse_example(record)
        except ValueError as exc:
            raise BadInputError(f"{folder}: test record {len(images)}: {exc}") from None
        images.append(image)
    if not images:
        raise BadInputError(f"{folder}: the test split has no records to build canary requests from")
    return images


def canary_batches(images: list[bytes], batch_sizes: Sequence[int]) -> list[tuple[int, list[bytes]]]:
    """One batch per size; a split smaller than a batch is repeated to fill it."""
    return [(size, [images[i % len(images)] for i in range(size)]) for size in batch_sizes]


def reference_predictions(saved_model_dir: str | os.PathLike,
                          batches: Sequence[tuple[int, list[bytes]]]) -> dict[int, dict[str, np.ndarray]]:
    """The same batches through an in-process `tf.saved_model.load` (on the CPU, like the canaries)."""
    import tensorflow as tf

    from segpipe.components.core.serving import load_serving_model, predict_bytes

    loaded = load_serving_model(saved_model_dir)
    with tf.device("/CPU:0"):
        return {size: predict_bytes(loaded, images) for size, images in batches}


# ------------------------------------------------------------------ the checks


def contract_problems(outputs: Mapping[str, np.ndarray], batch_size: int, channels: int) -> list[str]:
    """How a batch's outputs break the serving contract (README "Serving contract"); [] when they follow it."""
    missing = [key for key in (PROBABILITIES, CLASS_MASK) if key not in outputs]
    if missing:
        return [f"no '{key}' output (it returns {', '.join(sorted(outputs)) or 'nothing'})" for key in missing]
    probabilities, mask = outputs[PROBABILITIES], outputs[CLASS_MASK]
    problems = []
    if probabilities.dtype != np.float32:
        problems.append(f"'{PROBABILITIES}' is {probabilities.dtype}, expected float32")
    if mask.dtype != np.int32:
        problems.append(f"'{CLASS_MASK}' is {mask.dtype}, expected int32")
    shape = list(probabilities.shape)
    if len(shape) != 4 or shape[0] != batch_size or shape[1] != shape[2] or shape[3] != channels:
        problems.append(f"'{PROBABILITIES}' has shape {shape}, expected [N={batch_size}, S, S, C={channels}]")
    elif list(mask.shape) != shape[:3]:
        problems.append(f"'{CLASS_MASK}' has shape {list(mask.shape)}, expected {shape[:3]}")
    return problems


def tie_pixels(probabilities: np.ndarray) -> np.ndarray:
    """Pixels whose class is a tie within PROBABILITY_ATOL (p ~ 0.5, or two top classes ~ equal)."""
    if probabilities.shape[-1] == 1:
        return np.abs(probabilities[..., 0] - 0.5) <= PROBABILITY_ATOL
    top_two = np.sort(probabilities, axis=-1)[..., -2:]
    return top_two[..., 1] - top_two[..., 0] <= PROBABILITY_ATOL


def prediction_mismatch(served: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str:
    """'' when the served outputs equal the in-process ones, else what differs."""
    difference = float(np.max(np.abs(served[PROBABILITIES] - reference[PROBABILITIES]), initial=0.0))
    if not difference <= PROBABILITY_ATOL:  # NaN fails too
        return f"probabilities differ from the in-process predictions by up to {difference:.3g} (tolerance {PROBABILITY_ATOL:g})"
    differing = (served[CLASS_MASK] != reference[CLASS_MASK]) & ~tie_pixels(reference[PROBABILITIES])
    if differing.any():
        return f"class_mask differs from the in-process predictions in {int(differing.sum())} pixels"
    return ""


def check(name: str, value: Any, limit: Any, reason: str) -> dict[str, Any]:
    """One recorded check: {name, value, limit, passed, reason}; `reason` is '' when it passed."""
    return {"name": name, "value": value, "limit": limit, "passed": not reason, "reason": reason}


def latency_figures(latencies_ms: Mapping[int, list[float]]) -> dict[str, dict[str, float]]:
    return {str(size): {"p50_ms": round(float(np.percentile(times, 50)), 3),
                        "p99_ms": round(float(np.percentile(times, 99)), 3), "requests": len(times)}
            for size, times in sorted(latencies_ms.items())}


def judge(
    run: ServingRun,
    batches: Sequence[tuple[int, list[bytes]]],
    saved_model_dir: Path,
    *,
    channels: int,
    load_timeout_seconds: float,
    max_p50_latency_ms: float,
    max_p99_latency_ms: float,
    max_peak_memory_mb: float,
) -> list[dict[str, Any]]:
    """Every check on what the serving process did, in the order it got there."""
    load_reason = "" if run.load_seconds is not None else run.failure
    checks = [check("loads in a TensorFlow-only process", run.load_seconds, load_timeout_seconds, load_reason)]
    if load_reason:
        return checks
    answered = [(size, images) for size, images in batches if size in run.outputs]
    contract = {size: contract_problems(run.outputs[size], size, channels) for size, _ in answered}
    comparable = [(size, images) for size, images in answered if not contract[size]]
    reference = reference_predictions(saved_model_dir, comparable) if comparable else {}
    for size, _ in answered:
        checks.append(check(f"batch of {size}: outputs follow the serving contract", None, None,
                            "; ".join(f"batch of {size}: {p}" for p in contract[size])))
        if size in reference:
            mismatch = prediction_mismatch(run.outputs[size], reference[size])
            checks.append(check(f"batch of {size}: outputs equal the in-process predictions", None,
                                PROBABILITY_ATOL, f"batch of {size}: {mismatch}" if mismatch else ""))
    if run.failure:
        checks.append(check("answers every canary request", None, None, run.failure))
        return checks
    for size, figures in latency_figures(run.latencies_ms).items():
        for key, limit, field_name in (("p50_ms", max_p50_latency_ms, "max_p50_latency_ms"),
                                       ("p99_ms", max_p99_latency_ms, "max_p99_latency_ms")):
            if limit > 0:
                value = figures[key]
                reason = (f"batch of {size}: {key[:3]} latency {value:.1f} ms > {limit:g} ms "
                          f"(infra_validation.{field_name})" if value > limit else "")
                checks.append(check(f"batch of {size}: {key[:3]} latency <= limit", value, limit, reason))
    if max_peak_memory_mb > 0 and run.peak_memory_mb is not None:
        reason = (f"peak resident memory {run.peak_memory_mb:.0f} MB > {max_peak_memory_mb:g} MB "
                  "(infra_validation.max_peak_memory_mb)" if run.peak_memory_mb > max_peak_memory_mb else "")
        checks.append(check("peak resident memory <= limit", round(run.peak_memory_mb, 1), max_peak_memory_mb, reason))
    return checks


# ------------------------------------------------------------------ component


def read_infra_blessing(infra_blessing_uri: str | os.PathLike) -> dict[str, Any]:
    """infra_blessing.json: blessed, reasons, checks, figures (BadInputError naming the file if unusable)."""
    return read_blessing(infra_blessing_uri, artifacts.INFRA_BLESSING_FILE)


def validate_infra(
    model_uri: str,
    examples_uri: str,
    blessing_uri: str,
    infra_blessing_uri: str,
    *,
    num_classes: int,
    batch_sizes: Sequence[int],
    num_requests: int,
    load_timeout_seconds: float,
    request_timeout_seconds: float,
    memory_limit_mb: int,
    max_p50_latency_ms: float,
    max_p99_latency_ms: float,
    max_peak_memory_mb: float,
) -> dict:
    """The InfraValidator component (see the module docstring); publishes the InfraBlessing.

    A model the Evaluator did not bless is not started (the blessing says so), which keeps the
    outcome right where a runner cannot skip the step. Returns {"blessed", "reasons", "figures"}.
    """
    parameters = {
        "num_classes": num_classes, "batch_sizes": list(batch_sizes), "num_requests": num_requests,
        "load_timeout_seconds": load_timeout_seconds, "request_timeout_seconds": request_timeout_seconds,
        "memory_limit_mb": memory_limit_mb, "max_p50_latency_ms": max_p50_latency_ms,
        "max_p99_latency_ms": max_p99_latency_ms, "max_peak_memory_mb": max_peak_memory_mb,
    }
    evaluator_blessed = read_blessing(blessing_uri)["blessed"]
    saved_model = Path(model_uri) / artifacts.SAVED_MODEL_DIR
    if evaluator_blessed and not (saved_model / SAVED_MODEL_PB).is_file():
        raise BadInputError(f"{saved_model}: no SavedModel ({SAVED_MODEL_PB}) to validate")
    with artifacts.publish(infra_blessing_uri, artifacts.INFRA_BLESSING, producer="infra_validator",
                           parameters=parameters, inputs=(model_uri, examples_uri, blessing_uri)) as (out, info):
        figures: dict[str, Any] = {}
        if not evaluator_blessed:
            checks = [check("the Evaluator blessed the model", False, True,
                            "the Evaluator did not bless the model, so it was not started")]
        else:
            batches = canary_batches(canary_images(examples_uri, max(batch_sizes)), batch_sizes)
            log.info("infra validation: serving %s in a TensorFlow-only process (batches %s)",
                     saved_model, ", ".join(str(size) for size, _ in batches))
            with tempfile.TemporaryDirectory(prefix="segpipe-infra-") as work:
                run = serve_canaries(saved_model, batches, Path(work), out / SERVING_LOG_FILE,
                                     num_requests=num_requests, load_timeout_seconds=load_timeout_seconds,
                                     request_timeout_seconds=request_timeout_seconds,
                                     memory_limit_mb=memory_limit_mb)
            checks = judge(run, batches, saved_model, channels=artifacts.output_channels(num_classes),
                           load_timeout_seconds=load_timeout_seconds, max_p50_latency_ms=max_p50_latency_ms,
                           max_p99_latency_ms=max_p99_latency_ms, max_peak_memory_mb=max_peak_memory_mb)
            figures = {
                "load_seconds": None if run.load_seconds is None else round(run.load_seconds, 3),
                "peak_memory_mb": None if run.peak_memory_mb is None else round(run.peak_memory_mb, 1),
                "memory_limit_mb": memory_limit_mb,
                "latency_ms": latency_figures(run.latencies_ms),
            }
        reasons = [c["reason"] for c in checks if not c["passed"]]
        blessed = not reasons
        record = {"blessed": blessed, "reasons": reasons, "checks": checks, "figures": figures, "model": model_uri}
        (out / artifacts.INFRA_BLESSING_FILE).write_text(json.dumps(record, indent=2))
        info["extra"].update(blessed=blessed, reasons=reasons, figures=figures)
    log.info("infra validation: %s%s %s", "blessed" if blessed else "NOT blessed: ", "; ".join(reasons),
             json.dumps(figures, sort_keys=True))
    return {"blessed": blessed, "reasons": reasons, "figures": figures}
