"""The compiled kernels, one build per instruction set, chosen at run time from the CPU's features.

``load("auto")`` gives the best path this CPU runs: ``"avx512"`` (AVX-512 with VPOPCNTDQ),
``"avx512bw"`` (AVX-512 F/BW/VL/DQ without VPOPCNTDQ, as Skylake-SP and Cascade Lake Xeons have:
popcounts by table look-up), ``"avx2"`` (AVX2, FMA, POPCNT) or ``"portable"`` (plain C++); asking
for a path the CPU lacks is an error that says which paths it has.
"""
import importlib
from types import ModuleType
from typing import List

PATHS = ("avx512", "avx512bw", "avx2", "portable")


def _module(path: str) -> ModuleType:
    try:
        return importlib.import_module(f"larq_landmarks.runtime._kernels_{path}")
    except ImportError as error:
        raise ImportError(
            f"the runtime's {path} kernels are not built ({error}); reinstall with `pip install -e .`"
        ) from error


def available() -> List[str]:
    """The kernel paths this CPU can run and this build has, best first."""
    portable = _module("portable")
    paths = []
    for path in PATHS:
        if not portable.cpu_supports(path):
            continue
        try:
            _module(path)
        except ImportError:
            continue
        paths.append(path)
    return paths


def precision_feature(module: ModuleType, precision: str) -> str:
    """The CPU feature (``cpu_supports``' name) that a kernel module's ``precision`` float
    convolutions need: AVX512_BF16 for bfloat16; for int8 the module's own ``int8_feature``
    (AVX512_VNNI on the AVX-512 paths, AVX-VNNI on avx2), "" where it has none."""
    return "avx512bf16" if precision == "bfloat16" else getattr(module, "int8_feature", "")


def reduced_precisions(module: ModuleType) -> List[str]:
    """The reduced float precisions (``Engine``'s ``float_precision`` besides float32) that a kernel
    module runs on this CPU: those it was built with whose instructions the CPU has."""
    built = {"bfloat16": "conv2d_bf16", "int8": "conv2d_int8"}
    return [p for p, function in built.items()
            if hasattr(module, function) and module.cpu_supports(precision_feature(module, p))]


def load(kernels: str = "auto") -> ModuleType:
    """The kernel module for ``kernels`` (``"auto"`` or one of ``PATHS``; the GPU's
    ``"cuda"`` paths are :func:`larq_landmarks.runtime.cuda.load`)."""
    if kernels != "auto" and kernels not in PATHS:
        raise ValueError(f"kernels={kernels!r}; use 'auto', one of {PATHS}, or 'cuda' / 'cuda-popcount' on a GPU")
    paths = available()
    if kernels == "auto":
        return _module(paths[0])
    if kernels not in paths:
        raise ValueError(f"kernels={kernels!r} cannot run here: this CPU and build have {paths}")
    return _module(kernels)
