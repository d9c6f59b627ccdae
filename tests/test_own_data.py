"""A user's own data, README's walkthrough: a folder of images and masks -> a served model -> predictions.

The dataset is of a different kind than the demo data on purpose: three classes (background,
striped regions, dotted regions) on grey-looking textures, images saved as JPEG (some of them
grayscale JPEGs) and as RGBA PNGs (which the importer converts), masks as palette-free PNGs of
class ids, non-square 40x48 px. It goes through exactly the README's commands:
`segpipe import folders`, `segpipe run` (tiny settings), `segpipe serving list`, `segpipe predict`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segpipe.pipeline.cli import main

HEIGHT, WIDTH = 40, 48
CLASSES = {0: "background", 1: "stripes", 2: "dots"}


def textured_example(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grey noise with one striped and one dotted rectangle; the mask holds their class ids."""
    grey = rng.integers(90, 140, (HEIGHT, WIDTH)).astype(np.int32)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for cls, pattern in ((1, (xx // 2) % 2 == 0), (2, (yy % 4 < 2) & (xx % 4 < 2))):
        h, w = rng.integers(12, 20), rng.integers(12, 20)
        y, x = rng.integers(0, HEIGHT - h), rng.integers(0, WIDTH - w)
        region = np.zeros_like(mask, dtype=bool)
        region[y : y + h, x : x + w] = True
        region &= mask == 0  # the first rectangle keeps its pixels where they overlap
        grey[region] = np.where(pattern[region], 235, 20)
        mask[region] = cls
    return np.clip(grey, 0, 255).astype(np.uint8), mask


def write_folder_dataset(folder: Path, num: int, seed: int = 5) -> None:
    """images/ (JPEG, grayscale JPEG, RGBA PNG) and masks/ (PNG class ids), paired by file stem."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(num):
        grey, mask = textured_example(rng)
        stem = f"scan_{i:03d}"
        if i % 3 == 0:
            Image.fromarray(grey, "L").save(folder / "images" / f"{stem}.jpg", quality=95)
        elif i % 3 == 1:
            rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
            Image.fromarray(rgba, "RGBA").save(folder / "images" / f"{stem}.png")
        else:
            Image.fromarray(np.dstack([grey] * 3), "RGB").save(folder / "images" / f"{stem}.jpeg", quality=95)
        Image.fromarray(mask, "L").save(folder / "masks" / f"{stem}.png")
    (folder / "labels.json").write_text(json.dumps({str(k): v for k, v in CLASSES.items()}))


@pytest.mark.slow
def test_own_folder_dataset_to_served_model_and_predictions(tmp_path, capsys):
    from PIL import Image

    my = tmp_path / "my"
    write_folder_dataset(my, 40)
    root = tmp_path / "segpipe_root"

    # 1. Import: the folder layout becomes span 1 in segpipe's TFRecord format.
    assert main(["import", "folders", "--images", str(my / "images"), "--masks", str(my / "masks"),
                 "--labels", str(my / "labels.json"), "--out", str(root / "data")]) == 0
    out = capsys.readouterr().out
    assert "40" in out
    assert json.loads((root / "data" / "labels.json").read_text()) == {str(k): v for k, v in CLASSES.items()}
    assert list((root / "data" / "span-1").glob("*.tfrecord*"))

    # 2. Train, evaluate and push with three classes (tiny settings; any model passes the gate).
    tiny = {"data.num_classes": 3, "transform.image_size": 32, "model.base_filters": 4, "model.depth": 2,
            "train.epochs": 1, "train.min_steps": 0, "train.batch_size": 8, "train.early_stopping_patience": 0,
            "evaluation.pixel_accuracy_threshold": 0.0, "evaluation.min_foreground_iou": 0.0,
            "evaluation.min_class_iou": 0.0}
    sets = [arg for key, value in tiny.items() for arg in ("--set", f"{key}={value}")]
    code = main(["run", "--root", str(root), *sets])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert f"pushed model: {root / 'serving' / '1'}" in captured.out
    version = root / "serving" / "1"
    assert (version / "saved_model.pb").is_file() and (version / "segpipe.json").is_file()

    assert main(["serving", "list", "--root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "1"

    # 3. Predict new images of any size and format through the served model.
    new = tmp_path / "new_scans"
    new.mkdir()
    rng = np.random.default_rng(99)
    grey, _ = textured_example(rng)
    Image.fromarray(grey, "L").save(new / "gray.jpg")
    Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]), "RGBA").resize((60, 50)).save(new / "rgba.png")
    preds = tmp_path / "predictions"
    assert main(["predict", "--model", str(root / "serving"), str(new), "--out", str(preds)]) == 0
    capsys.readouterr()
    for stem, size in (("gray", (WIDTH, HEIGHT)), ("rgba", (60, 50))):
        mask = Image.open(preds / f"{stem}_mask.png")
        assert mask.size == size and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
        assert (preds / f"{stem}_overlay.png").is_file()
