"""The `segpipe` command.

Each capability registers its subcommands in one `_add_*` function below; handlers are thin and
call into `components/` or `pipeline/`. Expected failures (bad input, config, data, an unblessed
model) print one line and exit with a code from `components/core/errors.py`; only internal
failures show a traceback.

Every path on the command line is relative to the current directory, like any Unix tool: each path
argument is declared `type=cli_path`, so argparse makes it absolute before it becomes a config
override or a component argument. Relative paths inside a config file keep their own base (see
`SegpipeConfig`'s derived locations).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from segpipe.components.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NOT_BLESSED,
    EXIT_OK,
    BadInputError,
    SegpipeError,
    disk_full_error,
    is_disk_full,
)
from segpipe.pipeline import console
from segpipe.pipeline.config import (
    PROFILES,
    ConfigError,
    SegpipeConfig,
    is_absolute_path,
    load_config,
    parse_override,
)

if TYPE_CHECKING:  # the importers pull in PIL; keep `segpipe --help` light
    from segpipe.components.tools.importers import ImportReport

log = logging.getLogger("segpipe")


# ------------------------------------------------------------------ shared options


def cli_path(text: str) -> str:
    """A path argument made absolute against the current directory (globs and `{SPAN}` kept).

    A URI such as gs://bucket/data is already absolute and passes unchanged.
    """
    if not text.strip():  # abspath("") would quietly mean the current directory
        raise argparse.ArgumentTypeError("must not be empty")
    return text if is_absolute_path(text) else os.path.abspath(text)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--config/--profile/--root/--set: the layers of pipeline.config.load_config."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", type=cli_path, metavar="FILE",
                       help="YAML config file, layered over pipeline/default.yaml")
    group.add_argument("--profile", choices=PROFILES, help="profile overlay (default: `profile` of the config)")
    group.add_argument("--root", type=cli_path, metavar="DIR", help="pipeline root (default: `root` of the config)")
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.epochs=3 (repeatable; paths keep the config's base)",
    )


def config_from_args(args: argparse.Namespace) -> SegpipeConfig:
    """The command's configuration, loaded once: `--config <(...)` is a pipe that reads only once."""
    if getattr(args, "loaded_config", None) is None:
        overrides = dict(parse_override(item) for item in args.overrides)
        if args.root is not None:
            overrides["root"] = args.root
        args.loaded_config = load_config(args.config, profile=args.profile, overrides=overrides)
    return args.loaded_config


def _run_config_show(args: argparse.Namespace) -> int:
    import yaml

    cfg = config_from_args(args)
    data = cfg.as_dict()
    data["beam"]["pipeline_args"] = list(data["beam"]["pipeline_args"])
    data["kubeflow"]["gpu_tolerations"] = list(data["kubeflow"]["gpu_tolerations"])
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    return EXIT_OK


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the effective configuration (after profile and overrides)")
    add_config_options(p)
    p.set_defaults(handler=_run_config_show)


# ------------------------------------------------------------------ serving, predict, evaluate

MODEL_HELP = "a Model artifact, a SavedModel folder, a serving version, or a serving directory (its latest)"


def _serving_dir_from_args(args: argparse.Namespace) -> str:
    return args.serving_dir or config_from_args(args).serving_dir


def _run_serving_list(args: argparse.Namespace) -> int:
    from segpipe.components.pusher import list_versions

    serving_dir = _serving_dir_from_args(args)
    versions = list_versions(serving_dir)
    if not versions:
        print(f"no versions in {serving_dir}")
        return EXIT_OK
    print(f"{'version':>7}  {'pushed_at':20}  {'pixel_acc':>9}  {'fg_iou':>7}  {'mean_iou':>8}  note")
    for entry in versions:
        info = entry["info"]
        metrics = info.get("metrics", {})
        note = f"rollback of {info['rolled_back_from']}" if "rolled_back_from" in info else info.get("run_id") or ""
        cells = [_fmt_metric(metrics.get(k)) for k in ("pixel_accuracy", "foreground_iou", "mean_iou")]
        print(f"{entry['version']:>7}  {info.get('pushed_at', '?'):20}  {cells[0]:>9}  {cells[1]:>7}  {cells[2]:>8}  {note}")
    return EXIT_OK


