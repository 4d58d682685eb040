"""The runtime's CUDA backend against cuDNN's float convolutions, on the GPU machine (numpy, CuPy
and PyTorch; no TensorFlow there).

    # here, with TensorFlow: the default model, the named configurations and some of fuzz_runtime's
    # random networks as .tflite files, with the CPU runtime's outputs for the GPU tests, and the
    # pure-Python wheels the GPU machine lacks
    python scripts/benchmark_gpu.py --prepare gpu_assets
    # on the GPU machine: the GPU tests, then this benchmark (scripts/gpu_session.sh runs both)
    python scripts/benchmark_gpu.py --assets gpu_assets --json results.json --markdown docs/benchmarks.md
    # anywhere: the markdown from a saved JSON (a run cut short by a time limit keeps what it measured)
    python scripts/benchmark_gpu.py --from-json results.json --markdown docs/benchmarks.md

Part 1 (run second), every distinct binary 3x3 conv shape of the default model at batch 1, 32
and 128: this runtime's kernel (bit-packed input, float output with LCE's output transform; tensor
cores and the popcount fallback) against PyTorch's ``conv2d`` (cuDNN, channels-last) in float32
with TF32 off (the papers' comparison), TF32 and bfloat16, per call and on the GPU alone (CUDA
graphs), with each side's least memory traffic against the GPU's bandwidth. Part 2 (run first),
the whole default model: batch 1 latency and batch 64 throughput, this runtime (with and without
its CUDA graphs, and with the HPM block ops as separate passes) against the same network in
float32 and bfloat16 (the .tflite's graph run op by op in PyTorch, binary convolutions as float
convolutions of the +-1 values; eagerly and as a CUDA graph). Times are CUDA-event medians.
"""
import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # fuzz_runtime's networks, for --prepare

DEFAULT = "binary_hpm_default"
# pure-Python wheels the GPU machine may lack (it has no package index), installed there without
# their dependencies: so pytest's own are listed (pygments since pytest 8.4; exceptiongroup, with
# typing_extensions, and tomli on Python 3.10)
GPU_WHEELS = ("tflite", "flatbuffers", "pytest", "pluggy", "iniconfig", "packaging", "pygments", "exceptiongroup",
              "typing_extensions", "tomli", "pybind11", "tqdm")


# --- preparing the models (with TensorFlow) -----------------------------------------------------
# random networks of scripts/fuzz_runtime.py (each passed its --cuda checks on kernels.cu built for the
# CPU, 2026-12-02): bottleneck blocks, average pooling, segmentation, two stacks, binary skips,
# ReLUs, the authors' padding, widths 8 to 100, 5 to 68 points, batches 1 to 3
FUZZ_SEEDS = (7001, 7007, 7012, 7036, 7045, 7051, 7095, 7117)


def prepare(folder: str) -> None:
    """The default model (256 x 256, 68 points), every named binary configuration (small, as the
    CPU parity test builds them) and the networks of :data:`FUZZ_SEEDS`, each as ``NAME.tflite``
    with ``NAME.npz`` (images and this runtime's CPU output)."""
    import warnings

    import larq_landmarks  # noqa: F401
    import tensorflow as tf
    from larq_landmarks import export, models
    from larq_landmarks.runtime import Engine
    from larq_landmarks.synthetic import trained_like_batch_norm

    from fuzz_runtime import seed_network

    def images(size, batch):
        return np.random.default_rng(1).uniform(size=(batch, size, size, 3)).astype(np.float32)

    os.makedirs(folder, exist_ok=True)
    built = {DEFAULT: (trained_like_batch_norm(models.BinaryHourglass(68)), images(256, 2))}
    for name, config in models.named_configurations().items():
        if config["kwargs"].get("binary", True):
            tf.keras.utils.set_random_seed(0)
            model = models.build_named(name, 68, input_size=64, width=48, depth=2)
            built[name] = (trained_like_batch_norm(model), images(64, 3))
    for seed in FUZZ_SEEDS:
        built[f"fuzz_seed_{seed}"] = seed_network(seed)
    for name, (model, inputs) in built.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flatbuffer = export.convert(model, os.path.join(folder, name + ".tflite"))
        np.savez(os.path.join(folder, name + ".npz"), images=inputs, cpu_output=Engine(flatbuffer).predict(inputs))
        print("prepared", name, flush=True)
    # what the GPU machine lacks and has no index to fetch: the .tflite schema, pytest, pybind11, tqdm (GPU_WHEELS)
    wheels = os.path.join(folder, "wheels")
    # their pure-Python builds (one that is compiled for this Python, as tomli's is, would make the
    # GPU machine's pip refuse the whole install on another Python)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                             "--platform", "any", "--implementation", "py", "--python-version", "3.10", "-d", wheels,
                             *GPU_WHEELS], capture_output=True, text=True)
    print("wheels for the GPU machine:", ", ".join(sorted(os.listdir(wheels))) if result.returncode == 0
          else f"not downloaded ({result.stderr.strip()[-300:]})", flush=True)


