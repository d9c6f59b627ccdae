"""Importers on tiny fabricated datasets: every conversion and every bad-input case."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from segpipe.components.core import data_format
from segpipe.components.core.errors import BadInputError
from segpipe.components.tools.importers import import_folders, import_oxford_pets, load_mask
from segpipe.pipeline.cli import main

H, W = 12, 16


def _rgb(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _ids(seed: int, values: tuple[int, ...], height: int = H, width: int = W) -> np.ndarray:
    dtype = np.uint8 if max(values) < 256 else np.uint16
    return np.random.default_rng(seed).choice(np.array(values, dtype=dtype), size=(height, width))


def _save(path: Path, array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def read_span(folder: Path) -> dict[str, tuple[bytes, np.ndarray, np.ndarray]]:
    """id -> (stored image bytes, decoded image, decoded mask), read back through tf.data."""
    import tensorflow as tf

    files = sorted(str(p) for p in folder.glob("*.tfrecord*"))
    out = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example_id, image, mask = data_format.parse_example(record.numpy())
        decoded_mask = data_format.decode_image(mask)
        assert decoded_mask.ndim == 2, f"{example_id}: mask must be one channel"
        out[example_id] = (image, data_format.decode_image(image), decoded_mask)
    return out


# ------------------------------------------------------------------ folders


@pytest.fixture
def folders(tmp_path) -> dict:
    """A folder pair holding every supported variant and every bad-input case."""
    images, masks, outside = tmp_path / "images", tmp_path / "masks", tmp_path / "outside"
    expect = {}  # stem -> (image array, mask array) for the pairs that must be imported
    png_bytes = _save(images / "rgb_png.png", _rgb(1))
    _save(masks / "rgb_png.png", _ids(1, (0, 1, 2, 255)))
    expect["rgb_png"] = (_rgb(1), _ids(1, (0, 1, 2, 255)))

    jpeg_bytes = _save(images / "rgb_jpeg.jpg", _rgb(2), "JPEG", quality=95)
    _save(masks / "rgb_jpeg.png", _ids(2, (0, 255)))  # binary {0, 255} -> {0, 1}
    expect["rgb_jpeg"] = (np.asarray(Image.open(images / "rgb_jpeg.jpg")), _ids(2, (0, 255)) // 255)

    gray = _rgb(3)[..., 0]
    _save(images / "gray.png", gray)
    palette = Image.fromarray(_ids(3, (0, 1, 2)), mode="L").convert("P")  # palette indices = ids
    palette.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * 759)
    palette.save(masks / "gray.png")
    expect["gray"] = (np.repeat(gray[..., None], 3, axis=2), _ids(3, (0, 1, 2)))

    rgba = np.concatenate([_rgb(4), np.full((H, W, 1), 255, np.uint8)], axis=2)
    rgba[:4, :, 3] = 0  # transparent rows become black
    _save(images / "rgba.png", rgba)
    _save(masks / "rgba.png", _ids(4, (0, 1)).astype(np.uint16) * 65535)  # 16-bit binary
    composited = _rgb(4).copy()
    composited[:4] = 0
    expect["rgba"] = (composited, _ids(4, (0, 1)))

    _save(images / "sixteen.png", _rgb(5))
    _save(masks / "sixteen.png", _ids(5, (0, 1, 2)).astype(np.uint16))  # 16-bit class ids
    expect["sixteen"] = (_rgb(5), _ids(5, (0, 1, 2)))

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise (portrait)
    _save(images / "rotated.jpg", _rgb(6), "JPEG", quality=95, exif=exif)
    _save(masks / "rotated.png", _ids(6, (0, 1), height=W, width=H))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(images / "rotated.jpg")))
    assert upright.shape == (W, H, 3)
    expect["rotated"] = (upright, _ids(6, (0, 1), height=W, width=H))

    # bad inputs
    (images / "truncated.png").write_bytes(png_bytes[: len(png_bytes) // 2])
    _save(masks / "truncated.png", _ids(7, (0, 1)))
    (images / "truncated_jpeg.jpg").write_bytes(jpeg_bytes[:-30])
    _save(masks / "truncated_jpeg.png", _ids(7, (0, 1)))
    (images / "garbage.png").write_bytes(b"this is not an image")
    _save(masks / "garbage.png", _ids(7, (0, 1)))
    os.symlink(images / "does_not_exist.png", images / "dangling.png")
    _save(masks / "dangling.png", _ids(7, (0, 1)))
    _save(images / "no_mask.png", _rgb(8))
    _save(masks / "no_image.png", _ids(8, (0, 1)))
    _save(images / "mismatch.png", _rgb(9))
    _save(masks / "mismatch.png", _ids(9, (0, 1), height=H + 1))
    _save(images / "jpeg_mask.png", _rgb(10))
    _save(masks / "jpeg_mask.jpg", _ids(10, (0, 255)), "JPEG")  # lossy: rejected
    _save(images / "colour_mask.png", _rgb(11))
    _save(masks / "colour_mask.png", _rgb(11))
    _save(images / "big_ids.png", _rgb(12))
    _save(masks / "big_ids.png", _ids(12, (0, 300)))
    _save(images / "twice.png", _rgb(13))
    _save(images / "twice.jpg", _rgb(13), "JPEG")
    _save(masks / "twice.png", _ids(13, (0, 1)))
    _save(outside / "escape_abs.png", _rgb(14))
    _save(outside / "escape_dots.png", _rgb(15))
    os.symlink(outside / "escape_abs.png", images / "escape_abs.png")
    os.symlink(Path("..") / "outside" / "escape_dots.png", images / "escape_dots.png")
    _save(masks / "escape_abs.png", _ids(14, (0, 1)))
    _save(masks / "escape_dots.png", _ids(15, (0, 1)))
    _save(images / "._rgb_png.png", _rgb(16))  # macOS companion file: ignored, not reported
    (images / "notes.txt").write_text("ignored: not an image suffix")
    os.symlink(images / "rgb_png.png", images / "inside_link.png")  # a link inside the folder is fine
    _save(masks / "inside_link.png", _ids(1, (0, 1, 2, 255)))
    expect["inside_link"] = expect["rgb_png"]

    skipped = {
        "truncated.png": "truncated or corrupt image",
        "truncated_jpeg.jpg": "truncated or corrupt image",
        "garbage.png": "not an image",
        "dangling.png": "unreadable file",
        "no_mask.png": "missing mask",
        "no_image.png": "missing image",
        "mismatch.png": "size mismatch",
        "jpeg_mask.jpg": "JPEG mask",
        "colour_mask.png": "colour mask",
        "big_ids.png": "class id out of range",
        "twice.png": "duplicate stem",
        "twice.jpg": "duplicate stem",
        "escape_abs.png": "escapes the input folder",
        "escape_dots.png": "escapes the input folder",
    }
    return {"images": images, "masks": masks, "expect": expect, "skipped": skipped,
            "png_bytes": png_bytes, "jpeg_bytes": jpeg_bytes}


def test_folders_import_converts_variants_and_reports_every_bad_input(folders, tmp_path):
    root = tmp_path / "data"
    report = import_folders(folders["images"], folders["masks"], root, span=0, progress=False)

    reported = {Path(path).name: kind for path, kind, _ in report.skipped}
    assert reported == folders["skipped"]
    assert report.imported == len(folders["expect"])
    assert report.converted == 3  # gray, rgba, rotated
    assert report.skip_counts()["escapes the input folder"] == 2
    assert "skipped 14:" in report.summary() and "2 escapes the input folder" in report.summary()

    stored = read_span(root / "span-0")
    assert stored.keys() == folders["expect"].keys()
    for stem, (image, mask) in folders["expect"].items():
        np.testing.assert_array_equal(stored[stem][1], image, err_msg=stem)
        np.testing.assert_array_equal(stored[stem][2], mask, err_msg=stem)
    # RGB PNG/JPEG keep their original bytes; converted images become PNG
    assert stored["rgb_png"][0] == folders["png_bytes"]
    assert stored["rgb_jpeg"][0] == folders["jpeg_bytes"]
    assert stored["rotated"][0].startswith(b"\x89PNG")
    assert data_format.read_labels(root) == {0: "background", 1: "class_1", 2: "class_2"}


def test_folders_cli_exit_codes_and_skip_bad(folders, tmp_path, capsys):
    args = ["import", "folders", "--images", str(folders["images"]), "--masks", str(folders["masks"]),
            "--out", str(tmp_path / "data")]
    assert main(args + ["--span", "1"]) == 2
    captured = capsys.readouterr()
    assert "imported 7 examples" in captured.out and "skipped 14" in captured.out
    assert "train with data.num_classes=3" in captured.out
    assert "14 input(s) skipped" in captured.err and "Traceback" not in captured.err
    assert main(args + ["--span", "2", "--skip-bad"]) == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["labels.json", "span-1", "span-2"]
    assert main(args + ["--span", "2", "--skip-bad"]) == 2
    assert "span 2 already exists" in capsys.readouterr().err


def test_folders_with_labels_file_skips_masks_with_unknown_ids(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _save(images / "a.png", _rgb(1))
    _save(masks / "a.png", _ids(1, (0, 1)))
    _save(images / "b.png", _rgb(2))
    _save(masks / "b.png", _ids(2, (0, 3)))
    labels = tmp_path / "my_labels.json"
    labels.write_text(json.dumps({"0": "background", "1": "cat", "2": "dog"}))
    report = import_folders(images, masks, tmp_path / "data", labels_path=labels, progress=False)
    assert report.span == 1 and report.imported == 1
    assert [(Path(p).name, kind) for p, kind, _ in report.skipped] == [("b.png", "class id not in labels")]
    assert data_format.read_labels(tmp_path / "data") == {0: "background", 1: "cat", 2: "dog"}

    labels.write_text(json.dumps({"1": "cat"}))
    with pytest.raises(BadInputError, match="my_labels.json: class 0 .* missing"):
        import_folders(images, masks, tmp_path / "data", labels_path=labels, progress=False)


def test_folders_with_nothing_valid_writes_nothing(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images).mkdir()
    (images / "x.png").write_bytes(b"broken")
    _save(masks / "x.png", _ids(1, (0, 1)))
    with pytest.raises(BadInputError, match="no valid image/mask pairs .* 1 not an image"):
        import_folders(images, masks, tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "span-1").exists()
    assert main(["import", "folders", "--images", str(tmp_path / "nope"), "--masks", str(masks),
                 "--out", str(tmp_path / "data")]) == 2
    assert "nope: input folder not found" in capsys.readouterr().err


def test_load_mask_reads_palette_16bit_and_bilevel(tmp_path):
    ids = _ids(0, (0, 1, 4))
    img = Image.fromarray(ids, mode="L").convert("P")
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "p.png"), ids)
    Image.fromarray(ids.astype(bool)).convert("1").save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "bilevel.png"), (ids > 0).astype(np.uint8))
    _save(tmp_path / "gray_rgb.png", np.repeat(ids[..., None], 3, axis=2))
    np.testing.assert_array_equal(load_mask(tmp_path / "gray_rgb.png"), ids)


# ------------------------------------------------------------------ Oxford-IIIT Pet


@pytest.fixture
def oxford(tmp_path) -> Path:
    """Oxford layout: images/*.jpg, annotations/trimaps/*.png (1 pet, 2 background, 3 border)."""
    root = tmp_path / "oxford-iiit-pet"
    trimap = np.full((H, W), 2, np.uint8)
    trimap[3:9, 4:12] = 3
    trimap[4:8, 5:11] = 1
    for name in ("Abyssinian_1", "beagle_2"):
        _save(root / "images" / f"{name}.jpg", _rgb(len(name)), "JPEG")
        _save(root / "annotations" / "trimaps" / f"{name}.png", trimap)
    # a PNG with RGBA saved under .jpg, as in the real dataset: converted
    _save(root / "images" / "Egyptian_Mau_3.jpg", np.dstack([_rgb(3), np.full((H, W), 255, np.uint8)]))
    _save(root / "annotations" / "trimaps" / "Egyptian_Mau_3.png", trimap)
    _save(root / "images" / "no_trimap.jpg", _rgb(4), "JPEG")
    _save(root / "annotations" / "trimaps" / "no_image.png", trimap)
    _save(root / "images" / "odd_values.jpg", _rgb(5), "JPEG")
    _save(root / "annotations" / "trimaps" / "odd_values.png", trimap * 2)  # values 2, 4, 6
    (root / "images" / "cut.jpg").write_bytes((root / "images" / "beagle_2.jpg").read_bytes()[:200])
    _save(root / "annotations" / "trimaps" / "cut.png", trimap)
    _save(root / "annotations" / "trimaps" / "._Abyssinian_1.png", trimap)  # tarball companion: ignored
    (root / "images" / "Abyssinian_1.mat").write_bytes(b"MATLAB")  # the dataset ships these: ignored
    return root


@pytest.mark.parametrize("border, value", [("foreground", 1), ("background", 0), ("ignore", 255)])
def test_oxford_trimaps_map_to_binary_masks(oxford, tmp_path, border, value):
    root = tmp_path / "data"
    report = import_oxford_pets(oxford, root, span=3, border=border, progress=False)
    assert report.imported == 3 and report.converted == 1
    assert {Path(p).name: kind for p, kind, _ in report.skipped} == {
        "no_trimap.jpg": "missing mask",
        "no_image.png": "missing image",
        "odd_values.png": "unexpected trimap value",
        "cut.jpg": "truncated or corrupt image",
    }
    stored = read_span(root / "span-3")
    assert sorted(stored) == ["Abyssinian_1", "Egyptian_Mau_3", "beagle_2"]
    mask = stored["beagle_2"][2]
    assert mask[0, 0] == 0 and mask[5, 7] == 1 and mask[3, 4] == value
    assert set(np.unique(mask).tolist()) == {0, 1, value}
    assert stored["beagle_2"][0] == (oxford / "images" / "beagle_2.jpg").read_bytes()
    assert stored["Egyptian_Mau_3"][1].shape == (H, W, 3)
    assert data_format.read_labels(root) == {0: "background", 1: "pet"}


def test_oxford_cli(oxford, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["import", "oxford-pets", str(oxford), "--out", str(out), "--border", "ignore"]) == 2
    assert "imported 3 examples" in capsys.readouterr().out
    assert main(["import", "oxford-pets", str(oxford), "--out", str(out), "--skip-bad"]) == 0
    assert data_format.list_spans(out) == [1, 2]
    assert main(["import", "oxford-pets", str(tmp_path), "--out", str(out)]) == 2
    assert f"{tmp_path / 'images'}: input folder not found" in capsys.readouterr().err
