"""scripts/benchmark_gpu.py's parts that need no GPU, checked here so that the GPU session spends its
minutes measuring: the PyTorch float network it measures against (the same function as the
model, run on the CPU where PyTorch is installed) and the table it writes."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from larq_landmarks.runtime import Engine, cuda
from larq_landmarks.runtime.graph import read_graph

from script_modules import load_script


def _script():
    return load_script("benchmark_gpu")


def _peaks(heatmaps):
    batch, height, width, count = heatmaps.shape
    return heatmaps.transpose(0, 3, 1, 2).reshape(batch, count, -1).argmax(-1)


needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed (the GPU machine has it)")


@pytest.fixture(scope="module")
def small_flatbuffer(small_file):
    with open(small_file, "rb") as f:
        return f.read()


@needs_torch
def test_pytorch_baseline_is_the_models_function(small_flatbuffer):
    """The float baseline (the .tflite's graph op by op in PyTorch, binary convolutions as float
    convolutions of +-1 values) gives this runtime's heatmaps in float32, to rounding. In bfloat16
    it runs (it is timed, not compared: rounding before each sign flips bits, and the heatmaps move
    by a quarter of their size on this model)."""
    import torch

    flatbuffer = small_flatbuffer
    images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    expected = Engine(flatbuffer).predict(images)
    script = _script()
    graph = read_graph(flatbuffer, "small")
    with torch.no_grad():
        network = script.torch_network(graph, torch.float32, device="cpu")
        half = script.torch_network(graph, torch.bfloat16, device="cpu")(torch.tensor(images)).numpy()
        x = torch.tensor(images)

        def host_copy(*args, **kwargs):
            raise AssertionError("a tensor made from host data during a call (a CUDA graph capture refuses it)")

        with pytest.MonkeyPatch.context() as patch:  # everything made once, when the network is built
            patch.setattr(torch, "tensor", host_copy)
            got = network(x).numpy()
    assert got.shape == half.shape == expected.shape
    assert np.abs(got - expected).mean() <= 1e-4 * np.abs(expected).mean()
    assert np.mean(_peaks(got) == _peaks(expected)) >= 0.99
    assert np.isfinite(half).all()


@needs_torch
def test_agreement_runs_the_float32_network_with_tf32_off(small_flatbuffer, tmp_path, monkeypatch):
    """PyTorch lets cuDNN run float32 convolutions in TF32 unless told not to; the agreement check
    turns TF32 off for its run (and back as it was after), as the float32 timings do."""
    import torch

    script = _script()
    images = np.random.default_rng(5).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    np.savez(tmp_path / (script.DEFAULT + ".npz"), images=images, cpu_output=Engine(small_flatbuffer).predict(images))
    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    seen = []
    build = script.torch_network

    def recording_network(*args, **kwargs):
        network = build(*args, **kwargs)
        return lambda x: (seen.append([flag.allow_tf32 for flag in flags]), network(x))[1]

    monkeypatch.setattr(script, "torch_network", recording_network)
    saved = [flag.allow_tf32 for flag in flags]  # (monkeypatch cannot restore cuBLAS's: set by hand)
    try:
        for flag in flags:
            flag.allow_tf32 = True
        result = script.agreement(small_flatbuffer, str(tmp_path), device="cpu")
        after = [flag.allow_tf32 for flag in flags]
    finally:
        for flag, value in zip(flags, saved):
            flag.allow_tf32 = value
    assert seen == [[False, False]] and after == [True, True]
    assert result["same_peaks"] >= 0.99 and result["mean_abs_difference_ratio"] < 1e-4


def test_markdown_section_has_the_ratios_and_replaces_the_last_one(tmp_path, monkeypatch):
    layer = {"input": "64x64x128", "filter": "3x3, 128 out, stride 1", "batch": 32, "float32_ms": 2.0, "tf32_ms": 1.0,
             "bf16_ms": 0.8, "cuda_ms": 0.5, "cuda-popcount_ms": 1.5, "float32_gpu_ms": 1.8, "tf32_gpu_ms": 0.9,
             "bf16_gpu_ms": 0.6, "cuda_gpu_ms": 0.3, "cuda-popcount_gpu_ms": None, "cuda-register-loads_gpu_ms": 0.45,
             "cuda-async-copies_gpu_ms": 0.3, "blocks": 2048, "cuda-rows64_gpu_ms": 0.35, "cuda-rows32_gpu_ms": 0.4,
             "words": 4, "cuda-word-gather_gpu_ms": 0.3, "cuda-stepped-gather_gpu_ms": 0.24}
    script = _script()
    # the least traffic by hand: 32 x 64 x 64 pixels in and out, 4 words of bits in, 128 floats out,
    # 9 x 4 x 128 filter words; bf16: 128 values in and out a pixel, 9 x 128 x 128 filter values
    layer.update(script.least_traffic(32, 64, 128, 128, 3, 1))
    assert layer["binary_bytes"] == 4 * (131072 * 4 + 9 * 4 * 128 + 131072 * 128) == 69224448
    assert layer["bf16_bytes"] == 2 * (131072 * 128 + 9 * 128 * 128 + 131072 * 128) == 67403776
    assert layer["float32_bytes"] == 2 * layer["bf16_bytes"]
    engines = {"larq_landmarks.runtime (cuda)": (1.5, 20.0), "same network in PyTorch, float32 (cuDNN, TF32 off)": (
        2.0, 64.0), "larq_landmarks.runtime (cuda, stepped gather)": (1.4, 18.0),
        "larq_landmarks.runtime (cuda, word-by-word gather)": (1.5, 20.0)}
    whole = [{"engine": name, "batch": batch, "ms": ms[i]} for name, ms in engines.items()
             for i, batch in enumerate((1, 64))]
    whole[1]["breakdown_ms"] = {"binary convs": 12.0, "float convs": 8.0}
    whole[1]["float_steps"] = [{"step": "CONV_2D+LceQuantize", "output": "64x128x128x64", "ms": 1.234}]
    whole.append({"engine": "PyTorch, CUDA graph", "batch": 1, "ms": 0.9})  # a batch it has no time for
    whole.append({"engine": "larq_landmarks.runtime (cuda-popcount)", "batch": 1, "ms": 3.0,
                  "capture_failed": "NotImplementedError()"})  # ran step by step: labelled so
    predictor = [{"engine": "cuda", "threads": 1, "faces": 256, "batch": 64, "s": 0.128},
                 {"engine": "runtime", "threads": 16, "faces": 256, "batch": 64, "error": "ImportError('no kernels')"}]
    first = dict(layer, input="128x128x64", filter="3x3, 32 out, stride 1")  # run after it (batch by batch)
    small = dict(layer, input="8x8x64", filter="3x3, 64 out, stride 1", blocks=16)
    result = {"gpu": "NVIDIA H200", "date": "2026-11-29", "memory_bandwidth": 4.8e12, "multiprocessors": 132,
              "layers": [layer, first, small],
              "whole_model": whole,
              "predictor": predictor, "agreement": {"same_peaks": 1.0, "mean_abs_difference_ratio": 1e-7}}
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## CPU\n\ntext\n\n## Bit-packed inference on an NVIDIA GPU (old)\n\nold\n\n## After\n\nkept\n")
    script.write_markdown(str(path), result)
    script.write_markdown(str(path), result)
    text = path.read_text()
    assert text.count("## Bit-packed inference on an NVIDIA GPU") == 1 and "old" not in text
    assert "## CPU\n\ntext" in text and "## After\n\nkept" in text
    assert "(NVIDIA H200, 2026-11-29)" in text
    assert "| 64x64x128 | 3x3, 128 out, stride 1 | 32 | 2.000 | 1.000 | 0.800 | 0.500 | 1.500 | 4.0x | 1.6x |" in text
    assert "| 64x64x128 | 3x3, 128 out, stride 1 | 32 | 1.800 | 0.900 | 0.600 | 0.300 | n/a | 6.0x | 2.0x |" in text
    assert text.count("| input | filter | batch |") == 6  # per call, GPU alone, loads, tiles, gathers, traffic
    assert text.index("| 128x128x64 | 3x3, 32 out") < text.index("| 64x64x128 | 3x3, 128 out")  # larger input first
    # register loads vs cp.async, and which the default takes: cp.async up to 132 blocks (the SMs)
    assert "| 64x64x128 | 3x3, 128 out, stride 1 | 32 | 2048 | 0.450 | 0.300 | 1.50x | registers |" in text
    assert "| 8x8x64 | 3x3, 64 out, stride 1 | 32 | 16 | 0.450 | 0.300 | 1.50x | cp.async |" in text
    assert "at most 132 blocks" in text
    # the tiles: 128 rows (cp.async), 64, 32, and the default's (cuda.small_grid_rows up to 132 blocks of 128:
    # 32 rows up to 66 blocks)
    assert "| 64x64x128 | 3x3, 128 out, stride 1 | 32 | 2048 | 0.3000 | 0.3500 | 0.4000 | 128 rows |" in text
    assert "| 8x8x64 | 3x3, 64 out, stride 1 | 32 | 16 | 0.3000 | 0.3500 | 0.4000 | 32 rows |" in text
    assert ("The default takes 128 where that grid has more than 132 blocks (the GPU's SMs), 64 where it has more "
            "than half that, else 32 (`cuda.small_grid_rows`).") in text
    # the word-by-word gather against the stepped one: 0.3 / 0.24 ms
    assert "| 64x64x128 | 3x3, 128 out, stride 1 | 32 | 4 | 0.3000 | 0.2400 | 1.25x |" in text
    assert "The default: stepped (`cuda.STEPPED_GATHER`)." in text
    monkeypatch.setattr(cuda, "SMALL_GRID_ROWS", 128)
    monkeypatch.setattr(cuda, "STEPPED_GATHER", False)
    script.write_markdown(str(path), result)
    text = path.read_text()
    assert "| 8x8x64 | 3x3, 64 out, stride 1 | 32 | 16 | 0.3000 | 0.3500 | 0.4000 | 128 rows |" in text
    assert "The default takes 128 on every grid" in text
    assert "The default: word by word (`cuda.STEPPED_GATHER`)." in text
    monkeypatch.setattr(cuda, "SMALL_GRID_ROWS", 32)
    script.write_markdown(str(path), result)
    text = path.read_text()
    assert "| 8x8x64 | 3x3, 64 out, stride 1 | 32 | 16 | 0.3000 | 0.3500 | 0.4000 | 32 rows |" in text
    assert "more than 132 blocks (the GPU's SMs), else 32." in text
    # 69.22 MB in 0.3 ms: 231 GB/s, 4.8% of 4.8 TB/s; bf16 67.40 MB in 0.6 ms: 112 GB/s, 2.3%
    assert "(4800 GB/s, from its memory clock and bus width)" in text
    assert "| 64x64x128 | 3x3, 128 out, stride 1 | 32 | 69.22 | 231 | 5% | 67.40 | 112 | 2% |" in text
    assert "| larq_landmarks.runtime (cuda) | 1.50 | 20.0 | 3200 | 3.20x |" in text  # 64 / 20 ms, 64 ms / 20 ms
    assert "| PyTorch, CUDA graph | 0.90 | n/a | n/a | n/a |" in text
    assert "| larq_landmarks.runtime (cuda-popcount) (graph capture failed: steps launched from Python) | 3.00 |" in text
    assert "of the mean.\n\n## After" in text  # one blank line before the next section
    assert "| binary convs | 12.00 |" in text and "100.0% of the heatmap peaks equal, mean absolute difference 1e-05% of the mean." in text
    assert "| CONV_2D+LceQuantize | 64x128x128x64 | 1.23 |" in text
    # the open choices: the small grids' tile (one small-grid row: 0.3 ms at 128 rows, 0.35 at 64, 0.4 at 32;
    # the default is 32 rows since the monkeypatch above) and the gather (0.3 ms word by word, 0.24 stepped on
    # each of the 3 rows: 1.25x)
    assert ("- Small grids' tile (`cuda.SMALL_GRID_ROWS`): whole model, the default (32 rows) batch 1 1.50 ms, "
            "batch 64 20.00 ms; 128 rows not run; 64 rows not run; 32 rows not run. On the 1 small-grid rows, "
            "against 128 rows: 64 rows 0.86x on average, faster on 0 of 1 shapes; 32 rows 0.75x on average, faster "
            "on 0 of 1 shapes.") in text
    assert ("- Gather (`cuda.STEPPED_GATHER`, now False): whole model word by word batch 1 1.50 ms, batch 64 20.00 ms; "
            "stepped batch 1 1.40 ms, batch 64 18.00 ms. Per shape, stepped against word by word: 1.25x on average, "
            "faster on 3 of 3 shapes.") in text
    assert "| CUDA engine (crops and decoding on the GPU) | 2000 | 0.50 |" in text  # 256 / 0.128 s
    assert "| CPU runtime, 16 threads | not run: ImportError('no kernels') | |" in text
    # a run cut short (the layers part unfinished, one shape saved): written from its JSON, no GPU needed
    partial = dict(result, layers=[layer])
    del partial["whole_model"]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    script.main(["--from-json", str(tmp_path / "partial.json"), "--markdown", str(path)])
    text = path.read_text()
    assert text.count("| 64x64x128 | 3x3, 128 out, stride 1 | 32 |") == 6 and "### The whole default model" not in text
    # a JSON from before the loads were chosen by the grid (2026-12-04, morning): no loads, tiles or gathers table
    del layer["cuda-async-copies_gpu_ms"], layer["blocks"], layer["cuda-rows64_gpu_ms"], layer["cuda-rows32_gpu_ms"]
    del layer["cuda-word-gather_gpu_ms"], layer["cuda-stepped-gather_gpu_ms"]
    (tmp_path / "old.json").write_text(json.dumps(dict(partial, layers=[layer])))
    script.main(["--from-json", str(tmp_path / "old.json"), "--markdown", str(path)])
    assert path.read_text().count("| 64x64x128 | 3x3, 128 out, stride 1 | 32 |") == 3
    assert "## CPU\n\ntext" in text and "## After\n\nkept" in text


@needs_torch
@pytest.mark.slow
def test_benchmark_runs_on_the_cpu_build_of_the_gpu_kernels(small_flatbuffer, tmp_path, monkeypatch):
    """The benchmark's GPU parts end to end with kernels.cu built for the CPU standing in for CuPy
    (fake_cupy) and PyTorch on the CPU: every shape row and engine row has its times, and the
    markdown table is written from them (the times themselves mean nothing here)."""
    import fake_cupy

    fake_cupy.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy.module())
    script = _script()
    rows = script.layers(small_flatbuffer, [1], runs=1, device="cpu")
    graph = read_graph(small_flatbuffer, "small")
    shapes = {(graph.tensors[op.inputs[0]].shape[1], op.options["channels_in"], graph.tensors[op.inputs[1]].shape[0])
              for op in graph.operators if op.name == "LceBconv2d" and graph.tensors[op.inputs[1]].shape[1] == 3}
    assert len(rows) == len(shapes) > 3
    assert all(r[f"{k}_ms"] > 0 for r in rows for k in ("cuda", "cuda-popcount", "float32", "tf32", "bf16"))
    whole = script.whole_model(small_flatbuffer, runs=1, batches=(1, 2), device="cpu")
    engines = ["larq_landmarks.runtime (cuda)", "larq_landmarks.runtime (cuda, steps launched from Python)",
               "larq_landmarks.runtime (cuda, HPM block ops as separate passes)",
               "larq_landmarks.runtime (cuda, 128-row tiles on every grid)",
               "larq_landmarks.runtime (cuda, 64-row tiles on small grids)",
               "larq_landmarks.runtime (cuda, 32-row tiles on small grids)",
               "larq_landmarks.runtime (cuda, stepped gather)", "larq_landmarks.runtime (cuda, word-by-word gather)",
               "larq_landmarks.runtime (cuda-popcount)",
               "same network in PyTorch, float32 (cuDNN, TF32 off)",
               "same network in PyTorch, bfloat16 (cuDNN)"]  # no CUDA graph rows for PyTorch on the CPU
    assert [(r["engine"], r["batch"]) for r in whole] == [(e, b) for b in (1, 2) for e in engines]
    assert all(r["ms"] > 0 for r in whole) and not [r for r in whole if "capture_failed" in r]  # graphs replayed
    steps = next(r for r in whole if r["batch"] == 2 and r["engine"].endswith("steps launched from Python)"))
    assert set(steps["breakdown_ms"]) >= {"binary convolutions", "float convolutions"}
    assert [r["step"] for r in steps["float_steps"]] == [name for name, _, _ in Engine(
        small_flatbuffer, kernels="cuda").profile(np.zeros((2, 64, 64, 3), np.float32)) if "CONV_2D" in name]
    assert all(r["ms"] > 0 and r["output"].startswith("2x") for r in steps["float_steps"])
    # the runtime's calls captured and replayed as a graph (fake_cupy's stream capture); no CUDA graphs for PyTorch on the CPU
    assert all(r["cuda_gpu_ms"] > 0 and r["cuda-popcount_gpu_ms"] > 0 and r["cuda-register-loads_gpu_ms"] > 0
               and r["cuda-async-copies_gpu_ms"] > 0 and r["cuda-rows64_gpu_ms"] > 0 and r["cuda-rows32_gpu_ms"] > 0
               and r["cuda-word-gather_gpu_ms"] > 0 and r["cuda-stepped-gather_gpu_ms"] > 0
               and r["float32_gpu_ms"] is None for r in rows)
    assert all(r["blocks"] >= 1 for r in rows)

    # the command line, as on the GPU machine: the prepared folder in, JSON and the markdown section out
    (tmp_path / (script.DEFAULT + ".tflite")).write_bytes(small_flatbuffer)
    images = np.random.default_rng(5).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    np.savez(tmp_path / (script.DEFAULT + ".npz"), images=images, cpu_output=Engine(small_flatbuffer).predict(images))
    path = tmp_path / "benchmarks.md"
    script.main(["--assets", str(tmp_path), "--json", str(tmp_path / "result.json"), "--markdown", str(path),
                 "--batches", "1", "--model-batches", "1,2", "--runs", "1", "--device", "cpu", "--faces", "10"])
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["layers"]) == len(rows) and len(result["whole_model"]) == 22  # 11 engines, 2 batches
    # Predictor end to end on both engines: 10 faces rounded up to whole images of 4
    assert [(r["engine"], r["faces"], r["batch"]) for r in result["predictor"]] == [("cuda", 12, 64), ("runtime", 12, 64)]
    assert all(r["s"] > 0 for r in result["predictor"])
    assert result["agreement"]["same_peaks"] >= 0.99 and result["agreement"]["mean_abs_difference_ratio"] < 1e-4
    text = path.read_text()
    # per call, on the GPU alone (graph-replayed), the tensor-core kernel's two ways of loading, its tiles,
    # the two gathers, and the traffic (the bandwidth unknown without a GPU)
    assert text.count("| 3x3, ") == 6 * len(rows) and "bandwidth (not known here)" in text
    assert result["memory_bandwidth"] is None and all(r["binary_bytes"] > 0 for r in result["layers"])
    assert "| batch 2 (images/s) |" in text and "heatmap peaks" in text
    assert "| CUDA engine (crops and decoding on the GPU) | " in text and f"| CPU runtime, {os.cpu_count()} threads | " in text


@pytest.mark.slow  # the default 256x256 model and a random network converted: about 10 s
def test_prepare_writes_the_default_model_and_the_fuzz_networks_with_their_cpu_outputs(tmp_path, monkeypatch):
    """``--prepare``: each model as NAME.tflite with NAME.npz (images and the CPU runtime's output on
    them), the fuzz seeds' networks among them, as the GPU tests read the folder."""
    import subprocess

    script = _script()
    fuzz = load_script("fuzz_runtime")
    seed = next(s for s in range(7000, 7200) if fuzz.random_configuration(s)["kwargs"]["input_size"] <= 32
                and fuzz.random_configuration(s)["kwargs"]["width"] <= 24)
    monkeypatch.setattr(script, "FUZZ_SEEDS", (seed,))
    monkeypatch.setattr(script.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "offline"))
    from larq_landmarks import models

    monkeypatch.setattr(models, "named_configurations", lambda: {})
    script.prepare(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}.{ext}" for name in (script.DEFAULT, f"fuzz_seed_{seed}")
                                                  for ext in ("tflite", "npz"))
    config = fuzz.random_configuration(seed)
    size = config["kwargs"]["input_size"]
    data = np.load(tmp_path / f"fuzz_seed_{seed}.npz")
    assert data["images"].shape == (config["batch"], size, size, 3)
    engine = Engine(str(tmp_path / f"fuzz_seed_{seed}.tflite"))
    assert engine.input_shape[1:] == (size, size, 3)
    np.testing.assert_array_equal(engine.predict(data["images"]), data["cpu_output"])
    np.testing.assert_array_equal(data["images"], fuzz.seed_network(seed)[1])  # the fuzz run's own images
