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
    # and int8's beside them
    for row, ms in zip(measured["convolutions"], (0.5, 0.4)):
        row["int8_ms"] = ms
    with_int8 = _script().float_convolution_lines(measured)
    assert "| CONV_2D | 8x8x64 | 3x3, 3 -> 64 | 1.000 | 40.0 | 80% | 0.800 | 1.25x | 0.500 | 2.00x |" in with_int8
    assert "| all 2 | | | 2.00 | 30.0 | 60% | 1.30 | 1.54x | 0.90 | 2.22x |" in with_int8
    assert "| step | output | filter | ms | G MAC/s | of the FMA limit | bfloat16 ms | bfloat16 vs float32 | int8 ms | " \
           "int8 vs float32 |" in with_int8
    # the probe's rates for the reduced precisions' instructions, against the FMA's 50 G/s
    measured["product_limits_g"] = {"bfloat16": 25.0, "int8": 180.0}
    assert _script().float_convolution_lines(measured)[2].endswith(
        " The same loop with VDPBF16PS (bfloat16): 25.0 G products/s, 0.50x the FMA's, with VPDPBUSD (int8): "
        "180.0 G products/s, 3.60x the FMA's (after the profiles).")
    measured["product_limits_g"] = {"bfloat16": None}  # this CPU lacks it
    assert _script().float_convolution_lines(measured)[2].endswith(", profiled in turns with float32.")
    measured["amx"] = ["bfloat16", "int8"]  # a CPU with AMX runs both on its tiles
    assert _script().float_convolution_lines(measured)[2].endswith(
        ", profiled in turns with float32 (bfloat16 and int8 on AMX's tiles, TDPBF16PS and TDPBUSD, as this CPU runs "
        "them: `kernels.amx`).")


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
def test_fma_limit_probe_compiles_and_runs_for_the_simd_paths(monkeypatch):
    """The probe builds for the AVX-512 and AVX2 paths this CPU runs and reads back a rate, and for
    VDPBF16PS and VPDPBUSD on the avx512 path where this CPU runs those precisions; it gives None
    for the portable path (no FMA vector type), for the reduced precisions on avx2, and without a
    compiler."""
    script = _script()
    for path in set(available_kernels()) & {"avx512", "avx2"}:
        assert script.fma_limit(path) > 0, path
    if "avx512" in available_kernels():
        here = script.reduced_precisions_here("avx512")
        for product in ("bfloat16", "int8"):
            rate = script.fma_limit("avx512", product)
            assert (rate is not None and rate > 0) == (product in here), (product, rate, here)
    assert script.fma_limit("portable") is None and script.fma_limit("avx2", "int8") is None
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert script.fma_limit("avx2") is None


def test_precision_section_puts_speed_and_accuracy_side_by_side(tmp_path):
    """The reduced precisions' section: each one's ratios to float32 and to XNNPACK from the speed
    rows, computed by hand, beside the landmark movement and NME of the accuracy check as measured."""
    script = _script()
    speed = [{"model": "float32 .tflite, TFLite interpreter (XNNPACK)", "threads": 1, "ms": 180.0},
             {"model": "binary .tflite, larq_landmarks.runtime (avx512)", "threads": 1, "ms": 30.0},
             {"model": script.REDUCED_CASES["bfloat16"], "threads": 1, "ms": 24.0},
             {"model": script.REDUCED_CASES["bfloat16"], "threads": 2, "ms": 14.0},
             {"model": script.REDUCED_CASES["int8"], "threads": 1, "ms": 20.0}]
    check = {"model": "runs/demo/model.keras", "input_size": 64, "faces": 8, "landmarks": 544, "precisions": {
        "float32": {"nme_box": 4.5},
        "bfloat16": {"nme_box": 4.52, "median_moved_px": 0.0, "max_moved_px": 4.5, "within_0.5px": 0.75},
        "int8": {"nme_box": 4.51, "median_moved_px": 0.25, "max_moved_px": 6.0, "within_0.5px": 0.625}}}
    out = tmp_path / "benchmarks.md"
    args = type("Args", (), {"out": str(out)})()
    script.write_precision_markdown(args, {"speed": speed, "precision": check, "speed_command": "CMD"})
    text = out.read_text()
    assert "## bfloat16 and int8 float convolutions on x86-64" in text and "from `CMD` above" in text
    assert "--trained runs/demo/model.keras --faces 8" in text and "(64px crops, 544 landmarks)" in text
    assert "| float32 | 30.0 | 1.00x | 6.00x | - | - | 4.500% |" in text
    assert "| bfloat16 | 24.0 | 1.25x | 7.50x | 75.0% | 0.00 / 4.50 | 4.520% |" in text
    assert "| int8 | 20.0 | 1.50x | 9.00x | 62.5% | 0.25 / 6.00 | 4.510% |" in text
    # without the speed part's figures, the accuracy alone
    script.write_precision_markdown(args, {"precision": check})
    text = out.read_text()
    assert "| int8 | - | - | - | 62.5% | 0.25 / 6.00 | 4.510% |" in text and text.count("## bfloat16") == 1


