"""Training with Keras ``fit``: the papers' loss, optimiser, schedule and callbacks (METHOD.md 3),
and the options that train binary networks better: Adam (the default; with the papers' step decay
it measured best, ``reproduce.py recipe``), a warm-up with cosine decay as Larq's own recipes use,
two-stage training through :func:`transfer_weights`, distillation in
:mod:`larq_landmarks.distillation`.

Use it as::

    with strategy.scope():                 # optional: any tf.distribute strategy
        model = BinaryHourglass(68)
        compile_model(model, steps_per_epoch=len_train // batch, epochs=100)
    model.fit(for_stacks(train, model), epochs=100, callbacks=training_callbacks("run/"))
"""
import json
import os
import shutil
import tempfile
from typing import Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from larq_landmarks import layouts
from larq_landmarks.atomic import atomic_path
from larq_landmarks.distillation import Distiller


def step_schedule(
    steps_per_epoch: int,
    epochs: int,
    learning_rate: float = 2.5e-4,
    factors: Sequence[float] = (0.4, 0.2, 0.04),
    at_fractions: Sequence[float] = (0.4, 0.7, 0.9),
) -> tf.keras.optimizers.schedules.LearningRateSchedule:
    """The authors' step decay: ``learning_rate``, then ``learning_rate * factor`` for each of
    ``factors`` from the given fractions of training. The defaults give the authors' values
    2.5e-4 -> 1e-4 at 40%, 5e-5 at 70%, 1e-5 at 90% of the steps."""
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} and epochs={epochs} must be >= 1")
    if len(factors) != len(at_fractions):
        raise ValueError("factors and at_fractions must have the same length")
    boundaries = [max(1, int(round(f * epochs * steps_per_epoch))) for f in at_fractions]
    return tf.keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [float(learning_rate)] + [float(learning_rate * f) for f in factors]
    )


OPTIMIZERS = ("rmsprop", "adam")
SCHEDULES = ("step", "cosine", "constant")
# The papers' recipe, one argument away from the default: compile_model(model, **PAPERS_RECIPE).
PAPERS_RECIPE = {"optimizer": "rmsprop", "schedule": "step"}
DEFAULT_WARMUP = 0.05  # of the steps, with the cosine schedule


def cosine_schedule(steps_per_epoch: int, epochs: int, learning_rate: float,
                    warmup_fraction: float = 0.0) -> tf.keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_fraction`` of the steps, then
    cosine decay to 0 at the end (Keras's ``CosineDecay``)."""
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} and epochs={epochs} must be >= 1")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction={warmup_fraction!r} must be in [0, 1)")
    total = steps_per_epoch * epochs
    warmup = int(round(warmup_fraction * total))
    if warmup == 0:
        return tf.keras.optimizers.schedules.CosineDecay(float(learning_rate), total)
    return tf.keras.optimizers.schedules.CosineDecay(
        0.0, total - warmup, warmup_target=float(learning_rate), warmup_steps=warmup)


def learning_rate_schedule(schedule: str, steps_per_epoch: Optional[int], epochs: Optional[int],
                           learning_rate: float, warmup_fraction: Optional[float] = None):
    """``"step"`` (the papers', :func:`step_schedule`), ``"cosine"`` (:func:`cosine_schedule`) or
    ``"constant"``; without ``steps_per_epoch`` and ``epochs`` the rate is constant.
    ``warmup_fraction`` None: :data:`DEFAULT_WARMUP` with the cosine schedule."""
    if warmup_fraction is None:
        warmup_fraction = DEFAULT_WARMUP if schedule == "cosine" else 0.0
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not known; use one of {SCHEDULES}")
    if warmup_fraction and schedule != "cosine":
        raise ValueError(f"warmup_fraction={warmup_fraction} needs schedule='cosine' (got {schedule!r})")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate={learning_rate!r} must be a positive number")
    for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer or None")
    if schedule == "constant" or not (steps_per_epoch and epochs):
        return float(learning_rate)
    if schedule == "step":
        return step_schedule(steps_per_epoch, epochs, learning_rate)
    return cosine_schedule(steps_per_epoch, epochs, learning_rate, warmup_fraction)


def task_loss(task: str) -> tf.keras.losses.Loss:
    """MSE on heatmaps, or per-pixel softmax cross-entropy on logits for segmentation."""
    if task == "heatmaps":
        return tf.keras.losses.MeanSquaredError()
    if task == "segmentation":
        return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    raise ValueError(f"task={task!r} is not known; use 'heatmaps' or 'segmentation'")


