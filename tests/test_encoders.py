"""keras.applications backbones as U-Net encoders: build, input range, weights files, freezing, the pipeline."""
from __future__ import annotations

import numpy as np
import pytest

SIZE = 32
ALPHA = 0.35  # the smallest MobileNetV2: fast enough for the suite


def mobilenet(channels: int = 3, num_classes: int = 1, **kwargs: object):
    from segpipe.components.core.encoders import build_encoder_unet

    return build_encoder_unet("mobilenet_v2", (SIZE, SIZE, channels), num_classes, alpha=ALPHA, base_filters=4,
                              batch_norm=False, **kwargs)


def save_backbone(path, alpha: float = ALPHA):
    """A randomly initialised MobileNetV2, its weights saved as the Keras weights file a user would give."""
    import keras

    backbone = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=alpha, include_top=False, weights=None)
    backbone.save_weights(str(path))
    return backbone


# ------------------------------------------------------------------ architecture


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "resnet50"])
def test_each_encoder_builds_for_grey_and_rgb_input_with_the_unet_output(encoder):
    from segpipe.components.core.encoders import ENCODER_LAYER, build_encoder_unet
    from segpipe.components.core.model import build_unet

    alpha = ALPHA if encoder == "mobilenet_v2" else 1.0
    for channels, num_classes in ((1, 1), (3, 3)):
        model = build_encoder_unet(encoder, (SIZE, SIZE, channels), num_classes, alpha=alpha, base_filters=4)
        unet = build_unet((SIZE, SIZE, channels), num_classes, base_filters=2, depth=2)
        assert model.input_shape == unet.input_shape and model.output_shape == unet.output_shape
        assert model.name == f"unet_{encoder}" and model.get_layer("head").dtype_policy.name == "float32"
        # Four skips at strides 2..16 and the bottleneck at stride 32.
        assert [shape[1] for shape in model.get_layer(ENCODER_LAYER).output_shape] == [16, 8, 4, 2, 1]
        probabilities = model(np.random.default_rng(0).random((2, SIZE, SIZE, channels), np.float32)).numpy()
        assert probabilities.shape == (2, SIZE, SIZE, num_classes) and np.isfinite(probabilities).all()


def test_input_sizes_the_backbone_cannot_halve_five_times_are_rejected_naming_the_fields():
    from segpipe.components.core.encoders import build_encoder_unet
    from segpipe.pipeline.config import ConfigError, load_config

    with pytest.raises(ValueError, match="model.encoder mobilenet_v2 needs transform.image_size divisible by 32"):
        build_encoder_unet("mobilenet_v2", (48, 48, 3), 1, alpha=ALPHA)
    with pytest.raises(ConfigError, match=r"model.encoder resnet50 needs transform.image_size divisible by 32.*got 80"):
        load_config(overrides={"model.encoder": "resnet50", "transform.image_size": 80})
    # model.depth no longer constrains the size: a depth-6 U-Net would need 64, the backbone needs 32.
    assert load_config(overrides={"model.encoder": "resnet50", "model.depth": 6, "transform.image_size": 96})
    with pytest.raises(ConfigError, match="model.encoder_alpha: 0.3 is not one of"):
        load_config(overrides={"model.encoder": "mobilenet_v2", "model.encoder_alpha": 0.3})
    with pytest.raises(ConfigError, match="model.encoder_freeze_epochs: needs a backbone"):
        load_config(overrides={"model.encoder_freeze_epochs": 2})


def test_the_plan_picks_input_sizes_the_encoder_accepts():
    from segpipe.components.plan import CROP_SIZE, IMAGE_SIZE, Device, Fingerprint, plan_from_fingerprint

    fingerprint = Fingerprint(num_train=48, num_eval=6, median_height=96, median_width=160, size_spread=0.1,
                              median_aspect=1.6, class_fractions=(0.8, 0.2), class_thickness=(10.0, 10.0),
                              foreground_fraction=0.2, sampled=48)
    cpu = Device("cpu", 2)
    assert plan_from_fingerprint(fingerprint, 0.5, cpu, {}).value(IMAGE_SIZE) == 44  # the U-Net's own choice
    assert plan_from_fingerprint(fingerprint, 1, cpu, {}).value(CROP_SIZE) == 72  # ... and its patches
    for budget in (0.5, 1, 10):
        chosen = plan_from_fingerprint(fingerprint, budget, cpu, {}, size_multiple=32)
        size, crop = chosen.value(IMAGE_SIZE), chosen.value(CROP_SIZE)
        assert size % 32 == 0 and size >= 32 and crop % 32 == 0


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "resnet50"])
def test_the_input_layer_applies_the_backbones_preprocess_input_to_the_transform_output(encoder):
    import keras

    from segpipe.components.core.encoders import input_conversion

    preprocess = getattr(keras.applications, encoder).preprocess_input
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 5, 5, 3)).astype(np.float32)
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    cases = {  # Transform output x, with pixel / 255 = x * scale + offset
        "x / 255": (pixels / 255.0, [1.0] * 3, [0.0] * 3, pixels),
        "standardised": ((pixels / 255.0 - mean) / std, std, mean, pixels),
        "grey": (pixels[..., :1] / 255.0, [1.0], [0.0], np.repeat(pixels[..., :1], 3, axis=-1)),
    }
    for name, (x, scale, offset, rgb) in cases.items():
        kernel, bias = input_conversion(encoder, scale, offset)
        converted = x.astype(np.float64) @ kernel[0, 0] + bias
        np.testing.assert_allclose(converted, preprocess(rgb.copy()), atol=2e-3, err_msg=name)


