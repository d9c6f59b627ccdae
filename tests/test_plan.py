"""The Plan step: its rules on made-up fingerprints, explicit settings winning, its fingerprint of real
masks, the plan reaching Transform and the Trainer in a tiny pipeline run, and its Kubeflow task."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from segpipe.components import plan
from segpipe.components.plan import Device, Fingerprint, plan_from_fingerprint

CPU2 = Device("cpu", 2)


def fingerprint(**changes: object) -> Fingerprint:
    """The demo data's kind: 800 training images of ~176 px, one thick foreground class at ~30%."""
    base = Fingerprint(num_train=800, num_eval=100, median_height=176, median_width=176, size_spread=0.25,
                       median_aspect=1.0, class_fractions=(0.7, 0.3), class_thickness=(None, 30.0),
                       foreground_fraction=0.3, sampled=200)
    return dataclasses.replace(base, **changes)


def values(result: plan.Plan) -> dict:
    return {c.field: c.value for c in result.choices}


def reason(result: plan.Plan, name: str) -> str:
    return next(c.reason for c in result.choices if c.field == name)


# ------------------------------------------------------------------ the rules


def test_large_thick_objects_get_the_smallest_input_and_a_cpu_recipe():
    result = plan_from_fingerprint(fingerprint(), 10, CPU2, {})
    chosen = values(result)
    assert chosen[plan.IMAGE_SIZE] == 64 and chosen[plan.DEPTH] == 3  # 30 px objects stay thick at 64 px
    assert "raised to 64 px" in reason(result, plan.IMAGE_SIZE)
    assert (chosen[plan.BASE_FILTERS], chosen[plan.BATCH_SIZE], chosen[plan.BATCH_NORM]) == (16, 8, True)
    assert chosen[plan.EPOCHS] == 10 and chosen[plan.MIN_STEPS] == 1000  # 10 x 100 steps
    assert chosen[plan.LOSS] == "bce" and chosen[plan.CLASS_WEIGHTS] == "none"
    assert chosen[plan.AUGMENT_ROT90] is True and chosen[plan.AUGMENT_ZOOM] == 0.1
    assert result.estimate["within_budget"] and result.estimate["minutes"] < 10
    assert all(c.source == plan.PLANNED for c in result.choices)
    assert result.overrides == chosen


def test_thin_structures_want_full_resolution_and_the_budget_cuts_it():
    thin = fingerprint(num_train=48, num_eval=6, median_height=512, median_width=512,
                       class_fractions=(0.96, 0.04), class_thickness=(None, 3.0))
    on_cpu = plan_from_fingerprint(thin, 10, CPU2, {})
    assert "capped at 512 px" in reason(on_cpu, plan.IMAGE_SIZE) and values(on_cpu)[plan.IMAGE_SIZE] == 512
    # Whole 512 px inputs do not fit 10 minutes on 2 cores: the same steps on patches, at full width.
    crop = values(on_cpu)[plan.CROP_SIZE]
    assert 128 <= crop < 512 and crop % 2 ** values(on_cpu)[plan.DEPTH] == 0
    assert "patches of the 512 px input" in reason(on_cpu, plan.CROP_SIZE)
    assert values(on_cpu)[plan.BASE_FILTERS] == 16 and on_cpu.estimate["steps"] >= plan.TARGET_STEPS
    assert on_cpu.estimate["within_budget"]
    assert values(on_cpu)[plan.LOSS] == "dice_bce" and values(on_cpu)[plan.CLASS_WEIGHTS] == "auto"

    # 6 eval images of 512 px would cost about as much as 48 train patches: validated every few epochs.
    assert values(on_cpu)[plan.VALIDATION_FREQ] > 1 and "eval images on whole inputs" in reason(on_cpu, plan.VALIDATION_FREQ)
    assert values(plan_from_fingerprint(fingerprint(), 10, CPU2, {}))[plan.VALIDATION_FREQ] == 1  # 800 train images

    shorter = plan_from_fingerprint(thin, 1.5, CPU2, {})  # fewer steps on the smallest patch before a lower resolution
    assert values(shorter)[plan.IMAGE_SIZE] == 512 and 64 <= values(shorter)[plan.CROP_SIZE] < 80
    assert plan.MIN_PLANNED_STEPS <= shorter.estimate["steps"] < plan.TARGET_STEPS and shorter.estimate["within_budget"]
    tight = plan_from_fingerprint(thin, 0.5, CPU2, {})  # resolution is the last thing the budget cuts
    assert values(tight)[plan.IMAGE_SIZE] < 512 and "to fit the 0.5-minute budget" in reason(tight, plan.IMAGE_SIZE)
    assert tight.estimate["within_budget"] and tight.estimate["steps"] >= plan.MIN_PLANNED_STEPS

    on_gpu = plan_from_fingerprint(thin, 10, Device("gpu", 1), {})
    assert values(on_gpu)[plan.IMAGE_SIZE] == 512 and values(on_gpu)[plan.BASE_FILTERS] == 32
    assert values(on_gpu)[plan.DEPTH] == 5 and values(on_gpu)[plan.BATCH_SIZE] == 8  # large input: smaller batch

    generous = plan_from_fingerprint(thin, 600, CPU2, {})
    assert values(generous)[plan.IMAGE_SIZE] == 512 and "budget" not in reason(generous, plan.IMAGE_SIZE)
    assert values(generous)[plan.CROP_SIZE] == 0 and values(on_gpu)[plan.CROP_SIZE] == 0  # whole inputs fit