def compile_model(
    model: tf.keras.Model,
    task: str = "heatmaps",
    steps_per_epoch: Optional[int] = None,
    epochs: Optional[int] = None,
    learning_rate: float = 2.5e-4,
    metrics: Optional[list] = None,
    optimizer: str = "adam",
    schedule: str = "step",
    warmup_fraction: Optional[float] = None,
) -> tf.keras.Model:
    """Compile with the papers' loss, applied to every stack and summed.

    The default recipe, Adam with the papers' step decay, trains the binary networks far better
    than the papers' RMSprop at the same budget, and better than Adam with a warm-up and cosine
    decay (``reproduce.py recipe``, docs/results.md); the papers' recipe is
    ``compile_model(model, **PAPERS_RECIPE)``.

    Args:
        model: the network (one output per stack).
        task: ``"heatmaps"`` (MSE) or ``"segmentation"`` (cross-entropy on logits).
        steps_per_epoch, epochs: the run's length, for the schedule; without them the rate is
            constant.
        learning_rate: the peak learning rate.
        metrics: Keras metrics.
        optimizer: ``"adam"`` or ``"rmsprop"`` (the papers').
        schedule: ``"step"`` (the papers' step decay), ``"cosine"`` or ``"constant"``, see
            :func:`learning_rate_schedule`.
        warmup_fraction: with ``"cosine"``, the fraction of the steps that warm up linearly from 0
            (None: 0.05).

    Call it inside ``strategy.scope()`` when distributing.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not known; use one of {OPTIMIZERS}")
    rate = learning_rate_schedule(schedule, steps_per_epoch, epochs, learning_rate, warmup_fraction)
    make = tf.keras.optimizers.RMSprop if optimizer == "rmsprop" else tf.keras.optimizers.Adam
    model.compile(
        optimizer=make(learning_rate=rate),
        loss=task_loss(task),
        metrics=metrics,
    )
    if model.trainable_variables:
        # the optimizer's slots made now, not inside fit's first step: a tf.function that creates
        # variables is traced twice, so this halves the tracing before the first step (seconds)
        model.optimizer.build(model.trainable_variables)
    return model


def transfer_weights(source: tf.keras.Model, target: tf.keras.Model) -> tf.keras.Model:
    """Copy every weight of ``source`` into the layer of the same name in ``target`` (two-stage
    training: a model binarized in one respect only, ``binary_activations=False`` or
    ``binary_weights=False``, initialises the fully binary one). Raises a ValueError naming the
    first layer that is missing or whose weight shapes differ."""
    layers = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if layer.name not in layers:
            raise ValueError(f"transfer_weights: {source.name} has no layer {layer.name!r}")
        values = layers[layer.name].get_weights()
        if [w.shape for w in values] != [w.shape for w in weights]:
            raise ValueError(f"transfer_weights: layer {layer.name!r} has weights "
                             f"{[w.shape for w in values]} in {source.name} but {[w.shape for w in weights]} "
                             f"in {target.name}")
        layer.set_weights(values)
    return target


# what stage one of two-stage training keeps real: BinaryHourglass arguments for each order
FIRST_STAGES = {
    "binary_weights": {"binary_activations": False},  # binary weights, real activations
    "binary_activations": {"binary_weights": False},  # binary activations, real weights
}
# activations first: better on both benchmarks and the demo (reproduce.py recipe, docs/results.md)
DEFAULT_FIRST_STAGE = "binary_activations"
# stage one's share of the epochs (two_stage, first_stage_epochs): 0.3 (1 of 4 epochs) beat half on
# both benchmarks and both seeds (reproduce.py recipe, docs/results.md), and 3 of 10 on the demo
DEFAULT_FIRST_FRACTION = 0.3


def first_stage_epochs(epochs: int, fraction: float = DEFAULT_FIRST_FRACTION) -> int:
    """How many of ``epochs`` (at least 2) stage one of :func:`two_stage` trains: ``fraction`` of
    them, rounded, and at least one epoch for each stage."""
    if epochs < 2:
        raise ValueError(f"two-stage training needs epochs >= 2 (one per stage), got {epochs}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"first_fraction={fraction} must be between 0 and 1 (exclusive)")
    return min(epochs - 1, max(1, int(round(epochs * fraction))))


def two_stage(build: Callable[..., tf.keras.Model], train: Callable[[tf.keras.Model, int], None],
              epochs: int, first: str = DEFAULT_FIRST_STAGE,
              first_fraction: float = DEFAULT_FIRST_FRACTION) -> tf.keras.Model:
    """Two-stage training: a network binarized in one respect only is trained for the first
    epochs, its weights are copied into the fully binary network with :func:`transfer_weights`,
    which trains for the rest.

    Args:
        build: ``build(**arguments) -> model``: ``build()`` is the fully binary network, and
            ``build(**FIRST_STAGES[first])`` stage one (``BinaryHourglass`` arguments).
        train: ``(model, epochs)``: compiles and fits the model for that many epochs.
        epochs: both stages together (at least 2).
        first: what stage one binarizes: ``"binary_weights"`` (real activations first) or
            ``"binary_activations"`` (real weights first, as in Bulat et al. 2019 and Martinez,
            Yang, Bulat & Tzimiropoulos, ICLR 2020).
        first_fraction: stage one's share of the epochs (:func:`first_stage_epochs`).

    Returns:
        The fully binary model, trained.
    """
    if first not in FIRST_STAGES:
        raise ValueError(f"first={first!r} is not known; use one of {tuple(FIRST_STAGES)}")
    first_epochs = first_stage_epochs(epochs, first_fraction)
    stage_one = build(**FIRST_STAGES[first])
    train(stage_one, first_epochs)
    binary = transfer_weights(stage_one, build())
    train(binary, epochs - first_epochs)
    return binary


def for_stacks(dataset: tf.data.Dataset, model_or_stacks) -> tf.data.Dataset:
    """Repeat the target of ``(inputs, target[, weights])`` elements once per stack of the model.

    Intermediate supervision: every stack is trained on the same heatmaps (or mask).
    """
    stacks = model_or_stacks if isinstance(model_or_stacks, int) else len(model_or_stacks.outputs)
    if stacks == 1:
        return dataset

    def repeat(inputs, target, *weights):
        if weights:
            return inputs, (target,) * stacks, (weights[0],) * stacks
        return inputs, (target,) * stacks

    return dataset.map(repeat, num_parallel_calls=tf.data.AUTOTUNE)


def save_model(model: tf.keras.Model, path: str) -> str:
    """Save ``model`` to ``path`` (``.keras`` file or SavedModel folder) atomically.

    The model is written next to ``path`` under a temporary name and moved into place, so an
    interrupted save never leaves a half-written file where a good one was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = ".keras" if path.endswith(".keras") else ""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".saving-") as scratch:
        temporary = os.path.join(scratch, "model" + suffix)
        model.save(temporary)
        if os.path.isdir(path) and not suffix:
            old = path + ".old"
            os.replace(path, old)
            os.replace(temporary, path)
            shutil.rmtree(old)
        else:
            os.replace(temporary, path)
    return path


