"""The in-process runner: walks `create_pipeline(cfg)` on the pipeline root, with caching and lineage.

Layout under the root: `artifacts/<node>/<key>/<output>/` where `key` fingerprints everything that
determines the outputs (parameters, code version, the fingerprints of the input artifacts, a
resolved base model, the raw files read). A step whose folder already holds every output plus
`result.json` is reused; so a killed run resumes at its first incomplete step, and two runs on the
same root take turns on a per-step lock instead of clobbering each other. ML Metadata records
every step (COMPLETE, CACHED, FAILED, CANCELED) under a context per run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from segpipe.components.core import artifacts
from segpipe.components.core.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BadInputError,
    DiskFullError,
    NotBlessedError,
    SegpipeError,
    disk_full_error,
    is_disk_full,
)
from segpipe.components.pusher import list_versions
from segpipe.pipeline import console
from segpipe.pipeline import metadata as md
from segpipe.pipeline.config import SegpipeConfig, load_config, with_overrides
from segpipe.pipeline.pipeline import (
    SERVING_INFO_FILE,
    Node,
    NodeContext,
    artifact_name,
    check_new_data,
    create_pipeline,
    execute_node,
    scratch_dir,
)

log = logging.getLogger(__name__)

ARTIFACTS_DIR = "artifacts"
RESULT_FILE = "result.json"
ROOT_LOCK = ".segpipe.lock"
SERVING_MODEL_TYPE = "ServingModel"


@dataclass
class StepResult:
    node: str
    state: str  # done | cached | skipped | failed
    seconds: float
    result: Any = None
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class RunResult:
    run_id: str
    status: str  # pushed | not_blessed | no_new_data | failed | bad_input
    exit_code: int
    message: str = ""
    steps: list[StepResult] = field(default_factory=list)
    blessed: bool | None = None
    reasons: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)  # what to try next when not blessed
    metrics: dict[str, Any] = field(default_factory=dict)
    pushed_version: int | None = None
    pushed_path: str | None = None
    report_path: str | None = None


# ------------------------------------------------------------------ locks and fingerprints


def files_fingerprint(paths: list[str]) -> list[tuple[str, int, int]]:
    """Name, size and mtime of each file: cheap, and any rewrite of a span changes it."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:  # the component itself reports a missing input, naming it
            out.append((str(path), -1, -1))
            continue
        out.append((str(Path(path).resolve()), st.st_size, st.st_mtime_ns))
    return out


def value_fingerprint(value: str | None) -> str:
    """A resolved path's identity: the path plus its metadata file (a new push changes it)."""
    if value is None:
        return artifacts.fingerprint(None)
    parts: list[Any] = [str(Path(value).resolve())]
    for name in (SERVING_INFO_FILE, artifacts.METADATA_FILE):
        meta = Path(value) / name
        if meta.is_file():
            parts.append(meta.read_text())
    return artifacts.fingerprint(*parts)


def is_complete(exec_dir: Path, outputs: Mapping[str, str]) -> bool:
    return (exec_dir / RESULT_FILE).is_file() and all(artifacts.is_published(u) for u in outputs.values())


# ------------------------------------------------------------------ the run


@dataclass
class _Resolved:
    """What downstream steps see of a finished step."""

    uris: dict[str, str | None]  # output argument -> path (resolvers: "value")
    fingerprints: dict[str, str]
    types: dict[str, str]
    result: Any


