"""Bad model files and annotation files (issue 13): a truncated or corrupted .tflite is refused,
naming the file, before any interpreter sees it; random byte mutations of a .tflite, a .pts file
and .mat files give a result or the library's own error, nothing else (a fixed number of seeded mutations each, so the outcome is the same on any machine)."""
import glob
import io
import os
import shutil
import struct
import warnings

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import tensorflow as tf

from larq_landmarks import export
from larq_landmarks.datasets import matlab_files, readers, writers
from larq_landmarks.models import BinaryHourglass
from larq_landmarks.predictor import Predictor
from larq_landmarks.runtime import CorruptModelError, Engine, UnsupportedModelError
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
    refused = 0
    for _ in range(200):
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
    assert refused > 50  # (123 of the 200 with this seed)


@pytest.mark.slow
def test_random_mutations_of_a_tflite_run_or_give_the_runtimes_errors_naming_it(converted, tmp_path):
    """Damaged files that pass the flatbuffer checks (an op's options read as another op's, a
    filter of no size, a tensor nobody writes): the engine refuses them naming the file, or runs;
    before, 1-2% of such files raised TypeError, struct.error, AttributeError or IndexError from
    deep inside, naming nothing."""
    data = converted.read_bytes()
    images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    rng = np.random.default_rng(6)
    path = tmp_path / "mutated.tflite"
    outcomes = {"ran": 0, "refused": 0}
    for _ in range(150):
        mutated = bytearray(data)
        for position in rng.integers(0, len(data), rng.choice([1, 1, 2, 4])):
            mutated[position] = rng.choice([rng.integers(0, 256), 0, 0xFF, 1, 0x7F, 0x80])
        path.write_bytes(bytes(mutated))
        try:
            Engine(str(path)).predict(images)
            outcomes["ran"] += 1
        except (CorruptModelError, UnsupportedModelError, MemoryError) as error:  # (a shape of terabytes)
            assert str(error).startswith(str(path)), error
            outcomes["refused"] += 1
    assert outcomes["ran"] > 20 and outcomes["refused"] > 20, outcomes  # (75 and 75 with this seed)


def test_random_mutations_of_a_pts_file_give_points_or_a_dataset_error(tmp_path):
    points = np.random.default_rng(1).uniform(10, 100, (68, 2))
    text = "version: 1\nn_points: 68\n{\n" + "".join(f"{x:.3f} {y:.3f}\n" for x, y in points) + "}\n"
    data = text.encode()
    path = tmp_path / "face.pts"
    rng = np.random.default_rng(2)
    outcomes = {"points": 0, "error": 0}
    for _ in range(300):
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


def _mpii_and_300w_lp_files(tmp_path):
    """A small MPII annotation file and one 300W-LP sample, as the writers make them."""
    mpii = writers.write_mpii_mat(str(tmp_path / "mpii"), 6, seed=3, image_size=(48, 48))
    lp = writers.write_300w_lp(str(tmp_path / "lp"), 1, seed=3, image_size=(48, 48))
    return mpii, os.path.join(lp, sorted(f for f in os.listdir(lp) if f.endswith(".mat"))[0])


