"""Pusher: ship a blessed model into a versioned TensorFlow Serving directory, atomically.

Layout: `<serving_dir>/<version>/` is the SavedModel (TensorFlow Serving loads the highest numeric
folder), with `model.keras` (warm starts) and `segpipe.json` (metrics, spans, run id, code version)
inside it, and the TFLite files the Evaluator converted and scored (`model_<variant>.tflite`,
push.tflite; their sizes and drops in segpipe.json under `tflite`). A version is copied to a hidden temporary folder and renamed into place, so TensorFlow
Serving and `latest_blessed_model` never see half a model; hidden folders are not versions. The
version number is chosen under an exclusive lock file, so two pushes never pick the same number,
and an existing version is never overwritten. A model whose blessing is negative is not pushed and
the serving directory is not touched at all.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from segpipe.components.core import artifacts
from segpipe.components.core import metrics as seg_metrics
from segpipe.components.core.errors import BadInputError
from segpipe.components.core.serving import (
    SAVED_MODEL_PB,
    SERVING_INFO_FILE,
    list_version_numbers,
    read_serving_info,
    taken_version_numbers,
)

log = logging.getLogger(__name__)

LOCK_FILE = ".segpipe-push.lock"
TMP_PREFIX = ".push-tmp-"
TRASH_PREFIX = ".pruned-"
PUSH_RESULT_FILE = "pushed_model.json"
ROLLBACK_KEY = "rollback"  # in a rollback version's segpipe.json: what it withdrew


# ------------------------------------------------------------------ reading the serving dir


def list_versions(serving_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per version, ascending: version, path and its segpipe.json contents."""
    out = []
    for version in list_version_numbers(serving_dir):
        folder = Path(serving_dir) / str(version)
        out.append({"version": version, "path": str(folder), "info": read_serving_info(folder)})
    return out


# ------------------------------------------------------------------ writing a version


