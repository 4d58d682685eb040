"""A converted ``.tflite`` ready to run, and the checks made before any interpreter reads one.

:class:`TfliteModel` runs a file with this package's bit-packed runtime (CPU or CUDA) or with LCE's
interpreter. Nothing here needs TensorFlow: on a machine without it (a deployment machine, a GPU
server) the runtime engines work, and only LCE's interpreter is missing.
"""
import collections
import os
import threading
import warnings
from typing import Counter, Union

import numpy as np

from larq_landmarks import native_logs


class NotOurModelError(ValueError):
    """A file is not a TFLite flatbuffer (or not one this library wrote)."""


def op_counts(flatbuffer: bytes) -> Counter:
    """How many times each operator occurs in a TFLite flatbuffer (custom ops by name)."""
    import tflite

    from larq_landmarks.runtime.graph import builtin_names

    try:
        model = tflite.Model.GetRootAsModel(flatbuffer, 0)
        names = builtin_names()
        codes = []
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == tflite.BuiltinOperator.CUSTOM:
                codes.append(code.CustomCode().decode())
            else:
                codes.append(names.get(builtin, str(builtin)))
        counts = collections.Counter()
        for s in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(s)
            for o in range(subgraph.OperatorsLength()):
                counts[codes[subgraph.Operators(o).OpcodeIndex()]] += 1
    except Exception as error:
        raise NotOurModelError(f"not a TFLite flatbuffer ({error})") from error
    if not counts:
        raise NotOurModelError("the flatbuffer holds no operators")
    return counts


def verify(flatbuffer: bytes, name: str = "model") -> None:
    """:func:`larq_landmarks.runtime.graph.verify_flatbuffer` as this module's error: every
    interpreter here is given only complete, well-formed files (a truncated one crashes TFLite)."""
    from larq_landmarks.runtime.graph import CorruptModelError, verify_flatbuffer

    try:
        verify_flatbuffer(flatbuffer, name)
    except CorruptModelError as error:
        raise NotOurModelError(str(error)) from error


def load_flatbuffer(path: str) -> bytes:
    """Read a ``.tflite`` file, checking that it is a TFLite flatbuffer."""
    with open(path, "rb") as f:
        data = f.read()
    verify(data, str(path))
    try:
        op_counts(data)
    except NotOurModelError as error:
        raise NotOurModelError(f"{path}: {error}") from error
    return data


def interpreter(flatbuffer: bytes, num_threads: int = 1, use_xnnpack: bool = False,
                use_indirect_bgemm: bool = True):
    """LCE's Python interpreter (runs both LCE and plain TFLite models) for ``flatbuffer``;
    ``use_xnnpack`` delegates the float ops to XNNPACK. ``use_indirect_bgemm`` (default on) picks
    LCE's indirect-BGEMM binary convolution: on x86-64 its default kernel made the binary model
    3x slower than float, this one 1.5x faster (docs/benchmarks.md)."""
    try:
        from larq_compute_engine.tflite.python.interpreter import Interpreter
    except ImportError as error:
        raise ImportError(f"LCE's interpreter is not installed ({error}); install larq-compute-engine~=0.16 "
                          "(with TensorFlow), or run the file with this package's runtime "
                          "(engine='runtime' or 'cuda')") from error

    verify(flatbuffer)
    with native_logs.held_to_log_level():  # its "INFO: Created TensorFlow Lite XNNPACK delegate" line
        return Interpreter(flatbuffer, num_threads=num_threads, use_xnnpack=use_xnnpack,
                           use_indirect_bgemm=use_indirect_bgemm)


ENGINES = ("auto", "runtime", "lce", "cuda")  # and "cuda:N", the GPU engine on device N


def check_engine(engine: str) -> str:
    """``engine`` if it is one of :data:`ENGINES` or ``"cuda:N"`` (N a device index), else a
    ValueError that lists them."""
    path, _, index = engine.partition(":")
    if engine in ENGINES or (path == "cuda" and index.isdigit()):
        return engine
    raise ValueError(f"engine={engine!r}; use one of {ENGINES}, or 'cuda:N' for the GPU with index N")


def runtime_is_portable_only() -> bool:
    """Whether the runtime's best kernels on this CPU are its portable C++ ones (no AVX2: an ARM
    CPU, or an old x86-64 one). There ``engine="auto"`` prefers LCE's interpreter: on x86-64 its
    indirect BGEMM ran the default model 6x faster than the portable kernels (docs/benchmarks.md),
    and on 64-bit ARM it has its optimised kernels."""
    from larq_landmarks.runtime import kernels

    return kernels.available()[0] == "portable"


