"""The segpipe DAG, declared once.

ExampleGen -> StatisticsGen -> schema import -> ExampleValidator -> Plan (the recipe fitted to the
data and the budget) -> Transform -> Tuner (optional, `tuner.enabled`: a KerasTuner search whose best
values the Trainer takes) -> Trainer (warm start from the latest blessed model) -> Evaluator
(baseline: the same model) -> InfraValidator (the blessed model loaded the way a model server loads
it) -> Pusher (only if both blessed) -> BulkInferrer (optional, `bulk_inference.enabled`: the newest
span scored by the version just pushed).

`create_pipeline(cfg)` returns the nodes in execution order. A node names the real component
function, which of its arguments are input artifacts (references to other nodes' outputs), which are
output artifacts (and their types), and how the config maps to its plain parameters. Two resolver
nodes (the latest blessed model, the statistics that model was trained on) read the serving dir, so
the local runner and Kubeflow apply the same rule. Both runners call `execute_node`; neither has its
own copy of the wiring, nor of how the plan and the tuner's values reach Transform and the Trainer
(`planned_config`).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from segpipe.components.bulk_inferrer import infer_examples
from segpipe.components.core import artifacts
from segpipe.components.evaluator import evaluate_model
from segpipe.components.example_gen import resolve_spans, run_example_gen
from segpipe.components.example_validator import validate_examples
from segpipe.components.infra_validator import validate_infra
from segpipe.components.plan import PLANNED_FIELDS, make_plan, read_overrides, resolve_device
from segpipe.components.core.serving import SERVING_INFO_FILE, latest_blessed_model
from segpipe.components.pusher import list_versions, push_model
from segpipe.components.schema_gen import import_schema
from segpipe.components.statistics_gen import generate_statistics
from segpipe.components.trainer import train_model
from segpipe.components.transform import run_transform
from segpipe.components.tuner import read_values, tune_hyperparameters
from segpipe.pipeline.config import SegpipeConfig, with_overrides

log = logging.getLogger(__name__)

BACKUPS_DIR = ".trainer_backups"  # under the pipeline root: BackupAndRestore state per execution
PLAN_INPUT = "plan"  # the context ref of a node whose parameters the plan's overrides feed
HYPERPARAMETERS_INPUT = "hyperparameters"  # ... and the Tuner's best values, after the plan's

# Run parameters: what a user changes per run (CLI flags locally, pipeline parameters on Kubeflow),
# mapped to the config field each one sets. `span` -1 means "the latest span".
RUN_PARAMETERS: dict[str, tuple[str, type]] = {
    "input_pattern": ("data.input_pattern", str),
    "span": ("data.span", int),
    "pixel_accuracy_threshold": ("evaluation.pixel_accuracy_threshold", float),
    "epochs": ("train.epochs", int),
    "image_size": ("transform.image_size", int),
    "root": ("root", str),
    "require_new_span": ("data.require_new_span", bool),
}


@dataclass(frozen=True)
class Ref:
    """An input taken from another node: one of its output artifacts, or a resolver's value."""

    node: str
    output: str | None = None  # None: the node's returned value (resolvers)


@dataclass(frozen=True)
class NodeContext:
    """What a runner knows at execution time and never part of the cache key."""

    run_id: str
    inputs: Mapping[str, str | None]  # every input (incl. `context` refs) as a path or value
    scratch_dir: str  # per-execution folder that survives retries (trainer backups)


@dataclass(frozen=True)
class Node:
    """One step: a component function plus its wiring.

    `inputs`/`outputs` map the function's argument names to refs / artifact types. `context` refs
    are fingerprinted inputs the function does not take: `runtime` sees them (the pusher's run
    record), and a `plan` ref makes `execute_node` apply the Plan's overrides to the config before
    `params` (Transform, Trainer), so they key the cache and link the plan in ML Metadata. `params(cfg)` gives
    the plain, cache-keyed parameters; `runtime(cfg, ctx)` the per-run ones. A resolver has no
    outputs and returns a value (a path or None), typed `value_type` in ML Metadata.
    """

    name: str
    fn: Callable[..., Any]
    params: Callable[[SegpipeConfig], dict[str, Any]]
    inputs: Mapping[str, Ref] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    context: Mapping[str, Ref] = field(default_factory=dict)
    runtime: Callable[[SegpipeConfig, NodeContext], dict[str, Any]] | None = None
    after: tuple[str, ...] = ()  # ordering without data (the validator gates the transform)
    when: Ref | None = None  # run only if this boolean result is true (the blessing)
    watch: Callable[[SegpipeConfig], list[str]] | None = None  # external files in the cache key
    value_type: str | None = None  # resolvers: the artifact type of the returned path
    gpu: bool = False  # the accelerator node (Kubeflow resources)

    @property
    def is_resolver(self) -> bool:
        return self.value_type is not None


