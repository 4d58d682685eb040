"""Bad model files and annotation files (issue 13): a truncated or corrupted .tflite is refused,
naming the file, before any interpreter sees it; random byte mutations of a .tflite and of a
.pts file give a result or the library's own error, nothing else (bounded fuzzing, seeded)."""
import time

import numpy as np
import pytest
import tensorflow as tf

from larq_landmarks import export
from larq_landmarks.datasets import readers
from larq_landmarks.models import BinaryHourglass
from larq_landmarks.predictor import Predictor
from larq_landmarks.runtime import CorruptModelError, Engine
from larq_landmarks.runtime.graph import verify_flatbuffer


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("bad") / "model.tflite"
    export.convert(BinaryHourglass(68, width=32, input_size=64, depth=2), str(path))
    return path


@pytest.mark.slow  # a conversion; the fast tier keeps the .pts fuzzing
@pytest.mark.parametrize("keep", [0.3, -400, -4])
def test_truncated_tflite_is_refused_by_every_engine(converted, tmp_path, keep):
    data = converted.read_bytes()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(data[: int(len(data) * keep) if keep > 0 else len(data) + keep])
    for engine in ("auto", "runtime", "lce"):
        with pytest.raises(export.NotOurModelError, match="cut.tflite: not a complete TFLite flatbuffer"):
            Predictor.from_path(str(cut), engine=engine)
    with pytest.raises(CorruptModelError, match="cut.tflite"):
        Engine(str(cut))
    with pytest.raises(export.NotOurModelError):
        export.interpreter(cut.read_bytes())


@pytest.mark.slow
def test_random_mutations_of_a_tflite_give_a_result_or_our_error(converted):
    data = converted.read_bytes()
    verify_flatbuffer(data, "model.tflite")  # the intact file passes
    rng = np.random.default_rng(0)
    started, tried, refused = time.time(), 0, 0
    while tried < 200 and time.time() - started < 8:
        mutated = bytearray(data)
        for position in rng.integers(0, len(data), rng.integers(1, 9)):
            mutated[position] = rng.integers(0, 256)
        if rng.uniform() < 0.3:
            mutated = mutated[: rng.integers(8, len(mutated))]
        try:
            verify_flatbuffer(bytes(mutated), "mutated.tflite")
        except CorruptModelError as error:
            assert "mutated.tflite" in str(error)
            refused += 1
        tried += 1
    assert tried >= 30 and refused > 0


def test_random_mutations_of_a_pts_file_give_points_or_a_dataset_error(tmp_path):
    points = np.random.default_rng(1).uniform(10, 100, (68, 2))
    text = "version: 1\nn_points: 68\n{\n" + "".join(f"{x:.3f} {y:.3f}\n" for x, y in points) + "}\n"
    data = text.encode()
    path = tmp_path / "face.pts"
    rng = np.random.default_rng(2)
    outcomes = {"points": 0, "error": 0}
    started = time.time()
    for _ in range(300):
        if time.time() - started > 6:
            break
        mutated = bytearray(data)
        for position in rng.integers(0, len(data), rng.integers(1, 6)):
            mutated[position] = rng.integers(0, 256)
        if rng.uniform() < 0.3:
            mutated = mutated[: rng.integers(0, len(mutated))]
        path.write_bytes(bytes(mutated))
        try:
            result = readers.read_pts(str(path))
            assert result.shape == (68, 2) and np.all(np.isfinite(result))
            outcomes["points"] += 1
        except readers.DatasetError as error:
            assert "face.pts" in str(error)
            outcomes["error"] += 1
    assert outcomes["points"] > 0 and outcomes["error"] > 0
