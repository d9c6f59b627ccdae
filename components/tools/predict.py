"""Batch prediction on image files through the model's serving signature (`segpipe predict`).

Images of any size and format PIL reads go through `serving_default` exactly as a TensorFlow Serving
client would send them (PNG/JPEG bytes; other formats and non-RGB modes are re-encoded as RGB PNG
first). For each input `<stem>.<ext>` two files are written:
- `<stem>_mask.png`: the predicted class ids (0..K-1, 0 = background), one 8-bit channel at the
  input's original size (`probabilities` resized bilinearly, then the class rule: the masks the
  Evaluator scores, core/serving.py `class_mask_at_size`). Class ids, not 0/255, so
  the mask has the same format as the training masks and can be fed back as a label; the overlay
  is the picture for people.
- `<stem>_overlay.png`: the input with each foreground class tinted in its own colour.
An unreadable image (also one above data_format.MAX_IMAGE_PIXELS) is reported with its path and the
rest continue.

What predict never does (checked before the model is loaded):
- write into a folder segpipe owns: a serving directory or version, an artifact, a SavedModel, a
  data span (`segpipe_folder_kind`), or a folder the caller names as protected (the CLI passes the
  config's serving dir, `<root>/artifacts` and the data spans); a PNG folder there would look like
  a model version or data to the pipeline.
- write into one of its own input folders: the next run over that folder would read the masks back
  as inputs.
- overwrite a file it did not write. Each output PNG carries a text chunk with the digest of its
  pixels; an existing file is replaced only when it carries a digest that matches (a rerun), or
  with `overwrite=True`. Each file is written under a hidden temporary name and renamed into place,
  so a kill or a full disk never leaves half a PNG.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from segpipe.components.core import artifacts
from segpipe.components.core.data_format import (
    IMAGE_SUFFIXES,
    SPAN_DIR,
    ImageTooLargeError,
    open_image,
    read_image_file,
)
from segpipe.components.core.errors import BadInputError
from segpipe.components.core.serving import (
    SAVED_MODEL_PB,
    SERVING_INFO_FILE,
    ServingModel,
    class_mask_at_size,
    image_for_serving,
    is_complete_version,
    is_version_number,
    load_serving,
    predict_probabilities,
)
from segpipe.components.core.visual import overlay

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask.png"
OVERLAY_SUFFIX = "_overlay.png"
OWN_CHUNK = "segpipe-predict-sha256"  # PNG text chunk: the digest of the file's own pixels
MAX_LISTED = 5  # refused files named in one message


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
    """(bytes to send, RGB array) by core/serving.py `image_for_serving`, decoded for the overlay;
    raises BadInputError naming the file when it is not an image."""
    try:
        data = read_image_file(path)
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except ImageTooLargeError as exc:
        raise BadInputError(f"{path}: image too large: {exc}") from None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable image ({exc})") from None
    try:
        image = image_for_serving(data, decode=True)
    except ValueError as exc:
        raise BadInputError(f"{path}: {exc}") from None
    return image.data, image.rgb


def output_stems(files: list[Path]) -> list[str]:
    """File stems, made unique (`a`, `a_2`, ...) when two inputs share a name."""
    seen: dict[str, int] = {}
    stems = []
    for path in files:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}_{count}")
    return stems


# ------------------------------------------------------------------ where predict may write


def segpipe_folder_kind(folder: Path) -> str | None:
    """What segpipe keeps in `folder` ("a serving directory", ...), or None for an ordinary folder."""
    from segpipe.components.pusher import LOCK_FILE

    if (folder / SAVED_MODEL_PB).is_file():
        return f"a SavedModel ({SAVED_MODEL_PB})"
    if (folder / artifacts.METADATA_FILE).is_file():
        return f"a segpipe artifact ({artifacts.METADATA_FILE})"
    if (folder / SERVING_INFO_FILE).is_file():
        return f"a pushed serving version ({SERVING_INFO_FILE})"
    if (folder / LOCK_FILE).is_file():
        return "a serving directory"
    if is_version_number(folder.name) and folder.parent.is_dir() and any(
        is_complete_version(p) for p in folder.parent.iterdir() if p.is_dir()
    ):
        return "a version folder of a serving directory"
    if folder.name.startswith(SPAN_DIR.format(span="")) and any(folder.glob("*.tfrecord*")):
        return "a data span"
    return None


def check_output_dir(
    out: Path, inputs: Iterable[str | os.PathLike], protected: Sequence[tuple[str | os.PathLike, str]]
) -> None:
    """BadInputError unless `out` is a folder a command may write its outputs into (see the module
    docstring; `segpipe evaluate` and `train` check their --out the same way, without inputs).

    `protected` lists (folder, what it is) pairs that neither `out` nor any folder above it may be.
    """
    target = out.resolve()
    if target.exists() and not target.is_dir():
        raise BadInputError(f"--out {out}: exists and is not a folder")
    for folder, what in protected:
        folder = Path(folder).resolve()
        if target == folder or folder in target.parents:
            raise BadInputError(f"--out {out}: inside {what} {folder}; segpipe owns that folder, choose another --out")
    for folder in (target, *target.parents):  # also a folder still to be created: `serving/7`
        kind = segpipe_folder_kind(folder)
        if kind:
            raise BadInputError(f"--out {out}: inside {kind} ({folder}); segpipe owns that folder, choose another --out")
    for item in inputs:
        if Path(item).is_dir() and Path(item).resolve() == target:
            raise BadInputError(
                f"--out {out}: is also an input folder; masks written there would be read back as inputs "
                "by the next run over it, write predictions elsewhere"
            )


def pixel_digest(img: Image.Image) -> str:
    """sha256 of a decoded image's mode, size and pixels: what an output PNG's text chunk records."""
    digest = hashlib.sha256(f"{img.mode} {img.width}x{img.height} ".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def is_own_output(path: Path) -> bool:
    """True when `path` is a PNG predict wrote and nobody changed since (its pixels match its digest)."""
    try:
        with open_image(read_image_file(path)) as img:
            recorded = getattr(img, "text", {}).get(OWN_CHUNK) if img.format == "PNG" else None
            return recorded is not None and recorded == pixel_digest(img)
    except (OSError, ValueError, UnidentifiedImageError):
        return False


def refuse_foreign_files(out: Path, names: Iterable[str]) -> None:
    """BadInputError naming the existing files under `out` that predict would replace but did not write."""
    foreign = [out / name for name in names if (out / name).exists() and not is_own_output(out / name)]
    if foreign:
        listed = ", ".join(map(str, foreign[:MAX_LISTED]))
        more = f" (and {len(foreign) - MAX_LISTED} more)" if len(foreign) > MAX_LISTED else ""
        raise BadInputError(
            f"{listed}{more}: exists and was not written by segpipe predict; not overwriting "
            "(choose another --out, or pass --overwrite to replace)"
        )


def encode_output_png(array: np.ndarray) -> bytes:
    """PNG bytes of an output array, carrying the digest of its pixels (`is_own_output`)."""
    img = Image.fromarray(array)
    info = PngImagePlugin.PngInfo()
    info.add_text(OWN_CHUNK, pixel_digest(img))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def place_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write `data` under a hidden temporary name, then move it to `path` in one step.

    Without `overwrite`, an existing `path` is replaced only when `is_own_output`; a new one is
    created with a hard link, which fails instead of replacing a file that appeared meanwhile.
    """
    tmp = artifacts.temp_sibling(path)
    try:
        tmp.write_bytes(data)
        if overwrite or (path.exists() and is_own_output(path)):
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise BadInputError(f"{path}: appeared while predicting and was not written by segpipe; not overwriting") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if path.exists():  # a file system without hard links: check, then rename
                raise BadInputError(f"{path}: appeared while predicting and was not written by segpipe; not overwriting") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ predicting


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_images(
    model_path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    overwrite: bool = False,
    protected: Sequence[tuple[str | os.PathLike, str]] = (),
) -> dict[str, Any]:
    """Write `<stem>_mask.png` and `<stem>_overlay.png` for each image; bad images are listed, not fatal.

    Refuses (BadInputError, before loading the model) an output folder segpipe owns, one of the
    input folders, or existing files predict did not write unless `overwrite`.
    Returns {"total": n, "written": [mask paths], "failed": [(path, reason)]}.
    """
    from tqdm import tqdm

    from segpipe.components.core.progress import terminal_stream

    if batch_size < 1:
        raise BadInputError(f"--batch-size: expected >= 1, got {batch_size}")
    inputs = list(inputs)
    files = collect_images(inputs)
    if not files:
        raise BadInputError("no image files given (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ")")
    out = Path(out_dir)
    check_output_dir(out, inputs, protected)
    jobs = list(zip(files, output_stems(files)))
    if not overwrite:
        refuse_foreign_files(out, [stem + suffix for _, stem in jobs for suffix in (MASK_SUFFIX, OVERLAY_SUFFIX)])
    model = load_serving(model_path)
    out.mkdir(parents=True, exist_ok=True)
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
            for path, stem, array, probabilities in run_batch(model, ready, failed):
                try:
                    written.append(str(write_outputs(out, stem, array, probabilities, overwrite=overwrite)))
                except BadInputError as exc:
                    failed.append((str(path), str(exc)))
                except OSError as exc:  # a full disk or a folder gone read-only: no later write can work
                    _log_failed(failed)
                    raise BadInputError(
                        f"{out}: cannot write the outputs of {path} ({exc.strerror or exc}); "
                        f"{len(written)} of {len(jobs)} image(s) were written before"
                    ) from None
            bar.update(len(batch))
    _log_failed(failed)
    return {"total": len(jobs), "written": written, "failed": failed}


