"""The one typed segpipe configuration.

Layers, later wins: `default.yaml` (every field, commented) <- a profile (`profiles/<name>.yaml`;
`auto`, the default, has no file: the pipeline's plan step fits the recipe to the data) <- the
user's YAML file <- `--set section.field=value` overrides. Every layer is validated the same way,
and errors name the field (`train.epochs: expected int, got 'ten'`) so the CLI can print one line
and exit 2. The config remembers which fields the user's layers set (`explicit`): the plan never
changes those.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from segpipe.components.core.edge import VARIANTS as TFLITE_VARIANTS
from segpipe.components.core.encoders import (
    ENCODER_CHOICES,
    ENCODERS,
    MOBILENET_ALPHAS,
    UNET,
    WEIGHT_SUFFIXES,
    crop_size_problem,
    input_size_problem,
)

AUTO_PROFILE = "auto"  # no preset: the plan step fits the recipe to the data and the budget
PROFILES = (AUTO_PROFILE, "demo", "seed")
DEVICE_FORM = re.compile(r"auto|(cpu|gpu):[1-9]\d*")
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KB; more is the wrong file (or /dev/zero)


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _rng(lo: float | None = None, hi: float | None = None, choices: tuple = ()) -> dict:
    return {"min": lo, "max": hi, "choices": choices}


@dataclass(frozen=True)
class SplitConfig:
    """Hash-bucket weights of the deterministic split (by example id)."""

    train: int = field(metadata=_rng(1))
    eval: int = field(metadata=_rng(1))
    test: int = field(metadata=_rng(1))


@dataclass(frozen=True)
class DataConfig:
    root: str  # relative to the pipeline root; "" = <pipeline root>/data
    input_pattern: str  # relative to `data.root` unless absolute; must contain {SPAN}
    span: int | None = field(metadata=_rng(0))  # None = the latest span
    num_spans: int = field(metadata=_rng(1))  # read the last K spans ending at `span`
    num_classes: int = field(metadata=_rng(2, 254))  # class ids 0..K-1, 0 = background
    min_image_size: int = field(metadata=_rng(1))
    skip_bad_records: bool
    require_new_span: bool  # false: train even without a span newer than every serving version's
    splits: SplitConfig


@dataclass(frozen=True)
class ValidationConfig:
    schema_path: str  # relative to the pipeline root; "" = the schema shipped in `schemas/`
    max_invalid_fraction: float = field(metadata=_rng(0.0, 1.0))
    drift_threshold: float = field(metadata=_rng(0.0, 1.0))  # Jensen-Shannon; 0 disables


@dataclass(frozen=True)
class TransformConfig:
    image_size: int = field(metadata=_rng(8, 4096))
    standardize: bool


@dataclass(frozen=True)
class ModelConfig:
    base_filters: int = field(metadata=_rng(1, 1024))
    depth: int = field(metadata=_rng(1, 8))
    batch_norm: bool
    dropout: float = field(metadata=_rng(0.0, 0.9))
    bn_momentum: str | float  # "auto" (fitted to the planned steps) or a momentum in [0, 1)
    encoder: str = field(metadata=_rng(choices=ENCODER_CHOICES))  # unet: no backbone
    encoder_alpha: float  # mobilenet_v2's width multiplier
    encoder_weights: str  # the backbone's Keras weights file; "" = random initialisation
    encoder_freeze_epochs: int = field(metadata=_rng(0))

    def __post_init__(self) -> None:
        momentum = self.bn_momentum
        if momentum != "auto" and (isinstance(momentum, str) or not 0.0 <= momentum < 1.0):
            raise ConfigError(f"model.bn_momentum: {momentum!r} is neither auto nor a number in [0, 1)")
        backbone = ENCODERS.get(self.encoder)
        if backbone is None:
            for name in ("encoder_weights", "encoder_freeze_epochs"):
                if getattr(self, name):
                    raise ConfigError(f"model.{name}: needs a backbone, but model.encoder is {self.encoder}")
        if backbone is not None and backbone.widths and self.encoder_alpha not in MOBILENET_ALPHAS:
            raise ConfigError(f"model.encoder_alpha: {self.encoder_alpha} is not one of "
                              f"{', '.join(map(str, MOBILENET_ALPHAS))} ({self.encoder}'s widths)")
        if (backbone is None or not backbone.widths) and self.encoder_alpha != 1.0:
            raise ConfigError(f"model.encoder_alpha: model.encoder {self.encoder} has no width multiplier; "
                              f"keep 1.0, got {self.encoder_alpha}")
        if self.encoder_weights and not self.encoder_weights.endswith(WEIGHT_SUFFIXES):
            raise ConfigError(f"model.encoder_weights: {self.encoder_weights!r} is not a Keras weights file "
                              f"({' or '.join(WEIGHT_SUFFIXES)})")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = field(metadata=_rng(1))
    epochs: int = field(metadata=_rng(1))
    min_steps: int = field(metadata=_rng(0))  # epochs are raised until epochs * steps per epoch >= this
    learning_rate: float = field(metadata=_rng(0.0))
    lr_schedule: str = field(metadata=_rng(choices=("cosine", "constant")))
    warmup_fraction: float = field(metadata=_rng(0.0, 0.5))  # of the planned steps (cosine only)
    loss: str = field(metadata=_rng(choices=("bce", "dice_bce")))
    class_weights: str = field(metadata=_rng(choices=("auto", "none")))
    monitor: str = field(metadata=_rng(choices=("val_iou", "val_pixel_accuracy", "val_dice", "val_loss")))
    early_stopping_patience: int = field(metadata=_rng(0))
    validation_freq: int = field(metadata=_rng(1))  # epochs between evaluations of the eval split
    bn_recalibration_batches: int = field(metadata=_rng(0))  # 0 keeps the moving averages
    shuffle_buffer: int = field(metadata=_rng(1))
    cache: bool
    augment_flip: bool
    augment_rot90: bool
    augment_zoom: float = field(metadata=_rng(0.0, 0.9))
    crop_size: int = field(metadata=_rng(0))  # 0: whole inputs; else training patches (checked below)
    mixed_precision: str = field(metadata=_rng(choices=("auto", "on", "off")))
    jit_compile: bool
    distribution: str = field(metadata=_rng(choices=("auto", "mirrored", "multi_worker")))
    warm_start: bool
    seed: int = field(metadata=_rng(0))
    budget_minutes: float = field(metadata=_rng(0.5))  # the plan's training-time budget
    device: str  # what the plan assumes the trainer runs on: auto (detected) | cpu:N | gpu:N


# The Tuner's search-space fields and the config field whose candidate values each one lists.
TUNED_FIELDS = {
    "learning_rate": "train.learning_rate",
    "base_filters": "model.base_filters",
    "loss": "train.loss",
    "augment_flip": "train.augment_flip",
    "augment_rot90": "train.augment_rot90",
    "augment_zoom": "train.augment_zoom",
}


@dataclass(frozen=True)
class TunerConfig:
    enabled: bool
    max_trials: int = field(metadata=_rng(1))
    budget_minutes: float = field(metadata=_rng(0.0))  # > 0
    trial_fraction: float = field(metadata=_rng(0.0, 1.0))  # > 0: of the Trainer's planned epochs
    learning_rate: tuple[float, ...]  # candidates; () leaves the field out of the search
    base_filters: tuple[int, ...]
    loss: tuple[str, ...]
    augment_flip: tuple[bool, ...]
    augment_rot90: tuple[bool, ...]
    augment_zoom: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("budget_minutes", "trial_fraction"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"tuner.{name}: must be positive")
        sections = {"model": ModelConfig, "train": TrainConfig}
        for name, dotted in TUNED_FIELDS.items():
            values = getattr(self, name)
            if len(set(values)) < len(values):
                raise ConfigError(f"tuner.{name}: {list(values)} lists a value twice")
            section, _, target = dotted.partition(".")
            meta = next(f.metadata for f in dataclasses.fields(sections[section]) if f.name == target)
            for i, value in enumerate(values):  # each candidate must be a valid value of its field
                _check_range(value, meta, f"tuner.{name}[{i}]")

    def search_space(self) -> dict[str, list[Any]]:
        """Dotted config field -> its candidate values, for every field with candidates."""
        return {dotted: list(getattr(self, name)) for name, dotted in TUNED_FIELDS.items() if getattr(self, name)}


@dataclass(frozen=True)
class EvaluationConfig:
    pixel_accuracy_threshold: float = field(metadata=_rng(0.0, 1.0))
    min_foreground_iou: float = field(metadata=_rng(0.0, 1.0))
    min_class_iou: float = field(metadata=_rng(0.0, 1.0))  # every foreground class
    max_regression: float = field(metadata=_rng(0.0, 1.0))
    num_worst_examples: int = field(metadata=_rng(0))
    max_tflite_drop: float = field(metadata=_rng(0.0, 1.0))  # per push.tflite variant, absolute mean IoU


@dataclass(frozen=True)
class InfraValidationConfig:
    batch_sizes: tuple[int, ...]  # canary request sizes sent to serving_default
    num_requests: int = field(metadata=_rng(1))  # timed requests per batch size, after one warm-up
    load_timeout_seconds: float = field(metadata=_rng(0.0))
    request_timeout_seconds: float = field(metadata=_rng(0.0))
    memory_limit_mb: int = field(metadata=_rng(0))  # address space (RLIMIT_AS) of the serving process; 0 = none
    max_p50_latency_ms: float = field(metadata=_rng(0.0))  # limits: 0 only reports the figure
    max_p99_latency_ms: float = field(metadata=_rng(0.0))
    max_peak_memory_mb: float = field(metadata=_rng(0.0))

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1 or len(set(self.batch_sizes)) < len(self.batch_sizes):
            raise ConfigError(f"infra_validation.batch_sizes: {list(self.batch_sizes)} must list distinct sizes >= 1")
        for name in ("load_timeout_seconds", "request_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"infra_validation.{name}: must be positive")


@dataclass(frozen=True)
class PushConfig:
    serving_dir: str  # relative to the pipeline root; "" = <pipeline root>/serving
    keep_last: int = field(metadata=_rng(0))  # 0 keeps every version
    tflite: tuple[str, ...]  # TFLite variants written beside the SavedModel: float16, int8

    def __post_init__(self) -> None:
        unknown = [v for v in self.tflite if v not in TFLITE_VARIANTS]
        if unknown or len(set(self.tflite)) < len(self.tflite):
            raise ConfigError(f"push.tflite: {list(self.tflite)} must list distinct variants of {list(TFLITE_VARIANTS)}")


@dataclass(frozen=True)
class BulkInferenceConfig:
    enabled: bool  # the bulk_inferrer node after the pusher: the newest span scored by the pushed version


@dataclass(frozen=True)
class BeamConfig:
    pipeline_args: tuple[str, ...]


@dataclass(frozen=True)
class KubeflowConfig:
    image: str
    pipeline_root: str  # "" = the KFP deployment's default artifact store
    cpu_request: str
    memory_request: str
    trainer_cpu_request: str
    trainer_memory_request: str
    accelerator_type: str  # e.g. NVIDIA_TESLA_T4 or nvidia.com/gpu; "" = no GPU
    accelerator_limit: int = field(metadata=_rng(0))
    gpu_node_selector: dict[str, str]
    gpu_tolerations: tuple[str, ...]  # "key=value:Effect" or "key:Effect"
    retries: int = field(metadata=_rng(0))
    backoff_seconds: int = field(metadata=_rng(0))
    trainer_workers: int = field(metadata=_rng(1))  # > 1: the trainer runs as a TFJob (pipeline/tfjob.py)
    tfjob_timeout_minutes: float = field(metadata=_rng(0.0))
    tfjob_cleanup: str = field(metadata=_rng(choices=("on_success", "always", "never")))

    def __post_init__(self) -> None:
        if self.tfjob_timeout_minutes <= 0:
            raise ConfigError("kubeflow.tfjob_timeout_minutes: must be positive")


@dataclass(frozen=True)
class MetadataConfig:
    sqlite_path: str  # relative to the pipeline root; "" = <pipeline root>/metadata.sqlite
    mysql_host: str  # non-empty switches ML Metadata to MySQL
    mysql_port: int = field(metadata=_rng(1, 65535))
    mysql_database: str
    mysql_user: str
    mysql_password_env: str  # name of the environment variable holding the password


@dataclass(frozen=True)
class SegpipeConfig:
    profile: str = field(metadata=_rng(choices=PROFILES))
    pipeline_name: str
    root: str
    data: DataConfig
    validation: ValidationConfig
    transform: TransformConfig
    model: ModelConfig
    train: TrainConfig
    tuner: TunerConfig
    evaluation: EvaluationConfig
    infra_validation: InfraValidationConfig
    push: PushConfig
    bulk_inference: BulkInferenceConfig
    beam: BeamConfig
    kubeflow: KubeflowConfig
    metadata: MetadataConfig
    # Dotted names of the fields the user set (config file, --set, run flags): the plan keeps them.
    # Not a config value: load_config and with_overrides fill it in.
    explicit: tuple[str, ...] = field(default=(), compare=False, metadata={"derived": True})

    # Derived locations. A relative path in the config has one base: `root` for data.root,
    # push.serving_dir, metadata.sqlite_path, validation.schema_path and model.encoder_weights, `data.root` for
    # data.input_pattern; `root` itself is relative to the current directory. "" means the
    # default place under that base. An absolute path or a URI (gs://...) is used unchanged,
    # which is how the CLI's paths (made absolute against the current directory) win.
    @property
    def data_root(self) -> str:
        return join_path(self.root, self.data.root or "data")

    @property
    def serving_dir(self) -> str:
        return join_path(self.root, self.push.serving_dir or "serving")

    @property
    def sqlite_path(self) -> str:
        return join_path(self.root, self.metadata.sqlite_path or "metadata.sqlite")

    @property
    def encoder_weights_path(self) -> str:
        return join_path(self.root, self.model.encoder_weights) if self.model.encoder_weights else ""

    @property
    def schema_path(self) -> str:
        if not self.validation.schema_path:
            return str(resources.files("segpipe.schemas") / "schema.pbtxt")
        return join_path(self.root, self.validation.schema_path)

    @property
    def input_pattern(self) -> str:
        return join_path(self.data_root, self.data.input_pattern)

    def as_dict(self) -> dict[str, Any]:
        """The config values (every field of default.yaml), without `explicit`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "explicit"}


