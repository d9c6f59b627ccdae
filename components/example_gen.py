"""ExampleGen: TFRecord spans -> deterministic train/eval/test splits plus a quarantine, on Beam.

Reading: the input pattern's `{SPAN}` placeholder selects span folders (the latest by default, a
given span, or the last K spans, compared as integers). Each file is read record by record with
its own TFRecord reader, so that a problem names the file and the record index: a truncated or
corrupted record (bad CRC), a file that is not TFRecord at all, a record that is not a
`tf.train.Example`, or an id seen twice. By default any of these fails the step and nothing is
published; with `skip_bad_records` they are skipped, logged and counted in the metadata.

Checking: ExampleGen touches every record anyway, so it decodes each image and mask once and
sends an example that would break training (wrong channels, sizes, mask values, too small) to
`Split-quarantine` with a `reason` feature instead of a training split. The validator gates on it.

Splitting: a record's split comes from SHA-256 of its id alone, so an example never moves between
splits when more data is ingested and the split is the same on every machine and process.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

from segpipe.components.core import artifacts
from segpipe.components.core.beam import beam_pipeline, worker_path
from segpipe.components.core.data_format import (
    MissingFeatureError,
    NotAnExampleError,
    display_id,
    gzip_record_options,
    open_image,
    parse_example_raw,
    parse_proto,
)
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

PRODUCER = "ExampleGen"
SPAN_PLACEHOLDER = "{SPAN}"
SKIPPED_FILE = "skipped_records.jsonl"  # in the Examples artifact when skip_bad_records skipped some
MAX_NAMED = 10  # bad records named in an error message or in the log

# Quarantine reason kinds: the `reason` feature reads "<kind>: <detail>".
MISSING_FEATURE = "missing_feature"
IMAGE_UNDECODABLE = "image_undecodable"
IMAGE_CHANNELS = "image_channels"
MASK_UNDECODABLE = "mask_undecodable"
MASK_CHANNELS = "mask_channels"
MASK_VALUES = "mask_values"
SIZE_MISMATCH = "size_mismatch"
TOO_SMALL = "too_small"

_IMAGE_FORMATS = ("PNG", "JPEG")
_GZIP_MAGIC = b"\x1f\x8b"
_BAD = "bad"
_SPAN_TOKEN = "SEGPIPESPANTOKEN"


# ------------------------------------------------------------------ spans


def _absolute(pattern: str) -> str:
    return pattern if "://" in pattern else os.path.abspath(pattern)


def _match_files(glob_pattern: str) -> list[str]:
    """Files matching a glob (local or any Beam filesystem such as gs://), sorted."""
    from apache_beam.io.filesystems import FileSystems

    matched = FileSystems.match([glob_pattern])[0].metadata_list
    paths = (m.path for m in matched)
    return sorted(p for p in paths if "://" in p or os.path.isfile(p))


def _files_by_span(input_pattern: str) -> dict[int, list[str]]:
    """Every span number that has matching files, with its files; hidden temp folders never match."""
    from apache_beam.io.filesystem import FileSystem

    pattern = _absolute(input_pattern)
    if SPAN_PLACEHOLDER not in pattern:
        raise BadInputError(f"{input_pattern}: input pattern has no {SPAN_PLACEHOLDER} placeholder")
    regex = FileSystem.translate_pattern(pattern.replace(SPAN_PLACEHOLDER, _SPAN_TOKEN))
    regex = re.compile(regex.replace(_SPAN_TOKEN, r"(?P<span>\d+)"))
    spans: dict[int, list[str]] = {}
    for path in _match_files(pattern.replace(SPAN_PLACEHOLDER, "*")):
        found = regex.match(path)
        if found:
            spans.setdefault(int(found.group("span")), []).append(path)
    return spans


def resolve_spans(input_pattern: str, span: int | None, num_spans: int) -> list[int]:
    """The spans to read, ascending: the `num_spans` latest spans up to `span` (default: the latest).

    Span numbers compare as integers (span-10 is after span-9). BadInputError when no span
    matches, the given span has no files, or fewer than `num_spans` spans exist up to it.
    """
    if num_spans < 1:
        raise BadInputError(f"num_spans: must be at least 1, got {num_spans}")
    available = sorted(_files_by_span(input_pattern))
    if not available:
        raise BadInputError(f"{input_pattern}: no files match the input pattern")
    end = available[-1] if span is None else span
    if end not in available:
        raise BadInputError(
            f"{input_pattern}: no files for span {end} (spans with files: {', '.join(map(str, available))})"
        )
    chosen = [s for s in available if s <= end][-num_spans:]
    if len(chosen) < num_spans:
        raise BadInputError(
            f"{input_pattern}: num_spans={num_spans} but only {len(chosen)} span(s) up to span {end} have files"
        )
    return chosen


def span_files(input_pattern: str, spans: Sequence[int]) -> list[str]:
    """The files of the given spans, in span order."""
    by_span = _files_by_span(input_pattern)
    return [path for s in spans for path in by_span.get(s, [])]


# ------------------------------------------------------------------ reading


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (google-crc32c ships with tfx-bsl and Beam's GCP extra)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _open_records(path: str) -> BinaryIO:
    """A byte stream of the file's TFRecords; GZIP is detected from the content, not the name."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    magic = raw.read(2)
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if magic == _GZIP_MAGIC else raw


def iter_records(path: str) -> Iterator[tuple[int, bytes | None, str | None]]:
    """`(index, record, None)` per good record, `(index, None, problem)` per bad one.

    A bad data checksum costs one record; a bad length checksum, a truncated record or a broken
    GZIP stream ends the file, since the reader cannot find the next record boundary.
    """
    index = 0
    with _open_records(path) as stream:
        while True:
            try:
                header = stream.read(12)
                if not header:
                    return
                if len(header) < 12:
                    yield index, None, "truncated record (incomplete length header)"
                    return
                length, length_crc = struct.unpack("<QI", header)
                if _masked_crc32c(header[:8]) != length_crc:
                    what = "not a TFRecord file" if index == 0 else "corrupted record"
                    yield index, None, f"{what} (bad length checksum)"
                    return
                payload = stream.read(length)
                footer = stream.read(4)
            except (OSError, EOFError, zlib.error) as exc:
                yield index, None, f"unreadable GZIP stream ({exc})"
                return
            if len(payload) < length or len(footer) < 4:
                yield index, None, f"truncated record ({len(payload)} of {length} bytes)"
                return
            if _masked_crc32c(payload) != struct.unpack("<I", footer)[0]:
                yield index, None, "corrupted record (bad data checksum)"
            else:
                yield index, payload, None
            index += 1


# ------------------------------------------------------------------ checking


def _open_image(data: bytes, key: str, undecodable: str) -> Any:
    """A fully decoded PIL image, or the quarantine reason (also for one above MAX_IMAGE_PIXELS)."""
    try:
        img = open_image(data)
        img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"{undecodable}: {key} does not decode ({type(exc).__name__}: {exc})"
    if img.format not in _IMAGE_FORMATS:
        return f"{undecodable}: {key} format {img.format} is not PNG or JPEG"
    return img


def _check_content(image_bytes: bytes, mask_bytes: bytes, num_classes: int, min_image_size: int) -> str | None:
    """The quarantine reason for an example's pixels, or None when it is fit for training."""
    import numpy as np

    image = _open_image(image_bytes, artifacts.IMAGE_KEY, IMAGE_UNDECODABLE)
    if isinstance(image, str):
        return image
    if image.mode != "RGB":
        return f"{IMAGE_CHANNELS}: image mode {image.mode} has {len(image.getbands())} channel(s), expected 3 (RGB)"
    mask = _open_image(mask_bytes, artifacts.MASK_KEY, MASK_UNDECODABLE)
    if isinstance(mask, str):
        return mask
    if mask.mode != "L":
        return f"{MASK_CHANNELS}: mask mode {mask.mode} has {len(mask.getbands())} channel(s), expected 1 (8-bit L)"
    if image.size != mask.size:
        return f"{SIZE_MISMATCH}: image {image.size[1]}x{image.size[0]} but mask {mask.size[1]}x{mask.size[0]}"
    if min(image.size) < min_image_size:
        return f"{TOO_SMALL}: {image.size[1]}x{image.size[0]} is below the minimum side {min_image_size}"
    values = np.flatnonzero(np.bincount(np.asarray(mask).ravel(), minlength=256))  # one pass; np.unique sorts
    bad = [int(v) for v in values if v >= num_classes and v != artifacts.IGNORE_LABEL]
    if bad:
        return f"{MASK_VALUES}: mask values {bad} are outside 0..{num_classes - 1} and {artifacts.IGNORE_LABEL}"
    return None


def check_example(serialized: bytes, *, num_classes: int, min_image_size: int) -> tuple[bytes | None, str | None]:
    """`(raw id, reason)`: reason is None for an example fit for training, else "<kind>: <detail>".

    The id's raw bytes are its identity (two ids that differ only in invalid UTF-8 stay apart).
    Raises NotAnExampleError when the bytes are not a tf.train.Example at all.
    """
    try:
        example_id, image, mask = parse_example_raw(serialized)
    except MissingFeatureError as exc:
        return exc.raw_id, f"{MISSING_FEATURE}: {exc}"
    return example_id, _check_content(image, mask, num_classes, min_image_size)


def _with_reason(serialized: bytes, reason: str) -> bytes:
    example = parse_proto(serialized)
    example.features.feature[artifacts.REASON_KEY].bytes_list.value[:] = [reason.encode("utf-8")]
    return example.SerializeToString()


# ------------------------------------------------------------------ splitting


def split_order(splits: Mapping[str, int]) -> list[tuple[str, int]]:
    """Validated (name, weight) pairs in a canonical order (train, eval, test, then by name)."""
    if not splits:
        raise BadInputError("splits: at least one split is required")
    for name, weight in splits.items():
        if not name or name == artifacts.QUARANTINE:
            raise BadInputError(f"splits: {name!r} is not a usable split name")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise BadInputError(f"splits.{name}: weight must be a non-negative integer, got {weight!r}")
    if sum(splits.values()) == 0:
        raise BadInputError("splits: weights sum to 0")
    rank = {name: i for i, name in enumerate(artifacts.SPLITS)}
    return sorted(splits.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def assign_split(example_id: str | bytes, splits: Sequence[tuple[str, int]]) -> str:
    """The split of `example_id`: SHA-256 of the id's bytes (text: UTF-8) into sum(weights) buckets
    (never Python's hash())."""
    total = sum(weight for _, weight in splits)
    raw = example_id if isinstance(example_id, bytes) else example_id.encode("utf-8")
    bucket = int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") % total
    for name, weight in splits:
        if bucket < weight:
            return name
        bucket -= weight
    raise AssertionError("unreachable: bucket below the total weight")


# ------------------------------------------------------------------ Beam steps


def _read_file(
    path: str, *, num_classes: int, min_image_size: int, splits: Sequence[tuple[str, int]]
) -> Iterator[Any]:
    """Kept records `(id, split, payload, file, index, reason kind)`; bad ones as a tagged problem."""
    from apache_beam import pvalue

    for index, record, problem in iter_records(path):
        if problem is None:
            try:
                example_id, reason = check_example(record, num_classes=num_classes, min_image_size=min_image_size)
            except NotAnExampleError as exc:
                problem = str(exc)
        if problem is not None:
            yield pvalue.TaggedOutput(_BAD, {"file": path, "record": index, "problem": problem})
        elif reason is not None:
            if example_id is None:
                reason = f"{reason} ({path} record {index})"
            kind = reason.split(":", 1)[0]
            yield example_id, artifacts.QUARANTINE, _with_reason(record, reason), path, index, kind
        else:
            yield example_id, assign_split(example_id, splits), record, path, index, None


def _id_source(kept: tuple) -> list[tuple[bytes, tuple[str, int]]]:
    example_id, _, _, path, index, _ = kept
    return [] if example_id is None else [(example_id, (path, index))]


def _duplicates(item: tuple[str, Any]) -> Iterator[dict[str, Any]]:
    """Every occurrence of an id after its first (by file and record index) is a bad record."""
    example_id, sources = item
    first, *others = sorted(sources)
    for path, index in others:
        problem = f"duplicate id {display_id(example_id)!r} (first seen in {first[0]} record {first[1]})"
        yield {"file": path, "record": index, "problem": problem}


def _drop_key(problem: dict[str, Any]) -> tuple[tuple[str, int], bool]:
    return (problem["file"], problem["record"]), True


def _not_dropped(kept: tuple, dropped: Mapping[tuple[str, int], bool]) -> bool:
    return (kept[3], kept[4]) not in dropped


def _shard_writer(out_dir: str) -> Any:
    """A DoFn writing each bundle's records to one hidden GZIP shard per split.

    It emits one manifest entry per shard it completed; only shards named in the committed
    manifest are kept (a retried bundle's partial shard is not), then renamed to `data-*`.
    This costs one Beam sink in all instead of one per split.
    """
    import uuid

    import apache_beam as beam
    from apache_beam.transforms.window import GlobalWindows

    class WriteShards(beam.DoFn):
        def start_bundle(self) -> None:
            self._open: dict[str, Any] = {}
            self._stats: dict[str, dict[str, Any]] = {}

        def process(self, kept: tuple) -> None:
            import tensorflow as tf

            split, payload, kind = kept[1], kept[2], kept[5]
            if split not in self._open:
                path = str(artifacts.split_dir(out_dir, split) / f".shard-{uuid.uuid4().hex}.tfrecord.gz")
                tf.io.gfile.makedirs(os.path.dirname(path))
                self._open[split] = tf.io.TFRecordWriter(path, gzip_record_options())
                self._stats[split] = {"split": split, "path": path, "count": 0, "kinds": {}}
            self._open[split].write(payload)
            stats = self._stats[split]
            stats["count"] += 1
            if kind:
                stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1

        def finish_bundle(self) -> Iterator[Any]:
            for writer in self._open.values():
                writer.close()
            for stats in self._stats.values():
                yield GlobalWindows.windowed_value({"shard": stats})

    return WriteShards()


def _as_problem(problem: dict[str, Any]) -> dict[str, Any]:
    return {"problem": problem}


def _build_pipeline(
    p: Any, files: list[str], out_dir: Path, manifest_prefix: str, *, read_kwargs: dict, skip: bool
) -> None:
    import apache_beam as beam

    read = (
        p
        | "Files" >> beam.Create(files)
        | "Distribute" >> beam.Reshuffle()
        | "ReadAndCheck" >> beam.FlatMap(_read_file, **read_kwargs).with_outputs(_BAD, main="kept")
    )
    kept = read.kept
    duplicates = (
        kept
        | "IdSources" >> beam.FlatMap(_id_source)
        | "GroupIds" >> beam.GroupByKey()
        | "Duplicates" >> beam.FlatMap(_duplicates)
    )
    if skip:
        dropped = beam.pvalue.AsDict(duplicates | "DropKeys" >> beam.Map(_drop_key))
        kept = kept | "DropDuplicates" >> beam.Filter(_not_dropped, dropped)
    shards = kept | "WriteShards" >> beam.ParDo(_shard_writer(str(out_dir)))
    problems = (read[_BAD], duplicates) | "Problems" >> beam.Flatten() | "AsProblem" >> beam.Map(_as_problem)
    _ = (
        (shards, problems)
        | "Manifest" >> beam.Flatten()
        | "ManifestJson" >> beam.Map(json.dumps, sort_keys=True)
        | "WriteManifest" >> beam.io.WriteToText(manifest_prefix, file_name_suffix=".jsonl")
    )


def _read_manifest(work_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(shards, problems) from the committed manifest."""
    shards, problems = [], []
    for path in sorted(work_dir.glob("manifest*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            (shards if "shard" in entry else problems).append(entry.get("shard") or entry.get("problem"))
    problems.sort(key=lambda p: (p["file"], p["record"]))
    return shards, problems


def _finalize_shards(out_dir: Path, names: Sequence[str], shards: list[dict[str, Any]]) -> None:
    """Rename committed shards to `data-NNNNN-of-MMMMM.tfrecord.gz`; drop uncommitted ones.

    A split without records gets one empty shard, so every split folder reads the same way.
    """
    import tensorflow as tf

    for name in names:
        folder = artifacts.split_dir(out_dir, name)
        folder.mkdir(parents=True, exist_ok=True)
        committed = sorted(s["path"] for s in shards if s["split"] == name)
        for leftover in set(map(str, folder.glob(".shard-*"))) - set(committed):
            os.remove(leftover)
        if not committed:
            empty = folder / ".shard-empty.tfrecord.gz"
            tf.io.TFRecordWriter(str(empty), gzip_record_options()).close()
            committed = [str(empty)]
        for i, path in enumerate(committed):
            os.replace(path, folder / f"data-{i:05d}-of-{len(committed):05d}.tfrecord.gz")


def _describe(problems: list[dict[str, Any]]) -> str:
    lines = [f"{p['file']} record {p['record']}: {p['problem']}" for p in problems[:MAX_NAMED]]
    more = f" (and {len(problems) - MAX_NAMED} more)" if len(problems) > MAX_NAMED else ""
    return "; ".join(lines) + more


def _problem_kind(problem: str) -> str:
    return problem.split(" (", 1)[0]


# ------------------------------------------------------------------ the component


def run_example_gen(
    input_pattern: str,
    examples_uri: str,
    *,
    span: int | None,
    num_spans: int,
    splits: dict[str, int],
    num_classes: int,
    min_image_size: int,
    skip_bad_records: bool,
    beam_args: list[str],
) -> dict:
    """Read the selected spans, check every example and publish the split Examples artifact.

    Returns {"spans": [...], "counts": {split: n, "quarantine": n, "skipped": n}}. Raises
    BadInputError naming the file and record index of unreadable input (nothing is published)
    unless `skip_bad_records`, which skips, logs and counts such records instead.
    """
    # Workers write the shards themselves; a relative URI would resolve in each worker's own directory.
    examples_uri = worker_path(examples_uri)
    order = split_order(splits)
    spans = resolve_spans(input_pattern, span, num_spans)
    files = span_files(input_pattern, spans)
    names = [name for name, _ in order] + [artifacts.QUARANTINE]
    parameters = {
        "input_pattern": input_pattern, "span": span, "num_spans": num_spans, "splits": dict(order),
        "num_classes": num_classes, "min_image_size": min_image_size, "skip_bad_records": skip_bad_records,
    }
    log.info("ExampleGen: reading span(s) %s: %d file(s) matching %s", spans, len(files), input_pattern)
    with artifacts.publish(examples_uri, artifacts.EXAMPLES, producer=PRODUCER, parameters=parameters,
                           inputs=tuple(files)) as (tmp, info):
        work_dir = tmp / "_work"
        read_kwargs = {"num_classes": num_classes, "min_image_size": min_image_size, "splits": order}
        with beam_pipeline(beam_args) as p:
            _build_pipeline(p, files, tmp, str(work_dir / "manifest"), read_kwargs=read_kwargs, skip=skip_bad_records)
        shards, problems = _read_manifest(work_dir)
        shutil.rmtree(work_dir)
        if problems and not skip_bad_records:
            raise BadInputError(f"{len(problems)} bad record(s), nothing published: {_describe(problems)}")
        if problems:
            _record_skipped(tmp, problems)
        _finalize_shards(tmp, names, shards)
        counts = {name: sum(s["count"] for s in shards if s["split"] == name) for name in names}
        counts["skipped"] = len(problems)
        if sum(counts[name] for name in names) == 0:
            raise BadInputError(f"{input_pattern}: span(s) {spans} hold no readable examples")
        info["counts"] = counts
        info["extra"] = {
            "spans": spans,
            "files": files,
            "quarantine_reasons": dict(sum((Counter(s["kinds"]) for s in shards), Counter())),
            "skipped_reasons": dict(Counter(_problem_kind(p["problem"]) for p in problems)),
        }
    for name in names[:-1]:
        if counts[name] == 0:
            log.warning("ExampleGen: split %s is empty (%d examples in all)", name, sum(counts.values()))
    log.info("ExampleGen: published %s: %s", examples_uri, counts)
    return {"spans": spans, "counts": counts}


def _record_skipped(out_dir: Path, problems: list[dict[str, Any]]) -> None:
    """Never silent: log each skipped record (the first few) and keep the full list in the artifact."""
    for problem in problems[:MAX_NAMED]:
        log.warning("ExampleGen: skipped %s record %s: %s", problem["file"], problem["record"], problem["problem"])
    log.warning("ExampleGen: skipped %d bad record(s); list in %s", len(problems), SKIPPED_FILE)
    with open(out_dir / SKIPPED_FILE, "w") as fh:
        fh.writelines(json.dumps(p, sort_keys=True) + "\n" for p in problems)