# ------------------------------------------------------------------ resolvers


def latest_blessed_info(serving_dir: str) -> dict[str, Any] | None:
    """The `segpipe.json` of the highest serving version, or None when nothing was pushed."""
    latest = latest_blessed_model(serving_dir)
    if latest is None:
        return None
    path = Path(latest) / SERVING_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def trained_spans(info: Mapping[str, Any]) -> list[int]:
    """Spans a pushed model was trained on (the pusher's run_info, wherever it nests it)."""
    for holder in (info, info.get("run_info") or {}):
        if holder.get("spans"):
            return [int(s) for s in holder["spans"]]
    return []


def check_new_data(cfg: SegpipeConfig) -> tuple[bool, str]:
    """Should this run train? The one rule both runners apply before the DAG's steps.

    Only for a span newer than every span a serving version was trained on: every version counts,
    not only the latest, so after `segpipe serving rollback` the withdrawn versions' data is not
    new. `data.require_new_span: false` (`segpipe run --force`) trains anyway.
    """
    if not cfg.data.require_new_span:
        return True, "data.require_new_span is false: training without new data"
    versions = list_versions(cfg.serving_dir)
    if not versions:
        return True, "no model pushed yet"
    newest = {entry["version"]: max(spans) for entry in versions if (spans := trained_spans(entry["info"]))}
    if not newest:
        return True, "the serving versions do not record their spans"
    seen = max(newest.values())
    spans = resolve_spans(cfg.input_pattern, cfg.data.span, cfg.data.num_spans)
    if max(spans) > seen:
        return True, f"span {max(spans)} is newer than span {seen}, the newest any serving version was trained on"
    by = max(version for version, span in newest.items() if span == seen)
    return False, f"no new data: latest span {max(spans)}; serving version {by} was already trained on span {seen}"


def resolve_previous_statistics(serving_dir: str) -> str | None:
    """Statistics of the data behind the serving model: the drift baseline for new spans."""
    info = latest_blessed_info(serving_dir) or {}
    uri = info.get("statistics_uri") or (info.get("run_info") or {}).get("statistics_uri")
    return uri if uri and artifacts.is_published(uri) else None


def resolve_base_model(serving_dir: str) -> str | None:
    """The latest blessed model (highest serving version): warm start and evaluation baseline."""
    return latest_blessed_model(serving_dir)


# ------------------------------------------------------------------ config -> parameters


def data_files(cfg: SegpipeConfig) -> list[str]:
    """The raw files the next ExampleGen would read: a new or changed file misses the cache."""
    spans = resolve_spans(cfg.input_pattern, cfg.data.span, cfg.data.num_spans)
    return sorted(f for s in spans for f in glob.glob(cfg.input_pattern.replace("{SPAN}", str(s))))


def _beam(cfg: SegpipeConfig) -> list[str]:
    return list(cfg.beam.pipeline_args)


def _example_gen_params(cfg: SegpipeConfig) -> dict[str, Any]:
    return {
        "input_pattern": cfg.input_pattern,
        "span": cfg.data.span,
        "num_spans": cfg.data.num_spans,
        "splits": dataclasses.asdict(cfg.data.splits),
        "num_classes": cfg.data.num_classes,
        "min_image_size": cfg.data.min_image_size,
        "skip_bad_records": cfg.data.skip_bad_records,
        "beam_args": _beam(cfg),
    }


