"""Conversion to TFLite flatbuffers: LCE's bit-packed binary ops, or plain TFLite as reference.

``convert(model, "model.tflite")`` writes the last stack's heatmaps as the only output. For a
binary model, every Larq ``QuantConv2D`` should become one ``LceBconv2d``; :func:`convert` warns,
naming the layers, when the flatbuffer has fewer (LCE fell back to float for them).
"""
import collections
import threading
import warnings
from typing import Counter, Optional

import larq as lq
import larq_compute_engine as lce
import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema

from larq_landmarks.atomic import atomic_path


class NotOurModelError(ValueError):
    """A file is not a TFLite flatbuffer (or not one this library wrote)."""


def last_stack(model: tf.keras.Model) -> tf.keras.Model:
    """The model with only its last output (the last stack's heatmaps or logits)."""
    if len(model.outputs) == 1:
        return model
    return tf.keras.Model(model.inputs, model.outputs[-1], name=model.name)


def op_counts(flatbuffer: bytes) -> Counter:
    """How many times each operator occurs in a TFLite flatbuffer (custom ops by name)."""
    try:
        tflite = schema.Model.GetRootAsModel(flatbuffer, 0)
        codes = []
        for i in range(tflite.OperatorCodesLength()):
            code = tflite.OperatorCodes(i)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == schema.BuiltinOperator.CUSTOM:
                codes.append(code.CustomCode().decode())
            else:
                names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
                codes.append(names.get(builtin, str(builtin)))
        counts = collections.Counter()
        for s in range(tflite.SubgraphsLength()):
            subgraph = tflite.Subgraphs(s)
            for o in range(subgraph.OperatorsLength()):
                counts[codes[subgraph.Operators(o).OpcodeIndex()]] += 1
    except Exception as error:
        raise NotOurModelError(f"not a TFLite flatbuffer ({error})") from error
    if not counts:
        raise NotOurModelError("the flatbuffer holds no operators")
    return counts


def convert(
    model: tf.keras.Model,
    path: Optional[str] = None,
    binary: bool = True,
    batch_size: Optional[int] = 1,
) -> bytes:
    """Convert ``model`` (its last stack) to a flatbuffer, and write it to ``path`` if given.

    Args:
        model: a Keras model from :func:`larq_landmarks.models.BinaryHourglass`.
        path: where to write the ``.tflite`` (atomically); None only returns the bytes.
        binary: convert with LCE (binary convolutions become bit-packed ``LceBconv2d``); False
            gives a plain float32 TFLite model (Larq quantizers run as float ops).
        batch_size: fixed batch size of the converted model; None keeps it dynamic.
    """
    single = last_stack(model)
    if batch_size is not None:
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


def _convert_frozen(model: tf.keras.Model, binary: bool) -> bytes:
    """Convert the inference graph of ``model`` (fixed input shape), its variables frozen to
    constants, without exporting a SavedModel first: the export is most of the time (5 vs 27 s
    for the default model here), and the operators and outputs are the same
    (tests/test_export.py compares the two). Binary: LCE's converter on the frozen graph, the
    path ``lce.convert_keras_model`` itself takes when its SavedModel export fails; float:
    TFLite's converter on the frozen concrete function. The file has no SignatureDef."""
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
        False,  # should_quantize: the graph has no fake-quantisation ops
        "arm",  # target
        None,  # experimental_default_int8_range
    )


def binary_layers(model: tf.keras.Model):
    """The Larq ``QuantConv2D`` layers of ``model`` (nested models included)."""
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


def verify(flatbuffer: bytes, name: str = "model") -> None:
    """:func:`larq_landmarks.runtime.graph.verify_flatbuffer` as this module's error: every
    interpreter here is given only complete, well-formed files (a truncated one crashes TFLite)."""
    from larq_landmarks.runtime.graph import CorruptModelError, verify_flatbuffer

    try:
        verify_flatbuffer(flatbuffer, name)
    except CorruptModelError as error:
        raise NotOurModelError(str(error)) from error


