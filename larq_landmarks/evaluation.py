"""Run a model over an evaluation pipeline and map its predictions back to the images."""
from typing import Callable, Dict

import numpy as np
import tensorflow as tf

from larq_landmarks import heatmaps as hm
from larq_landmarks.datasets.pipeline import transform_points


def heatmaps_to_image(heatmaps: tf.Tensor, matrix: tf.Tensor, stride: int = hm.STRIDE):
    """Decode ``(B, H, W, K)`` heatmaps of crops to ``(B, K, 2)`` image pixels, given each crop's
    3x3 image -> crop ``matrix``; returns ``(points, scores)``."""
    points, scores = hm.decode_heatmaps(heatmaps)
    crop_points = hm.heatmap_to_input(points, stride)
    return transform_points(tf.linalg.inv(matrix), crop_points), scores


def predict_dataset(predict: Callable[[np.ndarray], np.ndarray], dataset: tf.data.Dataset) -> Dict[str, np.ndarray]:
    """Predict every batch of an :func:`~larq_landmarks.datasets.pipeline.evaluation_dataset`.

    Args:
        predict: images ``(B, S, S, 3)`` -> heatmaps of the last stack ``(B, S/4, S/4, K)``,
            e.g. ``lambda x: model.predict_on_batch(x)`` or a TFLite interpreter's ``predict``.
        dataset: batched evaluation dataset.

    Returns:
        The dataset's columns concatenated, plus ``predicted`` (N, K, 2) image pixels and
        ``scores`` (N, K).
    """
    parts = {}
    for batch in dataset:
        output = predict(batch["image"].numpy())
        if isinstance(output, (list, tuple)):
            output = output[-1]
        points, scores = heatmaps_to_image(output, batch["matrix"])
        batch = {k: v.numpy() for k, v in batch.items() if k != "image"}
        batch.update(predicted=points.numpy(), scores=scores.numpy())
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise ValueError("the evaluation dataset is empty")
    return {key: np.concatenate(values) for key, values in parts.items()}
