"""Training on patches (train.crop_size): exact sub-windows, foreground sampling, whole-image export."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from segpipe.components import trainer
from segpipe.components.core.encoders import crop_size_problem
from segpipe.components.core.errors import BadInputError
from segpipe.pipeline.config import ConfigError, load_config


def find_window(image: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where `patch` equals the window of `image` there."""
    side = patch.shape[0]
    return [(top, left) for top in range(image.shape[0] - side + 1) for left in range(image.shape[1] - side + 1)
            if np.array_equal(image[top : top + side, left : left + side], patch)]


def test_patches_are_exact_windows_of_image_and_mask_together():
    import tensorflow as tf

    images = np.arange(16 * 12 * 12 * 3, dtype=np.float32).reshape(16, 12, 12, 3)  # every pixel distinct
    masks = (np.arange(16 * 144).reshape(16, 12, 12) % 5).astype(np.int32)
    tf.random.set_seed(5)
    out_images, out_masks = trainer.augment_batch(tf.constant(images), tf.constant(masks), flip=False, rot90=False,
                                                  zoom=0.0, crop=4)
    assert out_images.shape == (16, 4, 4, 3) and out_masks.shape == (16, 4, 4)
    corners = set()
    for image, mask, patch, patch_mask in zip(images, masks, out_images.numpy(), out_masks.numpy()):
        (where,) = find_window(image, patch)  # a window of its own image, nothing resampled
        top, left = where
        np.testing.assert_array_equal(mask[top : top + 4, left : left + 4], patch_mask)
        corners.add(where)
    assert len(corners) > 8  # placements vary


def test_patches_with_flips_hold_the_same_pixels_as_a_window():
    import tensorflow as tf

    images = np.arange(8 * 8 * 8 * 1, dtype=np.float32).reshape(8, 8, 8, 1)
    masks = np.zeros((8, 8, 8), np.int32)
    out_images, _ = trainer.augment_batch(tf.constant(images), tf.constant(masks), flip=True, rot90=True, zoom=0.0, crop=4)
    for image, patch in zip(images[..., 0], out_images.numpy()[..., 0]):
        windows = [image[t : t + 4, l : l + 4] for t in range(5) for l in range(5)]
        assert any(sorted(w.ravel()) == sorted(patch.ravel()) for w in windows)


def test_a_third_of_patches_centre_on_foreground_so_a_rare_class_is_seen():
    """One foreground pixel in a 64 x 64 mask: a random 8 x 8 patch holds it ~1.2% of the time, the
    sampler's foreground third brings that to about a third."""
    import tensorflow as tf

    masks = np.zeros((400, 64, 64), np.int32)
    masks[:, 50, 7] = 3
    masks[:200, 0, 0] = 255  # ignored pixels are never a target
    images = np.zeros((400, 64, 64, 1), np.float32)
    tf.random.set_seed(11)
    _, patches = trainer.augment_batch(tf.constant(images), tf.constant(masks), flip=False, rot90=False, zoom=0.0,
                                       crop=8)
    seen = float(np.mean([(p == 3).any() for p in patches.numpy()]))
    assert 0.25 < seen < 0.45


def test_crop_size_is_checked_against_the_input_and_the_model():
    assert crop_size_problem(0, 128, depth=4, encoder="unet") is None
    assert crop_size_problem(128, 128, depth=4, encoder="unet") is None
    assert "larger than transform.image_size" in crop_size_problem(256, 128, depth=4, encoder="unet")
    assert "2**model.depth" in crop_size_problem(40, 128, depth=4, encoder="unet")
    assert "output stride" in crop_size_problem(48, 128, depth=4, encoder="mobilenet_v2")
    with pytest.raises(ConfigError, match="train.crop_size"):
        load_config(overrides={"train.crop_size": 200, "transform.image_size": 128})


def test_training_on_patches_exports_a_whole_image_model(tiny_transform, tmp_path):
    """A crop-trained model validates on whole inputs and serves at the Transform's size."""
    import keras

    cfg = load_config(overrides={"train.epochs": 2, "train.batch_size": 2, "train.shuffle_buffer": 8,
                                 "train.min_steps": 0, "train.crop_size": 16})
    summary = trainer.train_model(
        str(tiny_transform["transformed"]), str(tiny_transform["graph"]), str(tmp_path / "model"),
        str(tmp_path / "run"), base_model_uri=None, backup_dir=str(tmp_path / "backup"), num_classes=2,
        image_size=32, model_config={"base_filters": 4, "depth": 2, "batch_norm": True, "dropout": 0.0,
                                     "bn_momentum": "auto"},
        train_config=dataclasses.asdict(cfg.train))
    assert summary["epochs"] == 2 and 0.0 <= summary["metrics"]["val_iou"] <= 1.0
    exported = keras.saving.load_model(str(trainer.find_keras_model(str(tmp_path / "model"))), compile=False)
    assert tuple(exported.input_shape) == (None, 32, 32, 3)
    with pytest.raises(BadInputError, match="train.crop_size 10 is not divisible by 4"):
        trainer.train_model(
            str(tiny_transform["transformed"]), str(tiny_transform["graph"]), str(tmp_path / "m2"), str(tmp_path / "r2"),
            base_model_uri=None, backup_dir=str(tmp_path / "b2"), num_classes=2, image_size=32,
            model_config={"base_filters": 4, "depth": 2, "batch_norm": False, "dropout": 0.0, "bn_momentum": "auto"},
            train_config={**dataclasses.asdict(cfg.train), "crop_size": 10})