# ------------------------------------------------------------------ weights files


def test_a_saved_backbone_loads_exactly_from_a_local_or_gfile_path(tmp_path):
    import tensorflow as tf

    from segpipe.components.core.encoders import encoder_of, load_encoder_weights

    saved = save_backbone(tmp_path / "mobilenet.weights.h5").get_weights()
    for path in (str(tmp_path / "mobilenet.weights.h5"), "ram://weights/mobilenet.weights.h5"):
        if path.startswith("ram://"):
            tf.io.gfile.copy(str(tmp_path / "mobilenet.weights.h5"), path, overwrite=True)
        model = mobilenet(channels=1)
        assert not all(np.array_equal(a, b) for a, b in zip(saved, encoder_of(model).get_weights()))
        load_encoder_weights(model, path)
        loaded = encoder_of(model).get_weights()
        assert len(loaded) == len(saved) and all(np.array_equal(a, b) for a, b in zip(saved, loaded))


def test_a_missing_unreadable_or_mismatched_weights_file_is_exit_2_naming_it(tmp_path):
    from segpipe.components.core.encoders import load_encoder_weights
    from segpipe.components.core.errors import EXIT_BAD_INPUT, BadInputError

    save_backbone(tmp_path / "wider.weights.h5", alpha=0.5)
    (tmp_path / "garbage.weights.h5").write_bytes(b"not HDF5")
    model = mobilenet()
    for name, problem in (("absent.weights.h5", "file not found"), ("garbage.weights.h5", "does not fit"),
                          ("wider.weights.h5", "does not fit"), ("weights.npz", "must be a Keras weights file")):
        path = str(tmp_path / name)
        with pytest.raises(BadInputError) as caught:
            load_encoder_weights(model, path)
        assert caught.value.exit_code == EXIT_BAD_INPUT
        message = str(caught.value)
        assert message.startswith(path) and "model.encoder_weights" in message and problem in message, message


def test_the_trainer_reads_a_standardising_transforms_scaling_off_its_graph(monkeypatch):
    import tensorflow as tf

    from segpipe.components import trainer, transform

    mean, std = np.array([0.3, 0.5, 0.7], np.float32), np.array([0.1, 0.2, 0.4], np.float32)

    class Standardising:  # transform_image as a `transform.standardize: true` graph computes it
        def transform_image(self, image_bytes):
            decode = lambda data: tf.image.decode_png(data, channels=3)  # noqa: E731
            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([8, 8, 3], tf.uint8))
            return (tf.cast(images, tf.float32) / 255.0 - mean) / std

    monkeypatch.setattr(transform, "load_serving_transform", lambda uri: Standardising())
    ranges = trainer.encoder_input_range("resnet50", "graph")
    np.testing.assert_allclose(ranges["input_scale"], std, rtol=1e-5)
    np.testing.assert_allclose(ranges["input_offset"], mean, rtol=1e-5)


def test_the_trainer_refuses_a_bad_weights_file_before_training(tmp_path, tiny_transform, dag_params):
    from segpipe.components import trainer
    from segpipe.components.core.errors import BadInputError

    assert trainer.encoder_input_range("unet", str(tiny_transform["graph"])) == {}
    ranges = trainer.encoder_input_range("mobilenet_v2", str(tiny_transform["graph"]))  # the tiny graph is x / 255
    np.testing.assert_allclose(ranges["input_scale"], [1.0] * 3, atol=1e-5)
    np.testing.assert_allclose(ranges["input_offset"], [0.0] * 3, atol=1e-5)

    save_backbone(tmp_path / "wider.weights.h5", alpha=0.5)
    params = dag_params("trainer", image_size=SIZE, base_model_uri=None, backup_dir=str(tmp_path / "backup"))
    params["model_config"] = {**params["model_config"], "encoder": "mobilenet_v2", "encoder_alpha": ALPHA,
                              "base_filters": 4, "encoder_weights": str(tmp_path / "wider.weights.h5")}
    with pytest.raises(BadInputError, match=r"wider.weights.h5: model.encoder_weights does not fit"):
        trainer.train_model(str(tiny_transform["transformed"]), str(tiny_transform["graph"]), str(tmp_path / "model"),
                            str(tmp_path / "run"), **params)
    assert not (tmp_path / "model").exists()
    assert not (tmp_path / "backup" / trainer.RUN_DIR / trainer.HISTORY_FILE).exists()  # no epoch ran