def test_patches_cost_by_their_own_size_and_evaluation_by_the_whole_input():
    whole = plan.training_seconds(512, 4, 16, 10, 48, 6, CPU2)
    patches = plan.training_seconds(512, 4, 16, 10, 48, 6, CPU2, crop=128)
    only_train = plan.training_seconds(128, 4, 16, 10, 48, 0, CPU2)
    assert only_train < patches < whole / 4
    assert plan.training_seconds(512, 4, 16, 10, 48, 6, CPU2, crop=512) == whole  # a patch of the whole input
    every_fifth = plan.training_seconds(512, 4, 16, 10, 48, 6, CPU2, crop=128, validation_freq=5)
    assert every_fifth - only_train == pytest.approx((patches - only_train) * 2 / 10)  # 2 validations instead of 10


def test_an_explicit_crop_size_is_kept():
    thin = fingerprint(num_train=48, num_eval=6, median_height=512, median_width=512,
                       class_fractions=(0.96, 0.04), class_thickness=(None, 3.0))
    result = plan_from_fingerprint(thin, 10, CPU2, {plan.CROP_SIZE: 256})
    assert values(result)[plan.CROP_SIZE] == 256 and reason(result, plan.CROP_SIZE) == plan.SET_BY_YOU
    assert values(result)[plan.IMAGE_SIZE] == 512


def test_a_rare_class_gets_dice_and_class_weights_naming_the_class():
    result = plan_from_fingerprint(fingerprint(class_fractions=(0.6, 0.25, 0.14, 0.01),
                                               class_thickness=(None, 30.0, 20.0, 12.0)), 10, CPU2, {})
    assert values(result)[plan.LOSS] == "dice_bce" and values(result)[plan.CLASS_WEIGHTS] == "auto"
    assert "class 3 covers 1.0% of the pixels" in reason(result, plan.CLASS_WEIGHTS)
    named = plan_from_fingerprint(fingerprint(class_fractions=(0.6, 0.25, 0.14, 0.01),
                                              class_thickness=(None, 30.0, 20.0, 12.0)), 10, CPU2, {},
                                  names=("background", "cell", "nucleus", "mitosis"))
    assert "class 3 'mitosis' covers 1.0% of the pixels" in reason(named, plan.CLASS_WEIGHTS)
    assert "the thinnest class, class 3 'mitosis'" in reason(named, plan.IMAGE_SIZE)


def test_few_non_square_images_get_long_training_no_quarter_turns_and_more_zoom():
    result = plan_from_fingerprint(fingerprint(num_train=48, num_eval=6, median_height=96, median_width=160,
                                               median_aspect=1.67, class_thickness=(None, 14.0)), 10, CPU2, {})
    chosen = values(result)
    assert chosen[plan.AUGMENT_ROT90] is False and "not square" in reason(result, plan.AUGMENT_ROT90)
    assert chosen[plan.AUGMENT_ZOOM] == 0.2
    assert chosen[plan.EPOCHS] * 6 >= plan.TARGET_STEPS  # 48 images, batch 8: 6 steps per epoch
    assert chosen[plan.IMAGE_SIZE] <= 160 and chosen[plan.IMAGE_SIZE] % 2 ** chosen[plan.DEPTH] == 0


def test_images_smaller_than_the_floor_keep_their_size():
    result = plan_from_fingerprint(fingerprint(num_train=20, median_height=40, median_width=48), 10, CPU2, {})
    assert values(result)[plan.IMAGE_SIZE] == 48 and values(result)[plan.DEPTH] == 2
    assert values(result)[plan.BATCH_SIZE] == 8


