"""ML Metadata on a real MySQL server (MariaDB from Debian's packages), as Kubeflow Pipelines keeps it.

`.ci/run` starts a throwaway server on 127.0.0.1 (`.ci/mysql-server`) and exports its port and a
random password; run alone, this module starts one itself when `mariadbd` is installed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from segpipe.components.core.serving import list_version_numbers
from segpipe.pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
PASSWORD_ENV = "SEGPIPE_TEST_MYSQL_PASSWORD"


@pytest.fixture(scope="module")
def mysql_port():
    if os.environ.get("SEGPIPE_TEST_MYSQL_PORT"):
        yield int(os.environ["SEGPIPE_TEST_MYSQL_PORT"])
        return
    if not shutil.which("mariadbd"):
        pytest.skip("no MySQL server: .ci/run installs Debian's mariadb-server; locally `apt-get install mariadb-server`")
    started = subprocess.run([str(REPO / ".ci" / "mysql-server"), "start"], capture_output=True, text=True, check=True)
    env = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
    os.environ[PASSWORD_ENV] = env[PASSWORD_ENV]
    try:
        yield int(env["SEGPIPE_TEST_MYSQL_PORT"])
    finally:
        subprocess.run([str(REPO / ".ci" / "mysql-server"), "stop", env["SEGPIPE_TEST_MYSQL_DATADIR"]], check=False)
        os.environ.pop(PASSWORD_ENV, None)


@pytest.fixture
def argv_for(mysql_port, tiny_pipeline_overrides):
    """`argv_for(root, database, *command)`: a segpipe command on `root` with ML Metadata in MySQL."""

    def _argv(root: Path, database: str, *command: str, port: int | None = None) -> list[str]:
        overrides = tiny_pipeline_overrides(root, **{
            "metadata.mysql_host": "127.0.0.1", "metadata.mysql_port": port or mysql_port,
            "metadata.mysql_database": database, "metadata.mysql_user": "mlmd",
            "metadata.mysql_password_env": PASSWORD_ENV,
        })
        sets = [a for k, v in overrides.items() if k != "root" for a in ("--set", f"{k}={json.dumps(v)}")]
        return [*command, "--root", str(root), *sets]

    return _argv


def test_pipeline_runs_lineage_and_gc_against_mysql(tmp_path, write_tiny_span, argv_for, capsys):
    root, database = tmp_path / "root", f"mlmd_{uuid.uuid4().hex[:8]}"
    write_tiny_span(root / "data", 1, num=24, size=(32, 32))
    assert main(argv_for(root, database, "run")) == 0
    assert list_version_numbers(root / "serving") == [1]
    assert not (root / "metadata.sqlite").exists()  # the store is the server, not a file
    capsys.readouterr()
    assert main(argv_for(root, database, "runs")) == 0
    assert "pushed" in capsys.readouterr().out
    assert main(argv_for(root, database, "lineage", str(root / "serving" / "1"))) == 0
    lineage = capsys.readouterr().out
    assert lineage.startswith("ServingModel") and "trainer" in lineage and "example_gen" in lineage
    assert main(argv_for(root, database, "gc", "--keep", "0")) == 0
    assert (root / "serving" / "1" / "saved_model.pb").is_file()


def test_two_concurrent_runs_share_one_mysql_store(tmp_path, write_tiny_span, argv_for, capsys):
    database = f"mlmd_{uuid.uuid4().hex[:8]}"
    roots = [tmp_path / "a", tmp_path / "b"]
    for i, root in enumerate(roots):
        write_tiny_span(root / "data", 1, num=24, size=(32, 32), seed=i)
    procs = [subprocess.Popen([sys.executable, "-m", "segpipe.pipeline.cli", *argv_for(root, database, "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for root in roots]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    capsys.readouterr()
    assert main(argv_for(roots[0], database, "runs")) == 0
    listed = capsys.readouterr().out
    assert listed.count("pushed") >= 2  # both runs in the one store


@pytest.mark.parametrize("problem", ["server down", "wrong password"])
def test_an_unreachable_store_is_one_line_exit_2_and_nothing_published(problem, tmp_path, write_tiny_span, argv_for,
                                                                       monkeypatch, capsys):
    root = tmp_path / "root"
    write_tiny_span(root / "data", 1, num=8, size=(32, 32))
    port = None
    if problem == "server down":
        import socket

        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    else:
        monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    code = main(argv_for(root, f"mlmd_{uuid.uuid4().hex[:8]}", "run", port=port))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "ML Metadata" in err[0] and "127.0.0.1" in err[0]
    assert "not-the-password" not in err[0]
    assert not (root / "artifacts").exists() and not (root / "serving").exists()
