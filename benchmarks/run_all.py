"""Run every segpipe benchmark and write one Markdown table (and JSON) of side-by-side ratios.

Each benchmark script runs as a subprocess with `--json`; this script reads its JSON, picks the
figures the issues set goals for, and writes `results.md` (machine description first, then one
row per measure: measured, baseline, ratio, goal, pass/fail/reported) and `results.json` (the
rows plus every script's full output).

    python benchmarks/run_all.py --out benchmarks/results          # the full run (README's table)
    python benchmarks/run_all.py --quick --out /tmp/bench-smoke    # small sizes: a smoke test
    python benchmarks/run_all.py --only serving pipeline           # a subset
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
# The DAG's order (pipeline/pipeline.py), for listing bench_pipeline's per-step times.
PIPELINE_ORDER = ("example_gen", "statistics_gen", "schema_gen", "previous_statistics", "example_validator", "plan",
                  "transform", "latest_model", "trainer", "evaluator", "infra_validator", "pusher", "bulk_inferrer")
log = logging.getLogger("run_all")


@dataclass
class Row:
    """One line of the table. `ratio` is measured / baseline; `status` pass, fail or reported."""

    benchmark: str
    measured: str
    baseline: str
    ratio: float | None
    goal: str
    status: str


@dataclass(frozen=True)
class Bench:
    script: str
    full: tuple[str, ...]  # arguments of the full run
    quick: tuple[str, ...] | None  # arguments of the smoke test; None: no smoke-test sizes (--quick skips it)
    rows: Callable[[dict[str, Any]], list[Row]]


def check(ratio: float, goal: str) -> str:
    """'pass'/'fail' against a goal written as '>= x' or '<= x'."""
    op, value = goal.split()
    return "pass" if (ratio >= float(value) if op == ">=" else ratio <= float(value)) else "fail"


# ------------------------------------------------------------------ extracting rows per script


def transform_rows(data: dict[str, Any]) -> list[Row]:
    rate, n, size = data["images_per_second"], data["num_images"], data["image_size"]
    base = f"tf.data {rate['tf_data']:.1f} img/s"
    rows = [
        Row(f"Transform (TFT, {' '.join(data['beam_args'])}) vs plain tf.data, {n} images at {size} px, wall time",
            f"{rate['tft']:.1f} img/s", base, data["ratio_tft_vs_tf_data"], ">= 0.5",
            check(data["ratio_tft_vs_tf_data"], ">= 0.5")),
    ]
    if "ratio_tft_vs_tf_data_by_cpu" in data:
        cpu = data["cpu_seconds"]
        rows.append(Row("Transform vs plain tf.data, CPU seconds used (tf.data / TFT)", f"{cpu['tft']:.1f} s CPU",
                        f"tf.data {cpu['tf_data']:.1f} s CPU", data["ratio_tft_vs_tf_data_by_cpu"], "-", "reported"))
    for key in sorted(data):
        variant = key.removeprefix("ratio_").removesuffix("_vs_tf_data")
        if key.startswith("ratio_") and key.endswith("_vs_tf_data") and variant != "tft" and variant in rate:
            label = variant.removeprefix("tft_").replace("_", " ")
            rows.append(Row(f"Transform, {label} variant, vs plain tf.data", f"{rate[variant]:.1f} img/s", base,
                            data[key], "-", "reported"))
    if "memory" in data:
        small, large = data["memory"]
        ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        goal = data.get("memory_ratio_goal")
        rows.append(Row(f"Transform peak memory, {large['num']} vs {small['num']} images",
                        f"{large['peak_rss_mib']:.0f} MiB", f"{small['peak_rss_mib']:.0f} MiB", ratio,
                        f"<= {goal}" if goal else "-", check(ratio, f"<= {goal}") if goal else "reported"))
    return rows


def trainer_rows(data: dict[str, Any]) -> list[Row]:
    p = data["pipeline"]
    rows = [Row("Trainer input: tf.data over transformed TFRecords vs in-memory numpy (median train img/s)",
                f"{p['tfdata_images_per_s']} img/s", f"numpy {p['numpy_images_per_s']} img/s", p["ratio"], ">= 0.95",
                check(p["ratio"], ">= 0.95"))]
    if "memory" in data:
        m = data["memory"]
        rows.append(Row(f"Training peak memory (trainer tf.data), {10 * m['n']} vs {m['n']} images",
                        f"{m['tfdata']['peak_mb_10n']} MB", f"{m['tfdata']['peak_mb_n']} MB", m["tfdata"]["ratio"],
                        "<= 1.2", check(m["tfdata"]["ratio"], "<= 1.2")))
        rows.append(Row(f"Training peak memory (numpy, the tutorial's way), {10 * m['n']} vs {m['n']} images",
                        f"{m['numpy']['peak_mb_10n']} MB", f"{m['numpy']['peak_mb_n']} MB", m["numpy"]["ratio"],
                        "-", "reported"))
    if "frameworks" in data:
        f = data["frameworks"]
        rows.append(Row(f"Training FLOP/s of the default run's demo model (batch {f.get('batch_size', '?')}, "
                        f"batch norm {f.get('batch_norm', False)}), fraction of the CPU's fp32 peak",
                        f"{f['segpipe']['fraction_of_peak']:.1%}", f"peak {f['cpu']['peak_gflops']} GFLOP/s ({f['cpu'].get('peak_source', 'computed from /proc/cpuinfo')})", None,
                        ">= 35%", check(f["segpipe"]["fraction_of_peak"], ">= 0.35")))
        if f.get("tf_matmul"):  # the stack's best-tuned kernel against the same peak: a check on the peak
            mm = f["tf_matmul"]
            rows.append(Row(f"  TensorFlow fp32 matmul ({mm['size']}^2, all cores), fraction of the same peak",
                            f"{mm['fraction_of_peak']:.1%}", f"{mm['gflops']} GFLOP/s", None, "<= 100%",
                            check(mm["fraction_of_peak"], "<= 1.0")))
        rows.append(Row("Same model and input: segpipe (Keras 3) vs tf_keras 2 (TFX's Trainer), train images/s",
                        f"{f['segpipe']['images_per_s']} img/s", f"tf_keras {f['tf_keras']['images_per_s']} img/s",
                        f["ratio"], "-", "reported"))
    if "stalls" in data:
        st = data["stalls"]
        a, b = st["one_iterator"], st["per_epoch_iterators"]
        rows.append(Row(f"Epochs with validation: one input iterator per fit vs a new one per epoch, seconds of "
                        f"{a['epochs']} epochs (stalled epochs, > 25% of the CPU idle: {a['stalled_epochs']} vs "
                        f"{b['stalled_epochs']})", f"{a['total_seconds']} s", f"per epoch {b['total_seconds']} s",
                        st["ratio"], "-", "reported"))
    for name, d in (data.get("time_to_quality") or {}).get("datasets", {}).items():
        rows += time_to_quality_rows(name, d)
    for group in ("in_process", "subprocess"):  # each variant of the training step against its baseline
        for name, v in (data.get("variants") or {}).get(group, {}).items():
            if name != "baseline":
                rows.append(Row(f"Training step variant {name} (batch {v['batch_size']}) vs baseline, images/s",
                                f"{v['images_per_s']} img/s ({v['fraction_of_peak']:.1%} of peak)",
                                f"{data['variants'][group]['baseline']['images_per_s']} img/s",
                                v["ratio_to_baseline"], "-", "reported"))
    return rows


def time_to_quality_rows(name: str, d: dict[str, Any]) -> list[Row]:
    """bench_trainer.py section 7: segpipe's seconds to each eval-IoU target against each tf_keras
    side's (a side that never reached it: its whole run, and the ratio as a bound)."""
    def when(side: dict[str, Any], target: str) -> str:
        hit = side["reached"][target]
        return f"{hit['seconds']} s ({hit['steps']} steps)" if hit else f"never in {side['seconds']} s ({side['steps']} steps)"

    rows = []
    for target, iou in d["target_iou"].items():
        of = "the best of any side" if target == "any_side" else "segpipe's best"
        for side, label in (("tf_keras_segpipe_recipe", "tf_keras with segpipe's recipe"),
                            ("tf_keras_stock", "tf_keras with the tutorial's stock recipe")):
            ratio = d["ratios"][target][side]
            bound = next((f" (ratio {sign} {ratio[key]})" for key, sign in (("seconds_below", "<"), ("seconds_above", ">"))
                          if key in ratio), "")
            rows.append(Row(f"Time to eval IoU {iou} (95% of {of}) on {name}: segpipe's trainer vs {label} "
                            f"(TFX's Keras){bound}", when(d["sides"]["segpipe"], target), when(d["sides"][side], target),
                            ratio.get("seconds"), "-", "reported"))
    return rows


