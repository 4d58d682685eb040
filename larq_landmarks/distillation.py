"""Knowledge distillation from a real-valued teacher into a binary student, trained with ``fit``.

As in the real-to-binary recipe (Martinez, Yang, Bulat & Tzimiropoulos, ICLR 2020): the student
learns the task's target, the teacher's heatmaps, and the teacher's attention maps at the outputs
of the blocks both networks share by name::

    teacher = BinaryHourglass(68, binary=False)          # trained first
    student = BinaryHourglass(68)
    distiller = Distiller(student, teacher)
    training.compile_model(distiller, steps_per_epoch=..., epochs=...)
    distiller.fit(data, ...)                             # callbacks, tf.distribute scopes as usual
    distiller.student                                    # the binary network to save and convert

An attention map is the mean over channels of the squared activations, flattened and scaled to
unit length (Zagoruyko & Komodakis); the attention loss is the mean over blocks of the squared
distance between the student's and the teacher's maps.
"""
from typing import List, Optional, Sequence

import tensorflow as tf


def block_outputs(model: tf.keras.Model) -> List[str]:
    """Names of the layers that end a residual block (``..._add``) inside the hourglasses and the
    stem: where attention maps are matched."""
    return [layer.name for layer in model.layers if layer.name.endswith("_add")]


def attention_map(features: tf.Tensor) -> tf.Tensor:
    """``(B, H, W, C)`` -> ``(B, H * W)``: mean of squares over channels, unit L2 norm per image."""
    energy = tf.reduce_mean(tf.square(tf.cast(features, tf.float32)), axis=-1)
    flat = tf.reshape(energy, (tf.shape(energy)[0], -1))
    return tf.math.l2_normalize(flat, axis=-1)


@tf.keras.utils.register_keras_serializable(package="larq_landmarks")
class Distiller(tf.keras.Model):
    """Trains ``student`` against the task loss given to ``compile`` plus a frozen ``teacher``.

    Args:
        student: the network to train (binary); ``call`` runs it.
        teacher: a trained network with the same outputs and, for the attention loss, layers of the
            same names at ``attention_layers`` (a real-valued twin from ``BinaryHourglass(...,
            binary=False)``); it is not trained.
        heatmap_weight: weight of the mean squared difference to the teacher's outputs.
        attention_weight: weight of the attention-map loss (0 switches it off).
        attention_layers: layer names whose outputs are matched; default :func:`block_outputs`
            of the student, those the teacher also has with the same spatial size.
    """

    def __init__(self, student: tf.keras.Model, teacher: tf.keras.Model, heatmap_weight: float = 1.0,
                 attention_weight: float = 1.0, attention_layers: Optional[Sequence[str]] = None, **kwargs):
        super().__init__(**kwargs)
        if len(student.outputs) != len(teacher.outputs):
            raise ValueError(f"student {student.name} has {len(student.outputs)} outputs, teacher "
                             f"{teacher.name} {len(teacher.outputs)}")
        for s, t in zip(student.outputs, teacher.outputs):
            if s.shape[1:] != t.shape[1:]:
                raise ValueError(f"student output {s.shape} and teacher output {t.shape} differ")
        if attention_layers is None:
            teacher_names = {layer.name for layer in teacher.layers}
            attention_layers = [n for n in block_outputs(student) if n in teacher_names
                                and student.get_layer(n).output.shape[1:3] == teacher.get_layer(n).output.shape[1:3]]
        for name in attention_layers:
            for model in (student, teacher):
                try:
                    model.get_layer(name)
                except ValueError as error:
                    raise ValueError(f"attention layer {name!r} is not in {model.name}") from error
        self.student, self.teacher = student, teacher
        self.teacher.trainable = False
        self.heatmap_weight, self.attention_weight = float(heatmap_weight), float(attention_weight)
        self.attention_layers = list(attention_layers)
        self._student_features = self._with_features(student)
        self._teacher_features = self._with_features(teacher)
        self.distillation_tracker = tf.keras.metrics.Mean(name="distillation_loss")
        self.build((None,) + tuple(student.input_shape[1:]))  # built now: checkpoints and saving need it

    def _with_features(self, model):
        layers = self.attention_layers if self.attention_weight else []
        # (a model of one output returns a tensor, not a list: callers flatten)
        return tf.keras.Model(model.inputs, list(model.outputs) + [model.get_layer(n).output for n in layers])

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def _distillation_loss(self, student_all, teacher_all):
        count = len(self.student.outputs)
        loss = 0.0
        for s, t in zip(student_all[:count], teacher_all[:count]):
            loss += self.heatmap_weight * tf.reduce_mean(tf.square(tf.cast(s, tf.float32) - tf.cast(t, tf.float32)))
        pairs = list(zip(student_all[count:], teacher_all[count:]))
        if pairs:
            attention = tf.add_n([tf.reduce_mean(tf.reduce_sum(tf.square(attention_map(s) - attention_map(t)), -1))
                                  for s, t in pairs])
            loss += self.attention_weight * attention / len(pairs)
        return loss

    def train_step(self, data):
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        teacher_all = tf.nest.flatten(self._teacher_features(x, training=False))
        with tf.GradientTape() as tape:
            student_all = tf.nest.flatten(self._student_features(x, training=True))
            count = len(self.student.outputs)
            predictions = student_all[0] if count == 1 else list(student_all[:count])
            task = self.compute_loss(x, y, predictions, sample_weight)  # already scaled per replica by Keras
            distillation = self._distillation_loss(student_all, teacher_all)
            total = task + distillation / self.distribute_strategy.num_replicas_in_sync
        # minimize scales the loss where the optimizer is a LossScaleOptimizer (mixed_float16)
        self.optimizer.minimize(total, self.student.trainable_variables, tape=tape)
        self.distillation_tracker.update_state(distillation)
        return self.compute_metrics(x, y, predictions, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        student_all = tf.nest.flatten(self._student_features(x, training=False))
        count = len(self.student.outputs)
        predictions = student_all[0] if count == 1 else list(student_all[:count])
        self.compute_loss(x, y, predictions, sample_weight)
        self.distillation_tracker.update_state(
            self._distillation_loss(student_all, tf.nest.flatten(self._teacher_features(x, training=False))))
        return self.compute_metrics(x, y, predictions, sample_weight)

    def get_config(self):
        return {"student": tf.keras.layers.serialize(self.student), "teacher": tf.keras.layers.serialize(self.teacher),
                "heatmap_weight": self.heatmap_weight, "attention_weight": self.attention_weight,
                "attention_layers": list(self.attention_layers), "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        student = tf.keras.layers.deserialize(config.pop("student"), custom_objects=custom_objects)
        teacher = tf.keras.layers.deserialize(config.pop("teacher"), custom_objects=custom_objects)
        return cls(student, teacher, **config)
