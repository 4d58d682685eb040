"""int8 activations for LCE files: post-training calibration of every tensor's range.

LCE's converter writes int8 tensors where the graph has fake-quantisation ops (it takes no
representative data set; its ``experimental_default_int8_range`` gives every other tensor one
range, which moves a trained model's landmarks by pixels). :func:`fake_quantized` measures each
layer's output range on calibration images (the model's own input crops) and returns the model
with a ``fake_quant_with_min_max_args`` after every layer, so that :func:`larq_landmarks.export.convert`
(``int8_calibration=images``) writes a file whose activations and float weights are all int8:
binary convolutions stay bit-packed, with int8 in and out where they were float.

What the converter needs, and how the clone meets it:
- a concatenation, max or average pool, or nearest upsampling has one scale for its inputs and
  output: they share the union of their ranges;
- a convolution read only by a batch norm is folded with it (LCE's output transform, TFLite's
  bias): no range between them; nor after that batch norm where only binary convolutions read it
  (LCE writes its bits from the first convolution);
- a batch norm elsewhere becomes a MUL and an ADD: the MUL's output gets its own range; an ``Add``
  of more than two inputs becomes a chain of ADDs: each partial sum gets its own;
- a layer that is 0 on every calibration image takes its inputs' range (int8 kernels refuse
  scales far from their neighbours');
- a float convolution without a bias gets a negligible one of its own (1e-9 scale; it rounds to
  zero in int32), as TFLite's converter otherwise shares one zero constant between convolutions and
  an int8 op, and writes it as an int8 bias that TFLite refuses.

The same clone trains: :func:`int8_fine_tune` fits the model through it for a few hundred steps
(quantisation-aware training), so that its weights learn the int8 activations' rounding before the
model is converted.
"""
import numbers
from typing import Dict, List, Optional, Tuple

import larq as lq
import numpy as np
import tensorflow as tf

Range = Tuple[float, float]
# A layer's output range narrower than this fraction of its inputs' (a batch norm of a constant,
# say: its outputs all within float32's rounding of 0) is widened to its inputs' range: its values
# still quantise to 0, and its scale stays near its neighbours', as int8 kernels need (XNNPACK
# refuses scale ratios beyond 2^8 or under 2^-32 in its ADD and CONV_2D: LCE's interpreter with
# XNNPACK aborted on a file with a range of 1.5e-6 between ranges of about 4 and 40).
COLLAPSED = 1e-5
# ops whose int8 inputs and output share one scale (TFLite's same-scale constraint)
SAME_SCALE = (tf.keras.layers.Concatenate, tf.keras.layers.MaxPooling2D, tf.keras.layers.AveragePooling2D,
              tf.keras.layers.UpSampling2D)


def _inputs_of(layer: tf.keras.layers.Layer) -> List[tf.keras.layers.Layer]:
    inbound = layer._inbound_nodes[0].inbound_layers
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]


def _batch_norm_affine(layer: tf.keras.layers.BatchNormalization) -> Tuple[tf.Tensor, tf.Tensor]:
    """The batch norm's inference form ``x * scale + offset``."""
    scale = tf.math.rsqrt(layer.moving_variance + layer.epsilon)
    if layer.scale:
        scale = scale * layer.gamma
    offset = -layer.moving_mean * scale + (layer.beta if layer.center else 0.0)
    return scale, offset


def _check_model(model: tf.keras.Model) -> List[tf.keras.layers.Layer]:
    layers = [l for l in model.layers if not isinstance(l, tf.keras.layers.InputLayer)]
    for layer in layers:
        if layer.dtype_policy.name != "float32":
            raise ValueError(f"{model.name}: int8 calibration needs a float32 model; {layer.name} computes in "
                             f"{layer.dtype_policy.name} (use larq_landmarks.models.float32_model(model))")
        if isinstance(layer, tf.keras.Model) or len(layer._inbound_nodes) != 1:
            raise ValueError(f"{model.name}: int8 calibration needs a flat functional model with each layer called "
                             f"once; {layer.name} is a nested model or a shared layer")
        if isinstance(layer, tf.keras.layers.BatchNormalization) and (layer.axis not in (-1, [-1], [3], 3)):
            raise ValueError(f"{model.name}: {layer.name} normalises axis {layer.axis}; channels-last only")
    return layers