def ingest_rows(data: dict[str, Any]) -> list[Row]:
    """bench_ingest_memory.py: ExampleGen peak memory above the import baseline, N vs 10N (reported)."""
    n = data["n"]
    small, large = data["sizes"][str(n)], data["sizes"][str(10 * n)]
    grown = [s["peak_mb"] - s["baseline_mb"] for s in (small, large)]
    rows = [Row(f"Ingestion (ExampleGen) peak memory above baseline, {10 * n} vs {n} images",
                f"+{grown[1]:.0f} MiB", f"+{grown[0]:.0f} MiB", data["growth_ratio"], "-", "reported")]
    modes = data.get("runner_modes") or {}
    if "in_memory" in modes:
        base = modes["in_memory"]["seconds"]
        for mode, entry in modes.items():
            if mode != "in_memory":
                rows.append(Row(f"Ingestion of {10 * n} images, FnApiRunner {mode} vs in-memory (speed-up)",
                                f"{entry['seconds']:.1f} s", f"{base:.1f} s", base / entry["seconds"], "-", "reported"))
    return rows


def serving_rows(data: dict[str, Any]) -> list[Row]:
    rows = []
    for name, model in data["models"].items():
        goal = f"<= {data['goal_ratio']}" if name == "seed" else "-"
        for batch, entry in sorted(model["batches"].items(), key=lambda kv: int(kv[0])):
            rows.append(Row(
                f"Serving, {name} model ({model['image_size']} px, {model['parameters']:,} params), batch {batch}: "
                "SavedModel on PNG bytes vs bare Keras on decoded arrays (median latency)",
                f"{entry['exported_bytes_ms']:.1f} ms", f"{entry['keras_arrays_ms']:.1f} ms", entry["ratio"], goal,
                check(entry["ratio"], goal) if goal != "-" else "reported"))
    return rows


