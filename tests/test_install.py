"""How this package installs: the README's editable install (the environment the suite runs in:
CI makes it with the README's two commands, ``pip install -e .`` then ``pip install -e ".[test]"``
over it, in a fresh venv) and a wheel built and installed into a new venv with the pip and
setuptools that ``python3 -m venv`` gives. Every subpackage imports from outside the checkout each
time and the named configurations are found.

The wheel's venv does not download the heavy dependencies (TensorFlow, Larq, ...) again: a ``.pth``
file makes the test environment's site-packages visible at the end of its path, so pip finds them
installed. The wheel keeps the kernel modules CI's editable install compiled
(``LARQ_LANDMARKS_KEEP_KERNELS=1``); the ARM cross-compile and the AVX-512 build without bfloat16
compile here."""
import glob
import importlib.util
import json
import shutil
import os
import platform
import re
import subprocess
import sys
import sysconfig
import types
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the kernel builds setup.py makes here (each imported only where this CPU runs it)
KERNEL_PATHS = ("portable", "avx2", "avx512", "avx512bw") if platform.machine().lower() in ("x86_64", "amd64") \
    else ("portable",)

IMPORT_ALL = """
import importlib, json, os, pkgutil, sys
import larq_landmarks
names = sorted(m.name for m in pkgutil.walk_packages(larq_landmarks.__path__, "larq_landmarks."))
names.append("larq_landmarks.named_models")
from larq_landmarks.runtime import available_kernels
runnable = {"larq_landmarks.runtime._kernels_" + path for path in available_kernels()}
for name in names:
    if name.startswith("larq_landmarks.runtime._kernels_") and name not in runnable:
        continue  # built for instructions this CPU lacks (AVX-512 on an AVX2 CPU): SIGILL on import
    importlib.import_module(name)
from larq_landmarks.models import named_configurations
print(json.dumps({"modules": names, "configs": sorted(named_configurations()),
                  "named_models": os.path.dirname(sys.modules["larq_landmarks.named_models"].__file__)}))
"""


def _run(command, cwd, env=None):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _expected_configs():
    return sorted(os.path.basename(p)[: -len(".json")] for p in glob.glob(os.path.join(ROOT, "models", "*.json")))


def _imports_everything(python, work):
    """IMPORT_ALL's report from ``python`` run in folder ``work``, checked: every subpackage, each
    kernel build, the named configurations."""
    found = json.loads(_run([python, "-c", IMPORT_ALL], str(work)).splitlines()[-1])
    assert found["configs"] == _expected_configs()
    assert {"larq_landmarks.datasets", "larq_landmarks.detection", "larq_landmarks.cli"} <= set(found["modules"])
    assert {f"larq_landmarks.runtime._kernels_{path}" for path in KERNEL_PATHS} <= set(found["modules"])
    return found


def _setup_distribution(monkeypatch):
    """setup.py's Distribution, as setuptools makes it before running any command."""
    from distutils.core import run_setup
    from setuptools import Extension

    if importlib.util.find_spec("pybind11") is None:  # a build requirement (and in the test extra): may be absent
        helpers = types.ModuleType("pybind11.setup_helpers")
        helpers.Pybind11Extension = lambda name, sources, cxx_std=None, **options: Extension(name, sources, **options)
        monkeypatch.setitem(sys.modules, "pybind11", types.ModuleType("pybind11"))
        monkeypatch.setitem(sys.modules, "pybind11.setup_helpers", helpers)
    cwd = os.getcwd()
    os.chdir(ROOT)  # setup.py reads README.md from the working directory
    try:
        return run_setup("setup.py", stop_after="init")
    finally:
        os.chdir(cwd)


