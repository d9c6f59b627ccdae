"""Generated datasets unlike the demo data, shared by the benchmarks that need them.

Each generator maps (rng, index) to (RGB uint8 image, uint8 class-id mask) at the dataset's own,
native size. They differ from the demo (1,000 colour 128x128 images, two classes, flat shapes) in
kind: large images with thin structures, four classes with a rare one, low-contrast texture that
no intensity threshold separates, and very few grayscale non-square examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

Generator = Callable[[np.random.Generator, int], "tuple[np.ndarray, np.ndarray]"]


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def thin_structures(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
    """512x512: a mottled background with 4-8 curvilinear vessels 2-4 px wide, slightly darker."""
    from PIL import Image, ImageDraw

    size = 512
    background = rng.normal(150, 12, (size // 16, size // 16))
    image = np.kron(background, np.ones((16, 16))) + rng.normal(0, 6, (size, size))
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    for _ in range(int(rng.integers(4, 9))):
        points, (x, y) = [], rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(24):
            angle += rng.normal(0, 0.35)
            x, y = x + 14 * np.cos(angle), y + 14 * np.sin(angle)
            points.append((float(x), float(y)))
        draw.line(points, fill=1, width=int(rng.integers(2, 5)))
    mask = np.asarray(mask_img)
    return _rgb(image - 40 * mask), mask


def four_classes_one_rare(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
    """160x224 colour images: large blobs (class 1), bars (class 2) and a few small dots (class 3, ~1%).

    The dots have the blobs' colour and every pixel is noisy, so only shape and size tell class 3
    from class 1 (a per-pixel colour rule cannot)."""
    height, width = 160, 224
    yy, xx = np.mgrid[:height, :width]
    image = rng.normal(90, 28, (height, width, 3))
    mask = np.zeros((height, width), np.uint8)
    for _ in range(2):
        cy, cx, r = rng.uniform(30, height - 30), rng.uniform(30, width - 30), rng.uniform(18, 32)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    for _ in range(2):
        y0, x0 = int(rng.integers(0, height - 12)), int(rng.integers(0, width - 60))
        mask[y0 : y0 + 10, x0 : x0 + 60] = 2
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(5, height - 5), rng.uniform(5, width - 5)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < 9] = 3
    colours = np.array([[90, 90, 90], [170, 100, 80], [100, 160, 90], [170, 100, 80]], np.float64)
    image = image + colours[mask] - 90
    return np.clip(image, 0, 255).astype(np.uint8), mask


def low_contrast_texture(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
    """192x192 grayscale: a blob of fine stripes on coarse noise of the SAME mean brightness.

    The class is texture, not intensity, so a threshold on brightness or colour cannot find it.
    """
    size = 192
    yy, xx = np.mgrid[:size, :size]
    coarse = np.kron(rng.normal(0, 14, (size // 8, size // 8)), np.ones((8, 8)))
    cy, cx = rng.uniform(50, size - 50), rng.uniform(50, size - 50)
    radius = rng.uniform(28, 48) * (1 + 0.25 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(2, 5)))
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).astype(np.uint8)
    angle = rng.uniform(0, np.pi)
    stripes = 14 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 1.6)
    texture = np.where(mask == 1, stripes, coarse)
    return _rgb(110 + texture + rng.normal(0, 4, (size, size))), mask


def few_grayscale_wide(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
    """96x160 grayscale (RGB with equal channels): one bright textured ellipse on a gradient."""
    height, width = 96, 160
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(25, height - 25), rng.uniform(30, width - 30)
    ry, rx = rng.uniform(12, 24), rng.uniform(16, 36)
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1).astype(np.uint8)
    image = 60 + 0.4 * xx + rng.normal(0, 8, (height, width)) + mask * (50 + 20 * np.sin(xx / 2.0))
    return _rgb(image), mask


@dataclass(frozen=True)
class Dataset:
    make: Generator
    num: int
    num_classes: int
    about: str


DATASETS: dict[str, Dataset] = {
    "thin_structures_512": Dataset(thin_structures, 60, 2, "512x512, 2-4 px curvilinear vessels (~4% of pixels)"),
    "four_classes_one_rare": Dataset(four_classes_one_rare, 300, 4, "160x224 noisy colour, 4 classes, rare class 3 (~1%) coloured as class 1"),
    "low_contrast_texture": Dataset(low_contrast_texture, 200, 2, "192x192 gray, texture not brightness"),
    "few_grayscale_96x160": Dataset(few_grayscale_wide, 60, 2, "60 images, 96x160 grayscale"),
}


def write_dataset(data_root: Path, dataset: Dataset, num: int | None = None, seed: int = 7) -> Path:
    """The dataset as span 1 under `data_root` (one gzipped TFRecord shard) plus labels.json."""
    from segpipe.components.core.data_format import encode_example, encode_png, write_labels, write_span

    rng = np.random.default_rng(seed)

    def records() -> Iterator[bytes]:
        for i in range(num or dataset.num):
            image, mask = dataset.make(rng, i)
            yield encode_example(f"ex-{i}", encode_png(image), encode_png(mask))

    write_labels(data_root, {0: "background", **{c: f"class{c}" for c in range(1, dataset.num_classes)}})
    span, _count = write_span(data_root, 1, records(), num_shards=1, compress=True)
    return span
