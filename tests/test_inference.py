"""Issue 4: decoding back to images, the predictor API, Keras metrics, pictures, TensorBoard."""
import glob

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from larq_landmarks import cropping, export, heatmaps as hm, keras_metrics, layouts, metrics, visualize
from larq_landmarks.cropping import crop_labels_to_image, crop_matrices, face_crop
from larq_landmarks.datasets import pipeline, readers, writers
from larq_landmarks.datasets.segmentation import render_part_mask
from larq_landmarks.evaluation import heatmaps_to_image, predict_dataset
from larq_landmarks.models import BinaryHourglass
from larq_landmarks.predictor import InputError, Predictor, flip_test, load_rgb
from larq_landmarks.tensorboard import HeatmapImages

import no_tensorflow


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    writers.write_300w(str(folder), 6, seed=11, image_size=(300, 220))
    return readers.to_columns(readers.read_pts_folder(str(folder)))


def test_decoding_recovers_ground_truth_in_the_original_image(faces):
    """Heatmaps rendered at the crop positions decode back to the image to a quarter heatmap pixel."""
    data = pipeline.evaluation_dataset(faces, 128, batch_size=6)
    batch = next(iter(data))
    crop_points = pipeline.transform_points(batch["matrix"], batch["points"])
    maps = hm.render_heatmaps(hm.input_to_heatmap(crop_points), tf.ones(crop_points.shape[:2]), 32)
    points, scores = heatmaps_to_image(maps, batch["matrix"])
    image_pixels_per_heatmap_pixel = 4 * 200 * faces["scale"] / 128  # crop zoom
    error = np.abs(points.numpy() - faces["points"]).max(axis=(1, 2))
    assert np.all(error <= 0.25 * image_pixels_per_heatmap_pixel + 1e-3)
    assert np.all(scores.numpy() > 0.5)


def test_flip_test_matches_hand_computation():
    images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    permutation = [2, 1, 0]
    # with f = identity, unflip(swap(f(flip(x)))) is x with channels permuted
    np.testing.assert_allclose(flip_test(lambda x: x, images, permutation), images + images[..., permutation])


def test_predictor_agrees_with_the_evaluation_pipeline(faces):
    """Same crop and same mapping back as evaluation: a predict function that records its crops
    and answers fixed heatmaps gives the pipeline's crops and heatmaps_to_image's points."""
    rng = np.random.default_rng(0)
    fixed = hm.render_heatmaps(rng.uniform(2, 13, size=(1, 68, 2)), np.ones((1, 68)), 16).numpy()
    seen = []

    def predict(crops):
        seen.append(crops)
        return np.repeat(fixed, len(crops), axis=0)

    predictor = Predictor(predict, input_size=64, num_landmarks=68)
    batch = next(iter(pipeline.evaluation_dataset(faces, 64, batch_size=2)))
    expected, _ = heatmaps_to_image(np.repeat(fixed, 2, axis=0), batch["matrix"])
    for i in range(2):
        path = faces["image_path"][i]
        image = Image.open(path)
        for given in (path, image, np.asarray(image), np.asarray(image) / 255.0):
            seen.clear()
            points, scores = predictor.predict(given, [faces["box"][i]])
            assert points.shape == (1, 68, 2) and scores.shape == (1, 68)
            np.testing.assert_allclose(points[0], expected[i], atol=1e-3)
            # JPEG decoders (Pillow vs TensorFlow) may differ by a grey level
            assert np.abs(seen[0][0] - batch["image"][i].numpy()).mean() < 2 / 255
    # faces of several images go through the model together, batch_size crops every call but the
    # last (the second image's two faces go in two calls: the first image's face and its first,
    # then its second and the fourth image's face; the fifth image's face alone at the end)
    paths = list(faces["image_path"][:4]) + [faces["image_path"][0]]
    boxes = [[faces["box"][0]], [faces["box"][1], faces["box"][1]], [], [faces["box"][3]], [faces["box"][0]]]
    seen.clear()
    many = predictor.predict_many(paths, boxes, batch_size=2)
    assert [len(crops) for crops in seen] == [2, 2, 1]
    assert [p.shape[0] for p, _ in many] == [1, 2, 0, 1, 1]
    for (points, scores), path, image_boxes in zip(many, paths, boxes):
        alone = predictor.predict(path, image_boxes)
        np.testing.assert_allclose(points, alone[0], atol=1e-4)
        np.testing.assert_allclose(scores, alone[1], atol=1e-6)
    for bad in (0, 2.5, True):  # 2.5 was a TypeError from slicing, True a batch of 1
        with pytest.raises(InputError, match=f"batch_size={bad!r} must be a positive integer"):
            predictor.predict_many(paths, boxes, batch_size=bad)


