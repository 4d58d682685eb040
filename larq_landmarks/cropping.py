"""Where a model's input crop lies in an image, and cutting it out, without TensorFlow (NumPy, and
the bit-packed runtime's C++ kernels for the cutting: :func:`warp_crops`).

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
    ``ImageProjectiveTransformV3`` and :func:`warp_crops` take them: ``(N, 8)`` for ``(N, 3, 3)``.

    Upright crops (:func:`crop_matrices`, mirrored or not) get exactly the float32 values that the
    pipeline's ``tf.linalg.inv`` gives (``1 / a`` and ``-t * (1 / a)``), so that their crops are
    the pipeline's bit for bit; any other matrix is inverted in float64."""
    matrices = np.asarray(matrices, np.float32).reshape(-1, 3, 3)
    inverse = np.linalg.inv(matrices.astype(np.float64))
    params = (inverse.reshape(-1, 9)[:, :8] / inverse[:, 2, 2:3]).astype(np.float32)
    upright = ((matrices[:, 0, 1] == 0) & (matrices[:, 1, 0] == 0) & (matrices[:, 2, 0] == 0)
               & (matrices[:, 2, 1] == 0) & (matrices[:, 2, 2] == 1))
    upright_params = np.zeros((int(upright.sum()), 8), np.float32)
    for row, scale, shift in ((0, 0, 2), (1, 4, 5)):  # x = p0 * x' + p2, y = p4 * y' + p5
        reciprocal = np.float32(1) / matrices[upright, row, row]
        upright_params[:, scale] = reciprocal
        upright_params[:, shift] = -matrices[upright, row, 2] * reciprocal
    params[upright] = upright_params
    return params


def warp_crops(image: np.ndarray, params: np.ndarray, size: int) -> np.ndarray:
    """Crops of one ``(H, W, C)`` uint8 image: ``(N, size, size, C)`` float32 in [0, 1].

    Sampled as TensorFlow's ``ImageProjectiveTransformV3`` samples (bilinear, 0 outside the
    image, float32 arithmetic in its order; the pipeline's crops): crop pixel ``(x, y)`` reads the
    image at ``((p0 x + p1 y + p2) / d, (p3 x + p4 y + p5) / d)`` with ``d = p6 x + p7 y + 1``.
    Computed by the runtime's C++ kernels (on their threads; an upright crop's coordinates a column
    and a row at a time: a 256-pixel crop 5.5x faster than in NumPy here, docs/benchmarks.md);
    :func:`warp_crops_numpy` computes the same, bit for bit.

    Args:
        image: the image, uint8 (scaled by 1/255 as ``tf.image.convert_image_dtype`` does).
        params: ``(N, 8)`` sampling parameters, e.g. ``sampling_params(matrices)``.
        size: the crops' side in pixels.
    """
    from larq_landmarks.runtime import kernels

    image = _checked_image(image)
    return kernels.load().warp_crops(image, np.asarray(params, np.float32).reshape(-1, 8), int(size))


def _checked_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected an (H, W, C) uint8 array, got {image.dtype} {image.shape}")
    return image


