"""The raw data format: `tf.train.Example{image, mask, id}` in TFRecord span folders.

Writers (demo data, importers, tests) and readers (ExampleGen) share these functions so that
the format is defined in one place. A span folder is written under a hidden temporary name that no
input pattern matches and renamed into place when complete.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from segpipe.components.core.artifacts import ID_KEY, IMAGE_KEY, MASK_KEY, atomic_dir, atomic_write
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
# Image files segpipe reads from folders (predict, importers); PIL decodes all of them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPAN_DIR = "span-{span}"
# The largest image (width x height) any decoder segpipe calls accepts. A decompression bomb (a few
# KB of PNG declaring 50000 x 50000 pixels) is refused from its header, before a byte is decoded.
MAX_IMAGE_PIXELS = 100_000_000
# The largest image file read from disk: an uncompressed RGBA image at the pixel cap. Bounds what a
# reader loads into memory before PIL sees the header (a 10 GB file named .png, /dev/zero).
MAX_IMAGE_FILE_BYTES = 4 * MAX_IMAGE_PIXELS


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an HxW (mask) or HxWx3 (image) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class ImageTooLargeError(ValueError):
    """An image declares more than MAX_IMAGE_PIXELS pixels (checked before decoding)."""


def _too_large(pixels: int, size: str = "") -> str:
    return (f"{size}{pixels / 1e6:.0f} MP is above the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} MP "
            "(a decompression bomb or an unusually large image)")


def check_image_size(width: int, height: int) -> None:
    """ImageTooLargeError when width x height is above MAX_IMAGE_PIXELS."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(_too_large(width * height, f"{width}x{height} = "))


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded PIL image whose size passed `check_image_size` (only the header is read).

    Every PIL decode in segpipe starts here. PIL's own guard reads the process-wide
    `Image.MAX_IMAGE_PIXELS` and only warns below twice that; here it is set to segpipe's cap (so
    any PIL call in the process agrees), its warning is an error, and the size is checked again
    explicitly whatever that global says.
    """
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))  # "Image size (N pixels) exceeds limit ..."
            raise ImageTooLargeError(_too_large(int(found.group(1))) if found else str(exc)) from None
    check_image_size(img.width, img.height)
    return img


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file; ImageTooLargeError above MAX_IMAGE_FILE_BYTES.

    Only regular files are read: a device or FIFO (/dev/zero, a named pipe) would never end.
    Raises FileNotFoundError, or ValueError naming what the path is instead.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if not path.is_file():
        raise ValueError("not a regular file")
    with open(path, "rb") as fh:
        data = fh.read(MAX_IMAGE_FILE_BYTES + 1)
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise ImageTooLargeError(f"file larger than {MAX_IMAGE_FILE_BYTES / 1e6:.0f} MB")
    return data


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG bytes with PIL, keeping its mode (RGB -> HxWx3, L -> HxW).

    Raises ImageTooLargeError (a ValueError) above MAX_IMAGE_PIXELS.
    """
    with open_image(data) as img:
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


def display_id(raw_id: bytes) -> str:
    """An id's bytes as text: UTF-8, each invalid byte shown as `\\xNN`.

    Never U+FFFD: replacing would show two different ids as the same one. The raw bytes stay the
    id's identity (duplicates, splits); this text is only for messages and reports.
    """
    return raw_id.decode("utf-8", errors="backslashreplace")


class MissingFeatureError(ValueError):
    """A required feature is missing or is not exactly one bytes value.

    `raw_id` is the example's id when that much could be read (None when the id is the problem);
    `example_id` is its `display_id`.
    """

    def __init__(self, message: str, raw_id: bytes | None) -> None:
        super().__init__(message)
        self.raw_id = raw_id
        self.example_id = None if raw_id is None else display_id(raw_id)


def parse_proto(serialized: bytes) -> Any:
    """The `tf.train.Example` message; NotAnExampleError when the bytes are not one.

    A record with fields an Example does not have is refused rather than parsed with those fields
    dropped: a `tf.train.SequenceExample` parses as an Example (its context becomes the features)
    and would silently lose its `feature_lists`.
    """
    from google.protobuf.message import DecodeError
    from google.protobuf.unknown_fields import UnknownFieldSet
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    try:
        example.ParseFromString(serialized)
    except DecodeError as exc:
        raise NotAnExampleError(f"not a tf.train.Example ({exc})") from None
    unknown = sorted({field.field_number for field in UnknownFieldSet(example)})
    if unknown:
        hint = " (a tf.train.SequenceExample? field 2 is its feature_lists)" if 2 in unknown else ""
        raise NotAnExampleError(
            f"not a tf.train.Example: it has field(s) {', '.join(map(str, unknown))} an Example does not have{hint}"
        )
    if not example.features.feature:
        raise NotAnExampleError("not a tf.train.Example (no features)")
    return example


