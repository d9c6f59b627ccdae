"""Deterministic synthetic segmentation data: `segpipe demo-data`.

Each image is a smooth, noisy background with one to three foreground objects (ellipses, polygons,
blobs) of varied colour, texture and scale, and its exact binary mask (0 background, 1 object).
The colour ranges of objects and background overlap, so no single colour threshold separates them;
what does separate them is texture and shape: backgrounds vary slowly and with low contrast,
objects carry high-contrast stripes, checks, dots or rings whose period stays 5-9 px after the
image is resized to 64 px, so the small `demo` U-Net can learn them.

Only IEEE basic arithmetic, `sqrt` and PIL's polygon fill touch the pixel arrays (no vectorised
transcendental functions, whose SIMD results vary by CPU), so a seed gives the same pixels on any
machine, and byte-identical files wherever zlib is the same version.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from segpipe.components.core.data_format import encode_example, encode_png, next_span, write_labels, write_span

log = logging.getLogger(__name__)

LABELS = {0: "background", 1: "object"}
SIZE_RANGE = (96, 256)  # image height and width are drawn independently from this range
FOREGROUND_RANGE = (0.25, 0.40)  # per-image foreground fraction, enforced
MODEL_SIZE = 64  # texture periods are chosen to stay visible at this resized size
SHAPES = ("ellipse", "polygon", "blob")
TEXTURES = ("stripes", "checks", "dots", "rings")


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a (gh, gw, C) grid to (height, width, C) with plain arithmetic."""

    def axis_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.linspace(0.0, n_in - 1.0, n_out, dtype=np.float32)
        lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, wy = axis_weights(height, grid.shape[0])
    x0, x1, wx = axis_weights(width, grid.shape[1])
    rows = grid[y0] * (1.0 - wy)[:, None, None] + grid[y1] * wy[:, None, None]
    return rows[:, x0] * (1.0 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def make_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float (H, W, 3): a base colour, slow colour blotches and low-contrast finer mottling."""
    base = rng.uniform(50.0, 205.0, size=3).astype(np.float32)
    coarse = rng.uniform(-1.0, 1.0, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
    fine = rng.uniform(-1.0, 1.0, size=(int(rng.integers(10, 18)), int(rng.integers(10, 18)), 3))
    field = base + rng.uniform(20.0, 45.0) * _upsample(coarse.astype(np.float32), height, width)
    return field + rng.uniform(4.0, 10.0) * _upsample(fine.astype(np.float32), height, width)


def _outline(rng: np.random.Generator, shape: str) -> np.ndarray:
    """Unit-radius outline (N, 2) of a star-shaped object centred at the origin."""
    if shape == "ellipse":
        num, radii = 48, None
    elif shape == "polygon":
        num = int(rng.integers(3, 8))
        radii = rng.uniform(0.8, 1.15, size=num)
    else:  # blob: a radius with a few low harmonics
        num = 64
        amps = rng.uniform(0.0, 0.18, size=3)
        phases = rng.uniform(0.0, 2 * math.pi, size=3)
        radii = np.array(
            [1.0 + sum(a * math.cos((k + 2) * t + p) for k, (a, p) in enumerate(zip(amps, phases)))
             for t in (2 * math.pi * i / num for i in range(num))]
        )
    if shape == "polygon":
        angles = np.sort(rng.uniform(0.0, 2 * math.pi, size=num))
        # keep vertices spread out so polygons are not slivers
        angles = np.sort((angles + np.arange(num) * 2 * math.pi / num) % (2 * math.pi))
    else:
        angles = np.array([2 * math.pi * i / num for i in range(num)])
    if radii is None:
        radii = np.ones(num)
    aspect = math.sqrt(rng.uniform(1.0, 2.2))
    rot = rng.uniform(0.0, math.pi)
    cos_r, sin_r = math.cos(rot), math.sin(rot)
    points = []
    for angle, radius in zip(angles.tolist(), radii.tolist()):
        x = radius * math.cos(angle) * aspect
        y = radius * math.sin(angle) / aspect
        points.append((x * cos_r - y * sin_r, x * sin_r + y * cos_r))
    return np.array(points)


def _rasterize(outline: np.ndarray, centre: tuple[float, float], radius: float, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of the filled outline scaled by `radius` (PIL's exact integer fill)."""
    canvas = Image.new("L", (width, height), 0)
    xy = [(centre[0] + radius * x, centre[1] + radius * y) for x, y in outline.tolist()]
    ImageDraw.Draw(canvas).polygon(xy, fill=1)
    return np.asarray(canvas, dtype=bool)


def _texture(rng: np.random.Generator, kind: str, height: int, width: int, centre: tuple[float, float]) -> np.ndarray:
    """Boolean (H, W) two-tone pattern whose period is 5-9 px after resizing to MODEL_SIZE."""
    scale = max(height, width) / MODEL_SIZE
    period = float(rng.uniform(5.0, 9.0)) * scale
    angle = float(rng.uniform(0.0, math.pi))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs -= np.float32(centre[0])
    ys -= np.float32(centre[1])
    u = (xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle))) / np.float32(period)
    v = (ys * np.float32(math.cos(angle)) - xs * np.float32(math.sin(angle))) / np.float32(period)
    if kind == "stripes":
        return np.floor(u).astype(np.int64) % 2 == 0
    if kind == "checks":
        return (np.floor(u).astype(np.int64) + np.floor(v).astype(np.int64)) % 2 == 0
    if kind == "dots":
        du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
        return du * du + dv * dv < np.float32(rng.uniform(0.09, 0.16))
    return np.floor(np.sqrt(u * u + v * v) * 2.0).astype(np.int64) % 2 == 0  # rings


