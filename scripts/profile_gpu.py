"""Where the binary convolution's time goes on a GPU, for the shapes of issue 11 that are slower
than cuDNN's bfloat16: the 1-bit MMA's own rate (a kernel of MMAs alone, the ceiling), and each
chosen convolution timed, with the MMAs it issues and the least traffic it needs against that
rate and the memory bandwidth, then launched once more for Nsight Compute; and the whole default
model's time at batch 64 kernel by kernel (PyTorch's profiler). On the GPU machine,
with numpy and CuPy (PyTorch for the bf16 launch), no TensorFlow:

    python scripts/profile_gpu.py --assets gpu_assets            # rates and times
    # the same under Nsight Compute: only the chosen launches are profiled (they run between
    # cudaProfilerStart and cudaProfilerStop; the rate's kernel, warm-ups and timings do not)
    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \\
        python scripts/profile_gpu.py --assets gpu_assets

scripts/gpu_session.sh runs both after the benchmark.
"""
import argparse
import json
import os
import sys
import tempfile
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import benchmark_gpu  # noqa: E402

# (input size, channels in, channels out) of the default model's 3x3 binary convolutions to profile
# at batch 32: the three large ones slower than cuDNN's bf16 on the H200 (2026-12-04), one large one
# faster (for contrast) and one small grid
SHAPES = ((128, 64, 64), (128, 32, 32), (64, 128, 128), (64, 128, 64), (8, 256, 128))

# The 1-bit MMA alone, appended to kernels.cu (its mma_and_popc): each warp issues `iterations` x 4
# m16n8k256 AND-popcount MMAs into 4 independent accumulators, so that the tensor cores' rate, not
# an MMA's latency, bounds it; out[thread] is the sum of its accumulators (every MMA counted).
MMA_RATE_SOURCE = r"""
extern "C" __global__ void mma_rate(const u32* fragments, int iterations, int* out) {
  const int lane = threadIdx.x & 31;
  const u32 a[4] = {fragments[6 * lane], fragments[6 * lane + 1], fragments[6 * lane + 2], fragments[6 * lane + 3]};
  const u32 b0 = fragments[6 * lane + 4], b1 = fragments[6 * lane + 5];
  int c[4][4] = {};
  for (int i = 0; i < iterations; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_and_popc(c[j], a, b0, b1);
  int sum = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) sum += c[j][0] + c[j][1] + c[j][2] + c[j][3];
  out[(i64)blockIdx.x * blockDim.x + threadIdx.x] = sum;
}
"""
MMA_BITS = 16 * 8 * 256  # 1-bit products (AND + popcount-accumulate) of one m16n8k256 MMA


def mma_rate(kernels, iterations: int = 20000, blocks_per_sm: int = 8, runs: int = 5) -> dict:
    """The tensor cores' rate of 1-bit m16n8k256 MMAs on ``kernels``' GPU: ``mma_per_s`` and
    ``bit_products_per_s`` (median of ``runs``), from all-ones fragments (each MMA adds 256 to
    each of its 4 accumulators a thread, which the result is checked against)."""
    from larq_landmarks.runtime import cuda

    cp = kernels.cp
    with open(cuda.SOURCE, encoding="utf-8") as f:
        module = cp.RawModule(code=f.read() + MMA_RATE_SOURCE, options=cuda.compile_options(kernels.stepped_gather))
    function = module.get_function("mma_rate")
    blocks, threads = kernels.multiprocessors * blocks_per_sm, 256
    fragments = kernels.upload(np.full(32 * 6, 0xFFFFFFFF, np.uint32))
    out = cp.empty(blocks * threads, cp.int32)

    def launch(count):
        function((blocks,), (threads,), (fragments, np.int32(count), out))

    launch(1)  # compiled and loaded before the timing
    ms = benchmark_gpu._time_cuda(lambda: launch(iterations), runs, kernels.synchronize, benchmark_gpu._cupy_event)
    sums = kernels.download(out)
    if not (sums == iterations * 4 * 4 * 256).all():
        raise AssertionError(f"mma_rate: sums {np.unique(sums)[:4]} for {iterations * 4 * 4 * 256}")
    mmas = blocks * threads // 32 * iterations * 4
    return {"ms": ms, "mma": mmas, "mma_per_s": mmas / (ms / 1e3), "bit_products_per_s": mmas * MMA_BITS / (ms / 1e3)}


