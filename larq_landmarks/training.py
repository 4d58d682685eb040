"""Training with Keras ``fit``: the papers' loss, optimiser, schedule and callbacks (METHOD.md 3).

Use it as::

    with strategy.scope():                 # optional: any tf.distribute strategy
        model = BinaryHourglass(68)
        compile_model(model, steps_per_epoch=len_train // batch, epochs=100)
    model.fit(for_stacks(train, model), epochs=100, callbacks=training_callbacks("run/"))
"""
import os
import shutil
import tempfile
from typing import List, Optional, Sequence

import tensorflow as tf


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
) -> tf.keras.Model:
    """Compile with RMSprop and the papers' loss, applied to every stack and summed.

    With ``steps_per_epoch`` and ``epochs`` the learning rate follows :func:`step_schedule`;
    otherwise it is constant. Call it inside ``strategy.scope()`` when distributing.
    """
    if steps_per_epoch and epochs:
        rate = step_schedule(steps_per_epoch, epochs, learning_rate)
    else:
        rate = learning_rate
    model.compile(
        optimizer=tf.keras.optimizers.RMSprop(learning_rate=rate),
        loss=task_loss(task),
        metrics=metrics,
    )
    return model


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


class SaveModelEachEpoch(tf.keras.callbacks.Callback):
    """Write the model to ``path`` at the end of every epoch, atomically (see :func:`save_model`)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = os.fspath(path)

    def on_epoch_end(self, epoch, logs=None):
        save_model(self.model, self.path)


def training_callbacks(work_dir: str, log_dir: Optional[str] = None) -> List[tf.keras.callbacks.Callback]:
    """Callbacks for a resumable run in ``work_dir``.

    - ``BackupAndRestore`` (``work_dir/backup``): an interrupted ``fit`` called again with the
      same callbacks resumes after the last finished epoch, with optimiser state.
    - ``TerminateOnNaN``: stop at the first NaN loss.
    - :class:`SaveModelEachEpoch` to ``work_dir/model.keras``.
    - ``TensorBoard`` logs when ``log_dir`` is given.
    """
    callbacks = [
        tf.keras.callbacks.BackupAndRestore(os.path.join(work_dir, "backup")),
        tf.keras.callbacks.TerminateOnNaN(),
        SaveModelEachEpoch(os.path.join(work_dir, "model.keras")),
    ]
    if log_dir:
        callbacks.append(tf.keras.callbacks.TensorBoard(log_dir))
    return callbacks