def _fmt_metric(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _run_serving_rollback(args: argparse.Namespace) -> int:
    from segpipe.components.pusher import rollback

    from segpipe.pipeline.local_runner import record_rollback

    serving_dir = _serving_dir_from_args(args)
    result = rollback(serving_dir, args.version)
    cfg = config_from_args(args)
    if Path(serving_dir).resolve() == Path(cfg.serving_dir).resolve():  # this root's ML Metadata knows it
        record_rollback(cfg, result)
    withdrawn = ", ".join(map(str, result["withdrawn_versions"])) or "none"
    print(f"version {result['version']} now serves the model of version {args.version} ({result['path']}); "
          f"withdrawn: {withdrawn} (their models will not be pushed again)")
    return EXIT_OK


def _owned_folders(cfg: SegpipeConfig) -> list[tuple[str, str]]:
    """(folder, what it is) for the folders segpipe owns under this configuration: the serving dir,
    the artifact store and the data spans. No command writes a user's output inside them."""
    from segpipe.components.core.data_format import list_spans, span_dir
    from segpipe.pipeline.local_runner import ARTIFACTS_DIR

    folders = [(cfg.serving_dir, "the serving directory"), (str(Path(cfg.root) / ARTIFACTS_DIR), "the artifact store")]
    folders += [(str(span_dir(cfg.data_root, span)), "a data span") for span in list_spans(cfg.data_root)]
    return [(folder, what) for folder, what in folders if "://" not in folder]  # local folders only


def _refuse_owned_output(out: str | None, cfg: SegpipeConfig) -> None:
    """BadInputError when a command's --out lies inside a folder segpipe owns (`serving/5` would
    look like a model version to TensorFlow Serving)."""
    if out:
        from segpipe.components.tools.predict import check_output_dir

        check_output_dir(Path(out), (), _owned_folders(cfg))


def _run_predict(args: argparse.Namespace) -> int:
    from segpipe.components.tools.predict import predict_images

    result = predict_images(args.model, args.inputs, args.out, batch_size=args.batch_size,
                            overwrite=args.overwrite, protected=_owned_folders(config_from_args(args)))
    print(f"wrote {len(result['written'])} mask(s) and overlay(s) to {args.out}")
    if result["failed"]:
        for path, reason in result["failed"]:
            print(f"segpipe: {path}: {reason}", file=sys.stderr)
        raise BadInputError(f"{len(result['failed'])} of {result['total']} image(s) failed (listed above)")
    return EXIT_OK


def _evaluation_files(pattern: str) -> list[str]:
    """--data as a glob, one TFRecord file, or an Examples artifact (its test split)."""
    import glob

    from segpipe.components.core.artifacts import TEST, split_files

    if any(c in pattern for c in "*?["):
        files = sorted(glob.glob(pattern))
    elif Path(pattern).is_dir():
        files = split_files(pattern, TEST)
    else:
        files = [pattern] if Path(pattern).is_file() else []
    if not files:
        raise BadInputError(f"--data {pattern}: matches no TFRecord files (a glob, a file or an Examples artifact)")
    return files


def _run_evaluate(args: argparse.Namespace) -> int:
    import json
    import time

    from segpipe.components.evaluator import evaluate_files
    from segpipe.pipeline.pipeline import artifact_name, create_pipeline, nodes_by_name

    cfg = config_from_args(args)
    files = _evaluation_files(args.data)
    _refuse_owned_output(args.out, cfg)
    out = Path(args.out or Path(cfg.root) / "evaluate" / time.strftime("%Y%m%d-%H%M%S"))
    # The pipeline's Evaluator node: the same parameters and output folder names as in a run.
    node = nodes_by_name(create_pipeline(cfg))["evaluator"]
    outputs = {arg: str(out / artifact_name(arg)) for arg in node.outputs}
    result = evaluate_files(args.model, files, baseline_model_uri=args.baseline, **outputs, **node.params(cfg))
    print(json.dumps(result["metrics"], indent=2))
    verdict = "blessed" if result["blessed"] else "NOT blessed: " + "; ".join(result["reasons"])
    print(f"{verdict}\nevaluation written to {out}")
    return EXIT_OK if result["blessed"] else EXIT_NOT_BLESSED


def _add_serving_commands(sub: argparse._SubParsersAction) -> None:
    serving = sub.add_parser("serving", help="list or roll back the versions in the serving directory")
    serving_sub = serving.add_subparsers(dest="serving_command", metavar="ACTION", required=True)
    for name, handler, text in (
        ("list", _run_serving_list, "versions with their metrics"),
        ("rollback", _run_serving_rollback, "re-push VERSION as the new highest version"),
    ):
        p = serving_sub.add_parser(name, help=text)
        if name == "rollback":
            p.add_argument("version", type=int, metavar="VERSION", help="the version whose model to serve again")
        p.add_argument("--serving-dir", type=cli_path, metavar="DIR",
                       help="serving directory (default: push.serving_dir of the config)")
        add_config_options(p)
        p.set_defaults(handler=handler)

    p = sub.add_parser("predict", help="segment image files through the model's serving signature")
    p.add_argument("--model", required=True, type=cli_path, metavar="DIR", help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", type=cli_path, metavar="PATH", help="image files or folders of images")
    p.add_argument("--out", required=True, type=cli_path, metavar="DIR",
                   help="writes <stem>_mask.png and <stem>_overlay.png (never inside a folder segpipe owns, "
                        "never an input folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files even when segpipe did not write them")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: %(default)s)")
    add_config_options(p)
    p.set_defaults(handler=_run_predict)

    p = sub.add_parser(
        "evaluate", help=f"run the evaluator and its gate on raw examples (exit {EXIT_NOT_BLESSED} if not blessed)"
    )
    p.add_argument("--model", required=True, type=cli_path, metavar="DIR", help=MODEL_HELP)
    p.add_argument("--data", required=True, type=cli_path, metavar="PATTERN",
                   help="glob of raw TFRecord files, one such file, or an Examples artifact (its test split)")
    p.add_argument("--baseline", type=cli_path, metavar="DIR",
                   help="baseline model to compare against: " + MODEL_HELP)
    p.add_argument("--out", type=cli_path, metavar="DIR",
                   help="where evaluation/ and blessing/ go (default: <root>/evaluate/<time>)")
    add_config_options(p)
    p.set_defaults(handler=_run_evaluate)


# ------------------------------------------------------------------ data: demo-data, import


def _data_root_from_args(args: argparse.Namespace) -> str:
    return args.out or config_from_args(args).data_root


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < (0 if name == "span" else 1):
            bound = "0" if name == "span" else "1"
            raise BadInputError(f"--{name}: must be at least {bound}, got {value}")


def _run_demo_data(args: argparse.Namespace) -> int:
    from segpipe.components.tools.demo_data import write_demo_data

    _check_positive(args, "num", "span", "shards")
    result = write_demo_data(
        _data_root_from_args(args),
        num=args.num,
        seed=args.seed,
        span=args.span,
        num_shards=args.shards,
        compress=not args.no_compress,
    )
    fg = result["foreground_fraction"]
    print(
        f"wrote {result['count']} demo examples (seed {result['seed']}) to {result['path']}; "
        f"foreground fraction min {fg['min']:.3f} mean {fg['mean']:.3f} max {fg['max']:.3f}"
    )
    return EXIT_OK


def _finish_import(report: ImportReport, skip_bad: bool) -> int:
    print(report.summary())
    num_classes = max(report.labels) + 1
    print(f"labels.json: {report.labels}; train with data.num_classes={num_classes}")
    if report.skipped and not skip_bad:
        raise BadInputError(
            f"{len(report.skipped)} input(s) skipped (each logged above); the rest were imported. "
            "Pass --skip-bad to accept skipped inputs with exit code 0"
        )
    return EXIT_OK


def _run_import_oxford(args: argparse.Namespace) -> int:
    from segpipe.components.tools.importers import import_oxford_pets

    _check_positive(args, "span", "shards")
    report = import_oxford_pets(
        args.dir,
        _data_root_from_args(args),
        span=args.span,
        border=args.border,
        num_shards=args.shards,
        compress=not args.no_compress,
    )
    return _finish_import(report, args.skip_bad)


def _run_import_folders(args: argparse.Namespace) -> int:
    from segpipe.components.tools.importers import import_folders

    _check_positive(args, "span", "shards")
    report = import_folders(
        args.images,
        args.masks,
        _data_root_from_args(args),
        span=args.span,
        labels_path=args.labels,
        num_shards=args.shards,
        compress=not args.no_compress,
    )
    return _finish_import(report, args.skip_bad)


def _add_output_options(p: argparse.ArgumentParser, shards_default: int | None) -> None:
    p.add_argument("--out", type=cli_path, metavar="DIR",
                   help="data root that gets span-N/ (default: data.root of the config)")
    p.add_argument("--span", type=int, help="span number N (default: one past the latest span, 1 if none)")
    p.add_argument("--shards", type=int, default=shards_default, help="number of TFRecord shards"
                   + (" (default: %(default)s)" if shards_default else " (default: one per 500 examples)"))
    p.add_argument("--no-compress", action="store_true", help="write plain .tfrecord instead of GZIP .tfrecord.gz")
    add_config_options(p)


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="write deterministic synthetic segmentation data as a new span")
    p.add_argument("--num", type=int, default=1000, help="number of examples (default: %(default)s)")
    p.add_argument("--seed", type=int, help="random seed (default: the span number); same seed, same bytes")
    _add_output_options(p, None)
    p.set_defaults(handler=_run_demo_data)

    imp = sub.add_parser("import", help="import a labelled image dataset as a new span")
    imp_sub = imp.add_subparsers(dest="source", metavar="SOURCE", required=True)
    p = imp_sub.add_parser("oxford-pets", help="Oxford-IIIT Pet: DIR/images/*.jpg + DIR/annotations/trimaps/*.png")
    p.add_argument("dir", type=cli_path, metavar="DIR", help="the extracted dataset (holding images/ and annotations/)")
    p.add_argument(
        "--border",
        choices=("foreground", "background", "ignore"),
        default="foreground",
        help="class of trimap border pixels (default: %(default)s; ignore = 255, excluded from loss and metrics)",
    )
    p.add_argument("--skip-bad", action="store_true", help="exit 0 even when bad inputs were skipped")
    _add_output_options(p, 1)
    p.set_defaults(handler=_run_import_oxford)

    p = imp_sub.add_parser("folders", help="images and masks in two folders, paired by file stem")
    p.add_argument("--images", required=True, type=cli_path, metavar="DIR", help="image files (PNG, JPEG, ...)")
    p.add_argument("--masks", required=True, type=cli_path, metavar="DIR",
                   help="mask files (PNG etc.: class ids, or binary 0/255)")
    p.add_argument("--labels", type=cli_path, metavar="FILE",
                   help="labels.json mapping class id -> name (default: the ids found in the masks)")
    p.add_argument("--skip-bad", action="store_true", help="exit 0 even when bad inputs were skipped")
    _add_output_options(p, 1)
    p.set_defaults(handler=_run_import_folders)


