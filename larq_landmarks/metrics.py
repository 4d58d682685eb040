"""Evaluation protocols of the papers (METHOD.md section 5), as plain NumPy functions.

Landmarks are ``(N, K, 2)`` arrays of ``(x, y)`` in the same pixels for prediction and truth.
"""
from typing import Dict, Optional, Sequence

import numpy as np

YAW_BINS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0))


def box_size(box: np.ndarray) -> np.ndarray:
    """``sqrt(w * h)`` of ``(N, 4)`` boxes ``x1, y1, x2, y2`` (AFLW2000-3D's normaliser)."""
    box = np.asarray(box, np.float64)
    return np.sqrt((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))


def inter_ocular(points: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners (points 36 and 45) of 68-point faces."""
    points = np.asarray(points, np.float64)
    return np.linalg.norm(points[:, 36] - points[:, 45], axis=-1)


def inter_pupil(points: np.ndarray) -> np.ndarray:
    """Distance between the eye centres (means of points 36-41 and 42-47) of 68-point faces."""
    points = np.asarray(points, np.float64)
    return np.linalg.norm(points[:, 36:42].mean(1) - points[:, 42:48].mean(1), axis=-1)


def nme(
    predicted: np.ndarray,
    truth: np.ndarray,
    normaliser: np.ndarray,
    visible: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Normalised mean error per image: mean point-to-point distance / ``normaliser``.

    Args:
        predicted, truth: ``(N, K, 2)``.
        normaliser: ``(N,)``, e.g. :func:`box_size`, :func:`inter_ocular` or :func:`inter_pupil`
            of the ground truth.
        visible: optional ``(N, K)`` mask: average over visible points only (AFLW-PIFA).

    Returns:
        ``(N,)`` errors as fractions (multiply by 100 for the papers' percentages).
    """
    distance = np.linalg.norm(np.asarray(predicted, np.float64) - np.asarray(truth, np.float64), axis=-1)
    if visible is None:
        visible = np.ones(distance.shape, bool)
    visible = np.asarray(visible, bool)
    counts = visible.sum(1)
    if np.any(counts == 0):
        raise ValueError("an image has no visible points to average over")
    return (distance * visible).sum(1) / counts / np.asarray(normaliser, np.float64)


def nme_by_yaw(errors: np.ndarray, yaw_degrees: np.ndarray) -> Dict[str, float]:
    """Mean NME in the AFLW2000-3D yaw bins [0,30], (30,60], (60,90] of |yaw|, and their mean
    (the papers' "mean" is the average of the three bins)."""
    errors, yaw = np.asarray(errors), np.abs(np.asarray(yaw_degrees))
    result = {}
    for low, high in YAW_BINS:
        members = (yaw >= low) & (yaw <= high) if low == 0 else (yaw > low) & (yaw <= high)
        result[f"[{low:g},{high:g}]"] = float(errors[members].mean()) if members.any() else float("nan")
    result["mean"] = float(np.nanmean(list(result.values())))
    return result


def ced(errors: np.ndarray, threshold: float = 0.07, steps: int = 1000):
    """Cumulative error distribution: ``(thresholds, fraction of images with error <= t)``."""
    thresholds = np.linspace(0.0, threshold, steps + 1)
    errors = np.sort(np.asarray(errors))
    return thresholds, np.searchsorted(errors, thresholds, side="right") / len(errors)


def auc(errors: np.ndarray, threshold: float = 0.07, steps: int = 1000) -> float:
    """Area under the CED up to ``threshold``, divided by ``threshold`` (in [0, 1])."""
    thresholds, fractions = ced(errors, threshold, steps)
    return float(np.trapz(fractions, thresholds) / threshold)


def failure_rate(errors: np.ndarray, threshold: float = 0.07) -> float:
    """Fraction of images whose error is above ``threshold``."""
    return float(np.mean(np.asarray(errors) > threshold))


MPII_PCKH_COLUMNS = {
    "Head": (9,), "Shoulder": (12, 13), "Elbow": (11, 14), "Wrist": (10, 15),
    "Hip": (2, 3), "Knee": (1, 4), "Ankle": (0, 5),
}  # fmt: skip


def pckh(
    predicted: np.ndarray,
    truth: np.ndarray,
    visible: np.ndarray,
    head_sizes: np.ndarray,
    alpha: float = 0.5,
) -> Dict[str, float]:
    """MPII PCKh@alpha in percent: a joint is correct when its distance to the truth is at most
    ``alpha * head_size``; joints that are not labelled are excluded.

    Returns the MPII table: Head, Shoulder, Elbow, Wrist, Hip, Knee, Ankle (left/right joints
    pooled) and Mean (over all labelled joints but pelvis and thorax, as the common evaluation code).
    """
    distance = np.linalg.norm(np.asarray(predicted, np.float64) - np.asarray(truth, np.float64), axis=-1)
    scaled = distance / np.asarray(head_sizes, np.float64)[:, None]
    visible = np.asarray(visible, bool)
    correct = (scaled <= alpha) & visible
    table = {}
    for name, joints in MPII_PCKH_COLUMNS.items():
        total = visible[:, joints].sum()
        table[name] = 100.0 * correct[:, joints].sum() / total if total else float("nan")
    used = [j for j in range(16) if j not in (6, 7)]
    table["Mean"] = 100.0 * correct[:, used].sum() / max(1, visible[:, used].sum())
    return table


def confusion_matrix(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts: row = true class, column = predicted class."""
    truth = np.asarray(truth).ravel().astype(np.int64)
    predicted = np.asarray(predicted).ravel().astype(np.int64)
    return np.bincount(truth * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(predicted: np.ndarray, truth: np.ndarray, num_classes: int = 7) -> Dict[str, float]:
    """FCN's metrics (Long et al.) in percent: pixel accuracy ``sum n_ii / sum t_i``, mean
    accuracy ``mean_i n_ii / t_i``, mean IU ``mean_i n_ii / (t_i + sum_j n_ji - n_ii)``, over the
    classes present in the truth or prediction."""
    matrix = confusion_matrix(predicted, truth, num_classes).astype(np.float64)
    correct = np.diag(matrix)
    true_totals, predicted_totals = matrix.sum(1), matrix.sum(0)
    present = (true_totals + predicted_totals) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = correct / true_totals
        iu = correct / (true_totals + predicted_totals - correct)
    return {
        "pixel_accuracy": 100.0 * correct.sum() / matrix.sum(),
        "mean_accuracy": 100.0 * float(np.nanmean(accuracy[present & (true_totals > 0)])),
        "mean_iu": 100.0 * float(np.mean(iu[present])),
    }
