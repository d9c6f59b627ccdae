"""ML Metadata records: runs as contexts, executions with events, lineage across runs, gc marks."""
from __future__ import annotations

import logging

import pytest

from segpipe.components.core.errors import BadInputError
from segpipe.pipeline import metadata as md
from segpipe.pipeline.config import load_config


@pytest.fixture
def meta(tmp_path):
    return md.Metadata.from_config(load_config(overrides={"root": str(tmp_path)}))


def _ref(key: str, uri: str, kind: str = "Examples") -> md.ArtifactRef:
    return md.ArtifactRef(key, uri, kind, {"fingerprint": f"fp-{key}"})


def test_runs_are_contexts_with_status_and_properties(meta):
    meta.start_run("segpipe", "run-a", {"profile": "demo"})
    meta.update_run("run-a", status="pushed", blessed=True, metrics={"pixel_accuracy": 0.93}, version=4)
    meta.start_run("segpipe", "run-b", {"profile": "demo"})
    runs = meta.list_runs()
    assert [r["run_id"] for r in runs] == ["run-b", "run-a"]  # newest first
    a = runs[1]
    assert (a["status"], a["blessed"], a["version"]) == ("pushed", True, 4)
    assert '"pixel_accuracy": 0.93' in a["metrics"]
    assert runs[0]["status"] == "running"


def test_lineage_crosses_runs_through_shared_uris(meta, tmp_path):
    examples, model, served = (str(tmp_path / n) for n in ("ex", "model", "serving/1"))
    meta.start_run("segpipe", "r1", {})
    meta.record_execution(pipeline_name="segpipe", run_id="r1", node="example_gen", state=md.COMPLETE,
                          properties={"parameters": {"input_pattern": "span-{SPAN}/*"}}, outputs=[_ref("examples_uri", examples)])
    meta.record_execution(pipeline_name="segpipe", run_id="r1", node="trainer", state=md.COMPLETE, properties={},
                          inputs=[_ref("examples_uri", examples)], outputs=[_ref("model_uri", model, "Model")])
    meta.record_execution(pipeline_name="segpipe", run_id="r1", node="pusher", state=md.COMPLETE, properties={},
                          inputs=[_ref("model_uri", model, "Model")], outputs=[_ref("serving_version", served, "ServingModel")])
    meta.start_run("segpipe", "r2", {})
    # The second run's cached ExampleGen and its warm start point at the SAME artifacts.
    meta.record_execution(pipeline_name="segpipe", run_id="r2", node="example_gen", state=md.CACHED,
                          properties={}, outputs=[_ref("examples_uri", examples)])
    meta.record_execution(pipeline_name="segpipe", run_id="r2", node="trainer", state=md.COMPLETE, properties={},
                          inputs=[_ref("examples_uri", examples), _ref("base_model_uri", served, "Model")],
                          outputs=[_ref("model_uri", str(tmp_path / "model2"), "Model")])

    found = meta.find_artifact(str(tmp_path / "model2" / "serving_model" / "saved_model.pb"))
    assert found is not None and found.uri == str(tmp_path / "model2")
    rows = meta.lineage(found.id)
    uris = [r["uri"] for r in rows]
    assert uris[0] == str(tmp_path / "model2")
    assert set(uris) == {str(tmp_path / "model2"), examples, served, model}
    by_uri = {r["uri"]: r for r in rows if not r["repeat"]}
    assert len(by_uri) == 4 and [r["uri"] for r in rows if r["repeat"]] == [examples]  # listed once, then referenced
    assert by_uri[served]["type"] == "ServingModel" and by_uri[served]["producer"]["run_id"] == "r1"
    assert by_uri[examples]["producer"]["node"] == "example_gen"
    assert "span-{SPAN}" in by_uri[examples]["producer"]["parameters"]
    assert len(meta.live_artifacts()) == 4  # the cached ExampleGen did not duplicate its output

    executions = meta.run_executions("r2")
    assert [(e["node"], e["state"]) for e in executions] == [("example_gen", "CACHED"), ("trainer", "COMPLETE")]
    assert executions[1]["inputs"] == {"examples_uri": examples, "base_model_uri": served}
    assert meta.run_artifact_ids("r1") >= {a.id for a in meta.artifacts_by_uri([examples, model, served])}


def test_mark_deleted_removes_from_live(meta, tmp_path):
    meta.start_run("segpipe", "r1", {})
    meta.record_execution(pipeline_name="segpipe", run_id="r1", node="example_gen", state=md.COMPLETE,
                          properties={}, outputs=[_ref("examples_uri", str(tmp_path / "ex"))])
    [artifact] = meta.live_artifacts()
    meta.mark_deleted([artifact])
    assert meta.live_artifacts() == []
    assert meta.lineage(artifact.id)[0]["state"] == "DELETED"


