"""The runtime's CUDA kernels (``runtime/csrc/kernels.cu``) compiled with g++ and run on the CPU, as
written: the tests' way to check the CUDA code itself where there is no GPU.

``cuda_on_cpu.h`` supplies CUDA's device-side language (threads of a block as coroutines,
``__syncthreads``, warp votes and shuffles, the 1-bit m16n8k256 MMA as the PTX ISA defines its
fragments, shared memory poisoned before every block). Each launch copies its arrays next to guard
pages, so a read or write past an array's end is reported as an error of the launch instead of
reading a neighbour's memory; outputs are copied back. Launches alternate which threads of a
block go first (lowest-numbered, then highest), so a missing barrier shows up as a wrong result.

What this cannot show: timing, occupancy, memory coalescing, and anything the hardware does
differently from the PTX ISA's description of it; the GPU tests do that, on a GPU.
"""
import ctypes
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
import threading
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "cuda_on_cpu.h")
C_TYPES = {"int": "int", "i64": "long long", "float": "float", "u32": "unsigned", "u8": "unsigned char",
           "void": "void"}


def kernel_signatures(source: str):
    """``name -> [(C type, is pointer, parameter name, is const)]`` of every ``extern "C"
    __global__`` kernel, with a parameter-list macro expanded, and the source's numeric
    ``#define`` s."""
    macros = {m.group(1): m.group(2).replace("\\\n", " ")
              for m in re.finditer(r"^#define (\w+)[ \t]+((?:[^\n]*\\\n)*[^\n]*)", source, flags=re.M)}
    signatures = {}
    for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(([^)]*)\)', source):
        params = m.group(2).strip()
        params = macros.get(params, params)
        parsed = []
        for param in params.split(","):
            words = param.replace("*", " * ").split()
            const = words[0] == "const"
            words = [w for w in words if w != "const"]
            parsed.append((words[0], "*" in words, words[-1], const))
        signatures[m.group(1)] = parsed
    numbers = {name: int(value.split()[0]) for name, value in macros.items() if re.match(r"\d+\b", value)}
    return signatures, numbers


def available() -> bool:
    """Whether g++ is here to build the kernels for the CPU."""
    return shutil.which("g++") is not None


def _build(source: str, name: str) -> ctypes.CDLL:
    """``source`` (C++ including cuda_on_cpu.h) as a shared library, built once per content."""
    with open(HEADER, encoding="utf-8") as f:
        key = hashlib.sha256((f.read() + source).encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "larq_landmarks_cuda_on_cpu")
    os.makedirs(folder, exist_ok=True)
    library = os.path.join(folder, f"{name}_{key}.so")
    if not os.path.exists(library):
        scratch = tempfile.mkdtemp(dir=folder)
        try:
            cpp = os.path.join(scratch, f"{name}.cpp")
            with open(cpp, "w", encoding="utf-8") as f:
                f.write(source)
            built = os.path.join(scratch, "lib.so")
            result = subprocess.run(
                ["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-ffp-contract=off",
                 "-Wno-attributes", f"-I{HERE}", cpp, "-o", built], capture_output=True, text=True)
            if result.returncode != 0:
                raise AssertionError(f"the CUDA source does not compile for the CPU emulation:\n{result.stderr[-6000:]}")
            os.replace(built, library)  # atomic: parallel test workers may build the same library
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return ctypes.CDLL(library)


class _GuardedCopy:
    """A copy of an array that ends where a PROT_NONE page begins (and starts less than a page
    after another one)."""

    _libc = ctypes.CDLL(None, use_errno=True)

    def __init__(self, array: np.ndarray):
        page = mmap.PAGESIZE
        self.nbytes = array.nbytes
        data_pages = max(1, -(-self.nbytes // page))
        self.memory = mmap.mmap(-1, (data_pages + 2) * page)
        anchor = ctypes.c_char.from_buffer(self.memory)
        base = ctypes.addressof(anchor)
        del anchor  # the mmap cannot be closed while a buffer of it is held
        self.guards = (base, base + (data_pages + 1) * page)
        for guard in self.guards:
            if self._libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(page), 0) != 0:  # PROT_NONE
                raise OSError(ctypes.get_errno(), "mprotect")
        self.offset = (data_pages + 1) * page - self.nbytes
        self.address = base + self.offset
        self.memory[self.offset:self.offset + self.nbytes] = array.tobytes()

    def copy_to(self, array: np.ndarray) -> None:
        array.reshape(-1).view(np.uint8)[...] = np.frombuffer(self.memory, np.uint8, self.nbytes, self.offset)

    def close(self) -> None:
        for guard in self.guards:
            self._libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(mmap.PAGESIZE), 3)  # read | write
        self.memory.close()


def _launch(call, library, grid, block, values, const, what: str) -> None:
    """Runs ``call(grid, block, argument pointers, order)`` (a launcher of ``library``) on
    ``values``: NumPy arrays (pointer parameters, copied next to guard pages and, unless ``const``,
    copied back) and NumPy scalars, in the parameter order. One launch at a time: the emulation's
    state is global."""
    with _LOCK:
        _launch_alone(call, library, grid, block, values, const, what)


