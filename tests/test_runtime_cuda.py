"""The runtime's CUDA backend (issue 11).

On the CPU (always): the NumPy model of the CUDA binary convolution (its tile indexing, m16n8k256
fragment layout and AND-popcount formulation, ``runtime/cuda_tiles.py``) gives LCE's accumulators;
the GPU kernels with NumPy standing in for CuPy (``fake_cupy.py``: launches checked against
kernels.cu, and kernels.cu itself built for the CPU by ``cuda_on_cpu.py``) give the CPU kernels'
results; asking for the GPU without CuPy or a GPU is a clear error. The kernel tests below
(accumulators bit-exact against the reference and this runtime's CPU kernels, bit packing and
element-wise ops) run on the GPU where there is one and on that CPU build elsewhere, and so do
whole models against the CPU runtime: the prepared ones where they are given, and the default model
converted here where TensorFlow is. No TensorFlow is imported at the top, so the GPU tests run on a
machine without it (``pytest --noconftest tests/test_runtime_cuda.py`` with the models made by
``scripts/benchmark_gpu.py --prepare DIR`` and ``LARQ_LANDMARKS_GPU_ASSETS=DIR``).
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from larq_landmarks import cropping
from larq_landmarks.runtime import cuda, cuda_tiles, ops
from larq_landmarks.runtime.ops import _same_padding

import cuda_on_cpu
import fake_cupy
from binary_reference import CASES, bconv_graph, next_batch_norm, next_layer_bits, pack_bits, reference_accumulators

# the GPU tests' cases add blocks of more than 128 pixels and 64 channels and several K steps
# beyond CASES: 6 column blocks; narrow outputs; a stride; K of 90 words (2 chunks of 80 in the small tiles, 3 of 40)
GPU_CASES = CASES + [(256, 192, 3, 1, True, 0), (64, 32, 3, 1, True, 1), (32, 64, 3, 2, True, 0),
                     (300, 40, 3, 1, True, 0)]


def _gpu_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        return cuda.gpu_name() is not None
    except Exception:
        return False


GPU = _gpu_available()


def _cpu_kernels():
    try:
        from larq_landmarks.runtime import kernels as kernel_paths

        return kernel_paths.load("auto")
    except ImportError:  # the C++ kernels are not built on this machine
        return None


needs_cpu_kernels = pytest.mark.skipif(_cpu_kernels() is None, reason="the C++ kernels are not built here")


def _random_layer(cin, cout, k, seed, size=(2, 9, 11)):
    rng = np.random.default_rng(seed)
    x_bits = rng.integers(0, 2, size + (cin,), dtype=np.uint8)
    w_bits = rng.integers(0, 2, (cout, k, k, cin), dtype=np.uint8)
    return x_bits, w_bits


def _geometry(x_shape, cin, cout, k, stride, same, pad_value):
    out_h, top = _same_padding(x_shape[1], k, stride, 1, 0 if same else 1)
    out_w, left = _same_padding(x_shape[2], k, stride, 1, 0 if same else 1)
    return [cin, cout, k, k, stride, stride, 1, 1, top, left, pad_value], (out_h, out_w)


@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize("cin,cout,k,stride,same,pad_value", CASES[:5] + [(64, 70, 3, 1, True, 0)])
def test_tile_model_gives_lce_accumulators(tensor_cores, cin, cout, k, stride, same, pad_value):
    """9 x 11 x 2 = 198 pixels: two row blocks, one of them partial; up to 130 channels: three
    column blocks; 256 channels, 3 x 3: 72 K words, two chunks of 40 words and nine 256-bit steps;
    K padding for the rest."""
    x_bits, w_bits = _random_layer(cin, cout, k, cin + cout)
    geometry, out_hw = _geometry(x_bits.shape, cin, cout, k, stride, same, pad_value)
    expected = reference_accumulators(x_bits, w_bits, stride, same, pad_value)
    got = cuda_tiles.bconv2d_model(pack_bits(x_bits), pack_bits(w_bits), geometry, out_hw, tensor_cores)
    np.testing.assert_array_equal(got, expected)


def test_mma_model_is_a_product_of_the_fragments():
    """The modelled instruction: D = popc(A & B) summed over 256 bits, for A and B put into the
    lanes' registers as PTX documents (an independent scatter, not the model's own gather)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, (16, 8), dtype=np.uint64).astype(np.uint32)
    b = rng.integers(0, 2**32, (8, 8), dtype=np.uint64).astype(np.uint32)  # [column, word]
    a_regs, b_regs = np.zeros((32, 4), np.uint32), np.zeros((32, 2), np.uint32)
    for lane in range(32):
        g, t = divmod(lane, 4)
        a_regs[lane] = a[g, t], a[g + 8, t], a[g, t + 4], a[g + 8, t + 4]
        b_regs[lane] = b[g, t], b[g, t + 4]
    d = cuda_tiles.mma_and_popc(a_regs, b_regs)
    expected = np.array([[sum(bin(int(a[r, w]) & int(b[c, w])).count("1") for w in range(8)) for c in range(8)]
                         for r in range(16)])
    for lane in range(32):
        g, t = divmod(lane, 4)
        assert list(d[lane]) == [expected[g, 2 * t], expected[g, 2 * t + 1], expected[g + 8, 2 * t],
                                 expected[g + 8, 2 * t + 1]]


def test_weight_layout_pads_with_zero_bits():
    _, w_bits = _random_layer(40, 70, 3, 5)
    matrix, popcounts = cuda.layout_binary_weights(pack_bits(w_bits))
    assert matrix.shape == (128, 40)  # channels to 2 blocks of 64; 9 taps x 2 words = 18 -> one chunk of 40
    assert not matrix[70:].any() and not matrix[:, 18:].any()
    np.testing.assert_array_equal(popcounts[:70], w_bits.reshape(70, -1).sum(-1))


@pytest.mark.parametrize("cin,cout,k,stride,same,pad_value", [(40, 24, 3, 2, True, 0), (33, 70, 3, 1, False, 1)])
def test_gpu_binary_conv_gets_the_geometry_from_the_ops(monkeypatch, cin, cout, k, stride, same, pad_value):
    """``ops.lce_bconv2d`` on the GPU kernels' ``binary_conv2d``, with NumPy standing in for CuPy
    (tests/fake_cupy.py: the launch checked against kernels.cu, the kernel built for the CPU run):
    the geometry it is given (padding and pad value placed where the kernel reads them) gives
    LCE's accumulators, for inputs of two sizes."""
    fake_cupy.install(monkeypatch)
    gpu = cuda.load("cuda")
    launched, launch = [], gpu.bconv2d

    def bconv2d(x, weights, geometry, *rest):
        launched.append(list(geometry))
        launch(x, weights, geometry, *rest)

    gpu.bconv2d = bconv2d
    rng = np.random.default_rng(cin)
    w_bits = rng.integers(0, 2, (cout, k, k, cin), dtype=np.uint8)
    graph, op = bconv_graph(pack_bits(w_bits), cin, stride, same, pad_value, "float",
                            np.full(cout, -0.5, np.float32), np.full(cout, k * k * cin / 2, np.float32))
    run = ops.lce_bconv2d(graph, op, gpu)
    for size in ((1, 9, 11), (2, 6, 7)):
        x_bits = rng.integers(0, 2, size + (cin,), dtype=np.uint8)
        values = ops.Values(6, {})
        values[0] = pack_bits(x_bits)
        run(values)
        np.testing.assert_array_equal(values[5], reference_accumulators(x_bits, w_bits, stride, same, pad_value))
        assert launched[-1] == _geometry(x_bits.shape, cin, cout, k, stride, same, pad_value)[0]