class TfliteModel:
    """A converted ``.tflite`` ready to run: ``predict(images)`` for any batch size.

    Args:
        flatbuffer: the file's bytes, or its path (read and checked by :func:`load_flatbuffer`).
        engine: ``"runtime"`` (this package's bit-packed kernels, :mod:`larq_landmarks.runtime`),
            ``"lce"`` (LCE's interpreter) or ``"auto"``: the runtime where it has SIMD kernels for
            this CPU (AVX2 or AVX-512), falling back to LCE's interpreter with a warning that names
            the reason when the runtime cannot run the file; on other CPUs (ARM, x86-64 without
            AVX2) LCE's interpreter where it is installed (see :func:`runtime_is_portable_only`),
            else the runtime's portable kernels; ``"cuda"``: the runtime's GPU kernels (CuPy and an
            NVIDIA GPU; no fallback) on CuPy's current device, ``"cuda:N"`` on device N.
        num_threads: threads for the CPU engines.
        name: how errors and warnings refer to the file.
        float_precision: ``"float32"``, or ``"bfloat16"`` / ``"int8"`` for the runtime's bfloat16
            or int8 float convolutions on CPUs with AVX512_BF16 / AVX512_VNNI or on the avx2 kernels
            (:class:`~larq_landmarks.runtime.Engine`; never LCE's interpreter, which runs float32:
            asking for both is an error).

    Attributes:
        engine: the engine that runs it (``"runtime"``, ``"lce"`` or ``"cuda"``); ``kernels``: the runtime's
        kernel path (on a GPU other than device 0 with ``":N"``), or None under LCE;
        ``float_precision`` that of the float convolutions; ``input_shape`` and ``output_shape`` as
        stored.
    """

    def __init__(self, flatbuffer: Union[bytes, str, os.PathLike], engine: str = "auto", num_threads: int = 1,
                 name: str = "model", float_precision: str = "float32"):
        check_engine(engine)
        if float_precision != "float32" and engine == "lce":
            raise ValueError(f"float_precision={float_precision!r} is the runtime's; LCE's interpreter runs float32 "
                             "(use engine='runtime' or 'auto')")
        if isinstance(flatbuffer, (str, os.PathLike)):
            flatbuffer, name = load_flatbuffer(flatbuffer), os.fspath(flatbuffer) if name == "model" else name
        verify(flatbuffer, name)
        self.kernels = None
        if engine == "auto" and runtime_is_portable_only() and float_precision == "float32":
            try:
                lce_interpreter = interpreter(flatbuffer, num_threads)
            except ImportError:
                lce_interpreter = None  # no LCE here: the runtime's portable kernels, below
            if lce_interpreter is not None:
                self._run_with_lce(lce_interpreter)
                return
        fallback_reason = None  # why the runtime cannot run the file, under "auto"
        if engine != "lce":
            from larq_landmarks.runtime import Engine, UnsupportedModelError

            try:
                on_gpu = engine.startswith("cuda")
                runtime = Engine(flatbuffer, num_threads=num_threads, kernels=engine if on_gpu else "auto", name=name,
                                 float_precision=float_precision)
            except UnsupportedModelError as error:
                if engine != "auto" or float_precision != "float32":  # LCE runs float32 only
                    raise
                fallback_reason = error
            else:
                self.engine = "cuda" if on_gpu else "runtime"
                self.kernels, self.float_precision = runtime.kernels, runtime.float_precision
                self.input_shape, self.output_shape = runtime.input_shape, runtime.output_shape
                self._predict = runtime.predict
                return
        try:
            lce_interpreter = interpreter(flatbuffer, num_threads)
        except ImportError as error:
            if fallback_reason is None:
                raise
            raise UnsupportedModelError(f"{fallback_reason}; LCE's interpreter, the fallback, is not "
                                        "installed") from error
        if fallback_reason is not None:
            warnings.warn(f"{fallback_reason}; running {name} with LCE's interpreter instead", stacklevel=2)
        self._run_with_lce(lce_interpreter)

    def _run_with_lce(self, lce_interpreter) -> None:
        self.engine, self.float_precision = "lce", "float32"
        self.input_shape, self.output_shape = tuple(lce_interpreter.input_shapes[0]), tuple(lce_interpreter.output_shapes[0])
        fixed_batch = self.input_shape[0]
        one_at_a_time = threading.Lock()  # the interpreter's tensors are shared: no two runs at once

        def predict(images):
            with one_at_a_time:
                if fixed_batch == 1 and len(images) != 1:
                    return np.concatenate([lce_interpreter.predict(images[i : i + 1]) for i in range(len(images))])
                return lce_interpreter.predict(images)

        self._predict = predict

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Heatmaps (or logits) for ``(B, S, S, 3)`` float32 images; several threads may call it
        at once. On the ``"cuda"`` engine a CuPy array in gives a CuPy array out."""
        if self.engine == "cuda" and hasattr(images, "__cuda_array_interface__"):
            return self._predict(images)
        return self._predict(np.asarray(images, np.float32))