def remove_stale_temp_dirs(serving_dir: Path) -> list[str]:
    """Delete leftovers of killed pushes; safe because callers hold the lock a live push holds."""
    removed = []
    for entry in serving_dir.iterdir():
        if entry.is_dir() and entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        log.warning("removed leftovers of an interrupted push in %s: %s", serving_dir, ", ".join(removed))
    return removed


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder to the new path `dst` (its own function so tests can interrupt a push midway)."""
    shutil.copytree(src, dst)


def write_version(
    serving_dir: str | os.PathLike,
    fill: Any,
    *,
    keep_last: int,
) -> tuple[int, Path]:
    """Create the next version: `fill(tmp_dir, version)` writes it, then it is renamed into place.

    Returns (version, final path). On any error the temporary folder is removed and no version
    appears.
    """
    root = Path(serving_dir)
    with artifacts.file_lock(root / LOCK_FILE):
        remove_stale_temp_dirs(root)
        existing = taken_version_numbers(root)  # above any numeric folder, complete or not
        version = (existing[-1] + 1) if existing else 1
        final = root / str(version)
        # Refuses an existing version folder: only a writer ignoring the lock could cause one.
        with artifacts.atomic_dir(final, tmp=root / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}") as tmp:
            tmp.rmdir()  # fill() copies a SavedModel tree to this name
            fill(tmp, version)
        if keep_last > 0:
            prune_versions(root, keep_last)
    log.info("pushed version %d to %s", version, final)
    return version, final


def prune_versions(serving_dir: Path, keep_last: int) -> list[int]:
    """Remove all but the newest `keep_last` versions (renamed hidden first, so never half-visible)."""
    versions = list_version_numbers(serving_dir)
    doomed = versions[:-keep_last] if keep_last else []
    for version in doomed:
        trash = serving_dir / f"{TRASH_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        os.rename(serving_dir / str(version), trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        log.info("pruned versions %s from %s (keep_last=%d)", doomed, serving_dir, keep_last)
    return doomed


# ------------------------------------------------------------------ component


def read_blessing(blessing_uri: str | os.PathLike, file_name: str = artifacts.BLESSING_FILE) -> dict[str, Any]:
    """A ModelBlessing (or, with INFRA_BLESSING_FILE, an InfraBlessing): its JSON with a boolean `blessed`."""
    return artifacts.read_decision(Path(blessing_uri) / file_name, "blessed", "blessing not found")


def read_evaluation_summary(evaluation_uri: str | os.PathLike | None) -> dict[str, Any]:
    """Scalar metrics of the evaluation (for segpipe.json and `serving list`)."""
    if evaluation_uri is None:
        return {}
    path = Path(evaluation_uri) / artifacts.EVALUATION_FILE
    if not path.is_file():
        raise BadInputError(f"{path}: evaluation metrics not found")
    metrics = json.loads(path.read_text())
    keys = (*seg_metrics.SCALAR_METRICS, seg_metrics.NUM_EXAMPLES)
    return {k: metrics[k] for k in keys if k in metrics}


def evaluated_tflite(evaluation_uri: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """The TFLite variants the Evaluator scored: {variant: {file (path), bytes, mean_iou_drop, latency_ms}}.

    The files are the ones in the evaluation's tflite/ folder, so the pushed file is the scored one.
    """
    if evaluation_uri is None:
        return {}
    metrics = json.loads((Path(evaluation_uri) / artifacts.EVALUATION_FILE).read_text())
    out = {}
    for variant, result in (metrics.get("tflite") or {}).items():
        path = Path(evaluation_uri) / result["file"]
        if not path.is_file() or path.stat().st_size != result["bytes"]:
            raise BadInputError(f"{path}: the TFLite {variant} file the evaluation scored is missing or changed")
        out[variant] = {"file": path, "bytes": result["bytes"], "mean_iou_drop": result.get("mean_iou_drop"),
                        "latency_ms": result.get("latency_ms")}
    return out


def push_model(
    model_uri: str,
    blessing_uri: str,
    pushed_model_uri: str,
    *,
    serving_dir: str,
    evaluation_uri: str | None = None,
    infra_blessing_uri: str | None = None,
    keep_last: int,
    run_info: dict | None = None,
) -> dict:
    """Copy a blessed model to `<serving_dir>/<next version>/`; do nothing to serving_dir otherwise.

    In the DAG a model is blessed when both the Evaluator and the InfraValidator (`infra_blessing_uri`)
    blessed it; the InfraValidator's figures (load time, latency, peak memory) go into segpipe.json.
    `run_info` (e.g. {"run_id": ..., "spans": [...]}) is recorded in the version's segpipe.json.
    Returns {"pushed", "version", "path"}; the PushedModel artifact records the same.
    """
    blessing = read_blessing(blessing_uri)
    infra = read_blessing(infra_blessing_uri, artifacts.INFRA_BLESSING_FILE) if infra_blessing_uri else None
    blessed = blessing["blessed"] and (infra is None or infra["blessed"])
    result: dict[str, Any] = {"pushed": False, "version": None, "path": None}
    withdrawn = withdrawn_models(serving_dir).get(str(model_uri)) if blessed else None
    if withdrawn:
        result["withdrawn"] = withdrawn
        log.warning("model %s not pushed: %s", model_uri, withdrawn)
    elif blessed:
        source = Path(model_uri) / artifacts.SAVED_MODEL_DIR
        if not (source / SAVED_MODEL_PB).is_file():
            raise BadInputError(f"{source}: no SavedModel ({SAVED_MODEL_PB}) to push")
        info = {
            "source_model": str(model_uri),
            "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": read_evaluation_summary(evaluation_uri),
            "spans": (run_info or {}).get("spans"),
            "run_id": (run_info or {}).get("run_id"),
            "run_info": dict(run_info or {}),
            "code_version": artifacts.code_version(),
            **({"infra_validation": infra.get("figures", {})} if infra else {}),
        }
        tflite = evaluated_tflite(evaluation_uri)
        if tflite:
            info["tflite"] = {v: {**t, "file": t["file"].name} for v, t in tflite.items()}

        def fill(tmp: Path, version: int) -> None:
            copy_tree(source, tmp)
            keras_file = Path(model_uri) / artifacts.KERAS_MODEL_FILE
            if keras_file.is_file():
                shutil.copy2(keras_file, tmp / artifacts.KERAS_MODEL_FILE)
            else:
                log.warning("%s missing: version %d cannot seed warm starts", keras_file, version)
            for edge_file in tflite.values():
                shutil.copy2(edge_file["file"], tmp / edge_file["file"].name)
            (tmp / SERVING_INFO_FILE).write_text(json.dumps({**info, "version": version}, indent=2, default=str))

        version, final = write_version(serving_dir, fill, keep_last=keep_last)
        result.update(pushed=True, version=version, path=str(final))
    else:
        log.warning("model %s is not blessed; serving dir %s left untouched", model_uri, serving_dir)
    with artifacts.publish(
        pushed_model_uri,
        artifacts.PUSHED_MODEL,
        producer="pusher",
        parameters={"serving_dir": str(serving_dir), "keep_last": keep_last},
        inputs=(model_uri, blessing_uri, evaluation_uri, infra_blessing_uri),
    ) as (tmp_dir, meta):
        reasons = [*blessing.get("reasons", []), *(infra or {}).get("reasons", []), *([withdrawn] if withdrawn else [])]
        record = {**result, "serving_dir": str(serving_dir), "reasons": reasons}
        (tmp_dir / PUSH_RESULT_FILE).write_text(json.dumps(record, indent=2))
        meta["extra"].update(record)
    return result


def rollback(serving_dir: str | os.PathLike, version: int) -> dict:
    """Re-push version `version` as a new highest version, so version numbers stay monotonic.

    The new version's segpipe.json records the rollback: the versions it withdrew (every version
    above `version`) and their source models, which the Pusher refuses to push again
    (`withdrawn_models`). The rolled-back model becomes the latest version, so the next run uses it
    as its baseline and warm start.
    """
    source = Path(serving_dir) / str(version)
    if not (source / SAVED_MODEL_PB).is_file():
        available = ", ".join(map(str, list_version_numbers(serving_dir))) or "none"
        raise BadInputError(f"{source}: no such version (available: {available})")
    info = read_serving_info(source)
    withdrawn = [v for v in list_version_numbers(serving_dir) if v > version]
    models = sorted({str(m) for v in withdrawn if (m := read_serving_info(Path(serving_dir) / str(v)).get("source_model"))}
                    - {str(info.get("source_model"))})
    record_of_rollback = {"to_version": version, "withdrawn_versions": withdrawn, "withdrawn_models": models,
                          "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def fill(tmp: Path, new_version: int) -> None:
        copy_tree(source, tmp)
        record = {
            **{k: v for k, v in info.items() if k != ROLLBACK_KEY},
            "version": new_version,
            "rolled_back_from": version,
            ROLLBACK_KEY: record_of_rollback,
            "pushed_at": record_of_rollback["at"],
        }
        (tmp / SERVING_INFO_FILE).write_text(json.dumps(record, indent=2, default=str))

    new_version, final = write_version(serving_dir, fill, keep_last=0)  # a rollback never prunes
    log.info("version %d serves version %d's model; withdrawn: versions %s", new_version, version, withdrawn)
    return {"pushed": True, "version": new_version, "path": str(final), "rolled_back_from": version,
            "source_model": info.get("source_model"), **{k: record_of_rollback[k] for k in ("withdrawn_versions", "withdrawn_models")}}


def withdrawn_models(serving_dir: str | os.PathLike) -> dict[str, str]:
    """Source models a rollback withdrew, each with the reason the Pusher gives for not pushing it."""
    withdrawn: dict[str, str] = {}
    for entry in list_versions(serving_dir):
        rolled = entry["info"].get(ROLLBACK_KEY) or {}
        for model in rolled.get("withdrawn_models") or []:
            withdrawn[str(model)] = (f"this model was withdrawn by the rollback to version {rolled.get('to_version')} "
                                     f"(serving version {entry['version']})")
    return withdrawn
