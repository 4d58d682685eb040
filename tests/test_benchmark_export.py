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
    # with the bfloat16 engine's times: each step's and the total's speed-up over float32
    for row, ms in zip(measured["convolutions"], (0.8, 0.5)):
        row["bfloat16_ms"] = ms
    with_bf16 = _script().float_convolution_lines(measured)
    assert "| CONV_2D | 8x8x64 | 3x3, 3 -> 64 | 1.000 | 40.0 | 80% | 0.800 | 1.25x |" in with_bf16
    assert "| BN+CONV_2D+ADD | 8x8x128 | 1x1, 64 -> 128 | 1.000 | 20.0 | 40% | 0.500 | 2.00x |" in with_bf16
    assert "| all 2 | | | 2.00 | 30.0 | 60% | 1.30 | 1.54x |" in with_bf16


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


def test_bfloat16_section_puts_speed_and_accuracy_side_by_side(tmp_path):
    """The bfloat16 section: its ratios to float32 and to XNNPACK from the speed rows, computed by
    hand, and the landmark movement and NME of the accuracy check as measured."""
    script = _script()
    speed = [{"model": "float32 .tflite, TFLite interpreter (XNNPACK)", "threads": 1, "ms": 180.0},
             {"model": "binary .tflite, larq_landmarks.runtime (avx512)", "threads": 1, "ms": 30.0},
             {"model": script.BFLOAT16_CASE, "threads": 1, "ms": 24.0},
             {"model": script.BFLOAT16_CASE, "threads": 2, "ms": 14.0}]
    check = {"model": "runs/demo/model.keras", "input_size": 64, "faces": 8, "landmarks": 544,
             "median_moved_px": 0.0, "max_moved_px": 4.5, "within_0.5px": 0.75, "nme_box_float32": 4.5,
             "nme_box_bfloat16": 4.52}
    out = tmp_path / "benchmarks.md"
    args = type("Args", (), {"out": str(out)})()
    script.write_bfloat16_markdown(args, {"speed": speed, "bfloat16": check, "speed_command": "CMD"})
    text = out.read_text()
    assert "## bfloat16 float convolutions on x86-64 (AVX512_BF16)" in text
    assert "(from `CMD` above, 1 thread, default model at 256x256): 24.0 ms against 30.0 ms in float32 (1.25x), " \
           "7.50x float32 XNNPACK (6.00x in float32)." in text
    assert "--trained runs/demo/model.keras --faces 8" in text
    assert "75.0% of the landmarks within 0.5 px" in text and "largest 4.50 px" in text
    assert "NME (box) 4.500% in float32, 4.520% in bfloat16" in text
    # without the speed part's figures, the accuracy alone
    script.write_bfloat16_markdown(args, {"bfloat16": check})
    assert "ms against" not in out.read_text() and out.read_text().count("## bfloat16") == 1
