"""What a careless or hostile user does to segpipe: each case exits with one line, names what is
wrong, and leaves segpipe's folders and the user's files as they were."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from segpipe.components.core import artifacts, data_format, serving
from segpipe.components.core.errors import BadInputError
from segpipe.components.tools import predict
from segpipe.pipeline import cli
from segpipe.pipeline import metadata as md
from segpipe.pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ helpers


def push_version(serving_dir: Path, version: int, model: Path) -> Path:
    """A complete pushed version, laid out as the Pusher writes it."""
    folder = serving_dir / str(version)
    shutil.copytree(model / artifacts.SAVED_MODEL_DIR, folder)
    (folder / serving.SERVING_INFO_FILE).write_text(json.dumps({"version": version, "spans": [1]}))
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with the sha256 of its bytes ('dir' for folders)."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def photo(path: Path, seed: int, size: tuple[int, int] = (40, 56)) -> Path:
    """A small RGB image with a bright rectangle (what the "bright" rule model segments)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(*size, 3), dtype=np.uint8)
    image[size[0] // 4 : size[0] // 2, size[1] // 3 : size[1] // 2] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    """The CLI's error: one `segpipe: ...` line on stderr and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("segpipe"), err
    return lines[-1]


def bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG declaring width x height 8-bit gray pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 2)  # two rows of zeros; the header is the bomb
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# ------------------------------------------------------------------ 1. outputs inside segpipe's folders