def _footprint(centre, side, size):
    """The image pixels (centres at integers, ``0..size-1``) inside a crop of ``side`` image pixels
    around ``centre``, the half-open interval ``[centre - side/2, centre + side/2)``."""
    pixels = np.arange(size)
    return (pixels >= centre - side / 2) & (pixels < centre + side / 2)


def test_crop_labels_in_the_image_match_hand_computation(monkeypatch):
    """A crop's class scores land on the image pixels its crop covers, the right way round."""
    size, rows = 64, 16  # crop side and score side: stride 4
    box = [100.0, 60.0, 161.0, 140.0]  # centre x 130.5: between two pixels
    centre, scale = face_crop(box)
    matrices = crop_matrices(centre[None], [scale], size)
    side = 200 * scale  # image pixels across the crop
    inside = _footprint(centre[1], side, 200)[:, None] & _footprint(centre[0], side, 300)[None, :]
    # constant scores for class 3: class 3 exactly on the crop's footprint, background elsewhere
    constant = np.zeros((1, rows, rows, 7), np.float32)
    constant[..., 3] = 5
    labels = crop_labels_to_image(constant, matrices, size, 200, 300)
    assert labels.dtype == np.uint8 and labels.shape == (200, 300)
    np.testing.assert_array_equal(labels, np.where(inside, 3, 0))
    # class 1 rises with the score column u, class 2 falls: they tie at the middle column (u = 7.5,
    # crop x = (7.5 + 0.5) * 4 - 0.5 = 31.5, the crop's centre), so class 1 is right of the centre
    ramp = np.zeros((1, rows, rows, 7), np.float32)
    ramp[..., 1] = np.arange(rows)
    ramp[..., 2] = rows - 1 - np.arange(rows)
    labels = crop_labels_to_image(ramp, matrices, size, 200, 300)
    x = np.arange(300)[None, :]
    np.testing.assert_array_equal(labels, np.where(inside, np.where(x > centre[0], 1, 2), 0))
    # two crops overlapping: the one least sure of background decides; outside both, background
    other = crop_matrices(centre[None] + [30, 0], [scale], size)
    sure = np.zeros((1, rows, rows, 7), np.float32)
    sure[..., 5] = 9  # background probability e^0 / (e^9 + 6): lower than the constant crop's
    labels = crop_labels_to_image(np.concatenate([constant, sure]), np.concatenate([matrices, other]), size, 200, 300)
    inside_other = _footprint(centre[1], side, 200)[:, None] & _footprint(centre[0] + 30, side, 300)[None, :]
    np.testing.assert_array_equal(labels, np.where(inside_other, 5, np.where(inside, 3, 0)))
    background = sure.copy()
    background[..., 0] = 20  # the second crop sure of background: the first crop's class stays
    labels = crop_labels_to_image(np.concatenate([constant, background]), np.concatenate([matrices, other]), size,
                                  200, 300)
    np.testing.assert_array_equal(labels, np.where(inside, 3, 0))
    with pytest.raises(ValueError, match=r"logits: expected \(N, h, w, C\) for 1 crops"):
        crop_labels_to_image(constant[0], matrices, size, 200, 300)
    # any other matrix takes the general (per-pixel) path: the same matrix scaled as a whole (the same
    # mapping), and the crop turned a quarter about its centre with its scores turned with it, give
    # the upright crop's map
    scores = np.random.default_rng(3).normal(size=(1, rows, rows, 7)).astype(np.float32)
    upright = crop_labels_to_image(scores, matrices, size, 200, 300)
    np.testing.assert_array_equal(crop_labels_to_image(scores, 2 * matrices, size, 200, 300), upright)
    turn = np.array([[0, -1, size - 1], [1, 0, 0], [0, 0, 1]], np.float32)  # crop (x, y) -> (S-1-y, x)
    turned = crop_labels_to_image(np.rot90(scores, -1, axes=(1, 2)), turn @ matrices, size, 200, 300)
    assert (turned == upright).mean() > 0.999 and (upright > 0).mean() > 0.1  # but for float rounding
    # a large crop is mapped a band of rows at a time: bands of two rows give the same maps
    monkeypatch.setattr(cropping, "PIXELS_A_BAND", 300)
    np.testing.assert_array_equal(crop_labels_to_image(scores, matrices, size, 200, 300), upright)
    np.testing.assert_array_equal(crop_labels_to_image(np.rot90(scores, -1, axes=(1, 2)), turn @ matrices, size, 200,
                                                       300), turned)