@needs_cpu_kernels
def test_gpu_float_conv_and_resize_glue_with_numpy_standing_in_for_cupy(monkeypatch):
    """The Python side of the GPU kernels' ``conv2d`` (batch norm + ReLU before it, the residual as
    the parts of a folded concatenation) and ``resize_nearest`` (+ ADD), with NumPy in CuPy's place
    (tests/fake_cupy.py, kernels.cu built for the CPU), against the C++ kernels."""
    from larq_landmarks.runtime import kernels as kernel_paths

    fake_cupy.install(monkeypatch)
    gpu = cuda.load("cuda")
    cpu = kernel_paths.load("portable")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 24)).astype(np.float32)
    filters = rng.normal(size=(48, 1, 1, 24)).astype(np.float32)
    bias = rng.normal(size=48).astype(np.float32)
    scale, shift = rng.uniform(0.5, 2, 24).astype(np.float32), rng.normal(size=24).astype(np.float32)
    parts = [rng.normal(size=(2, 5, 6, 16)).astype(np.float32), rng.normal(size=(2, 5, 6, 32)).astype(np.float32)]
    outputs = []
    for module in (gpu, cpu):
        weights = module.prepare_float_weights(filters)
        out = np.empty((2, 5, 6, 48), np.float32)
        module.conv2d(x, weights, bias, [1, 1, 1, 1, 1, 1, 0, 0], -np.inf, np.inf, parts, scale, shift, 0.0, np.inf, out)
        outputs.append(out)
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)

    # 8 channels: 4 a thread (resize_nearest_float4); 6: one a thread
    for channels in (8, 6):
        small = rng.normal(size=(1, 3, 4, channels)).astype(np.float32)
        skip = rng.normal(size=(1, 6, 8, channels)).astype(np.float32)
        rows, cols = np.repeat(np.arange(3), 2).astype(np.int32), np.repeat(np.arange(4), 2).astype(np.int32)
        resized = []
        for module in (gpu, cpu):
            out = np.empty((1, 6, 8, channels), np.float32)
            module.resize_nearest(small, rows, cols, skip, 0.0, np.inf, out)
            resized.append(out)
        np.testing.assert_array_equal(resized[0], resized[1])
        np.testing.assert_array_equal(resized[1], np.maximum(small.repeat(2, 1).repeat(2, 2) + skip, 0))
        unadded = np.empty((1, 6, 8, channels), np.float32)  # no ADD: no clamp either
        gpu.resize_nearest(small, rows, cols, np.zeros(0, np.float32), 0.0, np.inf, unadded)
        np.testing.assert_array_equal(unadded, small.repeat(2, 1).repeat(2, 2))


@needs_cpu_kernels
def test_gpu_kernel_grids_cover_sizes_that_are_not_multiples_of_a_block(monkeypatch):
    """Odd sizes (work not a multiple of the 256-thread block) through the GPU kernels' glue, with
    NumPy standing in for CuPy: each launch's grid covers its work and the results are the CPU
    kernels'."""
    from larq_landmarks.runtime import kernels as kernel_paths

    fake_cupy.install(monkeypatch)
    gpu, cpu = cuda.load("cuda"), kernel_paths.load("portable")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 5, 3, 40)).astype(np.float32)  # 15 pixels x 2 words x 32 = 960 threads
    scale, shift = rng.uniform(0.5, 2, 40).astype(np.float32), rng.normal(size=40).astype(np.float32)
    pooled = []
    for module in (gpu, cpu):
        bits = np.zeros((1, 5, 3, 2), np.int32)
        module.bitpack(x, scale, shift, bits)
        out = np.zeros((1, 2, 1, 40), np.float32)  # 80 outputs
        module.pool2d(x, [3, 3, 2, 2, 0, 0], 1, -np.inf, np.inf, out)
        pooled.append((bits, out))
    np.testing.assert_array_equal(pooled[0][0], pooled[1][0])
    np.testing.assert_allclose(pooled[0][1], pooled[1][1], rtol=1e-6)


@pytest.mark.skipif(GPU, reason="a GPU is present")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(cuda.CudaUnavailableError, match=r"kernels='cuda' needs .*(CuPy|GPU)"):
        cuda.load("cuda")
    with pytest.raises(ValueError, match="kernels='cuda-fast'"):
        cuda.CudaKernels("cuda-fast")


def _driver_refuses_the_kernels(monkeypatch):
    """fake_cupy, with the driver refusing the compiled module (CuPy built for a newer CUDA than
    the driver: the PTX is refused at the first function looked up)."""
    fake_cupy.install(monkeypatch)

    def refused(module, name):
        raise RuntimeError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled with an "
                           "unsupported toolchain.")

    monkeypatch.setattr(fake_cupy.RawModule, "get_function", refused)


def test_kernels_the_driver_cannot_load_are_a_clear_error(predictor_model, monkeypatch):
    """Where NVRTC's or the driver's step fails, ``kernels="cuda"`` is a CudaUnavailableError that
    names the cause and the fix."""
    from larq_landmarks.runtime import Engine

    _driver_refuses_the_kernels(monkeypatch)
    with pytest.raises(cuda.CudaUnavailableError, match=r"kernels='cuda': CuPy .*could not build .*sm_90.*"
                                                        r"UNSUPPORTED_PTX_VERSION.*cupy-cuda12x for a CUDA 12 driver"):
        Engine(predictor_model, kernels="cuda")


def test_predict_command_says_the_driver_cannot_load_the_kernels_in_one_line(predictor_model, monkeypatch):
    pytest.importorskip("PIL.Image")  # the predict command draws its pictures with Pillow
    from larq_landmarks import cli

    _driver_refuses_the_kernels(monkeypatch)
    with pytest.raises(SystemExit, match="larq-landmarks predict: kernels='cuda': .*UNSUPPORTED_PTX_VERSION"):
        cli.main(["predict", "face.png", "--model", predictor_model, "--engine", "cuda", "--box", "0,0,10,10"])


# --- on a GPU, or kernels.cu built for the CPU -------------------------------------------------

def _run_bconv(kernels, graph, op, x_packed, next_quantize=None):
    """The op's output on ``kernels`` (NumPy); with ``next_quantize`` (its tensor is 6), also the
    fused LceQuantize's bits."""
    values = ops.Values(7, {}, getattr(kernels, "empty", np.empty))
    values[0] = kernels.upload(x_packed) if hasattr(kernels, "upload") else x_packed
    ops.lce_bconv2d(graph, op, kernels, next_quantize)(values)
    download = getattr(kernels, "download", np.asarray)
    return download(values[5]) if next_quantize is None else (download(values[5]), download(values[6]))


def _run_bconv_into_concatenation(kernels, graph, op, x_packed, offset, shape):
    """The op's output written at channels ``offset`` on of a tensor of ``shape`` holding 5 (a
    concatenation other parts write the rest of), a random residual added: (that tensor, residual)."""
    upload, download = getattr(kernels, "upload", np.asarray), getattr(kernels, "download", np.asarray)
    residual = np.random.default_rng(offset).normal(size=shape).astype(np.float32)
    values = ops.Values(8, {}, getattr(kernels, "empty", np.empty))
    values[0], values[7] = upload(x_packed), upload(residual)
    values[6] = upload(np.full(residual.shape, 5.0, np.float32))
    ops.lce_bconv2d(graph, op, kernels, into=(6, offset, shape[-1], 7))(values)
    return download(values[6]), residual


@pytest.fixture
def gpu_or_cpu(monkeypatch):
    """The GPU kernels on the GPU where there is one; elsewhere the same CUDA source built for the
    CPU (``fake_cupy``), so that these tests run in CI and on a GPU alike."""
    if not GPU:
        fake_cupy.install(monkeypatch)


# the binary convolution's kernels (path, async_copies, tile_rows, stepped_gather): tensor cores with
# tiles of 128 rows loaded by cp.async or through registers, with tiles of 64 and 32 rows (cp.async),
# popcount; each gathering a row's words one by one (gather_row) and stepped (gather_row_stepped)
KERNELS = [pytest.param(path, async_copies, tile_rows, stepped, id=name + ("-stepped" if stepped else ""))
           for path, async_copies, tile_rows, name in (
               ("cuda", True, 128, "cuda"), ("cuda", False, 128, "cuda-register-loads"),
               ("cuda", True, 64, "cuda-rows64"), ("cuda", True, 32, "cuda-rows32"),
               ("cuda-popcount", None, None, "cuda-popcount"))
           for stepped in (False, True)]