def _launch_alone(call, library, grid, block, values, const, what: str) -> None:
    global _launches
    grid = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
    block = tuple(int(v) for v in block) + (1,) * (3 - len(block))
    copies, holders = [], []
    pointers = (ctypes.c_void_p * len(values))()
    try:
        for i, value in enumerate(values):
            if isinstance(value, np.ndarray):
                copy = _GuardedCopy(np.ascontiguousarray(value))
                copies.append((copy, value, const[i]))
                holder = ctypes.c_void_p(copy.address)
                pointers[i] = ctypes.addressof(holder)
            else:
                holder = np.array(value)  # keeps the scalar's own width
                pointers[i] = holder.ctypes.data
            holders.append(holder)
        order = 1 if _launches % 2 == 0 else -1
        _launches += 1
        status = call((ctypes.c_int * 3)(*grid), (ctypes.c_int * 3)(*block), pointers, ctypes.c_int(order))
        if status != 0:
            library.cuda_on_cpu_error.restype = ctypes.c_char_p
            raise AssertionError(f"{what} (on the CPU): {library.cuda_on_cpu_error().decode()}")
        for copy, array, is_const in copies:
            if not is_const:
                copy.copy_to(array)
    finally:
        for copy, _, _ in copies:
            copy.close()


_launches = 0
_LOCK = threading.Lock()


_COMMON = """
#include "cuda_on_cpu.h"
static void** cuda_on_cpu_args;
extern "C" const char* cuda_on_cpu_error() { return cuda_on_cpu::error.c_str(); }
"""


def _argument(ctype: str, pointer: bool, index: int) -> str:
    if pointer:
        return f"({C_TYPES[ctype]}*)(*(void**)cuda_on_cpu_args[{index}])"
    return f"*({C_TYPES[ctype]}*)cuda_on_cpu_args[{index}]"


class RawKernels:
    """Every ``extern "C" __global__`` kernel of a CUDA source, built for the CPU."""

    def __init__(self, source: str):
        self.signatures, self.numbers = kernel_signatures(source)
        parts = [_COMMON, source]
        for name, params in self.signatures.items():
            arguments = ", ".join(_argument(ctype, pointer, i) for i, (ctype, pointer, _, _) in enumerate(params))
            parts.append(f"static void body_{name}() {{ {name}({arguments}); }}\n"
                         f'extern "C" int launch_{name}(const int* grid, const int* block, void** args, int order) '
                         f"{{ cuda_on_cpu_args = args; return cuda_on_cpu::run_grid(grid, block, body_{name}, order); }}")
        self._library = _build("\n".join(parts), "kernels")

    def launch(self, name: str, grid, block, args) -> None:
        const = [param[3] for param in self.signatures[name]]
        _launch(getattr(self._library, f"launch_{name}"), self._library, grid, block, list(args), const, name)


_ELEMENTWISE_TYPES = {"float32": "float", "int32": "int", "int64": "long long"}


class ElementwiseKernelOnCpu:
    """A CuPy ``ElementwiseKernel``'s operation compiled as C++ over the flat index ``i`` (inputs
    and outputs of the output's size read at ``i``, ``raw`` arrays indexed by the operation,
    scalars by value) and run on the CPU."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str):
        self.params = [p.split() for p in in_params.split(",")] + [p.split() for p in out_params.split(",")]
        self.outputs = len(out_params.split(","))
        lines, index = [], 0
        for k, words in enumerate(self.params):
            raw, ctype, pname = words[0] == "raw", _ELEMENTWISE_TYPES[words[-2]], words[-1]
            is_output = k >= len(self.params) - self.outputs
            if raw:
                lines.append(f"const {ctype}* {pname} = ({ctype}*)(*(void**)cuda_on_cpu_args[{index}]);")
            elif is_output:
                lines.append(f"{ctype}& {pname} = (({ctype}*)(*(void**)cuda_on_cpu_args[{index}]))[i];")
            else:  # an array of the output's size, or a scalar (the launch says which)
                lines.append(f"const {ctype} {pname} = cuda_on_cpu_scalar[{index}] ? *({ctype}*)cuda_on_cpu_args[{index}]"
                             f" : (({ctype}*)(*(void**)cuda_on_cpu_args[{index}]))[i];")
            index += 1
        body = "\n      ".join(lines)
        source = _COMMON + f"""
static const int* cuda_on_cpu_scalar;
static long long cuda_on_cpu_size;
static void body() {{
  const long long n_threads = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < cuda_on_cpu_size; i += n_threads) {{
      {body}
      {operation}
  }}
}}
extern "C" int launch(const int* grid, const int* block, void** args, int order, const int* scalar, long long size) {{
  cuda_on_cpu_args = args; cuda_on_cpu_scalar = scalar; cuda_on_cpu_size = size;
  return cuda_on_cpu::run_grid(grid, block, body, order);
}}
"""
        self.name = name
        self._library = _build(source, "elementwise")

    def __call__(self, *args) -> None:
        outputs = args[-self.outputs:]
        size = outputs[0].size
        for words, arg in zip(self.params, args):
            if isinstance(arg, np.ndarray) and words[0] != "raw":
                assert arg.size == size, f"{self.name}: {words[-1]} has {arg.size} elements for {size} outputs"
        scalar = (ctypes.c_int * len(args))(*[not isinstance(a, np.ndarray) for a in args])

        def call(grid, block, pointers, order):
            return self._library.launch(grid, block, pointers, order, scalar, ctypes.c_longlong(size))

        const = [k < len(args) - self.outputs for k in range(len(args))]
        _launch(call, self._library, (max(1, min(64, -(-size // 256))),), (256,), list(args), const, self.name)


def kernels(source: str) -> RawKernels:
    """The kernels of a CUDA source (``kernels.cu``'s text), built for the CPU once per process."""
    if source not in _LOADED:
        _LOADED[source] = RawKernels(source)
    return _LOADED[source]


_LOADED: dict = {}
