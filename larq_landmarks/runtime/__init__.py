"""The bit-packed runtime: runs the ``.tflite`` that :func:`larq_landmarks.export.convert` writes
with this package's own C++ kernels (AVX-512 VPOPCNTDQ, AVX2 or portable, chosen at run time),
without TensorFlow or LCE, or on an NVIDIA GPU with CUDA kernels through CuPy
(``kernels="cuda"``, :mod:`larq_landmarks.runtime.cuda`). One function per operator in
:mod:`larq_landmarks.runtime.ops`; the C++ and CUDA sources are in ``runtime/csrc/``.
"""
from larq_landmarks.runtime.cuda import CudaUnavailableError
from larq_landmarks.runtime.engine import Engine
from larq_landmarks.runtime.graph import CorruptModelError, UnsupportedModelError
from larq_landmarks.runtime.kernels import available as available_kernels

__all__ = ["CorruptModelError", "CudaUnavailableError", "Engine", "UnsupportedModelError", "available_kernels"]
