"""The raw data format: `tf.train.Example{image, mask, id}` in TFRecord span folders.

Writers (demo data, importers, tests) and readers (ExampleGen) share these functions so that
the format is defined in one place. A span folder is written under a hidden temporary name that no
input pattern matches and renamed into place when complete.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from segpipe.components.core.artifacts import ID_KEY, IMAGE_KEY, MASK_KEY, atomic_dir, atomic_write
from segpipe.components.core.errors import BadInputError

LABELS_FILE = "labels.json"
# Image files segpipe reads from folders (predict, importers); PIL decodes all of them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPAN_DIR = "span-{span}"


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an HxW (mask) or HxWx3 (image) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG bytes with PIL, keeping its mode (RGB -> HxWx3, L -> HxW)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


def encode_example(example_id: str, image: bytes, mask: bytes) -> bytes:
    """Serialize one raw example."""
    from tensorflow.core.example import example_pb2, feature_pb2

    def _bytes(value: bytes) -> feature_pb2.Feature:
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value]))

    example = example_pb2.Example(
        features=feature_pb2.Features(
            feature={
                IMAGE_KEY: _bytes(image),
                MASK_KEY: _bytes(mask),
                ID_KEY: _bytes(example_id.encode("utf-8")),
            }
        )
    )
    return example.SerializeToString()


class NotAnExampleError(ValueError):
    """The bytes are not a tf.train.Example at all (a bad record, not a bad example)."""


class MissingFeatureError(ValueError):
    """A required feature is missing or is not exactly one bytes value.

    `example_id` is the example's id when that much could be read (None when the id is the problem).
    """

    def __init__(self, message: str, example_id: str | None) -> None:
        super().__init__(message)
        self.example_id = example_id


def parse_proto(serialized: bytes) -> Any:
    """The `tf.train.Example` message; NotAnExampleError when the bytes are not one."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    try:
        example.ParseFromString(serialized)
    except DecodeError as exc:
        raise NotAnExampleError(f"not a tf.train.Example ({exc})") from None
    if not example.features.feature:
        raise NotAnExampleError("not a tf.train.Example (no features)")
    return example


def _single_bytes(example: Any, key: str, example_id: str | None) -> bytes:
    features = example.features.feature
    if key not in features:
        raise MissingFeatureError(f"missing feature '{key}'", example_id)
    values = features[key].bytes_list.value
    if len(values) != 1:
        raise MissingFeatureError(f"feature '{key}' must hold exactly one bytes value, has {len(values)}", example_id)
    return values[0]


def parse_example(serialized: bytes) -> tuple[str, bytes, bytes]:
    """(id, image bytes, mask bytes): the one parser of the raw format (ExampleGen, Evaluator, tests).

    Raises NotAnExampleError or MissingFeatureError (both ValueError) naming what is wrong.
    """
    example = parse_proto(serialized)
    example_id = _single_bytes(example, ID_KEY, None).decode("utf-8", errors="replace")
    return example_id, _single_bytes(example, IMAGE_KEY, example_id), _single_bytes(example, MASK_KEY, example_id)


def span_dir(data_root: str | os.PathLike, span: int) -> Path:
    return Path(data_root) / SPAN_DIR.format(span=span)


def list_spans(data_root: str | os.PathLike) -> list[int]:
    """Span numbers of the complete `span-<N>` folders under `data_root`, sorted numerically."""
    root = Path(data_root)
    if not root.is_dir():
        return []
    prefix = SPAN_DIR.format(span="")
    names = (p.name[len(prefix):] for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    return sorted(int(n) for n in names if n.isdigit() and str(int(n)) == n)


def next_span(data_root: str | os.PathLike) -> int:
    """The span number a new batch of data gets by default: one past the latest (1 when none)."""
    spans = list_spans(data_root)
    return spans[-1] + 1 if spans else 1


def write_span(
    data_root: str | os.PathLike,
    span: int,
    records: Iterable[bytes],
    *,
    num_shards: int = 1,
    compress: bool = True,
) -> tuple[Path, int]:
    """Write serialized examples as `<data_root>/span-<span>/part-XXXXX-of-YYYYY.tfrecord[.gz]`.

    The folder appears only when every shard is complete; an existing span is never overwritten.
    Returns (span folder, number of records).
    """
    import tensorflow as tf

    final = span_dir(data_root, span)
    if final.exists():
        raise BadInputError(f"{final}: span {span} already exists; spans are immutable, use a new span number")
    suffix = ".tfrecord.gz" if compress else ".tfrecord"
    options = tf.io.TFRecordOptions(compression_type="GZIP" if compress else "")
    count = 0
    with atomic_dir(final) as tmp:
        writers = [
            tf.io.TFRecordWriter(str(tmp / f"part-{i:05d}-of-{num_shards:05d}{suffix}"), options)
            for i in range(num_shards)
        ]
        for record in records:
            writers[count % num_shards].write(record)
            count += 1
        for writer in writers:
            writer.close()
    return final, count


def write_labels(data_root: str | os.PathLike, labels: Mapping[int, str]) -> Path:
    payload = json.dumps({str(k): v for k, v in sorted(labels.items())}, indent=2) + "\n"
    return atomic_write(Path(data_root) / LABELS_FILE, payload)


def read_labels(data_root: str | os.PathLike) -> dict[int, str]:
    """Class id -> name from `labels.json`; BadInputError names the file when it is malformed."""
    path = Path(data_root) / LABELS_FILE
    try:
        raw = json.loads(path.read_text())
        return {int(k): str(v) for k, v in raw.items()}
    except FileNotFoundError:
        raise BadInputError(f"{path}: labels file not found") from None
    except (ValueError, AttributeError) as exc:
        raise BadInputError(f"{path}: expected a JSON object of class id -> name ({exc})") from None