# ------------------------------------------------------------------ pipeline: run, runs, lineage, gc, kubeflow

_RUN_FLAGS = {  # `segpipe run` flag -> run parameter (pipeline.pipeline.RUN_PARAMETERS)
    "data": "input_pattern", "span": "span", "threshold": "pixel_accuracy_threshold",
    "epochs": "epochs", "image_size": "image_size",
}


def _pipeline_config(args: argparse.Namespace) -> SegpipeConfig:
    """Config layers plus the run flags (the same run parameters Kubeflow exposes)."""
    from segpipe.pipeline.config import with_overrides
    from segpipe.pipeline.pipeline import RUN_PARAMETERS

    cfg = config_from_args(args)
    overrides = {RUN_PARAMETERS[param][0]: getattr(args, flag)
                 for flag, param in _RUN_FLAGS.items() if getattr(args, flag, None) is not None}
    if getattr(args, "force", False):  # the run parameter Kubeflow exposes as require_new_span=false
        overrides[RUN_PARAMETERS["require_new_span"][0]] = False
    return with_overrides(cfg, overrides) if overrides else cfg


def _run_pipeline_cmd(args: argparse.Namespace) -> int:
    from segpipe.components.core.errors import NotBlessedError
    from segpipe.pipeline.local_runner import absolute_root, ensure_demo_data, run_pipeline

    cfg = absolute_root(_pipeline_config(args))
    demo = ensure_demo_data(cfg, asked=args.demo, num=args.demo_size)
    if demo:
        print(f"no data given: generated the built-in demo dataset ({args.demo_size} synthetic images) at {demo}; "
              "pass --data PATTERN to train on your own")
    result = run_pipeline(cfg, no_cache=args.no_cache, progress=print)
    print(f"run {result.run_id}: {result.status}" + (f" ({result.message})" if result.message else ""))
    if result.report_path:
        print(f"report: {result.report_path}")
    if result.pushed_path:
        print(f"pushed model: {result.pushed_path}")
    if result.status == "not_blessed":
        raise NotBlessedError(f"run {result.run_id}: {result.message}")
    return result.exit_code