def _network(model: tf.keras.Model) -> tf.keras.Model:
    """What a callback saves of the model ``fit`` trains: a Distiller's student, else the model."""
    return model.student if isinstance(model, Distiller) else model


class SaveModelEachEpoch(tf.keras.callbacks.Callback):
    """Write the model to ``path`` at the end of every epoch, atomically (see :func:`save_model`);
    for a :class:`~larq_landmarks.distillation.Distiller`, its student (the network to convert)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = os.fspath(path)

    def on_epoch_end(self, epoch, logs=None):
        save_model(_network(self.model), self.path)


def validation_metrics(task: str, num_points: int) -> list:
    """The Keras metrics to follow on validation data: :class:`~larq_landmarks.keras_metrics.HeatmapNME`
    (named ``nme``; by the inter-ocular distance for 68-point faces, by the heatmap side otherwise)
    for heatmaps, with :class:`~larq_landmarks.keras_metrics.HeatmapPCK` (``pck``, PCK@0.5 of a
    tenth of the heatmap side) for MPII's 16 joints; :class:`~larq_landmarks.keras_metrics.PartMeanIU`
    (``mean_iu``) for segmentation."""
    from larq_landmarks.keras_metrics import HeatmapNME, HeatmapPCK, PartMeanIU

    if task == "segmentation":
        return [PartMeanIU()]
    if task == "heatmaps" and num_points == len(layouts.MPII_JOINTS):
        return [HeatmapNME("heatmap_size"), HeatmapPCK()]
    if task == "heatmaps":
        return [HeatmapNME("inter_ocular" if num_points == 68 else "heatmap_size")]
    raise ValueError(f"task={task!r} is not known; use 'heatmaps' or 'segmentation'")


def best_epoch_metric(task: str, num_points: int) -> str:
    """The metric of :func:`validation_metrics` that picks the best epoch (:class:`SaveBestModel`):
    ``mean_iu`` for segmentation, ``pck`` for MPII's 16 joints, ``nme`` for faces."""
    if task == "segmentation":
        return "mean_iu"
    return "pck" if num_points == len(layouts.MPII_JOINTS) else "nme"


