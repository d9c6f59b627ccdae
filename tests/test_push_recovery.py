"""A push killed right after its version went live is recovered, and gc never deletes what a live
version's segpipe.json names.

The failure this guards against: after a kill right after the rename, `serving/2` was live but
nothing recorded it; `lineage` did not know it, and `gc --keep 1` deleted v2's source model and the
statistics its segpipe.json names as the drift baseline.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.components import pusher
from segpipe.components.core.serving import SERVING_INFO_FILE, list_version_numbers


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, write_tiny_span, tiny_segpipe):
    root = tmp_path_factory.mktemp("recovery") / "root"
    segpipe = tiny_segpipe(root, **{"train.warm_start": False})

    write_tiny_span(root / "data", 1, num=24, size=(32, 32), seed=1)
    assert segpipe("run") == 0
    write_tiny_span(root / "data", 2, num=24, size=(32, 32), seed=2)
    real = pusher.write_version

    def killed_after_rename(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies between the rename and every record of the push

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pusher, "write_version", killed_after_rename)
        assert segpipe("run") == 130
    assert list_version_numbers(root / "serving") == [1, 2]
    return root, segpipe


def test_gc_keeps_what_a_live_version_names(interrupted):
    root, segpipe = interrupted
    info = json.loads((root / "serving" / "2" / SERVING_INFO_FILE).read_text())
    named = [info["source_model"], info["run_info"]["statistics_uri"], info["run_info"]["examples_uri"]]
    assert segpipe("gc", "--keep", "0") == 0
    for uri in named:
        assert Path(uri).is_dir(), f"gc deleted {uri}, which serving/2 names"


def test_the_next_command_records_the_version_and_lineage_follows_it(interrupted, capsys):
    root, segpipe = interrupted
    assert segpipe("lineage", str(root / "serving" / "2")) == 0
    out = capsys.readouterr().out
    assert out.startswith("ServingModel") and "pusher" in out and "Model" in out


def test_the_rerun_knows_span_2_is_served(interrupted, capsys):
    root, segpipe = interrupted
    assert segpipe("run") == 0
    assert "no new data" in capsys.readouterr().out
    assert list_version_numbers(root / "serving") == [1, 2]
