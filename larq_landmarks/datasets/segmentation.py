"""Facial part masks from 68 landmarks, in the TensorFlow graph (supplementary Table 6).

Each part is a closed polygon of the 68-point markup (:data:`larq_landmarks.layouts
.FACE_PART_POLYGONS`); pixels are labelled by an even-odd point-in-polygon test at their centres,
later parts on top of earlier ones.
"""
import tensorflow as tf

from larq_landmarks.layouts import FACE_PART_POLYGONS


def inside_polygon(vertices: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """``(height, width)`` bool: pixel centres ``(x, y)`` (integers) inside the closed polygon
    ``vertices`` ``(n, 2)`` (even-odd rule)."""
    vertices = tf.convert_to_tensor(vertices, tf.float32)
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32), indexing="ij")
    px, py = tf.reshape(xs, [-1, 1]), tf.reshape(ys, [-1, 1])
    x1, y1 = vertices[None, :, 0], vertices[None, :, 1]
    nxt = tf.roll(vertices, shift=-1, axis=0)
    x2, y2 = nxt[None, :, 0], nxt[None, :, 1]
    straddles = (y1 > py) != (y2 > py)
    dy = tf.where(tf.equal(y2, y1), tf.ones_like(y1), y2 - y1)
    crossing_x = x1 + (py - y1) * (x2 - x1) / dy
    crosses = tf.logical_and(straddles, px < crossing_x)
    odd = tf.math.floormod(tf.reduce_sum(tf.cast(crosses, tf.int32), axis=1), 2) == 1
    return tf.reshape(odd, [height, width])


def render_part_mask(points: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """``(height, width)`` int32 class map (0 background, 1 skin, 2 lower lip, 3 upper lip,
    4 inner mouth, 5 eyes, 6 nose) from 68 ``points`` ``(x, y)`` in the mask's pixels."""
    points = tf.convert_to_tensor(points, tf.float32)
    mask = tf.zeros([height, width], tf.int32)
    for label, polygon in FACE_PART_POLYGONS:
        region = inside_polygon(tf.gather(points, list(polygon)), height, width)
        mask = tf.where(region, label, mask)
    return mask