def is_absolute_path(path: str) -> bool:
    """An absolute local path, or a URI of another filesystem (gs://, s3://, hdfs://, ...)."""
    return "://" in path or Path(path).is_absolute()


def join_path(base: str, path: str) -> str:
    """`path` relative to `base` unless it is absolute; keeps a URI base's `//` intact."""
    if is_absolute_path(path):
        return path
    if "://" in base:
        return f"{base.rstrip('/')}/{path}"
    return str(Path(base) / path)


# ---------------------------------------------------------------- loading


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: not a config (collections nested too deeply)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _packaged_yaml(name: str) -> dict[str, Any]:
    return _read_yaml((resources.files("segpipe.pipeline") / name).read_text(), f"pipeline/{name}")


def _merge(base: dict[str, Any], override: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if key not in base:
            raise ConfigError(f"{prefix}{key}: unknown key")
        if isinstance(base[key], dict) and isinstance(value, dict) and not _is_free_mapping(prefix + key):
            merged[key] = _merge(base[key], value, f"{prefix}{key}.")
        else:
            merged[key] = value
    return merged


def _is_free_mapping(dotted: str) -> bool:
    """Fields typed dict[str, str]: their keys are user data, not config keys."""
    return dotted in {"kubeflow.gpu_node_selector"}


def _leaves(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields a (partial) mapping of sections sets."""
    names = []
    for key, value in values.items():
        if isinstance(value, dict) and not _is_free_mapping(prefix + key):
            names += _leaves(value, f"{prefix}{key}.")
        else:
            names.append(prefix + key)
    return names


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        for option in inner[:-1]:  # e.g. str | float: "auto" or a number
            try:
                return _coerce(value, option, name)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], name)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, name + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        item = (typing.get_args(hint) or (str,))[0]  # tuple[int, ...] holds ints
        return tuple(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(v, str, f"{name}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{name}: expected int, got bool {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_range(value: Any, meta: Mapping[str, Any], name: str) -> None:
    if value is None or not meta:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{name}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}: {value!r} is above the maximum {hi}")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key")
    kwargs = {}
    for name, fld in fields.items():
        if name not in values:
            raise ConfigError(f"{prefix}{name}: missing")
        value = _coerce(values[name], hints[name], prefix + name)
        _check_range(value, fld.metadata, prefix + name)
        kwargs[name] = value
    return cls(**kwargs)


def _check_consistency(cfg: SegpipeConfig) -> None:
    for name in ("root", "pipeline_name"):  # `--set root=` must not quietly mean the current folder
        if not getattr(cfg, name).strip():
            raise ConfigError(f"{name}: must not be empty")
    factor = 2 ** cfg.model.depth
    if input_size_problem(cfg.model.encoder, cfg.transform.image_size):
        raise ConfigError(input_size_problem(cfg.model.encoder, cfg.transform.image_size))  # names both fields
    if cfg.model.encoder == UNET and cfg.transform.image_size % factor:  # a backbone ignores model.depth
        raise ConfigError(
            f"transform.image_size: {cfg.transform.image_size} is not divisible by 2**model.depth = {factor}"
        )
    if "{SPAN}" not in cfg.data.input_pattern:
        raise ConfigError(f"data.input_pattern: {cfg.data.input_pattern!r} has no {{SPAN}} placeholder")
    if cfg.data.min_image_size < 1:
        raise ConfigError("data.min_image_size: must be positive")
    if not DEVICE_FORM.fullmatch(cfg.train.device):
        raise ConfigError(f"train.device: {cfg.train.device!r} is not auto, cpu:N or gpu:N")
    crop = crop_size_problem(cfg.train.crop_size, cfg.transform.image_size, depth=cfg.model.depth,
                             encoder=cfg.model.encoder)
    if crop:
        raise ConfigError(crop)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=3` -> ("train.epochs", 3); the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected SECTION.FIELD=VALUE")
    value = _read_yaml(f"v: {raw}", f"--set {key}")["v"] if raw.strip() else ""
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def load_config(
    path: str | Path | None = None,
    *,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SegpipeConfig:
    """Build the validated config; raises ConfigError naming the first bad field."""
    values = _packaged_yaml("default.yaml")
    user: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        user = _read_yaml(_read_config_text(path), str(path))
    chosen = profile or user.get("profile") or values["profile"]
    if chosen not in PROFILES:
        raise ConfigError(f"profile: {chosen!r} is not one of {', '.join(PROFILES)}")
    if chosen != AUTO_PROFILE:
        values = _merge(values, _packaged_yaml(f"profiles/{chosen}.yaml"))
    values = _merge(values, user)
    explicit = set(_leaves(user)) - {"profile"}
    for dotted, value in (overrides or {}).items():
        values = _merge(values, _nest(dotted, value))
        explicit.update(_leaves(_nest(dotted, value)))
    values["profile"] = chosen
    cfg = dataclasses.replace(_build(SegpipeConfig, values), explicit=tuple(sorted(explicit)))
    _check_consistency(cfg)
    return cfg


def _read_config_text(path: Path) -> str:
    """The file's text, read with a size cap; ConfigError naming the file otherwise."""
    try:
        if path.is_char_device() or path.is_block_device():
            raise ConfigError(f"{path}: a device, not a config file")
        with open(path, "rb") as fh:  # a pipe (--config <(...)) is fine: it ends
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 10} KiB, not a config file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def with_overrides(cfg: SegpipeConfig, overrides: Mapping[str, Any], *, explicit: bool = True) -> SegpipeConfig:
    """A copy of `cfg` with dotted overrides applied and validated again.

    The overridden fields count as set by the user (`explicit`), unless `explicit=False`: the
    plan's own overrides, and a config restored from its serialised values.
    """
    values = cfg.as_dict()
    names = set(cfg.explicit)
    for dotted, value in overrides.items():
        values = _merge(values, _nest(dotted, value))
        if explicit:
            names.update(_leaves(_nest(dotted, value)))
    new = dataclasses.replace(_build(SegpipeConfig, values), explicit=tuple(sorted(names)))
    _check_consistency(new)
    return new