def test_segment_puts_the_pipelines_masks_back_on_the_image(faces):
    """A model answering the pipeline's own masks (as one-hot logits) for each face's crop gives,
    mapped back by ``Predictor.segment``, the parts drawn from the landmarks in the image itself
    (an independent rendering at the image's resolution): the same pixels but for the edges that
    the 4x coarser masks blur, and the skin where it is to a third of an image pixel (one score
    pixel off would move it 3.5 pixels)."""
    size = 256
    _, masks = next(iter(pipeline.segmentation_dataset(faces, size, train=False, batch_size=2)))
    logits = 10 * tf.one_hot(masks, 7).numpy()
    seen = []

    def predict(crops):
        seen.append(len(crops))
        return logits[len(seen) - 1:len(seen)]

    predictor = Predictor(predict, size, 7, task="segmentation")
    for i in range(2):
        labels = predictor.segment(faces["image_path"][i], [faces["box"][i]])
        truth = render_part_mask(faces["points"][i], *labels.shape).numpy()
        x1, y1, x2, y2 = np.round(faces["box"][i]).astype(int)
        face = (slice(max(y1, 0), y2), slice(max(x1, 0), x2))
        assert (labels[face] == truth[face]).mean() > 0.95
        assert (labels == truth).mean() > 0.99
        skin_centre = np.argwhere(labels == 1).mean(0)
        assert np.abs(skin_centre - np.argwhere(truth == 1).mean(0)).max() < 0.75
    # many images batched as predict_many batches them: the same maps as one at a time
    constant = np.zeros((1, 16, 16, 7), np.float32)
    constant[..., 6] = 1
    predictor = Predictor(lambda crops: np.repeat(constant, len(crops), 0), 64, 7, task="segmentation")
    paths, boxes = list(faces["image_path"][:3]), [[faces["box"][0]], [], [faces["box"][2], faces["box"][1]]]
    many = predictor.segment_many(paths, boxes, batch_size=2)
    assert [m.shape for m in many] == [(220, 300)] * 3 and not many[1].any()
    for labels, path, image_boxes in zip(many, paths, boxes):
        np.testing.assert_array_equal(labels, predictor.segment(path, image_boxes))
    # the flip test on a model whose scores do not depend on the image changes nothing
    flipped = Predictor(lambda crops: np.repeat(constant, len(crops), 0), 64, 7, use_flip_test=True, task="segmentation")
    np.testing.assert_array_equal(flipped.segment(paths[2], boxes[2]), many[2])
    # each task's method refuses the other kind of model
    with pytest.raises(InputError, match=r"predict\(\) needs a heatmaps model.*use segment\(\)"):
        predictor.predict(paths[0], boxes[0])
    with pytest.raises(InputError, match=r"segment\(\) needs a segmentation model"):
        Predictor(predict, 64, 68).segment_many(paths, boxes)
    with pytest.raises(ValueError, match="task='parts' must be one of"):
        Predictor.from_path("missing.tflite", task="parts")


