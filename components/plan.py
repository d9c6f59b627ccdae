"""Plan: a training recipe fitted to the data and to the compute budget, in the manner of nnU-Net.

The step reads the dataset's fingerprint: the median image height and width and their spread
(StatisticsGen's derived statistics), the number of training examples, and, from a sample of the
train split's masks, each class's share of the labelled pixels and how thick its structures are.
With the compute it may spend (`train.budget_minutes` on the detected or declared device) it
chooses the model input size, the U-Net's depth and width, the batch size, the training length,
the loss and the augmentation, and writes a `Plan` artifact: `plan.json` lists every choice with
its value and the reason, and `overrides` maps the dotted config fields it chose to their values.

The pipeline applies `overrides` before Transform and the Trainer get their parameters, so those
steps see planned values exactly as if they had been configured and never read the plan. A field
the user set explicitly always wins and is listed as "set by you". The `demo` and `seed` profiles
are fixed presets: under them the plan records the values ("fixed by profile") and overrides
nothing.

With a backbone (`model.encoder`) every planned input size is also a multiple of its output
stride, 32. The time estimate is a cost model, not a measurement: training seconds per image grow with the
U-Net's multiply-accumulates and its activation volume, with constants fitted on 2 CPU cores by
`benchmarks/bench_plan.py --calibrate`; more cores or GPUs divide it (see `device_speed`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from segpipe.components import statistics_gen
from segpipe.components.core import artifacts, encoders
from segpipe.components.core.data_format import class_label, class_names, decode_image, parse_example
from segpipe.components.core.errors import BadInputError
from segpipe.components.example_gen import iter_records

log = logging.getLogger(__name__)

PRODUCER = "Plan"
PLAN_FILE = "plan.json"
AUTO = "auto"  # the profile under which the plan chooses; any other profile is a fixed preset

# The config fields a plan chooses, as dotted names. A field the configuration does not have is
# left out of the plan.
IMAGE_SIZE = "transform.image_size"
DEPTH = "model.depth"
BASE_FILTERS = "model.base_filters"
BATCH_NORM = "model.batch_norm"
BATCH_SIZE = "train.batch_size"
EPOCHS = "train.epochs"
MIN_STEPS = "train.min_steps"
PATIENCE = "train.early_stopping_patience"
LOSS = "train.loss"
CLASS_WEIGHTS = "train.class_weights"
AUGMENT_FLIP = "train.augment_flip"
AUGMENT_ROT90 = "train.augment_rot90"
AUGMENT_ZOOM = "train.augment_zoom"
CROP_SIZE = "train.crop_size"
VALIDATION_FREQ = "train.validation_freq"
PLANNED_FIELDS = (IMAGE_SIZE, CROP_SIZE, DEPTH, BASE_FILTERS, BATCH_NORM, BATCH_SIZE, EPOCHS, MIN_STEPS, PATIENCE,
                  VALIDATION_FREQ, LOSS, CLASS_WEIGHTS, AUGMENT_FLIP, AUGMENT_ROT90, AUGMENT_ZOOM)

# Where a value came from.
PLANNED = "planned"
SET_BY_YOU = "set by you"
FIXED_BY_PROFILE = "fixed by profile"

# ---------------------------------------------------------------- the rules' constants

MIN_SIZE = 64  # smallest planned input (unless the images are smaller): context and texture survive
MAX_SIZE = 512
MIN_BUDGET_SIZE = 32  # a tight budget may shrink the input this far, no further
TARGET_THICKNESS = 8.0  # px at the model input: the thinnest class should stay at least this thick
BOTTLENECK_PX = 8  # the deepest U-Net level keeps at least 8 x 8 pixels
MIN_DEPTH, MAX_DEPTH = 2, 5
CPU_FILTERS, GPU_FILTERS, MIN_FILTERS = 16, 32, 8
CPU_BATCH = 8  # on CPU a step costs the same per image at any batch size: small batches give more steps
GPU_BATCH, GPU_LARGE_BATCH, GPU_LARGE_SIZE = 16, 8, 256  # activation memory grows with the input
BATCH_NORM_MIN_BATCH = 8  # below this, batch statistics are too noisy to normalise with
TARGET_STEPS = 1000  # optimizer steps a run aims for ...
MIN_EPOCHS = 10  # ... seeing every training image at least this often
MAX_EPOCHS = 300
MIN_PLANNED_STEPS = 300  # the budget cuts steps down to this before it cuts resolution
BALANCED_FRACTION = 0.10  # every foreground class above this share of the pixels: cross-entropy alone
RARE_FRACTION = 0.05  # a foreground class below this share gets class-weighted cross-entropy
SQUARE_ASPECT = 1.25  # width / height within [1/1.25, 1.25]: the images are about square
FEW_EXAMPLES = 500  # fewer training images than this: stronger zoom augmentation
SAMPLE_RECORDS = 200  # train masks read for class shares and thickness
MIN_CROP = 64  # smallest planned training patch ...
MIN_CROP_SHARE = 0.125  # ... and at least this share of the input's side (an eighth: on 512 px vessels, 2.5 min,
# 112 px patches at 16 filters scored 0.90 mean IoU where 224 px at 8 filters scored 0.84)
CROP_STEP = 0.8  # each smaller patch candidate is this much of the previous one's side

# Cost model: seconds per training image on the 2-core calibration machine =
# SECONDS_PER_MAC * multiply-accumulates + SECONDS_PER_ACTIVATION * activation values (forward)
# + SECONDS_PER_IMAGE. Fitted by `benchmarks/bench_plan.py --calibrate` over ten U-Nets (32-256 px,
# 8-32 filters, batch 8), within 25% of each measurement.
CALIBRATION_CORES = 2
SECONDS_PER_MAC = 2.1e-11
SECONDS_PER_ACTIVATION = 2.0e-9
SECONDS_PER_IMAGE = 2.5e-3
EVAL_COST = 0.35  # an eval image (forward pass only) against a training image
OVERHEAD_SECONDS = 20.0  # model build, graph tracing, batch-norm re-estimation, SavedModel export
GPU_SPEED = 40.0  # one GPU against the 2-core calibration machine (an assumption, not a measurement)
# Validation: on a small train split, scoring the eval split on whole inputs after every epoch can
# cost as much as the training itself (48 train and 6 eval images of 512 px on 112 px patches:
# 45% of the budget). The plan then validates every few epochs, keeping evaluation at about
# EVAL_SHARE of the time, but at least MIN_VALIDATIONS times a run (checkpoint choice, early stop).
EVAL_SHARE = 0.1
MIN_VALIDATIONS = 20


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Device:
    """Where the Trainer runs: `cpu:N` (N cores) or `gpu:N` (N GPUs)."""

    kind: str
    count: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.count}"


DEVICE_FORM = re.compile(r"(cpu|gpu):([1-9]\d*)")


def parse_device(text: str) -> Device:
    """`cpu:4` / `gpu:1` -> Device; ValueError naming the accepted forms otherwise."""
    found = DEVICE_FORM.fullmatch(text.strip())
    if not found:
        raise ValueError(f"train.device: {text!r} is not auto, cpu:N or gpu:N")
    return Device(found[1], int(found[2]))


def cpu_cores() -> int:
    """Cores this process may use: the affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 quota file: the affinity mask is all we know
        pass
    return max(1, cores)


