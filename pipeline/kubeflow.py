"""Kubeflow Pipelines v2: the same DAG as `pipeline.pipeline.create_pipeline`, compiled, submitted, scheduled.

`build_pipeline(cfg, image=...)` walks the node list and creates one KFP task per node from the
matching lightweight component below. Each component body only calls `run_node`, which looks the
node up in `create_pipeline(cfg)` and calls `execute_node` exactly as the local runner does; the
image already holds segpipe, so nothing is pip-installed at run time. Run parameters (data
pattern, span, threshold, epochs, image size, profile, root) are pipeline parameters; a first
`config` task turns them plus the compile-time config into the run's config JSON. Epochs and image
size default to 0, "not set", unless the compiled config set them: the profile's value, or under
`profile: auto` the Plan task's choice. The Plan task runs on a CPU pod and plans for the trainer
pod's declared resources (`train.device`, else the `kubeflow` section's requests). With
`tuner.enabled` the Tuner is a GPU task like the trainer, whose `tuned_` component variant then
takes the Tuner's Hyperparameters artifact.

This module deliberately has no `from __future__ import annotations`: KFP reads the component
signatures' annotations at runtime (Input[Model], NamedTuple outputs) and cannot parse strings.
"""
import dataclasses
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from segpipe.components.core import artifacts
from segpipe.components.plan import PLANNED_FIELDS
from segpipe.pipeline.config import SegpipeConfig, load_config, with_overrides
from segpipe.pipeline.pipeline import (
    HYPERPARAMETERS_INPUT,
    RUN_PARAMETERS,
    Node,
    NodeContext,
    Ref,
    artifact_name,
    check_new_data,
    create_pipeline,
    execute_node,
    nodes_by_name,
    scratch_dir,
)

log = logging.getLogger(__name__)

TOKEN_ENV = "KF_PIPELINES_TOKEN"
CONFIG_TASK = "config"
NEW_DATA_TASK = "new-data"  # gates every step: the local runner's "no new data" rule
EXPLICIT_KEY = "explicit"  # in the run's config JSON: the fields the user set (the plan keeps them)
NOT_SET = 0  # the default of a run parameter the plan may choose: "use the config's value"


# ------------------------------------------------------------------ what runs inside the pods


def resolve_run_config(base_config: str, profile: str, run_parameters: dict) -> str:
    """The run's config: defaults <- `profile` <- compile-time settings <- run parameters, as JSON."""
    overrides = json.loads(base_config)
    for name, value in run_parameters.items():
        dotted = RUN_PARAMETERS[name][0]
        if dotted in PLANNED_FIELDS and value == NOT_SET:
            continue
        overrides[dotted] = None if (name == "span" and value < 0) else value
    cfg = load_config(profile=profile, overrides=overrides)
    return json.dumps({**cfg.as_dict(), EXPLICIT_KEY: list(cfg.explicit)}, sort_keys=True)


def config_from_json(text: str) -> SegpipeConfig:
    """The run's config from `resolve_run_config`'s JSON, with the fields the user set."""
    values = json.loads(text)
    explicit = values.pop(EXPLICIT_KEY)
    base = load_config(profile=values["profile"])
    cfg = with_overrides(base, {k: v for k, v in values.items() if k != "profile"}, explicit=False)
    return dataclasses.replace(cfg, explicit=tuple(explicit))


def run_new_data_check(config: str) -> str:
    """The first task of every run: the local runner's rule (`check_new_data`), as JSON.

    A scheduled run whose serving versions were already trained on the latest span (after a
    rollback too) trains nothing: every step sits inside `dsl.If(new)`.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    new, reason = check_new_data(config_from_json(config))
    logging.getLogger(__name__).info("new data: %s (%s)", new, reason)
    return json.dumps({"new": new, "reason": reason})


def _as_path_or_value(value: Any) -> Optional[str]:
    """KFP artifacts -> their local path; resolver strings ("" = nothing resolved) -> path or None."""
    if hasattr(value, "path"):
        return value.path
    return value or None


def run_node(name: str, config: str, **arguments: Any) -> str:
    """Run node `name` of the segpipe DAG with KFP's artifact paths; returns the result as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_json(config)
    node = nodes_by_name(create_pipeline(cfg))[name]
    if node.is_resolver:
        return node.fn(**node.params(cfg)) or ""
    inputs, outputs, ctx = node_call(node, cfg, arguments)
    return json.dumps(execute_node(node, cfg, inputs, outputs, ctx), default=str, sort_keys=True)


