"""The runtime's kernels on an NVIDIA GPU: the same functions as the C++ kernel modules
(``bitpack``, ``binary_conv2d``, ``conv2d``, ...), on CuPy arrays, so :mod:`larq_landmarks.runtime.ops`
and the engine run unchanged. Binary convolutions use the 1-bit tensor cores (``"cuda"``, sm_80
and newer) or a plain ``__popc`` kernel (``"cuda-popcount"``, any GPU); float convolutions are
im2col plus cuBLAS (``cupy.matmul``, TF32 off as CuPy's default), element-wise ops CuPy kernels.
The CUDA source is ``runtime/csrc/kernels.cu``, compiled once per process by NVRTC.

Each set of kernels belongs to one GPU: ``"cuda"`` is CuPy's current device when it is loaded,
``"cuda:N"`` device N (as PyTorch spells it). Its functions launch on the current device, which
must be theirs; the engine and the ``Predictor`` make it so around every call.

Needs CuPy (``pip install -e ".[cuda]"``) and a GPU, never TensorFlow.
"""
import functools
import os
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import numpy as np

PATHS = ("cuda", "cuda-popcount")
BLOCK_ROWS, BLOCK_CHANNELS, STEP_WORDS, CHUNK_WORDS, THREADS = 128, 64, 8, 40, 256  # as in kernels.cu
IM2COL_PIXELS = 256  # as in kernels.cu
TILE_ROWS = (128, 64, 32)  # the tensor-core kernel's tiles: rows (output pixels) a block
# the tile of a grid that 128-row tiles would leave with no more blocks than the GPU has SMs
# (CudaKernels' tile_rows=None): None, small_grid_rows' choice (64 or 32 by the grid); 128, 64 or
# 32, that tile on every such grid (what scripts/benchmark_gpu.py sets to time each on the whole model)
SMALL_GRID_ROWS: Optional[int] = None
# whether the binary convolution gathers a row's words with kernels.cu's gather_row_stepped (the
# address stepped along K, the image bounds checked once a tap, a tap's words in one 8- or 16-byte
# load where the input has 64 channels or a multiple of 128) instead of gather_row (one word a load,
# its address computed for each) (CudaKernels' stepped_gather=None). On the H200 (2026-12-04, the
# fifth session's first run): stepped 1.03-1.41x faster on all 63 shapes of docs/benchmarks.md, the whole
# model at batch 64 9.95 ms against 10.25.
STEPPED_GATHER = True
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "kernels.cu")


class CudaUnavailableError(RuntimeError):
    """``kernels="cuda"`` asked for where CuPy or a GPU is missing."""


def _cupy():
    try:
        import cupy
    except ImportError as error:
        raise CudaUnavailableError(
            f"kernels='cuda' needs CuPy and an NVIDIA GPU: CuPy is not installed ({error}); "
            "install it with `pip install -e \".[cuda]\"` or use the CPU kernels (kernels='auto')"
        ) from error
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver
        raise CudaUnavailableError(f"kernels='cuda' needs an NVIDIA GPU: CUDA reports {error}") from error
    if count < 1:
        raise CudaUnavailableError("kernels='cuda' needs an NVIDIA GPU: none is visible")
    return cupy


def parse_kernels(name: str) -> Tuple[str, Optional[int]]:
    """``"cuda"``, ``"cuda-popcount"``, ``"cuda:1"``, ``"cuda-popcount:0"`` -> ``(path, device
    index or None)``; anything else is a ValueError that lists the spellings."""
    path, _, index = name.partition(":")
    if path not in PATHS or (index and not index.isdigit()):
        raise ValueError(f"kernels={name!r}; the GPU paths are {PATHS}, each optionally with a device "
                         "index, e.g. 'cuda:1'")
    return path, int(index) if index else None


def bconv_tile(blocks: int, multiprocessors: int, async_copies: Optional[bool] = None,
               tile_rows: Optional[int] = None) -> Tuple[int, bool]:
    """The tensor-core binary convolution's tile (rows a block) and whether it loads by
    ``cp.async``, for a layer whose grid of 128-row tiles has ``blocks`` blocks on a GPU of
    ``multiprocessors`` SMs (:class:`CudaKernels`' ``async_copies`` and ``tile_rows``)."""
    small = blocks <= multiprocessors
    rows = tile_rows or (small_grid_rows(blocks, multiprocessors) if small and async_copies is not False
                         else BLOCK_ROWS)
    if rows != BLOCK_ROWS:
        return rows, True
    return BLOCK_ROWS, small if async_copies is None else async_copies


