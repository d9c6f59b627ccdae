"""Tuner: a KerasTuner random search over the Trainer's own recipe, before the Trainer (TFX's Tuner).

- Trials: each trial builds, compiles and feeds the U-Net exactly as the Trainer does (its
  create_model, compile_model, fit_inputs, plan_run), with the trial's values for the searched
  fields (learning rate, width, loss, augmentation). A trial trains `trial_fraction` of
  the Trainer's planned epochs (at least one) under the same warm-up + cosine schedule compressed to
  those steps, so a trial is a short version of the real run.
- Objective: the best eval foreground IoU of the trial's epochs (`val_iou`, the gate's metric),
  higher is better. Not `train.monitor`: the loss is searched, and losses of different kinds do not
  compare.
- Budget: no trial after the first starts once `budget_minutes` have passed since the search
  began, and a running trial stops at the end of the epoch in which they pass (it keeps its score
  over the epochs it ran; the artifact marks it incomplete). A trial that fails (a NaN loss at a
  too-high rate) is recorded as failed; the step fails only when no trial completes.
- Output: a `Hyperparameters` artifact, `hyperparameters.json`: `values` (the best trial's value of
  each searched field, which the pipeline applies to the Trainer's configuration), the best trial,
  every trial run with its values and objective, and why the search stopped. KerasTuner's working
  directory (oracle state, per-trial checkpoints) lives inside the temporary output and is removed
  before publishing, so a killed search leaves nothing behind (and a rerun starts afresh).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from segpipe.components import trainer
from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError, TrainingError

log = logging.getLogger(__name__)

PRODUCER = "Tuner"
HYPERPARAMETERS_FILE = "hyperparameters.json"
OBJECTIVE = "val_iou"
SEARCH_DIR = "search"  # KerasTuner's working directory inside the temporary output
# Why the search ended.
STOPPED_MAX_TRIALS = "max_trials"
STOPPED_BUDGET = "budget"
STOPPED_EXHAUSTED = "search space exhausted"
STOPPED_NOTHING = "nothing to search"


def split_values(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Dotted `model.*` / `train.*` values -> (model_config updates, train_config updates)."""
    model, train = {}, {}
    for dotted, value in values.items():
        section, _, name = dotted.partition(".")
        {"model": model, "train": train}[section][name] = value
    return model, train


def as_candidate(value: Any, candidates: list[Any]) -> Any:
    """The candidate a KerasTuner value stands for: its Choice casts values (True comes back as 1)."""
    return next((candidate for candidate in candidates if candidate == value), value)


