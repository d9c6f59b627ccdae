"""Artifact contracts, named once: types, on-disk layout, atomic publishing, metadata files.

Every component writes each output into a temporary sibling folder and renames it into place only
when the work succeeded, so a reader (or a rerun after a crash) never sees a half-written artifact.
Each published artifact carries `segpipe_artifact.json`: its type, producer, parameters, counts,
a fingerprint of its inputs and the code version.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, Iterator, Mapping

from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

# Artifact types (the names ML Metadata and Kubeflow see).
EXAMPLES = "Examples"
STATISTICS = "ExampleStatistics"
PLAN = "Plan"
HYPERPARAMETERS = "Hyperparameters"  # the Tuner's best values and its trials
SCHEMA = "Schema"
ANOMALIES = "ExampleAnomalies"
TRANSFORM_GRAPH = "TransformGraph"
TRANSFORMED_EXAMPLES = "TransformedExamples"
MODEL = "Model"
MODEL_RUN = "ModelRun"
MODEL_EVALUATION = "ModelEvaluation"
MODEL_BLESSING = "ModelBlessing"
INFRA_BLESSING = "InfraBlessing"
PUSHED_MODEL = "PushedModel"
INFERENCE_RESULT = "InferenceResult"  # segpipe infer: per-image masks and predictions

# Split names. `eval` drives checkpoints and early stopping; `test` is the Evaluator's alone.
TRAIN = "train"
EVAL = "eval"
TEST = "test"
QUARANTINE = "quarantine"
SPLITS = (TRAIN, EVAL, TEST)

# Raw example feature keys (see README "Data format").
IMAGE_KEY = "image"
MASK_KEY = "mask"
ID_KEY = "id"
REASON_KEY = "reason"  # bytes feature on quarantined examples: "<kind>: <detail>"
IGNORE_LABEL = 255


def output_channels(num_classes: int) -> int:
    """Model output channels for K data classes: 2 classes use one sigmoid channel, else K softmax."""
    return 1 if num_classes == 2 else num_classes


def data_classes(channels: int) -> int:
    """The inverse of `output_channels`: data classes a head with this many channels predicts."""
    return 2 if channels == 1 else channels

METADATA_FILE = "segpipe_artifact.json"
SHARD_PATTERN = "data-*.tfrecord.gz"  # inside each split folder


def split_dir(artifact_uri: str | os.PathLike, split: str) -> Path:
    """`<artifact>/Split-<split>/`: the split layout TFX users know."""
    return Path(artifact_uri) / f"Split-{split}"


def split_files(artifact_uri: str | os.PathLike, split: str) -> list[str]:
    return sorted(str(p) for p in split_dir(artifact_uri, split).glob(SHARD_PATTERN))


def shard_prefix(artifact_uri: str | os.PathLike, split: str) -> str:
    """Prefix for Beam's WriteToTFRecord so shards match SHARD_PATTERN."""
    return str(split_dir(artifact_uri, split) / "data")


# Fixed sub-paths inside artifacts.
SAVED_MODEL_DIR = "serving_model"  # Model: the SavedModel with the transform embedded
KERAS_MODEL_FILE = "model.keras"  # Model: for warm starts (Keras 3 cannot train a SavedModel)
STATS_FILE = "stats.pb"  # Statistics: per split folder, DatasetFeatureStatisticsList
SCHEMA_FILE = "schema.pbtxt"
ANOMALIES_FILE = "anomalies.pbtxt"
EVALUATION_FILE = "metrics.json"
BLESSING_FILE = "blessing.json"
INFRA_BLESSING_FILE = "infra_blessing.json"


@dataclass(frozen=True)
class ArtifactInfo:
    type: str
    producer: str
    parameters: dict[str, Any]
    counts: dict[str, Any]
    input_fingerprint: str
    code_version: str
    created: float
    extra: dict[str, Any]


def code_version() -> str:
    """segpipe's version plus a digest of the installed component source, so edits miss the cache."""
    try:
        version = importlib_metadata.version("segpipe")
    except importlib_metadata.PackageNotFoundError:
        version = "0+unknown"
    digest = hashlib.sha256()
    for package in ("segpipe.components", "segpipe.schemas"):
        root = Path(str(importlib_resources.files(package)))
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".pbtxt") and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root.parent).as_posix().encode())
                digest.update(path.read_bytes())
    return f"{version}+{digest.hexdigest()[:12]}"


