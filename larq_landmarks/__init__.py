"""larq_landmarks: binarized landmark localizers (Bulat & Tzimiropoulos, ICCV 2017 / TPAMI 2018).

Larq works on Keras 2 only, so this package makes TensorFlow resolve ``tf.keras`` to
``tf_keras`` by setting ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported. If TensorFlow
was already imported and bound ``tf.keras`` to Keras 3, importing this package raises an
``ImportError`` that says what to do.

It also sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless set, and holds TensorFlow's C++ log lines to it while
TensorFlow loads (:mod:`larq_landmarks.native_logs`).
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