def test_mat_files_that_crashed_scipy_are_refused_naming_the_file(tmp_path):
    """Two one-byte damages that made ``scipy.io.loadmat`` (1.17) crash the process (a
    segmentation fault): a data element's type code out of the format's, and an array flagged
    complex without an imaginary part. Each is now the reader's error naming the file, which
    ``skip_bad`` skips."""
    mpii, lp = _mpii_and_300w_lp_files(tmp_path)
    data = bytearray(open(lp, "rb").read())
    data[data.index(b"pt2d") + 4] = 0x80  # pt2d's values: miDOUBLE (9) -> 128, no type
    open(lp, "wb").write(bytes(data))
    with pytest.raises(readers.DatasetError, match=r"image00000.mat: cannot read .mat file \(.*data type 128"):
        readers.read_300w_lp(os.path.dirname(lp))
    writers.write_300w_lp(str(tmp_path / "two"), 2, seed=3, image_size=(48, 48))
    shutil.copy(lp, tmp_path / "two" / "image00000.mat")
    with pytest.warns(UserWarning, match="skipped 1 bad sample.*image00000.mat"):
        assert len(readers.read_300w_lp(str(tmp_path / "two"), skip_bad=True)) == 1

    data = bytearray(open(mpii, "rb").read())
    flags = data.index(struct.pack("<III", 6, 8, 6))  # the first double array's flags (miUINT32, 8 bytes)
    data[flags + 9] |= 0x08  # its complex bit (0x800)
    open(mpii, "wb").write(bytes(data))
    with pytest.raises(readers.DatasetError, match=r"mpii_human_pose_v1_u12_1.mat: cannot read .mat file"):
        readers.read_mpii_mat(mpii, str(tmp_path / "mpii" / "images"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to see a crash without dying of it")
def test_random_mutations_of_mat_files_give_arrays_or_our_error_never_a_crash(tmp_path):
    """Bytes of an MPII file and a 300W-LP one changed at random: the structure check refuses
    the file, or SciPy reads it or raises; SciPy runs in a forked child, so that a crash is seen
    (without the check about 3% of such changes crashed it)."""
    mpii, lp = _mpii_and_300w_lp_files(tmp_path)
    rng = np.random.default_rng(4)
    outcomes = {"refused": 0, "read": 0, "scipy's error": 0, "crashed": 0}
    for path, options in ((mpii, dict(struct_as_record=False, squeeze_me=True)), (lp, {})):
        data = open(path, "rb").read()
        matlab_files.check_structure(data)  # the intact file passes
        for _ in range(150):
            mutated = bytearray(data)
            for position in rng.integers(128, len(data), rng.integers(1, 4)):
                mutated[position] = rng.choice([rng.integers(0, 256), 0xFF, 0x80, 0x7F, 0x01])
            try:
                matlab_files.check_structure(bytes(mutated))
            except matlab_files.MatFileError:
                outcomes["refused"] += 1
                continue
            child = os.fork()
            if child == 0:  # pragma: no cover (the child)
                try:
                    scipy.io.loadmat(io.BytesIO(bytes(mutated)), **options)
                except Exception:
                    os._exit(3)
                os._exit(0)
            _, status = os.waitpid(child, 0)
            if os.WIFSIGNALED(status):
                outcomes["crashed"] += 1
            else:
                outcomes["scipy's error" if os.WEXITSTATUS(status) == 3 else "read"] += 1
    assert outcomes["crashed"] == 0, outcomes
    assert outcomes["refused"] > 50 and outcomes["read"] > 50, outcomes  # (132 and 157 with this seed)


def test_mat_structure_check_passes_what_scipy_writes_and_reads(tmp_path):
    """Every kind of array SciPy writes (numeric types, complex, sparse, logical, char, cell,
    struct arrays, nested, empty), compressed or not, passes the check and reads as SciPy reads
    it; so do the MATLAB-written files SciPy tests its reader with, where its wheel has them."""
    values = {"double": np.arange(6.0).reshape(2, 3), "int8": np.int8([[-3, 4]]), "uint64": np.uint64([[2 ** 60]]),
              "single": np.float32([[1.5]]), "complex": np.array([[1 + 2j, 3 - 1j]]),
              "sparse": scipy.sparse.csc_matrix(np.eye(3)), "sparse_complex": scipy.sparse.csc_matrix(np.eye(2) * 1j),
              "logical": np.array([[True, False]]), "text": "MPII ö", "texts": np.array(["ab", "cd"]),
              "empty": np.zeros((0, 3)), "empty_text": "", "cell": np.array([[1.0, "x", np.zeros(2)]], dtype=object),
              "struct": {"x": 1.0, "nested": {"y": np.arange(3)}, "empty": np.zeros((0, 0))},
              "structs": np.array([[(1.0, "a"), (2.0, "b")]], dtype=[("v", "O"), ("n", "O")])}
    for compressed in (False, True):
        path = tmp_path / f"all_{compressed}.mat"
        scipy.io.savemat(path, values, do_compression=compressed)
        matlab_files.check_structure(path.read_bytes())
        ours, theirs = matlab_files.loadmat(path), scipy.io.loadmat(path)
        assert sorted(ours) == sorted(theirs) and repr(ours["struct"]) == repr(theirs["struct"])
        np.testing.assert_array_equal(ours["complex"], values["complex"])
    folder = os.path.join(os.path.dirname(scipy.io.__file__), "matlab", "tests", "data")
    read = 0
    for path in sorted(glob.glob(os.path.join(folder, "*.mat"))):
        data = open(path, "rb").read()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scipy.io.loadmat(io.BytesIO(data))
        except Exception:
            continue  # SciPy's deliberately broken files
        matlab_files.check_structure(data)
        read += 1
    assert read == 0 or read > 50  # (the wheel's test files, where installed: 95 with SciPy 1.17)