def test_int8_lce_section_puts_sizes_accuracy_and_speed_side_by_side(tmp_path):
    """The compression part's int8 section: the default model's bytes and their ratio, the trained
    model's three LCE files (float activations, calibrated int8, LCE's default range) with their
    NME and landmark movement as measured, and LCE's int8 and float timings from the speed rows."""
    script = _script()
    row = {"name": "binary_hpm", "parameters": 10, "keras_float32_bytes": 4000, "tflite_float32_bytes": 4000,
           "lce_bytes": 1000, "packed_binary_weight_bytes": 100, "other_float32_bytes": 800, "binary_weights": 800}
    moved = {"median_moved_px": 0.0, "max_moved_px": 7.21, "within_0.5px": 0.615}
    check = {"model": "runs/demo/model.keras", "input_size": 64, "faces": 64, "calibration_faces": 32,
             "float": {"bytes": 145300, "nme_box": 4.615, **moved},
             "int8": {"bytes": 113808, "nme_box": 4.62, **moved},
             "int8_default_range": {"bytes": 116384, "nme_box": 9.5, "median_moved_px": 14.4, "max_moved_px": 40.0,
                                    "within_0.5px": 0.008},
             "default_model_bytes": {"float": 1444168, "int8": 1030688}}
    speed = [{"model": "m", "engine": "lce-indirect-bgemm", "threads": 1, "ms": 79.2},
             {"model": "m8", "engine": "lce-int8-indirect-bgemm", "threads": 1, "ms": 74.0}]
    out = tmp_path / "benchmarks.md"
    args = type("Args", (), {"out": str(out), "trained": "runs/demo/model.keras"})()
    runtime = {"precisions": {"float32": {"nme_box": 4.615}, "int8": {"nme_box": 4.619, "within_0.5px": 0.659}}}
    script.write_compression_markdown(args, {"machine": "x86_64", "cpus": 2, "tensorflow": "2.21.0",
                                             "compression": [row], "int8": check, "speed": speed,
                                             "precision": runtime})
    text = out.read_text()
    assert "### int8 activations for LCE's ARM kernels" in text
    assert "The default model: 1,444,168 -> 1,030,688 bytes (1.40x smaller)" in text
    assert "calibrated on 32 synthetic faces, over 64 others" in text
    assert "| float activations | 145,300 | 4.615% | - | - |" in text
    assert "| int8, calibrated | 113,808 | 4.620% | 61.5% | 0.00 / 7.21 |" in text
    assert "| int8, LCE's default range (-3, 3) | 116,384 | 9.500% | 0.8% | 14.40 / 40.00 |" in text
    assert "int8 file in 74.0 ms against 79.2 ms" in text
    assert "Calibrated, 61.5% of the landmarks stay within 0.5 px of the float-activation file's and NME (box) " \
           "moves by +0.005 points" in text
    assert "keep every other activation float32: 65.9% and +0.004;" in text


def test_int8_fine_tune_table_puts_both_fine_tunings_files_side_by_side():
    """The int8 fine-tuning table: per row the mean NME of the float-activation and int8 files and
    their difference, each seed's in brackets (by hand below), and whether every int8-aware seed's
    int8 file is below every float-fine-tuned one's."""
    script = _script()
    check = {"model": "m.keras", "faces": 256, "steps": 300, "learning_rate": 2e-5, "train_faces": 400, "seeds": [1, 2],
             "before": {"float": 4.60, "int8": 4.70},
             "float_only": [{"seed": 1, "float": 4.70, "int8": 4.76}, {"seed": 2, "float": 4.66, "int8": 4.72}],
             "int8_aware": [{"seed": 1, "float": 4.64, "int8": 4.67}, {"seed": 2, "float": 4.62, "int8": 4.63}]}
    text = "\n".join(script.fine_tune_markdown(check))
    assert "fine-tuned 300 steps at a constant rate of 2e-05 on its 400 training faces" in text
    assert "| none | 4.600% (4.600) | 4.700% (4.700) | +0.100 (+0.100) |" in text
    assert "| float activations | 4.680% (4.700 / 4.660) | 4.740% (4.760 / 4.720) | +0.060 (+0.060 / +0.060) |" in text
    assert "| int8 activations (`int8_fine_tune`) | 4.630% (4.640 / 4.620) | 4.650% (4.670 / 4.630) | " \
           "+0.020 (+0.030 / +0.010) |" in text
    # 4.650 - 4.740 = -0.090; 4.650 - 4.600 = +0.050; 4.67 < 4.72: every seed below every one
    assert "int8 file ends -0.090 points from the float fine-tuning's int8 file (every seed's below every " \
           "float-fine-tuned seed's) and +0.050 from the float-activation file before fine-tuning" in text
    check["int8_aware"][0]["int8"] = 4.73
    assert "(every seed's not below every float-fine-tuned seed's)" in "\n".join(script.fine_tune_markdown(check))


