"""The log lines that TensorFlow's and TFLite's C++ write straight to file descriptor 2, held to
``TF_CPP_MIN_LOG_LEVEL`` (which the package sets to 2 unless it is set).

TensorFlow 2.21's libraries log through absl before ``absl::InitializeLog()`` is called, which
ignores ``TF_CPP_MIN_LOG_LEVEL``: each of its two libraries writes absl's notice and INFO lines
(oneDNN is on, no CUDA driver) on every import. TFLite's interpreter (LCE's too) writes ``INFO:
Created TensorFlow Lite XNNPACK delegate for CPU.`` each time it makes one. And on a machine
without NVIDIA's driver, TensorFlow's first look for GPUs writes an ERROR line, ``failed call to
cuInit``, that only says there is no GPU (tensorflow/tensorflow#37689). :func:`held_to_log_level`
sends descriptor 2 to a temporary file while such a call runs and writes it back afterwards (also
when the call fails) without the lines the level excludes; every other line is kept as it was.
"""
import contextlib
import ctypes
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

# A line of absl's C++ logging: severity letter, date, time, thread, file:line]
_ABSL_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_ABSL_NOT_INITIALIZED = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_TFLITE_INFO = "INFO: "  # TFLite's own logging: "INFO: ", "WARNING: ", "ERROR: " and the message
_NO_DRIVER_CUINIT = "] failed call to cuInit"

# Descriptor 2 is one per process: one hold at a time (the same thread may hold it again inside).
_HOLD = threading.RLock()


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as a number (0 where it is unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def cuda_driver_missing() -> bool:
    """Whether this is Linux and NVIDIA's driver library (``libcuda.so.1``) cannot be loaded: then
    TensorFlow's ``failed call to cuInit`` says only that there is no GPU. Where the driver is
    there, that line reports a real fault and is kept."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return True
    return False


def below_log_level(text: str, level: int, no_cuda_driver: bool = False) -> str:
    """``text`` without the lines under ``level`` (TF_CPP_MIN_LOG_LEVEL's scale: 1 drops INFO
    lines, 2 WARNING too, 3 ERROR too): absl's by their severity letter and, from level 1, absl's
    notice that logging is not initialised and TFLite's ``INFO:`` lines; with ``no_cuda_driver``
    (see :func:`cuda_driver_missing`), from level 1 also absl's ``failed call to cuInit`` lines.
    Every other line is kept as it was."""
    kept = []
    for line in text.splitlines(keepends=True):
        match = _ABSL_LOG_LINE.match(line)
        if match and "IWEF".index(match.group(1)) < level:
            continue
        if level >= 1 and (line.rstrip("\r\n") == _ABSL_NOT_INITIALIZED or line.startswith(_TFLITE_INFO)
                           or (no_cuda_driver and match and _NO_DRIVER_CUINIT in line)):
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def held_to_log_level(no_cuda_driver: bool = False) -> Iterator[bool]:
    """Descriptor 2 held while the block runs, then written back through :func:`below_log_level`
    at :func:`min_log_level`. Yields whether it is held: not at level 0 (every line wanted) nor
    where descriptor 2 cannot be redirected (no writable temporary folder, no descriptor 2); then
    what is written goes out as it comes."""
    level = min_log_level()
    with _HOLD:
        held = saved_stderr = None
        if level > 0:
            try:
                held = tempfile.TemporaryFile()
                sys.stderr.flush()
                saved_stderr = os.dup(2)
                os.dup2(held.fileno(), 2)
            except (OSError, AttributeError, ValueError):
                if saved_stderr is not None:
                    os.close(saved_stderr)
                if held is not None:
                    held.close()
                held = saved_stderr = None
        if held is None:
            yield False
            return
        try:
            yield True
        finally:
            sys.stderr.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            held.seek(0)
            text = held.read().decode(errors="replace")
            held.close()
            sys.stderr.write(below_log_level(text, level, no_cuda_driver))
            sys.stderr.flush()