def test_part_overlay_colours_the_parts_only():
    image = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 5], [6, 0, 0]])
    picture = np.asarray(visualize.overlay_mask(image, mask, opacity=0.5))
    expected = image.astype(np.float64)
    for (row, column), label in np.ndenumerate(mask):
        if label:
            expected[row, column] = np.round(0.5 * 100 + 0.5 * visualize.PART_COLOURS[label])
    np.testing.assert_array_equal(picture, expected)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 2\) for an image of shape \(2, 3, 3\)"):
        visualize.overlay_mask(image, mask.T)


@pytest.mark.slow
def test_predictor_loads_keras_and_tflite_files(faces, tmp_path):
    model = BinaryHourglass(68, width=32, input_size=64, depth=2)
    model.save(tmp_path / "m.keras")
    export.convert(model, str(tmp_path / "m.tflite"))
    from_keras = Predictor.from_path(str(tmp_path / "m.keras"))
    from_tflite = Predictor.from_path(str(tmp_path / "m.tflite"))
    assert (from_tflite.input_size, from_tflite.num_landmarks) == (64, 68)
    a, _ = from_keras.predict(faces["image_path"][0], [faces["box"][0]])
    b, _ = from_tflite.predict(faces["image_path"][0], [faces["box"][0]])
    assert a.shape == b.shape == (1, 68, 2)


def test_a_predictor_takes_its_task_and_boxes_from_its_outputs_unless_told():
    """Not told: 7 output channels are the part classes (segmentation, face boxes), 16 MPII's
    joints (person boxes), 68 and 34 face landmarks; what is given overrides it."""
    image = np.zeros((200, 300, 3), np.uint8)
    box = [100, 40, 180, 160]

    def predictor(k, **options):
        return Predictor(lambda crops: np.zeros((len(crops), 16, 16, k), np.float32), 64, k, **options)

    def crop_matrix(p):
        return p._prepare(image, [box], "image")[1][0]

    person = crop_matrices(*[np.array([v]) for v in cropping.person_crop(box)], 64)[0]
    face = crop_matrices(*[np.array([v]) for v in face_crop(box)], 64)[0]
    assert not np.allclose(person, face)
    for k, task, kind, matrix in ((68, "heatmaps", "face", face), (34, "heatmaps", "face", face),
                                  (16, "heatmaps", "person", person), (7, "segmentation", "face", face)):
        made = predictor(k)
        assert (made.task, made.box_kind) == (task, kind), k
        np.testing.assert_allclose(crop_matrix(made), matrix, rtol=1e-6)
    np.testing.assert_allclose(crop_matrix(predictor(16, box_kind="face")), face, rtol=1e-6)
    np.testing.assert_allclose(crop_matrix(predictor(68, box_kind="person")), person, rtol=1e-6)
    with pytest.raises(InputError, match="person boxes are not detected"):
        predictor(16).predict(image)
    assert predictor(16).predict(image, [box])[0].shape == (1, 16, 2)
    assert predictor(7).segment(image, [box]).shape == (200, 300)
    with pytest.raises(InputError, match=r"predict\(\) needs a heatmaps model; this predictor's task is 'segmentation'"):
        predictor(7).predict(image, [box])
    assert predictor(7, task="heatmaps").predict(image, [box])[0].shape == (1, 7, 2)
    with pytest.raises(ValueError, match="segments faces: box_kind must be 'face'"):
        predictor(7, box_kind="person")
    # the flip test's channel permutation follows the task
    np.testing.assert_array_equal(predictor(16, use_flip_test=True).permutation, layouts.MPII_FLIP)
    np.testing.assert_array_equal(predictor(7, use_flip_test=True).permutation, np.arange(7))
    np.testing.assert_array_equal(layouts.flip_permutation(7, "segmentation"), np.arange(7))
    with pytest.raises(ValueError, match="no left/right permutation for 7 points"):
        predictor(7, task="heatmaps", use_flip_test=True)
    with pytest.raises(ValueError, match="task='pose' must be 'heatmaps' or 'segmentation'"):
        layouts.flip_permutation(16, "pose")