def _existing_metadata(args: argparse.Namespace):
    """The root's ML Metadata store; a read command never creates one on a root without runs."""

    from segpipe.pipeline.metadata import Metadata

    cfg = config_from_args(args)
    _require_metadata(cfg)
    return Metadata.from_config(cfg)


def _require_metadata(cfg: SegpipeConfig) -> None:
    if not cfg.metadata.mysql_host and not Path(cfg.sqlite_path).is_file():
        raise BadInputError(f"{cfg.sqlite_path}: no ML Metadata store (no run on this pipeline root yet)")


def _run_runs_cmd(args: argparse.Namespace) -> int:
    import json
    import time

    if args.limit < 1:
        raise BadInputError(f"--limit: must be at least 1, got {args.limit}")
    runs = _existing_metadata(args).list_runs()[: args.limit]
    if not runs:
        print("no runs recorded")
        return EXIT_OK
    print(f"{'run':32}  {'started':19}  {'status':12}  {'secs':>6}  {'blessed':7}  {'pix_acc':>7}  {'fg_iou':>7}  version")
    for run in runs:
        metrics = json.loads(run["metrics"]) if isinstance(run.get("metrics"), str) else {}
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run.get("started", 0)))
        blessed = {True: "yes", False: "no"}.get(run.get("blessed"), "-")
        print(f"{run['run_id']:32}  {started:19}  {run.get('status', '?'):12}  {run.get('duration', 0):6.0f}  "
              f"{blessed:7}  {_fmt_metric(metrics.get('pixel_accuracy')):>7}  "
              f"{_fmt_metric(metrics.get('foreground_iou')):>7}  {run.get('version', '-')}")
    return EXIT_OK


