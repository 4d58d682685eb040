"""larq_landmarks: binarized landmark localizers (Bulat & Tzimiropoulos, ICCV 2017 / TPAMI 2018).

Larq works on Keras 2 only, so this package makes TensorFlow resolve ``tf.keras`` to
``tf_keras`` by setting ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported. If TensorFlow
was already imported and bound ``tf.keras`` to Keras 3, importing this package raises an
``ImportError`` that says what to do.

It also sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless set, and holds TensorFlow's C++ log lines to it while
TensorFlow loads (:mod:`larq_landmarks.native_logs`).

With the environment variable ``LARQ_LANDMARKS_RUNTIME_ONLY=1`` (a process that only runs converted
files: :mod:`larq_landmarks.runtime`, the ``Predictor`` on its engines, ``larq-landmarks predict``)
importing this package imports no TensorFlow: 0.1 s and 40 MB instead of 2.7 s and 575 MB. The
environment is set up as above all the same, so that the parts that need TensorFlow
(``larq_landmarks.models``, ``larq_landmarks.export``, ...) import it, with Keras 2, when they are
imported; ``larq_landmarks.BinaryHourglass``, ``.models`` and ``.blocks`` import it as this package
would have, its start-up log lines held.
"""
import importlib.util
import os
import sys

from larq_landmarks import native_logs

__version__ = "0.1.0"

_KERAS3_MESSAGE = (
    "larq_landmarks needs Keras 2 (the tf-keras package), but TensorFlow was already imported "
    "with Keras 3 as tf.keras. Import larq_landmarks before tensorflow/keras/larq, or set the "
    "environment variable TF_USE_LEGACY_KERAS=1 before starting Python "
    "(e.g. `export TF_USE_LEGACY_KERAS=1`), and make sure tf-keras is installed "
    "(`pip install tf-keras~=2.21`)."
)


def _import_tensorflow() -> None:
    """Import TensorFlow with the C++ log lines it writes while loading held to
    TF_CPP_MIN_LOG_LEVEL (:mod:`larq_landmarks.native_logs`). Where NVIDIA's driver is missing, its
    first look for GPUs, whose only output is an ERROR line saying so, is made here too (it leaves
    every ``tf.config`` setting open)."""
    no_cuda_driver = native_logs.cuda_driver_missing()
    with native_logs.held_to_log_level(no_cuda_driver) as held:
        import tensorflow

        if held and no_cuda_driver:
            tensorflow.config.list_physical_devices("GPU")


RUNTIME_ONLY = "LARQ_LANDMARKS_RUNTIME_ONLY"


def _set_up_environment() -> bool:
    """Set TensorFlow's environment for Keras 2 (and its log level, unless set) where TensorFlow was
    not imported yet; returns whether it was not."""
    if "tensorflow" in sys.modules:
        return False
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return True


def _use_legacy_keras() -> None:
    if _set_up_environment():
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


if not _tensorflow_installed() or os.environ.get(RUNTIME_ONLY) == "1":
    # Without TensorFlow, or told to leave it unimported, the bit-packed runtime
    # (larq_landmarks.runtime) can be used as it is, e.g. on a deployment machine; the rest imports
    # TensorFlow when it is imported (here, on first use of the names below).
    if _tensorflow_installed():
        _set_up_environment()
    __all__ = ["__version__"]

    def __getattr__(name: str):
        if name in ("BinaryHourglass", "blocks", "models"):
            _use_legacy_keras()  # TensorFlow imported as above: its start-up lines held, Keras 2 checked
            module = importlib.import_module(f"larq_landmarks.{'blocks' if name == 'blocks' else 'models'}")
            return module.BinaryHourglass if name == "BinaryHourglass" else module
        raise AttributeError(f"module 'larq_landmarks' has no attribute {name!r}")
else:
    _use_legacy_keras()

    from larq_landmarks import blocks, models  # noqa: E402  (needs the Keras set-up above)
    from larq_landmarks.models import BinaryHourglass  # noqa: E402

    __all__ = ["BinaryHourglass", "blocks", "models", "__version__"]
