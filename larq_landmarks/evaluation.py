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
    return heatmap_points_to_image(points, matrix, stride), scores


def heatmap_points_to_image(points: tf.Tensor, matrix: tf.Tensor, stride: int = hm.STRIDE) -> tf.Tensor:
    """``(B, K, 2)`` points in the heatmap pixels of crops -> image pixels, given each crop's 3x3
    image -> crop ``matrix``."""
    return transform_points(tf.linalg.inv(matrix), hm.heatmap_to_input(points, stride))


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


def _face_table(result: Dict[str, np.ndarray], num_points: int, w300: bool) -> Dict[str, Dict[str, float]]:
    from larq_landmarks import metrics

    truth, predicted, visible = result["points"], result["predicted"], result["visible"]
    box = metrics.box_size(result["box"])
    tables = {}
    errors = metrics.nme(predicted, truth, box)
    summary = {"NME box %": 100 * float(errors.mean()),
               "AUC@0.07 box": metrics.auc(errors, 0.07),
               "failures@0.07 box": metrics.failure_rate(errors, 0.07)}
    if num_points == 68:
        ocular = metrics.nme(predicted, truth, metrics.inter_ocular(truth))
        pupil = metrics.nme(predicted, truth, metrics.inter_pupil(truth))
        summary.update({"NME inter-ocular %": 100 * float(ocular.mean()),
                        "NME inter-pupil %": 100 * float(pupil.mean())})
    if not visible.all():
        summary["NME box, visible points %"] = 100 * float(metrics.nme(predicted, truth, box, visible).mean())
    tables["NME"] = summary
    if w300 and num_points == 68:  # 300W's subsets, where the images are in its folders
        tables.update(metrics.w300_tables(ocular, pupil, metrics.w300_subsets(result["image_path"])))
    if "yaw" in result and np.isfinite(result["yaw"]).all():
        tables["NME box % by |yaw| (AFLW2000-3D layout)"] = {
            k: 100 * v for k, v in metrics.nme_by_yaw(errors, result["yaw"]).items()
        }
    return tables


def per_image_errors(result: Dict[str, np.ndarray], kind: str, w300: bool = False) -> Dict[str, np.ndarray]:
    """Each image's error, to find the failures behind the tables (``result`` from
    :func:`predict_dataset`): ``image_path``, and for faces ``nme_box_%`` (with ``nme_inter_ocular_%``
    for 68 points, ``w300_subset`` with ``w300`` where some images are in 300W's test folders
    (:func:`~larq_landmarks.metrics.w300_subset`), ``nme_box_visible_%`` where some points are
    hidden, ``yaw_degrees`` where known),
    for people ``pckh_%``: the share of the labelled joints but pelvis and thorax (as PCKh's Mean)
    within half the head size, NaN where none is labelled."""
    from larq_landmarks import metrics

    truth, predicted, visible = result["points"], result["predicted"], result["visible"]
    rows = {"image_path": np.array([p.decode() if isinstance(p, bytes) else str(p) for p in result["image_path"]])}
    if kind == "face":
        box = metrics.box_size(result["box"])
        rows["nme_box_%"] = 100 * metrics.nme(predicted, truth, box)
        if truth.shape[1] == 68:
            rows["nme_inter_ocular_%"] = 100 * metrics.nme(predicted, truth, metrics.inter_ocular(truth))
            subsets = metrics.w300_subsets(result["image_path"]) if w300 else None
            if subsets is not None and (subsets != "").any():
                rows["w300_subset"] = subsets
        if not visible.all():
            rows["nme_box_visible_%"] = 100 * metrics.nme(predicted, truth, box, visible)
        if "yaw" in result:
            rows["yaw_degrees"] = result["yaw"]
    elif kind == "pose":
        distance = np.linalg.norm(predicted - truth, axis=-1) / result["head_size"][:, None]
        used = visible.copy()
        used[:, [6, 7]] = False  # pelvis and thorax, as PCKh's Mean
        with np.errstate(invalid="ignore", divide="ignore"):
            rows["pckh_%"] = 100 * ((distance <= 0.5) & used).sum(1) / used.sum(1)
    else:
        raise ValueError(f"kind={kind!r} must be 'face' or 'pose'")
    return rows


