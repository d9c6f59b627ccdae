"""The trainer's augmentation as one selection of pixels: the mask's zoom is TF's nearest resize."""
from __future__ import annotations

import numpy as np

from segpipe.components import trainer


def test_nearest_sources_follow_tf_image_resize_for_every_cut():
    import tensorflow as tf

    for side in (5, 16):
        grid = tf.reshape(tf.range(side * side), [1, side, side, 1])
        for cut in range(1, side + 1):
            for start in sorted({0, (side - cut) // 2, side - cut}):
                window = grid[:, start : start + cut, start : start + cut]
                expected = tf.image.resize(window, [side, side], method="nearest")[0, ..., 0].numpy()
                index = trainer.nearest_sources(side, tf.constant(cut), tf.constant(start)).numpy()
                np.testing.assert_array_equal(grid.numpy()[0, ..., 0][np.ix_(index, index)], expected)


def test_mask_zoom_is_the_nearest_resize_of_the_image_window():
    """Masks zoom through the same window as the images: bilinear on the image, nearest on the
    mask, as tf.image.resize does them (every pixel distinct, so the window is found)."""
    import tensorflow as tf

    size = 12
    images = np.arange(4 * size * size, dtype=np.float32).reshape(4, size, size, 1)
    masks = images[..., 0].astype(np.int32)
    tf.random.set_seed(2)
    out_images, out_masks = trainer.augment_batch(tf.constant(images), tf.constant(masks), flip=False, rot90=False,
                                                  zoom=0.5)
    assert out_masks.dtype == tf.int32 and out_masks.shape == (4, size, size)
    windows = [(cut, top, left) for cut in range(1, size + 1) for top in range(size - cut + 1)
               for left in range(size - cut + 1)
               if np.array_equal(tf.image.resize(masks[:, top : top + cut, left : left + cut, None], [size, size],
                                                 method="nearest")[..., 0].numpy(), out_masks.numpy())]
    assert len(windows) == 1
    cut, top, left = windows[0]
    assert cut < size  # zoomed in
    expected = tf.image.resize(images[:, top : top + cut, left : left + cut], [size, size], method="bilinear")
    np.testing.assert_allclose(out_images.numpy(), expected.numpy(), rtol=1e-6, atol=1e-3)


def test_normalising_while_moving_equals_normalising_first():
    """augment_batch's `offset`/`scale` (parse_batch's uint8 path) normalises in the selection: the
    same draws on the normalised floats give the same batch."""
    import tensorflow as tf

    from segpipe.components.transform import normalize_pixels

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    masks = rng.integers(0, 3, (5, 16, 16)).astype(np.int32)
    offset, scale = tf.constant([100.0, 120.0, 90.0]), tf.constant([0.02, 0.03, 0.025])
    for options in ({"flip": True, "rot90": True, "zoom": 0.0, "crop": 8}, {"flip": True, "rot90": False, "zoom": 0.3}):
        tf.random.set_seed(9)
        fused = trainer.augment_batch(tf.constant(pixels), tf.constant(masks), **options, offset=offset, scale=scale)
        tf.random.set_seed(9)
        first = trainer.augment_batch(normalize_pixels(pixels, offset, scale), tf.constant(masks), **options)
        assert fused[0].dtype == tf.float32
        np.testing.assert_array_equal(fused[1].numpy(), first[1].numpy())
        np.testing.assert_allclose(fused[0].numpy(), first[0].numpy(), atol=1e-5)