def config_value(cfg: SegpipeConfig, dotted: str) -> Any:
    """The value of a dotted field (`train.epochs`)."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _plan_params(cfg: SegpipeConfig) -> dict[str, Any]:
    """The plan's inputs from the config: what it may choose (with the configured values), what the
    user set, and the device: detected here for `auto` (the local runner trains on this machine)."""
    return {
        "budget_minutes": cfg.train.budget_minutes,
        "device": str(resolve_device(cfg.train.device)),
        "explicit": [name for name in PLANNED_FIELDS if name in cfg.explicit],
        "base": {name: config_value(cfg, name) for name in PLANNED_FIELDS},
        "profile": cfg.profile,
        "num_classes": cfg.data.num_classes,
        "encoder": cfg.model.encoder,
    }


def _trainer_params(cfg: SegpipeConfig) -> dict[str, Any]:
    return {
        "num_classes": cfg.data.num_classes,
        "image_size": cfg.transform.image_size,
        "model_config": {**dataclasses.asdict(cfg.model), "encoder_weights": cfg.encoder_weights_path},
        "train_config": dataclasses.asdict(cfg.train),
    }


def _tuner_params(cfg: SegpipeConfig) -> dict[str, Any]:
    """The Trainer's parameters plus the search: a field the user set is not searched (it wins anyway)."""
    tuner = cfg.tuner
    space = {name: values for name, values in tuner.search_space().items() if name not in cfg.explicit}
    return {**_trainer_params(cfg), "search_space": space, "max_trials": tuner.max_trials,
            "budget_minutes": tuner.budget_minutes, "trial_fraction": tuner.trial_fraction}


def _evaluator_params(cfg: SegpipeConfig) -> dict[str, Any]:
    ev = cfg.evaluation
    return {
        "num_classes": cfg.data.num_classes,
        "pixel_accuracy_threshold": ev.pixel_accuracy_threshold,
        "min_foreground_iou": ev.min_foreground_iou,
        "min_class_iou": ev.min_class_iou,
        "max_regression": ev.max_regression,
        "num_worst_examples": ev.num_worst_examples,
        "tflite_variants": list(cfg.push.tflite),
        "max_tflite_drop": ev.max_tflite_drop,
        "beam_args": _beam(cfg),
    }


def _infra_validator_params(cfg: SegpipeConfig) -> dict[str, Any]:
    iv = cfg.infra_validation
    return {"num_classes": cfg.data.num_classes, **dataclasses.asdict(iv), "batch_sizes": list(iv.batch_sizes)}


def _pusher_runtime(cfg: SegpipeConfig, ctx: NodeContext) -> dict[str, Any]:
    """The run record stored beside each pushed version (what the resolvers read back)."""
    examples = ctx.inputs.get("examples")
    spans = artifacts.read_info(examples).extra.get("spans", []) if examples else []
    return {
        "run_info": {
            "run_id": ctx.run_id,
            "spans": spans,
            "statistics_uri": ctx.inputs.get("statistics"),
            "examples_uri": examples,
            "code_version": artifacts.code_version(),
            "pipeline_name": cfg.pipeline_name,
        }
    }


def _trainer_runtime(cfg: SegpipeConfig, ctx: NodeContext) -> dict[str, Any]:
    # Without warm start the trainer has no base-model input; it still takes the argument.
    return {"backup_dir": ctx.scratch_dir, **({} if cfg.train.warm_start else {"base_model_uri": None})}


# ------------------------------------------------------------------ the DAG


