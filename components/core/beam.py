"""Beam pipeline options from configuration, in one place.

Every Beam step (ExampleGen, StatisticsGen, Transform, Evaluator) builds its pipeline here from
the plain `beam_args` list it was given (config `beam.pipeline_args`), so that the same step runs
in-process here and on Flink, Spark or Dataflow at scale by changing configuration only.

The default is `--runner=FnApiRunner`: Beam 2.72's plain DirectRunner first tries to download its
Prism runner, which must never happen silently on a user's machine. An empty `beam_args` means
the default, never "let Beam pick".

Each pipeline reports when it has run: one INFO line with its step's name, its seconds and the
counters in segpipe's own namespace (`segpipe.*`, e.g. Transform's records per split); every
counter, the libraries' too, at DEBUG.

On a portable runner (Flink, Spark, Dataflow, or `--runner=PortableRunner` against a job service)
the steps' functions are pickled and run by SDK workers in other processes, each in a working
directory of its own: every path a step hands to a transform goes through `worker_path`.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

log = logging.getLogger(__name__)

DEFAULT_BEAM_ARGS = ("--runner=FnApiRunner",)
_PRISM_RUNNERS = {"directrunner", "direct", "prismrunner", "prism"}
OWN_NAMESPACE = "segpipe"  # counters in it (e.g. segpipe.transform) are reported on the terminal


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


def worker_path(path: str | os.PathLike) -> str:
    """`path` as a Beam worker must get it: absolute, because a worker resolves a relative path
    against its own working directory, not the launcher's; a URI (gs://...) unchanged."""
    text = os.fspath(path)
    return text if "://" in text else os.path.abspath(text)


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


def beam_pipeline(beam_args: Sequence[str], name: str | None = None) -> "beam.Pipeline":
    """A Beam pipeline for `beam_args`; use as `with beam_pipeline(args) as p:` (runs on exit).

    Once it has run, it logs one line: `name` (default: the calling module's, e.g. `transform`),
    the seconds it took and the counters it recorded (`report_counters`).
    """
    options = pipeline_options(beam_args)
    log.debug("Beam pipeline with %s", options.get_all_options(drop_default=True))
    pipeline = _reporting_pipeline_class()(options=options)
    # The step that built it names the report line: sys._getframe(1) is the caller of this function.
    pipeline.report_name = name or sys._getframe(1).f_globals.get("__name__", "beam").rsplit(".", 1)[-1]
    return pipeline


def counter_values(result: "beam.runners.runner.PipelineResult") -> dict[tuple[str, str], int]:
    """Every counter of a finished pipeline, summed over steps, by (namespace, name)."""
    totals: dict[tuple[str, str], int] = {}
    for counter in result.metrics().query()["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        key = (counter.key.metric.namespace, counter.key.metric.name)
        totals[key] = totals.get(key, 0) + int(value or 0)
    return totals


def report_counters(name: str, result: "beam.runners.runner.PipelineResult", seconds: float) -> None:
    """`transform: Beam pipeline done in 1.8s; records[train]=53, records[eval]=2` for segpipe's counters.

    The libraries' own counters (TFDV, TFT, RunInference) go to the DEBUG line only.
    """
    try:
        totals = counter_values(result)
    except Exception as exc:  # a runner without metrics support: the step's own lines still report
        log.debug("%s: no Beam metrics (%s)", name, exc)
        totals = {}
    log.debug("%s: Beam counters %s", name, {f"{ns}/{n}": v for (ns, n), v in sorted(totals.items())})
    own = ", ".join(f"{n}={v}" for (ns, n), v in totals.items() if ns == OWN_NAMESPACE or ns.startswith(OWN_NAMESPACE + "."))
    log.info("%s: Beam pipeline done in %.1fs%s", name, seconds, f"; {own}" if own else "")


@functools.cache
def _reporting_pipeline_class() -> type:
    import apache_beam as beam
    from apache_beam.runners.runner import PipelineState

    class ReportingPipeline(beam.Pipeline):
        """beam.Pipeline that reports its counters once run() returns a finished pipeline."""

        report_name = "beam"

        def run(self, test_runner_api: bool | str = "AUTO") -> Any:
            started = time.monotonic()
            result = super().run(test_runner_api)
            if PipelineState.is_terminal(result.state):
                report_counters(self.report_name, result, time.monotonic() - started)
                return result
            # A portable runner returns while the job runs: report once a wait sees it finish.
            wait = result.wait_until_finish
            reported = []

            def wait_and_report(duration: int | None = None) -> Any:
                state = wait(duration)
                if PipelineState.is_terminal(result.state) and not reported:
                    reported.append(True)
                    report_counters(self.report_name, result, time.monotonic() - started)
                return state

            result.wait_until_finish = wait_and_report
            return result

    return ReportingPipeline