def test_predict_refuses_outputs_inside_serving_dirs_artifacts_and_models(
    tmp_path: Path, rule_models: dict, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "root"
    serving_dir = root / "serving"
    push_version(serving_dir, 1, rule_models["bright"])
    (serving_dir / ".segpipe-push.lock").touch()
    (root / "artifacts" / "trainer" / "k1").mkdir(parents=True)
    image = photo(tmp_path / "in" / "cat.png", 0)
    before = {name: snapshot(root / name) for name in ("serving", "artifacts")}

    cases = {
        serving_dir / "7": "serving directory",  # would become a "version" of PNGs
        serving_dir / "1": "serving directory",  # a live version
        root / "artifacts" / "trainer" / "k1" / "preds": "artifact store",
        rule_models["bright"] / artifacts.SAVED_MODEL_DIR / "preds": "a SavedModel",
    }
    for out, what in cases.items():
        argv = ["predict", "--model", str(serving_dir), str(image), "--out", str(out), "--root", str(root)]
        assert cli.main(argv) == 2, out
        line = one_line_error(capsys)
        assert line.startswith(f"segpipe: --out {out}: inside") and what in line, line
    assert {name: snapshot(root / name) for name in ("serving", "artifacts")} == before
    assert not (serving_dir / "7").exists()

    # Without the config pointing at it, a serving dir is still recognised by what it holds.
    elsewhere = tmp_path / "copied_serving"
    push_version(elsewhere, 3, rule_models["bright"])
    assert cli.main(["predict", "--model", str(elsewhere), str(image), "--out", str(elsewhere / "4")]) == 2
    assert "a version folder of a serving directory" in one_line_error(capsys)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["3"]

    # An ordinary folder under the pipeline root is fine.
    assert cli.main(["predict", "--model", str(serving_dir), str(image), "--out", str(root / "predictions"),
                     "--root", str(root)]) == 0
    assert sorted(p.name for p in (root / "predictions").iterdir()) == ["cat_mask.png", "cat_overlay.png"]


def test_evaluate_and_train_refuse_an_out_inside_the_serving_dir(
    tmp_path: Path, rule_models: dict, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "root"
    serving_dir = root / "serving"
    push_version(serving_dir, 1, rule_models["bright"])
    records = tmp_path / "test.tfrecord"
    records.write_bytes(b"")
    for argv in (["evaluate", "--model", str(serving_dir), "--data", str(records)],
                 ["train", "--transformed", str(tmp_path / "t"), "--transform-graph", str(tmp_path / "g")]):
        assert cli.main([*argv, "--out", str(serving_dir / "5"), "--root", str(root)]) == 2
        assert one_line_error(capsys) == (f"segpipe: --out {serving_dir / '5'}: inside the serving directory "
                                          f"{serving_dir}; segpipe owns that folder, choose another --out")
    assert sorted(p.name for p in serving_dir.iterdir()) == ["1"]


def test_a_corrupt_saved_model_is_one_line(tmp_path: Path, rule_models: dict, capsys: pytest.CaptureFixture) -> None:
    image = photo(tmp_path / "in" / "cat.png", 6)
    garbage = tmp_path / "garbage"
    (garbage / "variables").mkdir(parents=True)
    (garbage / serving.SAVED_MODEL_PB).write_bytes(b"\x08\x96" + os.urandom(512))
    truncated = tmp_path / "truncated"
    shutil.copytree(rule_models["bright"] / artifacts.SAVED_MODEL_DIR, truncated)
    for data in (truncated / "variables").glob("variables.data-*"):
        data.write_bytes(data.read_bytes()[:10])  # a copy killed halfway
    for model in (garbage, truncated):
        out = tmp_path / f"out-{model.name}"
        assert cli.main(["predict", "--model", str(model), str(image), "--out", str(out)]) == 2
        assert one_line_error(capsys).startswith(f"segpipe: {model}: not a loadable SavedModel (")
        assert not out.exists()


def test_resolvers_see_only_complete_pushed_versions(tmp_path: Path, rule_models: dict) -> None:
    from segpipe.components import pusher

    serving_dir = tmp_path / "serving"
    push_version(serving_dir, 1, rule_models["bright"])
    junk = serving_dir / "7"  # what `predict --out serving/7` used to leave
    junk.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(junk / "cat_mask.png")
    half = serving_dir / "8"  # a SavedModel copied by hand, without the pusher's record
    shutil.copytree(rule_models["background"] / artifacts.SAVED_MODEL_DIR, half)
    (serving_dir / "09").mkdir()  # not how a version is named

    assert serving.list_version_numbers(serving_dir) == [1]
    assert serving.latest_blessed_model(serving_dir) == str(serving_dir / "1")
    assert serving.resolve_saved_model(serving_dir) == serving_dir / "1"
    # A new version goes above every numeric folder: nothing is replaced, and TensorFlow Serving
    # (which loads the highest number) gets the new model.
    version, final = pusher.write_version(serving_dir, lambda tmp, v: shutil.copytree(half, tmp), keep_last=0)
    assert version == 10 and final == serving_dir / "10"
    assert sorted(p.name for p in junk.iterdir()) == ["cat_mask.png"]

    only_junk = tmp_path / "only_junk"
    (only_junk / "3").mkdir(parents=True)
    with pytest.raises(BadInputError, match=r"numeric folder\(s\) 3 are not complete pushed versions"):
        serving.resolve_saved_model(only_junk)


# ------------------------------------------------------------------ 2. the user's files


def test_predict_never_overwrites_files_it_did_not_write(
    tmp_path: Path, rule_models: dict, capsys: pytest.CaptureFixture
) -> None:
    pin = tmp_path / "pin"
    cat = photo(pin / "cat.png", 1)
    users_photo = photo(pin / "cat_overlay.png", 2)  # the user's own picture, not an output
    original = users_photo.read_bytes()
    model = str(rule_models["bright"])

    assert cli.main(["predict", "--model", model, str(pin), "--out", str(pin)]) == 2
    assert one_line_error(capsys) == (f"segpipe: --out {pin}: is also an input folder; masks written there would be "
                                      "read back as inputs by the next run over it, write predictions elsewhere")
    assert cli.main(["predict", "--model", model, str(cat), "--out", str(pin)]) == 2
    assert one_line_error(capsys).startswith(f"segpipe: {users_photo}: exists and was not written by segpipe predict")
    assert users_photo.read_bytes() == original and sorted(p.name for p in pin.iterdir()) == ["cat.png", "cat_overlay.png"]

    # Its own outputs are replaced on a rerun; an output someone edited is not.
    out = tmp_path / "out"
    assert cli.main(["predict", "--model", model, str(cat), "--out", str(out)]) == 0
    first = snapshot(out)
    assert cli.main(["predict", "--model", model, str(cat), "--out", str(out)]) == 0
    assert snapshot(out) == first
    edited = Image.open(out / "cat_mask.png")
    chunk = edited.text[predict.OWN_CHUNK]  # an editor that keeps the text chunk but changes pixels
    info = PngImagePlugin.PngInfo()
    info.add_text(predict.OWN_CHUNK, chunk)
    Image.fromarray(np.full(edited.size[::-1], 1, np.uint8)).save(out / "cat_mask.png", pnginfo=info)
    edited_bytes = (out / "cat_mask.png").read_bytes()
    capsys.readouterr()
    assert cli.main(["predict", "--model", model, str(cat), "--out", str(out)]) == 2
    assert f"{out / 'cat_mask.png'}: exists and was not written" in one_line_error(capsys)
    assert (out / "cat_mask.png").read_bytes() == edited_bytes

    # --overwrite replaces whatever is there.
    assert cli.main(["predict", "--model", model, str(cat), "--out", str(pin), "--overwrite"]) == 0
    assert users_photo.read_bytes() != original and predict.is_own_output(users_photo)
    assert sorted(p.name for p in pin.iterdir()) == ["cat.png", "cat_mask.png", "cat_overlay.png"]


def test_a_full_disk_stops_predict_with_one_line_and_no_partial_files(
    tmp_path: Path, rule_models: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [photo(tmp_path / "in" / f"im{i}.png", i) for i in range(3)]
    out = tmp_path / "out"
    real_write = Path.write_bytes
    calls = []

    def disk_fills_up(self: Path, data: bytes) -> int:
        calls.extend([self] if self.parent == out else [])
        if len(calls) > 3:  # the overlay and mask of the first image, the overlay of the second
            real_write(self, data[: len(data) // 2])
            raise OSError(28, "No space left on device", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_fills_up)
    assert cli.main(["predict", "--model", str(rule_models["bright"]), *map(str, images), "--out", str(out)]) == 2
    monkeypatch.undo()
    assert one_line_error(capsys) == (f"segpipe: {out}: cannot write the outputs of {images[1]} (No space left on "
                                      "device); 1 of 3 image(s) were written before")
    # No hidden temporary file stays behind; what is there is complete and segpipe's own.
    assert sorted(p.name for p in out.iterdir()) == ["im0_mask.png", "im0_overlay.png", "im1_overlay.png"]
    assert all(predict.is_own_output(p) for p in out.iterdir())


# ------------------------------------------------------------------ 3. decompression bombs


def test_decompression_bomb_is_one_skipped_image_and_the_rest_are_written(
    tmp_path: Path, rule_models: dict, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "in"
    first = photo(folder / "a.png", 3)
    (folder / "b_bomb.png").write_bytes(bomb_png(20_000, 20_000))  # 400 MP in 400 bytes
    last = photo(folder / "c.png", 4)
    out = tmp_path / "out"
    argv = ["predict", "--model", str(rule_models["bright"]), str(folder), "/dev/zero", "--out", str(out)]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"segpipe: {folder / 'b_bomb.png'}: image too large: 400 MP is above the limit of 100 MP" in captured.err
    assert "segpipe: /dev/zero: not a readable image (not a regular file)" in captured.err
    assert captured.err.strip().splitlines()[-1] == "segpipe: 2 of 4 image(s) failed (listed above)"
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png", "c_mask.png", "c_overlay.png"]
    assert Image.open(out / "c_mask.png").size == Image.open(last).size and first.is_file()


def test_every_decoder_caps_the_pixel_count_with_one_constant(tmp_path: Path) -> None:
    from segpipe.components.example_gen import IMAGE_UNDECODABLE, check_example
    from segpipe.components.tools.importers import import_folders

    # 121 MP: above the cap, but below twice PIL's own default limit, where PIL only warns and decodes.
    big = bomb_png(11_000, 11_000)
    assert data_format.MAX_IMAGE_PIXELS == 100_000_000
    with pytest.raises(data_format.ImageTooLargeError, match="121 MP is above the limit of 100 MP"):
        data_format.decode_image(big)

    mask = data_format.encode_png(np.zeros((8, 8), np.uint8))
    raw_id, reason = check_example(data_format.encode_example("huge", big, mask), num_classes=2, min_image_size=1)
    assert raw_id == b"huge" and reason.startswith(f"{IMAGE_UNDECODABLE}: image does not decode (ImageTooLargeError")

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    (images / "huge.png").write_bytes(big)
    (masks / "huge.png").write_bytes(mask)
    photo(images / "ok.png", 5, (8, 8))
    (masks / "ok.png").write_bytes(mask)
    report = import_folders(images, masks, tmp_path / "data", progress=False)
    assert report.imported == 1
    assert [(Path(p).name, kind) for p, kind, _ in report.skipped] == [("huge.png", "image too large")]


# ------------------------------------------------------------------ 4. small inputs, one line each


def test_a_corrupt_metadata_store_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "root"
    root.mkdir()
    garbage = os.urandom(4096)
    (root / "metadata.sqlite").write_bytes(garbage)
    for argv in (["runs", "--root", str(root)], ["gc", "--root", str(root)]):
        assert cli.main(argv) == 2
        assert one_line_error(capsys) == (
            f"segpipe: {root / 'metadata.sqlite'}: not a usable ML Metadata SQLite database (file is not a "
            "database); move the file aside to start a new store (the run history in it is lost), or set "
            "metadata.sqlite_path")
    assert (root / "metadata.sqlite").read_bytes() == garbage


def test_a_damaged_metadata_store_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A store that opens but whose pages are damaged (a disk error, a copy cut short)."""
    root = tmp_path / "root"
    meta = md.Metadata.from_config(load_config(overrides={"root": str(root)}))
    for i in range(30):
        meta.start_run("segpipe", f"run-{i}", {"note": "x" * 2000})
    path = root / "metadata.sqlite"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 // 4096 * 4096])  # a copy cut short: its later pages are gone
    assert cli.main(["runs", "--root", str(root)]) == 2
    assert one_line_error(capsys).startswith(
        f"segpipe: {path}: not a usable ML Metadata SQLite database (database disk image is malformed)")


@pytest.mark.parametrize("content, message", [
    (None, "a device, not a config file"),
    (b"a: " + b"x" * (2 << 20), "larger than 1024 KiB, not a config file"),
    (b"train: " + b"[" * 20000, "not a config (collections nested too deeply)"),
    (b"train:\n  epochs: 3\n\xff\n", "not UTF-8 text (invalid byte at offset 19)"),
])
def test_config_files_that_are_not_configs_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes | None, message: str
) -> None:
    path = Path("/dev/zero") if content is None else tmp_path / "config.yaml"
    if content is not None:
        path.write_bytes(content)
    assert cli.main(["config", "--config", str(path)]) == 2
    assert one_line_error(capsys) == f"segpipe: config error: {path}: {message}"


def test_a_config_pipe_is_read_once(capsys: pytest.CaptureFixture) -> None:
    """`--config <(...)` is a pipe: every part of the command must see the one configuration read."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"train:\n  epochs: 4\n")
    os.close(write_end)
    try:
        assert cli.main(["config", "--config", f"/dev/fd/{read_end}"]) == 0
    finally:
        os.close(read_end)
    assert "  epochs: 4\n" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["gc", "--keep", "-1"], "segpipe: --keep: must be at least 0, got -1"),
    (["runs", "--limit", "0"], "segpipe: --limit: must be at least 1, got 0"),
    (["config", "--set", "root="], "segpipe: config error: root: must not be empty"),
    (["config", "--set", "pipeline_name= "], "segpipe: config error: pipeline_name: must not be empty"),
])
def test_out_of_range_flags_name_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    root = tmp_path / "root"
    md.Metadata.from_config(load_config(overrides={"root": str(root)})).start_run("segpipe", "r1", {})
    before = snapshot(root)
    assert cli.main([*argv, "--root", str(root)] if argv[0] != "config" else argv) == 2
    assert one_line_error(capsys) == message
    after = {path: digest for path, digest in snapshot(root).items() if path.split("/")[0] != "logs"}
    assert after == before  # the command's log file aside, nothing changed


def test_an_empty_path_argument_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["runs", "--root", ""])
    assert raised.value.code == 2
    assert "argument --root: must not be empty" in capsys.readouterr().err


def test_gc_on_a_root_without_runs_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "never_used"
    assert cli.main(["gc", "--root", str(root)]) == 2
    assert one_line_error(capsys) == f"segpipe: {root / 'metadata.sqlite'}: no ML Metadata store (no run on this pipeline root yet)"
    assert not root.exists()


def test_compile_refuses_a_folder_and_never_leaves_half_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe.pipeline import kubeflow

    folder = tmp_path / "existing"
    folder.mkdir()
    assert cli.main(["compile", "--out-file", str(folder)]) == 2
    assert one_line_error(capsys) == (f"segpipe: --out-file {folder}: is a folder; give a file name, e.g. "
                                      f"{folder / 'pipeline.yaml'}")
    assert cli.main(["compile", "--out-file", str(tmp_path / "pipeline.json")]) == 2
    assert one_line_error(capsys).endswith("must end in .yaml (Kubeflow Pipelines reads YAML)")
    assert list(folder.iterdir()) == []

    target = tmp_path / "pipeline.yaml"
    target.write_text("the previous pipeline\n")

    def killed_midway(cfg, out, *, image=None):
        Path(out).write_text("half a pipel")
        raise KeyboardInterrupt

    monkeypatch.setattr(kubeflow, "compile_pipeline", killed_midway)
    assert cli.main(["compile", "--out-file", str(target)]) == 130
    assert target.read_text() == "the previous pipeline\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "pipeline.yaml"]


RUN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.metadata import Metadata

    meta = Metadata.from_config(load_config(overrides={"root": sys.argv[1]}))
    meta.start_run("segpipe", sys.argv[2], {})
    print("started", flush=True)
    time.sleep(300)
    """
)


def test_a_run_killed_by_sigkill_is_listed_as_failed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "root"
    procs = {name: subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(root), name], cwd=REPO,
                                    stdout=subprocess.PIPE, text=True)
             for name in ("killed-run", "live-run")}
    try:
        for proc in procs.values():
            assert proc.stdout.readline().strip() == "started"
        killed = procs["killed-run"]
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        meta = md.Metadata.from_config(load_config(overrides={"root": str(root)}))
        meta.start_run("segpipe", "other-host-run", {})
        meta.update_run("other-host-run", host="another-machine", pid=killed.pid)  # only its host can tell

        assert cli.main(["runs", "--root", str(root)]) == 0
        rows = {line.split()[0]: line.split()[3] for line in capsys.readouterr().out.splitlines()[1:]}
        assert rows == {"killed-run": "failed", "live-run": "running", "other-host-run": "running"}
        runs = {run["run_id"]: run for run in meta.list_runs()}
        assert runs["killed-run"]["message"] == (f"process {killed.pid} on {socket.gethostname()} ended without "
                                                 "recording an outcome (killed?)")
        assert runs["live-run"]["pid"] == procs["live-run"].pid
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()


def _raw_example(raw_id: bytes, seed: int) -> bytes:
    from tensorflow.core.example import example_pb2

    rng = np.random.default_rng(seed)
    example = example_pb2.Example()
    features = example.features.feature
    features[artifacts.ID_KEY].bytes_list.value.append(raw_id)
    features[artifacts.IMAGE_KEY].bytes_list.value.append(
        data_format.encode_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    features[artifacts.MASK_KEY].bytes_list.value.append(data_format.encode_png(np.zeros((16, 16), np.uint8)))
    return example.SerializeToString()


def _write_records(folder: Path, records: list[bytes]) -> Path:
    import tensorflow as tf

    folder.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(folder / "part.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    return folder / "part.tfrecord"


def test_ids_that_differ_only_in_invalid_utf8_are_not_duplicates(tmp_path: Path, dag_params) -> None:
    import tensorflow as tf

    from segpipe.components.example_gen import run_example_gen

    part = _write_records(data_format.span_dir(tmp_path / "data", 1),
                          [_raw_example(b"img-\xff", 0), _raw_example(b"img-\xfe", 1), _raw_example(b"img-\xff", 2)])
    examples = tmp_path / "examples"
    result = run_example_gen(**dag_params("example_gen", input_pattern=str(tmp_path / "data" / "span-{SPAN}/*"),
                                          examples_uri=str(examples), skip_bad_records=True, min_image_size=1))
    assert result["counts"]["skipped"] == 1
    [skipped] = [json.loads(line) for line in (examples / "skipped_records.jsonl").read_text().splitlines()]
    assert skipped == {"file": str(part), "record": 2,
                       "problem": f"duplicate id 'img-\\\\xff' (first seen in {part} record 0)"}
    kept = {data_format.parse_example_raw(r)[0]
            for split in artifacts.SPLITS
            for r in tf.data.TFRecordDataset(artifacts.split_files(examples, split), "GZIP").as_numpy_iterator()}
    assert kept == {b"img-\xff", b"img-\xfe"}
    assert data_format.display_id(b"img-\xff") == "img-\\xff"


def test_a_sequence_example_is_a_bad_record_not_an_example(tmp_path: Path, dag_params) -> None:
    from tensorflow.core.example import example_pb2

    from segpipe.components.example_gen import run_example_gen

    sequence = example_pb2.SequenceExample()  # its context looks like a complete Example
    sequence.context.CopyFrom(example_pb2.Example.FromString(_raw_example(b"seq", 9)).features)
    sequence.feature_lists.feature_list["frames"].feature.add().bytes_list.value.append(b"frame 0")
    with pytest.raises(data_format.NotAnExampleError, match="field 2 is its feature_lists"):
        data_format.parse_proto(sequence.SerializeToString())

    part = _write_records(data_format.span_dir(tmp_path / "data", 1),
                          [_raw_example(b"ok", 0), sequence.SerializeToString()])
    examples = tmp_path / "examples"
    with pytest.raises(BadInputError) as raised:
        run_example_gen(**dag_params("example_gen", input_pattern=str(tmp_path / "data" / "span-{SPAN}/*"),
                                     examples_uri=str(examples), min_image_size=1))
    assert str(raised.value) == (
        f"1 bad record(s), nothing published: {part} record 1: not a tf.train.Example: it has field(s) 2 an "
        "Example does not have (a tf.train.SequenceExample? field 2 is its feature_lists)")
    assert not examples.exists()