def warp_crops_numpy(image: np.ndarray, params: np.ndarray, size: int) -> np.ndarray:
    """:func:`warp_crops` in NumPy (its reference)."""
    image = _checked_image(image)
    height, width, channels = image.shape
    pixels = image.reshape(-1, channels)
    t = np.asarray(params, np.float32).reshape(-1, 8)
    steps = np.arange(size, dtype=np.float32)
    if not t[:, [1, 3, 6, 7]].any():  # upright crops: x follows the column alone, y the row alone
        # (the same float32 values: t1 * y and t3 * x are zeros and the projection is exactly 1)
        x = t[:, 0, None, None] * steps[None, None, :] + t[:, 2, None, None]  # (N, 1, S)
        y = t[:, 4, None, None] * steps[None, :, None] + t[:, 5, None, None]  # (N, S, 1)
    else:
        ys, xs = np.meshgrid(steps, steps, indexing="ij")
        t = t[:, :, None, None]
        with np.errstate(divide="ignore", invalid="ignore"):  # d = 0: nothing is read there
            projection = t[:, 6] * xs + t[:, 7] * ys + np.float32(1)
            x = (t[:, 0] * xs + t[:, 1] * ys + t[:, 2]) / projection
            y = (t[:, 3] * xs + t[:, 4] * ys + t[:, 5]) / projection
    x0, y0 = np.floor(x), np.floor(y)
    x1, y1 = x0 + 1, y0 + 1

    def within(v, limit):  # whether each coordinate lies in [0, limit), and it as an index (0 if not)
        inside = (v >= 0) & (v < limit)
        return inside, np.where(inside, v, 0).astype(np.intp)

    (in_y0, row0), (in_y1, row1), (in_x0, col0), (in_x1, col1) = (
        within(y0, height), within(y1, height), within(x0, width), within(x1, width))

    def at(row, col):  # the image at (row, col), scaled as tf.image.convert_image_dtype scales uint8
        return np.take(pixels, row * width + col, axis=0).astype(np.float32) * np.float32(1 / 255)

    # A corner outside the image reads 0 in TensorFlow; here its weight is 0 instead (a finite value
    # times 0 adds the same +0), so that the masks stay one-dimensional for upright crops.
    zero = np.float32(0)
    wx0, wx1 = (np.where(inside, w, zero)[..., None] for inside, w in ((in_x0, x1 - x), (in_x1, x - x0)))
    wy0, wy1 = (np.where(inside, w, zero)[..., None] for inside, w in ((in_y0, y1 - y), (in_y1, y - y0)))
    top = wx0 * at(row0, col0) + wx1 * at(row0, col1)
    bottom = wx0 * at(row1, col0) + wx1 * at(row1, col1)
    return wy0 * top + wy1 * bottom


