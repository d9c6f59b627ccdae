"""Demo data: deterministic, varied, 25-40% foreground, texture-separable but not colour-separable."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segpipe.components.core import data_format
from segpipe.components.tools.demo_data import (
    FOREGROUND_RANGE,
    LABELS,
    SIZE_RANGE,
    generate_example,
    iter_demo_examples,
    write_demo_data,
)
from segpipe.pipeline.cli import main


@pytest.fixture(scope="module")
def examples() -> list[tuple[str, np.ndarray, np.ndarray]]:
    return list(iter_demo_examples(40, seed=7))


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_byte_identical_spans_and_other_seeds_differ(tmp_path):
    first = write_demo_data(tmp_path / "a", num=6, seed=11, span=4, num_shards=2, workers=1, progress=False)
    # two worker processes produce the very same bytes
    second = write_demo_data(tmp_path / "b", num=6, seed=11, span=4, num_shards=2, workers=2, progress=False)
    other = write_demo_data(tmp_path / "c", num=6, seed=12, span=4, num_shards=2, progress=False)
    a, b, c = (_files(tmp_path / name / "span-4") for name in "abc")
    assert first["count"] == 6 and len(a) == 2
    assert a == b
    assert a.keys() == c.keys() and all(a[name] != c[name] for name in a)
    assert (tmp_path / "a" / "labels.json").read_bytes() == (tmp_path / "b" / "labels.json").read_bytes()
    assert data_format.read_labels(tmp_path / "a") == LABELS
    assert second["foreground_fraction"] == first["foreground_fraction"]


def test_defaults_take_the_next_span_and_seed_it_with_the_span_number(tmp_path):
    one = write_demo_data(tmp_path, num=2, progress=False)
    two = write_demo_data(tmp_path, num=2, progress=False)
    assert (one["span"], one["seed"]) == (1, 1)
    assert (two["span"], two["seed"]) == (2, 2)
    assert _files(tmp_path / "span-1") != _files(tmp_path / "span-2")


def test_examples_are_reproducible_per_index():
    short = list(iter_demo_examples(3, seed=5))
    longer = list(iter_demo_examples(5, seed=5))
    assert [e[0] for e in longer] == [f"demo-5-{i:05d}" for i in range(5)]
    for (id_a, img_a, mask_a), (id_b, img_b, mask_b) in zip(short, longer):
        assert id_a == id_b
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(mask_a, mask_b)


def test_foreground_fraction_sizes_and_mask_values(examples):
    fractions = [float(mask.mean()) for _, _, mask in examples]
    assert FOREGROUND_RANGE[0] <= min(fractions) and max(fractions) <= FOREGROUND_RANGE[1]
    # predicting all background scores at most 0.75 pixel accuracy
    assert 1 - np.mean(fractions) <= 0.75
    shapes = {image.shape[:2] for _, image, _ in examples}
    assert len(shapes) >= 35
    assert any(h != w for h, w in shapes)
    assert all(SIZE_RANGE[0] <= s <= SIZE_RANGE[1] for shape in shapes for s in shape)
    for _, image, mask in examples:
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert mask.shape == image.shape[:2] and set(np.unique(mask).tolist()) == {0, 1}


def test_generate_example_honours_a_requested_size():
    image, mask = generate_example(np.random.default_rng(0), height=100, width=180)
    assert image.shape == (100, 180, 3) and mask.shape == (100, 180)
    assert FOREGROUND_RANGE[0] <= mask.mean() <= FOREGROUND_RANGE[1]


def test_no_single_colour_threshold_separates_objects(examples):
    pixels = np.concatenate([image.reshape(-1, 3) for _, image, _ in examples]).astype(np.float32)
    labels = np.concatenate([mask.reshape(-1) for _, _, mask in examples]).astype(bool)
    background_rate = 1 - labels.mean()
    for name, values in {"red": pixels[:, 0], "green": pixels[:, 1], "blue": pixels[:, 2],
                         "luminance": pixels.mean(axis=1)}.items():
        best = max(max(acc, 1 - acc) for acc in (((values > t) == labels).mean() for t in range(0, 256, 4)))
        assert best < min(0.82, background_rate + 0.1), f"{name} threshold reaches {best:.3f}"


def test_objects_carry_more_local_contrast_than_background_at_64px(examples):
    """The cue the demo U-Net learns: texture survives the resize to 64 px in every image."""
    for example_id, image, mask in examples:
        small = np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR)).astype(np.float32)
        inside = np.asarray(Image.fromarray(mask).resize((64, 64), Image.NEAREST)).astype(bool)[:-1, :-1]
        contrast = (np.abs(np.diff(small, axis=0))[:, :-1] + np.abs(np.diff(small, axis=1))[:-1]).sum(-1)
        ratio = contrast[inside].mean() / contrast[~inside].mean()
        assert ratio > 2.0, f"{example_id}: object/background contrast ratio {ratio:.2f}"


def test_cli_writes_a_span_and_refuses_to_overwrite_it(tmp_path, capsys):
    args = ["demo-data", "--out", str(tmp_path), "--num", "3", "--seed", "2", "--span", "5", "--no-compress"]
    assert main(args) == 0
    assert "wrote 3 demo examples (seed 2)" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "span-5").iterdir()] == ["part-00000-of-00001.tfrecord"]
    assert main(args) == 2
    assert "span 5 already exists" in capsys.readouterr().err
    assert main(["demo-data", "--out", str(tmp_path), "--num", "0"]) == 2
    assert "--num: must be at least 1" in capsys.readouterr().err
    # without --out the data goes to the config's data root: <root>/data, next free span
    assert main(["demo-data", "--root", str(tmp_path / "root"), "--num", "2"]) == 0
    assert data_format.list_spans(tmp_path / "root" / "data") == [1]
