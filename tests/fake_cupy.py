"""CuPy on NumPy, so that the GPU kernels (``runtime/cuda.py`` and ``runtime/csrc/kernels.cu``) run on
a machine without a GPU.

Each ``RawModule`` launch is checked against the kernel's parameter list as ``kernels.cu`` declares
it (the number of arguments; a pointer gets a C-contiguous array of the pointed-to kind, an ``int``
an ``np.int32``, an ``i64`` an ``np.int64``, a ``float`` an ``np.float32``: CuPy passes a Python int
as 64 bits), and its grid against the work the kernel's index covers; then the kernel itself, the
CUDA source as written, runs on the CPU (``cuda_on_cpu.py``: g++, CUDA's threads, barriers, warp
operations and 1-bit MMA emulated, reads past an array's end caught). ``ElementwiseKernel`` s are
checked against their parameter strings and their operations compiled and run the same way.
``empty`` fills its arrays with NaN (floats) or a marker (integers), so an output a kernel does not
write shows. A machine may have several GPUs (``Device.count``): each array belongs to the device
current when it was made, and a launch that gets an array of another device, or runs on another
device's stream, is an error (on a GPU it faults or CuPy refuses). What this cannot check is the GPU
itself: timing, and hardware that differs from the PTX ISA's description; the GPU tests do that, on
a GPU.
"""
import sys
import threading
import time
import types

import numpy as np
import pytest

from larq_landmarks.runtime import cuda

import cuda_on_cpu

SCALARS = {"int": np.int32, "i64": np.int64, "float": np.float32}


class Device:
    """``cupy.cuda.Device``: one of ``Device.count`` GPUs; ``with Device(i):`` makes it current
    (a stack per thread, as CuPy keeps); ``Device()`` is the current one."""

    count = 1
    multiprocessors = 132  # an H200's SMs (getDeviceProperties' multiProcessorCount)
    _local = threading.local()

    def __init__(self, device=None):
        self.id = current_device() if device is None else int(device)
        self.compute_capability = "90"

    def __enter__(self):
        assert 0 <= self.id < Device.count, f"no GPU {self.id}: CUDA error (invalid device ordinal)"
        Device._local.__dict__.setdefault("stack", []).append(self.id)
        return self

    def __exit__(self, *exc):
        Device._local.stack.pop()
        return False


def current_device() -> int:
    stack = Device._local.__dict__.get("stack")
    return stack[-1] if stack else 0


def _on_current_device(name: str, values) -> None:
    """Every device array in ``values`` (nested lists, tuples, dicts) is on the current device."""
    if isinstance(values, dict):
        values = list(values.values())
    for value in values if isinstance(values, (list, tuple)) else [values]:
        if isinstance(value, (list, tuple, dict)):
            _on_current_device(name, value)
        elif isinstance(value, DeviceArray):
            assert value.device_id == current_device(), \
                f"{name}: an array on GPU {value.device_id} used while GPU {current_device()} is current"
    stream = get_current_stream()
    assert stream.null or stream.device_id == current_device(), \
        f"{name}: a launch on a stream of GPU {stream.device_id} while GPU {current_device()} is current"


def _check(name, params, args):
    assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
    values = {}
    for (ctype, pointer, pname, _), arg in zip(params, args):
        if pointer:
            assert isinstance(arg, np.ndarray) and arg.flags.c_contiguous, f"{name}: {pname} is not a contiguous array"
            if ctype == "float":
                assert arg.dtype == np.float32, f"{name}: {pname} is float*, got {arg.dtype}"
            elif ctype in ("int", "u32"):
                assert arg.dtype.kind in "iu" and arg.dtype.itemsize == 4, f"{name}: {pname} is {ctype}*, got {arg.dtype}"
            elif ctype == "u8":
                assert arg.dtype == np.uint8, f"{name}: {pname} is u8*, got {arg.dtype}"
        else:
            assert type(arg) is SCALARS[ctype], f"{name}: {pname} is {ctype}, got {type(arg).__name__}"
        values[pname] = arg
    return values