def create_pipeline(cfg: SegpipeConfig) -> list[Node]:
    """The segpipe DAG in execution order (each node's inputs come from earlier nodes)."""
    base_model = {"base_model_uri": Ref("latest_model")} if cfg.train.warm_start else {}
    tuned = {HYPERPARAMETERS_INPUT: Ref("tuner", "hyperparameters_uri")} if cfg.tuner.enabled else {}
    tuner = Node(
        "tuner",
        tune_hyperparameters,
        _tuner_params,
        inputs={
            "transformed_examples_uri": Ref("transform", "transformed_examples_uri"),
            "transform_graph_uri": Ref("transform", "transform_graph_uri"),
        },
        outputs={"hyperparameters_uri": artifacts.HYPERPARAMETERS},
        context={PLAN_INPUT: Ref("plan", "plan_uri")},
        gpu=True,  # trains like the Trainer, on the same pool
    )
    nodes = [
        Node(
            "example_gen",
            run_example_gen,
            _example_gen_params,
            outputs={"examples_uri": artifacts.EXAMPLES},
            watch=data_files,
        ),
        Node(
            "statistics_gen",
            generate_statistics,
            lambda cfg: {"beam_args": _beam(cfg)},
            inputs={"examples_uri": Ref("example_gen", "examples_uri")},
            outputs={"statistics_uri": artifacts.STATISTICS},
        ),
        Node(
            "schema_gen",
            import_schema,
            lambda cfg: {"schema_path": cfg.schema_path},
            outputs={"schema_uri": artifacts.SCHEMA},
            watch=lambda cfg: [cfg.schema_path],
        ),
        Node(
            "previous_statistics",
            resolve_previous_statistics,
            lambda cfg: {"serving_dir": cfg.serving_dir},
            value_type=artifacts.STATISTICS,
        ),
        Node(
            "example_validator",
            validate_examples,
            lambda cfg: {
                "drift_threshold": cfg.validation.drift_threshold,
                "max_invalid_fraction": cfg.validation.max_invalid_fraction,
            },
            inputs={
                "statistics_uri": Ref("statistics_gen", "statistics_uri"),
                "schema_uri": Ref("schema_gen", "schema_uri"),
                "examples_uri": Ref("example_gen", "examples_uri"),
                "previous_statistics_uri": Ref("previous_statistics"),
            },
            outputs={"anomalies_uri": artifacts.ANOMALIES},
        ),
        Node(
            "plan",
            make_plan,
            _plan_params,
            inputs={
                "statistics_uri": Ref("statistics_gen", "statistics_uri"),
                "examples_uri": Ref("example_gen", "examples_uri"),
            },
            outputs={"plan_uri": artifacts.PLAN},
            after=("example_validator",),
        ),
        Node(
            "transform",
            run_transform,
            lambda cfg: {
                "image_size": cfg.transform.image_size,
                "standardize": cfg.transform.standardize,
                "beam_args": _beam(cfg),
            },
            inputs={
                "examples_uri": Ref("example_gen", "examples_uri"),
                "schema_uri": Ref("schema_gen", "schema_uri"),
            },
            context={PLAN_INPUT: Ref("plan", "plan_uri")},
            outputs={
                "transformed_examples_uri": artifacts.TRANSFORMED_EXAMPLES,
                "transform_graph_uri": artifacts.TRANSFORM_GRAPH,
            },
            after=("example_validator",),
        ),
        Node(
            "latest_model",
            resolve_base_model,
            lambda cfg: {"serving_dir": cfg.serving_dir},
            value_type=artifacts.MODEL,
        ),
        *([tuner] if cfg.tuner.enabled else []),
        Node(
            "trainer",
            train_model,
            _trainer_params,
            inputs={
                "transformed_examples_uri": Ref("transform", "transformed_examples_uri"),
                "transform_graph_uri": Ref("transform", "transform_graph_uri"),
                **base_model,
            },
            outputs={"model_uri": artifacts.MODEL, "model_run_uri": artifacts.MODEL_RUN},
            context={PLAN_INPUT: Ref("plan", "plan_uri"), **tuned},
            runtime=_trainer_runtime,
            gpu=True,
        ),
        Node(
            "evaluator",
            evaluate_model,
            _evaluator_params,
            inputs={
                "model_uri": Ref("trainer", "model_uri"),
                "examples_uri": Ref("example_gen", "examples_uri"),
                "baseline_model_uri": Ref("latest_model"),
                "model_run_uri": Ref("trainer", "model_run_uri"),  # its history: was training still improving?
            },
            outputs={"evaluation_uri": artifacts.MODEL_EVALUATION, "blessing_uri": artifacts.MODEL_BLESSING},
        ),
        Node(
            "infra_validator",
            validate_infra,
            _infra_validator_params,
            inputs={
                "model_uri": Ref("trainer", "model_uri"),
                "examples_uri": Ref("example_gen", "examples_uri"),
                "blessing_uri": Ref("evaluator", "blessing_uri"),
            },
            outputs={"infra_blessing_uri": artifacts.INFRA_BLESSING},
            when=Ref("evaluator", "blessed"),
        ),
        Node(
            "pusher",
            push_model,
            lambda cfg: {"serving_dir": cfg.serving_dir, "keep_last": cfg.push.keep_last},
            inputs={
                "model_uri": Ref("trainer", "model_uri"),
                "blessing_uri": Ref("evaluator", "blessing_uri"),
                "evaluation_uri": Ref("evaluator", "evaluation_uri"),
                "infra_blessing_uri": Ref("infra_validator", "infra_blessing_uri"),
            },
            outputs={"pushed_model_uri": artifacts.PUSHED_MODEL},
            context={
                "examples": Ref("example_gen", "examples_uri"),
                "statistics": Ref("statistics_gen", "statistics_uri"),
            },
            runtime=_pusher_runtime,
            when=Ref("infra_validator", "blessed"),
        ),
    ]
    if cfg.bulk_inference.enabled:
        # The newest span scored by the version just pushed: only when the Pusher pushed one.
        nodes.append(Node(
            "bulk_inferrer",
            infer_examples,
            lambda cfg: {"beam_args": _beam(cfg)},
            inputs={
                "pushed_model_uri": Ref("pusher", "pushed_model_uri"),
                "examples_uri": Ref("example_gen", "examples_uri"),
            },
            outputs={"inference_result_uri": artifacts.INFERENCE_RESULT},
            when=Ref("pusher", "pushed"),
        ))
    check_order(nodes)
    return nodes


