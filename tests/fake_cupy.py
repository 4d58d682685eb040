"""CuPy on NumPy, so that the GPU kernels' Python side (``runtime/cuda.py``: every launch, its
arguments and grid) runs on a machine without a GPU.

Each ``RawModule`` launch is checked against the kernel's parameter list as ``kernels.cu`` declares
it (the number of arguments; a pointer gets a C-contiguous array of the pointed-to kind and size,
an ``int`` an ``np.int32``, an ``i64`` an ``np.int64``, a ``float`` an ``np.float32``: CuPy passes
a Python int as 64 bits), and its grid against the work the kernel's index covers; then a NumPy
model of the kernel computes its output. The binary convolution's model is
:func:`larq_landmarks.runtime.cuda_tiles.bconv2d_model` (the CUDA kernel's own tile indexing) with
the kernel's epilogue. ``ElementwiseKernel`` s are checked against their parameter strings and run
by name. This checks the glue between Python and CUDA, not the CUDA code itself: that is what the
GPU tests do, on a GPU.
"""
import re
import types

import numpy as np

from larq_landmarks.runtime import cuda, cuda_tiles

from binary_reference import pack_bits

SCALARS = {"int": np.int32, "i64": np.int64, "float": np.float32}


def kernel_signatures(source: str) -> dict:
    """``name -> [(C type, is pointer, parameter name)]`` of every ``extern "C" __global__`` kernel,
    with a parameter-list macro expanded, and the source's numeric ``#define`` s."""
    macros = {m.group(1): m.group(2).replace("\\\n", " ")
              for m in re.finditer(r"^#define (\w+)[ \t]+((?:[^\n]*\\\n)*[^\n]*)", source, flags=re.M)}
    signatures = {}
    for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(([^)]*)\)', source):
        params = m.group(2).strip()
        params = macros.get(params, params)
        parsed = []
        for param in params.split(","):
            words = param.replace("const", " ").replace("*", " * ").split()
            parsed.append((words[0], "*" in words, words[-1]))
        signatures[m.group(1)] = parsed
    numbers = {name: int(value.split()[0]) for name, value in macros.items() if re.match(r"\d+\b", value)}
    return signatures, numbers


def _check(name, params, args):
    assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
    values = {}
    for (ctype, pointer, pname), arg in zip(params, args):
        if pointer:
            assert isinstance(arg, np.ndarray) and arg.flags.c_contiguous, f"{name}: {pname} is not a contiguous array"
            if ctype == "float":
                assert arg.dtype == np.float32, f"{name}: {pname} is float*, got {arg.dtype}"
            elif ctype in ("int", "u32"):
                assert arg.dtype.kind in "iu" and arg.dtype.itemsize == 4, f"{name}: {pname} is {ctype}*, got {arg.dtype}"
        else:
            assert type(arg) is SCALARS[ctype], f"{name}: {pname} is {ctype}, got {type(arg).__name__}"
        values[pname] = arg
    return values


def _covers(name, grid, block, total):
    threads = int(np.prod(grid)) * int(np.prod(block))
    assert threads >= total, f"{name}: {threads} threads for {total} work items"