def test_a_tight_budget_shortens_training_before_it_shrinks_the_input():
    big = fingerprint(num_train=20000, num_eval=2500)
    roomy, tight = plan_from_fingerprint(big, 600, CPU2, {}), plan_from_fingerprint(big, 20, CPU2, {})
    assert values(roomy)[plan.EPOCHS] == plan.MIN_EPOCHS and roomy.estimate["within_budget"]
    assert values(tight)[plan.IMAGE_SIZE] == values(roomy)[plan.IMAGE_SIZE]  # still 64 px ...
    assert values(tight)[plan.EPOCHS] < values(roomy)[plan.EPOCHS]  # ... with fewer epochs
    assert "by the 20-minute budget" in reason(tight, plan.EPOCHS) and tight.estimate["within_budget"]


def test_explicit_settings_win_and_the_rest_is_planned_around_them():
    explicit = {plan.IMAGE_SIZE: 96, plan.EPOCHS: 3, plan.LOSS: "dice_bce"}
    result = plan_from_fingerprint(fingerprint(), 10, CPU2, explicit)
    chosen = values(result)
    assert {k: chosen[k] for k in explicit} == explicit
    assert all(reason(result, k) == plan.SET_BY_YOU for k in explicit)
    assert not set(explicit) & set(result.overrides)
    assert 96 % 2 ** chosen[plan.DEPTH] == 0 and chosen[plan.MIN_STEPS] == 3 * 100
    assert chosen[plan.BATCH_SIZE] == 8  # planned as before


def test_only_the_given_fields_are_planned():
    fields = [plan.IMAGE_SIZE, plan.DEPTH, plan.LOSS]
    result = plan_from_fingerprint(fingerprint(), 10, CPU2, {}, fields=fields)
    assert [c.field for c in result.choices] == fields


def test_device_forms():
    assert plan.parse_device("gpu:2") == Device("gpu", 2) and str(plan.parse_device("cpu:8")) == "cpu:8"
    with pytest.raises(ValueError, match="train.device: 'cpu' is not auto, cpu:N or gpu:N"):
        plan.parse_device("cpu")
    detected = plan.resolve_device("auto")
    assert detected.kind in ("cpu", "gpu") and detected.count >= 1
    assert plan.device_speed(Device("cpu", 4)) == 2 * plan.device_speed(CPU2)


def test_cost_model_counts_the_unet_it_plans():
    import keras

    from segpipe.components.core.model import build_unet

    model = build_unet((64, 64, 3), 1, base_filters=8, depth=3)
    macs = 0
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
            kh, kw, cin, cout = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            per_output = kh * kw * cin / (layer.strides[0] * layer.strides[1])
            macs += h * w * cout * per_output
    assert plan.unet_macs(64, 3, 8) == pytest.approx(macs, rel=1e-6)
    assert plan.seconds_per_image(128, 4, 16, CPU2) > 3 * plan.seconds_per_image(64, 3, 16, CPU2)


# ------------------------------------------------------------------ the fingerprint of real masks


def test_mask_thickness_of_a_band_and_a_square():
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 10:14] = 1  # a vertical band 4 px wide
    area, boundary = plan.mask_class_stats(mask, 2)
    assert area.tolist() == [1440, 160] and 2 * area[1] / boundary[1] == pytest.approx(4.0)
    mask[:] = 0
    mask[5:25, 5:25] = 1  # a 20 px square: 2 * 400 / 76 boundary pixels
    area, boundary = plan.mask_class_stats(mask, 2)
    assert 2 * area[1] / boundary[1] == pytest.approx(800 / 76)
    mask[0, 0] = 255  # ignored, and not a class
    assert plan.mask_class_stats(mask, 2)[0].sum() == 1599


