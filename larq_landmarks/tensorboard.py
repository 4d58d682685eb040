"""A Keras callback that shows predicted heatmaps and landmark overlays in TensorBoard."""
import numpy as np
import tensorflow as tf

from larq_landmarks import heatmaps as hm
from larq_landmarks import visualize


class HeatmapImages(tf.keras.callbacks.Callback):
    """At the end of every ``every`` epochs, write for a few fixed ``images``:

    - ``heatmaps``: the maximum over landmarks of the last stack's predicted heatmaps;
    - ``landmarks``: the images with the decoded landmarks drawn on them.

    Args:
        log_dir: TensorBoard folder (e.g. the one given to ``tf.keras.callbacks.TensorBoard``).
        images: ``(N, S, S, 3)`` float crops in [0, 1] (at most 8 are shown).
        every: epochs between writes.
    """

    def __init__(self, log_dir: str, images: np.ndarray, every: int = 1):
        super().__init__()
        self.images = np.asarray(images, np.float32)[:8]
        self.every = every
        self.writer = tf.summary.create_file_writer(log_dir)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        output = self.model.predict_on_batch(self.images)
        heatmaps = np.asarray(output[-1] if isinstance(output, (list, tuple)) else output)
        points = hm.heatmap_to_input(hm.decode_heatmaps(heatmaps)[0]).numpy()
        peak = heatmaps.max(-1, keepdims=True)
        peak = np.clip(peak / max(float(peak.max()), 1e-6), 0, 1)
        overlays = np.stack([
            np.asarray(visualize.draw_landmarks((image * 255).astype(np.uint8), p, radius=1.0))
            for image, p in zip(self.images, points)
        ]).astype(np.float32) / 255.0
        with self.writer.as_default():
            tf.summary.image("heatmaps", peak, step=epoch, max_outputs=len(peak))
            tf.summary.image("landmarks", overlays, step=epoch, max_outputs=len(overlays))
        self.writer.flush()