def test_mysql_connection_reads_password_from_env_and_never_logs_it(monkeypatch, caplog):
    cfg = load_config(overrides={"metadata.mysql_host": "db.internal", "metadata.mysql_password_env": "MLMD_PW"})
    monkeypatch.delenv("MLMD_PW", raising=False)
    with pytest.raises(BadInputError, match="MLMD_PW is not set"):
        md.connection_config(cfg)
    monkeypatch.setenv("MLMD_PW", "s3cret-value")
    with caplog.at_level(logging.DEBUG):
        conn = md.connection_config(cfg)
    assert (conn.mysql.host, conn.mysql.port, conn.mysql.user, conn.mysql.database) == ("db.internal", 3306, "mlmd", "mlmd")
    assert conn.mysql.password == "s3cret-value"
    assert "s3cret-value" not in caplog.text
    assert not conn.HasField("sqlite")


def test_gc_keeps_the_outputs_of_one_execution_together(meta, tmp_path):
    meta.start_run("segpipe", "r1", {})
    meta.record_execution(pipeline_name="segpipe", run_id="r1", node="trainer", state=md.COMPLETE, properties={},
                          outputs=[_ref("model_uri", str(tmp_path / "model"), "Model"),
                                   _ref("model_run_uri", str(tmp_path / "model_run"), "ModelRun")])
    meta.record_execution(pipeline_name="segpipe", run_id="r1", node="other", state=md.COMPLETE, properties={},
                          outputs=[_ref("x_uri", str(tmp_path / "x"), "X")])
    [model] = meta.artifacts_by_uri([str(tmp_path / "model")])
    [model_run] = meta.artifacts_by_uri([str(tmp_path / "model_run")])
    assert meta.with_sibling_outputs({model.id}) == {model.id, model_run.id}
    assert meta.with_sibling_outputs(set()) == set()


@pytest.mark.parametrize("half_made", [
    "MySQL database was not initialized. Please ensure your MySQL server is running. "
    "Also, this error might be caused by starting from MySQL 8.0.4 ... a subset of tables exists. Please retry connection.",
    "In the given db, MLMDEnv table exists but no schema_version can be found. This may be due to "
    "concurrent connection to the empty database. Please retry connection.",
    "mysql_query aborted: errno: Deadlock found when trying to get lock; try restarting transaction",
])
def test_opening_a_store_another_process_is_creating_retries(monkeypatch, half_made):
    """Two runs creating an empty MySQL store's schema at once: ML Metadata asks to retry, so we do."""
    monkeypatch.setattr(md.time, "sleep", lambda _s: None)
    calls = []

    class FlakyStore:
        def __init__(self, _connection):
            calls.append(1)
            if len(calls) < 3:
                raise RuntimeError(half_made)

    fake_module = type("M", (), {"MetadataStore": FlakyStore})
    assert isinstance(md.Metadata._open(fake_module, object()), FlakyStore)
    assert len(calls) == 3


def test_a_store_error_that_asks_for_no_retry_is_raised_at_once(monkeypatch):
    calls = []

    class BrokenStore:
        def __init__(self, _connection):
            calls.append(1)
            raise RuntimeError("Access denied for user 'mlmd'")

    with pytest.raises(RuntimeError, match="Access denied"):
        md.Metadata._open(type("M", (), {"MetadataStore": BrokenStore}), object())
    assert calls == [1]


def test_a_context_another_run_creates_between_our_get_and_put_is_reused(tmp_path):
    """Two runs on one MySQL store both create the pipeline's context: the loser reuses the winner's."""
    connection = md.connection_config(load_config(overrides={"root": str(tmp_path)}))
    first, second = md.Metadata(connection), md.Metadata(connection)  # no flock: as on MySQL
    real_get = second.store.get_context_by_type_and_name
    raced = []

    def get_then_lose_the_race(type_name, name):
        found = real_get(type_name, name)
        if not raced:  # the other run creates it right after our get saw nothing
            raced.append(1)
            first.start_run("shared", "run-a", {})
        return found

    second.store.get_context_by_type_and_name = get_then_lose_the_race
    second.start_run("shared", "run-b", {})
    assert raced and sorted(run["run_id"] for run in first.list_runs()) == ["run-a", "run-b"]
    assert len(first.store.get_contexts_by_type(md.PIPELINE_CONTEXT)) == 1