def small_grid_rows(blocks: int, multiprocessors: int) -> int:
    """The tile (rows a block) of a grid of ``blocks`` 128-row blocks, no more than the GPU's
    ``multiprocessors``: :data:`SMALL_GRID_ROWS` where set, else 32 rows where 128-row tiles would
    fill at most half the SMs, 64 where they would fill more. On the H200 (132 SMs, 2026-12-04): of
    the 36 such shapes of docs/benchmarks.md, 32 rows the fastest tile on each of the 31 of 64 blocks
    or fewer (1.41-2.15x faster than 128 rows), 64 rows on each of the 5 of 128 blocks (1.10-1.24x;
    32 rows there 0.98-1.05x)."""
    if SMALL_GRID_ROWS:
        return SMALL_GRID_ROWS
    return 32 if 2 * blocks <= multiprocessors else 64


def compile_options(stepped_gather: bool = False) -> Tuple[str, ...]:
    """The compiler's options for ``kernels.cu`` (NVRTC's, and nvcc's alike: both spell a macro
    ``--define-macro=NAME=VALUE``): C++17, and its macro for the binary convolution's gather
    (``CudaKernels``' ``stepped_gather``)."""
    return ("-std=c++17", f"--define-macro=BCONV_STEPPED_GATHER={int(stepped_gather)}")


class BinaryWeights:
    """A binary convolution's weights on the GPU: ``words`` ``[Cout padded to 64, K words padded
    to 40]`` (K tap-major, zero padded) and ``popcounts`` (set bits per output channel)."""

    def __init__(self, words, popcounts):
        self.words, self.popcounts = words, popcounts
        self.launches: dict = {}  # input and output shapes -> (grid, scalar arguments, kernel)