@pytest.mark.slow  # a new Python importing TensorFlow and every module (10 s)
def test_this_install_imports_every_subpackage_from_elsewhere(tmp_path):
    """The install the suite runs in, from a folder outside the checkout as a user's script runs:
    installed editable from this checkout (the README's commands), its named configurations are
    the checkout's models/ folder, through setup.py's package_dir (``setup.py develop``, which
    old pips fell back to, ignored it and lost them)."""
    import larq_landmarks

    found = _imports_everything(sys.executable, tmp_path)
    if os.path.samefile(os.path.dirname(os.path.dirname(larq_landmarks.__file__)), ROOT):
        assert os.path.samefile(found["named_models"], os.path.join(ROOT, "models"))
    else:  # installed as a wheel
        assert os.path.samefile(found["named_models"], os.path.join(os.path.dirname(larq_landmarks.__file__),
                                                                    "named_models"))


@pytest.mark.slow  # builds and installs the package in a new venv
def test_wheel_installs_into_a_new_venv_and_imports_every_subpackage(tmp_path):
    """The wheel holds the package, its named models and its kernel modules, and works installed
    outside the checkout. It keeps the kernel modules the editable install compiled where they are
    newer than their sources (``LARQ_LANDMARKS_KEEP_KERNELS=1``: the four compiles took 1.5 of its
    1.6 minutes); the editable install's compile, the object-file and keep tests cover compiling."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], ROOT)
    python = str(venv / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], ROOT).strip()
    with open(os.path.join(site, "outer_site_packages.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"  # import from outside the checkout, as a user's script does
    work.mkdir()
    dist = tmp_path / "dist"
    _run([python, "-m", "pip", "wheel", "--no-deps", "--no-input", "-w", str(dist), "."], ROOT,
         env={**os.environ, "LARQ_LANDMARKS_KEEP_KERNELS": "1"})
    wheel = glob.glob(str(dist / "larq_landmarks-*.whl"))[0]
    inside = zipfile.ZipFile(wheel).namelist()
    assert {f"larq_landmarks/named_models/{name}.json" for name in _expected_configs()} <= set(inside)
    kernels = [name for name in inside if re.fullmatch(r"larq_landmarks/runtime/_kernels_\w+\..*so", name)]
    assert len(kernels) == len(KERNEL_PATHS), kernels
    _run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", wheel], ROOT)
    found = _imports_everything(python, work)
    assert found["named_models"].startswith(site)  # the installed copy, not the checkout


def test_each_instruction_set_compiles_into_an_object_file_of_its_own(monkeypatch):
    """setup.py's kernel modules (one C++ source, one build per instruction set) compile to object
    files of their own, and each is rebuilt when kernels.cpp changes. ``build_ext -j`` builds the
    modules in parallel: with kernels.cpp as the source of all of them, their compiles wrote one
    ``kernels.o`` at once, and a build of this repository came out unimportable ("Internal error
    while parsing type signature")."""
    from distutils.ccompiler import new_compiler

    modules = _setup_distribution(monkeypatch).ext_modules
    x86 = sysconfig.get_platform().endswith(("x86_64", "amd64"))
    paths = ("avx512", "avx512bw", "avx2", "portable") if x86 else ("portable",)
    assert sorted(module.name for module in modules) == sorted(f"larq_landmarks.runtime._kernels_{p}" for p in paths)
    objects = [tuple(new_compiler().object_filenames(module.sources, output_dir="build")) for module in modules]
    assert len(set(objects)) == len(modules), objects
    assert all({"larq_landmarks/runtime/csrc/kernels.cpp", "setup.py"} <= set(module.depends) for module in modules)


def test_an_editable_reinstall_keeps_kernel_modules_newer_than_their_sources(monkeypatch, tmp_path):
    """README's second command installs editable over the first: setup.py's build_ext keeps each
    kernel module already in the tree when it is newer than its source, kernels.cpp and setup.py
    (copied to where the build expects it), compiles the ones older than any of them, and a
    wheel's build (not editable) compiles every time."""
    from setuptools.command.build_ext import build_ext

    dist = _setup_distribution(monkeypatch)
    compiled = []
    monkeypatch.setattr(build_ext, "build_extension", lambda self, ext: compiled.append(ext.name))
    ext = [module for module in dist.ext_modules if module.name.endswith("_kernels_portable")][0]
    monkeypatch.chdir(tmp_path)
    for path in [*ext.sources, *ext.depends]:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write("source")
        os.utime(path, (1_000_000, 1_000_000))
    command = dist.cmdclass["build_ext"](dist)
    command.editable_mode = True
    command.ensure_finalized()
    command.build_lib = str(tmp_path / "build-lib")
    in_tree = os.path.join("larq_landmarks", "runtime", os.path.basename(command.get_ext_filename("_kernels_portable")))
    with open(in_tree, "wb") as f:
        f.write(b"module")
    os.utime(in_tree, (2_000_000, 2_000_000))
    command.build_extension(ext)
    assert compiled == []
    with open(command.get_ext_fullpath(ext.name), "rb") as f:
        assert f.read() == b"module"
    for newer in ("setup.py", "larq_landmarks/runtime/csrc/kernels.cpp", ext.sources[0]):
        os.utime(newer, (3_000_000, 3_000_000))
        command.build_extension(ext)
        assert compiled == [ext.name]
        compiled.clear()
        os.utime(newer, (1_000_000, 1_000_000))
    command.editable_mode = False
    command.build_extension(ext)
    assert compiled == [ext.name]


@pytest.mark.slow  # an install check: compiles the kernels three more times (25-35 s)
@pytest.mark.skipif(not sysconfig.get_platform().endswith(("x86_64", "amd64")) or shutil.which("g++") is None
                    or importlib.util.find_spec("pybind11") is None, reason="x86-64 with g++ and pybind11 only")
def test_avx512_kernels_compile_without_bfloat16():
    """Compilers before GCC 10 / Clang 9 do not know AVX512_BF16 (before GCC 8 / Clang 6,
    AVX512_VNNI; before GCC 11 / Clang 12, AVX-VNNI): the AVX-512 sources compile without the
    bfloat16 convolution or without it and the int8 one, and the AVX2 ones without the int8 convolution's
    VNNI form (their pairs form stays; as -DLARQ_LANDMARKS_NO_BF16 / -DLARQ_LANDMARKS_NO_VNNI make
    any compiler do), and with them."""
    import pybind11

    includes = ["-I" + sysconfig.get_paths()["include"], "-I" + pybind11.get_include()]
    flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mpopcnt"]
    source = os.path.join(ROOT, "larq_landmarks", "runtime", "csrc", "kernels_avx512bw.cpp")
    # (with neither define they compile in every install: setup.py builds them; no compiler knows
    # AVX512_BF16 but not AVX512_VNNI, so NO_VNNI alone is not a case for these sources)
    for define in (["-DLARQ_LANDMARKS_NO_BF16"], ["-DLARQ_LANDMARKS_NO_BF16", "-DLARQ_LANDMARKS_NO_VNNI"]):
        result = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", *define, *flags, *includes, source],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    source = os.path.join(ROOT, "larq_landmarks", "runtime", "csrc", "kernels_avx2.cpp")
    result = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-DLARQ_LANDMARKS_NO_VNNI", "-mavx2", "-mfma",
                             "-mpopcnt", *includes, source], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow  # an install check: one compile of the kernels for ARM (9 s)
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or importlib.util.find_spec("pybind11") is None,
                    reason="needs the aarch64-linux-gnu-g++ cross compiler and pybind11")
def test_portable_kernels_compile_for_64_bit_arm():
    """On ARM (a Raspberry Pi, a phone board) setup.py builds the portable kernels only: they compile
    there without any x86 header or builtin (LCE's interpreter runs the file fast there; the
    runtime's kernels must still build for the package to install)."""
    import pybind11

    includes = ["-I" + sysconfig.get_paths()["include"], "-I" + pybind11.get_include()]
    source = os.path.join(ROOT, "larq_landmarks", "runtime", "csrc", "kernels_portable.cpp")
    result = subprocess.run(["aarch64-linux-gnu-g++", "-std=c++17", "-fsyntax-only", "-O3", *includes, source],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
