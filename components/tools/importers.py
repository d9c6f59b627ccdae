"""Import labelled images into segpipe's raw format: `segpipe import oxford-pets|folders`.

Both importers pair an image with a mask by file stem, check every pair, and write the good ones
as one new span (`write_span`, atomic) plus `labels.json`. A bad input never stops the import: it
is logged with its path and reason, skipped, and counted in the report; the CLI exits 2 when
anything was skipped unless `--skip-bad` is given.

What is converted rather than rejected (each conversion is logged with its path):
- images that are not 8-bit RGB (grayscale, palette, CMYK, 16-bit, or with alpha; alpha is
  composited onto black) are converted to RGB, and a JPEG with an EXIF orientation is rotated
  upright; such images are stored as lossless PNG. Other RGB PNG/JPEG files keep their bytes.
- masks: palette PNGs give their palette indices, 16-bit PNGs their values, and a mask holding
  only {0, 255} (or {0, 65535}) is read as binary and mapped to {0, 1}. Masks are stored as PNG.

What is skipped: unreadable, truncated or non-image files; a missing mask (or image); image and
mask of different size; JPEG (lossy) or multi-channel colour masks; class ids above 254; files
whose real path lies outside the input folder (`..` or symlinks); two files with the same stem.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segpipe.components.core.artifacts import IGNORE_LABEL
from segpipe.components.core.data_format import (
    IMAGE_SUFFIXES,
    LABELS_FILE,
    ImageTooLargeError,
    encode_example,
    encode_png,
    next_span,
    open_image,
    read_image_file,
    span_dir,
    write_labels,
    write_span,
)
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

MASK_SUFFIXES = IMAGE_SUFFIXES  # JPEG masks are listed so that they are reported, then rejected
OXFORD_LABELS = {0: "background", 1: "pet"}
OXFORD_PET, OXFORD_BACKGROUND, OXFORD_BORDER = 1, 2, 3
BORDER_VALUES = {"foreground": 1, "background": 0, "ignore": IGNORE_LABEL}
EXIF_ORIENTATION = 0x0112


class SkipInput(Exception):
    """One input is bad: its path, the kind of problem (counted in the summary) and details."""

    def __init__(self, path: Path, kind: str, detail: str = "") -> None:
        self.path = path
        self.kind = kind
        self.reason = f"{kind} ({detail})" if detail else kind
        super().__init__(f"{path}: {self.reason}")


@dataclass
class ImportReport:
    """What an import did: where, how many, what was converted and what was skipped (with why)."""

    span: int
    path: str
    imported: int = 0
    converted: int = 0
    labels: dict[int, str] = field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (path, kind, reason)

    def skip_counts(self) -> dict[str, int]:
        """Skipped inputs per kind of problem."""
        return dict(sorted(Counter(kind for _, kind, _ in self.skipped).items()))

    def summary(self) -> str:
        text = f"imported {self.imported} examples into {self.path} ({self.converted} converted to RGB)"
        if self.skipped:
            counts = ", ".join(f"{n} {kind}" for kind, n in self.skip_counts().items())
            text += f"; skipped {len(self.skipped)}: {counts}"
        return text

    def as_dict(self) -> dict:
        return {
            "span": self.span,
            "path": self.path,
            "imported": self.imported,
            "converted": self.converted,
            "skipped": len(self.skipped),
            "skip_counts": self.skip_counts(),
            "labels": {str(k): v for k, v in self.labels.items()},
        }


# ------------------------------------------------------------------ listing and pairing


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def list_by_stem(folder: Path, suffixes: frozenset[str], report: ImportReport) -> dict[str, Path | None]:
    """stem -> file for the image files directly in `folder`; None for a stem already skipped.

    Hidden files (e.g. macOS `._x.png` companions) and other suffixes are ignored; files whose
    real path escapes `folder` (a `..` or symlink) and stems that occur twice are skipped into
    `report`.
    """
    if not folder.is_dir():
        raise BadInputError(f"{folder}: input folder not found")
    found: dict[str, list[Path]] = {}
    by_stem: dict[str, Path | None] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes:
            log.debug("ignoring %s", path)
        elif not _inside(path, folder):
            _skip(report, SkipInput(path, "escapes the input folder", f"{folder}; resolves to {path.resolve()}"))
            by_stem[path.stem] = None
        else:
            found.setdefault(path.stem, []).append(path)
    for stem, paths in found.items():
        if len(paths) > 1:
            for path in paths:
                _skip(report, SkipInput(path, "duplicate stem", ", ".join(p.name for p in paths)))
        by_stem[stem] = paths[0] if len(paths) == 1 and stem not in by_stem else None
    return by_stem


def pair_by_stem(
    images: dict[str, Path | None], masks: dict[str, Path | None], report: ImportReport
) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) sorted by stem; unpaired files are skipped into `report`."""
    pairs = []
    for stem in sorted(images.keys() | masks.keys()):
        image, mask = images.get(stem), masks.get(stem)
        if (stem in images and image is None) or (stem in masks and mask is None):
            continue  # already reported
        if mask is None:
            _skip(report, SkipInput(images[stem], "missing mask"))
        elif image is None:
            _skip(report, SkipInput(mask, "missing image"))
        else:
            pairs.append((stem, image, mask))
    return pairs