def _check_grid(name, grid, block, v, numbers):
    """The launch's grid covers the work the kernel's index runs over."""
    count = {"bitpack": lambda: int(v["pixels"]) * int(v["words"]) * 32,
             "unpack": lambda: int(v["pixels"]) * int(v["channels"]),
             "pool2d": lambda: int(np.prod([int(v[k]) for k in ("batch", "out_h", "out_w", "channels")])),
             "resize_nearest": lambda: int(np.prod([int(v[k]) for k in ("batch", "out_h", "out_w", "channels")])),
             "concat_part": lambda: int(v["pixels"]) * int(v["part_channels"]),
             "warp_crops": lambda: int(v["crops"]) * int(v["size"]) ** 2,
             "input_transform": lambda: int(v["count"]),
             # 4 channels a thread (the channels a multiple of 4); bitpack's: 8 threads a word
             "bitpack_float4": lambda: int(v["pixels"]) * int(v["words"]) * 8,
             "pool2d_float4": lambda: int(np.prod([int(v[k]) for k in ("batch", "out_h", "out_w", "channels")])) // 4,
             "resize_nearest_float4": lambda: int(np.prod([int(v[k]) for k in ("batch", "out_h", "out_w", "channels")]))
             // 4, "input_transform_float4": lambda: int(v["count"]) // 4,
             # a pixel's `quads` threads: 4 channels each (with pack, 8 a word of its bits)
             "conv_output_float4": lambda: int(v["pixels"]) * int(v["quads"])}
    if name.endswith("_float4"):
        assert int(v["channels"]) % 4 == 0, f"{name}: {v['channels']} channels"
    if name == "conv_output_float4":
        quads = -(-int(v["channels"]) // 32) * 8 if int(v["pack"]) else int(v["channels"]) // 4
        assert int(v["quads"]) == quads, f"{name}: {v['quads']} threads a pixel"
    if name == "im2col":  # a block `block_pixels` output pixels (at most IM2COL_PIXELS), no block past the end
        pixels, per_block = int(v["batch"]) * int(v["out_h"]) * int(v["out_w"]), int(v["block_pixels"])
        assert block[0] == numbers["THREADS"] and 1 <= per_block <= numbers["IM2COL_PIXELS"], f"{name}: {per_block}"
        assert grid[0] == -(-pixels // per_block), f"{name}: grid {grid} for {pixels} pixels"
        k = int(v["filter_h"]) * int(v["filter_w"]) * int(v["channels"])
        assert int(v["cols_k"]) in (k, k + -k % 4) and v["cols"].size == pixels * int(v["cols_k"]), f"{name}: cols"
        return
    if name == "conv_output":  # a warp an output pixel (blocks along x), 32 channels (a word of bits, along y)
        assert block[0] == numbers["THREADS"] and grid[0] * block[0] // 32 >= int(v["pixels"]), f"{name}: grid {grid}"
        assert grid[1] * 32 >= int(v["channels"]) > (grid[1] - 1) * 32, f"{name}: grid {grid}"
        return
    if name in count:
        assert not name.startswith("bitpack") or block[0] % 32 == 0, "bitpack: a warp makes whole words"
        threads = int(np.prod(grid)) * int(np.prod(block))
        assert threads >= count[name](), f"{name}: {threads} threads for {count[name]()} work items"
        return
    if not name.startswith("bconv2d"):  # a kernel a script adds to kernels.cu (profile_gpu's mma_rate): any grid
        return
    rows = int(v["batch"]) * int(v["out_h"]) * int(v["out_w"])
    assert block[0] == numbers["THREADS"], f"{name}: {block[0]} threads a block"
    tile = int(name.rsplit("_rows", 1)[1]) if "_rows" in name else numbers["BM"]  # bconv2d_tensor_cores_rows32: 32
    # the grid covers the layer, with no block past its end
    assert -(-rows // tile) == grid[0] and grid[1] * numbers["BN"] >= int(v["channels_out"]), f"{name}: grid {grid}"
    k_words = int(v["filter_h"]) * int(v["filter_w"]) * int(v["words"])
    assert int(v["k_words"]) == k_words and int(v["k_stride"]) == v["w"].shape[1], f"{name}: K words or stride"


class _Kernel:
    def __init__(self, name, kernels):
        self.name, self.kernels = name, kernels

    def __call__(self, grid, block, args):
        v = _check(self.name, self.kernels.signatures[self.name], args)
        _on_current_device(self.name, args)
        _check_grid(self.name, grid, block, v, self.kernels.numbers)
        _profiled(self.name)
        _run_or_record(lambda: self.kernels.launch(self.name, grid, block, args))


class RawModule:
    def __init__(self, code: str, options=()):
        # NVRTC's --define-macro=NAME=VALUE options, as the source's first lines (g++ builds it as C++17);
        # an option not understood here is an error, not a silently different build
        flag = "--define-macro="
        unknown = [o for o in options if not o.startswith(flag) and o not in ("-std=c++17", "--std=c++17")]
        assert not unknown, f"fake_cupy.RawModule: options {unknown} are not emulated"
        defines = "".join(f"#define {o[len(flag):].replace('=', ' ', 1)}\n" for o in options if o.startswith(flag))
        self.kernels = cuda_on_cpu.kernels(defines + code)

    def get_function(self, name: str):
        assert name in self.kernels.signatures, f"no kernel {name} in kernels.cu"
        return _Kernel(name, self.kernels)


class ElementwiseKernel:
    def __init__(self, in_params: str, out_params: str, operation: str, name: str):
        self.name = name
        self.params = [p.split() for p in in_params.split(",")]
        self.kernel = cuda_on_cpu.ElementwiseKernelOnCpu(in_params, out_params, operation, name)

    def __call__(self, *args):
        inputs = args[:-1]
        assert len(inputs) == len(self.params), f"{self.name}: {len(inputs)} inputs for {len(self.params)}"
        _on_current_device(self.name, args)
        for words, arg in zip(self.params, inputs):
            dtype = np.dtype(words[-2])
            if isinstance(arg, np.ndarray):
                assert arg.dtype == dtype, f"{self.name}: {words[-1]} is {dtype}, got {arg.dtype}"
            else:
                assert type(arg) is dtype.type, f"{self.name}: {words[-1]} is {dtype}, got {type(arg).__name__}"
        _run_or_record(lambda: self.kernel(*args))


class DeviceArray(np.ndarray):
    """A NumPy array standing for GPU memory: ``set`` and ``get`` copy from and to the host, as
    CuPy's ``ndarray``; neither may run while a stream captures (CUDA refuses the synchronous
    transfer, and a graph would not repeat it). NumPy functions, ufuncs, ``copy``, ``astype``,
    ``fill``, a copying ``reshape``, a gather and an assignment on it stand for the CuPy kernels
    they dispatch to: while a stream captures they are recorded (run again at each replay, into the
    same result), and one whose result is a host value (a scalar read back) is an error. It belongs
    to the device current when it was made (a view to its base's)."""

    def __array_finalize__(self, obj):
        self.device_id = getattr(obj, "device_id", None)
        if self.device_id is None:
            self.device_id = current_device()

    @property
    def device(self):
        return Device(self.device_id)

    def __array_function__(self, func, types, args, kwargs):
        return _device_call(func, args, kwargs)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _device_call(getattr(ufunc, method), inputs, kwargs)

    def copy(self, order="C"):
        return _device_call(np.copy, (self,), {"order": order})

    def astype(self, dtype, *args, **kwargs):
        if kwargs.get("copy", True) is False and np.dtype(dtype) == self.dtype:
            return self
        return _device_call(np.ndarray.astype, (self, dtype) + args, kwargs)

    def _view_or_copy(self, method, *args, **kwargs):
        """``method`` (an ndarray method) on this array: where its result shares this array's
        memory, a view (no kernel, on the array's device); else the copy, made by a kernel."""
        plain = self.view(np.ndarray)
        result = method(plain, *args, **kwargs)
        if isinstance(result, np.ndarray) and np.may_share_memory(result, plain):
            view = result.view(DeviceArray)
            view.device_id = self.device_id
            return view
        return _device_call(method, (self,) + args, kwargs)

    def __getitem__(self, key):  # a view, or a gather
        return self._view_or_copy(np.ndarray.__getitem__, key)

    def __setitem__(self, key, value):
        _device_call(np.ndarray.__setitem__, (self, key, value), {}, writes=self)

    def fill(self, value):  # CuPy's fill is a kernel (a memset for zero) on the current stream
        _device_call(np.ndarray.fill, (self, value), {}, writes=self)

    def reshape(self, *shape, **kwargs):  # a view, or a copy (a kernel)
        return self._view_or_copy(np.ndarray.reshape, *shape, **kwargs)

    def set(self, array, stream=None):
        _no_capture("a host-to-device copy")
        assert isinstance(array, np.ndarray) and array.shape == self.shape and array.dtype == self.dtype
        self[...] = array

    def get(self, stream=None):
        _no_capture("a device-to-host copy")
        return np.array(self).view(np.ndarray)

    @property
    def __cuda_array_interface__(self):  # what the engine asks to tell a CuPy array from a NumPy one
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ctypes.data, False), "version": 3}


def _plain(value):
    """``value`` with each DeviceArray in it as a plain NumPy view (so NumPy does the work)."""
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _device_call(function, args, kwargs, writes=None):
    """``function`` on device arrays as a CuPy kernel: run now, and while a stream captures, also
    recorded to run again at each replay, writing into the same result (``out``, ``writes``, or
    the new array it returns, which must then come from a private pool)."""
    _on_current_device(getattr(function, "__name__", repr(function)), [args, kwargs])
    args, kwargs = _plain(args), _plain(kwargs)
    result = function(*args, **kwargs)
    if Stream.capturing is not None:
        assert get_current_stream() is Stream.capturing, "a kernel on another stream while one captures"
        if writes is None and "out" not in kwargs:
            assert isinstance(result, np.ndarray), f"{function.__name__}: a host value computed while capturing"
            assert MemoryPool.current is not None, "an allocation from CuPy's default pool while capturing a graph"
            target = result
            Stream.capturing.recorded.append(lambda: np.copyto(target, function(*args, **kwargs)))
        else:
            Stream.capturing.recorded.append(lambda: function(*args, **kwargs))
    return result.view(DeviceArray) if isinstance(result, np.ndarray) else result


def _no_capture(what: str) -> None:
    assert Stream.capturing is None, f"{what} while a stream captures"


def empty(shape, dtype):
    """Uninitialised memory made visible: NaN floats, 0x7fadbeef integers. While a stream captures
    it must come from a private pool (``using_allocator``), as the engine's graphs keep their
    temporaries' addresses."""
    assert Stream.capturing is None or MemoryPool.current is not None, \
        "an allocation from CuPy's default pool while capturing a graph"
    dtype = np.dtype(dtype)
    return np.full(shape, np.nan if dtype.kind == "f" else 0x7FADBEEF, dtype).view(DeviceArray)


def asarray(array):
    """An upload (not allowed while capturing) unless ``array`` is on the device already."""
    if isinstance(array, DeviceArray):
        return array
    _no_capture("an upload")
    return np.asarray(array).view(DeviceArray)


def asnumpy(array, stream=None):
    _no_capture("a download")
    return np.array(array).view(np.ndarray)


def copyto(target, source):
    """A device-to-device copy: a kernel on the current stream."""
    assert isinstance(source, DeviceArray) and source.shape == target.shape, "copyto: device arrays of one shape"
    _device_call(np.copyto, (target, source), {}, writes=target)


def ascontiguousarray(array):
    """The array itself where it is C-contiguous, else a copy made by a kernel."""
    array = asarray(array)
    return array if array.flags.c_contiguous else _device_call(np.ascontiguousarray, (array,), {})


def concatenate(arrays, axis=0):
    return _device_call(np.concatenate, ([asarray(a) for a in arrays],), {"axis": axis})


def matmul(a, b, out):
    """cuBLAS's product into ``out``. Refused while a stream captures, as CuPy refuses every cuBLAS
    call then (its binding's ``setStream`` raises this error, CuPy 13 to 15)."""
    if Stream.capturing is not None:
        raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
    return _device_call(np.matmul, (a, b), {"out": out})


class MemoryPool:
    """A CuPy memory pool: ``using_allocator(pool.malloc)`` makes it the one ``empty`` draws from."""

    current = None  # the pool in use, None for the default one

    def malloc(self, size):  # only its identity matters here
        raise AssertionError("the fake pool's malloc is not called")


class using_allocator:
    def __init__(self, malloc):
        self.pool = malloc.__self__

    def __enter__(self):
        self.previous, MemoryPool.current = MemoryPool.current, self.pool

    def __exit__(self, *exc):
        MemoryPool.current = self.previous
        return False


class Event:
    """A CUDA event as the wall clock."""

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


class Stream:
    """A CUDA stream: work runs at once, except between ``begin_capture`` and ``end_capture``, where
    kernel launches are recorded into a :class:`Graph` instead (CUDA stream capture), and where the
    stream may not be synchronized. ``with stream:`` makes it the current stream; while one
    captures, a launch on another stream is an error (it would run at once, outside the graph)."""

    capturing = None  # the stream capturing now, if any
    current: list = []  # the streams made current by ``with``, innermost last

    def __init__(self, non_blocking: bool = False, null: bool = False):
        self.recorded, self.null, self.device_id = None, null, current_device()
        self.ptr = 0 if null else id(self)  # the cudaStream_t handle; 0 is the legacy default stream

    def __enter__(self):
        Stream.current.append(self)
        return self

    def __exit__(self, *exc):
        Stream.current.pop()
        return False

    def synchronize(self):
        assert self.recorded is None, "a capturing stream cannot be synchronized"

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        assert isinstance(event, Event)

    def is_capturing(self) -> bool:
        return self.recorded is not None

    def begin_capture(self, mode=None):
        assert not self.null, "cannot capture on the default (legacy) stream"
        assert Stream.capturing is None, "already capturing"
        self.recorded, Stream.capturing = [], self

    def end_capture(self):
        assert Stream.capturing is self, "this stream is not capturing"
        graph, self.recorded, Stream.capturing = Graph(self.recorded), None, None
        return graph


NULL_STREAM = Stream(null=True)


def get_current_stream():
    return Stream.current[-1] if Stream.current else NULL_STREAM


class Graph:
    """Captured launches, run again on each ``launch``."""

    def __init__(self, launches):
        self.launches = launches

    def launch(self, stream=None):
        _no_capture("a graph launch")
        for launch in self.launches:
            launch()


def _run_or_record(launch) -> None:
    if Stream.capturing is not None:
        assert get_current_stream() is Stream.capturing, "a launch on another stream while one captures"
        Stream.capturing.recorded.append(launch)
    else:
        launch()


PROFILER: list = []  # cudaProfilerStart / Stop calls ("start", "stop"), and the kernels launched between them


def _profiled(name: str) -> None:
    if PROFILER and PROFILER[-1] != "stop":
        PROFILER.append(name)


def module() -> types.SimpleNamespace:
    """What ``runtime/cuda.py`` and ``scripts/benchmark_gpu.py`` use of CuPy, on NumPy."""
    return types.SimpleNamespace(
        RawModule=RawModule, ElementwiseKernel=ElementwiseKernel, asarray=asarray, ascontiguousarray=ascontiguousarray,
        asnumpy=asnumpy, empty=empty, zeros=lambda *a, **k: np.zeros(*a, **k).view(DeviceArray), copyto=copyto,
        ndarray=DeviceArray, float32=np.float32, int32=np.int32, concatenate=concatenate, matmul=matmul, clip=np.clip, where=np.where,
        sign=np.sign, stack=np.stack, take_along_axis=np.take_along_axis,
        cuda=types.SimpleNamespace(Device=Device, get_current_stream=get_current_stream, Event=Event, Stream=Stream,
                                   MemoryPool=MemoryPool, using_allocator=using_allocator,
                                   runtime=types.SimpleNamespace(getDeviceProperties=lambda _: {
                                                                     "name": b"CPU build",
                                                                     "multiProcessorCount": Device.multiprocessors},
                                                                 getDeviceCount=lambda: Device.count,
                                                                 profilerStart=lambda: PROFILER.append("start"),
                                                                 profilerStop=lambda: PROFILER.append("stop")),
                                   get_elapsed_time=lambda start, end: 1000 * (end.time - start.time)))


def install(monkeypatch) -> None:
    """Make ``runtime.cuda`` load this module instead of CuPy, for one test (skipped where there is
    no g++ to build the kernels for the CPU)."""
    if not cuda_on_cpu.available():
        pytest.skip("no g++ to build kernels.cu for the CPU")
    monkeypatch.setattr(sys.modules[__name__], "PROFILER", [])
    monkeypatch.setattr(Stream, "capturing", None)
    monkeypatch.setattr(Stream, "current", [])
    monkeypatch.setattr(MemoryPool, "current", None)
    monkeypatch.setattr(Device, "count", 1)
    monkeypatch.setattr(Device, "_local", threading.local())
    monkeypatch.setattr(cuda, "_cupy", module)
    monkeypatch.setattr(cuda, "_LOADED", {})
