"""ExampleGen ingestion: peak memory at N and 10N demo images, and Beam runner modes compared.

Each measurement runs in a fresh subprocess so that peaks do not mix: the child imports the stack,
notes its peak resident set (VmHWM from /proc/self/status) as the baseline, runs ExampleGen, and
notes the peak again. The growth from baseline to peak is what ingestion itself costs. Worker
processes (multi_processing) are reported separately from RUSAGE_CHILDREN.

    python benchmarks/bench_ingest_memory.py --n 200            # memory at 200 and 2,000 images
    python benchmarks/bench_ingest_memory.py --n 200 --runners  # plus runner modes on 10N images
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_ingest_memory")

RUNNER_MODES = {
    "in_memory": ["--runner=FnApiRunner"],
    "multi_threading(2)": ["--runner=FnApiRunner", "--direct_running_mode=multi_threading", "--direct_num_workers=2"],
    "multi_processing(2)": ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def peak_rss_mb() -> float:
    """This process's peak resident set so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


def run_child(pattern: str, out: str, beam_args: list[str]) -> dict:
    """Inside the subprocess: baseline after imports, then one ExampleGen run."""
    import apache_beam  # noqa: F401  (imports counted in the baseline, not in ingestion)
    import PIL.Image  # noqa: F401
    import tensorflow  # noqa: F401

    from segpipe.components.example_gen import run_example_gen
    from segpipe.pipeline.config import load_config
    from segpipe.pipeline.pipeline import create_pipeline, nodes_by_name

    cfg = load_config()
    params = {**nodes_by_name(create_pipeline(cfg))["example_gen"].params(cfg), "beam_args": beam_args}

    baseline = peak_rss_mb()
    start = time.perf_counter()
    result = run_example_gen(**{**params, "input_pattern": pattern, "examples_uri": out})
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "workers_peak_mb": children,
            "seconds": seconds, "counts": result["counts"]}


def measure(pattern: str, out: Path, beam_args: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", pattern, str(out), json.dumps(beam_args)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_data(root: Path, num: int) -> str:
    from segpipe.components.tools.demo_data import write_demo_data

    if not (root / "span-1").exists():
        write_demo_data(root, num=num, span=1, seed=1, progress=False)
    return str(root / "span-{SPAN}" / "*.tfrecord*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="N: the small size (the large one is 10N)")
    parser.add_argument("--workdir", help="keep data here between runs (default: a temp folder)")
    parser.add_argument("--runners", action="store_true", help="also time runner modes on the 10N data")
    parser.add_argument("--json", help="also write the measurements here (benchmarks/run_all.py reads it)")
    parser.add_argument("--child", nargs=3, metavar=("PATTERN", "OUT", "BEAM_ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        pattern, out, beam_args = args.child
        print(json.dumps(run_child(pattern, out, json.loads(beam_args))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segpipe-bench-"))
    rows = {}
    for num in (args.n, 10 * args.n):
        pattern = make_data(work / f"data-{num}", num)
        rows[num] = measure(pattern, work / f"examples-{num}", RUNNER_MODES["in_memory"])
        r = rows[num]
        log.info("N=%5d: baseline %.0f MiB, peak %.0f MiB, ingestion +%.0f MiB, %.1f s (%.0f images/s)",
                 num, r["baseline_mb"], r["peak_mb"], r["peak_mb"] - r["baseline_mb"], r["seconds"],
                 num / r["seconds"])
    small, large = (rows[n]["peak_mb"] - rows[n]["baseline_mb"] for n in (args.n, 10 * args.n))
    log.info("ingestion memory 10N / N: %.2f (data 10x)", large / max(small, 1e-6))
    results = {"n": args.n, "sizes": {str(n): r for n, r in rows.items()}, "growth_ratio": large / max(small, 1e-6),
               "runner_modes": {}}
    if args.runners:
        num = 10 * args.n
        pattern = str(work / f"data-{num}" / "span-{SPAN}" / "*.tfrecord*")
        for mode, beam_args in RUNNER_MODES.items():
            r = measure(pattern, work / f"examples-{mode}", beam_args)
            workers = f", worker peak {r['workers_peak_mb']:.0f} MiB" if "processing" in mode else ""
            log.info("%-20s %6.1f s  %6.0f images/s  peak %.0f MiB%s",
                     mode, r["seconds"], num / r["seconds"], r["peak_mb"], workers)
            results["runner_modes"][mode] = r
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    log.info("data and outputs in %s", work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