def _log_failed(failed: list[tuple[str, str]]) -> None:
    for path, reason in failed:
        log.warning("%s: %s", path, reason)


def run_batch(
    model: ServingModel, ready: list[tuple[Path, str, bytes, np.ndarray]], failed: list[tuple[str, str]]
) -> list[tuple[Path, str, np.ndarray, np.ndarray]]:
    """Predict a batch; if the graph rejects it, retry one by one so only the bad image fails."""
    if not ready:
        return []
    try:
        probabilities = predict_probabilities(model, [item[2] for item in ready])
        return [(path, stem, array, probs) for (path, stem, _, array), probs in zip(ready, probabilities)]
    except Exception:  # noqa: BLE001 - TensorFlow raises InvalidArgumentError and friends
        if len(ready) == 1:
            path = ready[0][0]
            failed.append((str(path), "the serving signature could not decode this image"))
            return []
        results = []
        for item in ready:
            results.extend(run_batch(model, [item], failed))
        return results


def write_outputs(out: Path, stem: str, image: np.ndarray, probabilities: np.ndarray, *, overwrite: bool) -> Path:
    """The overlay, then the mask (the file `written` lists), each moved into place complete."""
    full = class_mask_at_size(probabilities, image.shape[0], image.shape[1])
    mask_path = out / f"{stem}{MASK_SUFFIX}"
    place_file(out / f"{stem}{OVERLAY_SUFFIX}", encode_output_png(overlay(image, full)), overwrite=overwrite)
    place_file(mask_path, encode_output_png(full), overwrite=overwrite)
    return mask_path