# --- the same network in PyTorch, float ---------------------------------------------------------
def torch_network(graph, dtype, device: str = "cuda"):
    """The graph run op by op with PyTorch (NCHW, channels-last memory) on ``device``: bit-packed
    tensors are +-1 floats and LceBconv2d a float convolution of them, with LCE's output transform."""
    import torch
    import torch.nn.functional as F

    from larq_landmarks.runtime.ops import _nearest_indices, _same_padding

    def constant(index, shape_like=None):
        data = graph.tensors[index].data.astype(np.float32)
        t = torch.tensor(data, device=device, dtype=dtype)
        if data.ndim >= 1 and data.size > 1:
            t = t.reshape(1, -1, 1, 1)
        return t

    def same(x, fh, fw, sh, sw, dh, dw, padding, value=0.0):
        h, w = x.shape[2], x.shape[3]
        out_h, top = _same_padding(h, fh, sh, dh, padding)
        out_w, left = _same_padding(w, fw, sw, dw, padding)
        bottom = max((out_h - 1) * sh + (fh - 1) * dh + 1 - h - top, 0)
        right = max((out_w - 1) * sw + (fw - 1) * dw + 1 - w - left, 0)
        return F.pad(x, (left, right, top, bottom), value=value) if (top or bottom or left or right) else x

    activations = {0: None, 1: (0.0, None), 2: (-1.0, 1.0), 3: (0.0, 6.0)}

    def activate(x, code):
        bounds = activations[code]
        return x if bounds is None else torch.clamp(x, bounds[0], bounds[1])

    steps = []
    for op in graph.operators:
        o = op.options
        if op.name == "LceQuantize":
            steps.append((op, lambda v, op=op: torch.where(v[op.inputs[0]] < 0, -1.0, 1.0).to(dtype)))
        elif op.name == "LceDequantize":
            steps.append((op, lambda v, op=op: v[op.inputs[0]]))
        elif op.name == "LceBconv2d":
            filters = graph.tensors[op.inputs[1]].data
            cout, fh, fw, _ = filters.shape
            cin = int(o["channels_in"])
            bits = np.unpackbits(filters.view(np.uint8), axis=-1, bitorder="little")[..., :cin]
            weight = torch.tensor((1.0 - 2.0 * bits).transpose(0, 3, 1, 2), device=device, dtype=dtype)
            weight = weight.contiguous(memory_format=torch.channels_last)
            packed = graph.tensors[op.outputs[0]].dtype == np.int32
            k_total = fh * fw * cin
            if packed:
                thresholds = torch.tensor(graph.tensors[op.inputs[4]].data.astype(np.float32), device=device,
                                          dtype=torch.float32).reshape(1, -1, 1, 1)
            else:
                post_mul, post_bias = constant(op.inputs[2]), constant(op.inputs[3])

            def run(v, op=op, weight=weight, fh=fh, fw=fw, packed=packed, k_total=k_total,
                    thresholds=thresholds if packed else None,
                    post=None if packed else (post_mul, post_bias)):
                o = op.options
                x = same(v[op.inputs[0]], fh, fw, o["stride_height"], o["stride_width"], 1, 1, o["padding"],
                         1.0 if o["pad_values"] == 1 else 0.0)
                dot = F.conv2d(x, weight, stride=(o["stride_height"], o["stride_width"]))
                if packed:
                    return torch.where((k_total - dot.float()) / 2 > thresholds, -1.0, 1.0).to(dtype)
                return activate(dot, o["fused_activation_function"]) * post[0] + post[1]

            steps.append((op, run))
        elif op.name == "CONV_2D":
            filters = graph.tensors[op.inputs[1]].data.astype(np.float32)
            weight = torch.tensor(filters.transpose(0, 3, 1, 2), device=device, dtype=dtype)
            weight = weight.contiguous(memory_format=torch.channels_last)
            bias = torch.tensor(graph.tensors[op.inputs[2]].data.astype(np.float32), device=device, dtype=dtype)

            def run(v, op=op, weight=weight, bias=bias):
                o = op.options
                fh, fw = weight.shape[2], weight.shape[3]
                x = same(v[op.inputs[0]], fh, fw, o.StrideH(), o.StrideW(), o.DilationHFactor(),
                         o.DilationWFactor(), o.Padding())
                y = F.conv2d(x, weight, bias, stride=(o.StrideH(), o.StrideW()),
                             dilation=(o.DilationHFactor(), o.DilationWFactor()))
                return activate(y, o.FusedActivationFunction())

            steps.append((op, run))
        elif op.name in ("ADD", "MUL"):
            consts = {i: constant(i) for i in op.inputs if graph.tensors[i].data is not None}

            def run(v, op=op, consts=consts):
                a, b = (consts[i] if i in consts else v[i] for i in op.inputs)
                y = a + b if op.name == "ADD" else a * b
                return activate(y, op.options.FusedActivationFunction() if op.options else 0)

            steps.append((op, run))
        elif op.name == "RELU":
            steps.append((op, lambda v, op=op: torch.relu(v[op.inputs[0]])))
        elif op.name == "CONCATENATION":
            steps.append((op, lambda v, op=op: torch.cat([v[i] for i in op.inputs], 1)))
        elif op.name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            def run(v, op=op):
                o = op.options
                k, s = (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW())
                x = same(v[op.inputs[0]], k[0], k[1], s[0], s[1], 1, 1, o.Padding(),
                         float("-inf") if op.name == "MAX_POOL_2D" else 0.0)
                return F.max_pool2d(x, k, s) if op.name == "MAX_POOL_2D" else F.avg_pool2d(x, k, s)

            steps.append((op, run))
        elif op.name == "RESIZE_NEAREST_NEIGHBOR":
            size = tuple(int(s) for s in graph.tensors[op.inputs[1]].data.reshape(-1))
            _, height, width, _ = graph.tensors[op.inputs[0]].shape
            corners, centers = bool(op.options.AlignCorners()), bool(op.options.HalfPixelCenters())
            # the indices on the device once: a copy from the host in each call would stop a CUDA
            # graph's capture ("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
            ys = torch.tensor(_nearest_indices(height, size[0], corners, centers), device=device)
            xs = torch.tensor(_nearest_indices(width, size[1], corners, centers), device=device)

            def run(v, op=op, ys=ys, xs=xs):
                return v[op.inputs[0]][:, :, ys][:, :, :, xs]

            steps.append((op, run))
        else:
            raise ValueError(f"the PyTorch baseline has no {op.name}")

    def forward(images_nhwc):
        v = {graph.inputs[0]: images_nhwc.permute(0, 3, 1, 2).to(dtype).contiguous(memory_format=torch.channels_last)}
        for op, run in steps:
            v[op.outputs[0]] = run(v)
        return v[graph.outputs[0]].permute(0, 2, 3, 1).float()

    return forward


@contextlib.contextmanager
def _float32_exact():
    """PyTorch's float32 convolutions and products in float32 (TF32 off) inside, as before after."""
    import torch

    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    saved = [flag.allow_tf32 for flag in flags]
    try:
        for flag in flags:
            flag.allow_tf32 = False
        yield
    finally:
        for flag, value in zip(flags, saved):
            flag.allow_tf32 = value