def detect_device() -> Device:
    """The GPUs TensorFlow sees, else this machine's CPU cores."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return Device("gpu", len(gpus)) if gpus else Device("cpu", cpu_cores())


def resolve_device(text: str) -> Device:
    """`auto` -> detected here; otherwise the declared `cpu:N` / `gpu:N`."""
    return detect_device() if text == AUTO else parse_device(text)


@dataclass(frozen=True)
class Fingerprint:
    """What the plan knows about the data. Sizes are native pixels; class lists are indexed by id."""

    num_train: int
    num_eval: int
    median_height: float
    median_width: float
    size_spread: float  # coefficient of variation of height or width, whichever is larger
    median_aspect: float  # median width / height over the sampled images
    class_fractions: tuple[float, ...]  # share of the labelled pixels, per class id (sampled masks)
    class_thickness: tuple[float | None, ...]  # 2 * area / boundary pixels per class; None when absent
    foreground_fraction: float  # mean per-image foreground share (StatisticsGen)
    sampled: int  # masks read for the class shares and thickness


def mask_class_stats(mask: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, boundary pixels) per class id 0..K-1 of one mask; 255 and unknown ids are skipped.

    A boundary pixel has a 4-neighbour of another label; the image edge is no boundary. For a band
    of width w, 2 * pixels / boundary pixels ~ w, and for a disc of radius r it is ~ r: a thickness.
    """
    mask = np.asarray(mask)
    edge = np.zeros(mask.shape, dtype=bool)
    vertical, horizontal = mask[1:] != mask[:-1], mask[:, 1:] != mask[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    area = np.bincount(mask.ravel(), minlength=256)[:num_classes]
    boundary = np.bincount(mask[edge].ravel(), minlength=256)[:num_classes]
    return area.astype(np.int64), boundary.astype(np.int64)


def sample_masks(examples_uri: str, limit: int) -> Iterable[np.ndarray]:
    """Up to `limit` train masks in shard order (deterministic: the same sample on every run)."""
    read = 0
    for path in artifacts.split_files(examples_uri, artifacts.TRAIN):
        for index, record, problem in iter_records(path):
            if read >= limit:
                return
            if record is None:
                raise BadInputError(f"{path} record {index}: {problem}")
            try:
                _, _, mask_bytes = parse_example(record)
                mask = decode_image(mask_bytes)
            except Exception as exc:  # ExampleGen checked these records; a failure here is a damaged artifact
                raise BadInputError(f"{path} record {index}: mask does not decode ({exc})") from None
            read += 1
            yield mask if mask.ndim == 2 else mask[..., 0]


def _num_stats(statistics_uri: str, split: str) -> tuple[int, dict[str, Any]]:
    dataset = statistics_gen.load_stats(statistics_uri, split, statistics_gen.DERIVED).datasets[0]
    return int(dataset.num_examples), {".".join(f.path.step) or f.name: f.num_stats for f in dataset.features}


def read_fingerprint(statistics_uri: str, examples_uri: str, num_classes: int) -> Fingerprint:
    """The fingerprint from StatisticsGen's train (and eval) statistics plus a sample of train masks."""
    num_train, stats = _num_stats(statistics_uri, artifacts.TRAIN)
    if num_train == 0:
        raise BadInputError(f"{statistics_gen.stats_path(statistics_uri, artifacts.TRAIN)}: the train split is empty")
    num_eval = (_num_stats(statistics_uri, artifacts.EVAL)[0]
                if artifacts.EVAL in statistics_gen.stats_splits(statistics_uri) else 0)
    area = np.zeros(num_classes, np.int64)
    boundary = np.zeros(num_classes, np.int64)
    heights, widths = [], []
    for mask in sample_masks(examples_uri, SAMPLE_RECORDS):
        a, b = mask_class_stats(mask, num_classes)
        area, boundary = area + a, boundary + b
        heights.append(mask.shape[0])
        widths.append(mask.shape[1])
    if not heights:
        raise BadInputError(f"{artifacts.split_dir(examples_uri, artifacts.TRAIN)}: no train records to sample")

    def median(name: str, sampled: list[int]) -> float:  # the statistics' median, else the sample's
        found = stats.get(name)
        return float(found.median) if found is not None and found.median > 0 else float(np.median(sampled))

    def spread(name: str) -> float:
        found = stats.get(name)
        return float(found.std_dev / found.mean) if found is not None and found.mean > 0 else 0.0

    side = float(np.median([min(h, w) for h, w in zip(heights, widths)]))
    labelled = max(int(area.sum()), 1)
    thickness = tuple(None if area[c] == 0 else (2.0 * area[c] / boundary[c] if boundary[c] else side)
                      for c in range(num_classes))
    foreground = stats.get(statistics_gen.FOREGROUND_FRACTION)
    return Fingerprint(
        num_train=num_train,
        num_eval=num_eval,
        median_height=median(statistics_gen.HEIGHT, heights),
        median_width=median(statistics_gen.WIDTH, widths),
        size_spread=max(spread(statistics_gen.HEIGHT), spread(statistics_gen.WIDTH)),
        median_aspect=float(np.median(np.asarray(widths) / np.asarray(heights))),
        class_fractions=tuple(float(a / labelled) for a in area),
        class_thickness=thickness,
        foreground_fraction=float(foreground.mean) if foreground is not None else float(1 - area[0] / labelled),
        sampled=len(heights),
    )


# ---------------------------------------------------------------- the cost model


def unet_macs(size: int, depth: int, base_filters: int, channels_out: int = 1) -> float:
    """Multiply-accumulates of one forward pass of `core.model.build_unet` on a size x size x 3 input."""
    total, channels_in = 0.0, 3
    for level in range(depth + 1):  # encoder levels, then the bottleneck (level == depth)
        pixels, filters = (size / 2**level) ** 2, base_filters * 2**level
        total += 9 * pixels * (channels_in * filters + filters * filters)
        channels_in = filters
    for level in range(depth - 1, -1, -1):  # decoder: 2x2 transposed conv, then two 3x3 convs on the concat
        pixels, filters = (size / 2**level) ** 2, base_filters * 2**level
        total += pixels * (2 * filters) * filters + 9 * pixels * (2 * filters * filters + filters * filters)
    return total + size * size * base_filters * channels_out


def unet_activations(size: int, depth: int, base_filters: int) -> float:
    """Activation values of one forward pass (conv outputs, BN and ReLU, pools, concats): memory traffic."""
    total = 0.0
    for level in range(depth + 1):
        pixels, filters = (size / 2**level) ** 2, base_filters * 2**level
        total += 6 * pixels * filters + (pixels * filters / 4 if level < depth else 0)  # 2 x (conv, BN, ReLU), pool
        if level < depth:
            total += pixels * filters * (1 + 2 + 6)  # up-conv, concat, 2 x (conv, BN, ReLU)
    return total


def device_speed(device: Device) -> float:
    """Throughput against the 2-core calibration machine: linear in cores, GPU_SPEED per GPU."""
    return device.count * GPU_SPEED if device.kind == "gpu" else device.count / CALIBRATION_CORES


def seconds_per_image(size: int, depth: int, base_filters: int, device: Device) -> float:
    """Estimated seconds of one training image (forward, backward, update) on `device`."""
    cost = (SECONDS_PER_MAC * unet_macs(size, depth, base_filters)
            + SECONDS_PER_ACTIVATION * unet_activations(size, depth, base_filters) + SECONDS_PER_IMAGE)
    return cost / device_speed(device)


def epoch_seconds(size: int, depth: int, base_filters: int, num_train: int, num_eval: int, device: Device,
                  crop: int = 0) -> tuple[float, float]:
    """(training, validation) seconds of one epoch: the train split on crop x crop patches when
    `crop` > 0, the eval split scored on whole size x size inputs."""
    train = seconds_per_image(encoders.training_side(size, crop), depth, base_filters, device)
    evaluate = seconds_per_image(size, depth, base_filters, device)
    return train * num_train, EVAL_COST * evaluate * num_eval


def validation_freq_for(train_seconds: float, eval_seconds: float, epochs: int) -> int:
    """Epochs between validations: evaluation at most EVAL_SHARE of the training time, and at
    least MIN_VALIDATIONS validations over `epochs`."""
    wanted = math.ceil(eval_seconds / (EVAL_SHARE * train_seconds)) if train_seconds > 0 else 1
    return max(1, min(wanted, epochs // MIN_VALIDATIONS))


def training_seconds(size: int, depth: int, base_filters: int, epochs: int, num_train: int, num_eval: int,
                     device: Device, crop: int = 0, validation_freq: int = 1) -> float:
    """Estimated trainer wall time: `epochs` epochs (see epoch_seconds), validated every
    `validation_freq` of them and after the last."""
    train, evaluate = epoch_seconds(size, depth, base_filters, num_train, num_eval, device, crop)
    return OVERHEAD_SECONDS + epochs * train + math.ceil(epochs / validation_freq) * evaluate


# ---------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Choice:
    field: str
    value: Any
    reason: str
    source: str  # PLANNED | SET_BY_YOU | FIXED_BY_PROFILE


@dataclass(frozen=True)
class Plan:
    choices: tuple[Choice, ...]
    estimate: dict[str, Any]  # minutes, steps, seconds per image, within budget

    def value(self, name: str) -> Any:
        return next(c.value for c in self.choices if c.field == name)

    @property
    def overrides(self) -> dict[str, Any]:
        return {c.field: c.value for c in self.choices if c.source == PLANNED}


def depth_for(size: int) -> int:
    """Poolings until the deepest level would drop below BOTTLENECK_PX, within [MIN_DEPTH, MAX_DEPTH]."""
    return min(MAX_DEPTH, max(MIN_DEPTH, int(math.floor(math.log2(max(size, 1) / BOTTLENECK_PX)))))


def fit_size(wanted: float, depth: int, ceiling: float, multiple: int = 1) -> int:
    """`wanted` rounded up to a multiple of 2**depth (and of `multiple`), or down when that passes `ceiling`."""
    step = math.lcm(2**depth, multiple)
    size = math.ceil(wanted / step) * step
    return size if size <= ceiling else max(step, math.floor(ceiling / step) * step)


def divisible_depth(size: int, limit: int) -> int:
    """The deepest depth <= limit that `size` is divisible by 2**depth for (a size the user set)."""
    depth = max(1, limit)
    while depth > 1 and size % 2**depth:
        depth -= 1
    return depth


def plan_from_fingerprint(
    fingerprint: Fingerprint,
    budget_minutes: float,
    device: Device,
    explicit: Mapping[str, Any],
    *,
    fields: Sequence[str] = PLANNED_FIELDS,
    size_multiple: int = 1,
    names: Sequence[str | None] = (),
) -> Plan:
    """The plan for a dataset: each field of `fields` planned, or the value in `explicit` (which wins).

    A planned input size is also divisible by `size_multiple` (a backbone's output stride, see
    core.encoders.size_multiple). `names` (labels.json's, by class id) name the classes in the
    reasons. A pure function of its arguments, so every rule can be tested on
    a made-up fingerprint.
    """
    fp = fingerprint
    fields = [f for f in PLANNED_FIELDS if f in fields]
    choices: dict[str, Choice] = {}

    def decide(name: str, value: Any, reason: str) -> Any:
        if name in explicit:
            choices[name] = Choice(name, explicit[name], SET_BY_YOU, SET_BY_YOU)
        else:
            choices[name] = Choice(name, value, reason, PLANNED)
        return choices[name].value

    def given(name: str) -> Any:
        return explicit.get(name)

    gpu = device.kind == "gpu"
    replicas = device.count if gpu else 1
    native = max(fp.median_height, fp.median_width)
    foreground = [c for c in range(1, len(fp.class_fractions)) if fp.class_thickness[c] is not None]
    thinnest = min(foreground, key=lambda c: fp.class_thickness[c]) if foreground else None
    floor, ceiling = min(MIN_SIZE, native), min(native, MAX_SIZE)

    # Resolution: the smallest input at which the thinnest class stays TARGET_THICKNESS px thick.
    where = f"median image {fp.median_height:.0f}x{fp.median_width:.0f} px (spread {fp.size_spread:.0%})"
    if thinnest is not None:
        thickness = fp.class_thickness[thinnest]
        needed = native * TARGET_THICKNESS / thickness
        size_why = (f"{where}; the thinnest class, {class_label(thinnest, names)}, is {thickness:.1f} px thick, so it "
                    f"stays {TARGET_THICKNESS:.0f} px thick at {needed:.0f} px")
    else:
        needed = floor
        size_why = f"{where}; no foreground in the sampled masks"
    wanted_size = min(max(needed, floor), ceiling)
    if needed > ceiling:
        size_why += f"; capped at {ceiling:.0f} px (no input larger than the images or {MAX_SIZE} px)"
    elif needed < floor:
        size_why += f"; raised to {floor:.0f} px (the smallest planned input)"

    # Width and batch: by device.
    filters = given(BASE_FILTERS) or (GPU_FILTERS if gpu else CPU_FILTERS)
    filters_why = f"{filters} base filters on {device}"
    if gpu:
        batch = GPU_BATCH if wanted_size <= GPU_LARGE_SIZE else GPU_LARGE_BATCH
        batch_why = f"{batch} per GPU at this input size (activation memory)"
    else:
        batch, batch_why = CPU_BATCH, f"{CPU_BATCH}: on CPU an image costs the same at any batch size, so small batches give more steps"
    batch = given(BATCH_SIZE) or min(batch, fp.num_train)
    if batch == fp.num_train and BATCH_SIZE not in explicit:
        batch_why = f"{batch}: the whole train split"
    batch = decide(BATCH_SIZE, batch, batch_why)
    steps_per_epoch = math.ceil(fp.num_train / (batch * replicas))

    # Length: TARGET_STEPS optimizer steps and at least MIN_EPOCHS passes over the data.
    # A train.min_steps you set is a floor the Trainer enforces whatever the plan says (it raises the
    # epochs), so the budget must be met with at least that many steps.
    floor_epochs = math.ceil(int(given(MIN_STEPS)) / steps_per_epoch) if given(MIN_STEPS) else 0
    if EPOCHS in explicit:
        wanted_epochs = int(explicit[EPOCHS])
    else:
        wanted_epochs = max(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch))), floor_epochs)
    epochs_why = (f"{wanted_epochs} x {steps_per_epoch} steps = {wanted_epochs * steps_per_epoch} steps "
                  f"(target {TARGET_STEPS} steps, at least {MIN_EPOCHS} epochs, at most {MAX_EPOCHS})")

    # The budget: the wanted recipe if it fits; else, keeping the input's resolution, the same steps
    # on smaller training patches (as nnU-Net does); else fewer steps (down to MIN_PLANNED_STEPS)
    # on the smallest patch, at full then half width; only then a smaller input. Steps come before
    # patch size: on four classes with a rare one (224 px), 1,015 steps on 80 px patches (3-minute
    # budget) scored 0.92 mean IoU where 319 steps on 144 px patches (2.5 minutes) scored 0.79.
    budget = budget_minutes * 60.0
    if IMAGE_SIZE in explicit:
        depth = given(DEPTH) or divisible_depth(int(explicit[IMAGE_SIZE]), depth_for(int(explicit[IMAGE_SIZE])))
        sizes = [(int(explicit[IMAGE_SIZE]), depth)]
    else:
        sizes, current = [], wanted_size
        while True:
            depth = given(DEPTH) or depth_for(current)
            size = fit_size(current, depth, ceiling, size_multiple)
            if not sizes or size < sizes[-1][0]:
                sizes.append((size, depth))
            if current <= MIN_BUDGET_SIZE or size <= math.lcm(2**depth, size_multiple):
                break
            current = max(MIN_BUDGET_SIZE, current * 0.8)
    widths = [filters] if BASE_FILTERS in explicit or filters // 2 < MIN_FILTERS else [filters, filters // 2]
    least_epochs = wanted_epochs if EPOCHS in explicit else max(floor_epochs, min(
        wanted_epochs, max(1, math.ceil(MIN_PLANNED_STEPS / steps_per_epoch))))
    full_size, full_depth = sizes[0]
    if CROP_SIZE in explicit:
        crops = [int(explicit[CROP_SIZE])]
    elif CROP_SIZE in fields:
        crops, current = [0], full_size * CROP_STEP
        while current >= max(MIN_CROP, MIN_CROP_SHARE * full_size):
            crop_depth = given(DEPTH) or min(full_depth, depth_for(current))
            crop = fit_size(current, crop_depth, full_size, size_multiple)
            if crop < full_size and crop not in crops:
                crops.append(crop)
            current *= CROP_STEP
    else:
        crops = [0]

    def patch_depth(crop: int) -> int:  # a patch's own depth; the whole input must still divide by it
        return full_depth if not encoders.uses_patches(full_size, crop) else given(DEPTH) or min(full_depth, depth_for(crop))

    def freq_of(size: int, depth: int, width: int, crop: int) -> tuple[int, float, float]:
        """(validation_freq, train and eval seconds of an epoch): planned unless set or not planned here."""
        train, evaluate = epoch_seconds(size, depth, width, fp.num_train, fp.num_eval, device, crop)
        if given(VALIDATION_FREQ) or VALIDATION_FREQ not in fields:
            return int(given(VALIDATION_FREQ) or 1), train, evaluate
        return validation_freq_for(train, evaluate, wanted_epochs), train, evaluate

    def epochs_within(size: int, depth: int, width: int, crop: int) -> int:
        freq, train, evaluate = freq_of(size, depth, width, crop)
        epochs = int((budget - OVERHEAD_SECONDS) // (train + evaluate / freq)) if budget > OVERHEAD_SECONDS else 0
        while epochs > 0 and training_seconds(size, depth, width, epochs, fp.num_train, fp.num_eval, device, crop,
                                              freq) > budget:  # the validation after the last epoch
            epochs -= 1
        return epochs

    # (input size, depth, width, patch); patch 0 = whole inputs. First the wanted steps at the full
    # resolution and width, whole inputs then ever smaller patches; then as many steps as fit (at
    # least the fewest) on the smallest patch.
    whole_steps = [(full_size, patch_depth(c), filters, c) for c in crops]
    fewer_steps = [(full_size, patch_depth(crops[-1]), w, crops[-1]) for w in widths] + [
        (s, d, w, 0) for s, d in sizes[1:] for w in widths]
    chosen = next((o for o in whole_steps if epochs_within(*o) >= wanted_epochs), None) or next(
        (o for o in fewer_steps if epochs_within(*o) >= least_epochs), fewer_steps[-1])
    size, depth, width, crop = chosen
    fitting = epochs_within(*chosen)
    epochs = wanted_epochs if EPOCHS in explicit else max(1, floor_epochs, min(wanted_epochs, fitting))
    if size < full_size:
        size_why += f"; {size} px to fit the {budget_minutes:g}-minute budget"
    if width < filters:
        filters_why += f"; {width} to fit the {budget_minutes:g}-minute budget"
    if epochs < wanted_epochs:
        epochs_why += f"; cut to {epochs} epochs ({epochs * steps_per_epoch} steps) by the {budget_minutes:g}-minute budget"
    if CROP_SIZE in explicit:
        crop_why = SET_BY_YOU
    elif encoders.uses_patches(size, crop):
        crop_why = (f"{crop} x {crop} px patches of the {size} px input: whole inputs do not fit the "
                    f"{budget_minutes:g}-minute budget at {epochs * steps_per_epoch} steps, and patches keep the "
                    f"resolution (evaluation and serving still see whole inputs)")
    else:
        crop, crop_why = 0, "0: whole inputs fit the budget"

    if size_multiple > 1:
        size_why += f"; divisible by {size_multiple}, the encoder's output stride"
    decide(IMAGE_SIZE, size, f"{size} px: {size_why}")
    decide(CROP_SIZE, crop, crop_why)
    trained = crop or size
    decide(DEPTH, depth, f"{depth} poolings: the deepest level is {trained // 2**depth} px (at least {BOTTLENECK_PX})"
           + (" on a training patch" if crop else ""))
    decide(BASE_FILTERS, width, filters_why)
    decide(BATCH_NORM, batch >= BATCH_NORM_MIN_BATCH,
           f"batch {batch} {'>=' if batch >= BATCH_NORM_MIN_BATCH else '<'} {BATCH_NORM_MIN_BATCH}: "
           + ("batch statistics are stable enough" if batch >= BATCH_NORM_MIN_BATCH else "too noisy for batch norm"))
    epochs = decide(EPOCHS, epochs, epochs_why)
    decide(MIN_STEPS, epochs * steps_per_epoch, f"the planned {epochs} x {steps_per_epoch} steps, so the trainer adds none")
    every = freq_of(size, depth, width, crop)[0]
    freq = decide(VALIDATION_FREQ, every, "1: evaluation is a small share of each epoch" if every == 1 else
                  f"{every}: scoring the {fp.num_eval} eval images on whole inputs after every epoch would take "
                  f"over {EVAL_SHARE:.0%} of the training time")
    decide(PATIENCE, max(4, epochs // 4), "a quarter of the planned epochs, at least 4"
           + (f" ({math.ceil(max(4, epochs // 4) / freq)} validations)" if freq > 1 else ""))

    # Loss: cross-entropy for balanced data with thick structures; Dice as well otherwise.
    shares = {c: fp.class_fractions[c] for c in range(1, len(fp.class_fractions))}
    rarest = min(shares, key=shares.get) if shares else None
    scale = choices[IMAGE_SIZE].value / native
    thin_at_input = thinnest is not None and fp.class_thickness[thinnest] * scale < TARGET_THICKNESS
    rarest_text = f"{class_label(rarest, names)} covers {shares[rarest]:.1%} of the pixels" if rarest is not None else ""
    if rarest is not None and shares[rarest] >= BALANCED_FRACTION and not thin_at_input:
        decide(LOSS, "bce", f"balanced classes ({rarest_text}, the rarest) and thick structures: cross-entropy alone")
    else:
        why = rarest_text if rarest is not None and shares[rarest] < BALANCED_FRACTION else (
            "structures thinner than the target at this input")
        decide(LOSS, "dice_bce", f"{why}: Dice counts every class's overlap whatever its share")
    rare = rarest is not None and shares[rarest] < RARE_FRACTION
    decide(CLASS_WEIGHTS, AUTO if rare else "none",
           f"{rarest_text} (< {RARE_FRACTION:.0%}): weight cross-entropy by inverse frequency" if rare
           else f"no foreground class below {RARE_FRACTION:.0%} of the pixels: unweighted")

    # Augmentation: label-preserving flips; quarter turns only for about-square images (the resize
    # to a square squashes one axis, and a turn would swap the squashed axis); more zoom for few images.
    decide(AUGMENT_FLIP, True, "mirroring keeps every label where it belongs")
    square = 1 / SQUARE_ASPECT <= fp.median_aspect <= SQUARE_ASPECT
    decide(AUGMENT_ROT90, square, f"median aspect ratio (width / height) {fp.median_aspect:.2f}: "
           + ("about square, quarter turns keep the geometry" if square else "not square, a quarter turn would swap the squashed axis"))
    few = fp.num_train < FEW_EXAMPLES
    decide(AUGMENT_ZOOM, 0.2 if few else 0.1, f"{fp.num_train} training images "
           + (f"(< {FEW_EXAMPLES}): stronger zoom" if few else f"(>= {FEW_EXAMPLES}): light zoom"))

    size, depth, width = (choices[IMAGE_SIZE].value, choices[DEPTH].value, choices[BASE_FILTERS].value)
    crop = choices[CROP_SIZE].value if CROP_SIZE in choices else 0
    seconds = training_seconds(size, depth, width, epochs, fp.num_train, fp.num_eval, device, crop, freq)
    estimate = {
        "minutes": round(seconds / 60.0, 2),
        "budget_minutes": budget_minutes,
        "within_budget": seconds <= budget,
        "steps": epochs * steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "seconds_per_image": round(seconds_per_image(encoders.training_side(size, crop), depth, width, device), 5),
        "device": str(device),
    }
    return Plan(tuple(choices[f] for f in fields if f in choices), estimate)


# ---------------------------------------------------------------- the component


def make_plan(
    statistics_uri: str,
    examples_uri: str,
    plan_uri: str,
    *,
    budget_minutes: float,
    device: str,
    explicit: list[str],
    base: dict,
    profile: str,
    num_classes: int,
    encoder: str,
) -> dict:
    """Fingerprint the data, plan the recipe and publish the Plan artifact (`plan.json`).

    `base` holds the configured value of every field the plan may choose (its keys are the fields
    this configuration has); `explicit` names those the user set. `encoder` (`model.encoder`) keeps
    a planned input size divisible by what its backbone needs. Under a profile other than `auto`
    every field keeps its configured value. Returns {"overrides", "estimate", "device"}.
    """
    fingerprint = read_fingerprint(statistics_uri, examples_uri, num_classes)
    where = parse_device(device)
    fixed = base if profile != AUTO else {name: base[name] for name in explicit if name in base}
    plan = plan_from_fingerprint(fingerprint, budget_minutes, where, fixed, fields=list(base),
                                 size_multiple=encoders.size_multiple(encoder),
                                 names=class_names(artifacts.split_files(examples_uri, artifacts.TRAIN), num_classes))
    choices = [c if c.source != SET_BY_YOU or c.field in explicit
               else Choice(c.field, c.value, f"fixed by profile {profile}", FIXED_BY_PROFILE) for c in plan.choices]
    overrides = {c.field: c.value for c in choices if c.source == PLANNED}
    document = {
        "profile": profile,
        "device": str(where),
        "budget_minutes": budget_minutes,
        "estimate": plan.estimate,
        "fingerprint": asdict(fingerprint),
        "choices": [asdict(c) for c in choices],
        "overrides": overrides,
    }
    with artifacts.publish(plan_uri, artifacts.PLAN, producer=PRODUCER, inputs=(statistics_uri, examples_uri),
                           parameters={"budget_minutes": budget_minutes, "device": device, "profile": profile,
                                       "encoder": encoder}) as (
            tmp, info):
        (tmp / PLAN_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
        info["extra"] = {"overrides": overrides, "estimate": plan.estimate}
    for choice in choices:
        log.info("plan: %s = %r (%s)", choice.field, choice.value, choice.reason)
    return {"overrides": overrides, "estimate": plan.estimate, "device": str(where)}


def read_overrides(plan_uri: str) -> dict[str, Any]:
    """The `overrides` of a published Plan artifact; BadInputError naming the file otherwise."""
    return artifacts.read_json_mapping(Path(plan_uri) / PLAN_FILE, "overrides", "plan")
