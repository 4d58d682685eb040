"""The compiled kernels, one build per instruction set, chosen at run time from the CPU's features.

``load("auto")`` gives the best path this CPU runs: ``"avx512"`` (AVX-512 with VPOPCNTDQ),
``"avx512bw"`` (AVX-512 F/BW/VL/DQ without VPOPCNTDQ, as Skylake-SP and Cascade Lake Xeons have:
popcounts by table look-up), ``"avx2"`` (AVX2, FMA, POPCNT) or ``"portable"`` (plain C++); asking
for a path the CPU lacks is an error that says which paths it has.
"""
import importlib
import os
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


def reduced_precisions(module: ModuleType) -> List[str]:
    """The reduced float precisions (``Engine``'s ``float_precision`` besides float32) that a kernel
    module runs on this CPU: bfloat16 where it was built with it and the CPU has AVX512_BF16; int8
    where it was built with it and the CPU has its ``int8_feature`` (AVX512_VNNI for the avx512 and
    avx512bw kernels), or on any CPU for the avx2 kernels (their pairs form: :func:`int8_vnni`)."""
    precisions = []
    if hasattr(module, "conv2d_bf16") and module.cpu_supports("avx512bf16"):
        precisions.append("bfloat16")
    if hasattr(module, "conv2d_int8") and (getattr(module, "int8_pairs", False) or _has_vnni(module)):
        precisions.append("int8")
    return precisions


NO_VNNI = "LARQ_LANDMARKS_NO_VNNI"


def _has_vnni(module: ModuleType) -> bool:
    feature = getattr(module, "int8_feature", "")
    return bool(feature) and bool(module.cpu_supports(feature))


def int8_vnni(module: ModuleType) -> bool:
    """Whether a kernel module's int8 convolutions take VNNI's form here: VPDPBUSD, four int8
    products a lane, at four times the FMA's rate. The avx512 and avx512bw kernels have only that
    form (on CPUs with AVX512_VNNI). The avx2 kernels take it where the CPU has AVX-VNNI (Intel Alder
    Lake and newer, AMD Zen 5) and the environment variable ``LARQ_LANDMARKS_NO_VNNI`` is not ``1``;
    otherwise their pairs form: VPMADDWD, two products of the same values in 16 bits, which every
    AVX2 CPU has (about 1.4x the FMA's rate). Both forms give the same integer sums, so the same
    outputs bit for bit; ``LARQ_LANDMARKS_NO_VNNI=1`` runs a CPU with AVX-VNNI as one without (for
    comparisons)."""
    if not getattr(module, "int8_pairs", False):
        return True
    return _has_vnni(module) and os.environ.get(NO_VNNI, "") != "1"


NO_AMX = "LARQ_LANDMARKS_NO_AMX"


def amx(module: ModuleType, precision: str) -> bool:
    """Whether a kernel module's ``precision`` ("int8" or "bfloat16") float convolutions take AMX's
    tiles here (TDPBUSD, TDPBF16PS: Intel Xeons from Sapphire Rapids on, on Linux; the avx512
    kernels only): in int8 the convolutions whose filter rows are whole 64-byte runs (a 1x1
    convolution's input channels a multiple of 64), VNNI's kernels the others, with the same integer
    sums, so the same outputs bit for bit; in bfloat16 every convolution (the others' rows gathered
    first), the same products summed in another order. The environment variable
    ``LARQ_LANDMARKS_NO_AMX=1`` runs such a CPU as one without (read at each convolution)."""
    return bool(getattr(module, "amx", None) and module.amx(precision))


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