BEST_MODES = {"nme": "min", "pck": "max", "mean_iu": "max"}  # SaveBestModel's metrics: lower or higher is better


class SaveBestModel(tf.keras.callbacks.Callback):
    """Keep at ``path`` the model of the epoch with the best validation ``metric`` so far, written
    atomically (see :func:`save_model`); for a :class:`~larq_landmarks.distillation.Distiller`,
    its student.

    The epoch and its score go to ``path`` + ``.json``, also atomically, and are read back when
    training starts, so a run resumed by ``BackupAndRestore`` keeps comparing with its best epoch.

    Args:
        path: the ``.keras`` file to keep the best model in.
        metric: ``"nme"`` (the lowest wins), ``"pck"`` or ``"mean_iu"`` (the highest), as named by
            :func:`validation_metrics`; of a model with several outputs (stacks), the last output's.
    """

    def __init__(self, path: str, metric: str = "nme"):
        super().__init__()
        if metric not in BEST_MODES:
            raise ValueError(f"metric={metric!r} must be one of {tuple(BEST_MODES)}")
        self.path, self.metric = os.fspath(path), metric
        self.record_path = self.path + ".json"
        self.best: Optional[dict] = None

    def on_train_begin(self, logs=None):
        if os.path.exists(self.record_path):
            with open(self.record_path, encoding="utf-8") as f:
                self.best = json.load(f)

    def _better(self, value: float) -> bool:
        if not np.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best["value"] if BEST_MODES[self.metric] == "min" else value > self.best["value"]

    def on_epoch_end(self, epoch, logs=None):
        keys = [k for k in (logs or {}) if k.startswith("val_") and (k == f"val_{self.metric}"
                                                                      or k.endswith(f"_{self.metric}"))]
        if not keys:
            raise ValueError(f"SaveBestModel: the epoch's logs have no validation {self.metric!r} "
                             f"(got {sorted(logs or {})}): fit needs validation_data and the metric in compile")
        value = float(logs[keys[-1]])  # the last output's: the last stack
        if self._better(value):
            save_model(_network(self.model), self.path)
            self.best = {"epoch": epoch + 1, "metric": keys[-1], "value": value}
            with atomic_path(self.record_path) as temporary, open(temporary, "w", encoding="utf-8") as f:
                json.dump(self.best, f, indent=1)


def training_callbacks(work_dir: str, log_dir: Optional[str] = None,
                       best_metric: Optional[str] = None) -> List[tf.keras.callbacks.Callback]:
    """Callbacks for a resumable run in ``work_dir``.

    - ``BackupAndRestore`` (``work_dir/backup``): an interrupted ``fit`` called again with the
      same callbacks resumes after the last finished epoch, with optimiser state.
    - ``TerminateOnNaN``: stop at the first NaN loss.
    - :class:`SaveModelEachEpoch` to ``work_dir/model.keras``.
    - :class:`SaveBestModel` to ``work_dir/best.keras`` when ``best_metric`` (``"nme"``,
      ``"pck"`` or ``"mean_iu"``: :func:`best_epoch_metric`) is given: ``fit`` then needs
      ``validation_data`` and the model that metric (:func:`validation_metrics`).
    - ``TensorBoard`` logs when ``log_dir`` is given (validation scores too, under ``validation``).
    """
    for name, folder in (("work_dir", work_dir), ("log_dir", log_dir)):  # before fit writes anything
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{name}={folder!r} is a file, not a folder")
    callbacks = [
        tf.keras.callbacks.BackupAndRestore(os.path.join(work_dir, "backup")),
        tf.keras.callbacks.TerminateOnNaN(),
        SaveModelEachEpoch(os.path.join(work_dir, "model.keras")),
    ]
    if best_metric is not None:
        callbacks.append(SaveBestModel(os.path.join(work_dir, "best.keras"), best_metric))
    if log_dir:
        callbacks.append(tf.keras.callbacks.TensorBoard(log_dir))
    return callbacks
