"""ML Metadata for segpipe runs: executions, artifacts, lineage events and a context per run.

One `Metadata` object wraps an `ml_metadata` store (SQLite under the pipeline root by default,
MySQL for a shared deployment). Every step records one execution with INPUT/OUTPUT events; an
artifact is keyed by its URI (its external id), so a cached step and a later run's inputs point at
the same artifact and lineage crosses runs. SQLite writes from concurrent runs are serialised
with a lock file beside the database.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from segpipe.components.core import artifacts
from segpipe.components.core.errors import EXIT_FAILURE, BadInputError
from segpipe.pipeline.config import SegpipeConfig

T = TypeVar("T")

log = logging.getLogger(__name__)

PIPELINE_CONTEXT = "segpipe.Pipeline"
RUN_CONTEXT = "segpipe.Run"
EXECUTION_PREFIX = "segpipe."

# Execution states as ML Metadata names them.
RUNNING, COMPLETE, FAILED, CACHED, CANCELED = "RUNNING", "COMPLETE", "FAILED", "CACHED", "CANCELED"
RUN_RUNNING, RUN_FAILED = "running", "failed"  # run statuses (the context's `status` property)


@dataclass(frozen=True)
class ArtifactRef:
    """An artifact as a step sees it: the event key (argument name), URI, type and properties."""

    key: str
    uri: str
    type: str
    properties: Mapping[str, Any]


def connection_config(cfg: SegpipeConfig) -> Any:
    """SQLite at cfg.sqlite_path, or MySQL when metadata.mysql_host is set (password from env)."""
    from ml_metadata.proto import metadata_store_pb2 as pb

    conn = pb.ConnectionConfig()
    meta = cfg.metadata
    if meta.mysql_host:
        password = os.environ.get(meta.mysql_password_env)
        if password is None:
            raise BadInputError(
                f"metadata.mysql_password_env: environment variable {meta.mysql_password_env} is not set"
            )
        conn.mysql.host = meta.mysql_host
        conn.mysql.port = meta.mysql_port
        conn.mysql.database = meta.mysql_database
        conn.mysql.user = meta.mysql_user
        conn.mysql.password = password
    else:
        Path(cfg.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
        conn.sqlite.filename_uri = str(cfg.sqlite_path)
        conn.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return conn


def _to_value(value: Any, target: Any) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, str):
        target.string_value = value
    else:
        target.string_value = json.dumps(value, sort_keys=True, default=str)


def _from_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _props(message: Any) -> dict[str, Any]:
    return {k: _from_value(v) for k, v in message.custom_properties.items()}


def _set_props(message: Any, properties: Mapping[str, Any]) -> None:
    for key, value in properties.items():
        if value is not None:
            _to_value(value, message.custom_properties[key])


_RETRY_OPEN = ("Please retry", "try restarting transaction")
OPEN_RETRIES = 10  # opening an empty MySQL store while another process creates its schema


class Metadata:
    """segpipe's view of an ML Metadata store."""

    def __init__(self, connection: Any, lock_path: str | None = None) -> None:
        from ml_metadata.metadata_store import metadata_store

        self._lock_path = lock_path
        self._connection = connection
        try:
            with self._locked():
                self.store = self._open(metadata_store, connection)
        except BadInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - ml_metadata raises RuntimeError or its own StatusErrors
            raise BadInputError(_open_error(connection, exc)) from None
        self._type_ids: dict[tuple[str, str], int] = {}

    @staticmethod
    def _open(metadata_store: Any, connection: Any) -> Any:
        """Open the store; two processes creating the schema of an empty MySQL database at once make
        ML Metadata see half of it ("a subset of tables ...", "MLMDEnv table exists but no
        schema_version ...", each ending "Please retry connection.") or deadlock in MySQL ("try
        restarting transaction"): retry, as each message says."""
        for attempt in range(OPEN_RETRIES):
            try:
                return metadata_store.MetadataStore(connection)
            except Exception as exc:  # noqa: BLE001 - ml_metadata raises its own StatusErrors
                if not any(sign in str(exc) for sign in _RETRY_OPEN) or attempt == OPEN_RETRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    @classmethod
    def from_config(cls, cfg: SegpipeConfig) -> Metadata:
        lock = None if cfg.metadata.mysql_host else f"{cfg.sqlite_path}.lock"
        return cls(connection_config(cfg), lock)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """SQLite has no busy timeout in ML Metadata: concurrent runs take turns via flock.

        Every store call runs inside; a damaged or full database file becomes one BadInputError
        naming it (any other store error is a segpipe bug and keeps its traceback).
        """
        try:
            if self._lock_path is None:
                yield
                return
            with artifacts.file_lock(self._lock_path):
                yield
        except Exception as exc:  # noqa: BLE001 - RuntimeError or an ml_metadata StatusError
            if not any(sign in str(exc) for sign in _DAMAGED_STORE):
                raise
            raise BadInputError(_open_error(self._connection, exc)) from None

    # -------------------------------------------------------------- types and contexts

    def _type_id(self, kind: str, name: str) -> int:
        from ml_metadata.proto import metadata_store_pb2 as pb

        key = (kind, name)
        if key not in self._type_ids:
            put = {"artifact": (pb.ArtifactType, self.store.put_artifact_type),
                   "execution": (pb.ExecutionType, self.store.put_execution_type),
                   "context": (pb.ContextType, self.store.put_context_type)}[kind]
            self._type_ids[key] = _another_process_may_create_it(lambda: put[1](put[0](name=name)))
        return self._type_ids[key]

    def _context(self, type_name: str, name: str, properties: Mapping[str, Any] | None = None) -> Any:
        return _another_process_may_create_it(lambda: self._put_context(type_name, name, properties or {}))

    def _put_context(self, type_name: str, name: str, properties: Mapping[str, Any]) -> Any:
        from ml_metadata.proto import metadata_store_pb2 as pb

        existing = self.store.get_context_by_type_and_name(type_name, name)
        context = existing or pb.Context(type_id=self._type_id("context", type_name), name=name)
        _set_props(context, properties)
        [context.id] = self.store.put_contexts([context])
        return context

    def start_run(self, pipeline_name: str, run_id: str, properties: Mapping[str, Any]) -> None:
        """Create the run's context (a child of the pipeline's) with status `running`.

        The run records the process running it (host, pid, the pid's start time), so a run whose
        process was killed without a word (SIGKILL, a lost machine) is recognised later (`list_runs`).
        """
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_start_time(os.getpid())}
        with self._locked():
            pipeline = self._context(PIPELINE_CONTEXT, pipeline_name)
            run = self._context(RUN_CONTEXT, run_id, {"pipeline": pipeline_name, "status": RUN_RUNNING,
                                                       "started": time.time(), **owner, **properties})
            self.store.put_parent_contexts([_parent(pipeline.id, run.id)])

    def update_run(self, run_id: str, **properties: Any) -> None:
        with self._locked():
            self._context(RUN_CONTEXT, run_id, properties)

    # -------------------------------------------------------------- executions

    def record_execution(
        self,
        *,
        pipeline_name: str,
        run_id: str,
        node: str,
        state: str,
        properties: Mapping[str, Any],
        inputs: Sequence[ArtifactRef] = (),
        outputs: Sequence[ArtifactRef] = (),
    ) -> int:
        """One step's execution with its input/output events; returns the execution id."""
        from ml_metadata.proto import metadata_store_pb2 as pb

        with self._locked():
            execution = pb.Execution(
                type_id=self._type_id("execution", EXECUTION_PREFIX + node),
                last_known_state=pb.Execution.State.Value(state),
                name=f"{run_id}/{node}",
            )
            _set_props(execution, {"node": node, "run_id": run_id, **properties})
            pairs, seen = [], set()
            for refs, event_type in ((inputs, pb.Event.INPUT), (outputs, pb.Event.OUTPUT)):
                for ref in refs:
                    # ML Metadata keeps one event per (artifact, execution, type): an artifact fed to
                    # two arguments (statistics that are also the drift baseline) is recorded once.
                    if (ref.uri, event_type) in seen:
                        continue
                    seen.add((ref.uri, event_type))
                    pairs.append((self._artifact(ref), _event(event_type, ref.key)))
            contexts = [self._context(PIPELINE_CONTEXT, pipeline_name), self._context(RUN_CONTEXT, run_id)]
            execution_id, _, _ = self.store.put_execution(
                execution, pairs, contexts, reuse_context_if_already_exist=True,
                reuse_artifact_if_already_exist_by_external_id=True,
            )
        return execution_id

    def _by_external_ids(self, external_ids: list[str]) -> list[Any]:
        """ML Metadata raises NotFoundError for "none of these"; an empty list reads better."""
        from ml_metadata import errors

        try:
            return self.store.get_artifacts_by_external_ids(external_ids)
        except errors.NotFoundError:
            return []

    def _artifact(self, ref: ArtifactRef) -> Any:
        from ml_metadata.proto import metadata_store_pb2 as pb

        existing = self._by_external_ids([ref.uri])
        if existing:
            return existing[0]
        artifact = pb.Artifact(
            type_id=self._type_id("artifact", ref.type), uri=ref.uri, external_id=ref.uri,
            state=pb.Artifact.LIVE,
        )
        _set_props(artifact, ref.properties)
        return artifact

    # -------------------------------------------------------------- queries

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, newest first, with its properties (status, metrics, blessing, version).

        A run still `running` whose process on this host is gone is marked `failed` first: it was
        killed before it could record an outcome. Runs of other hosts (a shared MySQL store) are
        left as they are; only their own host can tell.
        """
        with self._locked():
            contexts = self.store.get_contexts_by_type(RUN_CONTEXT)
            runs = [{"run_id": c.name, "context_id": c.id, **_props(c)} for c in contexts]
            for run in runs:
                if run.get("status") == RUN_RUNNING and run_process_gone(run):
                    lost = {"status": RUN_FAILED, "exit_code": EXIT_FAILURE,
                            "message": f"process {run['pid']} on {run['host']} ended without recording an outcome "
                                       "(killed?)"}
                    self._context(RUN_CONTEXT, run["run_id"], lost)
                    run.update(lost)
        return sorted(runs, key=lambda r: r.get("started", 0.0), reverse=True)

    def run_executions(self, run_id: str) -> list[dict[str, Any]]:
        """A run's executions in recorded order, with their input and output artifacts."""
        from ml_metadata.proto import metadata_store_pb2 as pb

        with self._locked():
            context = self.store.get_context_by_type_and_name(RUN_CONTEXT, run_id)
            if context is None:
                return []
            executions = self.store.get_executions_by_context(context.id)
            events = self.store.get_events_by_execution_ids([e.id for e in executions])
            artifact_ids = sorted({ev.artifact_id for ev in events})
            by_id = {a.id: a for a in self.store.get_artifacts_by_id(artifact_ids)}
        out = []
        for execution in sorted(executions, key=lambda e: e.id):
            mine = [ev for ev in events if ev.execution_id == execution.id]
            out.append({
                "id": execution.id,
                "state": pb.Execution.State.Name(execution.last_known_state),
                **_props(execution),
                "inputs": {_event_key(ev): by_id[ev.artifact_id].uri for ev in mine if ev.type == pb.Event.INPUT},
                "outputs": {_event_key(ev): by_id[ev.artifact_id].uri for ev in mine if ev.type == pb.Event.OUTPUT},
            })
        return out

    def find_artifact(self, ref: str) -> Any | None:
        """An artifact by id, by exact URI, or by a path inside an artifact."""
        with self._locked():
            if ref.isdigit():
                found = self.store.get_artifacts_by_id([int(ref)])
                return found[0] if found else None
            path = Path(ref).resolve()
            for candidate in (path, *path.parents):
                found = self._by_external_ids([str(candidate)])
                if found:
                    return found[0]
        return None

    def lineage(self, artifact_id: int) -> list[dict[str, Any]]:
        """Upstream lineage as a depth-first tree: each artifact with the execution that produced it.

        An artifact reached twice is listed once (`repeat` is True on the later mentions, which
        are not expanded again).
        """
        from ml_metadata.proto import metadata_store_pb2 as pb

        rows: list[dict[str, Any]] = []
        seen: set[int] = set()
        stack: list[tuple[int, int]] = [(artifact_id, 0)]
        with self._locked():
            types = {t.id: t.name for t in self.store.get_artifact_types()}
            while stack:
                current, depth = stack.pop()
                [artifact] = self.store.get_artifacts_by_id([current])
                row = {"depth": depth, "artifact_id": current, "type": types.get(artifact.type_id, "?"),
                       "uri": artifact.uri, "state": pb.Artifact.State.Name(artifact.state), "producer": None,
                       "repeat": current in seen}
                rows.append(row)
                if row["repeat"]:
                    continue
                seen.add(current)
                producers = [ev for ev in self.store.get_events_by_artifact_ids([current])
                             if ev.type == pb.Event.OUTPUT]
                if not producers:
                    continue
                # The first execution that wrote it (later ones are cache hits of the same step).
                [execution] = self.store.get_executions_by_id([min(ev.execution_id for ev in producers)])
                props = _props(execution)
                row["producer"] = {"execution_id": execution.id, "node": props.get("node"),
                                   "run_id": props.get("run_id"), "parameters": props.get("parameters"),
                                   "result": props.get("result")}
                inputs = [ev for ev in self.store.get_events_by_execution_ids([execution.id])
                          if ev.type == pb.Event.INPUT]
                for ev in sorted(inputs, key=lambda e: _event_key(e), reverse=True):
                    stack.append((ev.artifact_id, depth + 1))
        return rows

    def upstream_ids(self, artifact_ids: Sequence[int]) -> set[int]:
        """The artifacts and everything they were derived from (for gc)."""
        keep: set[int] = set()
        for artifact_id in artifact_ids:
            keep.update(row["artifact_id"] for row in self.lineage(artifact_id))
        return keep

    def with_sibling_outputs(self, artifact_ids: set[int]) -> set[int]:
        """The artifacts plus every other output of the executions that wrote them.

        gc keeps a step's outputs together: removing half of them would leave the step neither
        cached nor cleanly gone.
        """
        from ml_metadata.proto import metadata_store_pb2 as pb

        if not artifact_ids:
            return set()
        with self._locked():
            events = self.store.get_events_by_artifact_ids(sorted(artifact_ids))
            producers = sorted({ev.execution_id for ev in events if ev.type == pb.Event.OUTPUT})
            outputs = self.store.get_events_by_execution_ids(producers) if producers else []
        return set(artifact_ids) | {ev.artifact_id for ev in outputs if ev.type == pb.Event.OUTPUT}

    def run_artifact_ids(self, run_id: str) -> set[int]:
        """Every artifact a run's executions read or wrote."""
        with self._locked():
            context = self.store.get_context_by_type_and_name(RUN_CONTEXT, run_id)
            if context is None:
                return set()
            executions = self.store.get_executions_by_context(context.id)
            events = self.store.get_events_by_execution_ids([e.id for e in executions])
        return {ev.artifact_id for ev in events}

    def live_artifacts(self) -> list[Any]:
        from ml_metadata.proto import metadata_store_pb2 as pb

        with self._locked():
            return [a for a in self.store.get_artifacts() if a.state == pb.Artifact.LIVE]

    def artifacts_by_uri(self, uris: Sequence[str]) -> list[Any]:
        with self._locked():
            return self._by_external_ids(list(uris)) if uris else []

    def mark_deleted(self, artifacts: Sequence[Any]) -> None:
        from ml_metadata.proto import metadata_store_pb2 as pb

        with self._locked():
            for artifact in artifacts:
                artifact.state = pb.Artifact.DELETED
            if artifacts:
                self.store.put_artifacts(list(artifacts))