def test_make_plan_fingerprints_real_artifacts_and_records_every_choice(tmp_path, write_tiny_span, dag_params):
    from segpipe.components.example_gen import run_example_gen
    from segpipe.components.statistics_gen import generate_statistics

    write_tiny_span(tmp_path / "data", 1, num=24, size=(40, 48), num_classes=3)
    examples, statistics = str(tmp_path / "examples"), str(tmp_path / "statistics")
    run_example_gen(**dag_params("example_gen", input_pattern=str(tmp_path / "data/span-{SPAN}/*.tfrecord*"),
                                 examples_uri=examples, num_classes=3))
    generate_statistics(examples, statistics, **dag_params("statistics_gen"))
    params = dag_params("plan", num_classes=3, explicit=[plan.EPOCHS], device="cpu:2")
    result = plan.make_plan(statistics, examples, str(tmp_path / "plan"), **params)

    document = json.loads((tmp_path / "plan" / plan.PLAN_FILE).read_text())
    fp = document["fingerprint"]
    assert (fp["median_height"], fp["median_width"]) == (40, 48)
    assert len(fp["class_fractions"]) == 3 and sum(fp["class_fractions"]) == pytest.approx(1.0)
    assert all(t is not None and t > 2 for t in fp["class_thickness"][1:])  # rectangles of 10+ px
    by_field = {c["field"]: c for c in document["choices"]}
    assert set(by_field) == set(plan.PLANNED_FIELDS) and all(c["reason"] for c in by_field.values())
    assert by_field[plan.EPOCHS]["source"] == plan.SET_BY_YOU and plan.EPOCHS not in document["overrides"]
    assert by_field[plan.IMAGE_SIZE]["value"] == 48  # images smaller than the floor keep their size
    assert document["overrides"] == result["overrides"] == plan.read_overrides(str(tmp_path / "plan"))
    assert document["device"] == "cpu:2"

    fixed = plan.make_plan(statistics, examples, str(tmp_path / "demo_plan"), **{**params, "profile": "demo"})
    assert fixed["overrides"] == {}
    demo = json.loads((tmp_path / "demo_plan" / plan.PLAN_FILE).read_text())
    sources = {c["field"]: c["source"] for c in demo["choices"]}
    assert sources.pop(plan.EPOCHS) == plan.SET_BY_YOU and set(sources.values()) == {plan.FIXED_BY_PROFILE}


# ------------------------------------------------------------------ in the pipeline


@pytest.mark.slow
def test_the_trainer_and_transform_receive_the_planned_values(tmp_path, write_tiny_span, tiny_pipeline_overrides):
    from segpipe.components.core import artifacts
    from segpipe.pipeline import metadata as md
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.local_runner import run_pipeline

    root = tmp_path / "root"
    write_tiny_span(root / "data", 1, num=32, size=(48, 48))
    overrides = tiny_pipeline_overrides(root)
    for planned in ("transform.image_size", "model.depth", "train.batch_size", "train.loss"):
        overrides.pop(planned, None)  # left to the plan; base_filters, epochs etc. stay set
    result = run_pipeline(load_config(overrides=overrides))
    steps = {s.node: s for s in result.steps}
    order = [s.node for s in result.steps]
    assert order.index("example_validator") < order.index("plan") < order.index("transform")

    plan_uri = steps["plan"].outputs["plan_uri"]
    document = json.loads((Path(plan_uri) / plan.PLAN_FILE).read_text())
    planned = document["overrides"]
    assert planned[plan.IMAGE_SIZE] == 48 and planned[plan.DEPTH] == 2 and planned[plan.BATCH_SIZE] == 8
    assert plan.BASE_FILTERS not in planned and plan.EPOCHS not in planned  # set by you
    assert {c["field"]: c["value"] for c in document["choices"]}[plan.BASE_FILTERS] == 4

    transformed = artifacts.read_info(steps["transform"].outputs["transformed_examples_uri"])
    assert transformed.parameters["image_size"] == 48
    model = artifacts.read_info(steps["trainer"].outputs["model_uri"])
    assert model.parameters["image_size"] == 48
    assert model.parameters["model_config"]["depth"] == 2 and model.parameters["model_config"]["base_filters"] == 4
    train = model.parameters["train_config"]
    assert (train["batch_size"], train["loss"], train["epochs"]) == (8, planned[plan.LOSS], 1)

    # The run report shows the plan: every field, where it came from and why.
    page = Path(result.report_path).read_text()
    section = page.split('<section id="plan">', 1)[1].split("</section>", 1)[0]
    assert "<code>transform.image_size</code>" in section and "set by you" in section
    assert "planned for cpu:" in section

    # ML Metadata: the plan is an artifact like any other, an input of Transform and the Trainer.
    executions = {e["node"]: e for e in md.Metadata.from_config(load_config(overrides=overrides))
                  .run_executions(result.run_id)}
    assert executions["plan"]["outputs"]["plan_uri"] == str(Path(plan_uri).resolve())
    for node in ("transform", "trainer"):
        assert executions[node]["inputs"]["plan"] == str(Path(plan_uri).resolve())