def check_order(nodes: list[Node]) -> None:
    """Every reference points at an earlier node's declared output (a DAG in execution order)."""
    seen: dict[str, Node] = {}
    for node in nodes:
        refs = [*node.inputs.values(), *node.context.values(), *([node.when] if node.when else [])]
        for ref in refs:
            source = seen.get(ref.node)
            if source is None:
                raise ValueError(f"{node.name}: input from {ref.node!r}, which is not an earlier node")
            if ref.output is not None and ref is not node.when and ref.output not in source.outputs:
                raise ValueError(f"{node.name}: {ref.node} has no output {ref.output!r}")
        for name in node.after:
            if name not in seen:
                raise ValueError(f"{node.name}: runs after {name!r}, which is not an earlier node")
        if node.name in seen:
            raise ValueError(f"duplicate node name {node.name!r}")
        seen[node.name] = node


def artifact_name(argument: str) -> str:
    """`examples_uri` -> `examples`: an output's folder name locally and its input/output name in KFP."""
    return argument[: -len("_uri")] if argument.endswith("_uri") else argument


def scratch_dir(cfg: SegpipeConfig, execution_key: str) -> str:
    """Per-execution folder that outlives retries and reruns (the trainer's backups)."""
    return str(Path(cfg.root) / BACKUPS_DIR / execution_key[:16])


def nodes_by_name(nodes: list[Node]) -> dict[str, Node]:
    return {node.name: node for node in nodes}


def planned_config(node: Node, cfg: SegpipeConfig, inputs: Mapping[str, str | None]) -> SegpipeConfig:
    """`cfg` with the Plan's overrides, then the Tuner's best values, for a node that takes them; else `cfg`.

    A field the user set keeps its value: the plan never chooses one, and a tuner value for one is dropped.
    """
    readers = [(name, read) for name, read in ((PLAN_INPUT, read_overrides), (HYPERPARAMETERS_INPUT, read_values))
               if name in node.context]
    if not readers:
        return cfg
    overrides: dict[str, Any] = {}
    for name, read in readers:
        uri = inputs.get(name)
        if uri is None:
            raise ValueError(f"{node.name}: the {name} input is missing")
        overrides.update(read(uri))
    return with_overrides(cfg, {k: v for k, v in overrides.items() if k not in cfg.explicit}, explicit=False)


def execute_node(
    node: Node,
    cfg: SegpipeConfig,
    inputs: Mapping[str, str | None],
    outputs: Mapping[str, str],
    ctx: NodeContext,
) -> Any:
    """Call the node's component function: the one call both runners make."""
    cfg = planned_config(node, cfg, inputs)
    kwargs: dict[str, Any] = {**node.params(cfg)}
    kwargs.update({name: inputs.get(name) for name in node.inputs})
    kwargs.update(outputs)
    if node.runtime is not None:
        kwargs.update(node.runtime(cfg, ctx))
    return node.fn(**kwargs)