def _object_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two tones around a mean colour drawn from the same range as backgrounds."""
    mean = rng.uniform(70.0, 185.0, size=3)
    contrast = rng.uniform(45.0, 80.0) * rng.uniform(0.6, 1.0, size=3)
    return (mean + contrast).astype(np.float32), (mean - contrast).astype(np.float32)


def _place_objects(
    rng: np.random.Generator, height: int, width: int, target: float
) -> list[np.ndarray]:
    """Masks of 1-3 objects whose union covers FOREGROUND_RANGE of the image; [] if it failed."""
    count = int(rng.integers(1, 4))
    outlines = [_outline(rng, SHAPES[int(rng.integers(len(SHAPES)))]) for _ in range(count)]
    centres = [(float(rng.uniform(0.2, 0.8) * width), float(rng.uniform(0.2, 0.8) * height)) for _ in range(count)]
    weights = rng.uniform(0.6, 1.0, size=count)  # relative object sizes
    scale = math.sqrt(target * height * width / (math.pi * float(np.sum(weights * weights))))
    lo, hi = FOREGROUND_RANGE
    for _ in range(6):
        masks = [_rasterize(o, c, scale * w, height, width) for o, c, w in zip(outlines, centres, weights.tolist())]
        fraction = float(np.logical_or.reduce(masks).mean())
        if lo + 0.005 <= fraction <= hi - 0.005 and all(m.any() for m in masks):
            return masks
        scale *= math.sqrt(target / max(fraction, 1e-3))
    return []


def generate_example(
    rng: np.random.Generator, height: int | None = None, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One (uint8 image HxWx3, uint8 mask HxW in {0, 1}); size drawn from SIZE_RANGE unless given."""
    height = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1)) if height is None else height
    width = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1)) if width is None else width
    image = make_background(rng, height, width)
    masks: list[np.ndarray] = []
    while not masks:
        masks = _place_objects(rng, height, width, float(rng.uniform(0.28, 0.37)))
    for obj in masks:
        centre_y, centre_x = (float(a.mean()) for a in np.nonzero(obj))
        pattern = _texture(rng, TEXTURES[int(rng.integers(len(TEXTURES)))], height, width, (centre_x, centre_y))
        tone_a, tone_b = _object_colours(rng)
        image[obj & pattern] = tone_a
        image[obj & ~pattern] = tone_b
    noise = rng.standard_normal(size=image.shape, dtype=np.float32)
    image += noise * np.float32(rng.uniform(3.0, 8.0))
    mask = np.logical_or.reduce(masks).astype(np.uint8)
    return np.clip(np.rint(image, out=image), 0, 255, out=image).astype(np.uint8), mask


def demo_example_id(seed: int, index: int) -> str:
    return f"demo-{seed}-{index:05d}"


def iter_demo_examples(num: int, seed: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(id, image, mask) for examples 0..num-1; example i depends only on (seed, i)."""
    for index in range(num):
        rng = np.random.default_rng([seed, index])
        image, mask = generate_example(rng)
        yield demo_example_id(seed, index), image, mask


def _encoded_example(seed: int, index: int) -> tuple[str, bytes, bytes, float]:
    """(id, image PNG, mask PNG, foreground fraction) of example `index`: the unit of parallel work."""
    rng = np.random.default_rng([seed, index])
    image, mask = generate_example(rng)
    return demo_example_id(seed, index), encode_png(image), encode_png(mask), float(mask.mean())


def iter_encoded_examples(num: int, seed: int, workers: int = 1) -> Iterator[tuple[str, bytes, bytes, float]]:
    """`_encoded_example` for 0..num-1 in order, in `workers` spawned processes when > 1.

    Each example depends only on (seed, index), so the output is the same for any `workers`.
    """
    if workers <= 1:
        yield from (_encoded_example(seed, index) for index in range(num))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may already hold TensorFlow's threads
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_encoded_example, itertools.repeat(seed, num), range(num), chunksize=16)


def default_workers(num: int) -> int:
    """Processes for `num` examples: one per CPU (at most 8), one for small jobs."""
    return 1 if num < 200 else max(1, min(8, os.cpu_count() or 1))


def write_demo_data(
    data_root: str | os.PathLike,
    *,
    num: int,
    seed: int | None = None,
    span: int | None = None,
    num_shards: int | None = None,
    compress: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write `num` demo examples as `<data_root>/span-<span>/` plus labels.json.

    `span` defaults to the next free span and `seed` to the span number, so each new span holds
    new images. Returns {"span", "path", "count", "seed", "foreground_fraction": {min, mean, max}}.
    """
    from tqdm import tqdm

    from segpipe.components.core.progress import terminal_stream

    if num < 1:
        raise ValueError(f"num: must be at least 1, got {num}")
    span = next_span(data_root) if span is None else span
    seed = span if seed is None else seed
    num_shards = num_shards or max(1, num // 500)
    workers = default_workers(num) if workers is None else workers
    fractions: list[float] = []
    bar_stream = terminal_stream(log) if progress else None  # a bar only where segpipe's lines reach a terminal

    def records() -> Iterator[bytes]:
        examples = iter_encoded_examples(num, seed, workers)
        for example_id, image_png, mask_png, fraction in tqdm(
            examples, total=num, desc=f"demo span-{span}", file=bar_stream, disable=bar_stream is None
        ):
            fractions.append(fraction)
            yield encode_example(example_id, image_png, mask_png)

    path, count = write_span(data_root, span, records(), num_shards=num_shards, compress=compress)
    write_labels(data_root, LABELS)
    stats = {"min": min(fractions), "mean": sum(fractions) / len(fractions), "max": max(fractions)}
    log.debug("wrote %d demo examples (seed %d) to %s; foreground fraction %s", count, seed, path, stats)
    return {"span": span, "path": str(path), "count": count, "seed": seed, "foreground_fraction": stats}