def _skip(report: ImportReport, error: SkipInput) -> None:
    log.warning("skipped %s", error)
    report.skipped.append((str(error.path), error.kind, error.reason))


# ------------------------------------------------------------------ decoding


def _open(path: Path) -> tuple[bytes, Image.Image, str | None]:
    """(file bytes, fully decoded PIL image, PNG raw mode); SkipInput when unreadable or truncated."""
    try:
        data = read_image_file(path)
    except OSError as exc:
        raise SkipInput(path, "unreadable file", str(exc.strerror or exc)) from None
    except ImageTooLargeError as exc:
        raise SkipInput(path, "image too large", str(exc)) from None
    except ValueError as exc:
        raise SkipInput(path, "unreadable file", str(exc)) from None
    try:
        img = open_image(data)  # refuses more than MAX_IMAGE_PIXELS before decoding
        raw_mode = img.tile[0].args if img.format == "PNG" and img.tile else None
        img.load()
        if img.format == "PNG" and b"IEND" not in data[-1024:]:
            raise OSError("PNG ends before its IEND chunk")
    except UnidentifiedImageError:
        raise SkipInput(path, "not an image", "unknown format") from None
    except ImageTooLargeError as exc:
        raise SkipInput(path, "image too large", str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise SkipInput(path, "truncated or corrupt image", str(exc)) from None
    return data, img, raw_mode


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except (ValueError, TypeError, SyntaxError):  # a malformed EXIF block: ignore it
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited onto black, 16-bit scaled down, palette/CMYK/gray expanded."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img, dtype=np.int64)
        img = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        raise ValueError("floating-point images are not supported")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: Path) -> tuple[bytes, tuple[int, int], bool]:
    """(encoded RGB bytes, (width, height), converted?) of one image file.

    RGB JPEG and 8-bit RGB PNG files without an EXIF rotation keep their original bytes;
    anything else is converted (see the module docstring) and re-encoded as PNG.
    """
    data, img, raw_mode = _open(path)
    orientation = _orientation(img)
    keep = (
        img.mode == "RGB"
        and orientation == 1
        and (img.format == "JPEG" or (img.format == "PNG" and raw_mode == "RGB"))
    )
    if keep:
        return data, img.size, False
    try:
        upright = ImageOps.exif_transpose(img) if orientation != 1 else img
        rgb = _to_rgb(upright)
    except (OSError, ValueError) as exc:
        raise SkipInput(path, "unsupported image mode", f"{img.mode}: {exc}") from None
    log.info("converted %s (%s %s, EXIF orientation %d) to RGB PNG", path, img.format, img.mode, orientation)
    return encode_png(np.asarray(rgb)), rgb.size, True