def pipeline_rows(data: dict[str, Any]) -> list[Row]:
    run = data["runs"][0]
    label = "quick settings" if data["quick"] else f"{data['demo_size']} demo images, profile {data.get('profile', 'demo')}"
    goal = f"<= {data['goal_seconds']:.0f} s"
    rows = [Row(f"End-to-end: segpipe demo-data + segpipe run ({label}), wall time",
                f"{data['median_wall_seconds']:.0f} s", "-", None, goal,
                ("pass" if data["median_wall_seconds"] <= data["goal_seconds"] else "fail") if not data["quick"]
                else "reported")]
    rows.append(Row("  of which: segpipe demo-data", f"{run['demo_data_seconds']:.0f} s", "-", None, "-", "reported"))
    order = {node: i for i, node in enumerate(PIPELINE_ORDER)}
    for node, step in sorted(run["steps"].items(), key=lambda kv: order.get(kv[0], len(order))):
        if step["seconds"] >= 0.5:
            rows.append(Row(f"  of which: step {node} ({step['state']})", f"{step['seconds']:.0f} s", "-", None, "-",
                            "reported"))
    other = run["run_seconds"] - run["steps_total_seconds"]
    rows.append(Row("  of which: start-up, imports, report", f"{other:.0f} s", "-", None, "-", "reported"))
    metrics = run.get("metrics") or {}
    if "pixel_accuracy" in metrics:
        rows.append(Row("  test split pixel accuracy (all-background baseline)", f"{metrics['pixel_accuracy']:.4f}",
                        f"{metrics.get('all_background_accuracy', float('nan')):.4f}", None,
                        ">= 0.95" if not data["quick"] else "-",
                        check(metrics["pixel_accuracy"], ">= 0.95") if not data["quick"] else "reported"))
    if "foreground_iou" in metrics:
        rows.append(Row("  test split foreground IoU", f"{metrics['foreground_iou']:.4f}", "-", None,
                        ">= 0.9" if not data["quick"] else "-",
                        check(metrics["foreground_iou"], ">= 0.9") if not data["quick"] else "reported"))
    return rows