def _run_lineage_cmd(args: argparse.Namespace) -> int:
    import json

    meta = _existing_metadata(args)
    artifact = meta.find_artifact(args.artifact)
    if artifact is None:
        raise BadInputError(f"{args.artifact}: no such artifact id or path in ML Metadata")
    for row in meta.lineage(artifact.id):
        indent = "  " * row["depth"]
        if row["repeat"]:
            print(f"{indent}{row['type']} #{row['artifact_id']} {row['uri']} (see above)")
            continue
        producer = row["producer"]
        made = (f"<- {producer['node']} (execution {producer['execution_id']}, run {producer['run_id']})"
                if producer else "<- (external)")
        print(f"{indent}{row['type']} #{row['artifact_id']} {row['uri']} [{row['state']}] {made}")
        if producer and producer["node"] == "example_gen":
            params = json.loads(producer["parameters"] or "{}")
            spans = (json.loads(producer["result"] or "{}") or {}).get("spans")
            print(f"{indent}  data: {params.get('input_pattern')} spans {spans}")
    return EXIT_OK


def _run_gc_cmd(args: argparse.Namespace) -> int:
    from segpipe.pipeline.local_runner import collect_garbage

    if args.keep < 0:  # list_runs()[:-1] would keep all but the oldest run
        raise BadInputError(f"--keep: must be at least 0, got {args.keep}")
    cfg = config_from_args(args)
    _require_metadata(cfg)  # gc on a root without runs must not create one
    result = collect_garbage(cfg, keep=args.keep)
    for path in result.removed:
        print(f"removed {path}")
    print(f"freed {result.freed_bytes} bytes ({result.freed_bytes / 2**20:.1f} MiB) in {len(result.removed)} artifact(s)")
    return EXIT_OK


def _run_compile_cmd(args: argparse.Namespace) -> int:
    from segpipe.components.core.artifacts import temp_sibling
    from segpipe.pipeline.kubeflow import compile_pipeline

    out = Path(args.out_file)
    if out.is_dir():
        raise BadInputError(f"--out-file {out}: is a folder; give a file name, e.g. {out / 'pipeline.yaml'}")
    if out.suffix not in (".yaml", ".yml"):
        raise BadInputError(f"--out-file {out}: must end in .yaml (Kubeflow Pipelines reads YAML)")
    cfg = config_from_args(args)
    tmp = temp_sibling(out)
    tmp = tmp.with_name(tmp.name + out.suffix)  # kfp picks the format by the suffix
    try:  # compiled beside the target and renamed: a kill never leaves half a pipeline file
        compile_pipeline(cfg, str(tmp), image=args.image)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}")
    return EXIT_OK


def _kfp_arguments(args: argparse.Namespace) -> dict[str, object]:
    from segpipe.pipeline.pipeline import RUN_PARAMETERS

    values = dict(parse_override(item) for item in args.params)
    for name in values:
        if name not in RUN_PARAMETERS and name != "profile":
            raise BadInputError(f"--param {name}: not a pipeline parameter ({', '.join(['profile', *RUN_PARAMETERS])})")
    return values


def _run_submit_cmd(args: argparse.Namespace, schedule: bool = False) -> int:
    import tempfile

    from segpipe.pipeline import kubeflow

    cfg = config_from_args(args)
    arguments = _kfp_arguments(args)
    # urllib3 logs each retry of an unreachable host; the one-line error below says it once.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or kubeflow.compile_pipeline(cfg, f"{tmp}/pipeline.yaml", image=args.image)
        try:
            client = kubeflow.kfp_client(args.host, args.namespace)
            if schedule:
                experiment = client.create_experiment(args.experiment, namespace=args.namespace)
                made = client.create_recurring_run(
                    experiment_id=experiment.experiment_id, job_name=args.name or f"{cfg.pipeline_name}-retrain",
                    cron_expression=kubeflow.normalize_cron(args.cron), pipeline_package_path=package,
                    params=arguments, enable_caching=True,
                )
                print(f"scheduled recurring run {made.recurring_run_id} ({args.cron}) on {args.host}")
            else:
                made = client.create_run_from_pipeline_package(
                    package, arguments=arguments, run_name=args.name, experiment_name=args.experiment,
                    namespace=args.namespace, enable_caching=True,
                )
                print(f"submitted run {made.run_id} to {args.host}")
        except (BadInputError, ConfigError):
            raise
        except Exception as exc:  # any client/transport error becomes one line, exit 2
            raise BadInputError(kubeflow.describe_api_error(args.host, exc)) from None
    return EXIT_OK


