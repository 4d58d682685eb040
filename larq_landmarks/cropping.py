"""Where a model's input crop lies in an image, and cutting it out, in NumPy alone.

The :class:`~larq_landmarks.predictor.Predictor` cuts its crops with these, so that a converted
model runs on images with the bit-packed runtime on a machine without TensorFlow. The ``tf.data``
pipeline cuts its (augmented) crops in the graph with the same geometry
(:func:`larq_landmarks.datasets.pipeline.crop_matrix` and ``warp_image``, TensorFlow's
``ImageProjectiveTransformV3``); the tests hold the two to each other.

Coordinates are ``(x, y)`` pixels with pixel centres at integers. A crop's 3x3 ``matrix`` maps
image pixels to crop pixels.
"""
from typing import Tuple

import numpy as np


def face_crop(box) -> Tuple[np.ndarray, float]:
    """Centre and scale of a face box ``x1, y1, x2, y2`` as face-alignment takes them: the box
    centre moved up by 0.12 of the height, scale ``(w + h) / 195`` (the crop side is ``200 * scale``)."""
    x1, y1, x2, y2 = [float(v) for v in box]
    w, h = x2 - x1, y2 - y1
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2 - 0.12 * h], np.float32), (w + h) / 195.0


def person_crop(box) -> Tuple[np.ndarray, float]:
    """Centre and scale of a person box: the box centre and 1.25 x its longer side / 200."""
    x1, y1, x2, y2 = [float(v) for v in box]
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2], np.float32), 1.25 * max(x2 - x1, y2 - y1) / 200.0


def crop_matrices(centres, scales, input_size: int) -> np.ndarray:
    """``(N, 3, 3)`` float32 image -> crop matrices of upright, unmirrored crops.

    Args:
        centres: ``(N, 2)`` crop centres ``(x, y)`` in image pixels.
        scales: ``(N,)``: each crop's side is ``200 * scale`` image pixels.
        input_size: the crop's side in pixels (the model's input size).
    """
    centres = np.asarray(centres, np.float32).reshape(-1, 2)
    zoom = np.float32(input_size) / (np.float32(200) * np.asarray(scales, np.float32).reshape(-1))
    half = (np.float32(input_size) - np.float32(1)) / np.float32(2)
    matrices = np.zeros((len(centres), 3, 3), np.float32)
    matrices[:, 0, 0] = matrices[:, 1, 1] = zoom
    matrices[:, 0, 2] = half - zoom * centres[:, 0]
    matrices[:, 1, 2] = half - zoom * centres[:, 1]
    matrices[:, 2, 2] = 1
    return matrices


def sampling_params(matrices: np.ndarray) -> np.ndarray:
    """The 8 projective parameters (crop pixel -> image pixel) of each image -> crop matrix, as
    ``ImageProjectiveTransformV3`` and :func:`warp_crops` take them: ``(N, 8)`` for ``(N, 3, 3)``."""
    inverse = np.linalg.inv(np.asarray(matrices, np.float64).reshape(-1, 3, 3))
    return (inverse.reshape(-1, 9)[:, :8] / inverse[:, 2, 2:3]).astype(np.float32)


def warp_crops(image: np.ndarray, params: np.ndarray, size: int) -> np.ndarray:
    """Crops of one ``(H, W, C)`` uint8 image: ``(N, size, size, C)`` float32 in [0, 1].

    Sampled as TensorFlow's ``ImageProjectiveTransformV3`` samples (bilinear, 0 outside the
    image, float32 arithmetic in its order; the pipeline's crops): crop pixel ``(x, y)`` reads the
    image at ``((p0 x + p1 y + p2) / d, (p3 x + p4 y + p5) / d)`` with ``d = p6 x + p7 y + 1``.

    Args:
        image: the image, uint8 (scaled by 1/255 as ``tf.image.convert_image_dtype`` does).
        params: ``(N, 8)`` sampling parameters, e.g. ``sampling_params(matrices)``.
        size: the crops' side in pixels.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected an (H, W, C) uint8 array, got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    pixels = image.reshape(-1, channels)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    t = np.asarray(params, np.float32).reshape(-1, 8)[:, :, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):  # d = 0: no pixel is read there
        projection = t[:, 6] * xs + t[:, 7] * ys + np.float32(1)
        x = (t[:, 0] * xs + t[:, 1] * ys + t[:, 2]) / projection
        y = (t[:, 3] * xs + t[:, 4] * ys + t[:, 5]) / projection
    x0, y0 = np.floor(x), np.floor(y)
    x1, y1 = x0 + 1, y0 + 1

    def at(rows, cols):  # the image at integer (rows, cols), 0 outside it
        inside = (rows >= 0) & (cols >= 0) & (rows < height) & (cols < width)
        index = np.where(inside, rows, 0).astype(np.intp) * width + np.where(inside, cols, 0).astype(np.intp)
        value = pixels[index].astype(np.float32) * np.float32(1 / 255)
        value[~inside] = 0
        return value

    wx0, wx1, wy0, wy1 = (w[..., None] for w in (x1 - x, x - x0, y1 - y, y - y0))
    top = wx0 * at(y0, x0) + wx1 * at(y0, x1)
    bottom = wx0 * at(y1, x0) + wx1 * at(y1, x1)
    return wy0 * top + wy1 * bottom


def crop_points_to_image(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """``(N, K, 2)`` points in crop pixels -> image pixels, given each crop's ``(N, 3, 3)`` image ->
    crop matrix."""
    inverse = np.linalg.inv(np.asarray(matrices, np.float64).reshape(-1, 3, 3))
    points = np.asarray(points, np.float64)
    return (np.einsum("nij,nkj->nki", inverse[:, :2, :2], points) + inverse[:, None, :2, 2]).astype(np.float32)