def load_flatbuffer(path: str) -> bytes:
    """Read a ``.tflite`` file, checking that it is a TFLite flatbuffer."""
    with open(path, "rb") as f:
        data = f.read()
    verify(data, str(path))
    try:
        op_counts(data)
    except NotOurModelError as error:
        raise NotOurModelError(f"{path}: {error}") from error
    return data


def interpreter(flatbuffer: bytes, num_threads: int = 1, use_xnnpack: bool = False,
                use_indirect_bgemm: bool = True):
    """LCE's Python interpreter (runs both LCE and plain TFLite models) for ``flatbuffer``;
    ``use_xnnpack`` delegates the float ops to XNNPACK. ``use_indirect_bgemm`` (default on) picks
    LCE's indirect-BGEMM binary convolution: on x86-64 its default kernel made the binary model
    3x slower than float, this one 1.5x faster (docs/benchmarks.md)."""
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    verify(flatbuffer)
    return Interpreter(flatbuffer, num_threads=num_threads, use_xnnpack=use_xnnpack,
                       use_indirect_bgemm=use_indirect_bgemm)


ENGINES = ("auto", "runtime", "lce", "cuda")


class TfliteModel:
    """A converted ``.tflite`` ready to run: ``predict(images)`` for any batch size.

    Args:
        flatbuffer: the file's bytes.
        engine: ``"runtime"`` (this package's bit-packed kernels, :mod:`larq_landmarks.runtime`),
            ``"lce"`` (LCE's interpreter) or ``"auto"``: the runtime, falling back to LCE's
            interpreter with a warning that names the reason when the runtime cannot run the file;
            ``"cuda"``: the runtime's GPU kernels (CuPy and an NVIDIA GPU; no fallback).
        num_threads: threads for the CPU engines.
        name: how errors and warnings refer to the file.

    Attributes:
        engine: the engine that runs it (``"runtime"``, ``"lce"`` or ``"cuda"``); ``kernels``: the runtime's
        kernel path, or None under LCE; ``input_shape`` and ``output_shape`` as stored.
    """

    def __init__(self, flatbuffer: bytes, engine: str = "auto", num_threads: int = 1, name: str = "model"):
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}; use one of {ENGINES}")
        verify(flatbuffer, name)
        self.kernels = None
        if engine == "cuda":
            from larq_landmarks.runtime import Engine

            runtime = Engine(flatbuffer, kernels="cuda", name=name)
            self.engine, self.kernels = "cuda", runtime.kernels
            self.input_shape, self.output_shape = runtime.input_shape, runtime.output_shape
            self._predict = runtime.predict
            return
        if engine in ("auto", "runtime"):
            from larq_landmarks.runtime import Engine, UnsupportedModelError

            try:
                runtime = Engine(flatbuffer, num_threads=num_threads, name=name)
            except UnsupportedModelError as error:
                if engine == "runtime":
                    raise
                warnings.warn(f"{error}; running {name} with LCE's interpreter instead", stacklevel=2)
            else:
                self.engine, self.kernels = "runtime", runtime.kernels
                self.input_shape, self.output_shape = runtime.input_shape, runtime.output_shape
                self._predict = runtime.predict
                return
        lce_interpreter = interpreter(flatbuffer, num_threads)
        self.engine = "lce"
        self.input_shape, self.output_shape = tuple(lce_interpreter.input_shapes[0]), tuple(lce_interpreter.output_shapes[0])
        fixed_batch = self.input_shape[0]
        one_at_a_time = threading.Lock()  # the interpreter's tensors are shared: no two runs at once

        def predict(images):
            with one_at_a_time:
                if fixed_batch == 1 and len(images) != 1:
                    return np.concatenate([lce_interpreter.predict(images[i : i + 1]) for i in range(len(images))])
                return lce_interpreter.predict(images)

        self._predict = predict

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Heatmaps (or logits) for ``(B, S, S, 3)`` float32 images; several threads may call it
        at once. On the ``"cuda"`` engine a CuPy array in gives a CuPy array out."""
        if self.engine == "cuda" and hasattr(images, "__cuda_array_interface__"):
            return self._predict(images)
        return self._predict(np.asarray(images, np.float32))
