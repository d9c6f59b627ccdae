"""Multi-worker training for real: two CPU worker processes on 127.0.0.1 under TF_CONFIG.

Each worker calls the trainer's own `train_model` with `train.distribution: multi_worker` on the
tiny Transform output. Worker 0 is the chief (TF's convention when the cluster has no `chief` task).
One run loses worker 1 right after the chief backed up epoch 1: the chief stops with a message
naming the cluster and the backup; both workers are restarted, resume from the backup, finish, and
the result is compared with a single-process run of the same global batch.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from segpipe.components import trainer
from segpipe.components.core import artifacts

PER_REPLICA_BATCH = 1  # 2 workers x 1 = global batch 2: 4 train records, 2 steps per epoch
EPOCHS = 2
# Both runs see the same batches in the same order (record shuffle off: a buffer of 1, one shard; no
# augmentation, no dropout, no batch norm, which Keras applies to each replica's own batch), and
# the same initial weights. The all-reduced gradient then equals the single process's up to
# float32 summation order, but Adam's first steps move every weight by about the learning rate
# whatever the gradient's size, so single weights are no fair measure; the losses and the exported
# model's eval loss and pixel accuracy are. Measured on this data: last epoch's train loss 1.51244
# vs 1.51221, exported eval loss 1.46249 vs 1.46225, pixel accuracy (and IoU, Dice) equal.
LOSS_TOLERANCE = 2e-3
METRIC_TOLERANCE = 2e-3
WORKER_TIMEOUT_S = 240
SURVIVOR_TIMEOUT_S = 120  # the lost peer's detection: TF checks the peers' health every 30 s

WORKER_PROGRAM = r"""
import json, os, signal, sys, time
from pathlib import Path

spec = json.loads(sys.argv[1])
from segpipe.components import trainer

if spec.get("die_after_first_epoch"):
    import keras

    class DieAfterChiefBackup(keras.callbacks.Callback):
        # A preemption at a known point: once the chief has backed up epoch 1, this worker is
        # killed (SIGKILL: no cleanup, as a lost machine) before it can take part in epoch 2.
        def on_epoch_end(self, epoch, logs=None):
            meta = Path(spec["kwargs"]["backup_dir"]) / trainer.STATE_DIR / trainer.BACKUP_METADATA_FILE
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if meta.is_file() and json.loads(meta.read_text())["epoch"] >= 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.05)

    make_callbacks = trainer.make_callbacks
    trainer.make_callbacks = lambda *a, **k: [*make_callbacks(*a, **k), DieAfterChiefBackup()]

summary = trainer.train_model(**spec["kwargs"])
Path(spec["summary"]).write_text(json.dumps(summary, default=str))
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)  # all written: skip TensorFlow's interpreter teardown (1-4 s on 2 cores)
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def train_kwargs(tiny_transform: dict, out: Path, backup: Path, **train_overrides: object) -> dict:
    from segpipe.pipeline.config import load_config

    cfg = load_config(overrides={
        "model.base_filters": 4, "model.depth": 2, "model.batch_norm": False, "model.dropout": 0.0,
        "train.epochs": EPOCHS, "train.min_steps": 0, "train.batch_size": PER_REPLICA_BATCH,
        # val_loss falls every epoch here, so both runs export their last epoch (val_iou of this
        # nearly all-background model ties and flips on rounding).
        "train.monitor": "val_loss", "train.early_stopping_patience": 0, "train.shuffle_buffer": 1,
        "train.augment_flip": False, "train.augment_rot90": False, "train.augment_zoom": 0.0,
        "train.warm_start": False, "train.mixed_precision": "off",
        **{f"train.{k}": v for k, v in train_overrides.items()},
    })
    return {
        "transformed_examples_uri": str(tiny_transform["transformed"]),
        "transform_graph_uri": str(tiny_transform["graph"]),
        "model_uri": str(out / "model"),
        "model_run_uri": str(out / "model_run"),
        "base_model_uri": None,
        "backup_dir": str(backup),
        "num_classes": 2,
        "image_size": 32,
        "model_config": dataclasses.asdict(cfg.model),
        "train_config": dataclasses.asdict(cfg.train),
    }