def _add_kfp_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="Kubeflow Pipelines API URL, e.g. https://kubeflow.example.com/pipeline")
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
    p.add_argument("--experiment", default="segpipe", help="experiment name (default: %(default)s)")
    p.add_argument("--name", help="run / recurring run name")
    p.add_argument("--package", type=cli_path, metavar="FILE",
                   help="a compiled pipeline YAML (default: compile from the config now)")
    p.add_argument("--image", help="container image (default: kubeflow.image of the config)")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter, e.g. --param span=3 (repeatable)")


def _add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the whole pipeline here (demo data when none is configured)")
    p.add_argument("--data", type=cli_path, metavar="PATTERN",
                   help="raw TFRecord files with {SPAN}, e.g. 'data/span-{SPAN}/*' (default: data.input_pattern)")
    p.add_argument("--span", type=int, help="the latest span to read (default: data.span, null = the newest)")
    p.add_argument("--threshold", type=float, help="pixel accuracy the gate needs (default: evaluation.pixel_accuracy_threshold)")
    p.add_argument("--epochs", type=int, help="training epochs (default: train.epochs)")
    p.add_argument("--image-size", type=int, help="square model input in pixels (default: transform.image_size)")
    p.add_argument("--no-cache", action="store_true", help="rerun every step even when a cached result matches")
    p.add_argument("--force", action="store_true", help="train even when no span is newer than every serving version's (data.require_new_span=false)")
    p.add_argument("--demo", action="store_true",
                   help="train on the built-in demo data (generated under <root>/data if missing); "
                        "a plain `segpipe run` naming no data does the same")
    p.add_argument("--demo-size", type=int, default=1000,
                   help="images in the demo span when it is generated (default: %(default)s)")
    add_config_options(p)
    p.set_defaults(handler=_run_pipeline_cmd)

    p = sub.add_parser("runs", help="list recorded runs with status, metrics and blessing")
    p.add_argument("--limit", type=int, default=20, help="newest runs to list (default: %(default)s)")
    add_config_options(p)
    p.set_defaults(handler=_run_runs_cmd)

    p = sub.add_parser("lineage", help="what produced an artifact, and from which data")
    p.add_argument("artifact", metavar="ARTIFACT", help="an artifact id, or a path inside an artifact")
    add_config_options(p)
    p.set_defaults(handler=_run_lineage_cmd)

    p = sub.add_parser("gc", help="remove artifacts no pushed version and none of the last N runs need")
    p.add_argument("--keep", type=int, default=5, help="newest runs whose artifacts stay (default: %(default)s)")
    add_config_options(p)
    p.set_defaults(handler=_run_gc_cmd)

    p = sub.add_parser("compile", help="compile the pipeline to Kubeflow Pipelines v2 YAML")
    p.add_argument("--out-file", type=cli_path, default="pipeline.yaml", metavar="FILE",
                   help="where to write the pipeline YAML (default: %(default)s)")
    p.add_argument("--image", help="container image (default: kubeflow.image of the config)")
    add_config_options(p)
    p.set_defaults(handler=_run_compile_cmd)

    p = sub.add_parser("submit", help="create a run on a Kubeflow Pipelines deployment")
    _add_kfp_client_options(p)
    add_config_options(p)
    p.set_defaults(handler=_run_submit_cmd)

    p = sub.add_parser("schedule", help="create a recurring (retraining) run on Kubeflow Pipelines")
    _add_kfp_client_options(p)
    p.add_argument("--cron", required=True, metavar="SCHEDULE", help='cron schedule, e.g. "0 3 * * *" (5 or 6 fields)')
    add_config_options(p)
    p.set_defaults(handler=lambda args: _run_submit_cmd(args, schedule=True))


# ------------------------------------------------------------------ schema: infer


def _run_schema_infer(args: argparse.Namespace) -> int:
    from segpipe.components.schema_gen import infer_schema_draft

    result = infer_schema_draft(args.stats, args.out_file)
    print(f"wrote a draft schema with features {', '.join(result['features'])} to {result['path']}")
    print("review it, then set validation.schema_path to use it")
    return EXIT_OK


