"""Evaluation protocols of the papers (METHOD.md section 5), as plain NumPy functions.

Landmarks are ``(N, K, 2)`` arrays of ``(x, y)`` in the same pixels for prediction and truth.
"""
import re
from typing import Dict, Optional, Sequence

import numpy as np

YAW_BINS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0))


def _points(name: str, points, count: Optional[int] = None) -> np.ndarray:
    """``points`` as float64 ``(N, K, 2)`` (K = ``count`` when given), or a ValueError naming it."""
    points = np.asarray(points, np.float64)
    if points.ndim != 3 or points.shape[-1] != 2 or (count is not None and points.shape[1] != count):
        raise ValueError(f"{name} must have shape (N, {count or 'K'}, 2), got {points.shape}")
    return points


def _pair(predicted, truth, count: Optional[int] = None):
    """Predicted and true points of one shape, as float64."""
    predicted, truth = _points("predicted", predicted, count), _points("truth", truth, count)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} differ in shape")
    return predicted, truth


def _per_image(name: str, values, images: int) -> np.ndarray:
    """``(N,)`` positive finite sizes (a normaliser, head sizes), or a ValueError naming them."""
    values = np.asarray(values, np.float64)
    if values.shape != (images,):
        raise ValueError(f"{name} must have shape ({images},), got {values.shape}")
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if bad.size:
        raise ValueError(f"{name} must be positive and finite: image {bad[0]} has {values[bad[0]]}")
    return values


def _mask(name: str, mask, shape: tuple) -> np.ndarray:
    mask = np.asarray(mask, bool)
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {mask.shape}")
    return mask


def _errors(errors) -> np.ndarray:
    """Per-image errors, a non-empty 1-d array (NaN, from a NaN prediction, counts as a failure)."""
    errors = np.asarray(errors, np.float64)
    if errors.ndim != 1 or errors.size == 0:
        raise ValueError(f"errors must be a non-empty 1-d array, got shape {errors.shape}")
    return errors


def box_size(box: np.ndarray) -> np.ndarray:
    """``sqrt(w * h)`` of ``(N, 4)`` boxes ``x1, y1, x2, y2`` (AFLW2000-3D's normaliser)."""
    box = np.asarray(box, np.float64)
    if box.ndim != 2 or box.shape[1] != 4:
        raise ValueError(f"box must have shape (N, 4), got {box.shape}")
    return np.sqrt((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))


