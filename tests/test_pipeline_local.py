"""The local runner: caching, resume, locking, ML Metadata records, gc; then the real DAG end to end.

The machinery tests use small fake nodes (the runner takes any node list); the end-to-end tests
run `create_pipeline(cfg)` with the real components on ~32 tiny images.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError, DataAnomalyError
from segpipe.pipeline import metadata as md
from segpipe.pipeline.config import load_config
from segpipe.pipeline.local_runner import collect_garbage, run_pipeline
from segpipe.pipeline.pipeline import Node, Ref, check_order


# ------------------------------------------------------------------ fake components


class Calls:
    """Counts executions per node, and can make one node fail once."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.fail_once: set[str] = set()
        self.delay = 0.0

    def hit(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        if name in self.fail_once:
            self.fail_once.discard(name)
            raise BadInputError(f"{name}: injected failure")
        time.sleep(self.delay)


def fake_nodes(calls: Calls) -> list[Node]:
    def make(numbers_uri: str, *, count: int) -> dict:
        calls.hit("make")
        with artifacts.publish(numbers_uri, "Numbers", producer="make") as (tmp, info):
            (tmp / "n.json").write_text(json.dumps(list(range(count))))
            info["counts"]["n"] = count
        return {"counts": {"n": count}}

    def double(numbers_uri: str, doubled_uri: str, *, factor: int) -> dict:
        calls.hit("double")
        values = json.loads((Path(numbers_uri) / "n.json").read_text())
        with artifacts.publish(doubled_uri, "Numbers", producer="double", inputs=(numbers_uri,)) as (tmp, _):
            (tmp / "n.json").write_text(json.dumps([v * factor for v in values]))
        return {"sum": sum(values) * factor, "blessed": sum(values) > 0}

    def ship(doubled_uri: str, shipped_uri: str) -> dict:
        calls.hit("ship")
        with artifacts.publish(shipped_uri, "Shipped", producer="ship", inputs=(doubled_uri,)) as (tmp, _):
            (tmp / "ok").write_text("1")
        return {"pushed": False}

    def find_previous(where: str) -> str | None:
        calls.hit("find_previous")
        return where or None

    return [
        Node("make", make, lambda cfg: {"count": cfg.train.epochs}, outputs={"numbers_uri": "Numbers"}),
        Node("previous", find_previous, lambda cfg: {"where": ""}, value_type="Numbers"),
        Node("double", double, lambda cfg: {"factor": cfg.train.batch_size},
             inputs={"numbers_uri": Ref("make", "numbers_uri")}, outputs={"doubled_uri": "Numbers"}),
        Node("ship", ship, lambda cfg: {}, inputs={"doubled_uri": Ref("double", "doubled_uri")},
             outputs={"shipped_uri": "Shipped"}, when=Ref("double", "blessed")),
    ]


def tiny_cfg(root: Path, **overrides):
    return load_config(overrides={"root": str(root), "train.epochs": 3, "train.batch_size": 2, **overrides})


def states(result) -> dict[str, str]:
    return {s.node: s.state for s in result.steps}


# ------------------------------------------------------------------ runner machinery


def test_second_run_is_cached_and_recorded(tmp_path):
    calls = Calls()
    cfg = tiny_cfg(tmp_path)
    first = run_pipeline(cfg, nodes=fake_nodes(calls))
    assert states(first) == {"make": "done", "previous": "done", "double": "done", "ship": "done"}
    second = run_pipeline(cfg, nodes=fake_nodes(calls))
    assert states(second) == {"make": "cached", "previous": "done", "double": "cached", "ship": "cached"}
    assert calls.counts == {"make": 1, "double": 1, "ship": 1, "find_previous": 2}
    assert second.steps[2].outputs == first.steps[2].outputs
    assert second.steps[2].result == {"sum": 6, "blessed": True}  # the cached result, read back

    meta = md.Metadata.from_config(cfg)
    runs = meta.list_runs()
    assert [r["run_id"] for r in runs] == [second.run_id, first.run_id]
    assert all(r["status"] == "done" for r in runs)
    executions = meta.run_executions(second.run_id)
    assert [(e["node"], e["state"]) for e in executions] == [
        ("make", "CACHED"), ("previous", "COMPLETE"), ("double", "CACHED"), ("ship", "CACHED")]
    assert executions[2]["inputs"]["numbers_uri"] == first.steps[0].outputs["numbers_uri"]


def test_changed_parameter_misses_only_downstream(tmp_path):
    calls = Calls()
    run_pipeline(tiny_cfg(tmp_path), nodes=fake_nodes(calls))
    result = run_pipeline(tiny_cfg(tmp_path, **{"train.batch_size": 5}), nodes=fake_nodes(calls))
    assert states(result)["make"] == "cached"
    assert states(result)["double"] == "done" and result.steps[2].result["sum"] == 15
    assert calls.counts["double"] == 2 and calls.counts["ship"] == 2


def test_no_cache_reruns_everything_into_new_folders(tmp_path):
    calls = Calls()
    first = run_pipeline(tiny_cfg(tmp_path), nodes=fake_nodes(calls))
    again = run_pipeline(tiny_cfg(tmp_path), nodes=fake_nodes(calls), no_cache=True)
    assert set(states(again).values()) == {"done"}
    assert again.steps[0].outputs != first.steps[0].outputs
    assert artifacts.is_published(first.steps[0].outputs["numbers_uri"])  # the old run's artifacts stay


def test_failed_run_is_recorded_and_resumes_at_the_failed_step(tmp_path):
    calls = Calls()
    calls.fail_once.add("double")
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(BadInputError, match="injected"):
        run_pipeline(cfg, nodes=fake_nodes(calls))
    meta = md.Metadata.from_config(cfg)
    [failed_run] = meta.list_runs()
    assert failed_run["status"] == "bad_input" and failed_run["exit_code"] == 2
    failed = [e for e in meta.run_executions(failed_run["run_id"]) if e["node"] == "double"][0]
    assert failed["state"] == "FAILED" and "injected failure" in failed["error"]

    resumed = run_pipeline(cfg, nodes=fake_nodes(calls))
    assert states(resumed)["make"] == "cached" and states(resumed)["double"] == "done"
    assert calls.counts == {"make": 1, "double": 2, "ship": 1, "find_previous": 2}


def test_data_anomaly_keeps_the_anomalies_artifact_and_exits_2(tmp_path):
    def gate(anomalies_uri: str) -> dict:
        with artifacts.publish(anomalies_uri, artifacts.ANOMALIES, producer="gate") as (tmp, _):
            (tmp / artifacts.ANOMALIES_FILE).write_text("drift in mask")
        raise DataAnomalyError(f"{anomalies_uri}: 1 anomaly (drift in mask)")

    cfg = tiny_cfg(tmp_path)
    nodes = [Node("gate", gate, lambda cfg: {}, outputs={"anomalies_uri": artifacts.ANOMALIES})]
    with pytest.raises(DataAnomalyError) as raised:
        run_pipeline(cfg, nodes=nodes)
    assert raised.value.exit_code == 2
    meta = md.Metadata.from_config(cfg)
    [run] = meta.list_runs()
    assert run["status"] == "bad_input" and "drift in mask" in run["message"]
    [execution] = meta.run_executions(run["run_id"])
    assert execution["state"] == "FAILED"
    assert Path(execution["outputs"]["anomalies_uri"], artifacts.ANOMALIES_FILE).read_text() == "drift in mask"


def test_condition_false_skips_the_step(tmp_path):
    calls = Calls()
    result = run_pipeline(tiny_cfg(tmp_path, **{"train.epochs": 1}), nodes=fake_nodes(calls))  # sum([0]) == 0
    assert states(result)["ship"] == "skipped" and "ship" not in calls.counts
    executions = md.Metadata.from_config(tiny_cfg(tmp_path)).run_executions(result.run_id)
    assert executions[-1]["node"] == "ship" and executions[-1]["state"] == "CANCELED"


def test_two_concurrent_runs_share_one_execution_per_step(tmp_path):
    calls = Calls()
    calls.delay = 0.4
    cfg = tiny_cfg(tmp_path)
    results, errors = [], []

    def go():
        try:
            results.append(run_pipeline(cfg, nodes=fake_nodes(calls)))
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 2
    assert calls.counts["make"] == 1 and calls.counts["double"] == 1 and calls.counts["ship"] == 1
    assert sorted(states(r)["double"] for r in results) == ["cached", "done"]
    assert len(md.Metadata.from_config(cfg).list_runs()) == 2


def test_gc_keeps_recent_runs_and_frees_old_artifacts(tmp_path):
    calls = Calls()
    old = run_pipeline(tiny_cfg(tmp_path, **{"train.epochs": 4}), nodes=fake_nodes(calls))
    new = run_pipeline(tiny_cfg(tmp_path), nodes=fake_nodes(calls))
    killed = Path(new.steps[0].outputs["numbers_uri"]).parent / ".numbers.tmp-0badc0de"  # a killed write
    killed.mkdir()
    (killed / "n.json").write_text("[1, 2")
    result = collect_garbage(tiny_cfg(tmp_path), keep=1)
    assert result.freed_bytes > 0
    assert set(result.removed) == {old.steps[0].outputs["numbers_uri"], old.steps[2].outputs["doubled_uri"],
                                   old.steps[3].outputs["shipped_uri"], str(killed)}
    for step in new.steps:
        assert all(artifacts.is_published(uri) for uri in step.outputs.values())
    assert not Path(old.steps[0].outputs["numbers_uri"]).parent.exists()
    # The kept run is still cached; the collected one reruns.
    kept = states(run_pipeline(tiny_cfg(tmp_path), nodes=fake_nodes(calls)))
    assert (kept["make"], kept["double"], kept["ship"]) == ("cached", "cached", "cached")
    assert states(run_pipeline(tiny_cfg(tmp_path, **{"train.epochs": 4}), nodes=fake_nodes(calls)))["make"] == "done"


def test_gc_and_runs_commands(tmp_path, capsys):
    from segpipe.pipeline.cli import main

    calls = Calls()
    run_pipeline(tiny_cfg(tmp_path, **{"train.epochs": 4}), nodes=fake_nodes(calls))
    run_pipeline(tiny_cfg(tmp_path), nodes=fake_nodes(calls))
    assert main(["gc", "--keep", "1", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("removed ") == 3 and "in 3 artifact(s)" in out
    freed = int(out.split("freed ", 1)[1].split()[0])
    assert freed > 0
    assert main(["gc", "--keep", "1", "--root", str(tmp_path)]) == 0
    assert "freed 0 bytes" in capsys.readouterr().out  # nothing left to collect

    assert main(["runs", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count(" done ") == 2

    empty = tmp_path / "empty"
    assert main(["runs", "--root", str(empty)]) == 2
    assert "no ML Metadata store" in capsys.readouterr().err
    assert not empty.exists()  # a read command creates nothing


def test_gc_removes_the_logs_of_collected_runs_and_old_command_logs(tmp_path):
    calls = Calls()
    old = run_pipeline(tiny_cfg(tmp_path, **{"train.epochs": 4}), nodes=fake_nodes(calls))
    new = run_pipeline(tiny_cfg(tmp_path), nodes=fake_nodes(calls))
    logs = tmp_path / "logs"
    logs.mkdir()
    old_log, new_log = logs / f"{old.run_id}.log", logs / f"{new.run_id}.log"
    stale_command, fresh_command, users_file = (logs / "segpipe-runs-1-1.log", logs / "segpipe-runs-2-2.log",
                                                logs / "notes.txt")
    for path in (old_log, new_log, stale_command, fresh_command, users_file):
        path.write_text("x\n")
    os.utime(stale_command, (1.0, 1.0))  # written long before the kept run started
    result = collect_garbage(tiny_cfg(tmp_path), keep=1)
    assert {str(old_log), str(stale_command)} <= set(result.removed)
    assert not old_log.exists() and not stale_command.exists()
    assert new_log.exists() and fresh_command.exists() and users_file.exists()


def test_check_order_rejects_forward_references():
    calls = Calls()
    nodes = fake_nodes(calls)
    with pytest.raises(ValueError, match="double: input from 'make', which is not an earlier node"):
        check_order([nodes[2], nodes[0]])
    with pytest.raises(ValueError, match="has no output 'nope'"):
        check_order([nodes[0], Node("x", print, lambda cfg: {}, inputs={"a": Ref("make", "nope")})])


# ------------------------------------------------------------------ the real DAG, end to end


def _cli_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        if key == "root":
            args += ["--root", str(value)]
        else:
            args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


@pytest.mark.slow
def test_segpipe_run_end_to_end_gates_then_pushes_from_cache(tmp_path, write_tiny_span, tiny_pipeline_overrides, capsys):
    from segpipe.pipeline.cli import main

    root = tmp_path / "root"
    write_tiny_span(root / "data", 1, num=32, size=(32, 32))
    args = _cli_args(tiny_pipeline_overrides(root))

    # An impossible gate: the model is trained, evaluated and rejected (exit 3, nothing pushed).
    assert main(["run", *args, "--threshold", "1.0", "--set", "evaluation.min_foreground_iou=1.0"]) == 3
    captured = capsys.readouterr()
    assert re.search(r"\[1/\d+\] example_gen +done", captured.out)
    assert f"{'pusher':<20} skipped" in captured.out
    assert "not blessed" in captured.err
    # The blessing's hints, class names from the data's labels.json, end the run's step lines.
    assert "what to try next:\n" in captured.out and "  - weakest class: class 1 'class1' has IoU" in captured.out
    assert not (root / "serving").exists() or not any((root / "serving").iterdir())

    # The default gate: every step up to the trainer comes from the cache; only the gate reruns.
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    for node in ("example_gen", "statistics_gen", "schema_gen", "example_validator", "transform", "trainer"):
        assert f"{node:<20} cached" in out, node
    assert f"{'evaluator':<20} done" in out and f"{'pusher':<20} done" in out
    assert f"pushed model: {root / 'serving' / '1'}" in out
    report = [line.split("report: ", 1)[1] for line in out.splitlines() if line.startswith("report: ")]
    assert report and Path(report[0]).is_file()

    # Same data, and the serving model was trained on it: nothing to do.
    assert main(["run", *args]) == 0
    assert "no new data" in capsys.readouterr().out

    cfg = load_config(overrides=tiny_pipeline_overrides(root))
    runs = md.Metadata.from_config(cfg).list_runs()
    assert [r["status"] for r in runs] == ["no_new_data", "pushed", "not_blessed"]
    assert runs[1]["version"] == 1 and runs[1]["blessed"] is True and runs[2]["blessed"] is False
    assert [r["exit_code"] for r in runs] == [0, 0, 3]

    assert main(["runs", "--root", str(root)]) == 0
    listing = capsys.readouterr().out
    assert "pushed" in listing and "not_blessed" in listing and "no_new_data" in listing

    assert main(["lineage", str(root / "serving" / "1" / "saved_model.pb"), "--root", str(root)]) == 0
    lineage = capsys.readouterr().out
    assert lineage.startswith("ServingModel")
    assert "<- trainer" in lineage and "<- example_gen" in lineage and "spans [1]" in lineage


@pytest.mark.slow
def test_segpipe_run_bad_input_exits_2(tmp_path, write_tiny_span, tiny_pipeline_overrides, capsys):
    from segpipe.pipeline.cli import main

    root = tmp_path / "root"
    write_tiny_span(root / "data", 1, num=8, size=(32, 32))
    code = main(["run", *_cli_args(tiny_pipeline_overrides(root)), "--data", "missing-{SPAN}/*.tfrecord*"])
    assert code == 2
    assert "missing-" in capsys.readouterr().err