def start_workers(tiny_transform: dict, root: Path, run: str, *, die: bool = False) -> list[tuple[subprocess.Popen, Path, Path]]:
    """Start worker 0 (chief) and worker 1; each gets its own output URIs and TMPDIR (so the test can
    tell who wrote what) and the same backup_dir, as workers of one job on shared storage."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in (0, 1):
        out, tmp = root / f"worker{index}", root / f"{run}-tmp{index}"
        tmp.mkdir(parents=True, exist_ok=True)
        spec = {
            "kwargs": train_kwargs(tiny_transform, out, root / "backup", distribution="multi_worker"),
            "summary": str(root / f"{run}-summary{index}.json"),
            "die_after_first_epoch": die and index == 1,
        }
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "CUDA_VISIBLE_DEVICES": "",
            "TMPDIR": str(tmp),
            "TF_NUM_INTRAOP_THREADS": "1",  # 2 processes on a shared 2-core machine
            "TF_NUM_INTEROP_THREADS": "2",
        }
        log_file = open(root / f"{run}-worker{index}.log", "w")
        process = subprocess.Popen([sys.executable, "-c", WORKER_PROGRAM, json.dumps(spec)], env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        workers.append((process, out, tmp))
    return workers


def wait(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"worker did not finish within {WORKER_TIMEOUT_S} s; log tail:\n{log.read_text()[-3000:]}")


def csv_epochs(path: Path) -> list[int]:
    with open(path, newline="") as fh:
        return [int(row["epoch"]) for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def multi_worker_runs(tiny_transform, tmp_path_factory):
    """A 2-worker run that loses worker 1 after epoch 1, its restart, and a 1-process reference run."""
    root = tmp_path_factory.mktemp("multi_worker")
    killed = start_workers(tiny_transform, root, "killed", die=True)
    (chief, _, _), (lost, _, lost_tmp) = killed
    lost_code = wait(lost, root / "killed-worker1.log")
    # The chief now waits for a peer that is gone, until TensorFlow's peer health check (every 30 s)
    # aborts its collectives; a launcher then restarts the whole group.
    try:
        chief_code = chief.wait(timeout=SURVIVOR_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        chief.kill()
        chief_code = None
    at_kill = {
        "lost_code": lost_code,
        "chief_code": chief_code,
        "chief_log": (root / "killed-worker0.log").read_text(),
        "backup_epoch": trainer.resumed_epoch(root / "backup"),
        "backup_csv": csv_epochs(root / "backup" / trainer.RUN_DIR / trainer.HISTORY_FILE),
        "published": [artifacts.is_published(root / f"worker{i}" / "model") for i in (0, 1)],
        "lost_scratch": sorted(p.name for p in lost_tmp.glob("segpipe-worker-*/**/*") if p.is_file()),
    }
    restarted = start_workers(tiny_transform, root, "restarted")
    codes = [wait(process, root / f"restarted-worker{i}.log") for i, (process, _, _) in enumerate(restarted)]
    for index, code in enumerate(codes):
        assert code == 0, (root / f"restarted-worker{index}.log").read_text()[-3000:]
    summaries = [json.loads((root / f"restarted-summary{i}.json").read_text()) for i in (0, 1)]

    single_out = root / "single"
    single = trainer.train_model(**train_kwargs(tiny_transform, single_out, single_out / "backup",
                                                batch_size=2 * PER_REPLICA_BATCH))
    return {"root": root, "at_kill": at_kill, "summaries": summaries, "single": single, "single_out": single_out}


def test_lost_worker_left_the_chief_backup_of_epoch_one_and_nothing_published(multi_worker_runs):
    at_kill = multi_worker_runs["at_kill"]
    # SIGKILL: the preemption happened where the test placed it (not a crash before it)
    assert at_kill["lost_code"] == -9, (multi_worker_runs["root"] / "killed-worker1.log").read_text()[-3000:]
    assert at_kill["backup_epoch"] == 1 and at_kill["backup_csv"] == [0]
    assert at_kill["published"] == [False, False]
    # The non-chief saved its callbacks' files, but only into its own scratch folder.
    assert f"{trainer.BACKUP_METADATA_FILE}" in at_kill["lost_scratch"] and trainer.HISTORY_FILE in at_kill["lost_scratch"]


def test_the_surviving_chief_stops_with_a_message_naming_the_cluster_and_the_backup(multi_worker_runs):
    at_kill = multi_worker_runs["at_kill"]
    assert at_kill["chief_code"] is not None, f"the chief still waited {SURVIVOR_TIMEOUT_S} s after losing its peer"
    assert at_kill["chief_code"] != 0
    message = next(line for line in at_kill["chief_log"].splitlines() if "stopped answering" in line)
    assert "TrainingError" in message and "127.0.0.1:" in message
    assert str(multi_worker_runs["root"] / "backup") in message and "1 completed epoch(s)" in message
    assert "restart every worker" in message


def test_restarted_workers_resume_at_epoch_two_and_only_the_chief_publishes(multi_worker_runs):
    root, (chief, worker) = multi_worker_runs["root"], multi_worker_runs["summaries"]
    assert chief["chief"] is True and worker["chief"] is False
    for summary in (chief, worker):
        # MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy in TF 2.16
        assert summary["strategy"] == "CollectiveAllReduceStrategy" and summary["replicas"] == 2
        assert summary["initial_epoch"] == 1 and summary["epochs"] == EPOCHS
        assert summary["plan"]["steps_per_epoch"] == 2  # 4 records / global batch 2
    assert artifacts.is_published(root / "worker0" / "model")
    assert artifacts.is_published(root / "worker0" / "model_run")
    # Epoch 0 ran once (before the kill), epochs 1-2 once each after it: never rerun, never twice.
    assert csv_epochs(root / "worker0" / "model_run" / trainer.HISTORY_FILE) == list(range(EPOCHS))
    assert not (root / "worker1").exists()  # the non-chief published nothing, anywhere
    assert not list((root / "restarted-tmp1").glob("segpipe-worker-*"))  # and removed its scratch
    assert not (root / "backup").exists()  # the chief removed the backup after publishing


def test_two_workers_match_one_process_with_the_same_global_batch(multi_worker_runs):
    root, chief, single = multi_worker_runs["root"], multi_worker_runs["summaries"][0], multi_worker_runs["single"]
    assert single["replicas"] == 1 and single["plan"]["steps"] == chief["plan"]["steps"] == 2 * EPOCHS
    distributed = trainer.read_history(root / "worker0" / "model_run" / trainer.HISTORY_FILE)
    reference = trainer.read_history(multi_worker_runs["single_out"] / "model_run" / trainer.HISTORY_FILE)
    # The logged loss is the global batch's mean on both: each replica's loss is its share (a
    # replica logging or stepping with the sum over replicas would be 2x here).
    for epoch in range(1, EPOCHS):  # epochs run after the restart, on weights restored from the backup
        for key in ("loss", "val_loss"):
            assert distributed[epoch][key] == pytest.approx(reference[epoch][key], abs=LOSS_TOLERANCE), (epoch, key)
    assert chief["best_epoch"] == single["best_epoch"] == EPOCHS
    # IoU and Dice of this barely trained model count a handful of foreground pixels, so one pixel
    # crossing 0.5 moves them by ~0.003: the loss and the pixel accuracy are the fair measures.
    for key in ("val_loss", "val_pixel_accuracy"):
        assert chief["metrics"][key] == pytest.approx(single["metrics"][key], abs=METRIC_TOLERANCE), key
    # Training moved the model, so equal numbers are not two untrained models agreeing.
    assert reference[-1]["loss"] < reference[0]["loss"] - LOSS_TOLERANCE