# ------------------------------------------------------------------ Kubeflow


def test_kubeflow_compiles_the_plan_as_its_own_cpu_task(tmp_path):
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.kubeflow import compile_pipeline

    cfg = load_config(overrides={"root": str(tmp_path), "kubeflow.accelerator_limit": 2})
    path = compile_pipeline(cfg, str(tmp_path / "pipeline.yaml"), image="segpipe:test")
    spec, _ = list(yaml.safe_load_all(Path(path).read_text()))
    resources = spec["deploymentSpec"]["executors"]["exec-plan"]["container"]["resources"]
    assert "accelerator" not in resources and resources["cpuRequest"] == 1.0
    root_tasks = spec["root"]["dag"]["tasks"]
    [gate] = [t for name, t in root_tasks.items() if name.startswith("condition-")]  # dsl.If(new data)
    tasks = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert set(tasks["plan"]["dependentTasks"]) >= {"statistics-gen", "example-gen", "example-validator"}
    for node in ("transform", "trainer"):
        artifact = tasks[node]["inputs"]["artifacts"]["plan"]["taskOutputArtifact"]
        assert artifact == {"outputArtifactKey": "plan", "producerTask": "plan"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["epochs"]["defaultValue"] == 0 and params["image_size"]["defaultValue"] == 0  # not set
    base = json.loads(root_tasks["make-config"]["inputs"]["parameters"]["base_config"]["runtimeValue"]["constant"])
    assert base["train.device"] == "gpu:2"  # the trainer pod's GPUs, declared for the CPU-side plan


def test_kubeflow_run_config_keeps_what_the_user_set(tmp_path):
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.kubeflow import config_from_json, config_overrides, resolve_run_config, run_parameter_defaults

    cfg = load_config(overrides={"root": str(tmp_path), "train.epochs": 20})  # set, at its default value
    assert config_overrides(cfg)["train.epochs"] == 20
    defaults = run_parameter_defaults(cfg)
    assert defaults["epochs"] == 20 and defaults["image_size"] == 0
    params = {k: v for k, v in defaults.items() if k != "profile"}
    run = config_from_json(resolve_run_config(json.dumps(config_overrides(cfg)), "auto", params))
    assert "train.epochs" in run.explicit and "transform.image_size" not in run.explicit
    assert run.transform.image_size == cfg.transform.image_size  # not set: the config's value, for the plan
    asked = config_from_json(resolve_run_config("{}", "auto", {**params, "image_size": 96}))
    assert asked.transform.image_size == 96 and "transform.image_size" in asked.explicit


def test_an_explicit_min_steps_is_a_floor_the_budget_is_met_with():
    """The Trainer raises the epochs to train.min_steps whatever the plan says: the plan must fit
    those steps into the budget (smaller patches) instead of planning fewer and overrunning it."""
    thin = fingerprint(num_train=48, num_eval=6, median_height=512, median_width=512,
                       class_fractions=(0.96, 0.04), class_thickness=(None, 3.0))
    result = plan_from_fingerprint(thin, 10, CPU2, {plan.MIN_STEPS: 2000})
    assert result.estimate["steps"] >= 2000 and result.estimate["within_budget"]
    assert values(result)[plan.EPOCHS] * result.estimate["steps_per_epoch"] >= 2000
    assert 0 < values(result)[plan.CROP_SIZE] < 512


def test_validation_frequency_you_set_or_do_not_plan_is_what_the_estimate_costs():
    thin = fingerprint(num_train=48, num_eval=6, median_height=512, median_width=512,
                       class_fractions=(0.96, 0.04), class_thickness=(None, 3.0))
    every_epoch = plan_from_fingerprint(thin, 10, CPU2, {plan.VALIDATION_FREQ: 1})
    planned = plan_from_fingerprint(thin, 10, CPU2, {})
    unplanned = plan_from_fingerprint(thin, 10, CPU2, {}, fields=[f for f in plan.PLANNED_FIELDS if f != plan.VALIDATION_FREQ])
    assert reason(every_epoch, plan.VALIDATION_FREQ) == plan.SET_BY_YOU and values(planned)[plan.VALIDATION_FREQ] > 1
    assert plan.VALIDATION_FREQ not in values(unplanned)
    # Validating every epoch costs more of the budget: smaller patches for the same steps.
    assert values(unplanned)[plan.CROP_SIZE] == values(every_epoch)[plan.CROP_SIZE] < values(planned)[plan.CROP_SIZE]
