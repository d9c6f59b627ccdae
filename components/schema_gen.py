"""Schema: import the curated, checked-in schema; draft a new one from statistics.

The pipeline never infers its schema silently: `import_schema` publishes the reviewed text proto
(`schemas/schema.pbtxt` or `validation.schema_path`) as the Schema artifact after checking that it
parses and declares the features segpipe reads. `infer_schema_draft` (`segpipe schema infer`) is the
tool for users whose data differs: it writes a draft to review and check in.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

PRODUCER = "ImportSchemaGen"
REQUIRED_FEATURES = (artifacts.IMAGE_KEY, artifacts.MASK_KEY, artifacts.ID_KEY)
_DRAFT_HEADER = (
    "# Draft schema inferred by `segpipe schema infer` from {stats}.\n"
    "# Review it (presence, value counts, domains) before pointing validation.schema_path at it.\n"
)


def load_schema(path: str | os.PathLike) -> Any:
    """Parse a Schema text proto; BadInputError names the file (and the parser's line) on failure."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BadInputError(f"{path}: schema file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read schema ({exc})") from None
    try:
        return text_format.Parse(text, schema_pb2.Schema())
    except text_format.ParseError as exc:
        raise BadInputError(f"{path}: not a Schema text proto ({exc})") from None


def import_schema(schema_path: str, schema_uri: str) -> dict:
    """Publish the schema at `schema_path` (comments kept) as the Schema artifact.

    Returns {"features": [...], "sha256": digest of the file}.
    """
    schema = load_schema(schema_path)
    features = [feature.name for feature in schema.feature]
    missing = [name for name in REQUIRED_FEATURES if name not in features]
    if missing:
        raise BadInputError(f"{schema_path}: schema lacks feature(s) {', '.join(missing)} that segpipe reads")
    digest = hashlib.sha256(Path(schema_path).read_bytes()).hexdigest()
    parameters = {"schema_path": str(schema_path), "sha256": digest}
    with artifacts.publish(schema_uri, artifacts.SCHEMA, producer=PRODUCER, parameters=parameters) as (tmp, info):
        shutil.copyfile(schema_path, tmp / artifacts.SCHEMA_FILE)
        info["counts"] = {"features": len(features)}
        info["extra"] = {"features": features}
    log.info("Schema: imported %s (%d features) as %s", schema_path, len(features), schema_uri)
    return {"features": features, "sha256": digest}


def _statistics_file(stats: str | os.PathLike) -> Path:
    """A stats.pb file, or a Statistics artifact folder (its train split's stats.pb)."""
    path = Path(stats)
    if path.is_dir():
        path = artifacts.split_dir(path, artifacts.TRAIN) / artifacts.STATS_FILE
    if not path.is_file():
        raise BadInputError(f"{path}: statistics file not found")
    return path


def infer_schema_draft(stats: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Write a draft schema inferred by TFDV from statistics, atomically.

    Features whose every value is unique (ids) get no string domain: enumerating today's ids
    would flag every new example tomorrow.
    """
    import tensorflow_data_validation as tfdv
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import statistics_pb2

    stats_file = _statistics_file(stats)
    try:
        statistics = statistics_pb2.DatasetFeatureStatisticsList.FromString(stats_file.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError for corrupt bytes
        raise BadInputError(f"{stats_file}: not a DatasetFeatureStatisticsList ({exc})") from None
    if not statistics.datasets:
        raise BadInputError(f"{stats_file}: statistics hold no dataset")
    schema = tfdv.infer_schema(statistics)
    _drop_identifier_domains(schema, statistics.datasets[0])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write(out, _DRAFT_HEADER.format(stats=stats_file) + text_format.MessageToString(schema))
    features = [feature.name for feature in schema.feature]
    log.info("Schema: wrote a draft with %d features to %s", len(features), out)
    return {"features": features, "path": str(out)}


def _drop_identifier_domains(schema: Any, dataset: Any) -> None:
    identifiers = set()
    for feature in dataset.features:
        if feature.HasField("string_stats"):
            common = feature.string_stats.common_stats
            if common.num_non_missing > 1 and feature.string_stats.unique == common.tot_num_values:
                identifiers.add(".".join(feature.path.step) or feature.name)
    for feature in schema.feature:
        if feature.name in identifiers and feature.WhichOneof("domain_info") == "domain":
            domain = feature.domain
            feature.ClearField("domain")
            kept = [d for d in schema.string_domain if d.name != domain]
            del schema.string_domain[:]
            schema.string_domain.extend(kept)
