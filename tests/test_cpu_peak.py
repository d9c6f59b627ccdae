"""The CPU peak that benchmarks/bench_trainer.py sets training FLOP/s against (its docstring, section 4).

The benchmark itself is run by hand; these check the parts a wrong figure would come from: the
FLOPs per cycle read from /proc/cpuinfo, and the FMA probe (benchmarks/fma_peak.c) it compiles.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_trainer.py"


@pytest.fixture(scope="module")
def bench_trainer():
    spec = importlib.util.spec_from_file_location("bench_trainer_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpuinfo(vendor: str, family: int, flags: str, mhz: float = 2000.0) -> str:
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\ncpu MHz\t\t: {mhz}\n"
            f"flags\t\t: fpu sse sse2 {flags}\n")


@pytest.mark.parametrize("vendor, family, flags, expected", [
    ("AuthenticAMD", 25, "avx fma avx2 avx512f avx512bw", 32),  # Zen 4: AVX-512 on 256-bit units
    ("AuthenticAMD", 25, "avx fma avx2", 32),  # Zen 3
    ("AuthenticAMD", 26, "avx fma avx2 avx512f", 64),  # Zen 5: 512-bit units
    ("GenuineIntel", 6, "avx fma avx2 avx512f", 64),
    ("GenuineIntel", 6, "avx avx2", 16),  # AVX2 without FMA: multiply and add apart
    ("GenuineIntel", 6, "", 8),
])
def test_fp32_flops_per_cycle_follow_the_vector_units_not_only_the_isa_flags(bench_trainer, vendor, family, flags, expected):
    assert bench_trainer.fp32_flops_per_cycle(cpuinfo(vendor, family, flags))[0] == expected


def test_computed_peak_is_cpus_times_clock_times_flops_per_cycle_without_the_probe(bench_trainer):
    peak = bench_trainer.cpu_peak(cpuinfo("AuthenticAMD", 25, "avx fma avx2 avx512f", mhz=2500.0), measure=False)
    assert peak["measured"] is None and peak["peak_source"] == "computed from /proc/cpuinfo"
    assert peak["peak_gflops"] == pytest.approx(peak["cpus"] * 2.5 * 32, abs=0.1)


def test_fma_probe_measures_a_peak_consistent_with_its_own_clock(bench_trainer):
    if bench_trainer.c_compiler() is None:
        pytest.skip("no C compiler")
    measured = bench_trainer.measured_fma_peak(1)
    assert measured is not None, "fma_peak.c did not build or run (see the log)"
    assert measured["vector_bits"] in (256, 512) and 0.5 < measured["clock_ghz"] < 8.0
    # One core does 8-64 fp32 FLOPs per cycle on x86 with FMA; a figure outside that band means the
    # chains were optimised away or were latency-bound, not a peak.
    per_cycle = measured["gflops"] / measured["clock_ghz"]
    assert 8 <= per_cycle <= 70, measured