def infer_rows(data: dict[str, Any]) -> list[Row]:
    """bench_infer.py: `segpipe infer` (RunInference over TFRecords) against `segpipe predict` (files)."""
    rate, differing = data["images_per_second"], data["masks_differing"]
    return [
        Row(f"Batch inference, {data['images']} images of many sizes: segpipe infer (Beam RunInference on TFRecords, "
            f"{' '.join(data['beam_args'])}) vs segpipe predict (image files), images/s of wall time",
            f"{rate['infer']:.1f} img/s", f"predict {rate['predict']:.1f} img/s", data["ratio_infer_over_predict"],
            "-", "reported"),
        Row("  masks that differ between infer and predict", str(differing), "-", None, "0",
            "pass" if differing == 0 else "fail"),
    ]


def runners_rows(data: dict[str, Any]) -> list[Row]:
    """bench_runners.py: the Beam steps through the portable job API against in-process FnApiRunner."""
    four = data["four_steps"]
    rows = [Row(f"Beam runners, {data['dataset']['num_images']} images: ExampleGen + StatisticsGen + Transform + "
                "Evaluator, portable runner (job service, external SDK workers) vs in-process FnApiRunner, wall time",
                f"{four['portable']:.1f} s", f"in-process {four['in_process']:.1f} s", four["ratio"], "-", "reported")]
    for step, entry in data["steps"].items():
        rows.append(Row(f"  of which: {step}", f"{entry['portable']:.1f} s", f"in-process {entry['in_process']:.1f} s",
                        entry["ratio"], "-", "reported"))
    rows.append(Row("  portable services start-up (once, before timing)",
                    f"{data['portable_services_start_seconds']:.1f} s", "-", None, "-", "reported"))
    return rows


def plan_rows(data: dict[str, Any]) -> list[Row]:
    """bench_plan.py: `profile: auto` against `--profile demo` on the demo span, then the plans' estimates."""
    rows = []
    demo_data = data.get("demo_data")  # absent with --plans-only
    if demo_data:
        auto, demo = demo_data["runs"]["auto"], demo_data["runs"]["demo"]
        ratio = auto["run_seconds"] / demo["run_seconds"]
        rows.append(Row(f"Plan (profile auto) vs --profile demo, segpipe run on {demo_data['demo_images']} demo "
                        "images, wall time", f"{auto['run_seconds']:.0f} s", f"demo {demo['run_seconds']:.0f} s",
                        ratio, "<= 1.0", check(ratio, "<= 1.0")))
        for metric, goal in demo_data["goals"].items():
            value = auto["metrics"][metric] or 0.0
            label = {"foreground_iou": "foreground IoU"}.get(metric, metric.replace("_", " "))
            rows.append(Row(f"  profile auto, test split {label}", f"{value:.4f}",
                            f"demo {demo['metrics'][metric] or 0.0:.4f}", None, f">= {goal}", check(value, f">= {goal}")))
    for name, plan in data["plans"].items():
        estimate = plan["estimate"]
        ratio = estimate["minutes"] / estimate["budget_minutes"]
        rows.append(Row(f"Plan for {name} ({plan['images']} images, {plan['num_classes']} classes): estimated "
                        f"training time on {estimate['device']} vs the budget", f"{estimate['minutes']:.1f} min",
                        f"budget {estimate['budget_minutes']:.0f} min", ratio, "<= 1.0", check(ratio, "<= 1.0")))
    return rows


