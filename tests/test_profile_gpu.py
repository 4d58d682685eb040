"""scripts/profile_gpu.py's parts, on kernels.cu built for the CPU (fake_cupy): the MMA-rate kernel
issues the MMAs it counts, the MMA count of a convolution is the kernel's, and the chosen launches
run between cudaProfilerStart and cudaProfilerStop (what Nsight Compute profiles)."""
import importlib.util
import json
import sys

import pytest

import fake_cupy
from larq_landmarks.runtime import cuda
from larq_landmarks.runtime.graph import read_graph

from script_modules import load_script


@pytest.fixture(scope="module")
def wide_flatbuffer(tmp_path_factory):
    """A small converted binary model whose first 3x3 binary convolutions read 64 channels."""
    tf = pytest.importorskip("tensorflow")

    from larq_landmarks import export, models

    tf.keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("profile") / "wide.tflite"
    export.convert(models.build_named("binary_hpm", 5, input_size=32, width=64, depth=1), str(path))
    return path.read_bytes()


@pytest.fixture
def on_cpu(monkeypatch):
    fake_cupy.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy.module())


def test_conv_mmas_by_hand():
    script = load_script("profile_gpu")
    # 32 x 128 x 128 pixels: 4096 blocks of 128; 64 channels in: 9 x 2 = 18 words, 3 steps of 8;
    # 64 out: 8 warps (4 x 2) of 2 m16 x 4 n8 tiles: 4096 x 8 x 3 x 8 = 786432
    assert script.conv_mmas(32, 128, 64, 64) == 786432
    # 32 out: the 4 warps of columns 32-63 issue none
    assert script.conv_mmas(32, 128, 64, 32) == 786432 // 2
    # 256 in, 128 out at 8 x 8: 2048 pixels, 16 blocks; 72 words: 9 steps; 2 column blocks
    assert script.conv_mmas(32, 8, 256, 128) == 16 * 2 * 8 * 9 * 8
    # 64-row tiles: 32 blocks of 2 x 4 warps, each 2 m16 x 2 n8 tiles
    assert script.conv_mmas(32, 8, 256, 128, tile_rows=64) == 32 * 2 * 8 * 9 * 4
    # 33 out of a 64-wide block at 32-row tiles (8 warps of 8 columns): 5 busy warps
    assert script.conv_mmas(1, 4, 32, 33, tile_rows=32) == 1 * 5 * 2 * 2 * 1


def test_mma_rate_counts_every_mma(on_cpu, monkeypatch):
    monkeypatch.setattr(fake_cupy.Device, "multiprocessors", 2)
    script = load_script("profile_gpu")
    rate = script.mma_rate(cuda.load("cuda"), iterations=3, blocks_per_sm=1, runs=1)
    # 2 blocks of 8 warps, 3 iterations of 4 MMAs (the kernel checked each thread's sum: 3 x 4 x 4 x 256)
    assert rate["mma"] == 2 * 8 * 3 * 4 and rate["mma_per_s"] > 0
    assert rate["bit_products_per_s"] == pytest.approx(rate["mma_per_s"] * 32768)


def test_profile_launches_each_chosen_convolution_between_profiler_start_and_stop(wide_flatbuffer, on_cpu, capsys):
    script = load_script("profile_gpu")
    graph = read_graph(wide_flatbuffer, "wide")
    shapes = [key[:3] for key, _ in script.benchmark_gpu.binary_conv_shapes(graph)]
    wide, narrow = next(s for s in shapes if s[1] > 32), next(s for s in shapes if s[1] <= 32)
    rows = script.profile(wide_flatbuffer, batch=1, shapes=(wide, narrow, (999, 1, 1)), runs=1, device="cpu")
    assert "no 999x999x1 -> 1 binary convolution in this model" in capsys.readouterr().out
    # small grids here (at most 132 blocks): the default (32-row tiles on a grid of up to 66 blocks of 128 rows),
    # the word-by-word gather (more than 32 channels in), 64- and 32-row tiles
    wide_input, narrow_input = f"{wide[0]}x{wide[0]}x{wide[1]}", f"{narrow[0]}x{narrow[0]}x{narrow[1]}"
    # and, where PyTorch is installed, cuDNN's bf16 convolution of the first shape (no time on the CPU)
    torch = importlib.util.find_spec("torch") is not None
    assert [(r["input"], r["kernels"]) for r in rows] == [
        (wide_input, "default"), (wide_input, "word-by-word gather"), (wide_input, "64-row tiles"),
        (wide_input, "32-row tiles"), (narrow_input, "default"), (narrow_input, "64-row tiles"),
        (narrow_input, "32-row tiles")] + ([(wide_input, "cuDNN bf16")] if torch else [])
    rows = rows[:7]
    assert all(r["ms"] > 0 and r["mma"] > 0 and r["binary_bytes"] > 0 for r in rows)
    assert rows[2]["mma"] == script.conv_mmas(1, wide[0], wide[1], wide[2], tile_rows=64)
    # each launched once more between cudaProfilerStart and Stop (and nothing else)
    assert fake_cupy.PROFILER == ["start"] + ["bconv2d_tensor_cores_rows32"] * 2 + [
        "bconv2d_tensor_cores_rows64", "bconv2d_tensor_cores_rows32", "bconv2d_tensor_cores_rows32",
        "bconv2d_tensor_cores_rows64", "bconv2d_tensor_cores_rows32", "stop"]
    text = script.report(rows, {"ms": 1.0, "mma": 100, "mma_per_s": 1e11, "bit_products_per_s": 3.2768e15}, 4.8e12)
    assert text.startswith("1-bit MMA rate: 100.0 G m16n8k256 MMAs/s = 3277 T 1-bit products/s")
    assert len(text.splitlines()) == 3 + len(rows)