# ------------------------------------------------------------------ training


def small_encoder_model():
    """A model shaped like build_encoder_unet's (an `encoder` sub-model with batch norm, then a head)
    but tiny, so the freeze test traces its steps in moments."""
    import keras
    from keras import layers

    from segpipe.components.core.encoders import ENCODER_LAYER

    features = keras.Input((8, 8, 3))
    x = layers.BatchNormalization()(layers.Conv2D(4, 3, padding="same")(features))
    encoder = keras.Model(features, layers.Activation("relu")(x), name=ENCODER_LAYER)
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, layers.Conv2D(1, 1, activation="sigmoid", name="head")(encoder(inputs)))


def test_freeze_epochs_freeze_the_encoder_then_train_it_and_resume_in_either_phase(tmp_path):
    import keras

    from segpipe.components.core.encoders import encoder_of
    from segpipe.components.core.model import get_loss
    from segpipe.components.trainer import encoder_freeze_callback

    rng = np.random.default_rng(2)
    images, masks = rng.random((8, 8, 8, 3), np.float32), rng.integers(0, 2, (8, 8, 8))
    state = str(tmp_path / "state")

    def fit(epochs: int) -> tuple[keras.Model, list[list[np.ndarray]]]:
        """(model, [encoder, head] weights after each epoch this fit ran); two epochs frozen."""
        model = small_encoder_model()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=get_loss("bce"))
        parts = lambda: [encoder_of(model).get_weights(), model.get_layer("head").get_weights()]  # noqa: E731
        seen = [parts()]

        class Snapshot(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                seen.append(parts())

        callbacks = [encoder_freeze_callback(2), Snapshot(), keras.callbacks.BackupAndRestore(state, delete_checkpoint=False)]
        model.fit(images, masks, batch_size=4, epochs=epochs, callbacks=callbacks, verbose=0)
        return model, seen

    def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    model, (initial, epoch1) = fit(1)  # a run preempted after its first epoch
    assert same(epoch1[0], initial[0])  # frozen: weights and batch-norm statistics as they were ...
    assert not same(epoch1[1], initial[1])  # ... while the head trained
    assert encoder_of(model).trainable  # a run ends with the whole model trainable
    resumed, (fresh, epoch2, epoch3) = fit(3)  # restores epoch 1, then epoch 2 frozen, epoch 3 not
    assert not same(fresh[0], epoch1[0])  # (a fresh model: the restore below is BackupAndRestore's)
    assert same(epoch2[0], epoch1[0]) and not same(epoch2[1], epoch1[1])
    assert not same(epoch3[0], epoch2[0])  # unfrozen in the rebuilt step function: the encoder trains
    assert encoder_of(resumed).trainable


def test_warm_start_never_mixes_encoders(rule_models):
    from segpipe.components.trainer import warm_start

    result = warm_start(mobilenet(), str(rule_models["bright"]))  # same input and output shapes, no backbone
    assert result["used"] is False and "vs unet_mobilenet_v2" in result["reason"]


@pytest.mark.slow
def test_a_pipeline_with_a_mobilenet_encoder_trains_exports_and_serves_png_bytes(tmp_path, write_tiny_span, tiny_segpipe):
    import keras

    from segpipe.components.core import serving
    from segpipe.components.core.data_format import encode_png

    root = tmp_path / "root"
    write_tiny_span(root / "data", 1, num=24, size=(32, 32))
    saved = save_backbone(root / "backbone.weights.h5").get_weights()
    segpipe = tiny_segpipe(root, **{"model.encoder": "mobilenet_v2", "model.encoder_alpha": ALPHA,
                                    "model.encoder_weights": "backbone.weights.h5",  # relative to the root
                                    "model.encoder_freeze_epochs": 1})  # the one epoch trains the decoder only
    assert segpipe("run") == 0

    version = root / "serving" / "1"
    loaded = serving.load_serving_model(version)
    assert set(loaded.signatures) == {serving.SERVING_BYTES, serving.SERVING_TENSOR}
    image = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    outputs = serving.predict_bytes(loaded, [encode_png(image)])
    assert outputs[serving.PROBABILITIES].shape == (1, SIZE, SIZE, 1)
    assert outputs[serving.CLASS_MASK].shape == (1, SIZE, SIZE)
    keras_model = keras.saving.load_model(version / "model.keras", compile=False)  # built-in layers only
    assert keras_model.name == "unet_mobilenet_v2"
    # The backbone is the file's, untouched by the frozen epoch, and trainable again in the saved model.
    encoder = keras_model.get_layer("encoder")
    assert all(np.array_equal(a, b) for a, b in zip(encoder.get_weights(), saved)) and encoder.trainable