def _recorded_launches(monkeypatch) -> list:
    """The names of the kernels fake_cupy launches from now on, in order (the GPU itself does not say)."""
    launched = []
    launch = fake_cupy._Kernel.__call__
    monkeypatch.setattr(fake_cupy._Kernel, "__call__", lambda self, *args: (launched.append(self.name),
                                                                           launch(self, *args)))
    return launched


def test_tensor_core_convolution_kernel_is_chosen_by_the_grid(monkeypatch):
    """The defaults (``async_copies=None``, ``tile_rows=None``): a layer whose grid of 128-row
    blocks has no more blocks than the GPU has SMs runs on smaller tiles loaded by ``cp.async``
    (``small_grid_rows``: 64 rows where those blocks are more than half the SMs, else 32; or
    ``SMALL_GRID_ROWS`` where set: 128, 64 and 32 here), one with more on 128-row tiles loaded through
    registers; the arguments force a kind of loads or a tile. The outputs are equal (the grid of
    each launch covers the layer exactly: fake_cupy)."""
    fake_cupy.install(monkeypatch)
    launched = _recorded_launches(monkeypatch)
    # 3 x 19 x 17 = 969 pixels: 8 blocks of 128 pixels, times 2 blocks of 64 of the 70 channels
    x_bits, w_bits = _random_layer(40, 70, 3, 5, size=(3, 19, 17))
    graph, op = bconv_graph(pack_bits(w_bits), 40, 1, True, 0, "float", np.full(70, -0.5, np.float32),
                            np.full(70, 180.0, np.float32))
    expected = reference_accumulators(x_bits, w_bits, 1, True, 0).astype(np.float32)
    # (SMALL_GRID_ROWS None: small_grid_rows' choice, 64 rows where the 16 blocks fill more than half the SMs)
    for small, sms, async_copies, tile_rows, kernel in ((None, 16, None, None, "bconv2d_tensor_cores_rows64"),
                                                        (None, 31, None, None, "bconv2d_tensor_cores_rows64"),
                                                        (None, 32, None, None, "bconv2d_tensor_cores_rows32"),
                                                        (None, 15, None, None, "bconv2d_tensor_cores_register_loads"),
                                                        (None, 32, False, None, "bconv2d_tensor_cores_register_loads"),
                                                        (128, 16, None, None, "bconv2d_tensor_cores"),
                                                        (128, 15, None, None, "bconv2d_tensor_cores_register_loads"),
                                                        (32, 16, None, None, "bconv2d_tensor_cores_rows32"),
                                                        (32, 15, None, None, "bconv2d_tensor_cores_register_loads"),
                                                        (32, 15, True, None, "bconv2d_tensor_cores"),
                                                        (32, 16, False, None, "bconv2d_tensor_cores_register_loads"),
                                                        (64, 16, True, None, "bconv2d_tensor_cores_rows64"),
                                                        (128, 15, None, 64, "bconv2d_tensor_cores_rows64"),
                                                        (32, 16, None, 128, "bconv2d_tensor_cores")):
        monkeypatch.setattr(cuda, "SMALL_GRID_ROWS", small)
        monkeypatch.setattr(fake_cupy.Device, "multiprocessors", sms)
        launched.clear()
        got = _run_bconv(cuda.CudaKernels("cuda", async_copies, tile_rows=tile_rows), graph, op, pack_bits(x_bits))
        assert launched == [kernel], (small, sms, async_copies, tile_rows)
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="tile_rows=48"):
        cuda.CudaKernels("cuda", tile_rows=48)
    with pytest.raises(ValueError, match="tile_rows=32 loads by cp.async"):
        cuda.CudaKernels("cuda", False, tile_rows=32)


@pytest.mark.parametrize("path,async_copies,tile_rows,stepped_gather", KERNELS)
@pytest.mark.parametrize("cin,cout,k,stride,same,pad_value", GPU_CASES)
def test_gpu_accumulators_are_bit_exact(gpu_or_cpu, path, async_copies, tile_rows, stepped_gather, cin, cout, k, stride,
                                        same, pad_value):
    x_bits, w_bits = _random_layer(cin, cout, k, cin * 1000 + cout, size=(3, 19, 17))
    expected = reference_accumulators(x_bits, w_bits, stride, same, pad_value)
    kernels = cuda.load(path, async_copies, tile_rows, stepped_gather)
    assert kernels.stepped_gather == stepped_gather
    cpu = _cpu_kernels()
    filters, total = pack_bits(w_bits), k * k * cin
    graph, op = bconv_graph(filters, cin, stride, same, pad_value, "float",
                            np.full(cout, -0.5, np.float32), np.full(cout, total / 2, np.float32))
    got = _run_bconv(kernels, graph, op, pack_bits(x_bits))
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    if cpu is not None:
        np.testing.assert_array_equal(got, _run_bconv(cpu, graph, op, pack_bits(x_bits)))
    # the next layer's LceQuantize (a batch norm folded in) packed by the same launch
    scale, shift = next_batch_norm(np.random.default_rng(cin), cout, total)
    for next_scale, next_shift in ((scale, shift), (None, shift), (scale, None)):
        out, bits = _run_bconv(kernels, graph, op, pack_bits(x_bits), (6, next_scale, next_shift))
        np.testing.assert_array_equal(out, expected.astype(np.float32))
        np.testing.assert_array_equal(bits, next_layer_bits(out, next_scale, next_shift))
    # one part of a channel CONCATENATION + ADD (at channel 3 or 4 on: the 16-byte stores need 4)
    for offset in (3, 4):
        out, residual = _run_bconv_into_concatenation(kernels, graph, op, pack_bits(x_bits), offset,
                                                      expected.shape[:3] + (cout + 8,))
        np.testing.assert_array_equal(out[..., offset:offset + cout],
                                      expected.astype(np.float32) + residual[..., offset:offset + cout])
        assert (out[..., :offset] == 5).all() and (out[..., offset + cout:] == 5).all()
    thresholds = np.random.default_rng(cout).integers(0, total, cout).astype(np.int32)
    graph, op = bconv_graph(filters, cin, stride, same, pad_value, "bits", thresholds=thresholds)
    got = _run_bconv(kernels, graph, op, pack_bits(x_bits))
    np.testing.assert_array_equal(got, pack_bits((expected > thresholds).astype(np.uint8)))
    if cpu is not None:
        np.testing.assert_array_equal(got, _run_bconv(cpu, graph, op, pack_bits(x_bits)))


@pytest.mark.parametrize("path,async_copies,tile_rows,stepped_gather", KERNELS)
def test_gpu_dilated_binary_conv_is_bit_exact(gpu_or_cpu, path, async_copies, tile_rows, stepped_gather):
    """Dilated binary convolutions (a tap's input dilation rows and columns from the last), SAME and
    VALID, both pad values, a stride: accumulators as LCE's reference and the C++ kernels have them
    (the stepped gather steps its address by the dilations between taps and filter rows)."""
    kernels, cpu = cuda.load(path, async_copies, tile_rows, stepped_gather), _cpu_kernels()
    for cin, cout, dilation, stride, same, pad_value in ((64, 40, (2, 3), 1, True, 0), (128, 24, (3, 1), 1, False, 1),
                                                         (40, 33, (2, 2), 2, True, 1), (32, 8, (1, 2), 1, True, 0)):
        x_bits, w_bits = _random_layer(cin, cout, 3, cin + cout, size=(2, 13, 15))
        expected = reference_accumulators(x_bits, w_bits, stride, same, pad_value, dilation)
        graph, op = bconv_graph(pack_bits(w_bits), cin, stride, same, pad_value, "float",
                                np.full(cout, -0.5, np.float32), np.full(cout, 9 * cin / 2, np.float32),
                                dilation=dilation)
        got = _run_bconv(kernels, graph, op, pack_bits(x_bits))
        np.testing.assert_array_equal(got, expected.astype(np.float32), err_msg=f"{cin}, {cout}, {dilation}")
        if cpu is not None:
            np.testing.assert_array_equal(got, _run_bconv(cpu, graph, op, pack_bits(x_bits)))


