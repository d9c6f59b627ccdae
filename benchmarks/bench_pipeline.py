"""End-to-end `segpipe run` on the demo data: wall time and its split by step.

Each repeat uses a fresh pipeline root (no cache): `segpipe demo-data` writes the demo span (timed
on its own), then `segpipe run --root ROOT` runs the whole DAG with the default configuration
(profile auto: the plan fits the recipe to the data and `train.budget_minutes`) in a subprocess,
exactly as a user types it. The per-step split and each step's share of the run come from the
runner's progress lines (`[i/N] step  state  seconds`); the test-split metrics from the pushed
version's segpipe.json. Goals: the demo run, data generation included, in at most 150 s on 2 CPU
cores, with test pixel accuracy >= 0.95 and foreground IoU >= 0.9.

    python benchmarks/bench_pipeline.py --json pipeline.json
    python benchmarks/bench_pipeline.py --quick       # 48 images, 32 px, one epoch: a smoke test
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plan import segpipe  # noqa: E402  (the one runner of the installed `segpipe` command)

log = logging.getLogger("bench_pipeline")
GOAL_SECONDS = 150.0
METRIC_GOALS = {"pixel_accuracy": 0.95, "foreground_iou": 0.9}
STEP_LINE = re.compile(r"^\[\d+/\d+\]\s+(?P<node>\S+)\s+(?P<state>done|cached|skipped)\s+(?P<seconds>[\d.]+)s")
QUICK_SETTINGS = ["--set", "transform.image_size=32", "--set", "model.base_filters=4", "--set", "model.depth=2",
                  "--set", "train.epochs=1", "--set", "evaluation.pixel_accuracy_threshold=0",
                  "--set", "evaluation.min_foreground_iou=0"]


def parse_steps(stdout: str) -> dict[str, dict[str, Any]]:
    steps = {}
    for line in stdout.splitlines():
        found = STEP_LINE.match(line.strip())
        if found:
            steps[found["node"]] = {"state": found["state"], "seconds": float(found["seconds"])}
    return steps


def pushed_metrics(root: Path) -> dict[str, Any]:
    """Test-split metrics of the highest pushed version (empty when nothing was pushed)."""
    versions = sorted((int(p.name) for p in (root / "serving").glob("*") if p.name.isdigit()), reverse=True)
    if not versions:
        return {}
    info = json.loads((root / "serving" / str(versions[0]) / "segpipe.json").read_text())
    return info.get("metrics", {})


def trained_epochs(root: Path) -> int | None:
    """Epochs the trainer ran (its result.json under the root), or None when it did not finish."""
    found = sorted((root / "artifacts" / "trainer").glob("*/result.json"))
    return json.loads(found[-1].read_text()).get("epochs") if found else None


def one_run(workdir: Path, index: int, args: argparse.Namespace) -> dict[str, Any]:
    root = workdir / f"root-{index}"
    extra = QUICK_SETTINGS if args.quick else []
    gen_seconds, gen = segpipe("demo-data", "--num", str(args.demo_size), "--out", str(root / "data"))
    if gen.returncode:
        raise RuntimeError(f"segpipe demo-data failed:\n{gen.stderr[-3000:]}")
    run_seconds, run = segpipe("run", "--root", str(root), *extra)
    if run.returncode not in (0, 3):
        raise RuntimeError(f"segpipe run exited {run.returncode}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    steps = parse_steps(run.stdout)
    result = {
        "exit_code": run.returncode,
        "demo_data_seconds": round(gen_seconds, 1),
        "run_seconds": round(run_seconds, 1),
        "wall_seconds": round(gen_seconds + run_seconds, 1),
        "steps": steps,
        "steps_total_seconds": round(sum(s["seconds"] for s in steps.values()), 1),
        "metrics": pushed_metrics(root),
        "trainer_epochs": trained_epochs(root),
    }
    total = max(sum(s["seconds"] for s in steps.values()), 1e-9)
    for step in steps.values():
        step["share"] = round(step["seconds"] / total, 3)
    summary = ", ".join(f"{name} {s['seconds']:.0f}s ({s['share']:.0%})" for name, s in steps.items()
                        if s["seconds"] >= 0.5)
    print(f"run {index}: exit {run.returncode}, demo-data {gen_seconds:.0f}s + segpipe run {run_seconds:.0f}s "
          f"= {gen_seconds + run_seconds:.0f}s  ({summary})", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--repeats", type=int, default=1, help="fresh-root runs (the median is reported)")
    parser.add_argument("--demo-size", type=int, default=1000, help="demo images (segpipe run's default: 1000)")
    parser.add_argument("--quick", action="store_true", help="48 images, 32 px, one epoch (a smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the pipeline roots (printed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from segpipe.pipeline.config import load_config

    if args.quick:
        args.demo_size = min(args.demo_size, 48)
    workdir = Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    try:
        runs = [one_run(workdir, i, args) for i in range(args.repeats)]
    finally:
        if args.keep:
            print(f"pipeline roots kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    walls = [r["wall_seconds"] for r in runs]
    results = {
        "quick": args.quick,
        "demo_size": args.demo_size,
        "profile": load_config().profile,
        "goal_seconds": GOAL_SECONDS,
        "metric_goals": METRIC_GOALS,
        "median_wall_seconds": statistics.median(walls),
        "runs": runs,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_at_end": os.getloadavg(),
    }
    metrics = runs[0]["metrics"]
    results["goals"] = {
        "wall_seconds": results["median_wall_seconds"] <= GOAL_SECONDS,
        **{name: metrics.get(name, 0.0) >= goal for name, goal in METRIC_GOALS.items()},
    }
    print(f"median wall time {results['median_wall_seconds']:.0f}s (goal <= {GOAL_SECONDS:.0f}s); "
          + ", ".join(f"{name} {metrics.get(name, 0.0):.3f} (goal >= {goal})" for name, goal in METRIC_GOALS.items())
          + f"; goals met: {all(results['goals'].values())}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
