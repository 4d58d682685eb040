"""Gaussian heatmap targets and their decoding to landmark coordinates (METHOD.md sections 3-4).

Coordinates are ``(x, y)`` in pixels with pixel centres at integers, at the resolution they refer
to. A network input of side ``S`` has heatmaps of side ``S / 4``; :func:`input_to_heatmap` and
:func:`heatmap_to_input` convert between the two.
"""
import tensorflow as tf

STRIDE = 4


def input_to_heatmap(points: tf.Tensor, stride: int = STRIDE) -> tf.Tensor:
    """Input-image pixel coordinates -> heatmap pixel coordinates (pixel centres aligned)."""
    return (tf.convert_to_tensor(points, tf.float32) + 0.5) / stride - 0.5


def heatmap_to_input(points: tf.Tensor, stride: int = STRIDE) -> tf.Tensor:
    """Heatmap pixel coordinates -> input-image pixel coordinates."""
    return (tf.convert_to_tensor(points, tf.float32) + 0.5) * stride - 0.5


def render_heatmaps(
    points: tf.Tensor, visible: tf.Tensor, size: int, sigma: float = 1.5
) -> tf.Tensor:
    """Render one Gaussian heatmap per landmark.

    Args:
        points: ``(..., K, 2)`` landmark ``(x, y)`` in heatmap pixels.
        visible: ``(..., K)`` booleans or 0/1; invisible landmarks get an all-zero heatmap.
        size: heatmap side in pixels.
        sigma: Gaussian standard deviation in heatmap pixels.

    Returns:
        ``(..., size, size, K)`` float32 heatmaps with peak 1 at each landmark.
    """
    if isinstance(sigma, (int, float)) and not sigma > 0:
        raise ValueError(f"sigma={sigma!r} must be a positive number of heatmap pixels")
    points = tf.convert_to_tensor(points, tf.float32)
    visible = tf.cast(visible, tf.float32)
    grid = tf.range(size, dtype=tf.float32)
    dx = grid[:, None] - points[..., None, :, 0]  # (..., size, K): x varies along the width
    dy = grid[:, None] - points[..., None, :, 1]  # (..., size, K): y varies along the height
    gx = tf.exp(-(dx**2) / (2.0 * sigma**2))
    gy = tf.exp(-(dy**2) / (2.0 * sigma**2))
    heatmaps = gy[..., :, None, :] * gx[..., None, :, :]
    return heatmaps * visible[..., None, None, :]


def decode_heatmaps(heatmaps: tf.Tensor) -> tuple:
    """Argmax of each heatmap plus a quarter-pixel shift toward the larger neighbour.

    Args:
        heatmaps: ``(batch, H, W, K)``.

    Returns:
        ``(points, scores)``: ``(batch, K, 2)`` float32 ``(x, y)`` in heatmap pixels and
        ``(batch, K)`` the peak values.
    """
    heatmaps = tf.convert_to_tensor(heatmaps, tf.float32)
    if heatmaps.shape.rank is not None and heatmaps.shape.rank != 4:
        raise ValueError(f"heatmaps must have shape (batch, H, W, K), got {heatmaps.shape}")
    shape = tf.shape(heatmaps)
    height, width = shape[1], shape[2]
    flat = tf.reshape(tf.transpose(heatmaps, [0, 3, 1, 2]), [shape[0], shape[3], -1])
    index = tf.argmax(flat, axis=-1, output_type=tf.int32)
    scores = tf.reduce_max(flat, axis=-1)
    y, x = index // width, index % width

    def value_at(yy, xx):
        yy = tf.clip_by_value(yy, 0, height - 1)
        xx = tf.clip_by_value(xx, 0, width - 1)
        return tf.gather(flat, yy * width + xx, batch_dims=2)

    # Neighbours outside the map count as equal (no shift), as in the authors' code.
    has_x = tf.logical_and(x > 0, x < width - 1)
    has_y = tf.logical_and(y > 0, y < height - 1)
    shift_x = tf.where(has_x, tf.sign(value_at(y, x + 1) - value_at(y, x - 1)), 0.0)
    shift_y = tf.where(has_y, tf.sign(value_at(y + 1, x) - value_at(y - 1, x)), 0.0)
    points = tf.stack(
        [tf.cast(x, tf.float32) + 0.25 * shift_x, tf.cast(y, tf.float32) + 0.25 * shift_y], -1
    )
    return points, scores