def budget_callback(deadline: float) -> Any:
    """Stops `fit` at the end of the epoch in which the monotonic clock passes `deadline`."""
    import keras

    class StopAtDeadline(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            if time.monotonic() >= deadline:
                self.model.stop_training = True

    return StopAtDeadline()


def make_hypermodel(
    files: Mapping[str, list[str]], *, image_size: int, num_classes: int, model_config: Mapping[str, Any],
    train_config: Mapping[str, Any], search_space: Mapping[str, list[Any]], plan: Mapping[str, int],
    class_weights: list[float] | None, replicas: int, precision: str, deadline: float, seconds: dict[str, float],
) -> Any:
    """The KerasTuner HyperModel: build = the Trainer's model with the trial's values, fit = its input.

    `plan` is the trial's plan (epochs, steps, records); `seconds` collects each trial's fit time,
    keyed by its values. A trial's build after `deadline` (but never the first's) raises a FatalError,
    which ends the search.
    """
    import keras
    import keras_tuner as kt

    def trial_values(hp: Any) -> dict[str, Any]:
        return {dotted: as_candidate(hp.Choice(dotted, list(candidates)), list(candidates))
                for dotted, candidates in search_space.items()}

    class SegmentationHyperModel(kt.HyperModel):
        def build(self, hp: Any) -> Any:
            from segpipe.components.core.encoders import load_encoder_weights

            if seconds and time.monotonic() >= deadline:  # the first trial always runs
                raise kt.errors.FatalError("the tuner's budget is spent")
            model_updates, train_updates = split_values(trial_values(hp))
            keras.mixed_precision.set_global_policy(precision)  # KerasTuner's clear_session before a build resets it
            model = trainer.create_model(trainer.model_input_size(image_size, int(train_config.get("crop_size", 0))),
                                         num_classes, {**model_config, **model_updates})
            if model_config["encoder_weights"]:  # a pretrained backbone starts every trial, as in the Trainer
                load_encoder_weights(model, str(model_config["encoder_weights"]))
            trainer.compile_model(model, num_classes, {**train_config, **train_updates}, total_steps=plan["steps"],
                                  class_weights=class_weights)
            return model

        def fit(self, hp: Any, model: Any, *args: Any, callbacks: list[Any] | None = None, **kwargs: Any) -> Any:
            values = trial_values(hp)
            config = {**train_config, **split_values(values)[1]}
            train, evaluation, steps_per_epoch = trainer.fit_inputs(
                files, image_size=image_size, batch_size=int(config["batch_size"]) * replicas, train_config=config,
                num_records=plan["records"])
            log.info("tuner trial: %s", values)
            started = time.monotonic()
            try:
                with warnings.catch_warnings():
                    # The eval split has no declared length, so each evaluation ends by running out of
                    # data, which Keras warns about every epoch (the Trainer silences it too).
                    warnings.filterwarnings("ignore", message="Your input ran out of data")
                    return model.fit(train, validation_data=evaluation, epochs=plan["epochs"],
                                     steps_per_epoch=steps_per_epoch, verbose=0, shuffle=False,
                                     callbacks=[*(callbacks or []), trainer.raise_on_nan_callback(),
                                                budget_callback(deadline)])
            finally:
                seconds[json.dumps(values, sort_keys=True)] = round(time.monotonic() - started, 2)

    return SegmentationHyperModel()


def trial_plan(plan: Mapping[str, int], trial_fraction: float) -> dict[str, int]:
    """The Trainer's plan cut to `trial_fraction` of its epochs (at least one)."""
    epochs = max(1, math.ceil(plan["epochs"] * trial_fraction))
    return {"records": plan["records"], "epochs": epochs, "steps_per_epoch": plan["steps_per_epoch"],
            "steps": epochs * plan["steps_per_epoch"]}


def trial_records(oracle: Any, search_space: Mapping[str, list[Any]], epochs: int,
                  seconds: Mapping[str, float]) -> list[dict[str, Any]]:
    """Every trial that ran, in order: values, status, objective, epochs run and fit time."""
    from keras_tuner.engine.trial import TrialStatus

    records = []
    for trial_id in sorted(oracle.trials):
        trial = oracle.trials[trial_id]
        if trial.status not in (TrialStatus.COMPLETED, TrialStatus.FAILED, TrialStatus.INVALID):
            continue  # created, then the budget ended the search before it ran
        values = {k: as_candidate(v, list(search_space[k])) for k, v in trial.hyperparameters.values.items()
                  if k in search_space}
        ran = len(trial.metrics.get_history(OBJECTIVE)) if trial.metrics.exists(OBJECTIVE) else 0
        record = {"trial": trial_id, "values": values, "status": "completed" if trial.status == TrialStatus.COMPLETED
                  else "failed", "objective": trial.score, "epochs": ran, "complete": ran == epochs,
                  "seconds": seconds.get(json.dumps(values, sort_keys=True))}
        if trial.best_step is not None and trial.score is not None:
            record["best_epoch"] = int(trial.best_step) + 1
        if trial.message:
            record["error"] = trial.message.strip().splitlines()[-1]
        records.append(record)
    return records


def run_search(tmp: Path, hypermodel: Any, *, max_trials: int, seed: int, strategy: Any) -> tuple[Any, bool]:
    """KerasTuner's RandomSearch in `tmp/search`: (its oracle, whether the budget ended the search)."""
    import keras_tuner as kt

    tuner = kt.RandomSearch(
        hypermodel,
        objective=kt.Objective(OBJECTIVE, direction="max"),
        max_trials=max_trials,
        seed=seed,
        directory=str(tmp / SEARCH_DIR),
        project_name="segpipe",
        overwrite=True,
        distribution_strategy=strategy if strategy.num_replicas_in_sync > 1 else None,
        max_consecutive_failed_trials=max_trials,  # a failed trial is data; only all failing is an error
    )
    try:
        with warnings.catch_warnings():
            # KerasTuner 1.4 calls threading.currentThread(), deprecated since Python 3.10, on every oracle call.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="keras_tuner")
            tuner.search(verbose=0)
    except kt.errors.FatalError:
        return tuner.oracle, True
    except RuntimeError as exc:  # every trial failed: reported below with the first failure
        if "consecutive failures" not in str(exc):
            raise
    return tuner.oracle, False


def tune_hyperparameters(
    transformed_examples_uri: str,
    transform_graph_uri: str,
    hyperparameters_uri: str,
    *,
    num_classes: int,
    image_size: int,
    model_config: dict,
    train_config: dict,
    search_space: dict,
    max_trials: int,
    budget_minutes: float,
    trial_fraction: float,
) -> dict:
    """Search `search_space` (dotted field -> candidate values) and publish the Hyperparameters artifact.

    `model_config` / `train_config` are the Trainer's (after the plan); the searched fields' values
    in them are replaced per trial. Returns {"values", "best", "trials" (number run), "stopped"}.
    """
    import keras

    unknown = [name for name in search_space if name.partition(".")[0] not in ("model", "train")]
    if unknown:
        raise BadInputError(f"tuner search space: {unknown} are not model.* or train.* fields")
    # Before any TensorFlow op, as in the Trainer: MultiWorkerMirrored configures the process's collectives.
    strategy = trainer.select_strategy(str(train_config["distribution"]))
    files = {split: trainer.check_split(transformed_examples_uri, split, image_size)
             for split in (artifacts.TRAIN, artifacts.EVAL)}
    seed = int(train_config["seed"])
    keras.utils.set_random_seed(seed)
    started = time.monotonic()
    parameters = {"search_space": search_space, "max_trials": max_trials, "budget_minutes": budget_minutes,
                  "trial_fraction": trial_fraction, "model_config": model_config, "train_config": train_config}
    with artifacts.publish(hyperparameters_uri, artifacts.HYPERPARAMETERS, producer=PRODUCER, parameters=parameters,
                           inputs=(transformed_examples_uri, transform_graph_uri)) as (tmp, info):
        document = search(tmp, files, transformed_examples_uri, transform_graph_uri, strategy=strategy,
                          image_size=image_size, num_classes=num_classes, model_config=model_config,
                          train_config=train_config, search_space=search_space, max_trials=max_trials,
                          deadline=started + 60.0 * budget_minutes, trial_fraction=trial_fraction)
        document.update({"objective": {"name": OBJECTIVE, "direction": "max"}, "search_space": search_space,
                         "max_trials": max_trials, "budget_minutes": budget_minutes,
                         "trial_fraction": trial_fraction, "seconds": round(time.monotonic() - started, 1)})
        shutil.rmtree(tmp / SEARCH_DIR, ignore_errors=True)  # oracle state and trial checkpoints: not the contract
        (tmp / HYPERPARAMETERS_FILE).write_text(json.dumps(document, indent=2, sort_keys=True, default=str))
        info["extra"] = {"values": document["values"], "best": document["best"], "stopped": document["stopped"]}
    for trial in document["trials"]:
        log.info("tuner trial %s: %s %s=%s (%s)", trial["trial"], trial["values"], OBJECTIVE, trial["objective"],
                 trial["status"])
    log.info("tuner: best %s after %d trial(s), stopped by %s", document["values"], len(document["trials"]),
             document["stopped"])
    return {"values": document["values"], "best": document["best"], "trials": len(document["trials"]),
            "stopped": document["stopped"]}


def search(
    tmp: Path, files: Mapping[str, list[str]], transformed_examples_uri: str, transform_graph_uri: str, *,
    strategy: Any, image_size: int, num_classes: int, model_config: Mapping[str, Any],
    train_config: Mapping[str, Any], search_space: Mapping[str, list[Any]], max_trials: int, deadline: float,
    trial_fraction: float,
) -> dict[str, Any]:
    """The search under the Trainer's precision and strategy: {"values", "best", "trials", "stopped", "trial_plan"}."""
    import keras

    if not search_space:
        return {"values": {}, "best": None, "trials": [], "stopped": STOPPED_NOTHING, "trial_plan": None}
    replicas = int(strategy.num_replicas_in_sync)
    full, class_weights = trainer.plan_run(files[artifacts.TRAIN], transformed_examples_uri, image_size=image_size,
                                           num_classes=num_classes, train_config=train_config, replicas=replicas)
    plan = trial_plan(full, trial_fraction)
    momentum = model_config["bn_momentum"]
    if momentum == "auto":  # fitted to the trial's steps, as the Trainer fits it to its own
        momentum = trainer.fitted_bn_momentum(plan["steps_per_epoch"], plan["steps"])
    # The model exactly as the Trainer builds it: resolved BN momentum, a backbone's input range.
    run_model_config = {**model_config, "bn_momentum": float(momentum),
                        **trainer.encoder_input_range(str(model_config["encoder"]), transform_graph_uri)}
    seconds: dict[str, float] = {}
    hypermodel = make_hypermodel(files, image_size=image_size, num_classes=num_classes, model_config=run_model_config,
                                 train_config=train_config, search_space=search_space, plan=plan,
                                 class_weights=class_weights, replicas=replicas,
                                 precision=trainer.select_precision(str(train_config["mixed_precision"])),
                                 deadline=deadline, seconds=seconds)
    previous_policy = keras.mixed_precision.global_policy()
    try:
        oracle, budget_ended = run_search(tmp, hypermodel, max_trials=max_trials, seed=int(train_config["seed"]),
                                          strategy=strategy)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    trials = trial_records(oracle, search_space, plan["epochs"], seconds)
    completed = [t for t in trials if t["status"] == "completed" and t["objective"] is not None]
    if not completed:
        first = next((t.get("error") for t in trials if t.get("error")), "no trial ran")
        raise TrainingError(f"tuner: none of the {len(trials)} trial(s) completed; the first failure: {first}")
    best = max(completed, key=lambda t: t["objective"])  # the first of equals: the earlier trial
    if budget_ended or (not trials[-1]["complete"] and trials[-1]["status"] == "completed"):
        stopped = STOPPED_BUDGET
    elif len(trials) < max_trials:
        stopped = STOPPED_EXHAUSTED
    else:
        stopped = STOPPED_MAX_TRIALS
    return {"values": dict(best["values"]), "best": {k: best[k] for k in ("trial", "objective", "values")},
            "trials": trials, "stopped": stopped, "trial_plan": plan}


def read_values(hyperparameters_uri: str) -> dict[str, Any]:
    """The `values` of a published Hyperparameters artifact; BadInputError naming the file otherwise."""
    return artifacts.read_json_mapping(Path(hyperparameters_uri) / HYPERPARAMETERS_FILE, "values",
                                       "Hyperparameters artifact")
