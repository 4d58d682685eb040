"""larq_landmarks: binarized landmark localizers (Bulat & Tzimiropoulos, ICCV 2017 / TPAMI 2018).

Larq works on Keras 2 only, so this package makes TensorFlow resolve ``tf.keras`` to
``tf_keras`` by setting ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported. If TensorFlow
was already imported and bound ``tf.keras`` to Keras 3, importing this package raises an
``ImportError`` that says what to do.

It also sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless set, and holds TensorFlow to it while TensorFlow
loads (see ``_import_tensorflow``).
"""
import importlib.util
import os
import re
import sys
import tempfile

__version__ = "0.1.0"

_KERAS3_MESSAGE = (
    "larq_landmarks needs Keras 2 (the tf-keras package), but TensorFlow was already imported "
    "with Keras 3 as tf.keras. Import larq_landmarks before tensorflow/keras/larq, or set the "
    "environment variable TF_USE_LEGACY_KERAS=1 before starting Python "
    "(e.g. `export TF_USE_LEGACY_KERAS=1`), and make sure tf-keras is installed "
    "(`pip install tf-keras~=2.21`)."
)


# A line of absl's C++ logging: severity letter, date, time, thread, file:line]
_ABSL_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_ABSL_NOT_INITIALIZED = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def _below_log_level(text: str, min_log_level: int) -> str:
    """``text`` without the absl log lines below ``min_log_level`` (TF_CPP_MIN_LOG_LEVEL's
    scale: 1 drops INFO lines, 2 WARNING too, 3 ERROR too) and, from level 1, without absl's
    notice that logging is not initialised. Every other line is kept as it was."""
    kept = []
    for line in text.splitlines(keepends=True):
        match = _ABSL_LOG_LINE.match(line)
        if match and "IWEF".index(match.group(1)) < min_log_level:
            continue
        if min_log_level >= 1 and line.rstrip("\r\n") == _ABSL_NOT_INITIALIZED:
            continue
        kept.append(line)
    return "".join(kept)


def _import_tensorflow() -> None:
    """Import TensorFlow with its load-time C++ log lines held to TF_CPP_MIN_LOG_LEVEL.

    TensorFlow 2.21's libraries log through absl before ``absl::InitializeLog()`` is called,
    which ignores TF_CPP_MIN_LOG_LEVEL: each of its two libraries writes absl's notice and INFO
    lines (oneDNN is on, no CUDA driver) straight to file descriptor 2 on every import. While
    TensorFlow loads, descriptor 2 goes to a temporary file, which is written back afterwards
    (also when the import fails) without the lines the level excludes. With the level 0, or
    where descriptor 2 cannot be redirected, TensorFlow is imported as it is.
    """
    try:
        min_log_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        min_log_level = 0
    held = saved_stderr = None
    if min_log_level > 0:
        try:
            held = tempfile.TemporaryFile()
            sys.stderr.flush()
            saved_stderr = os.dup(2)
            os.dup2(held.fileno(), 2)
        except (OSError, AttributeError, ValueError):  # no writable temp dir, no descriptor 2, ...
            if saved_stderr is not None:
                os.close(saved_stderr)
            if held is not None:
                held.close()
            held = saved_stderr = None
    if held is None:
        import tensorflow  # noqa: F401
        return
    try:
        import tensorflow  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        held.seek(0)
        text = held.read().decode(errors="replace")
        held.close()
        sys.stderr.write(_below_log_level(text, min_log_level))
        sys.stderr.flush()


def _use_legacy_keras() -> None:
    tf_was_imported = "tensorflow" in sys.modules
    if not tf_was_imported:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _import_tensorflow()
    import tensorflow as tf

    try:
        keras_package = tf.keras.Model.__module__.split(".")[0]
    except Exception as error:  # tf_keras missing: the lazy loader raises
        raise ImportError(_KERAS3_MESSAGE + f" (tf.keras failed to load: {error})") from error
    if keras_package != "tf_keras":
        raise ImportError(_KERAS3_MESSAGE + f" (tf.keras is the {keras_package!r} package)")


def _tensorflow_installed() -> bool:
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


if not _tensorflow_installed():
    # Without TensorFlow only the bit-packed runtime (larq_landmarks.runtime) can be used, e.g. on
    # a deployment machine; everything else needs TensorFlow.
    __all__ = ["__version__"]
else:
    _use_legacy_keras()

    from larq_landmarks import blocks, models  # noqa: E402  (needs the Keras set-up above)
    from larq_landmarks.models import BinaryHourglass  # noqa: E402

    __all__ = ["BinaryHourglass", "blocks", "models", "__version__"]
