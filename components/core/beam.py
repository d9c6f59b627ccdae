"""Beam pipeline options from configuration, in one place.

Every Beam step (ExampleGen, StatisticsGen, Transform, Evaluator) builds its pipeline here from
the plain `beam_args` list it was given (config `beam.pipeline_args`), so that the same step runs
in-process here and on Flink, Spark or Dataflow at scale by changing configuration only.

The default is `--runner=FnApiRunner`: Beam 2.72's plain DirectRunner first tries to download its
Prism runner, which must never happen silently on a user's machine. An empty `beam_args` means
the default, never "let Beam pick".
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

log = logging.getLogger(__name__)

DEFAULT_BEAM_ARGS = ("--runner=FnApiRunner",)
_PRISM_RUNNERS = {"directrunner", "direct", "prismrunner", "prism"}


def runner_name(beam_args: Sequence[str]) -> str:
    """The runner named in `beam_args` (`--runner X` or `--runner=X`), else the default's."""
    args = list(beam_args) or list(DEFAULT_BEAM_ARGS)
    name = ""
    for i, arg in enumerate(args):
        if arg.startswith("--runner="):
            name = arg.split("=", 1)[1]
        elif arg == "--runner" and i + 1 < len(args):
            name = args[i + 1]
    return name or DEFAULT_BEAM_ARGS[0].split("=", 1)[1]


def pipeline_options(beam_args: Sequence[str]) -> "PipelineOptions":
    """PipelineOptions from `beam_args`; with no `--runner`, the in-process FnApiRunner."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args) or list(DEFAULT_BEAM_ARGS)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(DEFAULT_BEAM_ARGS[0])
    if runner_name(args).lower() in _PRISM_RUNNERS:
        log.warning(
            "Beam runner %s may download the Prism runner; use --runner=FnApiRunner to stay in-process",
            runner_name(args),
        )
    return PipelineOptions(args)


def beam_pipeline(beam_args: Sequence[str]) -> "beam.Pipeline":
    """A Beam pipeline for `beam_args`; use as `with beam_pipeline(args) as p:` (runs on exit)."""
    import apache_beam as beam

    options = pipeline_options(beam_args)
    log.debug("Beam pipeline with %s", options.get_all_options(drop_default=True))
    return beam.Pipeline(options=options)
