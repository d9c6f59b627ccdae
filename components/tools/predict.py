"""Batch prediction on image files through the model's serving signature (`segpipe predict`).

Images of any size and format PIL reads go through `serving_default` exactly as a TensorFlow Serving
client would send them (PNG/JPEG bytes; other formats and non-RGB modes are re-encoded as RGB PNG
first). For each input `<stem>.<ext>` two files are written:
- `<stem>_mask.png`: the predicted class ids (0..K-1, 0 = background), one 8-bit channel at the
  input's original size (nearest-neighbour upsampling of `class_mask`). Class ids, not 0/255, so
  the mask has the same format as the training masks and can be fed back as a label; the overlay
  is the picture for people.
- `<stem>_overlay.png`: the input with each foreground class tinted in its own colour.
An unreadable image is reported with its path and the rest continue.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from segpipe.components.core.data_format import IMAGE_SUFFIXES
from segpipe.components.core.errors import BadInputError
from segpipe.components.core.serving import ServingModel, load_serving, predict_class_masks
from segpipe.components.core.visual import overlay

log = logging.getLogger(__name__)

SERVED_FORMATS = ("PNG", "JPEG")  # what the serving graph's tf.io.decode_image is fed as-is


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given plus the image files (by suffix) directly inside given folders, in order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)  # a missing file is reported when it is read
    return files


def read_for_serving(path: Path) -> tuple[bytes, np.ndarray]:
    """(bytes to send, RGB array); raises BadInputError naming the file when it is not an image."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
            rgb = img.convert("RGB")
            rgb.load()
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable image ({exc})") from None
    array = np.asarray(rgb)
    if fmt not in SERVED_FORMATS or mode != "RGB":
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        data = buf.getvalue()
    return data, array


def upsample_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an S x S class mask to the original image size."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((width, height), Image.NEAREST))


def output_stems(files: list[Path]) -> list[str]:
    """File stems, made unique (`a`, `a_2`, ...) when two inputs share a name."""
    seen: dict[str, int] = {}
    stems = []
    for path in files:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}_{count}")
    return stems


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_images(
    model_path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Write `<stem>_mask.png` and `<stem>_overlay.png` for each image; bad images are listed, not fatal.

    Returns {"total": n, "written": [mask paths], "failed": [(path, reason)]}.
    """
    from tqdm import tqdm

    from segpipe.components.core.progress import terminal_stream

    if batch_size < 1:
        raise BadInputError(f"--batch-size: expected >= 1, got {batch_size}")
    files = collect_images(inputs)
    if not files:
        raise BadInputError("no image files given (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ")")
    model = load_serving(model_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = list(zip(files, output_stems(files)))
    written: list[str] = []
    failed: list[tuple[str, str]] = []
    bar_stream = terminal_stream(log)  # a bar only where segpipe's lines reach a terminal
    with tqdm(total=len(jobs), unit="image", desc="predict", file=bar_stream, disable=bar_stream is None) as bar:
        for batch in _batches(jobs, batch_size):
            ready = []
            for path, stem in batch:
                try:
                    ready.append((path, stem, *read_for_serving(path)))
                except BadInputError as exc:
                    failed.append((str(path), str(exc).removeprefix(f"{path}: ")))
            for path, stem, array, mask in run_batch(model, ready, failed):
                written.append(str(write_outputs(out, stem, array, mask)))
            bar.update(len(batch))
    for path, reason in failed:
        log.warning("%s: %s", path, reason)
    return {"total": len(jobs), "written": written, "failed": failed}


def run_batch(
    model: ServingModel, ready: list[tuple[Path, str, bytes, np.ndarray]], failed: list[tuple[str, str]]
) -> list[tuple[Path, str, np.ndarray, np.ndarray]]:
    """Predict a batch; if the graph rejects it, retry one by one so only the bad image fails."""
    if not ready:
        return []
    try:
        masks = predict_class_masks(model, [item[2] for item in ready])
        return [(path, stem, array, mask) for (path, stem, _, array), mask in zip(ready, masks)]
    except Exception:  # noqa: BLE001 - TensorFlow raises InvalidArgumentError and friends
        if len(ready) == 1:
            path = ready[0][0]
            failed.append((str(path), "the serving signature could not decode this image"))
            return []
        results = []
        for item in ready:
            results.extend(run_batch(model, [item], failed))
        return results


def write_outputs(out: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> Path:
    full = upsample_mask(mask, image.shape[0], image.shape[1])
    mask_path = out / f"{stem}_mask.png"
    Image.fromarray(full).save(mask_path)
    Image.fromarray(overlay(image, full)).save(out / f"{stem}_overlay.png")
    return mask_path