def layout_binary_weights(filters: np.ndarray):
    """LCE's bit-packed filters ``[Cout, fh, fw, words]`` as the kernel's B matrix (NumPy):
    ``([Cout padded, K words padded], popcounts [Cout padded])``."""
    cout, fh, fw, words = filters.shape
    k_words = fh * fw * words
    rows = -(-cout // BLOCK_CHANNELS) * BLOCK_CHANNELS
    chunks = -(-k_words // CHUNK_WORDS)
    matrix = np.zeros((rows, chunks * CHUNK_WORDS), np.uint32)
    matrix[:cout, :k_words] = filters.reshape(cout, k_words).view(np.uint32)
    popcounts = np.unpackbits(matrix.view(np.uint8), axis=-1).sum(-1, dtype=np.int32)
    return matrix, popcounts


class CudaKernels:
    """The kernel functions of the C++ modules, on one GPU. ``path`` is ``"cuda"`` (tensor cores)
    or ``"cuda-popcount"``; ``device`` the GPU's index (None: CuPy's current device), whose
    ``cupy.cuda.Device`` is :attr:`device` (the functions launch on the current device: enter it
    first where another may be current). ``async_copies`` says how the tensor-core binary convolution
    loads its K chunks into shared memory: ``True``, by ``cp.async`` (all of a chunk's copies in
    flight at once); ``False``, through registers a few words at a time; ``None`` (the default), by
    ``cp.async`` where a launch's grid has no more blocks than the GPU has SMs and through registers
    where it has more (on the H200, 2026-12-04: ``cp.async`` 1.00-1.09x faster at up to 128 blocks,
    where nothing else hides a block's load latency; registers 1.00-1.28x faster from 256 blocks on,
    where other blocks do). ``tile_rows``: the output pixels a block of the tensor-core kernel
    computes: 128, 64 or 32 (the smaller tiles with ``cp.async``), or ``None`` (the default): 128
    where that grid has more blocks than the GPU has SMs (or ``async_copies=False``), else
    :func:`small_grid_rows`' 64 or 32, so that a small layer is spread over more SMs. The popcount path
    always loads through registers, 128 rows a block. ``stepped_gather``: whether the binary
    convolutions gather a row's words with the address stepped along K, the image's bounds checked
    once a tap, and a tap's words in one 8- or 16-byte load where the input's words a pixel are a
    multiple of 2 or 4 (64, 128, 256 channels), rather than one word a load, its address computed
    for each (bit-exact either way); ``None`` (the default): :data:`STEPPED_GATHER`."""

    def __init__(self, path: str = "cuda", async_copies: Optional[bool] = None, device: Optional[int] = None,
                 tile_rows: Optional[int] = None, stepped_gather: Optional[bool] = None):
        if tile_rows not in (None,) + TILE_ROWS:
            raise ValueError(f"tile_rows={tile_rows!r}; the tensor-core kernel has tiles of {TILE_ROWS} rows")
        if tile_rows not in (None, BLOCK_ROWS) and async_copies is False:
            raise ValueError(f"tile_rows={tile_rows} loads by cp.async; async_copies=False has tiles of "
                             f"{BLOCK_ROWS} rows only")
        if path not in PATHS:
            raise ValueError(f"kernels={path!r}; the GPU paths are {PATHS}")
        cp = _cupy()
        self.cp = cp
        count = cp.cuda.runtime.getDeviceCount()
        index = cp.cuda.Device().id if device is None else device
        if not 0 <= index < count:
            raise CudaUnavailableError(f"kernels='{path}:{index}': this machine has {count} GPU"
                                       f"{'s' if count > 1 else ''} (devices 0 to {count - 1})")
        self.device = cp.cuda.Device(index)
        self.compute_capability = int(self.device.compute_capability)  # e.g. 90 for sm_90
        self.multiprocessors = int(cp.cuda.runtime.getDeviceProperties(index)["multiProcessorCount"])
        self.async_copies, self.tile_rows = async_copies, tile_rows
        self.stepped_gather = STEPPED_GATHER if stepped_gather is None else bool(stepped_gather)
        if path == "cuda" and self.compute_capability < 80:
            path = "cuda-popcount"  # no 1-bit tensor cores before sm_80
        self.path = path
        # how the engine names these kernels: the path, with the device's index where it is not 0
        self.name = path if index == 0 else f"{path}:{index}"
        with self.device:
            self._load()

    def _load(self) -> None:
        cp = self.cp
        with open(SOURCE, encoding="utf-8") as f:
            self._module = cp.RawModule(code=f.read(), options=compile_options(self.stepped_gather))
        try:  # NVRTC compiles the module, and the driver loads it, at the first get_function
            if self.path == "cuda":
                self._bconv_async = self._module.get_function("bconv2d_tensor_cores")
                self._bconv_registers = self._module.get_function("bconv2d_tensor_cores_register_loads")
                self._bconv_small = {rows: self._module.get_function(f"bconv2d_tensor_cores_rows{rows}")
                                     for rows in TILE_ROWS[1:]}
            else:
                self._bconv_async = self._bconv_registers = self._module.get_function("bconv2d_popcount")
        except Exception as error:  # e.g. CUDA_ERROR_UNSUPPORTED_PTX_VERSION: a driver older than CuPy's CUDA
            raise CudaUnavailableError(
                f"kernels='{self.name}': CuPy {getattr(cp, '__version__', '')} could not build the runtime's CUDA "
                f"kernels for this GPU (sm_{self.compute_capability}): {type(error).__name__}: {error}. The CuPy "
                "package must match the NVIDIA driver's CUDA version (cupy-cuda12x for a CUDA 12 driver, "
                "cupy-cuda13x for CUDA 13; `nvidia-smi` shows the driver's, `python -c \"import cupy; "
                "cupy.show_config()\"` CuPy's) and find NVRTC (its [ctk] extra brings it: pip install "
                "\"cupy-cuda13x[ctk]\")") from error
        (self._unpack, self._im2col, self._conv_output, self._conv_output_float4, self._concat_part,
         self._warp) = (self._module.get_function(name) for name in (
            "unpack", "im2col", "conv_output", "conv_output_float4", "concat_part", "warp_crops"))
        # kernels of a value a thread and of 4 channels a thread (_float4 says which a launch takes)
        self._bitpacks, self._pools, self._resizes, self._input_transforms = (
            tuple(self._module.get_function(name + suffix) for suffix in ("", "_float4"))
            for name in ("bitpack", "pool2d", "resize_nearest", "input_transform"))
        # the clamps are TFLite's std::min(std::max(v, lo), hi), which let NaN through
        clamp = "const float low = r < lo ? lo : r; out = hi < low ? hi : low;"
        self._elementwise = cp.ElementwiseKernel(
            "float32 a, raw float32 b, int64 n, int32 op, float32 lo, float32 hi", "float32 out",
            "const float v = b[i % n]; const float r = op == 0 ? a + v : a * v; " + clamp,
            "larq_landmarks_binary_elementwise")
        self._empty_float = cp.zeros(1, cp.float32)
        self._empty_int = cp.zeros(1, cp.int32)

    # --- what the engine and the ops need besides the kernels -------------------------------
    def upload(self, array):
        """A NumPy array (constant or input) on the GPU."""
        return self.cp.ascontiguousarray(self.cp.asarray(array))

    def download(self, array) -> np.ndarray:
        return self.cp.asnumpy(array)

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype)

    def synchronize(self) -> None:
        self.cp.cuda.get_current_stream().synchronize()

    def current_stream(self) -> int:
        """The current CUDA stream (its handle): what the engine keeps recycled buffers apart by. A
        handle is reused only for a stream made after the one it named was destroyed and its work
        done (the driver frees a destroyed stream once its queued work has run), so a new stream that
        finds an old stream's pool cannot overwrite buffers that work still reads."""
        return self.cp.cuda.get_current_stream().ptr

    def record_event(self):
        """A CUDA event recorded on the current stream (the engine's profile times its steps with them)."""
        event = self.cp.cuda.Event()
        event.record()
        return event

    def elapsed_seconds(self, start, end) -> float:
        """Seconds between two recorded events (``end`` complete)."""
        return self.cp.cuda.get_elapsed_time(start, end) / 1000

    def set_num_threads(self, num_threads: int) -> None:
        """Threads are a CPU notion; the GPU path ignores them."""

    # --- kernels --------------------------------------------------------------------------------
    def _launch(self, function, count: int, args, block: int = THREADS):
        if count > 0:
            function((int(-(-count // block)),), (block,), args)

    def bitpack(self, x, scale, shift, out) -> None:
        channels = x.shape[-1]
        pixels = x.size // max(channels, 1)
        words = out.shape[-1]
        has_scale, has_shift = scale.size > 0, shift.size > 0
        vector = _float4(channels, x)  # 8 threads a word, else 32
        self._launch(self._bitpacks[vector], pixels * words * (8 if vector else 32), (
            x, scale if has_scale else self._empty_float, shift if has_shift else self._empty_float,
            np.int32(has_scale), np.int32(has_shift), np.int64(pixels), np.int32(channels), np.int32(words), out))

    def unpack(self, x, channels: int, out) -> None:
        pixels = out.size // max(channels, 1)
        self._launch(self._unpack, pixels * channels,
                     (x, np.int64(pixels), np.int32(channels), np.int32(x.shape[-1]), out))

    def prepare_binary_weights(self, filters: np.ndarray) -> BinaryWeights:
        matrix, popcounts = layout_binary_weights(filters)
        return BinaryWeights(self.upload(matrix), self.upload(popcounts))

    def bconv2d(self, x, weights: BinaryWeights, geometry, multiplier, bias, clamp_min: int, clamp_max: int,
                thresholds, weight_popcounts, out, next_scale=None, next_shift=None, next_bits=None,
                channel_offset: Optional[int] = None, residual=None) -> None:
        """``next_bits`` (float output only): also the bits of the LceQuantize that reads the output,
        ``output * next_scale + next_shift < 0`` (each optional: empty or None). ``channel_offset``
        (not None), ``residual`` (float output only): ``out`` is a channel CONCATENATION whose
        channels ``channel_offset`` on are this output, plus ``residual`` (shaped as ``out``) where
        given."""
        packed = thresholds.size > 0
        has_scale, has_shift = (v is not None and v.size > 0 for v in (next_scale, next_shift))
        if residual is not None and residual.shape != out.shape:
            raise ValueError(f"bconv2d on the GPU: residual {residual.shape} for an output {out.shape}")
        key = (x.shape, out.shape, tuple(geometry), clamp_min, clamp_max, packed, next_bits is not None, has_scale,
               has_shift, channel_offset, residual is not None)
        launch = weights.launches.get(key)
        if launch is None:  # checks, grid and scalars, once per shape and fusion
            cin, cout, fh, fw, sh, sw, dh, dw, pad_top, pad_left, pad_value = (int(v) for v in geometry)
            part = channel_offset is not None
            if packed and (next_bits is not None or part or residual is not None):
                raise ValueError("bconv2d on the GPU: next_bits, channel_offset and residual need a float output")
            if part and not 0 <= channel_offset <= out.shape[-1] - cout:
                raise ValueError(f"bconv2d on the GPU: channels {channel_offset}..{channel_offset + cout} of an "
                                 f"output of {out.shape[-1]}")
            if not part and out.shape[-1] != ((cout + 31) // 32 if packed else cout):
                raise ValueError(f"bconv2d on the GPU: an output of {out.shape[-1]} channels for {cout}")
            batch, height, width, words = x.shape
            if fh * fw > 64:
                raise ValueError(f"bconv2d on the GPU: {fh}x{fw} filters have more than 64 taps")
            out_h, out_w = out.shape[1], out.shape[2]
            pixels, column_blocks = batch * out_h * out_w, int(weights.words.shape[0] // BLOCK_CHANNELS)
            kernel, tile = self._bconv_kernel(int(-(-pixels // BLOCK_ROWS)) * column_blocks)
            grid = (int(-(-pixels // tile)), column_blocks)
            scalars = tuple(np.int32(v) for v in (
                batch, height, width, words, out_h, out_w, cin, cout, fh, fw, sh, sw, dh, dw, pad_top, pad_left,
                pad_value, fh * fw * words, weights.words.shape[1], clamp_min, clamp_max, packed,
                next_bits is not None, has_scale, has_shift, out.shape[-1], channel_offset or 0, residual is not None))
            launch = weights.launches[key] = (grid, scalars, kernel)
        grid, scalars, kernel = launch
        if grid[0] == 0:
            return
        kernel(grid, (THREADS,), (
            x, weights.words, weights.popcounts, weight_popcounts,
            self._empty_float if packed else multiplier, self._empty_float if packed else bias,
            thresholds if packed else self._empty_int, out, self._empty_float if residual is None else residual,
            self._empty_int if next_bits is None else next_bits,
            next_scale if has_scale else self._empty_float, next_shift if has_shift else self._empty_float) + scalars)

    def _bconv_kernel(self, blocks: int) -> Tuple[Callable, int]:
        """The binary convolution's kernel and its rows a block, for a layer whose grid has
        ``blocks`` blocks of 128 rows (``async_copies``, ``tile_rows``)."""
        if self.path != "cuda":
            return self._bconv_async, BLOCK_ROWS
        rows, use_async = bconv_tile(blocks, self.multiprocessors, self.async_copies, self.tile_rows)
        if rows != BLOCK_ROWS:
            return self._bconv_small[rows], rows
        return (self._bconv_async if use_async else self._bconv_registers), BLOCK_ROWS

    def binary_conv2d(self, weights: BinaryWeights, geometry, multiplier, bias, clamp_min: int, clamp_max: int,
                      thresholds, weight_popcounts, next_scale=None, next_shift=None, pack_next: bool = False):
        """The binary convolution with its constants bound, as the C++ modules' ``binary_conv2d``:
        ``geometry`` is ``channels_in, channels_out, filter_h, filter_w, stride_h, stride_w,
        dilation_h, dilation_w, pad_value``, and the result is called as ``conv(x, out, pad_top,
        pad_left, next_bits=None, channel_offset=None, residual=None)`` (``next_bits`` given exactly
        when made with ``pack_next``)."""
        geometry = [int(v) for v in geometry]

        def conv(x, out, pad_top: int, pad_left: int, next_bits=None, channel_offset: Optional[int] = None,
                 residual=None) -> None:
            if pack_next != (next_bits is not None):
                raise ValueError("binary_conv2d: next_bits " + ("missing (made with pack_next)" if pack_next
                                                                 else "given without pack_next"))
            self.bconv2d(x, weights, geometry[:8] + [pad_top, pad_left, geometry[8]], multiplier, bias, clamp_min,
                         clamp_max, thresholds, weight_popcounts, out, next_scale, next_shift, next_bits,
                         channel_offset, residual)

        return conv

    def prepare_float_weights(self, filters: np.ndarray):
        """``[Cout, fh, fw, Cin]`` -> ``[K, Cout]`` on the GPU in im2col's row order, K = fh * fw * Cin
        and, for filters larger than 1x1, rounded up to a multiple of 4 with zero rows (im2col's
        columns there are zero too: every row of its matrix 16-byte aligned for cuBLAS)."""
        cout, fh, fw, _ = filters.shape
        matrix = filters.reshape(cout, -1).T
        if fh * fw > 1:
            matrix = np.pad(matrix, ((0, -matrix.shape[0] % 4), (0, 0)))
        return self.upload(np.ascontiguousarray(matrix))

    def _pack_output(self, out, packed, pack_multiplier, pack_bias) -> None:
        """The CPU kernels' ``packed`` argument of ``conv2d``, ``pool2d`` and ``resize_nearest`` (the
        output's bits for the LceQuantize that reads it): here ``bitpack`` after the op."""
        if packed is not None:
            none = self._empty_float
            self.bitpack(out, none if pack_multiplier is None else pack_multiplier,
                         none if pack_bias is None else pack_bias, packed)

    def conv2d(self, x, weights, bias, geometry, lo: float, hi: float, residual, input_multiplier, input_bias,
               input_lo: float, input_hi: float, out, pool_window=(), packed=None, pack_multiplier=None,
               pack_bias=None) -> None:
        """The CPU kernels' ``conv2d``: im2col (where the filter is larger than 1x1) and cuBLAS's
        product, then one pass (``conv_output_float4``, 4 channels a thread, where the channels and the
        residual's parts allow it, else ``conv_output``) for the bias, the residual (``residual``:
        the arrays whose channel concatenation it is, read where they are), the activation, the max
        pool of ``pool_window`` ``(ph, pw)`` (``out`` is the pooled output) and the bits of
        ``packed``."""
        cp = self.cp
        if len(pool_window) not in (0, 2) or any(int(v) < 1 for v in pool_window):
            raise ValueError(f"conv2d: pool_window needs 2 positive numbers, not {list(pool_window)}")
        ph, pw = (int(v) for v in pool_window) if len(pool_window) else (1, 1)
        has_mul, has_add = input_multiplier.size > 0, input_bias.size > 0
        if has_mul or has_add or input_lo > -np.inf or input_hi < np.inf:
            transformed = cp.empty(x.shape, cp.float32)
            vector = _float4(x.shape[-1], x, transformed)
            self._launch(self._input_transforms[vector], x.size // (4 if vector else 1), (
                x, input_multiplier if has_mul else self._empty_float, input_bias if has_add else self._empty_float,
                np.int64(x.size), np.int32(x.shape[-1]), np.int32(has_mul), np.int32(has_add), np.float32(input_lo),
                np.float32(input_hi), transformed))
            x = transformed
        parts = list(residual)
        if parts and sum(part.shape[-1] for part in parts) != out.shape[-1]:
            raise ValueError(f"conv2d: a residual of {[part.shape[-1] for part in parts]} channels for an output of "
                             f"{out.shape[-1]}")
        fh, fw, sh, sw, dh, dw, pad_top, pad_left = (int(v) for v in geometry)
        batch, height, width, cin = x.shape
        out_h, out_w, cout = out.shape[1], out.shape[2], out.shape[3]
        rows = batch * out_h * ph * out_w * pw  # the product's: the convolution's output pixels
        k, cols_k = fh * fw * cin, weights.shape[0]  # cols_k: K as prepare_float_weights rounded it
        if cols_k != (k + -k % 4 if fh * fw > 1 else k):
            raise ValueError(f"conv2d: weights of {cols_k} rows for a {fh}x{fw} filter over {cin} channels")
        if fh == fw == sh == sw == 1 and pad_top == pad_left == 0:
            cols = x.reshape(rows, cin)
        else:
            cols = cp.empty((rows, cols_k), cp.float32)
            # a block's pixels: 8 steps of as many pixels as its threads take at once (kernels.cu)
            block_pixels = min(IM2COL_PIXELS, 8 * (THREADS // min(fh * fw * -(-cin // 4), THREADS)))
            if rows > 0:
                self._im2col((-(-rows // block_pixels),), (THREADS,), (
                    x, np.int32(batch), np.int32(height), np.int32(width), np.int32(cin), np.int32(out_h * ph),
                    np.int32(out_w * pw), np.int32(fh), np.int32(fw), np.int32(sh), np.int32(sw), np.int32(dh),
                    np.int32(dw), np.int32(pad_top), np.int32(pad_left), np.int32(block_pixels), np.int32(cols_k),
                    cols))
        # the product in `out` itself where nothing is pooled (conv_output then reads and writes each value in place)
        product = out.reshape(rows, cout) if ph * pw == 1 else cp.empty((rows, cout), cp.float32)
        self._matmul(cols, weights, product)
        has_scale, has_shift = (packed is not None and v is not None and v.size > 0
                                for v in (pack_multiplier, pack_bias))
        pixels = batch * out_h * out_w
        if pixels == 0 or cout == 0:
            return
        pack = (np.int32(packed is not None), pack_multiplier if has_scale else self._empty_float,
                pack_bias if has_shift else self._empty_float, np.int32(has_scale), np.int32(has_shift),
                self._empty_int if packed is None else packed)
        if _float4_parts(cout, parts, (product, out, bias)):
            # 4 channels a thread, the residual's parts read where they are (no concatenation)
            ends = np.cumsum([part.shape[-1] for part in parts] + [cout] * 4)[:3]
            quads = 8 * -(-cout // 32) if packed is not None else cout // 4
            pointers = parts + [self._empty_float] * (4 - len(parts))
            self._launch(self._conv_output_float4, pixels * quads, (
                product, bias, *pointers, np.int32(len(parts)), *(np.int32(end) for end in ends), np.float32(lo),
                np.float32(hi), np.int64(pixels), np.int32(out_w), np.int32(cout), np.int32(quads), np.int32(ph),
                np.int32(pw), out) + pack)
            return
        residual = parts[0] if len(parts) == 1 else cp.concatenate(parts, axis=-1) if parts else None
        # a warp an output pixel and 32 channels (a word of the bits)
        self._conv_output((-(-pixels // (THREADS // 32)), -(-cout // 32)), (THREADS,), (
            product, bias, self._empty_float if residual is None else residual, np.int32(residual is not None),
            np.float32(lo), np.float32(hi), np.int64(pixels), np.int32(out_w), np.int32(cout), np.int32(ph),
            np.int32(pw), out) + pack)

    def _matmul(self, a, b, out) -> None:
        """``out = a @ b`` by cuBLAS. CuPy refuses every cuBLAS call while a stream captures a graph:
        during a :class:`CapturedRuns` capture the product is kept out of the graph and run between
        its parts at each replay."""
        capture = getattr(_CAPTURING, "capture", None)
        if capture is None:
            self.cp.matmul(a, b, out=out)
        else:
            capture.call_between(functools.partial(self.cp.matmul, a, b, out=out))

    def binary_elementwise(self, a, b, op: int, lo: float, hi: float, out) -> None:
        self._elementwise(a, b, np.int64(b.size), np.int32(op), np.float32(lo), np.float32(hi), out)

    def pool2d(self, x, geometry, kind: int, lo: float, hi: float, out, packed=None, pack_multiplier=None,
               pack_bias=None) -> None:
        fh, fw, sh, sw, pad_top, pad_left = (int(v) for v in geometry)
        batch, height, width, channels = x.shape
        vector = _float4(channels, x, out)
        self._launch(self._pools[vector], out.size // (4 if vector else 1), (
            x, np.int32(batch), np.int32(height), np.int32(width), np.int32(channels), np.int32(out.shape[1]),
            np.int32(out.shape[2]), np.int32(fh), np.int32(fw), np.int32(sh), np.int32(sw), np.int32(pad_top),
            np.int32(pad_left), np.int32(kind), np.float32(lo), np.float32(hi), out))
        self._pack_output(out, packed, pack_multiplier, pack_bias)

    def concat_channels(self, parts, residual, out) -> None:
        """One launch a part, each writing its channels (plus the residual) once."""
        channels = out.shape[-1]
        pixels = out.size // max(channels, 1)
        has_residual = residual.size > 0
        offset = 0
        for part in parts:
            part_channels = part.shape[-1]
            self._launch(self._concat_part, pixels * part_channels, (
                self.cp.ascontiguousarray(part), np.int32(part_channels), np.int32(offset), np.int32(channels),
                residual if has_residual else self._empty_float, np.int32(has_residual), np.int64(pixels), out))
            offset += part_channels

    def resize_nearest(self, x, rows, cols, residual, lo: float, hi: float, out, packed=None, pack_multiplier=None,
                       pack_bias=None) -> None:
        batch, height, width, channels = x.shape
        has_residual = residual.size > 0
        x = self.cp.ascontiguousarray(x)
        vector = _float4(channels, x, out, *([residual] if has_residual else []))
        self._launch(self._resizes[vector], out.size // (4 if vector else 1), (
            x, rows, cols, np.int32(batch), np.int32(height), np.int32(width),
            np.int32(channels), np.int32(out.shape[1]), np.int32(out.shape[2]),
            residual if has_residual else self._empty_float, np.int32(has_residual), np.float32(lo), np.float32(hi),
            out))
        self._pack_output(out, packed, pack_multiplier, pack_bias)

    # --- the Predictor's crops --------------------------------------------------------------
    def warp_crops(self, image: np.ndarray, params: np.ndarray, size: int):
        """Crops of one ``(H, W, C)`` uint8 image on the GPU: ``(N, size, size, C)`` float32 for the
        ``(N, 8)`` sampling parameters (``datasets.pipeline.sampling_params``), as the pipeline's
        ``warp_image`` cuts them on the CPU. Only the image travels to the GPU."""
        cp = self.cp
        height, width, channels = image.shape
        params = self.upload(np.ascontiguousarray(params, np.float32))
        out = cp.empty((params.shape[0], size, size, channels), cp.float32)
        self._launch(self._warp, params.shape[0] * size * size, (
            self.upload(np.ascontiguousarray(image, np.uint8)), np.int32(height), np.int32(width), np.int32(channels),
            params, np.int32(params.shape[0]), np.int32(size), out))
        return out


def _address(array) -> int:
    """A device array's address: CuPy's ``data.ptr`` (the tests' NumPy stand-ins: ``ctypes.data``)."""
    data = array.data
    return int(data.ptr) if hasattr(data, "ptr") else int(array.ctypes.data)


def _float4(channels: int, *arrays) -> bool:
    """Whether a kernel of 4 channels a thread (``*_float4``) can take arrays of ``channels``
    channels: a multiple of 4, and the ``arrays`` 16-byte aligned (C-contiguous, as all are here)."""
    return channels % 4 == 0 and all(_address(a) % 16 == 0 for a in arrays)


def _float4_parts(channels: int, parts, arrays) -> bool:
    """Whether ``conv_output_float4`` can take a float convolution's output of ``channels`` (its
    ``arrays`` and the residual's ``parts``): as :func:`_float4`, and the parts at most 4, each of a
    multiple of 4 channels and C-contiguous."""
    return (len(parts) <= 4 and all(p.shape[-1] % 4 == 0 and p.flags.c_contiguous for p in parts)
            and _float4(channels, *parts, *arrays))


_CAPTURING = threading.local()  # .capture: the _Capture this thread is recording, if any


class _Capture:
    """A run being captured: its CUDA graphs and, between them, the calls a graph cannot hold (CuPy
    refuses cuBLAS while a stream captures), in the run's order."""

    def __init__(self, stream):
        self.stream = stream
        self.parts: list = []  # what a replay calls, in order: graph launches and the calls between

    def end_graph(self) -> None:
        self.parts.append(functools.partial(self.stream.end_capture().launch, stream=self.stream))

    def call_between(self, call: Callable) -> None:
        """Ends the graph captured so far, keeps ``call`` to run after it at each replay (it is not
        run now: its inputs exist only once the graph runs), and captures the rest as a new graph."""
        self.end_graph()
        self.parts.append(call)
        self.stream.begin_capture()


class CapturedRuns:
    """Whole runs of a model as CUDA graphs, one run per input shape: a run of ~200 steps is then a
    few graph launches from Python instead of ~200 kernel launches (at batch 1 the launches, not
    the kernels, take most of the time). CuPy refuses cuBLAS calls while a stream captures, so a
    run is captured as graphs split at its cuBLAS products (the float convolutions' GEMMs: 5 in
    the default model, 6 graphs), which each replay calls between the graphs.

    A shape's first run is eager (``__call__`` returns None; it compiles the element-wise kernels,
    creates cuBLAS's handle and fills the per-shape caches); its second is captured: ``run`` (a
    device input -> device output function, the engine's steps) on a private stream, every array
    it allocates from a private memory pool that nothing else allocates from, so the addresses the
    graphs and the products hold stay the run's own. Each later call copies the images into the
    captured input, launches the graphs (and the products between them) and copies the output out,
    in that order on the private stream (a lock keeps calls from several threads in one piece). Up
    to ``keep`` shapes stay captured, each holding its activations' memory; the least recently
    used is dropped. ``on_capture(shape)`` is called after a shape is captured (the engine then
    frees the buffers its step-by-step runs of that batch size kept). If a capture fails (a CUDA or
    CuPy version that does not capture some step) the error is warned about once and every run is
    eager from then on.
    """

    def __init__(self, cp, run: Callable, keep: int = 4, on_capture: Optional[Callable] = None):
        self.cp, self.run, self.keep, self.on_capture = cp, run, keep, on_capture
        self.captured: "OrderedDict[tuple, tuple]" = OrderedDict()  # shape -> (parts, input, output, stream, pool)
        self.seen: set = set()
        self.failed: Optional[str] = None
        self.lock = threading.Lock()

    def _capture(self, shape: tuple) -> tuple:
        cp = self.cp
        pool, stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
        with cp.cuda.using_allocator(pool.malloc), stream:
            images = cp.empty(shape, cp.float32)
            stream.synchronize()
            capture = _Capture(stream)
            stream.begin_capture()
            _CAPTURING.capture = capture
            try:
                output = self.run(images)
            except BaseException:
                try:  # leave no stream capturing behind; the run's error is the one to report
                    stream.end_capture()
                except Exception:
                    pass
                raise
            finally:
                _CAPTURING.capture = None
            capture.end_graph()
        return capture.parts, images, output, stream, pool

    def __call__(self, images, on_device: bool):
        """The model's output for ``images`` (float32, C-contiguous; CuPy if ``on_device``, else
        NumPy) from the shape's graph, or None where the caller is to run eagerly."""
        if self.failed is not None:
            return None
        shape = tuple(images.shape)
        with self.lock:
            if shape not in self.captured:
                if shape not in self.seen:
                    self.seen.add(shape)
                    return None
                try:
                    self.captured[shape] = self._capture(shape)
                except Exception as error:
                    self.failed = repr(error)
                    warnings.warn(f"larq_landmarks.runtime: capturing the model as a CUDA graph failed ({error!r}); "
                                  "running it step by step from now on", RuntimeWarning, stacklevel=3)
                    return None
                if self.on_capture is not None:
                    self.on_capture(shape)
                while len(self.captured) > self.keep:
                    _, dropped = self.captured.popitem(last=False)
                    dropped[3].synchronize()  # its graph may still run (a CuPy call returns before it ends)
            self.captured.move_to_end(shape)
            return self._replay(self.captured[shape], images, on_device)

    def _replay(self, entry: tuple, images, on_device: bool):
        """Images in, the graph, the output out, in that order on the graph's stream, after the
        caller's work on its current stream (and, for CuPy, before the caller's next work)."""
        cp = self.cp
        parts, inputs, output, stream, pool = entry
        current = cp.cuda.get_current_stream()
        result = cp.empty(output.shape, output.dtype) if on_device else None  # allocated in the caller's order
        stream.wait_event(current.record())  # after the caller's work on the images (and on result's memory)
        if on_device:
            with stream:
                cp.copyto(inputs, images)
        else:
            inputs.set(images, stream=stream)
        with cp.cuda.using_allocator(pool.malloc), stream:  # cuBLAS products between the graphs
            for part in parts:
                part()
        if on_device:
            with stream:
                cp.copyto(result, output)
            current.wait_event(stream.record())
            return result
        result = output.get(stream=stream)
        stream.synchronize()
        return result


_LOADED: dict = {}


def load(name: str = "cuda", async_copies: Optional[bool] = None, tile_rows: Optional[int] = None,
         stepped_gather: Optional[bool] = None) -> CudaKernels:
    """The GPU kernels of ``name`` (``"cuda"`` or ``"cuda-popcount"``, on CuPy's current device,
    or with a device index: ``"cuda:1"``), compiled once per process, path, device, kind of
    loads and tile (:class:`CudaKernels`)."""
    path, device = parse_kernels(name)
    if device is None:
        device = _cupy().cuda.Device().id
    stepped_gather = STEPPED_GATHER if stepped_gather is None else bool(stepped_gather)
    key = (path, device, async_copies, tile_rows, stepped_gather)
    if key not in _LOADED:
        _LOADED[key] = CudaKernels(path, async_copies, device, tile_rows, stepped_gather)
    return _LOADED[key]


def gpu_name() -> Optional[str]:
    """The current GPU's name, or None without CuPy or a GPU."""
    try:
        cp = _cupy()
    except CudaUnavailableError:
        return None
    properties = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = properties["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