class LocalRunner:
    """Runs a node list on one pipeline root; one instance per run."""

    def __init__(
        self,
        cfg: SegpipeConfig,
        *,
        nodes: list[Node] | None = None,
        no_cache: bool = False,
        run_id: str | None = None,
        progress: Callable[[str], None] = log.info,
    ) -> None:
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.nodes = nodes if nodes is not None else create_pipeline(cfg)
        self.no_cache = no_cache
        self.run_id = run_id or time.strftime("run-%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
        self.progress = progress
        self.code_version = artifacts.code_version()
        self.metadata = md.Metadata.from_config(cfg)
        self.resolved: dict[str, _Resolved] = {}

    # -------------------------------------------------------------- one step

    def _inputs(self, node: Node) -> tuple[dict[str, str | None], list[md.ArtifactRef], list[str]]:
        """Input paths/values by argument, their ML Metadata refs, and their fingerprints."""
        paths: dict[str, str | None] = {}
        refs: list[md.ArtifactRef] = []
        prints: list[str] = []
        for argument, ref in [*node.inputs.items(), *node.context.items()]:
            source = self.resolved[ref.node]
            key = ref.output or "value"
            uri = source.uris[key]
            paths[argument] = uri
            prints.append(f"{argument}={source.fingerprints[key]}")
            if uri is not None:
                refs.append(md.ArtifactRef(argument, str(Path(uri).resolve()), source.types[key],
                                           {"fingerprint": source.fingerprints[key]}))
            if ref.output is not None:  # a step reading the Pusher's output reads the version it pushed
                refs.extend(self._serving_output(source.result))
        return paths, refs, sorted(prints)

    def _execution_key(self, node: Node, params: dict[str, Any], input_prints: list[str]) -> str:
        watched = files_fingerprint(node.watch(self.cfg)) if node.watch else []
        key = artifacts.fingerprint(node.name, params, self.code_version, input_prints, watched)
        return artifacts.fingerprint(key, self.run_id) if self.no_cache else key

    def run_resolver(self, node: Node) -> StepResult:
        """Resolvers read outside state (the serving dir), so they run every time."""
        started = time.time()
        params = node.params(self.cfg)
        value = node.fn(**params)
        value = str(Path(value).resolve()) if value else None
        fp = value_fingerprint(value)
        self.resolved[node.name] = _Resolved({"value": value}, {"value": fp}, {"value": node.value_type}, value)
        outputs = [md.ArtifactRef("value", value, node.value_type, {"fingerprint": fp})] if value else []
        self.metadata.record_execution(
            pipeline_name=self.cfg.pipeline_name, run_id=self.run_id, node=node.name, state=md.COMPLETE,
            properties={"parameters": params, "result": value or "", "duration": time.time() - started},
            outputs=outputs,
        )
        return StepResult(node.name, "done", time.time() - started, value)

    def run_step(self, node: Node) -> StepResult:
        """Run (or reuse) one component step under its lock, and record it."""
        started = time.time()
        params = node.params(self.cfg)
        inputs, input_refs, input_prints = self._inputs(node)
        key = self._execution_key(node, params, input_prints)
        exec_dir = self.root / ARTIFACTS_DIR / node.name / key[:16]
        outputs = {arg: str(exec_dir / artifact_name(arg)) for arg in node.outputs}
        base = {"fingerprint": key, "parameters": params, "code_version": self.code_version}
        with artifacts.file_lock(self.root / ARTIFACTS_DIR / node.name / f".{key[:16]}.lock"):
            if not self.no_cache and is_complete(exec_dir, outputs):
                state, result = "cached", json.loads((exec_dir / RESULT_FILE).read_text())
            else:
                state = "done"
                ctx = NodeContext(self.run_id, inputs, scratch_dir(self.cfg, key))
                try:
                    result = execute_node(node, self.cfg, inputs, outputs, ctx)
                except BaseException as exc:
                    self._record(node, md.FAILED, {**base, "error": f"{type(exc).__name__}: {exc}",
                                                    "duration": time.time() - started},
                                 input_refs, key, outputs)
                    raise
                artifacts.write_json_atomic(exec_dir / RESULT_FILE, result)
        self.resolved[node.name] = _Resolved(
            dict(outputs), {a: artifacts.fingerprint(key, a) for a in outputs}, dict(node.outputs), result
        )
        extra = self._serving_output(result)
        self._record(node, md.CACHED if state == "cached" else md.COMPLETE,
                     {**base, "result": result, "duration": time.time() - started}, input_refs, key, outputs, extra)
        return StepResult(node.name, state, time.time() - started, result, outputs)

    def _serving_output(self, result: Any) -> list[md.ArtifactRef]:
        """A pushed version folder becomes an artifact too: the next run's base model links to it."""
        if isinstance(result, Mapping) and result.get("pushed") and result.get("path"):
            path = str(Path(result["path"]).resolve())
            return [md.ArtifactRef("serving_version", path, SERVING_MODEL_TYPE, {"version": result.get("version")})]
        return []

    def _record(self, node: Node, state: str, properties: dict[str, Any], input_refs: list[md.ArtifactRef],
                key: str, outputs: Mapping[str, str], extra: list[md.ArtifactRef] = ()) -> None:
        output_refs = [
            md.ArtifactRef(arg, str(Path(uri).resolve()), node.outputs[arg],
                           {"fingerprint": artifacts.fingerprint(key, arg), "node": node.name})
            for arg, uri in outputs.items() if artifacts.is_published(uri)
        ]
        self.metadata.record_execution(
            pipeline_name=self.cfg.pipeline_name, run_id=self.run_id, node=node.name, state=state,
            properties=properties, inputs=input_refs, outputs=[*output_refs, *extra],
        )

    def _condition_holds(self, node: Node) -> bool:
        if node.when is None:
            return True
        source = self.resolved.get(node.when.node)  # None: that step was skipped itself
        result = source.result if source is not None else None
        return bool(isinstance(result, Mapping) and result.get(node.when.output))

    # -------------------------------------------------------------- the whole DAG

    def run(self) -> list[StepResult]:
        """Every node in order; raises the first step's failure after recording it."""
        steps: list[StepResult] = []
        total = len(self.nodes)
        for index, node in enumerate(self.nodes, 1):
            label = f"[{index}/{total}] {node.name:<20}"
            if not self._condition_holds(node):
                self.metadata.record_execution(
                    pipeline_name=self.cfg.pipeline_name, run_id=self.run_id, node=node.name,
                    state=md.CANCELED, properties={"reason": f"{node.when.node}.{node.when.output} is false"},
                )
                steps.append(StepResult(node.name, "skipped", 0.0))
                self.progress(f"{label} skipped   ({node.when.node} {node.when.output} is false)")
                continue
            self.progress(f"{label} running")
            started = time.time()
            try:
                step = self.run_resolver(node) if node.is_resolver else self.run_step(node)
            except BaseException as exc:
                self.progress(f"{label} failed    {time.time() - started:7.1f}s  {type(exc).__name__}")
                raise
            steps.append(step)
            self.progress(f"{label} {step.state:<9} {step.seconds:7.1f}s{summarize(step.result)}")
        return steps


def summarize(result: Any) -> str:
    """A few words for the progress line (counts, blessing, version)."""
    if not isinstance(result, Mapping):
        return f"  {result}" if result else ""
    parts = []
    counts = result.get("counts") or result.get("num_examples")  # records per split (StatisticsGen: num_examples)
    if isinstance(counts, Mapping) and all(isinstance(v, int) for v in counts.values()):
        parts.append(f"{sum(counts.values())} records (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
    for key in ("blessed", "pushed", "version"):
        if key in result and result[key] is not None:
            parts.append(f"{key}={json.dumps(result[key], default=str, sort_keys=True)}")
    return ("  " + " ".join(parts)) if parts else ""


# ------------------------------------------------------------------ segpipe run


def data_source_given(cfg: SegpipeConfig) -> bool:
    """Did the user name any data (`--data`, `data.root` or `data.input_pattern` in any layer)?"""
    default = load_config().data
    return bool(cfg.data.root) or cfg.data.input_pattern != default.input_pattern


def ensure_demo_data(cfg: SegpipeConfig, *, asked: bool, num: int) -> str | None:
    """Generate the built-in demo dataset under `<root>/data`, but only when the user asked for it.

    Asked means `segpipe run --demo`, or a plain `segpipe run` that names no data at all on a root
    whose data folder holds no span yet. Whenever the user names data (a pattern or a data root),
    segpipe reads exactly that: a pattern that matches nothing fails (exit 2, naming the resolved
    path) instead of training on synthetic images.
    """
    if data_source_given(cfg):
        if asked:
            raise BadInputError("--demo trains on the built-in demo data under <root>/data; it cannot be combined "
                                f"with your data ({cfg.input_pattern}): drop --demo or the data settings")
        return None
    data_root = Path(cfg.data_root)
    if any(data_root.glob("span-*")):
        return None
    from segpipe.components.tools.demo_data import write_demo_data

    written = write_demo_data(data_root, num=num, span=1, progress=False)
    return written["path"]


def version_references(info: Mapping[str, Any]) -> list[str]:
    """Artifact URIs a pushed version's segpipe.json names: its source model, the statistics it is
    the drift baseline of, and the examples it was trained on."""
    run_info = info.get("run_info") or {}
    uris = (info.get("source_model"), run_info.get("statistics_uri"), run_info.get("examples_uri"))
    return [str(Path(uri).resolve()) for uri in uris if uri]


def reconcile_serving(cfg: SegpipeConfig, meta: md.Metadata) -> list[int]:
    """Record in ML Metadata every live version it does not know (a push killed after its rename).

    The version's segpipe.json is written inside it before the rename, so it always says which
    model it serves and which run pushed it; the recovered record is a `pusher_recovered` execution
    of that run from the source model to the version. Returns the versions recovered.
    """
    recovered = []
    for entry in list_versions(cfg.serving_dir):
        path = str(Path(entry["path"]).resolve())
        if meta.artifacts_by_uri([path]):
            continue
        info = entry["info"]
        source = info.get("source_model")
        inputs = [md.ArtifactRef("model_uri", str(Path(source).resolve()), artifacts.MODEL, {})] if source else []
        meta.record_execution(
            pipeline_name=cfg.pipeline_name, run_id=str(info.get("run_id") or "unknown-run"), node="pusher_recovered",
            state=md.COMPLETE, properties={"recovered": True, "version": entry["version"]}, inputs=inputs,
            outputs=[md.ArtifactRef("serving_version", path, SERVING_MODEL_TYPE, {"version": entry["version"]})],
        )
        recovered.append(entry["version"])
    if recovered:
        log.warning("recorded serving version(s) %s in ML Metadata: their push was interrupted after the "
                    "version went live", recovered)
    return recovered


def record_rollback(cfg: SegpipeConfig, result: Mapping[str, Any]) -> str:
    """Record `segpipe serving rollback` in ML Metadata: a run of one `rollback` execution from the
    source version to the new one, listed by `segpipe runs` and followed by `segpipe lineage`."""
    run_id = time.strftime("rollback-%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
    meta = md.Metadata.from_config(cfg)
    meta.start_run(cfg.pipeline_name, run_id, {"root": str(Path(cfg.root).resolve()), "command": "serving rollback"})
    source = str((Path(cfg.serving_dir) / str(result["rolled_back_from"])).resolve())
    meta.record_execution(
        pipeline_name=cfg.pipeline_name, run_id=run_id, node="rollback", state=md.COMPLETE,
        properties={key: result[key] for key in ("rolled_back_from", "withdrawn_versions", "withdrawn_models")},
        inputs=[md.ArtifactRef("source_version", source, SERVING_MODEL_TYPE, {"version": result["rolled_back_from"]})],
        outputs=[md.ArtifactRef("serving_version", str(Path(result["path"]).resolve()), SERVING_MODEL_TYPE,
                                {"version": result["version"]})],
    )
    meta.update_run(run_id, status="rolled_back", exit_code=EXIT_OK, version=result["version"],
                    serving_path=result["path"], finished=time.time(), duration=0.0,
                    message=f"version {result['version']} serves version {result['rolled_back_from']}'s model; "
                            f"withdrawn: {result['withdrawn_versions']}")
    return run_id


def absolute_root(cfg: SegpipeConfig) -> SegpipeConfig:
    """Pin the root to an absolute path so artifact URIs in ML Metadata stay valid from any cwd."""
    return with_overrides(cfg, {"root": str(Path(cfg.root).resolve())})


def run_pipeline(
    cfg: SegpipeConfig,
    *,
    nodes: list[Node] | None = None,
    no_cache: bool = False,
    run_id: str | None = None,
    progress: Callable[[str], None] = log.info,
) -> RunResult:
    """`segpipe run`: the whole DAG, recorded; returns the outcome (the CLI maps it to an exit code).

    Expected failures (bad data, anomalies, a failed step) are recorded on the run and re-raised.
    """
    cfg = absolute_root(cfg)
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    with artifacts.file_lock(root / ROOT_LOCK, exclusive=False):
        runner = LocalRunner(cfg, nodes=nodes, no_cache=no_cache, run_id=run_id, progress=progress)
        run = RunResult(runner.run_id, "running", EXIT_OK)
        log_path = console.move_log(root / console.LOGS_DIR / f"{run.run_id}.log")  # the command's log, renamed
        if log_path:
            progress(f"log: {log_path}")
        started = time.time()
        reconcile_serving(cfg, runner.metadata)
        runner.metadata.start_run(cfg.pipeline_name, run.run_id, {"root": str(root), "profile": cfg.profile,
                                                                  "config": cfg.as_dict()})
        try:
            if nodes is None:
                new, why = check_new_data(cfg)
                if not new:
                    run.status, run.message = "no_new_data", why
                    progress(why)
                    runner.metadata.update_run(run.run_id, status=run.status, message=why, exit_code=EXIT_OK,
                                               finished=time.time(), duration=time.time() - started)
                    return run
                progress(f"training: {why}")
            run.steps = runner.run()
        except BaseException as exc:
            if not isinstance(exc, SegpipeError) and is_disk_full(exc):
                exc = disk_full_error(exc, f"running {run.run_id}")
            if isinstance(exc, SegpipeError):
                exit_code = exc.exit_code
            else:
                exit_code = EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_FAILURE
            status = "bad_input" if isinstance(exc, BadInputError) else "failed"
            runner.metadata.update_run(run.run_id, status=status, message=f"{type(exc).__name__}: {exc}",
                                       exit_code=exit_code, finished=time.time(),
                                       duration=time.time() - started)
            if isinstance(exc, DiskFullError):
                raise exc from None
            raise
        finish_run(runner, run, started)
    return run


def finish_run(runner: LocalRunner, run: RunResult, started: float) -> None:
    """Blessing, metrics and push from the steps; the report; the run's final record."""
    results = {s.node: s.result for s in run.steps}
    evaluation = results.get("evaluator") or {}
    push = results.get("pusher") or {}
    run.blessed = evaluation.get("blessed") if isinstance(evaluation, Mapping) else None
    run.reasons = list(evaluation.get("reasons") or []) if isinstance(evaluation, Mapping) else []
    run.hints = list(evaluation.get("hints") or []) if isinstance(evaluation, Mapping) else []
    run.metrics = dict(evaluation.get("metrics") or {}) if isinstance(evaluation, Mapping) else {}
    infra = results.get("infra_validator")
    if isinstance(infra, Mapping) and not infra.get("blessed"):  # the gate passed; serving it did not
        run.blessed, run.reasons = False, [f"infra validation: {r}" for r in infra.get("reasons") or []]
    if isinstance(push, Mapping) and push.get("pushed"):
        run.status, run.exit_code = "pushed", EXIT_OK
        run.pushed_version, run.pushed_path = push.get("version"), push.get("path")
        run.message = f"pushed version {run.pushed_version} to {run.pushed_path}"
    elif isinstance(push, Mapping) and push.get("withdrawn"):
        run.status, run.exit_code = "withdrawn", NotBlessedError.exit_code
        run.message = f"not pushed: {push['withdrawn']}"
    elif "evaluator" in results:
        run.status, run.exit_code = "not_blessed", NotBlessedError.exit_code
        run.message = "not blessed: " + ("; ".join(run.reasons) or "the gate failed")
        # The blessing's hints, the same text the report shows, as the run's last step lines.
        if run.hints:
            runner.progress("what to try next:")
            for hint in run.hints:
                runner.progress(f"  - {hint}")
    else:
        run.status, run.exit_code, run.message = "done", EXIT_OK, "all steps finished"
    run.report_path = write_report(runner, run)
    runner.metadata.update_run(
        run.run_id, status=run.status, message=run.message, exit_code=run.exit_code, blessed=run.blessed,
        metrics=run.metrics, version=run.pushed_version, serving_path=run.pushed_path,
        report=run.report_path, finished=time.time(), duration=time.time() - started,
        steps={s.node: s.state for s in run.steps},
        spans=(results.get("example_gen") or {}).get("spans") if isinstance(results.get("example_gen"), Mapping) else None,
    )


def write_report(runner: LocalRunner, run: RunResult) -> str | None:
    """The HTML run report at `<root>/reports/<run id>.html` when the evaluator ran; never fails the run."""
    if "evaluator" not in runner.resolved:
        return None

    def uri(node: str, argument: str) -> str | None:
        found = runner.resolved.get(node)
        return found.uris.get(argument) if found else None

    states = {step.node: step.state for step in run.steps}
    try:
        from segpipe.components.tools import report

        links = [
            report.ArtifactLink(node, artifact_name(argument), found.types[argument], target, states.get(node, ""))
            for node, found in runner.resolved.items()
            for argument, target in found.uris.items() if target is not None
        ]
        path = report.write_run_report(
            Path(runner.cfg.root) / "reports" / f"{run.run_id}.html",
            evaluation_uri=uri("evaluator", "evaluation_uri"),
            blessing_uri=uri("evaluator", "blessing_uri"),
            infra_blessing_uri=uri("infra_validator", "infra_blessing_uri"),
            pushed_model_uri=uri("pusher", "pushed_model_uri"),
            statistics_uri=uri("statistics_gen", "statistics_uri"),
            anomalies_uri=uri("example_validator", "anomalies_uri"),
            model_run_uri=uri("trainer", "model_run_uri"),
            examples_uri=uri("example_gen", "examples_uri"),
            data_root=runner.cfg.data_root,
            run_id=run.run_id,
            message=run.message,
            artifact_links=links,
        )
        return str(path)
    except Exception:  # the report is a convenience; the run's outcome stands
        log.exception("writing the run report failed")
        return None


# ------------------------------------------------------------------ segpipe gc


@dataclass
class GcResult:
    freed_bytes: int
    removed: list[str]
    kept: int


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def collect_garbage(cfg: SegpipeConfig, keep: int) -> GcResult:
    """Remove artifacts that no pushed version and none of the last `keep` runs depend on.

    Holds the root lock exclusively, so it waits for running pipelines and none starts meanwhile.
    """
    cfg = absolute_root(cfg)
    root = Path(cfg.root)
    with artifacts.file_lock(root / ROOT_LOCK, exclusive=True):
        meta = md.Metadata.from_config(cfg)
        keep_ids: set[int] = set()
        runs = meta.list_runs()
        for run in runs[:keep]:
            keep_ids |= meta.run_artifact_ids(run["run_id"])
        reconcile_serving(cfg, meta)
        live = list_versions(cfg.serving_dir)
        versions = [str(Path(entry["path"]).resolve()) for entry in live]
        # What a live version's segpipe.json names stays even if ML Metadata lost the link.
        named = [uri for entry in live for uri in version_references(entry["info"])]
        keep_ids |= meta.upstream_ids([a.id for a in meta.artifacts_by_uri([*versions, *named])])
        keep_ids |= meta.upstream_ids(sorted(keep_ids))
        keep_ids = meta.with_sibling_outputs(keep_ids)
        artifacts_root = root / ARTIFACTS_DIR
        doomed = [a for a in meta.live_artifacts()
                  if a.id not in keep_ids and Path(a.uri).is_relative_to(artifacts_root)]
        freed, removed = 0, []
        for artifact in doomed:
            path = Path(artifact.uri)
            if path.exists():
                freed += dir_size(path)
                (path.parent / RESULT_FILE).unlink(missing_ok=True)  # the step is no longer cached
                shutil.rmtree(path)
                removed.append(str(path))
            if path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()
        meta.mark_deleted(doomed)
        # Half-written outputs of killed runs (publish's temporary folders); no run holds the lock now.
        for stale in [*artifacts_root.glob("*/*/.*.tmp-*"), *artifacts_root.glob("*/*/.*.old-*")]:
            freed += dir_size(stale)
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(str(stale))
        for log_file in collectable_logs(root / console.LOGS_DIR, runs, keep):
            freed += log_file.stat().st_size
            log_file.unlink()
            removed.append(str(log_file))
    return GcResult(freed, removed, len(keep_ids))


def collectable_logs(logs_dir: Path, runs: Sequence[Mapping[str, Any]], keep: int) -> list[Path]:
    """The log files gc removes: those of runs older than the last `keep`, and other commands' logs
    (`segpipe-<command>-...`) older than the oldest kept run, never the log this command writes."""
    if not logs_dir.is_dir():
        return []
    kept = runs[:keep]
    oldest_kept = min((float(run.get("started", 0.0)) for run in kept), default=float("inf"))
    current = console.active_log_path()
    doomed = [logs_dir / f"{run['run_id']}.log" for run in runs[keep:]]
    doomed += [path for path in logs_dir.glob("segpipe-*.log") if path.stat().st_mtime < oldest_kept]
    return sorted({path for path in doomed if path.is_file() and path != current})
