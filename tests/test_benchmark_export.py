"""scripts/benchmark_export.py's float-convolution part: the FMA limit probe and its table."""
import os
import shutil

import pytest

from larq_landmarks.runtime import available_kernels

from script_modules import load_script


def _script():
    return load_script("benchmark_export")


def test_float_convolution_table_is_each_steps_rate_against_the_limit():
    """G MAC/s and the fraction of the FMA limit per step, the total's, and what the steps would
    take at the limit, as computed by hand."""
    measured = {"kernels": "avx512", "fma_limit_gflops": 50.0, "runs": 15, "convolutions": [
        {"step": "CONV_2D", "output": "8x8x64", "filter": "3x3, 3 -> 64", "macs": 40_000_000, "ms": 1.0,
         "gmacs": 40.0},
        {"step": "BN+CONV_2D+ADD", "output": "8x8x128", "filter": "1x1, 64 -> 128", "macs": 20_000_000,
         "ms": 1.0, "gmacs": 20.0}]}
    lines = _script().float_convolution_lines(measured)
    assert lines[0] == "### The float convolutions against this core's FMA limit (avx512, 1 thread)"
    assert "(50.0 G FMA/s, the median of the two)" in lines[2] and "median of 15 `Engine.profile` runs" in lines[2]
    assert "| CONV_2D | 8x8x64 | 3x3, 3 -> 64 | 1.000 | 40.0 | 80% |" in lines
    assert "| BN+CONV_2D+ADD | 8x8x128 | 1x1, 64 -> 128 | 1.000 | 20.0 | 40% |" in lines
    assert "| all 2 | | | 2.00 | 30.0 | 60% |" in lines  # 60 M MAC in 2 ms
    assert lines[-1] == "At the FMA limit the 2 would take 1.20 ms instead of 2.00 ms."
    no_limit = _script().float_convolution_lines(dict(measured, fma_limit_gflops=None))
    assert "| CONV_2D | 8x8x64 | 3x3, 3 -> 64 | 1.000 | 40.0 |" in no_limit and "FMA limit the" not in no_limit[-1]


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
def test_fma_limit_probe_compiles_and_runs_for_the_simd_paths(monkeypatch):
    """The probe builds for the AVX-512 and AVX2 paths this CPU runs and reads back a rate; it
    gives None for the portable path (no FMA vector type) and without a compiler."""
    script = _script()
    for path in set(available_kernels()) & {"avx512", "avx2"}:
        assert script.fma_limit(path) > 0, path
    assert script.fma_limit("portable") is None
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert script.fma_limit("avx2") is None