def _add_schema_commands(sub: argparse._SubParsersAction) -> None:
    schema = sub.add_parser("schema", help="draft a schema from statistics (the curated one is schemas/schema.pbtxt)")
    schema_sub = schema.add_subparsers(dest="schema_command", metavar="SUBCOMMAND", required=True)
    p = schema_sub.add_parser("infer", help="write a draft schema inferred by TFDV from statistics")
    p.add_argument("--stats", required=True, type=cli_path, metavar="PATH",
                   help="a stats.pb file or a Statistics artifact folder (its train split)")
    p.add_argument("--out-file", required=True, type=cli_path, metavar="FILE",
                   help="where to write the draft schema text proto (atomically)")
    p.set_defaults(handler=_run_schema_infer)


# ------------------------------------------------------------------ train


def _run_train(args: argparse.Namespace) -> int:
    import json

    from segpipe.components.core.artifacts import KERAS_MODEL_FILE, fingerprint
    from segpipe.components.core.serving import latest_blessed_model
    from segpipe.components.trainer import train_model
    from segpipe.pipeline.pipeline import (
        PLAN_INPUT, artifact_name, create_pipeline, nodes_by_name, planned_config, scratch_dir,
    )

    cfg = config_from_args(args)
    _refuse_owned_output(args.out, cfg)
    base_model = args.model
    if base_model and not cfg.train.warm_start:
        raise BadInputError("--model: warm start is off (train.warm_start: false); drop --model or enable it")
    if base_model and not (Path(base_model) / KERAS_MODEL_FILE).is_file():
        base_model = latest_blessed_model(base_model) or base_model  # a serving dir: its latest version
    # The pipeline's Trainer node: the same parameters and output folder names as in a run.
    node = nodes_by_name(create_pipeline(cfg))["trainer"]
    if args.plan:  # the run's choices, below whatever this command's --config/--set give explicitly
        cfg = planned_config(node, cfg, {PLAN_INPUT: args.plan})
    elif cfg.profile == "auto":
        log.warning("profile auto without --plan: training with the configuration's own values; pass "
                    "--plan <root>/artifacts/plan/<key>/plan to train with the choices a run planned")
    outputs = {arg: os.path.join(args.out, artifact_name(arg)) for arg in node.outputs}
    key = fingerprint("cli-train", args.transformed, args.transform_graph, base_model, args.out, cfg.as_dict())
    result = train_model(
        transformed_examples_uri=args.transformed,
        transform_graph_uri=args.transform_graph,
        base_model_uri=base_model,
        backup_dir=args.backup_dir or scratch_dir(cfg, key),
        **outputs,
        **node.params(cfg),
    )
    print(json.dumps(result, indent=2))
    print(f"wrote {', '.join(outputs.values())}")
    return EXIT_OK


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run the trainer on existing Transform outputs (resumes if killed)")
    p.add_argument("--transformed", required=True, type=cli_path, metavar="DIR", help="TransformedExamples artifact")
    p.add_argument("--transform-graph", required=True, type=cli_path, metavar="DIR", help="TransformGraph artifact")
    p.add_argument("--out", required=True, type=cli_path, metavar="DIR",
                   help="writes the Model artifact to DIR/model and the ModelRun (logs, curves) to DIR/model_run")
    p.add_argument("--model", type=cli_path, metavar="DIR",
                   help="warm start from this Model artifact, serving version or serving directory (its latest)")
    p.add_argument("--backup-dir", type=cli_path, metavar="DIR",
                   help="resume state (default: a folder under <root>/.trainer_backups/ keyed by the arguments)")
    p.add_argument("--plan", type=cli_path, metavar="DIR",
                   help="apply this Plan artifact's choices (a run's <root>/artifacts/plan/<key>/plan); "
                        "--config/--set still win")
    add_config_options(p)
    p.set_defaults(handler=_run_train)


# ------------------------------------------------------------------ inference and deployment: infer, deploy


def _run_infer(args: argparse.Namespace) -> int:
    from segpipe.components.tools.infer import FAILURES_FILE, infer_records, resolve_data

    cfg = config_from_args(args)
    result = infer_records(args.model, resolve_data(args.data), args.out, beam_args=list(cfg.beam.pipeline_args),
                           protected=_owned_folders(cfg))
    version = f" (serving version {result['model_version']})" if result["model_version"] else ""
    print(f"wrote {result['written']} mask(s) and their predictions from {result['model']}{version} to {args.out}")
    failed = result["failed"]
    if failed:  # each was logged with its reason
        names = list(dict.fromkeys(item["id"] if item["id"] is not None else f"a record of {item['file']}"
                                   for item in failed))
        named = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise BadInputError(f"{len(failed)} of {result['total']} record(s) skipped: {named} "
                            f"(listed above and in {Path(args.out) / FAILURES_FILE}); the rest were written")
    return EXIT_OK


