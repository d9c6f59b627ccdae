"""Retraining on new spans: cache misses where data changed, warm start and baseline from the latest
blessed model (recorded in ML Metadata), a new version only through the gate, and nothing to do
without new data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.pipeline import metadata as md
from segpipe.pipeline.config import load_config
from segpipe.pipeline.local_runner import run_pipeline


def _versions(serving: Path) -> list[str]:
    return sorted((p.name for p in serving.iterdir() if not p.name.startswith(".")), key=int)


@pytest.mark.slow
def test_new_span_retrains_from_the_blessed_model_and_no_new_data_trains_nothing(
    tmp_path, write_tiny_span, tiny_pipeline_overrides
):
    root = tmp_path / "root"
    cfg = load_config(overrides=tiny_pipeline_overrides(root))
    serving = root / "serving"

    write_tiny_span(root / "data", 1, num=32, size=(32, 32))
    first = run_pipeline(cfg)
    assert first.status == "pushed" and first.pushed_version == 1
    assert json.loads((serving / "1" / "segpipe.json").read_text())["spans"] == [1]

    write_tiny_span(root / "data", 2, num=32, size=(32, 32), seed=1)
    second = run_pipeline(cfg)
    states = {s.node: s.state for s in second.steps}
    for node in ("example_gen", "statistics_gen", "example_validator", "transform", "trainer", "evaluator"):
        assert states[node] == "done", node  # new data misses the cache all the way down
    assert states["schema_gen"] == "cached"

    meta = md.Metadata.from_config(cfg)
    executions = {e["node"]: e for e in meta.run_executions(second.run_id)}
    version_1 = str((serving / "1").resolve())
    assert executions["trainer"]["inputs"]["base_model_uri"] == version_1
    assert executions["evaluator"]["inputs"]["baseline_model_uri"] == version_1
    assert json.loads(executions["trainer"]["result"])["warm_start"]["used"] is True
    # The drift check compared span 2 with the statistics behind version 1.
    stats_of_v1 = json.loads((serving / "1" / "segpipe.json").read_text())["run_info"]["statistics_uri"]
    previous = executions["example_validator"]["inputs"]["previous_statistics_uri"]
    assert previous == str(Path(stats_of_v1).resolve())
    assert previous != executions["statistics_gen"]["outputs"]["statistics_uri"]
    assert second.status in ("pushed", "not_blessed")
    if second.status == "pushed":
        assert second.pushed_version == 2 and _versions(serving) == ["1", "2"]
        assert json.loads((serving / "2" / "segpipe.json").read_text())["spans"] == [2]
    else:  # a stated reason, and version 1 still serves
        assert second.reasons and _versions(serving) == ["1"]

    third = run_pipeline(cfg)
    assert third.status == "no_new_data" and third.exit_code == 0 and third.steps == []
    assert "no new data" in third.message
    assert not any(e["node"] == "trainer" for e in meta.run_executions(third.run_id))
    assert _versions(serving) == (["1", "2"] if second.status == "pushed" else ["1"])