def inter_ocular(points: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners (points 36 and 45) of 68-point faces."""
    points = _points("points", points, 68)
    return np.linalg.norm(points[:, 36] - points[:, 45], axis=-1)


def inter_pupil(points: np.ndarray) -> np.ndarray:
    """Distance between the eye centres (means of points 36-41 and 42-47) of 68-point faces."""
    points = _points("points", points, 68)
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
    predicted, truth = _pair(predicted, truth)
    distance = np.linalg.norm(predicted - truth, axis=-1)
    normaliser = _per_image("normaliser", normaliser, len(distance))
    visible = np.ones(distance.shape, bool) if visible is None else _mask("visible", visible, distance.shape)
    counts = visible.sum(1)
    if np.any(counts == 0):
        raise ValueError(f"image {np.flatnonzero(counts == 0)[0]} has no visible points to average over")
    return np.where(visible, distance, 0.0).sum(1) / counts / normaliser


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
    errors = np.sort(_errors(errors))  # NaN sorts last: never within a threshold
    return thresholds, np.searchsorted(errors, thresholds, side="right") / len(errors)


def auc(errors: np.ndarray, threshold: float = 0.07, steps: int = 1000) -> float:
    """Area under the CED up to ``threshold``, divided by ``threshold`` (in [0, 1])."""
    thresholds, fractions = ced(errors, threshold, steps)
    return float(np.trapz(fractions, thresholds) / threshold)


def failure_rate(errors: np.ndarray, threshold: float = 0.07) -> float:
    """Fraction of images whose error is above ``threshold`` (or NaN, as in :func:`ced`)."""
    return float(np.mean(~(_errors(errors) <= threshold)))


# 300W as iBUG distributes it: the folder an image is in says its part of the benchmark.
W300_TEST_FOLDERS = {
    ("lfpw", "testset"): "common", ("helen", "testset"): "common", ("ibug",): "challenging",
    ("01_indoor",): "indoor", ("02_outdoor",): "outdoor",
}  # fmt: skip


def _folder_tail(path: str, length: int) -> tuple:
    """The last ``length`` folder names above the file ``path``, lower-case."""
    parts = [p for p in re.split(r"[\\/]+", str(path).lower()) if p][:-1]
    return tuple(parts[-length:])


def w300_subset(image_path: str) -> str:
    """The part of 300W's test protocol an image belongs to, from the folder it is in (the layout of
    iBUG's downloads): ``lfpw/testset`` and ``helen/testset`` are the common subset (554 images),
    ``ibug`` the challenging one (135), together the full set; ``300W/01_Indoor`` and
    ``300W/02_Outdoor`` the private test set (300 each). ``""`` for any other folder, the training
    sets (``afw``, ``lfpw/trainset``, ``helen/trainset``) among them. Only the image's own folder
    (and for ``testset`` the one above it) counts, so the folders higher up can be called anything."""
    for folders, subset in W300_TEST_FOLDERS.items():
        if _folder_tail(image_path, len(folders)) == folders:
            return subset
    return ""


def w300_subsets(image_paths) -> np.ndarray:
    """:func:`w300_subset` of each path (``str`` or ``bytes``, as a ``tf.data`` column gives them)."""
    return np.array([w300_subset(p.decode() if isinstance(p, bytes) else str(p)) for p in image_paths], str)


def w300_tables(ocular: np.ndarray, pupil: np.ndarray, subsets: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """300W's tables for the images of its test subsets (empty when there are none).

    Args:
        ocular, pupil: ``(N,)`` errors normalised by :func:`inter_ocular` and :func:`inter_pupil`.
        subsets: ``(N,)`` :func:`w300_subset` of each image.

    Returns:
        Where the common or challenging subset is present, NME (%) on each, and on the full set
        (common + challenging) when both are, by inter-ocular and by inter-pupil distance; where
        the private test set is present, its inter-ocular NME (%) indoor, outdoor and on both, and
        the AUC and failure rate at 0.08 on the images present (the 300W challenge's measures);
        ``"300W images"``: how many images each figure is over.
    """
    ocular, pupil = _errors(ocular), _errors(pupil)
    subsets = np.asarray(subsets, str)
    if not (ocular.shape == pupil.shape == subsets.shape):
        raise ValueError(f"ocular {ocular.shape}, pupil {pupil.shape} and subsets {subsets.shape} differ in shape")
    parts = {"common": subsets == "common", "challenging": subsets == "challenging"}
    if parts["common"].any() and parts["challenging"].any():
        parts["full"] = parts["common"] | parts["challenging"]
    parts = {name: members for name, members in parts.items() if members.any()}
    private = {"indoor": subsets == "indoor", "outdoor": subsets == "outdoor"}
    if private["indoor"].any() and private["outdoor"].any():
        private["indoor + outdoor"] = private["indoor"] | private["outdoor"]
    private = {name: members for name, members in private.items() if members.any()}
    tables, counts = {}, {}
    if parts:
        for title, errors in (("inter-ocular", ocular), ("inter-pupil", pupil)):
            tables[f"300W NME {title} %"] = {name: 100 * float(errors[m].mean()) for name, m in parts.items()}
        counts.update({name: int(m.sum()) for name, m in parts.items()})
    if private:
        every = np.logical_or.reduce(list(private.values()))
        row = {f"NME {name} %": 100 * float(ocular[m].mean()) for name, m in private.items()}
        row.update({"AUC@0.08": auc(ocular[every], 0.08), "failures@0.08": failure_rate(ocular[every], 0.08)})
        tables["300W private test, inter-ocular"] = row
        counts.update({f"private {name}": int(m.sum()) for name, m in private.items()})
    if counts:
        tables["300W images"] = counts
    return tables


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
    predicted, truth = _pair(predicted, truth, 16)
    distance = np.linalg.norm(predicted - truth, axis=-1)
    scaled = distance / _per_image("head_sizes", head_sizes, len(distance))[:, None]
    visible = _mask("visible", visible, distance.shape)
    correct = (scaled <= alpha) & visible
    table = {}
    for name, joints in MPII_PCKH_COLUMNS.items():
        total = visible[:, joints].sum()
        table[name] = 100.0 * correct[:, joints].sum() / total if total else float("nan")
    used = [j for j in range(16) if j not in (6, 7)]
    table["Mean"] = 100.0 * correct[:, used].sum() / max(1, visible[:, used].sum())
    return table


def pckh_auc(
    predicted: np.ndarray,
    truth: np.ndarray,
    visible: np.ndarray,
    head_sizes: np.ndarray,
    max_alpha: float = 0.5,
    steps: int = 50,
) -> float:
    """Area under the curve of PCKh's Mean (percent) against the threshold from 0 to ``max_alpha``
    (``steps`` intervals: 0.01 apart by default, as MPII's evaluation code), divided by
    ``max_alpha``: a percentage, the "AUC" of MPII's results tables."""
    if not (np.isfinite(max_alpha) and max_alpha > 0) or steps < 1:
        raise ValueError(f"max_alpha={max_alpha!r} must be positive and steps={steps!r} at least 1")
    alphas = np.linspace(0.0, max_alpha, steps + 1)
    means = [pckh(predicted, truth, visible, head_sizes, alpha)["Mean"] for alpha in alphas]
    return float(np.trapz(means, alphas) / max_alpha)


def confusion_matrix(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts: row = true class, column = predicted class."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    if truth.shape != predicted.shape:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} differ in shape")
    for name, labels in (("predicted", predicted), ("truth", truth)):
        if labels.size and not (np.all(labels == np.round(labels)) and labels.min() >= 0 and labels.max() < num_classes):
            raise ValueError(f"{name} must hold class indices 0..{num_classes - 1}, got values in "
                             f"[{labels.min()}, {labels.max()}]")
    truth, predicted = truth.ravel().astype(np.int64), predicted.ravel().astype(np.int64)
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