def _check_images(model: tf.keras.Model, images) -> np.ndarray:
    images = np.asarray(images)
    expected = tuple(model.input_shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
        raise ValueError(f"int8_calibration: expected images of shape (N, {', '.join(map(str, expected))}) "
                         f"with N >= 1 (the model's input crops), got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating) or not np.isfinite(images).all():
        raise ValueError(f"int8_calibration: expected finite float images, got {images.dtype}"
                         + ("" if not np.issubdtype(images.dtype, np.floating) else " with NaN or infinity"))
    return images.astype(np.float32)


def activation_ranges(model: tf.keras.Model, images, batch_size: int = 1) -> Dict[str, Dict[str, Range]]:
    """Each layer's output range over ``images`` (``(N, H, W, C)`` crops as the model takes them),
    widened to include 0 (int8's zero point must be exact); a range under ``COLLAPSED`` of its
    inputs' (a layer that is 0 on every image) is its inputs'. Every layer's output of ``batch_size``
    images is held at once (under 1 GB an image for the default 256x256 model).

    Returns ``{"input": {"input": range}, "output": {layer name: range}, "scaled": {batch norm
    name: range of its input times its scale}, "partial": {"partial:<add>:<k>": range}}``
    (``scaled``: the MUL of a batch norm that is not folded into a convolution; ``partial``: the
    first k + 1 inputs' sum of an ``Add`` of more than two, which TFLite computes as a chain)."""
    layers = _check_model(model)
    images = _check_images(model, images)
    probe = tf.keras.Model(model.inputs, [l.output for l in layers])
    # one graph for every batch (eagerly, each image ran the model op by op: 0.25 s a 64x64 crop)
    run = tf.function(lambda batch: probe(batch, training=False),
                      input_signature=[tf.TensorSpec((None, *images.shape[1:]), tf.float32)])
    low: Dict[str, float] = {}
    high: Dict[str, float] = {}

    def widen(name, values):
        low[name] = min(low.get(name, 0.0), float(np.min(values)))
        high[name] = max(high.get(name, 0.0), float(np.max(values)))

    norms = {l.name: _batch_norm_affine(l) for l in layers if isinstance(l, tf.keras.layers.BatchNormalization)}
    sums = [l for l in layers if isinstance(l, tf.keras.layers.Add) and len(_inputs_of(l)) > 2]
    for start in range(0, len(images), batch_size):
        outputs = run(tf.convert_to_tensor(images[start:start + batch_size], tf.float32))
        values = {l.name: o.numpy() for l, o in zip(layers, outputs if isinstance(outputs, list) else [outputs])}
        for name, value in values.items():
            widen(name, value)
            if name in norms:
                widen("scaled:" + name, value - norms[name][1].numpy())
        for layer in sums:  # an ADD of n inputs is n - 1 ADDs: their partial sums
            terms = [values.get(l.name, images[start:start + batch_size]) for l in _inputs_of(layer)]
            partial = terms[0]
            for k, term in enumerate(terms[1:-1], start=1):
                partial = partial + term
                widen(f"partial:{layer.name}:{k}", partial)
    ranges = {l.name: (low[l.name], high[l.name]) for l in layers}
    input_range = (min(0.0, float(images.min())), max(0.0, float(images.max())))
    for layer in layers:  # a layer that is (all but) zero on every image takes its inputs' range
        width = ranges[layer.name][1] - ranges[layer.name][0]
        sources = [ranges.get(l.name, input_range) for l in _inputs_of(layer)]
        union = (min(r[0] for r in sources), max(r[1] for r in sources))
        if width < COLLAPSED * (union[1] - union[0]):
            ranges[layer.name] = union
    for _ in range(len(layers)):  # same-scale ops share their inputs' and output's union, until it holds
        changed = False
        for layer in layers:
            if isinstance(layer, SAME_SCALE):
                names = [l.name for l in _inputs_of(layer) if l.name in ranges] + [layer.name]
                union = (min(ranges[n][0] for n in names), max(ranges[n][1] for n in names))
                changed |= any(ranges[n] != union for n in names)
                ranges.update({n: union for n in names})
        if not changed:
            break
    return {"input": {"input": input_range},
            "output": ranges,
            "scaled": {n: (low["scaled:" + n], high["scaled:" + n]) for n in norms},
            "partial": {n: (low[n], high[n]) for n in low if n.startswith("partial:")}}


def _fake_quant(x, bounds: Range):
    low, high = bounds
    return tf.quantization.fake_quant_with_min_max_args(x, low, max(high, low + 1e-6), num_bits=8)


class _FakeQuantizedLayer(tf.keras.layers.Layer):
    """``layer`` (the original, its weights shared) with its output fake-quantised to ``output``
    (None: left float, to be folded into what reads it); a batch norm as its MUL (quantised to
    ``scaled`` where given) and ADD. For conversion only: not serialisable."""

    def __init__(self, layer, output: Optional[Range], scaled: Optional[Range] = None,
                 partial: Optional[List[Range]] = None):
        super().__init__(name=layer.name + "_int8")
        self.layer, self.output_range, self.scaled_range, self.partial_ranges = layer, output, scaled, partial

    def call(self, inputs):
        layer = self.layer
        if self.partial_ranges:  # an Add of more than two inputs, as the chain of ADDs it becomes
            y = inputs[0]
            for term, bounds in zip(inputs[1:-1], self.partial_ranges):
                y = _fake_quant(y + term, bounds)
            y = y + inputs[-1]
        elif isinstance(layer, tf.keras.layers.BatchNormalization):
            scale, offset = _batch_norm_affine(layer)
            y = inputs * scale
            if self.scaled_range is not None:
                y = _fake_quant(y, self.scaled_range)
            y = y + offset
        else:
            y = layer(inputs, training=False)
        if self.output_range is None:
            return y
        if isinstance(layer, tf.keras.layers.Conv2D) and not isinstance(layer, lq.layers.QuantConv2D) \
                and not layer.use_bias:
            # a bias of its own (see the module's docstring), different in every layer
            y = y + tf.constant(np.arange(1, layer.filters + 1, dtype=np.float32) * 1e-9 * (1 + len(self.name)))
        return _fake_quant(y, self.output_range)


def fake_quantized(model: tf.keras.Model, images, batch_size: Optional[int] = 1) -> tf.keras.Model:
    """``model`` with every activation fake-quantised to its range over ``images``
    (:func:`activation_ranges`), its input too, for LCE's converter (``batch_size``: the input's,
    None keeping it open). The layers (and weights) are ``model``'s own: fitting the clone trains
    ``model`` (its batch norms in their inference form, their statistics frozen)."""
    ranges = activation_ranges(model, images)  # checks the model and the images
    layers = [l for l in model.layers if not isinstance(l, tf.keras.layers.InputLayer)]
    readers: Dict[str, list] = {}
    for layer in layers:
        for source in _inputs_of(layer):
            readers.setdefault(source.name, []).append(layer)

    def folded(layer):  # a convolution whose only reader is a batch norm
        read_by = readers.get(layer.name, [])
        return isinstance(layer, tf.keras.layers.Conv2D) and len(read_by) == 1 and \
            isinstance(read_by[0], tf.keras.layers.BatchNormalization)

    def packed(layer):  # a binary convolution's batch norm read by binary convolutions only: LCE
        # writes its bits from the convolution (bit-packed output), no int8 tensor between
        read_by, source = readers.get(layer.name, []), _inputs_of(layer)[0]
        return isinstance(layer, tf.keras.layers.BatchNormalization) and isinstance(source, lq.layers.QuantConv2D) \
            and folded(source) and bool(read_by) and all(isinstance(r, lq.layers.QuantConv2D) for r in read_by)

    def fake_quantized_layer(layer):
        if folded(layer) or packed(layer):
            return _FakeQuantizedLayer(layer, None)
        after_folded = isinstance(layer, tf.keras.layers.BatchNormalization) and folded(_inputs_of(layer)[0])
        partial = [ranges["partial"][f"partial:{layer.name}:{k}"] for k in range(1, len(_inputs_of(layer)) - 1)] \
            if isinstance(layer, tf.keras.layers.Add) else None
        return _FakeQuantizedLayer(layer, ranges["output"][layer.name],
                                   None if after_folded else ranges["scaled"].get(layer.name), partial)

    # the graph built once, layer by layer (model.layers is in topological order); cloning the model
    # and calling the clone on a new input built it twice, 7 s of the demo model's 9
    inputs = tf.keras.Input(model.input_shape[1:], batch_size=batch_size, name="image")
    tensors = {model.inputs[0]._keras_history.layer.name: _fake_quant(inputs, ranges["input"]["input"])}
    for layer in layers:
        sources = [tensors[source.name] for source in _inputs_of(layer)]
        tensors[layer.name] = fake_quantized_layer(layer)(sources[0] if len(sources) == 1 else sources)
    outputs = [tensors[output._keras_history.layer.name] for output in model.outputs]
    return tf.keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name=model.name + "_int8")


def int8_fine_tune(model: tf.keras.Model, dataset: tf.data.Dataset, int8_calibration, steps: int,
                   learning_rate: float = 2e-5, task: str = "heatmaps",
                   callbacks: Optional[list] = None, verbose: int = 0) -> tf.keras.callbacks.History:
    """Quantisation-aware fine-tuning: ``steps`` steps of ``fit`` on ``dataset`` through
    :func:`fake_quantized` (ranges from ``int8_calibration``, crops as the model takes them), so
    that ``model``'s weights, updated in place, learn the int8 activations' rounding. Convert it
    afterwards with ``export.convert(model, path, int8_calibration=...)``, the same crops.

    Args:
        model: a trained model (one output per stack).
        dataset: its training data, ``(images, target)`` batches as ``fit`` takes them for one
            stack (repeated here for every stack), e.g. ``pipeline.landmark_dataset(...)``.
        int8_calibration: calibration crops, ``(N, H, W, C)`` float (a few dozen).
        steps: training steps (a few hundred: the demo's model, trained 1,000, took 300).
        learning_rate: Adam's rate, constant; low, as at the end of training.
        task: ``"heatmaps"`` (MSE) or ``"segmentation"`` (cross-entropy), as in training.
        callbacks, verbose: as ``fit`` takes them.

    Returns ``fit``'s history. Batch norms keep their moving statistics (they run in their
    inference form, as in the int8 file); their scale and offset train."""
    from larq_landmarks import training

    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps: expected a positive number of training steps, got {steps!r}")
    aware = fake_quantized(model, int8_calibration, batch_size=None)
    training.compile_model(aware, task, learning_rate=learning_rate)
    return aware.fit(training.for_stacks(dataset, model), epochs=1, steps_per_epoch=int(steps),
                     callbacks=callbacks, verbose=verbose)
