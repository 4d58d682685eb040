"""tf.data pipelines: annotation columns -> (image, heatmaps) or (image, mask) batches.

All per-sample work (decoding, the crop warp, augmentation, heatmaps, masks) runs in the
TensorFlow graph under ``map(num_parallel_calls=AUTOTUNE)``. Randomness is stateless, seeded by
``(seed, sample counter)``, so a pipeline is deterministic given its seed.

The crop (METHOD.md section 3): a square of ``200 * scale`` pixels around ``centre`` is mapped to
``input_size`` pixels. :func:`crop_matrix` gives the 3x3 matrix from image pixels to crop pixels;
evaluation pipelines keep it with each sample so predictions map back to the image.
"""
import dataclasses
import math
from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from larq_landmarks import heatmaps as hm
from larq_landmarks.datasets.segmentation import render_part_mask
from larq_landmarks.images import rgb_from_pil


@dataclasses.dataclass
class Augmentation:
    """The papers' augmentation (METHOD.md section 3).

    Attributes:
        scale_sigma / scale_range: crop scale factor ~ N(1, scale_sigma) clamped to the range.
        rotation_sigma / rotation_limit / rotation_probability: rotation in degrees
            ~ N(0, rotation_sigma) clamped to +-rotation_limit, applied with that probability.
        flip_probability: horizontal flip with the left/right landmark permutation.
        colour_range: per-channel colour multiplier ~ U(colour_range).
    """

    scale_sigma: float = 0.3
    scale_range: Sequence[float] = (0.7, 1.3)
    rotation_sigma: float = 30.0
    rotation_limit: float = 60.0
    rotation_probability: float = 0.4
    flip_probability: float = 0.5
    colour_range: Sequence[float] = (0.7, 1.3)

    def __post_init__(self):
        for name in ("scale_sigma", "rotation_sigma", "rotation_limit"):
            value = getattr(self, name)
            if not (np.isscalar(value) and np.isfinite(value) and value >= 0):
                raise ValueError(f"Augmentation {name}={value!r} must be a number >= 0")
        for name in ("rotation_probability", "flip_probability"):
            value = getattr(self, name)
            if not (np.isscalar(value) and 0 <= value <= 1):
                raise ValueError(f"Augmentation {name}={value!r} must be a probability in [0, 1]")
        for name, least in (("scale_range", "> 0"), ("colour_range", ">= 0")):
            value = tuple(getattr(self, name))
            if not (len(value) == 2 and all(np.isscalar(v) and np.isfinite(v) for v in value)
                    and (value[0] > 0 if least == "> 0" else value[0] >= 0) and value[0] <= value[1]):
                raise ValueError(f"Augmentation {name}={value!r} must be (low, high) with low {least} and low <= high")


NO_AUGMENTATION = Augmentation(0.0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, (1.0, 1.0))