def test_image_files_are_read_upright_and_16_bit_grey_is_scaled(tmp_path):
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :, 0] = 255  # a red band along the top of the stored pixels
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6  # EXIF orientation 6: a viewer turns it a quarter clockwise (a phone held upright)
    picture.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_rgb(str(tmp_path / "phone.jpg"))
    assert upright.shape == (60, 40, 3)  # as shown: the top band is now the right-hand side
    assert upright[:, -8:, 0].mean() > 240 and upright[:, :28, 0].mean() < 15
    assert load_rgb(Image.open(tmp_path / "phone.jpg")).shape == (40, 60, 3)  # a PIL image as it is
    Image.fromarray(stored).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(load_rgb(str(tmp_path / "plain.png")), stored)
    grey = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    loaded = load_rgb(str(tmp_path / "grey16.png"))
    expected = np.round(grey.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert loaded.shape == (64, 64, 3) and (loaded == expected[..., None]).all()


def test_predictor_bad_input_names_it(faces, tmp_path):
    predictor = Predictor.from_model(BinaryHourglass(68, width=32, input_size=64, depth=2))
    path = faces["image_path"][0]
    with pytest.raises(InputError, match="zero or negative size"):
        predictor.predict(path, [[10, 10, 10, 50]])
    with pytest.raises(InputError, match="outside the 300x220 image"):
        predictor.predict(path, [[400, 10, 500, 100]])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(InputError, match="broken.jpg: image cannot be decoded"):
        predictor.predict(str(broken), [[0, 0, 10, 10]])
    with pytest.raises(InputError, match="missing.png: image file not found"):
        predictor.predict(str(tmp_path / "missing.png"), [[0, 0, 10, 10]])
    with pytest.raises(InputError, match="expected an \\(H, W, 3\\) image"):
        predictor.predict(np.zeros((4, 4, 4, 3)), [[0, 0, 2, 2]])
    with pytest.raises(InputError, match="image: an image of no pixels \\(shape \\(0, 160, 3\\)\\)"):
        predictor.predict(np.zeros((0, 160, 3), np.uint8), [[0, 0, 1, 1]])
    with pytest.raises(InputError, match="2 images but 1 box lists"):
        predictor.predict_many([path, path], [[[0, 0, 5, 5]]])
    with pytest.raises(InputError, match="scan_7: expected an \\(H, W, 3\\) image"):  # arrays named by the caller
        predictor.predict_many([path, np.zeros((4, 4, 4, 3))], [[[0, 0, 5, 5]]] * 2, names=[path, "scan_7"])
    # boxes are checked, not reshaped: one 8-number box is not two boxes
    for boxes, message in (([[0, 0, 10, 10, 20, 20, 30, 30]], r"shape \(1, 8\)"), ([[1, 2, 3]], r"shape \(1, 3\)"),
                           ([0, 0, 10, 10], r"shape \(4,\)"), ([None], "x1, y1, x2, y2"),
                           ([["a", "b", "c", "d"]], "x1, y1, x2, y2"), ([[0, 0, np.nan, 10]], "NaN")):
        with pytest.raises(InputError, match=message):
            predictor.predict(path, boxes)
    # image arrays are converted by their type's range
    np.testing.assert_array_equal(load_rgb(np.full((2, 2, 3), 65535, np.uint16)), np.full((2, 2, 3), 255, np.uint8))
    np.testing.assert_array_equal(load_rgb(np.full((2, 2, 3), 0.5)), np.full((2, 2, 3), 128, np.uint8))
    with pytest.raises(InputError, match=r"float images must be in \[0, 1\]"):
        load_rgb(np.full((2, 2, 3), 200.0))
    with pytest.raises(InputError, match="negative values"):
        load_rgb(np.full((2, 2, 3), -1, np.int16))
    # a Keras model of the wrong shape is refused up front, like a .tflite one
    x = tf.keras.Input((32, 32, 3))
    tf.keras.Model(x, tf.keras.layers.Conv2D(5, 1)(x)).save(tmp_path / "full_size.keras")
    with pytest.raises(InputError, match=r"full_size.keras: not a larq_landmarks model \(input \(None, 32, 32, 3\)"):
        Predictor.from_path(str(tmp_path / "full_size.keras"))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"0123TFL3" + b"\x00" * 32)
    with pytest.raises(export.NotOurModelError, match="junk.tflite"):
        Predictor.from_path(str(junk))
    (tmp_path / "folder.tflite").mkdir()
    for engine in ("auto", "runtime", "lce"):
        with pytest.raises(InputError, match="folder.tflite: a folder, not a .tflite file"):
            Predictor.from_path(str(tmp_path / "folder.tflite"), engine=engine)
    # a valid TFLite model that is not ours: wrong input/output layout
    dense = tf.keras.Sequential([tf.keras.Input((4,), batch_size=1), tf.keras.layers.Dense(2)])
    (tmp_path / "dense.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(dense).convert())
    with pytest.raises(InputError, match="dense.tflite: not a larq_landmarks model"), \
            pytest.warns(UserWarning, match="FULLY_CONNECTED is not supported by larq_landmarks.runtime.*with LCE's "
                                            "interpreter instead"):  # engine "auto" falls back, then the check
        Predictor.from_path(str(tmp_path / "dense.tflite"))


# run in a fresh Python where TensorFlow, Keras, Larq, LCE, SciPy and the face detector cannot be
# imported, as on a deployment or GPU machine
_WITHOUT_TENSORFLOW = no_tensorflow.PRELUDE + """
import json

from larq_landmarks import cli
from larq_landmarks.predictor import Predictor

model, image, out, dense = sys.argv[1:]
found = {"predict": cli.main(["predict", image, "--model", model, "--box", "40,30,260,250", "--out", out])}
predictor = Predictor.from_path(model, engine="runtime")
found["many"] = [points.tolist() for points, _ in predictor.predict_many([image, image], [[[40, 30, 260, 250]], []])]
parts = Predictor.from_path(model, engine="runtime", task="segmentation")  # the 68 heatmaps read as class scores
found["parts"] = int(parts.segment(image, [[40, 30, 260, 250]]).sum(dtype="int64"))
for call in (lambda: Predictor.from_path(model, engine="lce"),
             lambda: cli.main(["predict", image, "--model", model, "--box", "1,1,9,9", "--engine", "lce", "--out", out]),
             lambda: cli.main(["predict", image, "--model", model, "--out", out]),  # no boxes: detection
             lambda: Predictor.from_path(dense)):  # engine "auto", an op the runtime lacks: no fallback
    try:
        call()
    except (ImportError, SystemExit, ValueError) as error:
        found.setdefault("errors", []).append(str(error))
found["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in MISSING)
print(json.dumps(found))
"""


def test_converted_models_predict_without_tensorflow(small_file, faces, tmp_path):
    """A ``.tflite`` run by the bit-packed runtime needs no TensorFlow, Larq, LCE or SciPy:
    ``Predictor`` and ``larq-landmarks predict`` find the landmarks they find with TensorFlow
    installed, import none of those packages, and asking for LCE's interpreter or for face
    detection is a clear error."""
    import json
    import subprocess
    import sys

    image = faces["image_path"][0]
    dense = tf.keras.Sequential([tf.keras.Input((4,), batch_size=1), tf.keras.layers.Dense(2)])
    (tmp_path / "dense.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(dense).convert())
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, small_file, image, str(tmp_path),
                          str(tmp_path / "dense.tflite")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["imported"] == [] and found["predict"] == 0
    expected, _ = Predictor.from_path(small_file).predict(image, [[40, 30, 260, 250]])
    written = json.loads((tmp_path / "landmarks.json").read_text())[image]["landmarks"]
    np.testing.assert_allclose(written, expected, atol=1e-4)
    np.testing.assert_allclose(found["many"][0], expected, atol=1e-4)
    assert found["many"][1] == []
    parts = Predictor.from_path(small_file, task="segmentation").segment(image, [[40, 30, 260, 250]])
    assert found["parts"] == int(parts.astype(np.int64).sum()) > 0
    lce, command_lce, detection, no_fallback = found["errors"]
    assert "LCE's interpreter is not installed" in lce and "engine='runtime' or 'cuda'" in lce
    assert command_lce.startswith("larq-landmarks predict: LCE's interpreter is not installed")
    assert detection.startswith("larq-landmarks predict: face detection is not installed") and "--box" in detection
    assert "FULLY_CONNECTED is not supported" in no_fallback and "the fallback, is not installed" in no_fallback


def test_heatmap_nme_keras_metric_matches_hand_computation():
    truth = np.zeros((2, 68, 2), np.float32) + 20
    truth[:, 36] = [10, 20]
    truth[:, 45] = [30, 20]  # inter-ocular 20 heatmap pixels
    predicted = truth + np.array([2.0, 0.0], np.float32)  # every point 2 px off
    size = 64
    ones = np.ones((2, 68))
    metric = keras_metrics.HeatmapNME()
    metric.update_state(hm.render_heatmaps(truth, ones, size), hm.render_heatmaps(predicted, ones, size))
    assert float(metric.result()) == pytest.approx(2.0 / 20.0)
    by_size = keras_metrics.HeatmapNME("heatmap_size")
    by_size.update_state(hm.render_heatmaps(truth, ones, size), hm.render_heatmaps(predicted, ones, size))
    assert float(by_size.result()) == pytest.approx(2.0 / 64.0)


def test_heatmap_pck_keras_metric_matches_hand_computation():
    truth = np.full((2, 16, 2), 30.0, np.float32)
    offsets = np.zeros((2, 16, 2), np.float32)
    offsets[0, :4, 0] = [3.0, 4.0, 7.0, 0.0]  # 64 px heatmaps: PCK@0.5 allows 3.2 px, @1.0 6.4 px
    offsets[1, :3, 1] = [-3.0, -5.0, 2.0]
    visible = np.ones((2, 16))
    visible[0, 1] = visible[1, 2] = 0  # empty targets: left out, whatever is predicted
    targets = hm.render_heatmaps(truth, visible, 64)
    outputs = hm.render_heatmaps(truth + offsets, np.ones((2, 16)), 64)
    strict, loose = keras_metrics.HeatmapPCK(), keras_metrics.HeatmapPCK(1.0)
    for metric in (strict, loose):
        metric.update_state(targets[:1], outputs[:1])  # pooled over batches and joints
        metric.update_state(targets[1:], outputs[1:])
    # 30 visible; wrong at 0.5: 7 px (image 0), 5 px (image 1); at 1.0: 7 px
    assert float(strict.result()) == pytest.approx(28 / 30)
    assert float(loose.result()) == pytest.approx(29 / 30)
    copy = keras_metrics.HeatmapPCK.from_config(loose.get_config())
    assert copy.threshold == 1.0 and copy.name == "pck"
    strict.reset_state()
    assert float(strict.result()) == 0.0
    with pytest.raises(ValueError, match="threshold=0 must be positive"):
        keras_metrics.HeatmapPCK(0)


def test_keras_metrics_work_in_compile_and_evaluate_and_survive_saving(tmp_path):
    model = BinaryHourglass(68, width=32, input_size=64, depth=1)
    model.compile(optimizer="rmsprop", loss="mse", metrics=[keras_metrics.HeatmapNME("heatmap_size")])
    images = np.random.default_rng(0).uniform(size=(4, 64, 64, 3)).astype(np.float32)
    targets = hm.render_heatmaps(np.full((4, 68, 2), 8.0, np.float32), np.ones((4, 68)), 16).numpy()
    result = model.evaluate(images, targets, verbose=0, return_dict=True)
    assert 0 <= result["nme"] < 1.5
    model.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(tmp_path / "m.keras")
    assert loaded.evaluate(images, targets, verbose=0, return_dict=True)["nme"] == pytest.approx(result["nme"])


def test_part_mean_iu_matches_the_plain_function():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 7, size=(2, 16, 16))
    logits = rng.normal(size=(2, 16, 16, 7)).astype(np.float32)
    metric = keras_metrics.PartMeanIU()
    metric.update_state(truth, logits)
    expected = metrics.segmentation_scores(logits.argmax(-1), truth, 7)["mean_iu"] / 100
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)


