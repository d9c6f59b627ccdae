"""segpipe predict: any size and format through the serving signature; bad files reported, rest written."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.components.core import artifacts

from segpipe.components.tools import predict
from segpipe.pipeline import cli


def bright_rectangle(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    y0, x0 = height // 4, width // 3
    image[y0 : y0 + height // 2, x0 : x0 + width // 3] = 230
    mask[y0 : y0 + height // 2, x0 : x0 + width // 3] = 1
    return image, mask


def save(image: np.ndarray, path: Path, fmt: str, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def image_files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "in"
    files = {
        "png": save(bright_rectangle(64, 96, 0)[0], folder / "wide.png", "PNG"),
        "jpeg": save(bright_rectangle(53, 37, 1)[0], folder / "odd.jpg", "JPEG"),
        "gray": save(bright_rectangle(40, 40, 2)[0], folder / "gray.png", "PNG", "L"),
        "rgba": save(bright_rectangle(48, 32, 3)[0], folder / "alpha.png", "PNG", "RGBA"),
        "bmp": save(bright_rectangle(30, 50, 4)[0], folder / "bitmap.bmp", "BMP"),
    }
    (folder / "notes.txt").write_text("not an image, and not an image suffix: skipped in folders")
    return files


def reference_mask(model_uri: Path, path: Path) -> np.ndarray:
    """The signature called directly on the RGB PNG of the file, its probabilities at the original size."""
    from segpipe.components.core import serving

    rgb = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    data = path.read_bytes() if path.suffix in (".png", ".jpg") and Image.open(path).mode == "RGB" else buf.getvalue()
    loaded = serving.load_serving_model(model_uri / artifacts.SAVED_MODEL_DIR)
    outputs = serving.predict_bytes(loaded, [data])
    full = serving.class_mask_at_size(outputs[serving.PROBABILITIES][0], rgb.height, rgb.width)
    # Bilinear probabilities move borders by less than a model pixel: nearest of class_mask agrees almost everywhere.
    nearest = np.asarray(Image.fromarray(outputs[serving.CLASS_MASK][0].astype(np.uint8)).resize(rgb.size, Image.NEAREST))
    assert (full == nearest).mean() > 0.9
    return full


def test_masks_and_overlays_at_original_size(tmp_path: Path, rule_models: dict, image_files: dict) -> None:
    out = tmp_path / "out"
    result = predict.predict_images(rule_models["bright"], [tmp_path / "in"], out, batch_size=2)
    assert result["failed"] == [] and result["total"] == 5
    for path in image_files.values():
        mask = np.asarray(Image.open(out / f"{path.stem}_mask.png"))
        original = Image.open(path)
        assert mask.shape == (original.height, original.width)
        assert set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask, reference_mask(rule_models["bright"], path))
        overlay = Image.open(out / f"{path.stem}_overlay.png")
        assert overlay.size == original.size and overlay.mode == "RGB"
    # The bright rectangle is found: the full-size mask matches the truth on most pixels.
    image, truth = bright_rectangle(64, 96, 0)
    mask = np.asarray(Image.open(out / "wide_mask.png"))
    assert (mask == truth).mean() > 0.95
    overlay = np.asarray(Image.open(out / "wide_overlay.png"))
    assert (overlay[truth == 1] != image[truth == 1]).any() and (overlay[mask == 0] == image[mask == 0]).all()


def test_bad_images_are_reported_and_the_rest_continue(
    tmp_path: Path, rule_models: dict, image_files: dict, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.png").write_text("this is not a PNG")
    truncated = bad / "truncated.jpg"
    truncated.write_bytes(image_files["jpeg"].read_bytes()[:40])
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    argv = ["predict", "--model", str(rule_models["bright"]), str(image_files["png"]), str(bad), str(missing),
            str(image_files["jpeg"]), "--out", str(out)]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    for path in (bad / "text.png", truncated, missing):
        assert str(path) in captured.err
    assert "3 of 5 image(s) failed" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["odd_mask.png", "odd_overlay.png", "wide_mask.png", "wide_overlay.png"]


def test_batch_rejected_by_the_graph_is_retried_one_by_one(
    tmp_path: Path, rule_models: dict, image_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = image_files["png"].read_bytes()
    real = predict.predict_probabilities

    def refuse_poison(model, encoded):
        if poison in encoded:
            raise ValueError("InvalidArgumentError: cannot decode")
        return real(model, encoded)

    monkeypatch.setattr(predict, "predict_probabilities", refuse_poison)
    result = predict.predict_images(rule_models["bright"], [tmp_path / "in"], tmp_path / "out", batch_size=8)
    assert result["failed"] == [(str(image_files["png"]), "the serving signature could not decode this image")]
    assert len(result["written"]) == 4


def test_serving_dir_model_and_duplicate_names(tmp_path: Path, rule_models: dict) -> None:
    serving = tmp_path / "serving"
    for version, name in ((1, "background"), (2, "bright")):  # the highest wins
        shutil.copytree(rule_models[name] / artifacts.SAVED_MODEL_DIR, serving / str(version))
        (serving / str(version) / "segpipe.json").write_text("{}")  # what makes it a pushed version
    image = bright_rectangle(40, 40, 5)[0]
    first = save(image, tmp_path / "a" / "x.png", "PNG")
    second = save(image, tmp_path / "b" / "x.png", "PNG")
    result = predict.predict_images(serving, [first, second], tmp_path / "out")
    assert [Path(p).name for p in result["written"]] == ["x_mask.png", "x_2_mask.png"]
    assert np.asarray(Image.open(tmp_path / "out" / "x_2_mask.png")).max() == 1  # bright model, not background