def test_gpu_binary_conv_rejects_outputs_it_cannot_write(gpu_or_cpu):
    """The GPU's prepared binary convolution, as the C++ one: a part of a concatenation must fit in
    its output, a residual must be shaped as the output, and next_bits comes exactly with pack_next;
    a wrong-sized output without an offset stays an error."""
    kernels = cuda.load("cuda")
    rng = np.random.default_rng(9)
    cin, cout = 40, 24
    weights = kernels.prepare_binary_weights(pack_bits(rng.integers(0, 2, (cout, 3, 3, cin), dtype=np.uint8)))
    popcounts = kernels.upload(np.zeros((9, cout), np.int32))
    conv = kernels.binary_conv2d(weights, [cin, cout, 3, 3, 1, 1, 1, 1, 1], kernels.upload(np.ones(cout, np.float32)),
                                 kernels.upload(np.zeros(cout, np.float32)), -2**31, 2**31 - 1,
                                 kernels.upload(np.zeros(0, np.int32)), popcounts)
    x = kernels.upload(pack_bits(rng.integers(0, 2, (1, 4, 4, cin), dtype=np.uint8)))
    wide = kernels.empty((1, 4, 4, cout + 3), np.float32)
    conv(x, wide, 1, 1, channel_offset=3)
    for offset in (-1, 4):
        with pytest.raises(ValueError, match="channels .* of an output of 27"):
            conv(x, wide, 1, 1, channel_offset=offset)
    with pytest.raises(ValueError, match="an output of 27 channels for 24"):
        conv(x, wide, 1, 1)
    with pytest.raises(ValueError, match="residual"):
        conv(x, wide, 1, 1, channel_offset=0, residual=kernels.empty((1, 4, 4, cout), np.float32))
    with pytest.raises(ValueError, match="next_bits given without pack_next"):
        conv(x, kernels.empty((1, 4, 4, cout), np.float32), 1, 1, kernels.empty((1, 4, 4, 1), np.int32))


@pytest.mark.parametrize("channels", [70, 72])
def test_gpu_bitpacking_and_elementwise_ops(gpu_or_cpu, monkeypatch, channels):
    """Bit-packing (a word's tail: 70 or 72 channels, 3 words), unpacking, an element-wise MUL +
    ReLU, and MAX and AVERAGE pools of 2 x 2 windows stride 2 over a border, against NumPy: 70
    channels a value a thread, 72 four channels a thread (the ``*_float4`` kernels)."""
    kernels = cuda.load("cuda")
    if not GPU:  # the kernels the launches ran
        launched = _recorded_launches(monkeypatch)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 7, channels)).astype(np.float32)
    x[0, 0, 0, :3] = [-0.0, 0.0, -1e-30]
    scale, shift = rng.normal(size=channels).astype(np.float32), rng.normal(size=channels).astype(np.float32)
    out = kernels.empty((2, 5, 7, 3), np.int32)
    kernels.bitpack(kernels.upload(x), kernels.upload(scale), kernels.upload(shift), out)
    expected = pack_bits(((x * scale + shift) < 0).astype(np.uint8))  # NumPy rounds each op: no FMA
    np.testing.assert_array_equal(kernels.download(out), expected)
    unpacked = kernels.empty((2, 5, 7, channels), np.float32)
    kernels.unpack(out, channels, unpacked)
    np.testing.assert_array_equal(kernels.download(unpacked), np.where((x * scale + shift) < 0, -1.0, 1.0))
    y = kernels.empty(x.shape, np.float32)
    kernels.binary_elementwise(kernels.upload(x), kernels.upload(scale), 1, 0.0, np.inf, y)
    np.testing.assert_array_equal(kernels.download(y), np.maximum(x * scale, 0))
    pooled = kernels.empty((2, 3, 4, channels), np.float32)
    kernels.pool2d(kernels.upload(x), [2, 2, 2, 2, 0, 0], 0, -np.inf, np.inf, pooled)
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
    np.testing.assert_array_equal(kernels.download(pooled), padded.reshape(2, 3, 2, 4, 2, channels).max((2, 4)))
    # the mean of the taps inside the image, then clamped to [-0.5, 0.5]
    kernels.pool2d(kernels.upload(x), [2, 2, 2, 2, 0, 0], 1, -0.5, 0.5, pooled)
    inside = np.pad(np.ones_like(x), ((0, 0), (0, 1), (0, 1), (0, 0))).reshape(2, 3, 2, 4, 2, channels).sum((2, 4))
    sums = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))).reshape(2, 3, 2, 4, 2, channels).sum((2, 4))
    np.testing.assert_allclose(kernels.download(pooled), np.clip(sums * (1 / inside), -0.5, 0.5), rtol=1e-6, atol=1e-7)
    if not GPU:
        suffix = "_float4" if channels % 4 == 0 else ""
        assert [name for name in launched if name in ("bitpack" + suffix, "pool2d" + suffix)] == \
            ["bitpack" + suffix, "pool2d" + suffix, "pool2d" + suffix], launched