def conv_mmas(batch: int, size: int, cin: int, cout: int, stride: int = 1, k: int = 3, tile_rows: int = 128) -> int:
    """The m16n8k256 MMAs the tensor-core binary convolution issues for a layer (kernels.cu's
    bconv2d_block): each block of ``tile_rows`` pixels x 64 channels runs 8 warps of 32 rows
    (2 m16 tiles) by 64 / (8 / (tile_rows / 32)) columns (n8 tiles); a warp whose columns lie past
    the last channel issues none; K is ``k * k * words`` words, in MMA steps of 8 words."""
    pixels = batch * (size // stride) ** 2
    steps = -(-(k * k * -(-cin // 32)) // 8)
    warps_m = tile_rows // 32
    warp_columns = 64 // (8 // warps_m)
    mmas = 0
    for n0 in range(0, cout, 64):  # column blocks
        busy_columns = sum(1 for wn in range(0, 64, warp_columns) if n0 + wn < cout)
        mmas += warps_m * busy_columns * steps * 2 * (warp_columns // 8)
    return -(-pixels // tile_rows) * mmas


def profile(flatbuffer: bytes, batch: int = 32, shapes=SHAPES, runs: int = 10, device: str = "cuda") -> list:
    """Each chosen shape's binary convolution (default kernels; the word-by-word gather too where its
    input has 2 or more words a pixel; 64- and 32-row tiles too on a small grid), and cuDNN's bf16 convolution of the
    first shape: timed (GPU alone, CUDA graphs as in benchmark_gpu), then each launched once
    between cudaProfilerStart and cudaProfilerStop. Rows: label, time, MMAs, least traffic."""
    import cupy as cp

    from larq_landmarks.runtime import cuda
    from larq_landmarks.runtime.graph import read_graph

    graph = read_graph(flatbuffer, "default")
    ops_by_shape = {key[:3]: op for key, op in benchmark_gpu.binary_conv_shapes(graph) if key[4] == 1}
    rng = np.random.default_rng(1)
    launches = []  # (row, step, the step's GPU-alone milliseconds: a function of the step)

    def cupy_time(step):
        return benchmark_gpu._cupy_graph_time(step, runs)

    for size, cin, cout in shapes:
        op = ops_by_shape.get((size, cin, cout))
        if op is None:
            print(f"no {size}x{size}x{cin} -> {cout} binary convolution in this model", flush=True)
            continue
        packed = cp.asarray(rng.integers(-2**31, 2**31 - 1, (batch, size, size, -(-cin // 32)),
                                         dtype=np.int64).astype(np.int32))
        base = {"input": f"{size}x{size}x{cin}", "cout": cout, "batch": batch}
        base.update(benchmark_gpu.least_traffic(batch, size, cin, cout, 3, 1))
        kernels = cuda.load("cuda")
        blocks = -(-batch * size * size // cuda.BLOCK_ROWS) * -(-cout // cuda.BLOCK_CHANNELS)
        tile, _ = cuda.bconv_tile(blocks, kernels.multiprocessors)
        variants = [("default", kernels, tile)]
        if cin > 32:
            variants.append(("word-by-word gather", cuda.load("cuda", stepped_gather=False), tile))
        if blocks <= kernels.multiprocessors:
            variants += [(f"{rows}-row tiles", cuda.load("cuda", tile_rows=rows), rows) for rows in (64, 32)]
        for label, variant, rows in variants:
            row = dict(base, kernels=label, mma=conv_mmas(batch, size, cin, cout, tile_rows=rows))
            launches.append((row, benchmark_gpu.binary_conv_step(graph, op, variant, packed), cupy_time))
    bf16 = _bf16_launch(shapes[0], batch, device)
    if bf16 is not None:
        launches.append(bf16 + (lambda step: benchmark_gpu._torch_graph_time(step, runs, device),))
    rows = []
    for row, step, time_on_gpu in launches:
        step()  # compiled, allocated
        row["ms"] = time_on_gpu(step)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cp.cuda.get_current_stream().synchronize()
    cp.cuda.runtime.profilerStart()  # Nsight Compute (--profile-from-start off) profiles from here
    for _, step, _ in launches:
        step()
    cp.cuda.get_current_stream().synchronize()
    if bf16 is not None and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    cp.cuda.runtime.profilerStop()
    return rows


def _bf16_launch(shape, batch: int, device: str):
    """cuDNN's bf16 3x3 convolution of ``shape`` (PyTorch, channels-last), or None without PyTorch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.backends.cudnn.benchmark = True  # cuDNN's fastest algorithm for the shape, as benchmark_gpu takes
    size, cin, cout = shape
    x = torch.randn(batch, cin, size, size, device=device).to(torch.bfloat16)
    w = torch.randn(cout, cin, 3, 3, device=device).to(torch.bfloat16)
    x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    row = {"input": f"{size}x{size}x{cin}", "cout": cout, "batch": batch, "kernels": "cuDNN bf16"}
    row.update(benchmark_gpu.least_traffic(batch, size, cin, cout, 3, 1))
    return row, lambda: F.conv2d(x, w, padding=1)


def model_kernels(flatbuffer: bytes, batch: int = 64, runs: int = 3, device: str = "cuda") -> list:
    """Where the whole default model's time goes, kernel by kernel: the engine run step by step
    (``cuda_graphs=False``, as benchmark_gpu's breakdown) ``runs`` times on ``batch`` images under
    PyTorch's profiler, whose CUDA activity trace (CUPTI) records every kernel of the process, CuPy's
    and cuBLAS's too. Rows: kernel name, launches and GPU milliseconds a run, largest first; [] where
    PyTorch or its CUDA profiler is not there (the reason printed)."""
    import cupy as cp

    from larq_landmarks.runtime import Engine
    from larq_landmarks.runtime.graph import read_graph

    try:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
    except ImportError as error:
        print(f"no kernel breakdown: {error}", flush=True)
        return []
    images = cp.asarray(benchmark_gpu.random_images(read_graph(flatbuffer, "default"), batch))
    engine = Engine(flatbuffer, kernels="cuda", name="default", cuda_graphs=False)
    engine.predict(images)  # compiled, allocated
    engine._kernels.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    try:
        with torch_profile(activities=activities) as trace:
            for _ in range(runs):
                engine.predict(images)
            engine._kernels.synchronize()
        events = trace.key_averages()
    except Exception as error:  # e.g. no CUPTI in this PyTorch, or another profiler holding it
        print(f"no kernel breakdown: PyTorch's profiler: {type(error).__name__}: {error}", flush=True)
        return []
    return kernel_rows(events, runs)


def kernel_rows(events, runs: int) -> list:
    """PyTorch profiler's averages over ``runs`` runs as rows of kernel, launches and milliseconds a
    run, largest first: the events on the GPU (``device_type`` CUDA: kernels, copies, memsets; their
    ``device_time_total`` their own time in microseconds, ``cuda_time_total`` before PyTorch 2.4).
    CPU-side events are left out: an API call such as cuLaunchKernel carries the time of the kernel
    it launched, which would count it twice."""
    rows = []
    for event in events:
        if getattr(event.device_type, "name", str(event.device_type)) != "CUDA":
            continue
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = getattr(event, "cuda_time_total", 0)
        rows.append({"kernel": event.key, "launches": event.count / runs, "ms": us / 1e3 / runs})
    return sorted(rows, key=lambda r: -r["ms"])


def kernels_report(rows: list, batch: int) -> str:
    """``model_kernels``' rows as a text table with each kernel's share of the total."""
    total = sum(r["ms"] for r in rows)
    lines = [f"the default model at batch {batch}, steps launched from Python: {total:.3f} ms of kernels a run",
             "| kernel | launches a run | ms a run | share |"]
    for r in rows:
        name = r["kernel"] if len(r["kernel"]) <= 90 else r["kernel"][:87] + "..."
        lines.append(f"| {name} | {r['launches']:g} | {r['ms']:.3f} | {100 * r['ms'] / total:.1f}% |")
    return "\n".join(lines)


def report(rows: list, rate: Optional[dict], bandwidth: Optional[float]) -> str:
    """The rows as a text table: time, the time the MMAs alone would take at ``rate``, and the least
    traffic's rate against ``bandwidth``."""
    lines = []
    if rate:
        lines.append(f"1-bit MMA rate: {rate['mma_per_s'] / 1e9:.1f} G m16n8k256 MMAs/s = "
                     f"{rate['bit_products_per_s'] / 1e12:.0f} T 1-bit products/s ({rate['ms']:.2f} ms for {rate['mma']} MMAs)")
    if bandwidth:
        lines.append(f"memory bandwidth: {bandwidth / 1e9:.0f} GB/s")
    lines.append("| input | out | batch | kernels | ms | MMAs | MMA-bound ms | least MB | GB/s | of bandwidth |")
    for r in rows:
        ms, key = r.get("ms"), "bf16_bytes" if r["kernels"] == "cuDNN bf16" else "binary_bytes"
        mma_ms = f"{1e3 * r['mma'] / rate['mma_per_s']:.4f}" if rate and "mma" in r else "n/a"
        speed = r[key] / (ms / 1e3) / 1e9 if ms else None
        lines.append(f"| {r['input']} | {r['cout']} | {r['batch']} | {r['kernels']} | {f'{ms:.4f}' if ms else 'n/a'} | "
                     f"{r.get('mma', 'n/a')} | {mma_ms} | {r[key] / 1e6:.1f} | {f'{speed:.0f}' if speed else 'n/a'} | "
                     f"{f'{100 * speed * 1e9 / bandwidth:.0f}%' if speed and bandwidth else 'n/a'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True, metavar="DIR", help="folder written by benchmark_gpu.py --prepare")
    parser.add_argument("--shapes", default=",".join("x".join(str(v) for v in shape) for shape in SHAPES),
                        help="binary convolutions to profile: SIZExCHANNELS_INxCHANNELS_OUT, comma-separated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20000, help="MMA rate kernel: iterations a warp")
    parser.add_argument("--model-batch", type=int, default=64,
                        help="the whole model's kernels at this batch (PyTorch's profiler); 0: not (under Nsight Compute)")
    parser.add_argument("--device", default="cuda", help="PyTorch's device (cpu only to test this script)")
    parser.add_argument("--json", help="write the rows and the rate here")
    args = parser.parse_args(argv)
    from larq_landmarks.runtime import cuda

    with open(os.path.join(args.assets, benchmark_gpu.DEFAULT + ".tflite"), "rb") as f:
        flatbuffer = f.read()
    rate = mma_rate(cuda.load("cuda"), args.iterations)
    print(json.dumps({"mma_rate": rate}), flush=True)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    rows = profile(flatbuffer, args.batch, shapes, args.runs, args.device)
    bandwidth = benchmark_gpu.memory_bandwidth()
    print(report(rows, rate, bandwidth), flush=True)
    kernel_rows = model_kernels(flatbuffer, args.model_batch, device=args.device) if args.model_batch > 0 else []
    if kernel_rows:
        print(kernels_report(kernel_rows, args.model_batch), flush=True)
    if args.json:
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.json)), delete=False) as f:
            json.dump({"gpu": cuda.gpu_name(), "mma_rate": rate, "memory_bandwidth": bandwidth, "rows": rows,
                       "model_kernels": kernel_rows}, f, indent=1)
        os.replace(f.name, args.json)


if __name__ == "__main__":
    main()