class _Kernel:
    def __init__(self, name, params, numbers):
        self.name, self.params, self.numbers = name, params, numbers

    def __call__(self, grid, block, args):
        v = _check(self.name, self.params, args)
        getattr(self, "_" + self.name.replace("bconv2d_tensor_cores", "bconv2d").replace("bconv2d_popcount", "bconv2d"))(
            grid, block, v)

    def _bitpack(self, grid, block, v):
        pixels, channels, words = int(v["pixels"]), int(v["channels"]), int(v["words"])
        assert block[0] % 32 == 0, "bitpack: a warp's ballot is one word"
        _covers("bitpack", grid, block, pixels * words * 32)
        x = v["x"].reshape(pixels, channels)
        if v["has_scale"]:
            x = x * v["scale"]
        if v["has_shift"]:
            x = x + v["shift"]
        v["out"].reshape(pixels, words)[...] = pack_bits(x < 0)

    def _unpack(self, grid, block, v):
        pixels, channels, words = int(v["pixels"]), int(v["channels"]), int(v["words"])
        _covers("unpack", grid, block, pixels * channels)
        bits = np.unpackbits(v["x"].reshape(pixels, words).view(np.uint8), axis=-1, bitorder="little")[:, :channels]
        v["out"].reshape(pixels, channels)[...] = np.where(bits, -1.0, 1.0)

    def _im2col(self, grid, block, v):
        b, h, w, c, oh, ow, fh, fw, sh, sw, dh, dw, pt, pl = (int(v[k]) for k in (
            "batch", "height", "width", "channels", "out_h", "out_w", "filter_h", "filter_w", "stride_h", "stride_w",
            "dilation_h", "dilation_w", "pad_top", "pad_left"))
        _covers("im2col", grid, block, b * oh * ow * fh * fw * c)
        x = v["x"].reshape(b, h, w, c)
        cols = v["cols"].reshape(b, oh, ow, fh, fw, c)
        for fy in range(fh):
            for fx in range(fw):
                for oy in range(oh):
                    for ox in range(ow):
                        y, xx = oy * sh - pt + fy * dh, ox * sw - pl + fx * dw
                        inside = 0 <= y < h and 0 <= xx < w
                        cols[:, oy, ox, fy, fx] = x[:, y, xx] if inside else 0.0

    def _pool2d(self, grid, block, v):
        b, h, w, c, oh, ow, fh, fw, sh, sw, pt, pl, kind = (int(v[k]) for k in (
            "batch", "height", "width", "channels", "out_h", "out_w", "filter_h", "filter_w", "stride_h", "stride_w",
            "pad_top", "pad_left", "kind"))
        _covers("pool2d", grid, block, b * oh * ow * c)
        x = v["x"].reshape(b, h, w, c)
        out = v["out"].reshape(b, oh, ow, c)
        for oy in range(oh):
            for ox in range(ow):
                window = x[:, max(oy * sh - pt, 0): oy * sh - pt + fh, max(ox * sw - pl, 0): ox * sw - pl + fw]
                result = window.max((1, 2)) if kind == 0 else window.mean((1, 2), dtype=np.float32)
                out[:, oy, ox] = np.clip(result, v["lo"], v["hi"])

    def _bconv2d(self, grid, block, v):
        g = {k: int(v[k]) for k in ("batch", "height", "width", "words", "out_h", "out_w", "channels_in",
                                    "channels_out", "filter_h", "filter_w", "stride_h", "stride_w", "dilation_h",
                                    "dilation_w", "pad_top", "pad_left", "pad_value", "k_words", "k_stride",
                                    "clamp_min", "clamp_max", "packed_output")}
        rows, cout = g["batch"] * g["out_h"] * g["out_w"], g["channels_out"]
        assert block[0] == self.numbers["THREADS"], f"{self.name}: {block[0]} threads a block"
        assert grid[0] * self.numbers["BM"] >= rows and grid[1] * self.numbers["BN"] >= cout, f"{self.name}: grid {grid}"
        k_words = g["filter_h"] * g["filter_w"] * g["words"]
        assert g["k_words"] == k_words and g["k_stride"] == v["w"].shape[1], f"{self.name}: K words or stride"
        x = v["x"].view(np.int32).reshape(g["batch"], g["height"], g["width"], g["words"])
        filters = np.ascontiguousarray(v["w"][:cout, :k_words]).view(np.int32).reshape(
            cout, g["filter_h"], g["filter_w"], g["words"])
        geometry = [g[k] for k in ("channels_in", "channels_out", "filter_h", "filter_w", "stride_h", "stride_w",
                                   "dilation_h", "dilation_w", "pad_top", "pad_left", "pad_value")]
        acc = cuda_tiles.bconv2d_model(x, filters, geometry, (g["out_h"], g["out_w"]),
                                       tensor_cores=self.name == "bconv2d_tensor_cores").reshape(rows, cout)
        if g["packed_output"]:
            v["out"].view(np.int32).reshape(rows, -1)[...] = pack_bits(acc > v["thresholds"][:cout])
        else:
            scaled = np.clip(2 * acc, g["clamp_min"], g["clamp_max"]).astype(np.float32)
            v["out"].view(np.float32).reshape(rows, cout)[...] = scaled * v["multiplier"][:cout] + v["bias"][:cout]


class RawModule:
    def __init__(self, code: str, options=()):
        self.signatures, self.numbers = kernel_signatures(code)

    def get_function(self, name: str):
        assert name in self.signatures, f"no kernel {name} in kernels.cu"
        return _Kernel(name, self.signatures[name], self.numbers)


ELEMENTWISE = {  # name -> the operation, in NumPy, over the flat index i
    "larq_landmarks_binary_elementwise": lambda a, b, n, op, lo, hi: np.clip(
        a + np.resize(b, a.shape) if op == 0 else a * np.resize(b, a.shape), lo, hi),
    "larq_landmarks_conv_epilogue": lambda y, bias, channels, lo, hi: np.clip(y + np.resize(bias, y.shape), lo, hi),
    "larq_landmarks_conv_residual": lambda y, bias, channels, residual, lo, hi: np.clip(
        (y + np.resize(bias, y.shape)) + residual, lo, hi),
}


class ElementwiseKernel:
    def __init__(self, in_params: str, out_params: str, operation: str, name: str):
        assert name in ELEMENTWISE, f"no NumPy model of {name}"
        self.name = name
        self.params = [p.split() for p in in_params.split(",")]

    def __call__(self, *args):
        inputs, out = args[:-1], args[-1]
        assert len(inputs) == len(self.params), f"{self.name}: {len(inputs)} inputs for {len(self.params)}"
        for words, arg in zip(self.params, inputs):
            dtype = np.dtype(words[-2])
            if isinstance(arg, np.ndarray):
                assert arg.dtype == dtype, f"{self.name}: {words[-1]} is {dtype}, got {arg.dtype}"
            else:
                assert type(arg) is dtype.type, f"{self.name}: {words[-1]} is {dtype}, got {type(arg).__name__}"
        out[...] = ELEMENTWISE[self.name](*inputs)


def module() -> types.SimpleNamespace:
    """What ``runtime/cuda.py`` uses of CuPy, on NumPy."""
    stream = types.SimpleNamespace(synchronize=lambda: None)
    return types.SimpleNamespace(
        RawModule=RawModule, ElementwiseKernel=ElementwiseKernel, asarray=np.asarray,
        ascontiguousarray=np.ascontiguousarray, asnumpy=np.array, empty=np.empty, zeros=np.zeros,
        float32=np.float32, int32=np.int32, clip=np.clip, concatenate=np.concatenate, matmul=np.matmul, add=np.add,
        cuda=types.SimpleNamespace(Device=lambda *_: types.SimpleNamespace(compute_capability="90", id=0),
                                   get_current_stream=lambda: stream))


def install(monkeypatch) -> None:
    """Make ``runtime.cuda`` load this module instead of CuPy, for one test."""
    monkeypatch.setattr(cuda, "_cupy", module)
    monkeypatch.setattr(cuda, "_LOADED", {})