# SQLite's words for a file it cannot use, whatever query hit it first.
def _another_process_may_create_it(get_or_create: Callable[[], T]) -> T:
    """Run a get-or-create once more if another run sharing a MySQL store created the same type or
    context (the pipeline's, say) between our get and our put: the second time, the get finds it."""
    from ml_metadata import errors

    try:
        return get_or_create()
    except errors.AlreadyExistsError:
        return get_or_create()


_DAMAGED_STORE = ("file is not a database", "database disk image is malformed", "disk I/O error",
                  "database or disk is full", "unable to open database file")


def _open_error(connection: Any, exc: BaseException) -> str:
    """One line naming the store that cannot be used and what to do about it."""
    # MLMD's message is "Error when executing query: <SQLite's error> query: <the whole SQL>".
    found = re.search(r"query:\s*(.*?)\s+query:", str(exc), re.S)
    reason = found.group(1) if found else (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    if connection.HasField("sqlite"):
        path = connection.sqlite.filename_uri
        if "disk is full" in reason:
            return f"{path}: no space left to write the ML Metadata store ({reason})"
        return (f"{path}: not a usable ML Metadata SQLite database ({reason}); move the file aside to start "
                "a new store (the run history in it is lost), or set metadata.sqlite_path")
    return f"ML Metadata MySQL store {connection.mysql.host}:{connection.mysql.port} cannot be opened ({reason})"


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown.

    With the pid it identifies one process: a pid reused by a later process has another start time.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie has already ended


def run_process_gone(run: Mapping[str, Any]) -> bool:
    """True when the run's recorded process (on this host) no longer runs."""
    pid, host = run.get("pid"), run.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False  # recorded by an older segpipe, or on another machine
    started = run.get("pid_started")
    if isinstance(started, int) and Path("/proc/self/stat").is_file():
        return process_start_time(pid) != started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _event(event_type: int, key: str) -> Any:
    from ml_metadata.proto import metadata_store_pb2 as pb

    event = pb.Event(type=event_type)
    event.path.steps.add().key = key
    return event


def _event_key(event: Any) -> str:
    return event.path.steps[0].key if event.path.steps else ""


def _parent(parent_id: int, child_id: int) -> Any:
    from ml_metadata.proto import metadata_store_pb2 as pb

    return pb.ParentContext(parent_id=parent_id, child_id=child_id)