def test_int8_file_section_compares_the_three_engines_and_takes_the_speed_tables_times(tmp_path):
    """--parts int8file's section: each engine's NME, each pair's agreement, and the speed table's
    times for the runtime on the int8 file, the float files and LCE on the int8 file."""
    script = _script()
    pair = {"equal_values": 0.9917, "within_0.5px": 0.997, "max_moved_px": 3.61}
    check = {"model": "runs/demo/model.keras", "input_size": 64, "faces": 256, "kernels": "avx512",
             "engines": {"runtime": {"nme_box": 4.703}, "lce_xnnpack": {"nme_box": 4.704}, "lce": {"nme_box": 4.71},
                         "runtime_float_file": {"nme_box": 4.659}},
             "runtime_vs_lce_xnnpack": pair, "runtime_vs_lce": dict(pair, equal_values=0.1019),
             "lce_xnnpack_vs_lce": dict(pair, equal_values=0.1018)}
    speed = [{"model": "float32 .tflite, TFLite interpreter (XNNPACK)", "engine": "tflite-xnnpack", "threads": 1, "ms": 73.9},
             {"model": "binary .tflite with int8 activations, LCE interpreter, indirect BGEMM + XNNPACK",
              "engine": "lce-int8-indirect-bgemm", "threads": 1, "ms": 73.5},
             {"model": "binary .tflite, larq_landmarks.runtime (avx512)", "engine": "runtime-avx512", "threads": 1,
              "ms": 12.3},
             {"model": script.int8_file_case("avx512"), "engine": "runtime-avx512", "threads": 1, "ms": 12.6},
             {"model": script.int8_file_case("avx512"), "engine": "runtime-avx512", "threads": 2, "ms": 7.3}]
    out = tmp_path / "benchmarks.md"
    script.write_int8_file_markdown(type("Args", (), {"out": str(out)})(), {"int8_file": check, "speed": speed})
    text = out.read_text()
    assert "`python scripts/benchmark_export.py --parts int8file --trained runs/demo/model.keras --faces 256`" in text
    assert "| larq_landmarks.runtime (avx512) | 4.703% |" in text and "| LCE's interpreter with XNNPACK | 4.704% |" in text
    assert "| LCE's interpreter (TFLite's int8 kernels) | 4.710% |" in text
    assert "| (the float-activation file, larq_landmarks.runtime (avx512)) | 4.659% |" in text
    assert "| runtime / LCE with XNNPACK | 99.17% | 99.7% | 3.61 |" in text
    assert "| runtime / LCE | 10.19% | 99.7% | 3.61 |" in text
    assert "int8 file in 12.6 ms (5.9x float32 XNNPACK; the binary float file 12.3 ms), LCE's interpreter with " \
           "XNNPACK in 73.5 ms (5.8x the runtime's time)" in text


def test_detection_part_times_both_engines_and_writes_their_table(tmp_path):
    """``--parts detection``'s measurement (one round, two runs) finds the drawn face with both
    engines and every detector, and its section puts each detector's four times in one row."""
    import types

    measured = _script().detection_speed(rounds=1, runs=2)
    assert [r["model"] for r in measured["rows"]] == ["front", "back", "short", "full"]
    for row in measured["rows"]:
        assert row["faces found"] == [1, 1]
        assert all(row[name] > 0 for name in ("runtime", "tflite", "runtime model", "tflite model"))
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Face detection on the runtime (CPU, 1 thread)\n\nold\n\n## Next\n\nkept\n")
    measured["rows"][0].update({"runtime": 3.5, "tflite": 9.0, "runtime model": 2.0, "tflite model": 0.9})
    _script().write_detection_markdown(types.SimpleNamespace(out=str(out)), {"cpu": "a CPU", "detection_speed": measured})
    text = out.read_text()
    assert "| front | 3.5 | 9.0 | 2.0 | 0.9 | 1 and 1 |" in text and "old" not in text and text.endswith("## Next\n\nkept\n")
    assert "Command: `python scripts/benchmark_export.py --parts detection` (a CPU, " in text