def _run_deploy(args: argparse.Namespace) -> int:
    from segpipe.components.tools.deploy import write_deployment
    from segpipe.pipeline.kubeflow import parse_toleration

    cfg = config_from_args(args)
    kf = cfg.kubeflow
    try:
        tolerations = [parse_toleration(t) for t in kf.gpu_tolerations]
    except ValueError as exc:  # names the field and the value
        raise BadInputError(str(exc)) from None
    result = write_deployment(
        _serving_dir_from_args(args), args.out, model_name=cfg.pipeline_name, keep_last=cfg.push.keep_last,
        storage_uri=args.storage_uri, cpu_request=kf.cpu_request, memory_request=kf.memory_request,
        accelerator_type=kf.accelerator_type, accelerator_limit=kf.accelerator_limit,
        node_selector=kf.gpu_node_selector, tolerations=tolerations, protected=_owned_folders(cfg),
    )
    print(f"wrote {result['models_config']} and {result['inference_service']}: version policy {result['policy']}, "
          f"serving versions {', '.join(map(str, result['versions']))}")
    if args.storage_uri is None:
        print(f"storageUri is {result['storage_uri']}, a path on this machine: pass --storage-uri with the "
              "URI a cluster reads the serving directory from (gs://, s3://, pvc://...)")
    return EXIT_OK


def _add_deployment_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="batch inference on raw TFRecords with Beam RunInference (masks + InferenceResult)")
    p.add_argument("--model", required=True, type=cli_path, metavar="DIR", help=MODEL_HELP)
    p.add_argument("--data", required=True, type=cli_path, metavar="PATTERN",
                   help="glob of raw TFRecord files (quote it), one such file, or a folder of them; masks are not needed")
    p.add_argument("--out", required=True, type=cli_path, metavar="DIR",
                   help="the InferenceResult: masks/, predictions-*.tfrecord.gz, failures.json (a new or empty "
                        "folder, or an earlier result to replace)")
    add_config_options(p)
    p.set_defaults(handler=_run_infer)

    p = sub.add_parser("deploy", help="write a TensorFlow Serving models.config and a KServe InferenceService")
    p.add_argument("--serving-dir", type=cli_path, metavar="DIR",
                   help="serving directory (default: push.serving_dir of the config)")
    p.add_argument("--out", required=True, type=cli_path, metavar="DIR",
                   help="writes models.config and inferenceservice.yaml")
    p.add_argument("--storage-uri", metavar="URI",
                   help="where the cluster reads the serving directory, e.g. gs://bucket/serving or "
                        "pvc://models/serving (default: file://<serving dir>)")
    add_config_options(p)
    p.set_defaults(handler=_run_deploy)


# ------------------------------------------------------------------ registration


_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_config_commands,
    _add_data_commands,
    _add_serving_commands,
    _add_pipeline_commands,
    _add_schema_commands,
    _add_train_commands,
    _add_deployment_commands,
]


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: `compile --out x` must not silently mean `--out-file x`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="segpipe",
        description="Image segmentation pipeline: TFRecords -> TFDV -> TFT -> Keras U-Net -> serving.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show library output (TensorFlow, Beam, ...) and debug lines on the terminal")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _REGISTRARS:
        register(sub)
    return parser


def _log_path(args: argparse.Namespace) -> Path | None:
    """The command's log file under its pipeline root (pipeline/console.py); None without a root."""
    if not hasattr(args, "overrides"):  # a command without configuration options has no root
        return None
    return console.command_log_path(config_from_args(args).root, args.command, create=args.command == "run")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Before any handler imports TensorFlow; the session ends before the messages below print.
        with console.session(verbose=args.verbose, log_path=_log_path(args)):
            return int(args.handler(args) or EXIT_OK)
    except ConfigError as exc:
        print(f"segpipe: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BadInputError as exc:
        print(f"segpipe: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SegpipeError as exc:
        print(f"segpipe: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if is_disk_full(exc):
            print(f"segpipe: {disk_full_error(exc, 'running segpipe ' + args.command)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if exc.filename is None:  # not about a path the user gave: an internal failure, traceback
            raise
        # An output folder that cannot be created or written (read-only, a file in the way, ...).
        print(f"segpipe: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("segpipe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a full disk anywhere (a rollback's copy, a checkpoint write) is one line
        if not is_disk_full(exc):
            raise
        print(f"segpipe: {disk_full_error(exc, 'running segpipe ' + args.command)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def entry() -> None:
    """The `segpipe` command: main(), then the process ends as soon as its output is flushed.

    Python's own shutdown of a process that ran TensorFlow takes 1-4 s more (thread pools, module
    teardown) after every file is closed and every result reported; a failure that escapes main()
    still gets Python's traceback and exit code.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