def convergence_rows(data: dict[str, Any]) -> list[Row]:
    """bench_convergence.py: the new training defaults against the old settings, eval IoU in inference mode."""
    rows = []
    for name, entry in data["datasets"].items():
        old, new = entry["variants"]["old"], entry["variants"]["new"]
        iou_old, iou_new = old["inference"]["iou"], new["inference"]["iou"]
        rows.append(Row(f"Convergence on {name} ({entry['num_classes']} classes): new training defaults vs the old "
                        "settings, eval foreground IoU in inference mode", f"{iou_new:.3f}", f"old {iou_old:.3f}",
                        iou_new / iou_old if iou_old else None, "-", "reported"))
        gap = abs(iou_new - new["training_mode"]["iou"])
        rows.append(Row(f"  {name}, new defaults: inference-mode IoU vs training-mode IoU (absolute gap)", f"{gap:.3f}",
                        f"training mode {new['training_mode']['iou']:.3f}", None, "<= 0.01", check(gap, "<= 0.01")))
    return rows


BENCHMARKS: dict[str, Bench] = {
    "transform": Bench("bench_transform.py", ("--num", "2000", "--size", "128", "--memory-num", "1000"),
                       ("--num", "120", "--size", "64", "--pool", "60", "--memory-num", "20"), transform_rows),
    "trainer": Bench("bench_trainer.py", (), ("--images", "64", "--pipeline-images", "64", "--epochs", "1", "--repeats", "1",
                                          "--memory-n", "16",
                                          "--variant-repeats", "1", "--time-to-quality-quick"),
                     trainer_rows),
    "ingest_memory": Bench("bench_ingest_memory.py", ("--n", "100"), ("--n", "10"), ingest_rows),
    "serving": Bench("bench_serving.py", (), ("--quick",), serving_rows),
    "pipeline": Bench("bench_pipeline.py", (), ("--quick",), pipeline_rows),
    "infer": Bench("bench_infer.py", (), ("--num", "24", "--repeats", "1"), infer_rows),
    "runners": Bench("bench_runners.py", ("--num", "300"), ("--num", "40"), runners_rows),
    "plan": Bench("bench_plan.py", (), ("--plans-only",), plan_rows),
    # Its --quick writes no JSON (tiny budgets only check that it runs), so --quick skips it.
    "convergence": Bench("bench_convergence.py", (), None, convergence_rows),
}


# ------------------------------------------------------------------ the machine