# --- timing -------------------------------------------------------------------------------------
class _cupy_event:
    """A CuPy CUDA event with PyTorch's ``elapsed_time(end)``."""

    def __init__(self):
        import cupy as cp

        self.event = cp.cuda.Event()

    def record(self):
        self.event.record()

    def synchronize(self):
        self.event.synchronize()

    def elapsed_time(self, end) -> float:
        import cupy as cp

        return cp.cuda.get_elapsed_time(self.event, end.event)


def _time_cuda(function, runs: int, synchronize, event):
    """Median milliseconds of ``function()`` over ``runs`` timed groups, after warm-up."""
    for _ in range(3):
        function()
    synchronize()
    times = []
    for _ in range(runs):
        start, end = event(), event()
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def _torch_time(function, runs: int, device: str) -> float:
    """``_time_cuda`` for PyTorch work on ``device`` (CUDA events; wall clock on the CPU, for the
    tests)."""
    import torch

    if device == "cpu":
        return _time_cuda(function, runs, lambda: None, _WallEvent)
    return _time_cuda(function, runs, torch.cuda.synchronize, lambda: torch.cuda.Event(enable_timing=True))


class _WallEvent:
    """``perf_counter`` with the events' interface."""

    def record(self):
        self.time = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end) -> float:
        return 1000 * (end.time - self.time)


GRAPH_CALLS = 20  # calls captured in one CUDA graph for the device-time columns


def _cupy_graph_time(function, runs: int, calls: int = GRAPH_CALLS):
    """Milliseconds a call of ``function`` takes on the GPU alone: ``calls`` calls captured in one
    CUDA graph, the graph replayed ``runs`` times (median), divided by ``calls``. No Python between
    the kernels, so small shapes show the kernel, not the launch. None where capture fails."""
    stream = None
    try:
        import cupy as cp

        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            function()  # allocations and compilation before the capture
            stream.synchronize()
            stream.begin_capture()
            for _ in range(calls):
                function()
            graph = stream.end_capture()
        # replayed on the current stream, where the events are recorded
        return _time_cuda(graph.launch, runs, cp.cuda.get_current_stream().synchronize, _cupy_event) / calls
    except Exception as error:  # the per-call times do not depend on it
        print(f"CUDA graph timing failed: {error!r}", flush=True)
        try:  # leave no stream capturing behind
            if stream is not None and stream.is_capturing():
                stream.end_capture()
        except Exception:
            pass
        return None


def _torch_graph_time(function, runs: int, device: str, calls: int = GRAPH_CALLS):
    """:func:`_cupy_graph_time` for PyTorch (``torch.cuda.graph``); None on the CPU or where
    capture fails."""
    if device != "cuda":
        return None
    try:
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (cuDNN picks its algorithm) off the default stream
            for _ in range(3):
                function()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                function()
        return _torch_time(graph.replay, runs, device) / calls
    except Exception as error:
        print(f"CUDA graph timing failed: {error!r}", flush=True)
        return None


def binary_conv_shapes(graph) -> list:
    """The distinct 3x3 binary convolutions of a model's graph, largest input first: a list of
    ``((input size, channels in, channels out, filter size, stride), first LceBconv2d op of it)``."""
    shapes = {}
    for op in graph.operators:
        if op.name == "LceBconv2d":
            cout, k = graph.tensors[op.inputs[1]].shape[:2]
            size = graph.tensors[op.inputs[0]].shape[1]
            shapes.setdefault((size, op.options["channels_in"], cout, k, op.options["stride_height"]), op)
    return [(key, op) for key, op in sorted(shapes.items(), key=lambda kv: (-kv[0][0], -kv[0][1])) if key[3] == 3]


def binary_conv_step(graph, op, kernels, packed):
    """A function that runs the binary convolution ``op`` of ``graph`` on ``kernels`` for the
    bit-packed input ``packed`` (on their GPU), its output buffer recycled as the engine does."""
    from larq_landmarks.runtime import ops

    run = ops.lce_bconv2d(graph, op, kernels)
    values = ops.Values(len(graph.tensors), {}, kernels.empty)
    values[op.inputs[0]] = packed

    def step():
        run(values)
        values.release(values[op.outputs[0]])

    return step