def node_call(node: Node, cfg: SegpipeConfig, arguments: dict) -> tuple[dict, dict, NodeContext]:
    """`execute_node`'s inputs, outputs and context from a component's KFP arguments."""
    name = node.name
    paths = {key: _as_path_or_value(value) for key, value in arguments.items()}
    inputs = {arg: paths.get(artifact_name(arg)) for arg in node.inputs}
    inputs.update({key: paths.get(key) for key in node.context})
    outputs = {arg: paths[artifact_name(arg)] for arg in node.outputs}
    key = artifacts.fingerprint(name, node.params(cfg), artifacts.code_version(),
                                artifacts.input_fingerprint(*[inputs[k] for k in sorted(inputs)]))
    ctx = NodeContext(
        run_id=arguments.get("run_id") or "kfp",
        inputs=inputs,
        scratch_dir=scratch_dir(cfg, key),
    )
    return inputs, outputs, ctx


# ------------------------------------------------------------------ one lightweight component per node
# Each signature mirrors its node (checked by `check_component`); the body only calls `run_node`.


def make_config(base_config: str, profile: str, input_pattern: str, span: int, pixel_accuracy_threshold: float,
                epochs: int, image_size: int, root: str, require_new_span: bool) -> str:
    from segpipe.pipeline.kubeflow import resolve_run_config

    return resolve_run_config(base_config, profile, {
        "input_pattern": input_pattern, "span": span, "pixel_accuracy_threshold": pixel_accuracy_threshold,
        "epochs": epochs, "image_size": image_size, "root": root, "require_new_span": require_new_span})


def new_data(config: str) -> NamedTuple("NewDataOutputs", [("result", str), ("new", bool)]):
    import json

    from segpipe.pipeline.kubeflow import run_new_data_check

    result = run_new_data_check(config)
    return (result, bool(json.loads(result)["new"]))