def test_landmark_overlay_puts_points_on_the_features(tmp_path):
    image = np.zeros((60, 80, 3), np.uint8)
    points = np.array([[10.0, 10.0], [70.0, 50.0]])
    truth = np.array([[40.0, 30.0]])
    picture = np.asarray(visualize.draw_landmarks(image, points, truth))
    assert tuple(picture[10, 10]) == (40, 255, 40) and tuple(picture[50, 70]) == (40, 255, 40)
    assert tuple(picture[30, 40]) == (255, 40, 40)
    assert picture[30, 5].sum() == 0
    mask = np.array([[0, 1], [5, 6]])
    np.testing.assert_array_equal(np.asarray(visualize.colour_mask(mask))[1, 1], visualize.PART_COLOURS[6])
    ced = visualize.ced_plot({"a": metrics.ced(np.array([0.01, 0.02, 0.05]), 0.08)})
    path = visualize.save_png(ced, str(tmp_path / "ced.png"))
    assert Image.open(path).size == (480, 360)
    # bad arguments named (they were 'too many values to unpack', an IndexError, and an
    # IsADirectoryError from the rename after the picture was written)
    with pytest.raises(ValueError, match=r"points to draw must be \(N, 2\) x, y pixels, got shape \(2, 3\)"):
        visualize.draw_landmarks(image, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="grid needs at least one picture and one column, got 0"):
        visualize.grid([])
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder; give the file to write"):
        visualize.save_png(ced, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ced.png"]  # no temporary file left


@pytest.mark.slow  # over 10 s on 2 cores
def test_heatmap_images_callback_writes_tensorboard_images(tmp_path):
    model = BinaryHourglass(68, width=32, input_size=64, depth=1)
    model.compile(optimizer="rmsprop", loss="mse")
    images = np.random.default_rng(0).uniform(size=(4, 64, 64, 3)).astype(np.float32)
    targets = np.zeros((4, 16, 16, 68), np.float32)
    model.fit(images, targets, epochs=2, verbose=0, callbacks=[HeatmapImages(str(tmp_path), images)])
    tags = []
    for path in glob.glob(str(tmp_path / "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags += [(event.step, value.tag) for value in event.summary.value]
    assert sorted(tags) == [(0, "heatmaps"), (0, "landmarks"), (1, "heatmaps"), (1, "landmarks")]


# over 10 s on 2 cores; the fast tier covers mixed precision in test_models and test_export
@pytest.mark.slow
def test_predictor_runs_a_mixed_precision_model_as_its_float32_copy(faces, dtype_policy, tmp_path):
    """A model trained under mixed_bfloat16, in memory or saved: the Predictor runs its float32
    copy, so its landmarks are those of the float32-built network with the same weights (the file
    convert writes computes that network), not the bfloat16 computation's."""
    tf.keras.utils.set_random_seed(0)
    float32 = BinaryHourglass(68, width=32, input_size=64, depth=2)
    dtype_policy("mixed_bfloat16")
    mixed = BinaryHourglass(68, width=32, input_size=64, depth=2)
    mixed.set_weights(float32.get_weights())
    mixed.save(tmp_path / "mixed.keras")
    path, boxes = faces["image_path"][0], [[20, 20, 120, 130], [60, 40, 200, 180]]
    expected = Predictor.from_model(float32).predict(path, boxes)
    for predictor in (Predictor.from_model(mixed), Predictor.from_path(str(tmp_path / "mixed.keras"))):
        points, scores = predictor.predict(path, boxes)
        np.testing.assert_array_equal(points, expected[0])
        np.testing.assert_array_equal(scores, expected[1])
    crops = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    assert not np.array_equal(mixed.predict_on_batch(crops), float32.predict_on_batch(crops))  # bfloat16 differs