def layers(flatbuffer: bytes, batches, runs: int, device: str = "cuda", rows=None, on_row=None):
    """Part 1's rows, appended to ``rows`` (a new list by default) one by one, ``on_row()`` after
    each (the caller saves them, so a run cut short keeps the shapes done)."""
    import cupy as cp
    import torch
    import torch.nn.functional as F

    from larq_landmarks.runtime import cuda
    from larq_landmarks.runtime.graph import read_graph

    graph = read_graph(flatbuffer, "default")

    def cupy_time(function):
        return _time_cuda(function, runs, cp.cuda.get_current_stream().synchronize, _cupy_event)

    def torch_time(function):
        return _torch_time(function, runs, device)

    graph_runs = max(3, runs // 2)  # each replay is GRAPH_CALLS calls

    rows = [] if rows is None else rows
    rng = np.random.default_rng(1)
    ordered = binary_conv_shapes(graph)
    # batch by batch (the first given first: 32, the targets' batch, by default), so that a run cut
    # short by its time limit has every shape at that batch
    for batch in batches:
        for (size, cin, cout, k, stride), op in ordered:
            macs = batch * (size // stride) ** 2 * k * k * cin * cout
            row = {"input": f"{size}x{size}x{cin}", "filter": f"{k}x{k}, {cout} out, stride {stride}",
                   "batch": batch, "macs": macs}
            row.update(least_traffic(batch, size, cin, cout, k, stride))
            packed = cp.asarray(rng.integers(-2**31, 2**31 - 1, (batch, size, size, (cin + 31) // 32),
                                             dtype=np.int64).astype(np.int32))
            # (row label, path, cp.async loads, tile rows, stepped gather, timed per call too): the default
            # kernels (loads and tile chosen by the grid's size), and on the GPU alone the tensor-core
            # kernel with 128-row tiles and each kind of loads, with the smaller tiles, and the
            # default with a row's words loaded up to 4 at a time
            row["blocks"] = -(-batch * (size // stride) ** 2 // cuda.BLOCK_ROWS) * -(-cout // cuda.BLOCK_CHANNELS)
            row["words"] = -(-cin // 32)
            for label, path, async_copies, tile_rows, stepped, per_call in (
                    ("cuda", "cuda", None, None, None, True), ("cuda-popcount", "cuda-popcount", None, None, None, True),
                    ("cuda-async-copies", "cuda", True, 128, None, False),
                    ("cuda-register-loads", "cuda", False, 128, None, False),
                    ("cuda-rows64", "cuda", True, 64, None, False), ("cuda-rows32", "cuda", True, 32, None, False),
                    ("cuda-word-gather", "cuda", None, None, False, False),
                    ("cuda-stepped-gather", "cuda", None, None, True, False)):
                step = binary_conv_step(graph, op, cuda.load(path, async_copies, tile_rows, stepped), packed)
                if per_call:
                    row[f"{label}_ms"] = cupy_time(step)
                row[f"{label}_gpu_ms"] = _cupy_graph_time(step, graph_runs)
            x = torch.randn(batch, cin, size, size, device=device).contiguous(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, k, k, device=device).contiguous(memory_format=torch.channels_last)
            for label, dtype, tf32 in (("float32", torch.float32, False), ("tf32", torch.float32, True),
                                       ("bf16", torch.bfloat16, False)):
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                xd, wd = x.to(dtype), w.to(dtype)
                row[f"{label}_ms"] = torch_time(lambda: F.conv2d(xd, wd, padding=k // 2, stride=stride))
                row[f"{label}_gpu_ms"] = _torch_graph_time(lambda: F.conv2d(xd, wd, padding=k // 2, stride=stride),
                                                           graph_runs, device)
            torch.backends.cudnn.allow_tf32 = False
            rows.append(row)
            print(json.dumps(row), flush=True)
            if on_row is not None:
                on_row()
            del packed, x, w
    return rows


@contextlib.contextmanager
def _kernel_defaults(small_grid_rows: Optional[int] = None, stepped_gather: Optional[bool] = None):
    """The engines made and first run inside take ``small_grid_rows``-row tiles on small grids
    (grids of no more 128-row blocks than the GPU has SMs) and load a row's words up to 4 at a time
    or not (``stepped_gather``), for comparing them on the whole model; None: the defaults
    (``cuda.SMALL_GRID_ROWS``, ``cuda.STEPPED_GATHER``)."""
    from larq_landmarks.runtime import cuda

    saved = cuda.SMALL_GRID_ROWS, cuda.STEPPED_GATHER
    cuda.SMALL_GRID_ROWS = small_grid_rows or saved[0]
    cuda.STEPPED_GATHER = saved[1] if stepped_gather is None else stepped_gather
    try:
        yield
    finally:
        cuda.SMALL_GRID_ROWS, cuda.STEPPED_GATHER = saved


def random_images(graph, batch: int) -> np.ndarray:
    """``batch`` float32 inputs of the model ``graph``, uniform in [0, 1) (the same each call)."""
    shape = (batch,) + tuple(graph.tensors[graph.inputs[0]].shape[1:])
    return np.random.default_rng(0).uniform(size=shape).astype(np.float32)


def whole_model(flatbuffer: bytes, runs: int, batches=(1, 64), device: str = "cuda"):
    import cupy as cp
    import torch

    from larq_landmarks.runtime import Engine
    from larq_landmarks.runtime.graph import read_graph

    graph = read_graph(flatbuffer, "default")
    results = []
    for batch in batches:
        images = random_images(graph, batch)
        device_images = cp.asarray(images)
        for path, graphs, fuse, small_rows, stepped, label in (
                ("cuda", True, True, None, None, "cuda"),
                ("cuda", False, True, None, None, "cuda, steps launched from Python"),
                ("cuda", True, False, None, None, "cuda, HPM block ops as separate passes"),
                ("cuda", True, True, 128, None, "cuda, 128-row tiles on every grid"),
                ("cuda", True, True, 64, None, "cuda, 64-row tiles on small grids"),
                ("cuda", True, True, 32, None, "cuda, 32-row tiles on small grids"),
                ("cuda", True, True, None, True, "cuda, stepped gather"),
                ("cuda", True, True, None, False, "cuda, word-by-word gather"),
                ("cuda-popcount", True, True, None, None, "cuda-popcount")):
            # (the kernels are loaded as the engine is made, the tile chosen at a layer's first launch)
            with _kernel_defaults(small_rows, stepped):
                engine = Engine(flatbuffer, kernels=path, name="default", cuda_graphs=graphs, fuse_blocks=fuse)
                # images already on the GPU stay there (no transfers, as for the PyTorch baselines);
                # the warm-up calls capture the engine's CUDA graph where it makes one
                ms = _time_cuda(lambda: engine.predict(device_images), runs, engine._kernels.synchronize, _cupy_event)
            results.append({"engine": f"larq_landmarks.runtime ({label})", "batch": batch, "ms": ms})
            if graphs and engine._captured.failed is not None:  # it ran step by step: the table says so
                results[-1]["capture_failed"] = engine._captured.failed
            if path == "cuda" and not graphs:
                results[-1]["breakdown_ms"] = breakdown(engine, device_images)
                results[-1]["float_steps"] = float_steps(engine, device_images)
            print(json.dumps(results[-1]), flush=True)
        x = torch.tensor(images, device=device)
        for label, dtype in (("float32 (cuDNN, TF32 off)", torch.float32), ("bfloat16 (cuDNN)", torch.bfloat16)):
            network = torch_network(graph, dtype, device)
            with torch.no_grad(), _float32_exact():
                ms = _torch_time(lambda: network(x), runs, device)
                graph_ms = _torch_graph_time(lambda: network(x), runs, device, calls=1)
            results.append({"engine": f"same network in PyTorch, {label}", "batch": batch, "ms": ms})
            print(json.dumps(results[-1]), flush=True)
            if graph_ms is not None:  # as our engine replays its graph: PyTorch's launches captured too
                results.append({"engine": f"same network in PyTorch, {label}, CUDA graph", "batch": batch,
                                "ms": graph_ms})
                print(json.dumps(results[-1]), flush=True)
        del x, device_images
    return results


def predictor_throughput(path: str, faces: int = 256, batch: int = 64, runs: int = 3) -> list:
    """``Predictor`` end to end, images in and landmarks out: ``faces`` face boxes, 4 to a 640x480
    uint8 image, through ``predict_many`` in calls of ``batch`` crops, on the CUDA engine (crops
    cut, heatmaps decoded on the GPU) and on the CPU runtime with every core. Median seconds of
    ``runs`` runs after a warm-up run (which captures the CUDA graphs); an engine that cannot run
    here gets its error instead."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range((faces + 3) // 4)]
    boxes = [[[20 + 150 * i, 120, 170 + 150 * i, 300] for i in range(4)] for _ in images]
    count = 4 * len(images)
    results = []
    for engine, threads in (("cuda", 1), ("runtime", os.cpu_count() or 1)):
        row = {"engine": engine, "threads": threads, "faces": count, "batch": batch}
        try:
            from larq_landmarks.predictor import Predictor  # Pillow needed

            predictor = Predictor.from_path(path, engine=engine, num_threads=threads)
            predictor.predict_many(images, boxes, batch_size=batch)
            times = []
            for _ in range(runs):  # the results come back as NumPy: each run ends synchronised
                start = time.perf_counter()
                predictor.predict_many(images, boxes, batch_size=batch)
                times.append(time.perf_counter() - start)
            row["s"] = float(np.median(times))
        except Exception as error:  # e.g. no C++ kernels built on this machine: the other row still counts
            row["error"] = repr(error)[:300]
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def breakdown(engine, images, repeats: int = 5) -> dict:
    """Milliseconds of GPU time per kind of op (``Engine.time_by_part``: CUDA events around each step,
    the steps queued as ``predict`` queues them; where the GPU waits for a launch, the wait counts)."""
    return {k: round(v, 2) for k, v in engine.time_by_part(images, repeats).items()}


def float_steps(engine, images, repeats: int = 5) -> list:
    """The float convolutions' steps (``Engine.profile``, with what is fused into them): name, output
    shape and GPU milliseconds, the median of ``repeats`` runs."""
    from larq_landmarks.runtime.engine import PARTS

    profiles = [engine.profile(images) for _ in range(repeats)]
    return [{"step": name, "output": "x".join(str(shape).strip("()").replace(" ", "").split(",")),
             "ms": round(1000 * float(np.median([p[i][2] for p in profiles])), 3)}
            for i, (name, shape, _) in enumerate(profiles[0]) if PARTS.get(name) == "float convolutions"]


def agreement(flatbuffer: bytes, assets: str, device: str = "cuda"):
    """The PyTorch float32 network against the CPU runtime's output (same landmarks?), with TF32
    off: PyTorch lets cuDNN's float32 convolutions use TF32 by default, whose products keep 10 bits
    of mantissa (on the H200, 2026-12-04, that moved 90% of the peaks through the binary layers)."""
    import torch

    from larq_landmarks.runtime.graph import read_graph

    data = np.load(os.path.join(assets, DEFAULT + ".npz"))
    network = torch_network(read_graph(flatbuffer, "default"), torch.float32, device)
    with torch.no_grad(), _float32_exact():
        ours = network(torch.tensor(data["images"], device=device)).cpu().numpy()
    cpu = data["cpu_output"]
    peaks = lambda h: h.transpose(0, 3, 1, 2).reshape(h.shape[0], h.shape[3], -1).argmax(-1)
    return {"same_peaks": float(np.mean(peaks(ours) == peaks(cpu))),
            "mean_abs_difference_ratio": float(np.abs(ours - cpu).mean() / np.abs(cpu).mean())}


def least_traffic(batch: int, size: int, cin: int, cout: int, k: int, stride: int) -> dict:
    """The bytes a convolution must move at the least (its input, filter and output each read or
    written once): ``binary_bytes`` for this runtime's (bit-packed input and filter, float32
    output), ``bf16_bytes`` and ``float32_bytes`` for cuDNN's in those types."""
    pixels_in, pixels_out = batch * size * size, batch * (size // stride) ** 2
    words = (cin + 31) // 32
    return {"binary_bytes": 4 * (pixels_in * words + k * k * words * cout + pixels_out * cout),
            "bf16_bytes": 2 * (pixels_in * cin + k * k * cin * cout + pixels_out * cout),
            "float32_bytes": 4 * (pixels_in * cin + k * k * cin * cout + pixels_out * cout)}


def memory_bandwidth() -> Optional[float]:
    """The current GPU's memory bandwidth in bytes/s (memory clock x 2 transfers x bus width), or
    None where CuPy cannot tell."""
    try:
        import cupy as cp

        runtime, device = cp.cuda.runtime, cp.cuda.Device().id
        clock_khz = runtime.deviceGetAttribute(runtime.cudaDevAttrMemoryClockRate, device)
        bus_bits = runtime.deviceGetAttribute(runtime.cudaDevAttrGlobalMemoryBusWidth, device)
    except Exception:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 if clock_khz > 0 and bus_bits > 0 else None


def _traffic_rows(rows, bandwidth: Optional[float]) -> list:
    """Each shape's least traffic over its time on the GPU alone, for the binary kernel and cuDNN's bf16."""
    def rate(r, key, time_key):
        seconds = (r.get(time_key) or 0) / 1000
        if not seconds or not r.get(key):
            return "n/a | n/a"
        gbs = r[key] / seconds / 1e9
        return f"{gbs:.0f} | " + (f"{100 * r[key] / seconds / bandwidth:.0f}%" if bandwidth else "n/a")

    return [f"| {r['input']} | {r['filter']} | {r['batch']} | {r['binary_bytes'] / 1e6:.2f} | "
            f"{rate(r, 'binary_bytes', 'cuda_gpu_ms')} | {r['bf16_bytes'] / 1e6:.2f} | {rate(r, 'bf16_bytes', 'bf16_gpu_ms')} |"
            for r in rows if r.get("binary_bytes")]


def _shape_rows(rows, suffix: str):
    """The per-shape table's rows from the times ending in ``suffix`` ("n/a" where one is missing)."""
    def ms(r, key):
        value = r.get(key + suffix)
        return f"{value:.3f}" if value else "n/a"

    def ratio(r, key):
        a, b = r.get(key + suffix), r.get("cuda" + suffix)
        return f"{a / b:.1f}x" if a and b else "n/a"

    return [f"| {r['input']} | {r['filter']} | {r['batch']} | {ms(r, 'float32')} | {ms(r, 'tf32')} | {ms(r, 'bf16')} | "
            f"{ms(r, 'cuda')} | {ms(r, 'cuda-popcount')} | {ratio(r, 'float32')} | {ratio(r, 'bf16')} |" for r in rows]


def _default_kernel(row, multiprocessors: Optional[int], tile: bool) -> str:
    """The default kernels' loads (or, with ``tile``, their tile) for ``row``'s grid of 128-row
    tiles: ``cuda.bconv_tile``, the rule the kernels follow."""
    from larq_landmarks.runtime import cuda

    if not multiprocessors or "blocks" not in row:
        return "n/a"
    rows, use_async = cuda.bconv_tile(row["blocks"], multiprocessors)
    return f"{rows} rows" if tile else "cp.async" if use_async else "registers"


def _layer_tables(rows, bandwidth: Optional[float] = None, multiprocessors: Optional[int] = None) -> list:
    def order(r):  # largest input first, each shape's batches together
        size, _, channels = (int(v) for v in r["input"].split("x"))
        return -size, -channels, r["filter"], r["batch"]

    rows = sorted(rows, key=order)
    lines = ["### Each 3x3 binary convolution shape of the default model", "",
             "Binary conv: bit-packed input, float output with LCE's output transform. Ratios are float time / binary "
             "time (tensor-core kernel).", ""]
    header = ["| input | filter | batch | float32 (ms) | TF32 (ms) | bf16 (ms) | binary, tensor cores (ms) | "
              "binary, popcount (ms) | vs float32 | vs bf16 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += header + _shape_rows(rows, "_ms")
    if any(r.get("cuda_gpu_ms") for r in rows):
        lines += ["", f"The same convolutions timed on the GPU alone: {GRAPH_CALLS} calls captured in one CUDA graph "
                  "(CuPy's stream capture for this runtime, `torch.cuda.graph` for cuDNN), the graph replayed, the time "
                  "divided by the calls. The table above times each call from Python, so below about 0.04 ms it "
                  "measures the launch (CuPy's and PyTorch's alike); this one measures the kernels.", ""]
        lines += header + _shape_rows(rows, "_gpu_ms")
    both = [r for r in rows if r.get("cuda-async-copies_gpu_ms") and r.get("cuda-register-loads_gpu_ms")]
    if both:
        sms = multiprocessors or "the GPU's SM count"
        lines += ["", "The tensor-core kernel's loads (GPU alone, as above): `cp.async` copies straight to shared "
                  "memory, all of a K chunk's in flight at once (`CudaKernels(async_copies=True)`), against the same "
                  "kernel loading through registers a few words at a time (`async_copies=False`). The default "
                  f"(`None`) takes `cp.async` where the grid has at most {sms} blocks (the GPU's SMs), registers where "
                  "more.", "",
                  "| input | filter | batch | blocks | register loads (ms) | cp.async (ms) | cp.async speed-up | default |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {r['input']} | {r['filter']} | {r['batch']} | {r.get('blocks', 'n/a')} | "
                  f"{r['cuda-register-loads_gpu_ms']:.3f} | {r['cuda-async-copies_gpu_ms']:.3f} | "
                  f"{r['cuda-register-loads_gpu_ms'] / r['cuda-async-copies_gpu_ms']:.2f}x | "
                  f"{_default_kernel(r, multiprocessors, tile=False)} |" for r in both]
    tiles = [r for r in rows if r.get("cuda-async-copies_gpu_ms") and r.get("cuda-rows64_gpu_ms")
             and r.get("cuda-rows32_gpu_ms")]
    if tiles:
        from larq_landmarks.runtime import cuda

        sms = multiprocessors or "the GPU's SM count"
        small = cuda.SMALL_GRID_ROWS
        default = ("The default takes 128 on every grid (`cuda.SMALL_GRID_ROWS`)." if small == 128 else
                   f"The default takes 128 where that grid has more than {sms} blocks (the GPU's SMs), else {small}."
                   if small else f"The default takes 128 where that grid has more than {sms} blocks (the GPU's SMs), "
                   "64 where it has more than half that, else 32 (`cuda.small_grid_rows`).")
        lines += ["", "The tensor-core kernel's tiles (GPU alone, as above; `cp.async` loads): 128, 64 or 32 output pixels a "
                  f"block (`CudaKernels(tile_rows=...)`). {default}", "",
                  "| input | filter | batch | blocks of 128 | 128 rows (ms) | 64 rows (ms) | 32 rows (ms) | default |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {r['input']} | {r['filter']} | {r['batch']} | {r.get('blocks', 'n/a')} | "
                  f"{r['cuda-async-copies_gpu_ms']:.4f} | {r['cuda-rows64_gpu_ms']:.4f} | "
                  f"{r['cuda-rows32_gpu_ms']:.4f} | {_default_kernel(r, multiprocessors, tile=True)} |" for r in tiles]
    gathers = [r for r in rows if r.get("cuda-word-gather_gpu_ms") and r.get("cuda-stepped-gather_gpu_ms")]
    if gathers:
        from larq_landmarks.runtime import cuda

        lines += ["", "The binary convolution's gather of a row's words (GPU alone, as above; the default's tile and kind "
                  "of loads): one 4-byte word at a time, its address computed from the tap (`gather_row`), against "
                  "the stepped gather (`CudaKernels(stepped_gather=True)`, `gather_row_stepped`): the address stepped "
                  "along K, the tap's place in the image checked once a tap, and a tap's words in one 8- or 16-byte "
                  "load where the input's words a pixel allow (2, 4, 8: 64, 128, 256 channels). The default: "
                  f"{'stepped' if cuda.STEPPED_GATHER else 'word by word'} (`cuda.STEPPED_GATHER`).", "",
                  "| input | filter | batch | words a pixel | word by word (ms) | stepped (ms) | stepped speed-up |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['input']} | {r['filter']} | {r['batch']} | {r.get('words', 'n/a')} | "
                  f"{r['cuda-word-gather_gpu_ms']:.4f} | {r['cuda-stepped-gather_gpu_ms']:.4f} | "
                  f"{r['cuda-word-gather_gpu_ms'] / r['cuda-stepped-gather_gpu_ms']:.2f}x |" for r in gathers]
    traffic = _traffic_rows([r for r in rows if r.get("cuda_gpu_ms")], bandwidth)
    if traffic:
        peak = f"{bandwidth / 1e9:.0f} GB/s, from its memory clock and bus width" if bandwidth else "not known here"
        lines += ["", "What bounds them (GPU alone, as above): the least memory traffic each convolution needs (input, "
                  "filter and output each read or written once: the binary kernel reads bits and writes float32, "
                  "cuDNN's bf16 reads and writes bf16) over its time, and that rate against the GPU's memory "
                  f"bandwidth ({peak}). Near 100% a kernel is bound by memory, well below by latency or launch.", "",
                  "| input | filter | batch | binary (MB) | binary (GB/s) | of bandwidth | bf16 (MB) | bf16 (GB/s) | "
                  "of bandwidth |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += traffic
    return lines + [""]


def _choices(layers, whole, multiprocessors: Optional[int]) -> list:
    """The open choices of the kernels' defaults, each candidate's figures side by side: the
    small grids' tile (``cuda.SMALL_GRID_ROWS``) and the gather (``cuda.STEPPED_GATHER``), from the
    whole model's rows and the per-shape GPU-alone times (geometric mean of the time ratios, and on
    how many shapes the candidate is faster)."""
    from larq_landmarks.runtime import cuda

    model = {(r["engine"], r["batch"]): r["ms"] for r in whole or []}
    batches = sorted({r["batch"] for r in whole or []})

    def model_times(label):
        return ", ".join(f"batch {b} {model[(f'larq_landmarks.runtime ({label})', b)]:.2f} ms" for b in batches
                         if (f"larq_landmarks.runtime ({label})", b) in model) or "not run"

    def against(rows, key, base):
        pairs = [(r[base], r[key]) for r in rows if r.get(base) and r.get(key)]
        if not pairs:
            return "no shapes"
        mean = float(np.exp(np.mean([np.log(b / k) for b, k in pairs])))
        return f"{mean:.2f}x on average, faster on {sum(k < b for b, k in pairs)} of {len(pairs)} shapes"

    lines = ["### The kernels' open choices", "",
             "Each default still to be chosen from measurements, its candidates side by side (per-shape ratios: the "
             "candidate's speed-up on the GPU alone, geometric mean over the shapes at every batch).", ""]
    small = [r for r in layers or [] if multiprocessors and r.get("blocks", multiprocessors + 1) <= multiprocessors]
    default = f"{cuda.SMALL_GRID_ROWS} rows" if cuda.SMALL_GRID_ROWS else "64 or 32 rows by the grid"
    lines.append(f"- Small grids' tile (`cuda.SMALL_GRID_ROWS`): whole model, the default ({default}) "
                 f"{model_times('cuda')}; 128 rows {model_times('cuda, 128-row tiles on every grid')}; "
                 f"64 rows {model_times('cuda, 64-row tiles on small grids')}; "
                 f"32 rows {model_times('cuda, 32-row tiles on small grids')}. On the {len(small)} small-grid rows, "
                 f"against 128 rows: 64 rows {against(small, 'cuda-rows64_gpu_ms', 'cuda-async-copies_gpu_ms')}; "
                 f"32 rows {against(small, 'cuda-rows32_gpu_ms', 'cuda-async-copies_gpu_ms')}.")
    lines.append(f"- Gather (`cuda.STEPPED_GATHER`, now {cuda.STEPPED_GATHER}): whole model word by word "
                 f"{model_times('cuda, word-by-word gather')}; stepped {model_times('cuda, stepped gather')}. Per shape, "
                 f"stepped against word by word: {against(layers or [], 'cuda-stepped-gather_gpu_ms', 'cuda-word-gather_gpu_ms')}.")
    return lines + [""]


def _model_table(rows) -> list:
    small, large = min(r["batch"] for r in rows), max(r["batch"] for r in rows)
    lines = ["### The whole default model", "",
             f"| engine | batch {small} (ms) | batch {large} (ms) | batch {large} (images/s) | batch {large} vs float32 |",
             "|---|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        engine = r["engine"] + (" (graph capture failed: steps launched from Python)" if "capture_failed" in r else "")
        by.setdefault(engine, {})[r["batch"]] = r["ms"]
    float32 = by.get("same network in PyTorch, float32 (cuDNN, TF32 off)", {}).get(large)
    for engine, ms in by.items():
        small_ms = f"{ms[small]:.2f}" if small in ms else "n/a"
        large_ms = [f"{ms[large]:.1f}", f"{1000 * large / ms[large]:.0f}",
                    f"{float32 / ms[large]:.2f}x" if float32 else "n/a"] if large in ms else ["n/a"] * 3
        lines.append(f"| {engine} | {small_ms} | " + " | ".join(large_ms) + " |")
    lines += ["", "The engine replays each batch size's run as CUDA graphs (captured at its second call, split at "
              "the float convolutions' cuBLAS products, which CuPy cannot capture); "
              "\"steps launched from Python\" is the same engine with `cuda_graphs=False`, \"HPM block ops as separate "
              "passes\" with `fuse_blocks=False` (each LceQuantize and CONCATENATION + ADD after a binary convolution its "
              "own kernel). PyTorch's rows run eagerly, and, where marked, as one captured CUDA graph too."]
    parts = next((r.get("breakdown_ms") for r in rows if r["batch"] == large and "breakdown_ms" in r), None)
    if parts:
        lines += ["", f"Where this runtime's batch-{large} time goes (tensor cores, steps launched from Python; GPU "
                  "time between CUDA events around each step, median of 5 runs):", "",
                  "| part | ms |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in parts.items()]
    steps = next((r.get("float_steps") for r in rows if r["batch"] == large and "float_steps" in r), None)
    if steps:
        lines += ["", f"The float convolutions' steps at batch {large} (the same runs; im2col where the filter is "
                  "larger than 1x1, cuBLAS's float32 product, the fused ops as passes of their own):", "",
                  "| step | output | ms |", "|---|---|---:|"] + [f"| {r['step']} | {r['output']} | {r['ms']:.2f} |"
                                                              for r in steps]
    return lines + [""]


def _predictor_table(rows) -> list:
    lines = ["### Predictor end to end (images in, landmarks out)", "",
             f"`Predictor.predict_many` on {rows[0]['faces']} face boxes, 4 to a 640x480 image, "
             f"{rows[0]['batch']} crops a model call: cutting the crops, the model, decoding the heatmaps and "
             "mapping the landmarks back to the image.", "",
             "| engine | faces/s | ms a face |", "|---|---:|---:|"]
    for r in rows:
        name = {"cuda": "CUDA engine (crops and decoding on the GPU)"}.get(
            r["engine"], f"CPU runtime, {r['threads']} threads")
        if "s" in r:
            lines.append(f"| {name} | {r['faces'] / r['s']:.0f} | {1000 * r['s'] / r['faces']:.2f} |")
        else:
            lines.append(f"| {name} | not run: {r['error']} | |")
    return lines + [""]


def write_markdown(path: str, result: dict) -> None:
    """``path``'s GPU section (replaced, or added at the end) from ``result``: the parts it has."""
    lines = [f"## Bit-packed inference on an NVIDIA GPU ({result['gpu']}, {result['date']})", "",
             f"Command: `python scripts/benchmark_gpu.py --assets DIR --markdown docs/benchmarks.md` (models from "
             "`--prepare DIR`: the default `binary_hpm`, 68 landmarks, 256x256, batch norms with trained-like statistics). "
             "CUDA-event medians; this runtime's kernels are CuPy `RawModule` CUDA (`runtime/csrc/kernels.cu`); the "
             "float baselines are PyTorch's `conv2d` on cuDNN, channels-last.", ""]
    if result.get("layers"):
        lines += _layer_tables(result["layers"], result.get("memory_bandwidth"), result.get("multiprocessors"))
    if result.get("whole_model"):
        lines += _model_table(result["whole_model"])
    if result.get("layers") or result.get("whole_model"):
        lines += _choices(result.get("layers"), result.get("whole_model"), result.get("multiprocessors"))
    if result.get("predictor"):
        lines += _predictor_table(result["predictor"])
    if "agreement" in result:
        a = result["agreement"]
        lines += [f"The PyTorch float32 network (TF32 off) against the CPU runtime on the prepared images: "
                  f"{100 * a['same_peaks']:.1f}% of the heatmap peaks equal, mean absolute difference "
                  f"{100 * a['mean_abs_difference_ratio']:.2g}% of the mean."]
    while lines[-1] == "":
        lines.pop()
    section = "\n".join(lines) + "\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    start = text.find("## Bit-packed inference on an NVIDIA GPU")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(path)), delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", metavar="DIR", help="write the models and CPU outputs (needs TensorFlow)")
    parser.add_argument("--assets", metavar="DIR", help="folder written by --prepare")
    parser.add_argument("--parts", default="layers,model,predictor",
                        help="layers, model, predictor (comma-separated)")
    parser.add_argument("--batches", default="32,1,128", help="batch sizes of the per-layer table, in the order run")
    parser.add_argument("--model-batches", default="1,64", help="batch sizes of the whole-model table")
    parser.add_argument("--faces", type=int, default=256, help="face boxes of the predictor part")
    parser.add_argument("--device", default="cuda", help="PyTorch's device (cpu only to test this script)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="update this file's GPU section")
    parser.add_argument("--from-json", metavar="FILE",
                        help="write --markdown from a saved --json (a run cut short included), no GPU needed")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return
    if args.from_json:
        if not args.markdown:
            parser.error("--from-json needs --markdown")
        with open(args.from_json, encoding="utf-8") as f:
            write_markdown(args.markdown, json.load(f))
        return
    if not args.assets:
        parser.error("--assets DIR (from --prepare DIR) is needed on the GPU machine")
    from larq_landmarks.runtime import cuda

    with open(os.path.join(args.assets, DEFAULT + ".tflite"), "rb") as f:
        flatbuffer = f.read()
    result = {"gpu": cuda.gpu_name(), "date": datetime.date.today().isoformat(), "memory_bandwidth": memory_bandwidth(),
              "multiprocessors": cuda.load("cuda").multiprocessors}
    import torch

    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm for each shape
    parts = args.parts.split(",")

    def save():  # after each part, so that a part cut short leaves the ones before it
        if args.json:
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.json)), delete=False) as f:
                json.dump(result, f, indent=1)
            os.replace(f.name, args.json)

    if "model" in parts:  # first: the shorter part, and the one a cut-short run most needs
        try:
            result["agreement"] = agreement(flatbuffer, args.assets, args.device)
            print(json.dumps(result["agreement"]), flush=True)
        except Exception as error:  # the timing below does not depend on it
            print(f"agreement check failed: {error!r}", flush=True)
        result["whole_model"] = whole_model(flatbuffer, max(5, args.runs // 2),
                                            [int(b) for b in args.model_batches.split(",")], args.device)
        save()
    if "predictor" in parts:  # a few seconds: before the long per-shape part
        result["predictor"] = predictor_throughput(os.path.join(args.assets, DEFAULT + ".tflite"), args.faces)
        save()
    if "layers" in parts:
        result["layers"] = []
        layers(flatbuffer, [int(b) for b in args.batches.split(",")], args.runs, args.device, result["layers"], save)
    if args.markdown:
        write_markdown(args.markdown, result)


if __name__ == "__main__":
    main()