def machine_description() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU (from /proc and nvidia-smi when present)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpu = "none"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=False)
        if done.returncode == 0 and done.stdout.strip():
            gpu = ", ".join(done.stdout.strip().splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": ram_gib, "gpu": gpu,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


# ------------------------------------------------------------------ running and reporting


def rows_from_json(name: str, bench: Bench, json_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json_path.read_text())
    try:
        rows = bench.rows(data)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # the script's JSON changed shape
        return {**record, "status": "error", "error": f"unexpected JSON from {bench.script}: {exc!r}", "data": data}
    return {**record, "status": "ok", "rows": [asdict(r) for r in rows], "data": data}


def run_bench(name: str, bench: Bench, quick: bool, out_dir: Path, rerun: bool = True) -> dict[str, Any]:
    """Run one script (or, with rerun=False, read the JSON an earlier run left in out_dir)."""
    script = HERE / bench.script
    if not script.is_file():
        return {"name": name, "status": "missing", "seconds": 0.0, "error": f"{bench.script} not found"}
    json_path = out_dir / f"{name}.json"
    if rerun and quick and bench.quick is None:
        return {"name": name, "status": "missing", "seconds": 0.0, "error": f"{bench.script} has no smoke-test sizes"}
    if not rerun:
        if not json_path.is_file():
            return {"name": name, "status": "missing", "seconds": 0.0, "error": f"no {json_path.name} from an earlier run"}
        return rows_from_json(name, bench, json_path, {"name": name, "seconds": None, "reused": str(json_path)})
    json_path.unlink(missing_ok=True)
    command = [sys.executable, str(script), *(bench.quick if quick else bench.full), "--json", str(json_path)]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    log_path = out_dir / f"{name}.log"
    with open(log_path, "w") as log_file:
        done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {"name": name, "seconds": round(seconds, 1), "command": command[1:], "log": str(log_path)}
    if done.returncode or not json_path.is_file():
        tail = log_path.read_text()[-1500:]
        print(f"   FAILED (exit {done.returncode}) after {seconds:.0f}s; see {log_path}\n{tail}", flush=True)
        return {**record, "status": "error", "error": f"exit {done.returncode}"}
    result = rows_from_json(name, bench, json_path, record)
    shown = "; ".join(f"{r['measured']} vs {r['baseline']} ({r['status']})" for r in result.get("rows", [])[:3])
    print(f"   done in {seconds:.0f}s: {shown or result.get('error')}", flush=True)
    return result


def _reuse_note(results: list[dict[str, Any]]) -> list[str]:
    """Say which rows come from an earlier run's JSON (--reuse), and when that JSON was written."""
    reused = [r for r in results if r.get("reused")]
    if not reused:
        return []
    when = ", ".join(
        f"{r['name']} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(written_at(Path(r['reused']))))})"
        for r in reused
    )
    return [f"Figures read from an earlier run's JSON in this folder (`--reuse`): {when}.", ""]


def written_at(path: Path) -> float:
    """When a result JSON was written: its commit's time when git holds it unchanged (a checkout
    sets every file's mtime to the checkout's time), else its mtime."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else "?"

    committed = git("log", "-1", "--format=%ct", "--", path.name)
    if committed.isdigit() and git("status", "--porcelain", "--", path.name) == "":
        return float(committed)
    return path.stat().st_mtime


def render_markdown(machine: dict[str, Any], results: list[dict[str, Any]], quick: bool, started: str) -> str:
    lines = [
        "# segpipe benchmarks" + (" (quick smoke run: small sizes, not for README)" if quick else ""),
        "",
        f"Measured {started} with `python benchmarks/run_all.py{' --quick' if quick else ''}`.",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores available to the process",
        f"- RAM: {machine['ram_gib']} GiB; GPU: {machine['gpu']}",
        f"- Python {machine['python']}, {machine['platform']}; load average when run_all.py started "
        f"{', '.join(map(str, machine['load_average_at_start']))}",
        "",
        *_reuse_note(results),
        "| benchmark | measured | baseline | ratio | goal | result |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        if result["status"] != "ok":
            lines.append(f"| {result['name']} | - | - | - | - | {result['status']}: {result.get('error', '')} |")
            continue
        for row in result["rows"]:
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
            lines.append(f"| {row['benchmark']} | {row['measured']} | {row['baseline']} | {ratio} | {row['goal']} | "
                         f"{row['status']} |")
    lines += ["", "Each script's full JSON is in results.json; re-run one with "
              "`python benchmarks/<script> --help`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for results.md / results.json")
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole suite in a few minutes")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--reuse", nargs="+", choices=sorted(BENCHMARKS), default=[],
                        help="do not rerun these: read <out>/<name>.json of an earlier run (e.g. after one failed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = machine_description()
    results = []
    for name in args.only or list(BENCHMARKS):
        result = run_bench(name, BENCHMARKS[name], args.quick, out_dir, rerun=name not in args.reuse)
        if args.quick:  # goals are set for the full sizes; at smoke-test sizes fixed costs dominate
            for row in result.get("rows", []):
                if row["status"] in ("pass", "fail"):
                    row["status"] += " (quick sizes)"
        if result["status"] == "missing":
            print(f"== {name}: skipped ({result['error']})")
            continue
        results.append(result)
    (out_dir / "results.md").write_text(render_markdown(machine, results, args.quick, started))
    (out_dir / "results.json").write_text(json.dumps({"machine": machine, "quick": args.quick, "started": started,
                                                      "benchmarks": results}, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / 'results.md'} and results.json")
    failed = [r["name"] for r in results if r["status"] == "error"]
    if failed:
        print(f"benchmarks that did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