def _single_bytes(example: Any, key: str, raw_id: bytes | None) -> bytes:
    features = example.features.feature
    if key not in features:
        raise MissingFeatureError(f"missing feature '{key}'", raw_id)
    values = features[key].bytes_list.value
    if len(values) != 1:
        raise MissingFeatureError(f"feature '{key}' must hold exactly one bytes value, has {len(values)}", raw_id)
    return values[0]


def parse_example_raw(serialized: bytes) -> tuple[bytes, bytes, bytes]:
    """(id bytes, image bytes, mask bytes): the one parser of the raw format.

    The id's raw bytes are its identity; `parse_example` gives the id as text for display.
    Raises NotAnExampleError or MissingFeatureError (both ValueError) naming what is wrong.
    """
    example = parse_proto(serialized)
    raw_id = _single_bytes(example, ID_KEY, None)
    return raw_id, _single_bytes(example, IMAGE_KEY, raw_id), _single_bytes(example, MASK_KEY, raw_id)


def parse_example(serialized: bytes) -> tuple[str, bytes, bytes]:
    """(id as `display_id` text, image bytes, mask bytes) (Evaluator, tools, tests)."""
    raw_id, image, mask = parse_example_raw(serialized)
    return display_id(raw_id), image, mask


def parse_image_raw(serialized: bytes) -> tuple[bytes, bytes]:
    """(id bytes, image bytes) of a raw example whose mask may be absent: what inference reads.

    The same rules as `parse_example_raw` for the id and the image; the mask is not looked at.
    """
    example = parse_proto(serialized)
    raw_id = _single_bytes(example, ID_KEY, None)
    return raw_id, _single_bytes(example, IMAGE_KEY, raw_id)


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


def gzip_record_options() -> Any:
    """TFRecord options for segpipe's `.tfrecord.gz` files of encoded images: GZIP with stored
    (level 0) blocks. Every payload is PNG or JPEG bytes, which deflate does not shrink (on the demo
    data it saved 0.02% of the bytes while writing took 12 times as long, about 1.2 s per 1,000
    images); the files stay GZIP, so any reader given `compression_type="GZIP"` reads them."""
    import tensorflow as tf

    return tf.io.TFRecordOptions(compression_type="GZIP", compression_level=0)


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
    options = gzip_record_options() if compress else tf.io.TFRecordOptions(compression_type="")
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


def find_labels(files: Sequence[str]) -> Path | None:
    """The labels.json of the data `files` (raw span files or an Examples split's) come from, or None.

    Raw span files (`<data root>/span-<n>/...`) have it in their folder or the one above; split
    files of an Examples artifact lead to the raw files its metadata records.
    """
    from segpipe.components.core import artifacts

    sources = list(files[:1])
    artifact = Path(files[0]).parent.parent if files else None
    if artifact is not None and artifacts.is_published(artifact):
        info = artifacts.read_info(artifact)
        if info.type == artifacts.EXAMPLES:
            sources = list(info.extra.get("files") or [])[:1]
    for source in sources:
        for folder in (Path(source).parent, Path(source).parent.parent):
            if (folder / LABELS_FILE).is_file():
                return folder / LABELS_FILE
    return None


def class_names(files: Sequence[str], num_classes: int) -> list[str | None]:
    """labels.json's name for each class id 0..K-1 (None where it has none, or there is no file)."""
    path = find_labels(files)
    labels: dict[int, str] = {}
    if path is not None:
        try:
            labels = read_labels(path.parent)
        except BadInputError as exc:  # names only make messages friendlier; ids still say it all
            log.warning("class names: %s", exc)
    return [labels.get(k) for k in range(num_classes)]


def class_label(k: int, names: Sequence[str | None]) -> str:
    """`class 2 'tumour'` with a name from labels.json, else `class 2`."""
    name = names[k] if k < len(names) else None
    return f"class {k} '{name}'" if name else f"class {k}"