def evaluate_landmarks(
    predict: Callable[[np.ndarray], np.ndarray],
    columns: Dict[str, np.ndarray],
    kind: str,
    input_size: int = 256,
    batch_size: int = 16,
    progress: bool = False,
    w300: bool = False,
) -> Dict[str, object]:
    """The papers' tables for a landmark model on a data set.

    Args:
        predict: crops -> heatmaps (see :func:`predict_dataset`).
        columns: from :func:`larq_landmarks.datasets.to_columns` (with ``yaw`` or ``head_size``
            extras where the data set has them).
        kind: ``"face"`` (NME tables; by yaw when ``yaw`` is present; visible-only when some
            points are invisible) or ``"pose"`` (MPII PCKh@0.5 by joint).
        input_size, batch_size: the crops' side and how many are predicted at a time.
        progress: show a progress bar.
        w300: the data are 300W's (``.pts`` folders): add the tables of its test subsets for the
            images in its test folders (:func:`~larq_landmarks.metrics.w300_tables`). Not for
            300W-LP, whose ``IBUG`` folder holds synthesised views, not the challenging subset.

    Returns:
        ``{"tables": {title: {column: value}}, "count": N, "predicted": (N, K, 2) image pixels,
        "per_image": each image's error (:func:`per_image_errors`)}``.
    """
    from larq_landmarks import metrics
    from larq_landmarks.datasets.pipeline import evaluation_dataset

    dataset = evaluation_dataset(columns, input_size, batch_size=batch_size)
    if progress:
        dataset = _with_progress(dataset, len(columns["scale"]), batch_size)
    result = predict_dataset(predict, dataset)
    num_points = result["points"].shape[1]
    if kind == "face":
        tables = _face_table(result, num_points, w300)
    elif kind == "pose":
        if "head_size" not in result or not np.isfinite(result["head_size"]).all():
            raise ValueError("PCKh needs every person's head box (head_size): the annotations lack it")
        scored = (result["predicted"], result["points"], result["visible"], result["head_size"])
        by_joint = metrics.pckh(*scored)
        tables = {"PCKh@0.5 %": by_joint,
                  "PCKh Mean % by threshold": {"@0.1": metrics.pckh(*scored, alpha=0.1)["Mean"],
                                               "@0.5": by_joint["Mean"], "AUC 0-0.5": metrics.pckh_auc(*scored)}}
    else:
        raise ValueError(f"kind={kind!r} must be 'face' or 'pose'")
    return {"tables": tables, "count": int(len(result["points"])), "predicted": result["predicted"],
            "per_image": per_image_errors(result, kind, w300)}


def evaluate_segmentation(
    predict: Callable[[np.ndarray], np.ndarray],
    columns: Dict[str, np.ndarray],
    input_size: int = 256,
    batch_size: int = 16,
    progress: bool = False,
) -> Dict[str, object]:
    """Pixel accuracy, mean accuracy and mean IU (FCN) of a part segmentation model against masks
    rendered from the 68 ground-truth landmarks (supplementary Table 6 layout); ``per_image``: each
    image's own three scores, in file order."""
    from larq_landmarks import metrics
    from larq_landmarks.datasets.pipeline import segmentation_dataset

    dataset = segmentation_dataset(columns, input_size, train=False, batch_size=batch_size)
    if progress:
        dataset = _with_progress(dataset, len(columns["scale"]), batch_size)
    truths, predictions = [], []
    for images, masks in dataset:
        logits = predict(images.numpy())
        logits = logits[-1] if isinstance(logits, (list, tuple)) else logits
        predictions.append(np.argmax(logits, -1))
        truths.append(masks.numpy())
    predicted, truth = np.concatenate(predictions), np.concatenate(truths)
    scores = metrics.segmentation_scores(predicted, truth, 7)
    each = [metrics.segmentation_scores(p, t, 7) for p, t in zip(predicted, truth)]
    per_image = {"image_path": np.array([str(p) for p in columns["image_path"]])}
    per_image.update({f"{key}_%": np.array([scores_i[key] for scores_i in each]) for key in scores})
    return {"tables": {"Part segmentation %": scores}, "count": int(len(truth)), "per_image": per_image}


def _with_progress(dataset, count, batch_size):
    from tqdm import tqdm

    return tqdm(dataset, total=-(-count // batch_size), desc="evaluate", unit="batch")


def format_comparison(tables_by_model: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """Several models' first tables (the same data and measure) as one markdown table, a row a model."""
    title = next(iter(next(iter(tables_by_model.values()))))
    columns = list(next(iter(tables_by_model.values()))[title])
    lines = [f"### {title}, side by side", "", "| model | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for model, tables in tables_by_model.items():
        row = tables.get(title, {})
        lines.append(f"| {model} | " + " | ".join(_number(title, k, row[k]) if k in row else "-" for k in columns) + " |")
    return "\n".join(lines + [""])


def _number(title: str, column: str, value: float) -> str:
    """A table value: a count as it is, three decimals for a fraction, two for a percentage or
    anything larger."""
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.3f}" if abs(value) <= 1 and "%" not in title + column else f"{value:.2f}"


def format_tables(tables: Dict[str, Dict[str, float]]) -> str:
    """Markdown tables, one per title, values with two decimals (fractions with three)."""
    lines = []
    for title, row in tables.items():
        lines += [f"### {title}", "", "| " + " | ".join(row) + " |", "|" + "---:|" * len(row)]
        lines.append("| " + " | ".join(_number(title, k, v) for k, v in row.items()) + " |")
        lines.append("")
    return "\n".join(lines)
