"""The `segpipe` command.

Each capability registers its subcommands in one `_add_*` function below; handlers are thin and
call into `components/` or `pipeline/`. Expected failures (bad input, config, data, an unblessed
model) print one line and exit with the code in README's table; only internal failures show a
traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from components.errors import BadInputError, SegpipeError
from pipeline.config import PROFILES, ConfigError, SegpipeConfig, load_config, parse_override

log = logging.getLogger("segpipe")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_NOT_BLESSED = 0, 1, 2, 3


# ------------------------------------------------------------------ shared options


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--config/--profile/--root/--set: the layers of pipeline.config.load_config."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="YAML", help="config file (see pipeline/default.yaml)")
    group.add_argument("--profile", choices=PROFILES, help="profile overlay (default: demo)")
    group.add_argument("--root", help="pipeline root (default ./segpipe_root)")
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.epochs=3 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> SegpipeConfig:
    overrides = dict(parse_override(item) for item in args.overrides)
    if args.root:
        overrides["root"] = args.root
    return load_config(args.config, profile=args.profile, overrides=overrides)


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


# ------------------------------------------------------------------ registration

# Each capability appends its own registrar here.
_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_config_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="Image segmentation pipeline: TFRecords -> TFDV -> TFT -> Keras U-Net -> serving.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _REGISTRARS:
        register(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        # TensorFlow, absl and Beam are chatty at INFO; their warnings still show.
        for name in ("tensorflow", "absl", "apache_beam", "root"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
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
    except KeyboardInterrupt:
        print("segpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
