import os
import subprocess
import sys

import numpy as np
import pytest

import larq_landmarks  # noqa: F401  (sets up Keras 2 before TensorFlow loads)
import tensorflow as tf

tf.config.threading.set_inter_op_parallelism_threads(2)
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share two cores: one op thread each,
    tf.config.threading.set_intra_op_parallelism_threads(1)
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")  # and for the processes they start (CLI, tutorials)


def run_python(code: str, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (for what must happen before TensorFlow starts)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="session")
def small_faces():
    """512 synthetic 64x64 faces with their 68 landmarks (input pixels)."""
    from larq_landmarks import synthetic

    rng = np.random.default_rng(0)
    faces = [synthetic.random_face(rng, (64, 64), max_yaw_degrees=45) for _ in range(512)]
    images = np.stack([f["image"] for f in faces]).astype(np.float32) / 255.0
    points = np.stack([f["points"] for f in faces])
    return images, points


@pytest.fixture(scope="session")
def small_file(tmp_path_factory):
    """A small converted binary model (``binary_hpm``, 64x64 input, width 32, depth 2, batch norms
    with trained-like statistics): the path of its ``.tflite``."""
    from larq_landmarks import export, models
    from larq_landmarks.synthetic import trained_like_batch_norm

    tf.keras.utils.set_random_seed(0)
    model = trained_like_batch_norm(models.build_named("binary_hpm", 68, input_size=64, width=32, depth=2))
    path = tmp_path_factory.mktemp("runtime") / "small.tflite"
    export.convert(model, str(path))
    return str(path)


@pytest.fixture
def dtype_policy():
    """``set_global_policy`` for one test (mixed precision): the Keras dtype policy in force
    before it is restored after it."""
    previous = tf.keras.mixed_precision.global_policy()
    yield tf.keras.mixed_precision.set_global_policy
    tf.keras.mixed_precision.set_global_policy(previous)


def pytest_collection_modifyitems(items):
    """Start the longest tests first (the ``slow`` ones: tutorials, installs, the demo, the
    MirroredStrategy run; of those the tutorials, conversions and demo before the rest), so that
    the two xdist workers fill the end of the run with short tests instead of one waiting on a
    long one."""
    first = ("test_tutorials.py", "test_export.py", "test_demo.py")
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 os.path.basename(str(item.fspath)) not in first))
