"""BulkInferrer: score the newest span with the model version the run just pushed (TFX's BulkInferrer).

What is scored: ExampleGen's output for the newest span, every split, the quarantine included (as
TFX's BulkInferrer reads every split of its Examples by default; inference needs no mask, so a
record quarantined for its mask is scored too). When ExampleGen read several spans
(`data.num_spans` > 1) its splits mix them, so the newest span's own files, as ExampleGen listed
them, are read instead.

How: the Beam RunInference pipeline of `segpipe infer` (components/tools/infer.py) on the
configured Beam runner, with the pushed serving version (TensorFlow Serving's folder, not the
trainer's copy). The InferenceResult artifact is the one `segpipe infer` writes: `masks/<id>.png`
(class ids at each image's own size), `predictions-*.tfrecord.gz` (per example: `id`, `mask`,
`mask_file`, `class_pixels`, `model_version`) and `failures.json`. A record whose image cannot
be scored is named by id in the log and in failures.json, counted in the result, and skipped.

The DAG runs this node only when the Pusher pushed; a runner that cannot skip it (kfp.local, which
has no conditions) gets an empty InferenceResult saying why nothing was scored.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError
from segpipe.components.core.serving import is_complete_version, load_serving
from segpipe.components.pusher import PUSH_RESULT_FILE
from segpipe.components.tools import infer

log = logging.getLogger(__name__)

PRODUCER = "bulk_inferrer"
MAX_NAMED = 20  # failed ids in the node's result (failures.json lists them all)


def read_pushed_version(pushed_model_uri: str | os.PathLike) -> dict[str, Any]:
    """The Pusher's record: {"pushed", "version", "path", "reasons", ...}; BadInputError naming the file."""
    return artifacts.read_decision(Path(pushed_model_uri) / PUSH_RESULT_FILE, "pushed", "push record not found")


def newest_span_files(examples_uri: str | os.PathLike) -> tuple[int, list[str]]:
    """(newest span, the TFRecord files holding its examples) of an Examples artifact (module docstring)."""
    from segpipe.components.example_gen import span_files

    info = artifacts.read_info(examples_uri)
    spans = [int(s) for s in info.extra.get("spans") or []]
    if not spans:
        raise BadInputError(f"{examples_uri}: the Examples artifact does not record its spans")
    newest = max(spans)
    if len(spans) == 1:
        files = sorted(str(p) for p in Path(examples_uri).glob(f"Split-*/{artifacts.SHARD_PATTERN}"))
    else:
        read = set(info.extra.get("files") or [])
        files = [f for f in span_files(info.parameters["input_pattern"], [newest]) if f in read]
    if not files:
        raise BadInputError(f"{examples_uri}: no files of span {newest} to score")
    return newest, files


def infer_examples(
    pushed_model_uri: str,
    examples_uri: str,
    inference_result_uri: str,
    *,
    beam_args: list[str],
) -> dict:
    """Publish the InferenceResult of the newest span under the pushed version (module docstring).

    Returns {"inferred", "version", "span", "counts": {"images", "failed"}, "failed_ids"} (the first
    MAX_NAMED ids of skipped records; None for a record without a readable id). Raises
    BadInputError when the pushed version is gone from the serving dir or breaks the serving contract.
    """
    pushed = read_pushed_version(pushed_model_uri)
    span, files = newest_span_files(examples_uri)
    if not pushed["pushed"]:
        reason = "; ".join(pushed.get("reasons") or []) or "the model was not pushed"
        log.warning("bulk inference: nothing scored, no model was pushed (%s)", reason)
        with artifacts.publish(inference_result_uri, artifacts.INFERENCE_RESULT, producer=PRODUCER,
                               inputs=(pushed_model_uri, examples_uri)) as (_, info):
            info["counts"] = {"images": 0, infer.FAILED: 0}
            info["extra"]["skipped"] = f"no model was pushed: {reason}"
        return {"inferred": False, "version": None, "span": span, "counts": info["counts"], "failed_ids": []}
    version_dir = Path(pushed["path"])
    if not is_complete_version(version_dir):
        raise BadInputError(f"{version_dir}: serving version {pushed['version']} that the Pusher wrote is gone "
                            "(pruned by push.keep_last or removed); nothing to score with")
    model = load_serving(version_dir)
    log.info("bulk inference: span %d, %d file(s), serving version %s", span, len(files), pushed["version"])
    result = infer.publish_inference(
        model, files, Path(inference_result_uri), beam_args=beam_args, producer=PRODUCER,
        inputs=(pushed_model_uri, examples_uri), parameters={"span": span},
    )
    failed = result["failed"]
    return {
        "inferred": True,
        "version": result["model_version"],
        "span": span,
        "counts": {"images": result["written"], infer.FAILED: len(failed)},
        "failed_ids": [item["id"] for item in failed[:MAX_NAMED]],
    }
