"""Conversion to TFLite flatbuffers: LCE's bit-packed binary ops, or plain TFLite as reference.

``convert(model, "model.tflite")`` writes the last stack's heatmaps as the only output. For a
binary model, every Larq ``QuantConv2D`` should become one ``LceBconv2d``; :func:`convert` warns,
naming the layers, when the flatbuffer has fewer (LCE fell back to float for them).
"""
import os
import warnings
from typing import Optional

import larq as lq
import larq_compute_engine as lce
import numpy as np
import tensorflow as tf

from larq_landmarks import models, quantization
from larq_landmarks.atomic import atomic_path
# what runs a converted file, here for the callers that import it from this module
from larq_landmarks.tflite_model import (  # noqa: F401
    ENGINES,
    NotOurModelError,
    TfliteModel,
    interpreter,
    load_flatbuffer,
    op_counts,
    verify,
)


def last_stack(model: tf.keras.Model) -> tf.keras.Model:
    """The model with only its last output (the last stack's heatmaps or logits)."""
    if len(model.outputs) == 1:
        return model
    return tf.keras.Model(model.inputs, model.outputs[-1], name=model.name)


def convert(
    model: tf.keras.Model,
    path: Optional[str] = None,
    binary: bool = True,
    batch_size: Optional[int] = 1,
    int8_calibration: Optional[np.ndarray] = None,
) -> bytes:
    """Convert ``model`` (its last stack) to a flatbuffer, and write it to ``path`` if given.

    Args:
        model: a Keras model from :func:`larq_landmarks.models.BinaryHourglass`; one trained in
            mixed precision is converted as its float32 copy (:func:`models.float32_model`).
        path: where to write the ``.tflite`` (atomically); None only returns the bytes.
        binary: convert with LCE (binary convolutions become bit-packed ``LceBconv2d``); False
            gives a plain float32 TFLite model (Larq quantizers run as float ops).
        batch_size: fixed batch size of the converted model; None keeps it dynamic.
        int8_calibration: ``(N, H, W, C)`` images as the model takes them (its crops, a few dozen):
            the LCE file's activations and float weights become int8, each tensor's range
            measured on these (:mod:`larq_landmarks.quantization`); input and output stay float32.
            For LCE's int8 kernels (ARM); this package's runtime runs it too, in its own int8
            arithmetic (``runtime.Engine``).
    """
    _check_keras_model(model)
    model = models.float32_model(model)
    if path and os.path.isdir(path):  # before the conversion (the write comes last)
        raise ValueError(f"{path} is a folder; give the .tflite file to write, e.g. {os.path.join(path, 'model.tflite')}")
    single = last_stack(model)
    if len(single.inputs) != 1 or None in single.input_shape[1:]:
        raise ValueError(f"{model.name}: convert needs one input of fixed height, width and channels, got "
                         f"{single.input_shape} (build the model with a fixed input size)")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None (dynamic)")
    if int8_calibration is not None:
        if not binary:
            raise ValueError("int8_calibration is for LCE files (binary=True); a float file stays float32")
        single = quantization.fake_quantized(single, int8_calibration, batch_size)
        flatbuffer = _convert_frozen(single, binary, int8=True) if batch_size is not None \
            else lce.convert_keras_model(single)
    elif batch_size is not None:
        inputs = tf.keras.Input(single.input_shape[1:], batch_size=batch_size, name="image")
        single = tf.keras.Model(inputs, single(inputs), name=model.name)
        flatbuffer = _convert_frozen(single, binary)
    elif binary:  # a SavedModel keeps the batch size open; the frozen graph cannot
        flatbuffer = lce.convert_keras_model(single)
    else:
        flatbuffer = tf.lite.TFLiteConverter.from_keras_model(single).convert()
    if binary:
        _warn_float_fallback(model, flatbuffer)
    if path:
        with atomic_path(path) as temporary, open(temporary, "wb") as f:
            f.write(flatbuffer)
    return flatbuffer


def _convert_frozen(model: tf.keras.Model, binary: bool, int8: bool = False) -> bytes:
    """Convert the inference graph of ``model`` (fixed input shape), its variables frozen to
    constants, without exporting a SavedModel first: the export is most of the time (5 vs 27 s
    for the default model here), and the operators and outputs are the same
    (tests/test_export.py compares the two). Binary: LCE's converter on the frozen graph, the
    path ``lce.convert_keras_model`` itself takes when its SavedModel export fails; float:
    TFLite's converter on the frozen concrete function. The file has no SignatureDef. ``int8``:
    the graph's fake-quantisation ops make its tensors int8 (LCE)."""
    from tensorflow.core.framework.types_pb2 import DataType
    from tensorflow.lite.python.util import get_tensor_name
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec(model.input_shape, tf.float32, name="image")
    function = tf.function(lambda image: model(image, training=False)).get_concrete_function(spec)
    if not binary:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
        converter.experimental_lower_to_saved_model = False
        return converter.convert()
    try:
        from larq_compute_engine.mlir._tf_tfl_flatbuffer import convert_graphdef_to_tflite_flatbuffer
    except ImportError:  # an LCE without this module: its public converter (slower, same result)
        return lce.convert_keras_model(model)
    frozen = convert_variables_to_constants_v2(function, lower_control_flow=False)
    inputs = [t for t in frozen.inputs if t.dtype != tf.resource]
    return convert_graphdef_to_tflite_flatbuffer(
        frozen.graph.as_graph_def().SerializeToString(),
        [get_tensor_name(t) for t in inputs],
        [DataType.Name(t.dtype.as_datatype_enum) for t in inputs],
        [t.shape.as_list() for t in inputs],
        [get_tensor_name(t) for t in frozen.outputs],
        int8,  # should_quantize: the graph's fake-quantisation ops give int8 tensors
        "arm",  # target
        None,  # experimental_default_int8_range
    )


def _check_keras_model(model) -> None:
    if not isinstance(model, tf.keras.Model):
        raise TypeError(f"model must be a Keras model, got {type(model).__name__} "
                        "(a saved one: tf.keras.models.load_model(path) first)")


def binary_layers(model: tf.keras.Model):
    """The Larq ``QuantConv2D`` layers of ``model`` (nested models included)."""
    _check_keras_model(model)
    return [l for l in model.submodules if isinstance(l, lq.layers.QuantConv2D)]


def _warn_float_fallback(model, flatbuffer):
    layers = binary_layers(model)
    converted = op_counts(flatbuffer).get("LceBconv2d", 0)
    if converted < len(layers):
        names = [l.name for l in layers if not _lce_convertible(l)] or [l.name for l in layers]
        warnings.warn(
            f"LCE converted {converted} of {len(layers)} binary convolutions to LceBconv2d; "
            f"these stayed float: {', '.join(names)}",
            stacklevel=3,
        )


def _lce_convertible(layer) -> bool:
    """What LCE needs to see to emit LceBconv2d (see LCE's converter docs)."""
    input_ok = getattr(layer.input_quantizer, "__class__", type(None)).__name__ in ("SteSign", "ApproxSign", "SwishSign")
    kernel_ok = getattr(layer.kernel_quantizer, "__class__", type(None)).__name__ in ("SteSign", "MagnitudeAwareSign")
    return input_ok and kernel_ok and not layer.use_bias