def fingerprint(*parts: Any) -> str:
    """Stable digest of JSON-able values (parameters, input fingerprints)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_info(artifact_uri: str | os.PathLike) -> ArtifactInfo:
    with open(Path(artifact_uri) / METADATA_FILE) as fh:
        return ArtifactInfo(**json.load(fh))


def read_decision(path: str | os.PathLike, flag: str, missing: str) -> dict[str, Any]:
    """A step's JSON decision (a blessing, a push record) whose boolean `flag` later steps branch on;
    BadInputError naming the file when it is missing (`<path>: <missing>`), not JSON or lacks the flag."""
    path = Path(path)
    try:
        decision = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{path}: {missing}") from None
    except ValueError as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(decision.get(flag), bool):
        raise BadInputError(f"{path}: field '{flag}' must be true or false")
    return decision


def read_json_mapping(path: str | os.PathLike, key: str, what: str) -> dict[str, Any]:
    """The mapping under `key` of a JSON file (a plan's overrides, tuned values); BadInputError naming the
    file (`<path>: not a readable <what>`) otherwise."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())[key]
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"{path}: not a readable {what} ({exc})") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{path}: {key}: expected a mapping, got {type(value).__name__}")
    return value


def input_fingerprint(*artifact_uris: str | os.PathLike | None) -> str:
    """Digest of the input artifacts' own fingerprints (plus their paths' metadata)."""
    parts = []
    for uri in artifact_uris:
        if uri is None:
            parts.append(None)
            continue
        meta = Path(uri) / METADATA_FILE
        parts.append(json.loads(meta.read_text()) if meta.exists() else str(uri))
    return fingerprint(parts)


@contextlib.contextmanager
def publish(
    artifact_uri: str | os.PathLike,
    artifact_type: str,
    *,
    producer: str,
    parameters: Mapping[str, Any] | None = None,
    inputs: tuple[str | os.PathLike | None, ...] = (),
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Write an artifact atomically.

    Yields `(tmp_dir, info)`: write files into `tmp_dir` and put record counts into
    `info["counts"]` (anything else into `info["extra"]`). On a clean exit the metadata file is
    written and `tmp_dir` renamed to `artifact_uri`; on an exception it is removed and nothing
    appears at `artifact_uri`. An existing artifact at `artifact_uri` is replaced only after the
    new one is complete (a rerun after a crash).
    """
    final = Path(artifact_uri)
    info: dict[str, Any] = {"counts": {}, "extra": {}}
    with atomic_dir(final, replace=True) as tmp:
        yield tmp, info
        record = ArtifactInfo(
            type=artifact_type,
            producer=producer,
            parameters=dict(parameters or {}),
            counts=info["counts"],
            input_fingerprint=input_fingerprint(*inputs),
            code_version=code_version(),
            created=time.time(),
            extra=info["extra"],
        )
        (tmp / METADATA_FILE).write_text(json.dumps(record.__dict__, indent=2, sort_keys=True, default=str))
    log.debug("published %s at %s", artifact_type, final)


def is_published(artifact_uri: str | os.PathLike) -> bool:
    return (Path(artifact_uri) / METADATA_FILE).is_file()


# ------------------------------------------------------------------ atomic writes and locks
# The one implementation of each: every folder or file segpipe publishes appears complete or not
# at all, and every shared folder (serving dir, ML Metadata's SQLite file, a run root) is guarded by
# an fcntl lock that dies with its process, so a kill never leaves a stale lock behind.


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden, unique name beside `path` (same file system, so the final rename is atomic)."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a file via a temp name + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temp folder that is renamed to `final` on a clean exit and removed on an exception.

    `replace=False` refuses an existing `final` (FileExistsError); `replace=True` swaps it out only
    after the new folder is complete (a rerun after a crash). `tmp` names the temp folder when its
    owner needs to recognise leftovers (the serving dir's push temps).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final}: already exists; refusing to overwrite")
            old = temp_sibling(final, "old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, exclusive: bool = True) -> Iterator[None]:
    """fcntl lock on `path` (created if needed); released when the process dies, so no stale locks."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