def example_gen(config: str, examples: Output[Dataset]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("example_gen", config, examples=examples)


def statistics_gen(config: str, examples: Input[Dataset], statistics: Output[Artifact]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("statistics_gen", config, examples=examples, statistics=statistics)


def schema_gen(config: str, schema: Output[Artifact]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("schema_gen", config, schema=schema)


def previous_statistics(config: str) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("previous_statistics", config)


def example_validator(config: str, statistics: Input[Artifact], schema: Input[Artifact], examples: Input[Dataset],
                      previous_statistics: str, anomalies: Output[Artifact]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("example_validator", config, statistics=statistics, schema=schema, examples=examples,
                    previous_statistics=previous_statistics, anomalies=anomalies)


def plan(config: str, statistics: Input[Artifact], examples: Input[Dataset], plan: Output[Artifact]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("plan", config, statistics=statistics, examples=examples, plan=plan)


def transform(config: str, examples: Input[Dataset], schema: Input[Artifact], plan: Input[Artifact],
              transformed_examples: Output[Dataset], transform_graph: Output[Artifact]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("transform", config, examples=examples, schema=schema, plan=plan,
                    transformed_examples=transformed_examples, transform_graph=transform_graph)


def latest_model(config: str) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("latest_model", config)


def tuner(config: str, transformed_examples: Input[Dataset], transform_graph: Input[Artifact], plan: Input[Artifact],
          hyperparameters: Output[Artifact]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("tuner", config, transformed_examples=transformed_examples, transform_graph=transform_graph,
                    plan=plan, hyperparameters=hyperparameters)


def trainer(config: str, transformed_examples: Input[Dataset], transform_graph: Input[Artifact], base_model: str,
            plan: Input[Artifact], model: Output[Model], model_run: Output[Artifact]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("trainer", config, transformed_examples=transformed_examples, transform_graph=transform_graph,
                    base_model=base_model, plan=plan, model=model, model_run=model_run)


def tuned_trainer(config: str, transformed_examples: Input[Dataset], transform_graph: Input[Artifact],
                  base_model: str, plan: Input[Artifact], hyperparameters: Input[Artifact], model: Output[Model],
                  model_run: Output[Artifact]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("trainer", config, transformed_examples=transformed_examples, transform_graph=transform_graph,
                    base_model=base_model, plan=plan, hyperparameters=hyperparameters, model=model,
                    model_run=model_run)


def trainer_tfjob(config: str, transformed_examples: Input[Dataset], transform_graph: Input[Artifact],
                  base_model: str, plan: Input[Artifact], model: Output[Model], model_run: Output[Artifact]) -> str:
    from segpipe.pipeline.tfjob import run_trainer_tfjob

    return run_trainer_tfjob(config, transformed_examples=transformed_examples, transform_graph=transform_graph,
                             base_model=base_model, plan=plan, model=model, model_run=model_run)


def tuned_trainer_tfjob(config: str, transformed_examples: Input[Dataset], transform_graph: Input[Artifact],
                        base_model: str, plan: Input[Artifact], hyperparameters: Input[Artifact],
                        model: Output[Model], model_run: Output[Artifact]) -> str:
    from segpipe.pipeline.tfjob import run_trainer_tfjob

    return run_trainer_tfjob(config, transformed_examples=transformed_examples, transform_graph=transform_graph,
                             base_model=base_model, plan=plan, hyperparameters=hyperparameters, model=model,
                             model_run=model_run)


def launches_tfjob(node: Node, cfg: SegpipeConfig) -> bool:
    """The trainer on `kubeflow.trainer_workers` > 1: its CPU task runs a TFJob (pipeline/tfjob.py)."""
    return node.name == "trainer" and cfg.kubeflow.trainer_workers > 1


def component_function(node: Node, cfg: SegpipeConfig) -> Callable[..., Any]:
    """The node's component. The trainer's `tuned_` variants also take the Tuner's artifact (tuner.enabled):
    a variant, not an optional input, because kfp.local cannot run a task with an unset input artifact."""
    if node.name != "trainer":
        return COMPONENT_FUNCTIONS[node.name]
    tuned = HYPERPARAMETERS_INPUT in node.context
    if launches_tfjob(node, cfg):
        return tuned_trainer_tfjob if tuned else trainer_tfjob
    return tuned_trainer if tuned else trainer


def evaluator(config: str, model: Input[Model], examples: Input[Dataset], baseline_model: str,
              model_run: Input[Artifact], evaluation: Output[Artifact], blessing: Output[Artifact],
              ) -> NamedTuple("EvaluatorOutputs", [("result", str), ("blessed", bool)]):
    import json

    from segpipe.pipeline.kubeflow import run_node

    result = run_node("evaluator", config, model=model, examples=examples, baseline_model=baseline_model,
                      model_run=model_run, evaluation=evaluation, blessing=blessing)
    return (result, bool(json.loads(result)["blessed"]))


def infra_validator(config: str, model: Input[Model], examples: Input[Dataset], blessing: Input[Artifact],
                    infra_blessing: Output[Artifact],
                    ) -> NamedTuple("InfraValidatorOutputs", [("result", str), ("blessed", bool)]):
    import json

    from segpipe.pipeline.kubeflow import run_node

    result = run_node("infra_validator", config, model=model, examples=examples, blessing=blessing,
                      infra_blessing=infra_blessing)
    return (result, bool(json.loads(result)["blessed"]))


def pusher(config: str, model: Input[Model], blessing: Input[Artifact], evaluation: Input[Artifact],
           infra_blessing: Input[Artifact], examples: Input[Dataset], statistics: Input[Artifact], run_id: str,
           pushed_model: Output[Artifact]) -> NamedTuple("PusherOutputs", [("result", str), ("pushed", bool)]):
    import json

    from segpipe.pipeline.kubeflow import run_node

    result = run_node("pusher", config, model=model, blessing=blessing, evaluation=evaluation,
                      infra_blessing=infra_blessing, examples=examples, statistics=statistics, run_id=run_id,
                      pushed_model=pushed_model)
    return (result, bool(json.loads(result)["pushed"]))  # `pushed` gates the BulkInferrer


def bulk_inferrer(config: str, pushed_model: Input[Artifact], examples: Input[Dataset],
                  inference_result: Output[Artifact]) -> str:
    from segpipe.pipeline.kubeflow import run_node

    return run_node("bulk_inferrer", config, pushed_model=pushed_model, examples=examples,
                    inference_result=inference_result)


COMPONENT_FUNCTIONS: dict[str, Callable[..., Any]] = {
    fn.__name__: fn
    for fn in (example_gen, statistics_gen, schema_gen, previous_statistics, example_validator, plan, transform,
               latest_model, tuner, trainer, evaluator, infra_validator, pusher, bulk_inferrer)
}


# ------------------------------------------------------------------ building the KFP pipeline


def node_io_names(node: Node) -> tuple[set[str], set[str]]:
    """The KFP input and output names a node's component must declare (besides `config`)."""
    inputs = {artifact_name(a) for a in node.inputs} | set(node.context)
    return inputs, {artifact_name(a) for a in node.outputs}


def check_component(node: Node, component: Any) -> None:
    """The component's inputs/outputs must match the node's wiring: the DAG stays declared once."""
    spec = component.component_spec
    declared_inputs = set(spec.inputs) - {"config"}
    declared_outputs = {name for name, out in spec.outputs.items() if "@" in out.type}  # artifacts only
    want_inputs, want_outputs = node_io_names(node)
    if not want_inputs <= declared_inputs or declared_outputs != want_outputs:
        raise ValueError(
            f"KFP component {spec.name}: inputs {sorted(declared_inputs)} / outputs {sorted(declared_outputs)} "
            f"do not match node {node.name}: inputs {sorted(want_inputs)} / outputs {sorted(want_outputs)}"
        )


def config_overrides(cfg: SegpipeConfig) -> dict[str, Any]:
    """What `cfg` sets beyond its profile's defaults, as dotted overrides (the compile-time layer)."""
    def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, dict) and prefix + key != "kubeflow.gpu_node_selector":
                out.update(flatten(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = list(value) if isinstance(value, tuple) else value
        return out

    mine, base = flatten(cfg.as_dict()), flatten(load_config(profile=cfg.profile).as_dict())
    # A field the user set stays set even at its default value, so the plan keeps it in the pods too.
    return {k: v for k, v in mine.items() if k != "profile" and (base.get(k) != v or k in cfg.explicit)}


def trainer_device(cfg: SegpipeConfig) -> str:
    """The device the plan assumes: `train.device`, or for `auto` the trainer pod's requested GPUs or
    CPU cores (the Plan task runs on a CPU pod and cannot see them)."""
    kf = cfg.kubeflow
    if cfg.train.device != "auto":
        return cfg.train.device
    if kf.accelerator_type and kf.accelerator_limit > 0:
        return f"gpu:{kf.accelerator_limit}"
    cores = float(kf.trainer_cpu_request[:-1]) / 1000 if kf.trainer_cpu_request.endswith("m") else float(
        kf.trainer_cpu_request)
    return f"cpu:{max(1, int(cores))}"


def parse_toleration(text: str) -> dict[str, Optional[str]]:
    """`key=value:Effect` or `key:Effect` -> kfp-kubernetes add_toleration arguments."""
    spec, _, effect = text.rpartition(":")
    if not spec or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(f"kubeflow.gpu_tolerations: {text!r} is not key[=value]:Effect")
    key, sep, value = spec.partition("=")
    return {"key": key, "operator": "Equal" if sep else "Exists", "value": value if sep else None, "effect": effect}


def apply_resources(task: "dsl.PipelineTask", node: Node, cfg: SegpipeConfig, *, resolver: bool) -> None:
    """CPU/memory on every task; GPU, node selector and tolerations on the trainer; retries; caching."""
    from kfp import kubernetes

    kf = cfg.kubeflow
    if node.gpu:
        task.set_cpu_request(kf.trainer_cpu_request).set_memory_request(kf.trainer_memory_request)
        if kf.accelerator_type and kf.accelerator_limit > 0:
            task.set_accelerator_type(kf.accelerator_type).set_accelerator_limit(kf.accelerator_limit)
        for label, value in sorted(kf.gpu_node_selector.items()):
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for toleration in kf.gpu_tolerations:
            kubernetes.add_toleration(task, **parse_toleration(toleration))
    else:
        task.set_cpu_request(kf.cpu_request).set_memory_request(kf.memory_request)
    if kf.retries > 0:
        task.set_retry(num_retries=kf.retries, backoff_duration=f"{kf.backoff_seconds}s", backoff_factor=2.0)
    # Resolvers read the serving dir, which changes between runs: never cache them.
    task.set_caching_options(enable_caching=not resolver)
    task.set_display_name(node.name)


def condition_scopes(nodes: list[Node]) -> dict[str, tuple[Ref, ...]]:
    """The `when` conditions each node's task sits under, outermost first.

    KFP refuses a task that consumes an output from inside a `dsl.If` it is not inside itself, so a
    node inherits its upstream nodes' conditions and adds its own: the Pusher (when the
    InfraValidator blessed) sits inside the InfraValidator's `dsl.If` (when the Evaluator blessed).
    """
    scopes: dict[str, tuple[Ref, ...]] = {}
    for node in nodes:
        upstream = {ref.node for ref in [*node.inputs.values(), *node.context.values()]} | set(node.after)
        upstream |= {node.when.node} if node.when else set()
        inherited = max((scopes[name] for name in upstream), key=len, default=())
        for name in upstream:
            if scopes[name] != inherited[: len(scopes[name])]:
                raise ValueError(f"{node.name}: its inputs sit under unrelated conditions ({name})")
        scopes[node.name] = inherited + ((node.when,) if node.when else ())
    return scopes


def build_pipeline(cfg: SegpipeConfig, *, image: str | None = None, with_condition: bool = True) -> Any:
    """The KFP pipeline for `create_pipeline(cfg)`.

    `with_condition=False` leaves out the `dsl.If(blessed)` conditions around the InfraValidator and
    the Pusher, for kfp.local (which does not support conditions); both check the blessings
    themselves, so the outcome is the same.
    """
    image = image or cfg.kubeflow.image
    nodes = create_pipeline(cfg)
    components = {}
    for node in nodes:
        function = component_function(node, cfg)
        component = dsl.component(function, base_image=image, install_kfp_package=False)
        check_component(node, component)
        components[node.name] = component
    config_component = dsl.component(make_config, base_image=image, install_kfp_package=False)
    new_data_component = dsl.component(new_data, base_image=image, install_kfp_package=False)
    base_config = json.dumps({**config_overrides(cfg), "train.device": trainer_device(cfg)}, sort_keys=True)

    defaults = run_parameter_defaults(cfg)

    def segpipe_pipeline(*args: Any, **kwargs: Any) -> None:
        params = {**dict(zip(defaults, args)), **kwargs}  # KFP passes the parameters positionally
        config_task = config_component(base_config=base_config, **params)
        config_task.set_cpu_request(cfg.kubeflow.cpu_request).set_memory_request(cfg.kubeflow.memory_request)
        config_task.set_display_name(CONFIG_TASK)
        check_task = new_data_component(config=config_task.output)
        check_task.set_cpu_request(cfg.kubeflow.cpu_request).set_memory_request(cfg.kubeflow.memory_request)
        check_task.set_caching_options(enable_caching=False)  # reads the serving dir, which changes
        check_task.set_display_name(NEW_DATA_TASK)
        gate = dsl.If(check_task.outputs["new"] == True) if with_condition else None  # noqa: E712
        if gate is not None:
            gate.__enter__()
        tasks: dict[str, dsl.PipelineTask] = {}
        scopes = condition_scopes(nodes) if with_condition else {}
        entered: list[tuple[Ref, Any]] = []  # the dsl.If contexts open now, outermost first
        for node in nodes:
            wanted = scopes.get(node.name, ())
            while entered and tuple(ref for ref, _ in entered) != wanted[: len(entered)]:
                entered.pop()[1].__exit__(None, None, None)
            for ref in wanted[len(entered):]:
                condition = dsl.If(tasks[ref.node].outputs[ref.output] == True)  # noqa: E712
                condition.__enter__()
                entered.append((ref, condition))
            arguments: dict[str, Any] = {"config": config_task.output}
            for argument, ref in [*node.inputs.items(), *node.context.items()]:
                source = tasks[ref.node]
                name = artifact_name(argument) if argument in node.inputs else argument
                arguments[name] = source.outputs[artifact_name(ref.output)] if ref.output else source.output
            for name in set(components[node.name].component_spec.inputs) - set(arguments):
                # The run id for the pusher's record; "" for an input this config leaves out (warm start off).
                arguments[name] = dsl.PIPELINE_JOB_ID_PLACEHOLDER if name == "run_id" else ""
            task = components[node.name](**arguments)
            for name in node.after:
                task.after(tasks[name])
            # A TFJob launcher needs no GPU: its replicas get the trainer's resources.
            resourced = dataclasses.replace(node, gpu=False) if launches_tfjob(node, cfg) else node
            apply_resources(task, resourced, cfg, resolver=node.is_resolver)
            tasks[node.name] = task
        while entered:
            entered.pop()[1].__exit__(None, None, None)
        if gate is not None:
            gate.__exit__(None, None, None)

    segpipe_pipeline.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=type(value))
        for name, value in defaults.items()
    ])
    segpipe_pipeline.__annotations__ = {name: type(value) for name, value in defaults.items()}
    return dsl.pipeline(
        name=cfg.pipeline_name,
        description="segpipe: TFRecords -> TFDV -> TFT -> Keras U-Net -> evaluator gate -> infra validator -> pusher",
        pipeline_root=cfg.kubeflow.pipeline_root or None,
    )(segpipe_pipeline)


def run_parameter_defaults(cfg: SegpipeConfig) -> dict[str, Any]:
    """Pipeline parameters and their compile-time defaults (span -1 = the latest span; epochs and
    image size NOT_SET unless the compiled config set them)."""
    values: dict[str, Any] = {"profile": cfg.profile}
    for name, (dotted, kind) in RUN_PARAMETERS.items():
        section, _, fld = dotted.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, fld)
        if dotted in PLANNED_FIELDS and dotted not in cfg.explicit:
            value = NOT_SET
        values[name] = kind(-1 if value is None else value)
    return values


def compile_pipeline(cfg: SegpipeConfig, out: str, *, image: str | None = None) -> str:
    """Write the KFP v2 IR YAML for the DAG; returns the path."""
    from kfp import compiler

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg, image=image), package_path=out)
    return out


# ------------------------------------------------------------------ talking to a KFP deployment


def kfp_client(host: str, namespace: str | None) -> Any:
    """A kfp.Client; the token comes from KF_PIPELINES_TOKEN, else kfp's own kube-config lookup."""
    import warnings

    import kfp

    token = os.environ.get(TOKEN_ENV) or None
    with warnings.catch_warnings():  # "only works with KFP >= 2.0.0-beta.2": noise on every call
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")


def describe_api_error(host: str, exc: BaseException) -> str:
    """One line for the user: refused (HTTP status + reason) or unreachable (the socket error)."""
    import re

    status = getattr(exc, "status", None)
    if status is not None:
        reason = getattr(exc, "reason", "") or ""
        return f"Kubeflow Pipelines at {host} refused the request: HTTP {status} {reason}".strip()
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    short = errno.group(1).strip() if errno else (text.splitlines()[0][:200] if text else type(exc).__name__)
    return f"cannot reach Kubeflow Pipelines at {host}: {short}"


def normalize_cron(expression: str) -> str:
    """KFP's scheduler wants 6 fields (seconds first); a classic 5-field cron gets `0` seconds."""
    from segpipe.components.core.errors import BadInputError

    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise BadInputError(f"--cron {expression!r}: expected 5 or 6 fields, e.g. \"0 3 * * *\"")