@needs_cpu_kernels
def test_gpu_float_ops_match_the_cpu_kernels_and_pass_nan(gpu_or_cpu):
    """The GPU kernels' float ops against the C++ kernels on inputs holding a NaN: element-wise
    ADD + ReLU, a 1x1 convolution + bias + residual + ReLU, a concatenation + residual, an upsampling
    + residual + ReLU. Equal (the convolution to rounding), with NaN where the C++ kernels have it:
    TFLite's clamps, std::min(std::max(v, lo), hi), let NaN through, which fminf/fmaxf would not."""
    gpu, cpu = cuda.load("cuda"), _cpu_kernels()
    rng = np.random.default_rng(7)

    def normal(*shape):
        v = rng.normal(size=shape).astype(np.float32)
        v.reshape(-1)[:: max(v.size // 3, 1)] = np.nan
        return v

    x, skip = normal(2, 5, 6, 24), normal(2, 5, 6, 48)
    filters, bias = rng.normal(size=(48, 1, 1, 24)).astype(np.float32), rng.normal(size=48).astype(np.float32)
    parts = [normal(2, 5, 6, 16), normal(2, 5, 6, 32)]
    small, big = normal(1, 3, 4, 8), normal(1, 6, 8, 8)
    rows, cols = np.repeat(np.arange(3), 2).astype(np.int32), np.repeat(np.arange(4), 2).astype(np.int32)
    none = np.zeros(0, np.float32)
    results = {}
    for module in (gpu, cpu):
        put = getattr(module, "upload", lambda a: a)
        get = getattr(module, "download", lambda a: a)
        empty = getattr(module, "empty", np.empty)
        out = {name: empty(shape, np.float32) for name, shape in (
            ("add", x.shape), ("conv", skip.shape), ("concat", skip.shape), ("resize", big.shape))}
        module.binary_elementwise(put(x), put(x[0, 0, 0]), 0, 0.0, np.inf, out["add"])
        module.conv2d(put(x), module.prepare_float_weights(filters), put(bias), [1, 1, 1, 1, 1, 1, 0, 0], 0.0, np.inf,
                      [put(skip)], put(none), put(none), -np.inf, np.inf, out["conv"])
        module.concat_channels([put(p) for p in parts], put(skip), out["concat"])
        module.resize_nearest(put(small), put(rows), put(cols), put(big), 0.0, np.inf, out["resize"])
        results[module] = {name: get(value) for name, value in out.items()}
    for name in ("add", "concat", "resize"):
        np.testing.assert_array_equal(results[gpu][name], results[cpu][name], err_msg=name)
    np.testing.assert_allclose(results[gpu]["conv"], results[cpu]["conv"], rtol=1e-5, atol=1e-5)
    for name, value in results[cpu].items():
        assert np.isnan(value).any() and not np.isnan(value).all(), name
    np.testing.assert_array_equal(results[cpu]["resize"], np.maximum(small.repeat(2, 1).repeat(2, 2) + big, 0))


@pytest.mark.parametrize("channels,splits,kernel", [
    (40, (), "conv_output_float4"), (40, (24, 32), "conv_output_float4"), (40, (4, 8, 16), "conv_output_float4"),
    (40, (6,), "conv_output"), (40, (4, 8, 12, 16), "conv_output"), (38, (), "conv_output")])
def test_gpu_float_conv_output_pass_pools_and_packs_as_the_separate_ops(gpu_or_cpu, monkeypatch, channels, splits,
                                                                        kernel):
    """``conv2d``'s one pass after the product (bias, residual, activation, max pool, the next
    LceQuantize's bits) gives what the ops give one after the other, computed here in NumPy from
    the same convolution's unpooled float output on the GPU (the same product): the 7x7 stride-2
    stem pooled 3 x 2, a 1x1 with a batch norm before it (24 channels in: 4 a thread) and a residual
    pooled 2 x 2, a 3x3 with a ReLU, unpooled, a 3x3 with a batch norm over 6 channels (one a
    thread); 40 channels (a word's tail) or 38 (not a multiple of 4: a value a thread, in
    ``conv_output``), NaN (kept unpooled, left out of a window's maximum as MAX_POOL_2D leaves it),
    infinities and -0.0. The residual is one array or, split at ``splits``, the channel
    concatenation of 2 to 5 (read where they are by ``conv_output_float4`` where there are at most
    4 of multiples of 4 channels; concatenated for ``conv_output`` where not)."""
    kernels = cuda.load("cuda")
    if not GPU:  # the kernels the launches ran
        launched = _recorded_launches(monkeypatch)
    rng = np.random.default_rng(31)
    none = kernels.upload(np.zeros(0, np.float32))
    scale = rng.uniform(0.5, 2, channels).astype(np.float32)
    scale[::7] *= -1
    shift = rng.normal(size=channels).astype(np.float32)
    for size, cin, k, stride, window, has_residual, batch_norm, lo in (
            ((24, 20), 3, 7, 2, (3, 2), False, False, -np.inf), ((12, 10), 24, 1, 1, (2, 2), True, True, -np.inf),
            ((8, 10), 24, 3, 1, (), True, False, 0.0), ((6, 6), 6, 3, 1, (1, 1), False, True, 0.0)):
        x = rng.normal(size=(2,) + size + (cin,)).astype(np.float32)
        x[1, 3, 4, 0] = np.nan
        filters = rng.normal(size=(channels, k, k, cin)).astype(np.float32)
        bias = rng.normal(size=channels).astype(np.float32)
        bias[5] = -0.0
        out_h, pad_top = ops._same_padding(size[0], k, stride, 1, 0)
        out_w, pad_left = ops._same_padding(size[1], k, stride, 1, 0)
        residual = rng.normal(size=(2, out_h, out_w, channels)).astype(np.float32)
        residual[1, 2, 3, :4] = [np.inf, -np.inf, -0.0, np.nan]
        parts = [kernels.upload(np.ascontiguousarray(part)) for part in np.split(residual, splits, axis=-1)
                 ] if has_residual else []
        multiplier, offset = ((kernels.upload(rng.uniform(0.5, 2, cin).astype(np.float32)),
                               kernels.upload(rng.normal(size=cin).astype(np.float32))) if batch_norm else (none, none))
        args = (kernels.upload(x), kernels.prepare_float_weights(filters), kernels.upload(bias),
                [k, k, stride, stride, 1, 1, pad_top, pad_left], lo, np.inf, parts, multiplier, offset, -np.inf, np.inf)
        full = kernels.empty((2, out_h, out_w, channels), np.float32)
        kernels.conv2d(*args, full)
        full = kernels.download(full)
        # the unpooled output against NumPy in float64 (the batch norm before it rounded in float32, as the op)
        source = x * kernels.download(multiplier) + kernels.download(offset) if batch_norm else x
        padded = np.pad(source.astype(np.float64), ((0, 0), (pad_top, k), (pad_left, k), (0, 0)))
        reference = sum(padded[:, fy:fy + stride * out_h:stride, fx:fx + stride * out_w:stride] @ filters[:, fy, fx].T
                        for fy in range(k) for fx in range(k)) + bias + (residual if has_residual else 0)
        reference = np.where(reference < lo, lo, reference)  # TFLite's clamp: NaN passes
        np.testing.assert_allclose(full, reference, rtol=1e-4, atol=1e-4)
        ph, pw = window or (1, 1)
        windows = full.reshape(2, out_h // ph, ph, out_w // pw, pw, channels)
        want = np.where(np.isnan(windows), -np.inf, windows).max(axis=(2, 4)) if ph * pw > 1 else full
        got = kernels.empty(want.shape, np.float32)
        bits = kernels.empty(want.shape[:3] + (2,), np.int32)
        if not GPU:
            launched.clear()
        kernels.conv2d(*args, got, pool_window=window, packed=bits, pack_multiplier=kernels.upload(scale),
                       pack_bias=kernels.upload(shift))
        np.testing.assert_array_equal(kernels.download(got), want, err_msg=f"{k}x{k}, window {window}")
        np.testing.assert_array_equal(kernels.download(bits), next_layer_bits(want, scale, shift))
        assert np.isnan(full).any() and (ph * pw > 1 or np.isnan(want).any())
        if not GPU:
            # (without a residual, no parts to refuse the float4 pass)
            assert launched[-1] == (kernel if has_residual or channels % 4 else "conv_output_float4"), launched
    with pytest.raises(ValueError, match="conv2d: pool_window needs 2 positive numbers"):
        kernels.conv2d(*args, got, pool_window=[2])
    if has_residual:
        with pytest.raises(ValueError, match=r"conv2d: a residual of \[\d+, \d+\] channels for an output of"):
            kernels.conv2d(*args[:6], parts + parts[:1], *args[7:], got)


@pytest.mark.parametrize("size,cin,filter_hw,stride,dilation,padding", [
    ((13, 11), 3, (7, 7), 2, 1, 0),     # the stem: K 147 -> 148, 3 channels a unit, several pixels a block
    ((9, 10), 8, (3, 3), 1, 2, 0),      # dilated; 16-byte copies (8 channels)
    ((9, 7), 5, (3, 3), 2, 1, 0),       # a 4-channel unit and a 1-channel one a tap; K 45 -> 48
    ((40, 41), 6, (1, 1), 2, 1, 0),     # a strided 1x1 through im2col (K 6, unpadded): 4 blocks of 256 pixels
    ((5, 4), 520, (3, 3), 1, 1, 0),     # 1170 units a pixel: one pixel a block
    ((8, 9), 4, (2, 3), 1, 1, 1),       # VALID, a 2x3 filter: K 24
])
def test_gpu_float_conv_im2col_matches_numpy(gpu_or_cpu, size, cin, filter_hw, stride, dilation, padding):
    """Float convolutions through im2col (filters larger than 1x1, or strided) against NumPy in
    float64: the matrix's rows are K = fh * fw * Cin rounded up to a multiple of 4 for filters
    larger than 1x1 (the weights' padding rows zero), every column written (uninitialised memory
    is NaN in the CPU build), taps outside the image zero, over blocks of several pixels and of
    one. Weights of another K are refused by name."""
    kernels = cuda.load("cuda")
    rng = np.random.default_rng(sum(size) + cin)
    (fh, fw), cout = filter_hw, 12
    x = rng.normal(size=(2,) + size + (cin,)).astype(np.float32)
    filters = rng.normal(size=(cout, fh, fw, cin)).astype(np.float32)
    bias = rng.normal(size=cout).astype(np.float32)
    out_h, pad_top = ops._same_padding(size[0], fh, stride, dilation, padding)
    out_w, pad_left = ops._same_padding(size[1], fw, stride, dilation, padding)
    weights = kernels.prepare_float_weights(filters)
    k = fh * fw * cin
    assert weights.shape == ((k + 3) // 4 * 4 if fh * fw > 1 else k, cout)
    assert not kernels.download(weights)[k:].any()
    none = kernels.upload(np.zeros(0, np.float32))
    args = (kernels.upload(x), weights, kernels.upload(bias), [fh, fw, stride, stride, dilation, dilation, pad_top,
                                                               pad_left], -np.inf, np.inf, [], none, none, -np.inf, np.inf)
    out = kernels.empty((2, out_h, out_w, cout), np.float32)
    kernels.conv2d(*args, out)
    span_h, span_w = (fh - 1) * dilation + stride * out_h, (fw - 1) * dilation + stride * out_w
    padded = np.pad(x.astype(np.float64), ((0, 0), (pad_top, max(span_h - size[0] - pad_top, 0)),
                                           (pad_left, max(span_w - size[1] - pad_left, 0)), (0, 0)))
    reference = bias + sum(
        padded[:, fy * dilation:fy * dilation + stride * out_h:stride,
               fx * dilation:fx * dilation + stride * out_w:stride] @ filters[:, fy, fx].T.astype(np.float64)
        for fy in range(fh) for fx in range(fw))
    np.testing.assert_allclose(kernels.download(out), reference, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    matrix = kernels.download(weights)
    for wrong in (matrix[:k - 1], np.pad(matrix, ((0, 4), (0, 0)))):
        with pytest.raises(ValueError, match=f"conv2d: weights of {len(wrong)} rows for a {fh}x{fw} filter over {cin}"):
            kernels.conv2d(args[0], kernels.upload(wrong), *args[2:], out)


def test_heatmaps_decode_on_the_gpu_as_in_numpy(gpu_or_cpu):
    """The Predictor's GPU decoding (``decode_heatmaps_array`` on CuPy arrays) gives the NumPy
    decoding's points and scores exactly (that one is tested equal to TensorFlow's)."""
    from larq_landmarks.runtime.decoding import decode_heatmaps_array

    cp = cuda.load("cuda").cp
    maps = np.random.default_rng(4).uniform(size=(5, 16, 16, 68)).astype(np.float32)
    maps[:, 0, 7, 3] = maps[:, 9, 15, 4] = 2.0  # peaks on the borders
    expected = decode_heatmaps_array(maps)
    got = decode_heatmaps_array(cp.asarray(maps), cp)
    for value, want in zip(got, expected):
        np.testing.assert_array_equal(cp.asnumpy(value), want)


def test_gpu_crops_sample_the_image_as_tensorflow_does(gpu_or_cpu):
    """The Predictor's crops cut on the GPU (warp_crops) against the CPU's (larq_landmarks.cropping,
    TensorFlow's bilinear warp in NumPy: tests/test_cropping.py): zoomed, rotated and reaching past
    the image's edges."""
    kernels = cuda.load("cuda")
    image = np.random.default_rng(7).integers(0, 256, (29, 41, 3), dtype=np.uint8)
    angle = np.deg2rad(20)
    params = np.array([[0.5, 0, 3, 0, 0.5, 2, 0, 0], [2, 0, -5, 0, 2, -3, 0, 0],
                       [np.cos(angle), -np.sin(angle), 10, np.sin(angle), np.cos(angle), -4, 0, 0]], np.float32)
    got = kernels.cp.asnumpy(kernels.warp_crops(image, params, 20))
    expected = cropping.warp_crops(image, params, 20)
    assert (expected == 0).any() and (expected > 0).mean() > 0.3
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def _model_cases():
    """(name, flatbuffer, images, CPU runtime output) for every model ``scripts/benchmark_gpu.py
    --prepare`` wrote to ``$LARQ_LANDMARKS_GPU_ASSETS``."""
    folder = os.environ.get("LARQ_LANDMARKS_GPU_ASSETS")
    if not folder or not os.path.isdir(folder):
        return []
    cases = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tflite"):
            stem = name[: -len(".tflite")]
            with open(os.path.join(folder, name), "rb") as f:
                flatbuffer = f.read()
            data = np.load(os.path.join(folder, stem + ".npz"))
            cases.append(pytest.param(stem, flatbuffer, data["images"], data["cpu_output"], id=stem))
    return cases


def _peaks(heatmaps: np.ndarray) -> np.ndarray:
    """Each heatmap's arg-max (row, column): the decoded landmark to the pixel."""
    batch, height, width, count = heatmaps.shape
    flat = heatmaps.transpose(0, 3, 1, 2).reshape(batch, count, -1).argmax(-1)
    return np.stack([flat // width, flat % width], -1)


@pytest.mark.skipif(not _model_cases(), reason="no models prepared (LARQ_LANDMARKS_GPU_ASSETS)")
@pytest.mark.parametrize("name,flatbuffer,images,cpu_output", _model_cases())
@pytest.mark.parametrize("path", cuda.PATHS)
def test_gpu_models_match_the_cpu_runtime(gpu_or_cpu, name, flatbuffer, images, cpu_output, path):
    """Every named binary configuration and the default model, as prepared for the GPU machine."""
    _assert_gpu_model_matches_the_cpu_runtime(name, flatbuffer, images, cpu_output, path)


@pytest.fixture(scope="module")
def default_model():
    """The default model (68 points, batch norms with trained-like statistics) converted here, as
    ``scripts/benchmark_gpu.py --prepare`` makes it but for 128x128 input instead of 256x256 (the
    same layers and widths, a quarter of the pixels: kernels.cu on the CPU takes a quarter of the
    time), with two images and the CPU runtime's output on them: (flatbuffer, images, cpu_output).
    Needs TensorFlow (CI has it; the GPU machine has the prepared models instead)."""
    pytest.importorskip("tensorflow")
    from larq_landmarks import export, models
    from larq_landmarks.runtime import Engine
    from larq_landmarks.synthetic import trained_like_batch_norm

    flatbuffer = export.convert(trained_like_batch_norm(models.BinaryHourglass(68, input_size=128)))
    images = np.random.default_rng(1).uniform(size=(2, 128, 128, 3)).astype(np.float32)
    return flatbuffer, images, Engine(flatbuffer).predict(images)


@pytest.mark.slow  # a conversion of the default model, and about 1 s a call of it where kernels.cu runs on the CPU
@needs_cpu_kernels
@pytest.mark.parametrize("path", cuda.PATHS)
def test_default_model_on_the_gpu_matches_the_cpu_runtime(gpu_or_cpu, default_model, path):
    """The default model's every GPU step (the fused HPM blocks with their narrow layers, the
    float convolutions, CUDA graph capture and replay) as the GPU test on prepared models checks
    it, without them: where there is no GPU, ``kernels.cu`` runs on the CPU."""
    _assert_gpu_model_matches_the_cpu_runtime("default", *default_model, path)


def _assert_gpu_model_matches_the_cpu_runtime(name, flatbuffer, images, cpu_output, path) -> None:
    """The whole model on the GPU against the CPU runtime's output on the same file (batch > 1 on
    a batch-1 file); the second and third calls (the run captured as a CUDA graph, then replayed,
    NumPy and CuPy in) give the first's output, and so does batch 1 to the float convolutions'
    rounding: their products (cuBLAS, or NumPy's BLAS standing in) sum in an order that depends on
    the batch, a few units in the last place of the largest sums (2e-5 on maps up to 40 where
    kernels.cu ran on the CPU, 1e-6 inside a fixed 1e-5 bound, which a CI run's model crossed)."""
    from larq_landmarks.runtime import Engine

    engine = Engine(flatbuffer, kernels=path, name=name)
    got = engine.predict(images)
    assert got.shape == cpu_output.shape
    assert np.abs(got - cpu_output).mean() <= 1e-5 * np.abs(cpu_output).mean(), name
    same = np.all(_peaks(got) == _peaks(cpu_output), -1)
    assert same.mean() >= 0.99, name
    cp = cuda._cupy()
    captured = engine.predict(images)
    replayed = cp.asnumpy(engine.predict(cp.asarray(images)))
    assert engine._captured.failed is None and list(engine._captured.captured) == [images.shape], name
    for again in (captured, replayed):
        np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(engine.predict(images[:1]), got[:1], rtol=1e-5, atol=2e-6 * np.abs(got).max())


@pytest.fixture
def predictor_model(request):
    """A small converted model's path: the prepared ``binary_hpm`` (64x64) where
    ``$LARQ_LANDMARKS_GPU_ASSETS`` has one (the GPU machine), otherwise conftest's ``small_file``."""
    folder = os.environ.get("LARQ_LANDMARKS_GPU_ASSETS")
    if folder and os.path.isfile(os.path.join(folder, "binary_hpm.tflite")):
        return os.path.join(folder, "binary_hpm.tflite")
    try:
        return request.getfixturevalue("small_file")
    except pytest.FixtureLookupError:
        pytest.skip("no model: no prepared models (LARQ_LANDMARKS_GPU_ASSETS) and no conftest (small_file)")


def _faces():
    """Three 90x100 images and their face boxes (two in the first)."""
    rng = np.random.default_rng(8)
    images = [(rng.uniform(size=(90, 100, 3)) * 255).astype(np.uint8) for _ in range(3)]
    return images, [[[10, 10, 80, 70], [0, 0, 50, 50]], [[5, 5, 60, 60]], [[20, 10, 90, 85]]]


def test_step_by_step_runs_queued_on_two_streams_at_once_keep_their_buffers(gpu_or_cpu, predictor_model):
    """Step-by-step runs queued on two CUDA streams at once (CuPy arrays in and out, nothing waiting
    between them) each give the result of a run alone: neither takes a buffer that the other's
    queued kernels still read. On a GPU, at batch 64 the kernels run behind the launches, so a
    shared pool of released buffers would be overwritten while still read."""
    from larq_landmarks.runtime import Engine

    engine = Engine(predictor_model, kernels="cuda", cuda_graphs=False)
    cp = engine._kernels.cp
    rng = np.random.default_rng(12)
    images = [rng.uniform(size=(64 if GPU else 2,) + engine.input_shape[1:]).astype(np.float32) for _ in range(2)]
    expected = [engine.predict(x) for x in images]  # one at a time (NumPy out: each waited for)
    streams = [cp.cuda.Stream(non_blocking=True) for _ in images]
    outputs = []
    for _ in range(3):
        for stream, x in zip(streams, images):
            with stream:
                outputs.append(engine.predict(engine._kernels.upload(x)))
    for stream in streams:
        stream.synchronize()
    for i, output in enumerate(outputs):
        np.testing.assert_array_equal(cp.asnumpy(output), expected[i % 2], err_msg=f"run {i}")


@needs_cpu_kernels
def test_predictor_runs_the_cuda_engine(gpu_or_cpu, predictor_model, monkeypatch):
    """Issue 11's item 3 (on the GPU, or on kernels.cu built for the CPU): ``Predictor(engine="cuda")``
    cuts the crops on the GPU as the CPU cuts them, batches the faces of several images into one
    model call and finds the CPU runtime's landmarks, flip test included, heatmaps decoded on the
    GPU. It needs neither TensorFlow nor Pillow (images as arrays)."""
    from larq_landmarks.predictor import Predictor

    images, boxes = _faces()
    gpu, cpu = Predictor.from_path(predictor_model, engine="cuda"), Predictor.from_path(predictor_model, engine="runtime")
    assert (gpu.engine, cpu.engine) == ("cuda", "runtime")
    calls = []
    heatmaps = gpu._heatmaps
    monkeypatch.setattr(gpu, "_heatmaps", lambda crops: calls.append(len(crops)) or heatmaps(crops))
    for (points, _), (expected, _) in zip(gpu.predict_many(images, boxes), cpu.predict_many(images, boxes)):
        np.testing.assert_allclose(points, expected, atol=0.5)
    assert calls == [4]  # the four faces of three images in one call
    # the crops are cut and the heatmaps stay on the GPU (decoded there), flip test included
    flipped, flipped_cpu = (Predictor.from_path(predictor_model, engine=engine, use_flip_test=True)
                            for engine in ("cuda", "runtime"))
    cp = cuda.load("cuda").cp
    device_array = type(cp.zeros(1))
    assert flipped._array_module is cp
    size = flipped.input_size
    assert isinstance(flipped._heatmaps(np.zeros((1, size, size, 3), np.float32)), device_array)
    crops, _, _ = flipped._prepare(images[0], boxes[0], None)
    assert isinstance(crops, device_array)
    np.testing.assert_allclose(cp.asnumpy(crops), flipped_cpu._prepare(images[0], boxes[0], None)[0], atol=2e-6)
    for (points, scores), (expected, expected_scores) in zip(flipped.predict_many(images, boxes),
                                                             flipped_cpu.predict_many(images, boxes)):
        np.testing.assert_allclose(points, expected, atol=0.5)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)
    # segmentation (the 68 heatmaps read as class scores): the scores come back to NumPy, the maps agree
    parts, parts_cpu = (Predictor.from_path(predictor_model, engine=engine, task="segmentation")
                        for engine in ("cuda", "runtime"))
    for labels, expected in zip(parts.segment_many(images, boxes), parts_cpu.segment_many(images, boxes)):
        assert labels.shape == expected.shape == images[0].shape[:2] and (labels == expected).mean() > 0.99


@needs_cpu_kernels
def test_predict_command_runs_the_cuda_engine(gpu_or_cpu, predictor_model, monkeypatch, tmp_path):
    """``larq-landmarks predict --engine cuda`` on three image files: their faces go through the
    model in one call and it writes the CPU runtime's landmarks for each."""
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("tqdm")
    from larq_landmarks import cli
    from larq_landmarks.predictor import Predictor

    images, _ = _faces()
    paths = [str(tmp_path / f"face{i}.png") for i in range(3)]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    calls = []
    own = Predictor._heatmaps
    monkeypatch.setattr(Predictor, "_heatmaps", lambda self, crops: calls.append(len(crops)) or own(self, crops))
    assert cli.main(["predict", *paths, "--model", predictor_model, "--engine", "cuda", "--box", "10,10,80,70",
                     "--out", str(tmp_path / "out")]) == 0
    assert calls == [3]
    written = json.loads((tmp_path / "out" / "landmarks.json").read_text())
    cpu = Predictor.from_path(predictor_model, engine="runtime")
    for path, image in zip(paths, images):
        np.testing.assert_allclose(written[path]["landmarks"][0], cpu.predict(image, [[10, 10, 80, 70]])[0][0],
                                   atol=0.5)


def _two_gpus(monkeypatch):
    """The GPU kernels on the CPU (fake_cupy) on a machine with two GPUs: an array used while the
    other GPU is current is an error, as on a GPU it faults or CuPy refuses it."""
    fake_cupy.install(monkeypatch)
    monkeypatch.setattr(fake_cupy.Device, "count", 2)


@pytest.mark.skipif(GPU, reason="two GPUs stood for by the CPU build (CI); the GPU session keeps its time for the GPU")
def test_gpu_engine_keeps_to_the_gpu_it_is_given(predictor_model, monkeypatch):
    """With two GPUs: ``kernels="cuda:1"`` puts the weights on GPU 1 and runs there whichever GPU
    is current at the call (step by step, captured as CUDA graphs and replayed), with the outputs
    of the engine on GPU 0; ``"cuda"`` is the GPU current when the engine is made. A CuPy input on
    the other GPU, a GPU that does not exist and a malformed name are errors that say so. The same
    kernels launched with GPU 0 current fail (what the engine's care prevents)."""
    from larq_landmarks.runtime import Engine

    _two_gpus(monkeypatch)
    zero = Engine(predictor_model, kernels="cuda", cuda_graphs=False)
    images = np.random.default_rng(13).uniform(size=(1,) + tuple(zero.input_shape[1:])).astype(np.float32)
    expected = zero.predict(images)
    one = Engine(predictor_model, kernels="cuda:1")
    assert (zero.kernels, one.kernels) == ("cuda", "cuda:1")
    assert one._kernels is cuda.load("cuda:1") and one._kernels.device.id == 1 and zero._kernels.device.id == 0
    for call in ("eager", "captured", "replayed"):
        np.testing.assert_array_equal(one.predict(images), expected, err_msg=call)
    with fake_cupy.Device(1):
        made_on_one = Engine(predictor_model, kernels="cuda", cuda_graphs=False)
        on_one = fake_cupy.asarray(images)
    assert made_on_one.kernels == "cuda:1"
    np.testing.assert_array_equal(made_on_one.predict(images), expected)
    result = one.predict(on_one)  # CuPy in, CuPy out, on GPU 1
    assert result.device.id == 1
    np.testing.assert_array_equal(fake_cupy.asnumpy(result), expected)
    with pytest.raises(ValueError, match="images are on GPU 0, the engine runs on GPU 1"):
        one.predict(fake_cupy.asarray(images))

    class OtherLibrarysTensor:  # a GPU array of another library (a PyTorch tensor, say)
        shape, ndim, __cuda_array_interface__ = images.shape, 4, {"shape": images.shape, "typestr": "<f4"}

    with pytest.raises(TypeError, match=r"must be a CuPy array, got .*OtherLibrarysTensor \(cupy.asarray"):
        one.predict(OtherLibrarysTensor())
    with pytest.raises(cuda.CudaUnavailableError, match="'cuda:2': this machine has 2 GPUs"):
        Engine(predictor_model, kernels="cuda:2")
    with pytest.raises(ValueError, match="kernels='cuda:one'"):
        Engine(predictor_model, kernels="cuda:one")
    cp = one._kernels.cp
    with fake_cupy.Device(1):
        x, out = cp.zeros((1, 4, 4, 32), np.float32), cp.empty((1, 4, 4, 1), np.int32)
    with pytest.raises(AssertionError, match="an array on GPU 1 used while GPU 0 is current"):
        one._kernels.bitpack(x, x[:0], x[:0], out)


@pytest.mark.skipif(GPU, reason="two GPUs stood for by the CPU build (CI); the GPU session keeps its time for the GPU")
def test_predictor_runs_on_the_gpu_it_is_given(predictor_model, monkeypatch):
    """With two GPUs and GPU 0 current, ``Predictor.from_path(engine="cuda:1")`` cuts the crops,
    runs the model (flip test: twice) and decodes the heatmaps on GPU 1, finding the landmarks of
    the predictor on GPU 0; a GPU that does not exist is an error that says so."""
    from larq_landmarks.predictor import Predictor

    _two_gpus(monkeypatch)
    images, boxes = _faces()
    zero, one = (Predictor.from_path(predictor_model, engine=engine, use_flip_test=True)
                 for engine in ("cuda", "cuda:1"))
    assert one.engine == "cuda" and one._device.id == 1
    crops, _, _ = one._prepare(images[0], boxes[0], None)
    assert crops.device.id == 1
    for (points, scores), (expected, expected_scores) in zip(one.predict_many(images[:2], boxes[:2]),
                                                             zero.predict_many(images[:2], boxes[:2])):
        np.testing.assert_array_equal(points, expected)
        np.testing.assert_array_equal(scores, expected_scores)
    with pytest.raises(cuda.CudaUnavailableError, match="'cuda:2': this machine has 2 GPUs"):
        Predictor.from_path(predictor_model, engine="cuda:2")
    with pytest.raises(ValueError, match="engine='gpu'"):
        Predictor.from_path(predictor_model, engine="gpu")


@pytest.mark.skipif(GPU, reason="two GPUs stood for by the CPU build (CI); the GPU session keeps its time for the GPU")
def test_predict_command_takes_a_gpu_index(predictor_model, monkeypatch, tmp_path, capsys):
    """``larq-landmarks predict --engine cuda:1`` writes the landmarks that GPU 0 finds; a GPU that
    does not exist, or an engine name that is not one, is a one-line error."""
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("tqdm")
    from larq_landmarks import cli
    from larq_landmarks.predictor import Predictor

    _two_gpus(monkeypatch)
    images, _ = _faces()
    path = str(tmp_path / "face.png")
    Image.fromarray(images[0]).save(path)
    arguments = ["predict", path, "--model", predictor_model, "--box", "10,10,80,70", "--out", str(tmp_path / "out")]
    assert cli.main(arguments + ["--engine", "cuda:1"]) == 0
    written = json.loads((tmp_path / "out" / "landmarks.json").read_text())
    expected = Predictor.from_path(predictor_model, engine="cuda").predict(images[0], [[10, 10, 80, 70]])[0][0]
    np.testing.assert_allclose(written[path]["landmarks"][0], expected, atol=1e-4)
    with pytest.raises(SystemExit, match="predict: kernels='cuda:2': this machine has 2 GPUs"):
        cli.main(arguments + ["--engine", "cuda:2"])
    with pytest.raises(SystemExit):
        cli.main(arguments + ["--engine", "cuda:x"])
    assert "engine='cuda:x'" in capsys.readouterr().err


def _nvrtc():
    """CuPy's NVRTC binding where it and its library load (no GPU needed to compile), else None."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.skipif(_nvrtc() is None, reason="no CuPy with NVRTC here")
def test_kernels_compile_with_nvrtc_and_the_gather_macro_takes_effect():
    """kernels.cu as CuPy's RawModule hands it to NVRTC, with ``cuda.compile_options``: both gathers
    compile for Hopper, the macro's spelling is one NVRTC takes (it refuses options it does not know),
    and the stepped gather's build has the 16-byte loads the one-word build lacks."""
    nvrtc = _nvrtc()
    with open(cuda.SOURCE, encoding="utf-8") as f:
        source = f.read()
    vector_loads = {}
    for stepped in (False, True):
        program = nvrtc.createProgram(source, "kernels.cu", [], [])
        try:
            nvrtc.compileProgram(program, list(cuda.compile_options(stepped)) + ["--gpu-architecture=compute_90"])
            ptx = nvrtc.getPTX(program)
        finally:
            nvrtc.destroyProgram(program)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        vector_loads[stepped] = ptx.count("ld.global.v4")
        assert ".entry bconv2d_tensor_cores(" in ptx
    assert vector_loads[True] > vector_loads[False]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc here")
@pytest.mark.parametrize("stepped_gather", [False, True])
@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90"])
def test_kernels_compile_for_the_gpus_without_spills(arch, stepped_gather, tmp_path):
    """kernels.cu as NVIDIA's compiler sees it (CuPy compiles it with NVRTC, the same front end):
    it compiles for Turing (the popcount path), Ampere and Hopper, and the binary convolutions fit
    their registers (``__launch_bounds__``) without spilling to local memory. With the stepped
    gather, one register may spill (nvcc 13.0: 4 bytes in some kernels, stored and reloaded once a
    K chunk, before the gather's loop), no more."""
    result = subprocess.run(["nvcc", *cuda.compile_options(stepped_gather), f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o",
                             str(tmp_path / "kernels.cubin"), cuda.SOURCE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads",
                        result.stderr, flags=re.S)
    with open(cuda.SOURCE, encoding="utf-8") as f:
        kernels = set(cuda_on_cpu.kernel_signatures(f.read())[0])
    assert {name for name, _, _ in report} == kernels and {"bconv2d_tensor_cores", "bconv2d_popcount"} <= kernels
    allowed = 4 if stepped_gather else 0
    assert all(int(stores) <= allowed and int(loads) <= allowed for _, stores, loads in report), result.stderr