def load_mask(path: Path) -> np.ndarray:
    """(H, W) class ids as uint8 from a one-channel, palette, 16-bit or gray-RGB mask file.

    Binary masks stored as {0, 255} or {0, 65535} come back as {0, 1}.
    """
    _, img, _ = _open(path)
    if img.format == "JPEG":
        raise SkipInput(path, "JPEG mask", "lossy compression corrupts class ids; use PNG")
    if _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("1", "L", "P", "I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img).astype(np.int64)
    elif img.mode in ("LA", "PA"):
        values = np.asarray(img.getchannel(0)).astype(np.int64)
    elif img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[..., :3].astype(np.int64)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise SkipInput(path, "colour mask", "expected one channel of class ids: grayscale or palette PNG")
        values = rgb[..., 0]
    else:
        raise SkipInput(path, "unsupported mask mode", img.mode)
    present = np.unique(values)
    for top in (255, 65535):
        if top in present and set(present.tolist()) <= {0, top}:
            return (values == top).astype(np.uint8)
    bad = [int(v) for v in present if v < 0 or v > IGNORE_LABEL]
    if bad:
        raise SkipInput(path, "class id out of range", f"{bad[:5]}; ids are 0..254, 255 = ignore")
    return values.astype(np.uint8)


def load_pair(
    image_path: Path, mask_path: Path, mask_fn: Callable[[Path], np.ndarray] = load_mask
) -> tuple[bytes, np.ndarray, bool]:
    """(image bytes, mask, converted?) after checking that both decode and have the same size."""
    image_bytes, (width, height), converted = load_image(image_path)
    mask = mask_fn(mask_path)
    if mask.shape != (height, width):
        raise SkipInput(
            image_path,
            "size mismatch",
            f"image {width}x{height}, mask {mask.shape[1]}x{mask.shape[0]} in {mask_path}",
        )
    return image_bytes, mask, converted


# ------------------------------------------------------------------ writing


def _records(
    pairs: list[tuple[str, Path, Path]],
    report: ImportReport,
    load: Callable[[Path, Path], tuple[bytes, np.ndarray, bool]],
    progress: bool,
) -> Iterator[bytes]:
    """Serialized examples of the good pairs (id = stem); bad pairs go into `report`."""
    from tqdm import tqdm

    from segpipe.components.core.progress import terminal_stream

    bar_stream = terminal_stream(log) if progress else None  # a bar only where segpipe's lines reach a terminal
    for stem, image_path, mask_path in tqdm(pairs, desc="import", unit="image", file=bar_stream,
                                            disable=bar_stream is None):
        try:
            image_bytes, mask, converted = load(image_path, mask_path)
        except SkipInput as exc:
            _skip(report, exc)
            continue
        report.imported += 1
        report.converted += int(converted)
        yield encode_example(stem, image_bytes, encode_png(mask))


def _write(
    data_root: str | os.PathLike,
    report: ImportReport,
    records: Iterator[bytes],
    *,
    num_shards: int,
    compress: bool,
) -> None:
    """Write the span when at least one record is good; otherwise nothing is written."""
    try:
        first = next(records)
    except StopIteration:
        counts = ", ".join(f"{n} {kind}" for kind, n in report.skip_counts().items())
        detail = f"; skipped {len(report.skipped)}: {counts}" if report.skipped else ""
        raise BadInputError(f"no valid image/mask pairs to import into {report.path}{detail}") from None
    write_span(data_root, report.span, itertools.chain([first], records), num_shards=num_shards, compress=compress)


def _new_report(data_root: str | os.PathLike, span: int | None) -> ImportReport:
    span = next_span(data_root) if span is None else span
    if span < 0:
        raise BadInputError(f"--span: must be >= 0, got {span}")
    target = span_dir(data_root, span)
    if target.exists():
        raise BadInputError(f"{target}: span {span} already exists; spans are immutable, use a new span number")
    return ImportReport(span=span, path=str(target))


def _merge_labels(data_root: str | os.PathLike, labels: dict[int, str]) -> dict[int, str]:
    """Existing labels.json plus `labels`; a changed name is logged and the new one kept."""
    path = Path(data_root) / LABELS_FILE
    merged: dict[int, str] = {}
    if path.exists():
        merged = read_labels_file(path)
        for cid, name in labels.items():
            if cid in merged and merged[cid] != name:
                log.warning("%s: class %d renamed from %r to %r", path, cid, merged[cid], name)
    merged.update(labels)
    write_labels(data_root, merged)
    return merged


def read_labels_file(path: str | os.PathLike) -> dict[int, str]:
    """Class id -> name from a labels.json anywhere; BadInputError names the file and entry."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read labels ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BadInputError(f"{path}: expected a JSON object of class id -> name")
    labels = {}
    for key, name in raw.items():
        if not (str(key).isdigit() and 0 <= int(key) < IGNORE_LABEL) or not isinstance(name, str):
            raise BadInputError(f"{path}: entry {key!r}: expected a class id 0..254 and a name string")
        labels[int(key)] = name
    if 0 not in labels:
        raise BadInputError(f"{path}: class 0 (background) is missing")
    return labels


# ------------------------------------------------------------------ the two importers


def import_oxford_pets(
    dataset_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    *,
    span: int | None = None,
    border: str = "foreground",
    num_shards: int = 1,
    compress: bool = True,
    progress: bool = True,
) -> ImportReport:
    """Oxford-IIIT Pet (`images/*.jpg`, `annotations/trimaps/*.png`) -> a binary span.

    Trimap 1 = pet -> 1, 2 = background -> 0, 3 = border -> `border` (foreground 1, background 0,
    or ignore 255).
    """
    if border not in BORDER_VALUES:
        raise BadInputError(f"--border: {border!r} is not one of {', '.join(BORDER_VALUES)}")
    root = Path(dataset_dir)
    report = _new_report(data_root, span)
    images = list_by_stem(root / "images", IMAGE_SUFFIXES, report)
    trimaps = list_by_stem(root / "annotations" / "trimaps", MASK_SUFFIXES, report)
    pairs = pair_by_stem(images, trimaps, report)
    lookup = np.full(256, -1, dtype=np.int64)
    lookup[[OXFORD_PET, OXFORD_BACKGROUND, OXFORD_BORDER]] = [1, 0, BORDER_VALUES[border]]

    def trimap_to_mask(path: Path) -> np.ndarray:
        _, img, _ = _open(path)
        values = np.asarray(img if img.mode in ("L", "P") else img.convert("L")).astype(np.int64)
        mask = lookup[values]
        if (mask < 0).any():
            odd = sorted(set(np.unique(values[mask < 0]).tolist()))
            raise SkipInput(path, "unexpected trimap value", f"{odd[:5]}; expected 1 pet, 2 background, 3 border")
        return mask.astype(np.uint8)

    def load(image_path: Path, trimap_path: Path) -> tuple[bytes, np.ndarray, bool]:
        return load_pair(image_path, trimap_path, trimap_to_mask)

    records = _records(pairs, report, load, progress)
    _write(data_root, report, records, num_shards=num_shards, compress=compress)
    report.labels = _merge_labels(data_root, OXFORD_LABELS)
    log.debug("%s", report.summary())
    return report


def import_folders(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    *,
    span: int | None = None,
    labels_path: str | os.PathLike | None = None,
    num_shards: int = 1,
    compress: bool = True,
    progress: bool = True,
) -> ImportReport:
    """Images and masks in two folders, paired by file stem -> a span.

    With `labels_path`, masks holding a class id it does not name are skipped; without it,
    labels.json gets ids 0..max id seen (`class_<id>`; 0 = background).
    """
    given = read_labels_file(labels_path) if labels_path else None
    report = _new_report(data_root, span)
    images = list_by_stem(Path(images_dir), IMAGE_SUFFIXES, report)
    masks = list_by_stem(Path(masks_dir), MASK_SUFFIXES, report)
    pairs = pair_by_stem(images, masks, report)
    seen: set[int] = set()

    def load(image_path: Path, mask_path: Path) -> tuple[bytes, np.ndarray, bool]:
        image_bytes, mask, converted = load_pair(image_path, mask_path)
        ids = set(np.unique(mask).tolist()) - {IGNORE_LABEL}
        if given is not None and not ids <= given.keys():
            raise SkipInput(mask_path, "class id not in labels", f"{sorted(ids - given.keys())[:5]} not in {labels_path}")
        seen.update(ids)
        return image_bytes, mask, converted

    records = _records(pairs, report, load, progress)
    _write(data_root, report, records, num_shards=num_shards, compress=compress)
    labels = given or {cid: ("background" if cid == 0 else f"class_{cid}") for cid in range(max(seen | {1}) + 1)}
    report.labels = _merge_labels(data_root, labels)
    log.debug("%s", report.summary())
    return report