def crop_points_to_image(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """``(N, K, 2)`` points in crop pixels -> image pixels, given each crop's ``(N, 3, 3)`` image ->
    crop matrix."""
    inverse = np.linalg.inv(np.asarray(matrices, np.float64).reshape(-1, 3, 3))
    points = np.asarray(points, np.float64)
    return (np.einsum("nij,nkj->nki", inverse[:, :2, :2], points) + inverse[:, None, :2, 2]).astype(np.float32)


PIXELS_A_BAND = 1 << 18  # image pixels mapped at once by crop_labels_to_image: 8 MB a class plane


def crop_labels_to_image(logits: np.ndarray, matrices: np.ndarray, input_size: int, height: int,
                         width: int) -> np.ndarray:
    """Per-pixel class scores of crops -> one ``(height, width)`` uint8 class map of the image.

    Each image pixel centre inside a crop reads that crop's scores bilinearly (score pixel centres
    sit at crop pixels ``(u + 0.5) * stride - 0.5``, as the pipeline renders its masks; the edge
    values beyond the outermost centres) and takes their arg-max (ties: the lower class). Where
    crops overlap, the crop least sure that the pixel is background decides (class 0's softmax
    probability, read bilinearly as the scores are); pixels outside every crop are background.

    Args:
        logits: ``(N, h, w, C)`` a segmentation model's outputs for N crops (class 0: background).
        matrices: ``(N, 3, 3)`` image -> crop matrices of the crops (:func:`crop_matrices`).
        input_size: the crops' side in pixels; ``input_size / w`` is the scores' stride.
        height, width: the image's size.
    """
    logits = np.asarray(logits, np.float32)
    matrices = np.asarray(matrices, np.float64).reshape(-1, 3, 3)
    if logits.ndim != 4 or len(logits) != len(matrices):
        raise ValueError(f"logits: expected (N, h, w, C) for {len(matrices)} crops, got shape {logits.shape}")
    labels = np.zeros((height, width), np.uint8)
    background = np.ones((height, width), np.float32)  # the deciding crop's background probability
    _, rows, columns, _ = logits.shape
    edges = np.array([-0.5, input_size - 0.5])
    exponentials = np.exp(logits - logits.max(-1, keepdims=True))
    probability = exponentials[..., :1] / exponentials.sum(-1, keepdims=True)  # of background
    # per crop (C + 1, h, w): the class scores, then the background probability, planes contiguous
    planes = np.concatenate([logits, probability], -1).transpose(0, 3, 1, 2)
    for scores, matrix in zip(planes, matrices):
        inverse = np.linalg.inv(matrix)
        corners = np.array([[x, y, 1.0] for x in edges for y in edges]) @ inverse.T
        corners = corners[:, :2] / corners[:, 2:]
        x0, y0 = np.maximum(np.ceil(corners.min(0) - 1), 0).astype(int)
        x1, y1 = np.minimum(np.floor(corners.max(0) + 1), [width - 1, height - 1]).astype(int)
        if x1 < x0 or y1 < y0:
            continue
        xs = np.arange(x0, x1 + 1, dtype=np.float64)
        upright = matrix[0, 1] == matrix[1, 0] == matrix[2, 0] == matrix[2, 1] == 0 and matrix[2, 2] == 1
        if upright:  # x alone gives the crop column and y the row: interpolate along each in turn
            cx = matrix[0, 0] * xs + matrix[0, 2]
            u0, u1, fu = _bilinear(cx, input_size / columns, columns)
            along_x = scores[:, :, u0] * (1 - fu) + scores[:, :, u1] * fu  # (C + 1, h, region width)
        band = max(1, PIXELS_A_BAND // len(xs))  # rows at a time: a whole photo's crop would take GBs
        for top in range(y0, y1 + 1, band):
            ys = np.arange(top, min(top + band, y1 + 1), dtype=np.float64)
            if upright:
                cy = matrix[1, 1] * ys + matrix[1, 2]
                v0, v1, fv = _bilinear(cy, input_size / rows, rows)
                sampled = along_x[:, v0] * (1 - fv)[:, None] + along_x[:, v1] * fv[:, None]
                inside = _within(cy, input_size)[:, None] & _within(cx, input_size)[None, :]
            else:
                x, y = np.meshgrid(xs, ys)
                projection = matrix[2, 0] * x + matrix[2, 1] * y + matrix[2, 2]
                cx, cy = ((matrix[i, 0] * x + matrix[i, 1] * y + matrix[i, 2]) / projection for i in (0, 1))
                (u0, u1, fu), (v0, v1, fv) = (_bilinear(cx, input_size / columns, columns),
                                              _bilinear(cy, input_size / rows, rows))
                sampled = ((1 - fv) * ((1 - fu) * scores[:, v0, u0] + fu * scores[:, v0, u1])
                           + fv * ((1 - fu) * scores[:, v1, u0] + fu * scores[:, v1, u1]))
                inside = _within(cx, input_size) & _within(cy, input_size)
            crop_background = sampled[-1]
            region = (slice(top, top + len(ys)), slice(x0, x1 + 1))
            decides = inside & (crop_background < background[region])
            labels[region][decides] = sampled[:-1].argmax(0).astype(np.uint8)[decides]
            background[region][decides] = crop_background[decides]
    return labels


def _within(crop_coordinates: np.ndarray, input_size: int) -> np.ndarray:
    """Whether crop pixel coordinates lie in the crop, ``[-0.5, input_size - 0.5)``."""
    return (crop_coordinates >= -0.5) & (crop_coordinates < input_size - 0.5)


def _bilinear(crop_coordinates: np.ndarray, stride: float, count: int):
    """The two score pixels around crop coordinates and the second one's weight (float32), along
    one axis of ``count`` score pixels; beyond the outermost centres the edge value."""
    position = np.clip((crop_coordinates + 0.5) / stride - 0.5, 0, count - 1)
    first = np.clip(np.floor(position), 0, max(count - 2, 0)).astype(np.intp)
    return first, np.minimum(first + 1, count - 1), (position - first).astype(np.float32)