def test_report_by_hand():
    script = load_script("profile_gpu")
    row = {"input": "128x128x64", "cout": 64, "batch": 32, "kernels": "default", "ms": 0.1, "mma": 786432,
           "binary_bytes": 138_000_000}
    bf16 = {"input": "128x128x64", "cout": 64, "batch": 32, "kernels": "cuDNN bf16", "ms": 0.08, "bf16_bytes": 134_000_000}
    text = script.report([row, bf16], {"ms": 1.0, "mma": 1, "mma_per_s": 2e11, "bit_products_per_s": 1}, 4.8e12)
    # 786432 MMAs at 2e11/s: 0.0039 ms; 138 MB in 0.1 ms: 1380 GB/s, 29%; bf16 134 MB in 0.08 ms: 1675 GB/s, 35%
    assert "| 128x128x64 | 64 | 32 | default | 0.1000 | 786432 | 0.0039 | 138.0 | 1380 | 29% |" in text
    assert "| 128x128x64 | 64 | 32 | cuDNN bf16 | 0.0800 | n/a | n/a | 134.0 | 1675 | 35% |" in text
    json.dumps(row)


def test_command_line(wide_flatbuffer, on_cpu, monkeypatch, tmp_path, capsys):
    """As on the GPU machine: the prepared folder in, the rate, the rows and their table out."""
    monkeypatch.setattr(fake_cupy.Device, "multiprocessors", 2)
    script = load_script("profile_gpu")
    (tmp_path / (script.benchmark_gpu.DEFAULT + ".tflite")).write_bytes(wide_flatbuffer)
    graph = read_graph(wide_flatbuffer, "wide")
    size, cin, cout = next(key[:3] for key, _ in script.benchmark_gpu.binary_conv_shapes(graph) if key[1] > 32)
    script.main(["--assets", str(tmp_path), "--shapes", f"{size}x{cin}x{cout}", "--batch", "1", "--runs", "1",
                 "--iterations", "1", "--device", "cpu", "--model-batch", "2", "--json", str(tmp_path / "profile.json")])
    result = json.loads((tmp_path / "profile.json").read_text())
    assert result["mma_rate"]["mma"] == 2 * 8 * 8 * 1 * 4  # 2 SMs x 8 blocks of 8 warps, 1 iteration of 4
    # 2 SMs: the one block of 128 rows is a small grid
    torch = importlib.util.find_spec("torch") is not None
    assert [r["kernels"] for r in result["rows"]] == ["default", "word-by-word gather", "64-row tiles", "32-row tiles"] + (
        ["cuDNN bf16"] if torch else [])
    out = capsys.readouterr().out
    assert f"| {size}x{size}x{cin} | {cout} | 1 | word-by-word gather |" in out and "1-bit MMA rate:" in out
    # the whole model's kernels: PyTorch's profiler records none on the CPU (no CUDA activity there);
    # without PyTorch it says why there is no breakdown
    assert result["model_kernels"] == []
    assert torch or "no kernel breakdown: No module named 'torch'" in out


def test_kernel_rows_and_their_report_by_hand():
    """PyTorch profiler's averages over 4 runs as kernel rows (CPU-side events left out, a launch
    call carrying its kernel's time among them; the time attribute of PyTorch before 2.4 taken
    too), largest first, and their table's shares."""
    from types import SimpleNamespace as Event

    script = load_script("profile_gpu")
    cpu, gpu = Event(name="CPU"), Event(name="CUDA")
    events = [Event(key="im2col", count=4, device_time_total=2000.0, device_type=gpu),
              Event(key="aten::empty", count=8, device_time_total=0.0, device_type=cpu),
              Event(key="cuLaunchKernel", count=64, device_time_total=16000.0, device_type=cpu),
              Event(key="bconv2d_tensor_cores", count=40, device_time_total=6000.0, device_type=gpu),
              Event(key="sm90_xmma_gemm_f32f32", count=20, cuda_time_total=8000.0, device_type=gpu)]
    rows = script.kernel_rows(events, runs=4)
    assert rows == [{"kernel": "sm90_xmma_gemm_f32f32", "launches": 5, "ms": 2.0},
                    {"kernel": "bconv2d_tensor_cores", "launches": 10, "ms": 1.5},
                    {"kernel": "im2col", "launches": 1, "ms": 0.5}]
    text = script.kernels_report(rows, 64)
    assert text.splitlines()[0] == "the default model at batch 64, steps launched from Python: 4.000 ms of kernels a run"
    assert "| bconv2d_tensor_cores | 10 | 1.500 | 37.5% |" in text and "| im2col | 1 | 0.500 | 12.5% |" in text
