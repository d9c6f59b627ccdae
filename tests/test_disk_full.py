"""A full disk during training or a rollback is one line and exit 2, with the state kept.

Simulated where the bytes are written: the trainer's export (an OSError with ENOSPC, as the kernel
raises it) and a rollback's copy of the version folder (shutil's copy error carries the text only).
"""
from __future__ import annotations

import errno
import shutil

import pytest

from segpipe.components import pusher, trainer
from segpipe.components.core.serving import list_version_numbers


@pytest.fixture(scope="module")
def pushed_root(tmp_path_factory, write_tiny_span, tiny_segpipe):
    root = tmp_path_factory.mktemp("diskfull") / "root"
    segpipe = tiny_segpipe(root, **{"train.warm_start": False})

    write_tiny_span(root / "data", 1, num=24, size=(32, 32), seed=1)
    assert segpipe("run") == 0
    return root, segpipe


def test_disk_full_during_training_is_one_line_and_the_rerun_completes(pushed_root, write_tiny_span, capsys):
    root, segpipe = pushed_root
    write_tiny_span(root / "data", 2, num=24, size=(32, 32), seed=2)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "artifacts" / "trainer"))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "publish_outputs", no_space)
        capsys.readouterr()
        assert segpipe("run") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("segpipe: disk full while running")
    assert list_version_numbers(root / "serving") == [1]  # nothing pushed, nothing half-written visible
    assert not list((root / "artifacts" / "trainer").glob("*/model"))[1:]  # only span 1's model
    assert segpipe("run") == 0 and list_version_numbers(root / "serving") == [1, 2]


def test_disk_full_during_a_rollback_is_one_line_and_serving_is_unchanged(pushed_root, capsys):
    root, segpipe = pushed_root
    before = list_version_numbers(root / "serving")

    def no_space(src, dst):
        raise shutil.Error([(str(src), str(dst), "[Errno 28] No space left on device")])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pusher, "copy_tree", no_space)
        capsys.readouterr()
        assert segpipe("serving", "rollback", "1") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("segpipe: disk full while running")
    assert list_version_numbers(root / "serving") == before
    assert not [p for p in (root / "serving").iterdir() if p.name.startswith(".push-tmp")]