def crop_matrix(centre, scale, input_size: int, rotation=0.0, flip=False) -> tf.Tensor:
    """3x3 float32 matrix mapping image pixels to crop pixels (``(..., 3, 3)`` for a batch).

    Args:
        centre: ``(..., 2)`` crop centre ``(x, y)`` in image pixels.
        scale: ``(...)``: the crop side is ``200 * scale`` image pixels.
        input_size: crop side in pixels.
        rotation: degrees; the image content turns counter-clockwise by this angle.
        flip: mirror the crop horizontally (``x -> input_size - 1 - x``).
    """
    centre = tf.cast(centre, tf.float32)
    zoom = tf.cast(input_size, tf.float32) / (200.0 * tf.cast(scale, tf.float32))
    angle = tf.cast(rotation, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(angle) * zoom, tf.sin(angle) * zoom
    half = (tf.cast(input_size, tf.float32) - 1.0) / 2.0
    # crop = zoom * R(-angle in image coordinates, y down) @ (p - centre) + half
    a, b = cos, sin
    c, d = -sin, cos
    tx = half - (a * centre[..., 0] + b * centre[..., 1])
    ty = half - (c * centre[..., 0] + d * centre[..., 1])
    sign = tf.where(tf.cast(flip, tf.bool), -1.0, 1.0)
    offset = tf.where(tf.cast(flip, tf.bool), 2.0 * half, 0.0)
    shape = tf.shape(tx)  # a batch's, where centre or scale has one

    def entries(*values):
        return tf.stack([tf.broadcast_to(v, shape) for v in values], -1)

    return tf.stack([
        entries(sign * a, sign * b, sign * tx + offset),
        entries(c, d, ty),
        entries(0.0, 0.0, 1.0),
    ], -2)


def transform_points(matrix: tf.Tensor, points: tf.Tensor) -> tf.Tensor:
    """Apply a 3x3 affine ``matrix`` (or a batch of them) to ``(..., K, 2)`` points."""
    matrix = tf.convert_to_tensor(matrix, tf.float32)
    points = tf.convert_to_tensor(points, tf.float32)
    linear = matrix[..., None, :2, :2]
    return tf.reduce_sum(linear * points[..., None, :], -1) + matrix[..., None, :2, 2]


def sampling_params(matrix: tf.Tensor) -> tf.Tensor:
    """The 8 projective parameters (crop pixel -> image pixel) that ``ImageProjectiveTransformV3``
    takes for an image -> crop ``matrix``, ``(..., 8)`` for ``(..., 3, 3)``."""
    inverse = tf.linalg.inv(matrix)
    flat = tf.reshape(inverse, tf.concat([tf.shape(inverse)[:-2], [9]], 0))
    return flat[..., :8] / inverse[..., 2, 2:3]


def warp_image(image: tf.Tensor, matrix: tf.Tensor, input_size: int) -> tf.Tensor:
    """Sample the crop of ``image`` (H, W, 3 float) given by ``matrix`` (image -> crop)."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=sampling_params(matrix)[None],
        output_shape=tf.constant([input_size, input_size], tf.int32),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]


def _decoded_by_tensorflow(data: tf.Tensor) -> tf.Tensor:
    """Whether ``tf.io.decode_image`` reads these bytes as Pillow does: PNG, GIF and WebP
    signatures, and uncompressed 24-bit BMP (of an 8-bit palette BMP TensorFlow reads the indices as
    grey; 1, 4 and 16 bits a pixel it refuses)."""
    head = tf.strings.substr(data, 0, 4)
    return tf.reduce_any(tf.stack([
        head == b"\x89PNG",
        head == b"GIF8",
        tf.logical_and(tf.strings.substr(data, 0, 2) == b"BM",
                       tf.strings.substr(data, 28, 6) == b"\x18\x00\x00\x00\x00\x00"),  # 24 bits, BI_RGB
        tf.logical_and(head == b"RIFF", tf.strings.substr(data, 8, 4) == b"WEBP"),
    ]))


def _is_16_bit_grey_png(data: tf.Tensor) -> tf.Tensor:
    """Whether these bytes are a PNG of 16-bit grey (its IHDR, the first chunk: bit depth 16,
    colour type 0), which Pillow opens as ``I;16`` and the predictor scales to 8 bits rounded."""
    return tf.logical_and(tf.strings.substr(data, 0, 4) == b"\x89PNG", tf.strings.substr(data, 24, 2) == b"\x10\x00")


def _decode_16_bit_grey_png(data: tf.Tensor) -> tf.Tensor:
    """A 16-bit grey PNG as uint8 RGB, scaled as ``images.scaled_to_uint8`` scales it (each value
    times 255 / 65535 in float64, rounded half to even; TensorFlow's own 8-bit decoding keeps the
    high byte, a level lower for 28% of values)."""
    grey = tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16), tf.float64) * (255.0 / 65535.0)
    return tf.tile(tf.cast(tf.round(grey), tf.uint8), [1, 1, 3])


def _decode_with_pillow(path) -> np.ndarray:
    # (given the path, not the file's bytes: called eagerly, numpy_function gives a string as a
    # numpy array whose value drops trailing NULs, the end of many a BMP and TIFF; in a graph, bytes)
    with Image.open(np.asarray(path).item().decode()) as image:
        return rgb_from_pil(image)


def load_image(path: tf.Tensor) -> tf.Tensor:
    """Read and decode an image file to float32 RGB in [0, 1].

    JPEG decodes in the graph with libjpeg's accurate integer transform, as Pillow decodes it (the
    predictor's decoder; TensorFlow's default, the fast transform, is 1 level off on average and up
    to 60 at quality 100); PNG (16-bit grey scaled to 8 bits as the predictor scales it), GIF, WebP
    and 24-bit BMP in the graph too; any other format Pillow reads (TIFF, PPM, JPEG 2000, other
    BMPs, ...) goes through Pillow, one file at a time, off the common path, 16-bit grey scaled to
    8 bits as the predictor does."""
    data = tf.io.read_file(path)
    image = tf.cond(
        tf.strings.substr(data, 0, 3) == b"\xff\xd8\xff",
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.cond(
            _decoded_by_tensorflow(data),
            lambda: tf.cond(_is_16_bit_grey_png(data), lambda: _decode_16_bit_grey_png(data),
                            lambda: tf.io.decode_image(data, channels=3, expand_animations=False)),
            lambda: tf.numpy_function(_decode_with_pillow, [path], tf.uint8, stateful=False),
        ),
    )
    image = tf.ensure_shape(image, [None, None, 3])
    return tf.image.convert_image_dtype(image, tf.float32)


def _random_transform(seed, scale, augmentation: Augmentation):
    seeds = tf.random.experimental.stateless_split(seed, 6)
    a = augmentation
    factor = 1.0 + a.scale_sigma * tf.random.stateless_normal([], seeds[0])
    factor = tf.clip_by_value(factor, a.scale_range[0], a.scale_range[1])
    rotation = tf.clip_by_value(a.rotation_sigma * tf.random.stateless_normal([], seeds[1]),
                                -a.rotation_limit, a.rotation_limit)
    rotation = tf.where(tf.random.stateless_uniform([], seeds[2]) < a.rotation_probability, rotation, 0.0)
    flip = tf.random.stateless_uniform([], seeds[3]) < a.flip_probability
    colour = tf.random.stateless_uniform([3], seeds[4], a.colour_range[0], a.colour_range[1])
    return scale * factor, rotation, flip, colour


def _crop_sample(features, input_size, flip_permutation, augmentation, seed):
    """Decode, crop, augment one sample: returns (image, crop points, visible, matrix)."""
    if augmentation is None:
        scale, rotation, flip, colour = features["scale"], 0.0, False, tf.ones([3])
    else:
        scale, rotation, flip, colour = _random_transform(seed, features["scale"], augmentation)
    matrix = crop_matrix(features["centre"], scale, input_size, rotation, flip)
    image = warp_image(load_image(features["image_path"]), matrix, input_size)
    image = tf.clip_by_value(image * colour, 0.0, 1.0)
    points = transform_points(matrix, features["points"])
    visible = features["visible"]
    if flip_permutation is not None:
        permutation = tf.constant(flip_permutation, tf.int32)
        points = tf.where(flip, tf.gather(points, permutation), points)
        visible = tf.where(flip, tf.gather(visible, permutation), visible)
    return image, points, visible, matrix


def _dataset(columns, seed, shuffle, repeat):
    data = tf.data.Dataset.from_tensor_slices(dict(columns))
    if shuffle:
        data = data.shuffle(len(columns["scale"]), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        data = data.repeat()
    return data.enumerate()


def landmark_dataset(
    columns: Dict[str, np.ndarray],
    input_size: int = 256,
    sigma: float = 1.5,
    train: bool = True,
    augmentation: Optional[Augmentation] = Augmentation(),
    flip_permutation: Optional[Sequence[int]] = None,
    seed: int = 0,
    batch_size: Optional[int] = None,
) -> tf.data.Dataset:
    """``(image, heatmaps)`` pairs for ``model.fit``.

    Args:
        columns: from :func:`larq_landmarks.datasets.to_columns`.
        input_size: crop side; heatmaps are ``input_size // 4``.
        sigma: Gaussian sigma in heatmap pixels.
        train: shuffle and repeat forever (pass ``steps_per_epoch`` to ``fit``); augment.
        augmentation: the random transform (``None``: only the crop). Needs
            ``flip_permutation`` when it flips.
        flip_permutation: left/right permutation (:func:`larq_landmarks.layouts.flip_permutation`).
        seed: makes shuffling and augmentation deterministic.
        batch_size: batch the output (with ``drop_remainder`` in training).

    Landmarks that are invisible or fall outside the crop get an all-zero heatmap.
    """
    _check_arguments(columns, input_size, batch_size, flip_permutation, sigma)
    augmentation = _augmentation_for(train, augmentation, flip_permutation)
    size = input_size // 4

    def make(index, features):
        image, points, visible, _ = _crop_sample(
            features, input_size, flip_permutation, augmentation, tf.stack([seed, index])
        )
        inside = tf.reduce_all((points >= -0.5) & (points <= input_size - 0.5), axis=-1)
        targets = hm.render_heatmaps(hm.input_to_heatmap(points), visible & inside, size, sigma)
        return image, targets

    data = _dataset(columns, seed, train, train).map(make, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(data, batch_size, train)


def segmentation_dataset(
    columns: Dict[str, np.ndarray],
    input_size: int = 256,
    train: bool = True,
    augmentation: Optional[Augmentation] = Augmentation(),
    flip_permutation: Optional[Sequence[int]] = None,
    seed: int = 0,
    batch_size: Optional[int] = None,
) -> tf.data.Dataset:
    """``(image, mask)`` pairs: 7-class facial part masks of side ``input_size // 4`` rendered
    from the (augmented) 68 landmarks. Arguments as :func:`landmark_dataset`."""
    _check_arguments(columns, input_size, batch_size, flip_permutation)
    augmentation = _augmentation_for(train, augmentation, flip_permutation)
    if columns["points"].shape[1] != 68:
        raise ValueError(f"segmentation masks need 68-point faces, got {columns['points'].shape[1]} points")
    size = input_size // 4

    def make(index, features):
        image, points, _, _ = _crop_sample(
            features, input_size, flip_permutation, augmentation, tf.stack([seed, index])
        )
        return image, render_part_mask(hm.input_to_heatmap(points), size, size)

    data = _dataset(columns, seed, train, train).map(make, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(data, batch_size, train)


def evaluation_dataset(
    columns: Dict[str, np.ndarray], input_size: int = 256, batch_size: Optional[int] = None
) -> tf.data.Dataset:
    """Unaugmented crops in file order with what is needed to map predictions back.

    Elements are dicts: ``image`` (crop), ``matrix`` (3x3 image -> crop), and every column
    (``points``, ``visible``, ``box``, extras, ...) unchanged, in original image pixels.
    """
    _check_arguments(columns, input_size, batch_size)

    def make(index, features):
        image, _, _, matrix = _crop_sample(features, input_size, None, None, None)
        return {**features, "image": image, "matrix": matrix}

    data = _dataset(columns, 0, False, False).map(make, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(data, batch_size, False)


COLUMNS = ("image_path", "points", "visible", "centre", "scale")  # what the pipelines read of to_columns' output


def _check_arguments(columns, input_size, batch_size, flip_permutation=None, sigma=1.0) -> None:
    """A ValueError naming the argument of a pipeline that cannot be built as asked."""
    missing = [key for key in COLUMNS if key not in columns]
    if missing:
        raise ValueError(f"columns lack {missing}: a pipeline reads {list(COLUMNS)} (readers.to_columns gives them)")
    lengths = {key: len(columns[key]) for key in COLUMNS}
    if len(set(lengths.values())) != 1 or not lengths["scale"]:
        raise ValueError(f"columns need one entry per sample, at least one, got lengths {lengths}")
    if not isinstance(input_size, (int, np.integer)) or input_size < hm.STRIDE or input_size % hm.STRIDE:
        raise ValueError(f"input_size={input_size!r} must be a positive multiple of {hm.STRIDE} (the heatmap stride)")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma={sigma!r} must be a positive number of heatmap pixels")
    if flip_permutation is not None:
        count = columns["points"].shape[1]
        if sorted(int(i) for i in flip_permutation) != list(range(count)):
            raise ValueError(f"flip_permutation must be a permutation of the {count} points' indices 0..{count - 1}, "
                             f"got {len(flip_permutation)} indices (larq_landmarks.layouts.flip_permutation({count}))")


def _augmentation_for(train, augmentation, flip_permutation):
    """The augmentation a pipeline applies: none outside training; flips need a permutation."""
    if not train:
        return None
    if augmentation is not None and augmentation.flip_probability > 0 and flip_permutation is None:
        raise ValueError("augmentation flips, so flip_permutation is required "
                         "(larq_landmarks.layouts.flip_permutation(num_points))")
    return augmentation


def _finish(data, batch_size, train):
    if batch_size:
        data = data.batch(batch_size, drop_remainder=train, num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)
