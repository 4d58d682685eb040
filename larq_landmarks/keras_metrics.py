"""The papers' metrics as Keras metrics, for ``compile(metrics=...)`` and ``evaluate``.

They work on what the model sees: heatmaps (or part logits) of crops, not original images, so
their numbers are in crop terms; :mod:`larq_landmarks.metrics` gives the papers' protocols on
original images.
"""
import tensorflow as tf

from larq_landmarks.heatmaps import decode_heatmaps


def _peaks(y_true, y_pred) -> tuple:
    """Landmarks decoded from target and predicted heatmaps, ``(B, K, 2)`` each in heatmap
    pixels, and ``(B, K)`` which are visible (a target heatmap that is not empty)."""
    truth, _ = decode_heatmaps(y_true)
    predicted, _ = decode_heatmaps(y_pred)
    return truth, predicted, tf.reduce_max(y_true, axis=[1, 2]) > 0.5


@tf.keras.utils.register_keras_serializable("larq_landmarks")
class HeatmapNME(tf.keras.metrics.Metric):
    """Mean NME between the landmarks decoded from predicted and target heatmaps.

    Landmarks whose target heatmap is empty (invisible) are left out.

    Args:
        normaliser: ``"inter_ocular"`` (68-point faces: distance of target points 36 and 45) or
            ``"heatmap_size"`` (the heatmap side).
    """

    def __init__(self, normaliser: str = "inter_ocular", name: str = "nme", **kwargs):
        super().__init__(name=name, **kwargs)
        if normaliser not in ("inter_ocular", "heatmap_size"):
            raise ValueError(f"normaliser={normaliser!r} must be 'inter_ocular' or 'heatmap_size'")
        self.normaliser = normaliser
        self.total = self.add_weight("total", initializer="zeros")
        self.count = self.add_weight("count", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth, predicted, visible = _peaks(y_true, y_pred)
        visible = tf.cast(visible, tf.float32)
        distance = tf.norm(predicted - truth, axis=-1) * visible
        per_image = tf.reduce_sum(distance, -1) / tf.maximum(tf.reduce_sum(visible, -1), 1.0)
        if self.normaliser == "inter_ocular":
            norm = tf.norm(truth[:, 36] - truth[:, 45], axis=-1)
        else:
            norm = tf.cast(tf.shape(y_true)[1], tf.float32) * tf.ones_like(per_image)
        self.total.assign_add(tf.reduce_sum(per_image / tf.maximum(norm, 1e-6)))
        self.count.assign_add(tf.cast(tf.shape(per_image)[0], tf.float32))

    def result(self):
        return tf.math.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "normaliser": self.normaliser}


@tf.keras.utils.register_keras_serializable("larq_landmarks")
class HeatmapPCK(tf.keras.metrics.Metric):
    """Fraction of the visible landmarks whose peak decoded from the predicted heatmap lies within
    ``threshold`` times a tenth of the heatmap side of the target's: the accuracy that Newell et
    al.'s hourglass training code reports for pose during training (PCK@0.5: 3.2 px at 64x64), in
    crop terms; PCKh on the original images, with head sizes, is :func:`larq_landmarks.metrics.pckh`.

    Landmarks whose target heatmap is empty (invisible, or cropped out) are left out; the fraction
    is over all visible landmarks of all images seen, as MPII's Mean pools its joints.

    Args:
        threshold: the distance, in tenths of the heatmap side, under which a landmark is correct.
    """

    def __init__(self, threshold: float = 0.5, name: str = "pck", **kwargs):
        super().__init__(name=name, **kwargs)
        if not threshold > 0:
            raise ValueError(f"threshold={threshold!r} must be positive")
        self.threshold = float(threshold)
        self.correct = self.add_weight("correct", initializer="zeros")
        self.visible = self.add_weight("visible", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth, predicted, visible = _peaks(y_true, y_pred)
        limit = self.threshold * tf.cast(tf.shape(y_true)[1], tf.float32) / 10.0
        correct = tf.logical_and(visible, tf.norm(predicted - truth, axis=-1) <= limit)
        self.correct.assign_add(tf.reduce_sum(tf.cast(correct, tf.float32)))
        self.visible.assign_add(tf.reduce_sum(tf.cast(visible, tf.float32)))

    def result(self):
        return tf.math.divide_no_nan(self.correct, self.visible)

    def reset_state(self):
        self.correct.assign(0.0)
        self.visible.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


@tf.keras.utils.register_keras_serializable("larq_landmarks")
class PartMeanIU(tf.keras.metrics.MeanIoU):
    """Mean IU (FCN) of part segmentation from logits ``(B, H, W, C)`` and masks ``(B, H, W)``."""

    def __init__(self, num_classes: int = 7, name: str = "mean_iu", **kwargs):
        super().__init__(num_classes=num_classes, name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true, tf.argmax(y_pred, axis=-1), sample_weight)
