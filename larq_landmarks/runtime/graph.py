"""A TFLite flatbuffer read into plain Python: tensors (shape, type, constant data) and operators
(name, inputs, outputs, options), with the ``tflite`` schema package and ``flatbuffers`` for LCE's
custom-op options. No TensorFlow and no LCE are needed.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np


class UnsupportedModelError(ValueError):
    """The runtime cannot run this file (an op or option it does not implement, or a file that is
    not a TFLite flatbuffer); the message names the file and what is missing."""


class CorruptModelError(ValueError):
    """The file is not a complete, well-formed TFLite flatbuffer (truncated, corrupted, or not a
    model at all); the message names the file. No interpreter should be given it."""


_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 9: np.int8}


@dataclasses.dataclass
class Tensor:
    index: int
    name: str
    shape: tuple  # as stored (batch 1 for fixed-batch files)
    dtype: Any  # numpy dtype
    data: Optional[np.ndarray]  # constant values, or None for activations
    # an int8 or int32 tensor's quantisation: (scales, zero points), one each or one per slice of
    # axis 0 (a CONV_2D's int8 weights and int32 bias); None where the file gives none, or gives
    # them along another axis (no op the runtime runs takes that)
    quantization: Optional[Tuple[np.ndarray, np.ndarray]] = None


@dataclasses.dataclass
class Operator:
    index: int
    name: str  # builtin name (CONV_2D) or custom code (LceBconv2d)
    inputs: List[int]  # tensor indices, -1 for an omitted optional input
    outputs: List[int]
    options: Any  # the builtin options table (tflite.*Options) or a dict of custom options


@dataclasses.dataclass
class Graph:
    name: str  # the file, for error messages
    tensors: List[Tensor]
    operators: List[Operator]
    inputs: List[int]
    outputs: List[int]


def builtin_names() -> Dict[int, str]:
    """TFLite builtin operator codes -> names (CONV_2D, ...), from the schema package."""
    import tflite

    return {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


def _options_class(op):
    import tflite

    kind = op.BuiltinOptionsType()
    if kind == 0:
        return None
    class_names = {v: k for k, v in vars(tflite.BuiltinOptions).items() if not k.startswith("_")}
    cls = getattr(tflite, class_names[kind])
    table = op.BuiltinOptions()
    options = cls()
    options.Init(table.Bytes, table.Pos)
    return options


def verify_flatbuffer(flatbuffer: bytes, name: str = "model") -> None:
    """Check that ``flatbuffer`` is a complete TFLite model before any interpreter sees it: the
    identifier, the root table, every buffer (inside the file, or its external data within the
    file's size), every operator code, subgraph, tensor and operator, with every index in range.

    Raises:
        CorruptModelError: naming ``name`` and the first thing wrong (a truncated file reads
            past its end).
    """
    import struct

    import tflite

    def fail(reason: str):
        raise CorruptModelError(f"{name}: not a complete TFLite flatbuffer ({reason})")

    size = len(flatbuffer)
    if flatbuffer[:4] == b"PK\x03\x04" or flatbuffer[:8] == b"\x89HDF\r\n\x1a\n":
        raise CorruptModelError(f"{name}: a Keras model (.keras or .h5), not a .tflite: convert it with "
                                "larq_landmarks.export.convert (`larq-landmarks convert`), or run it with "
                                "larq_landmarks.predictor.Predictor.from_path")
    if size < 8 or flatbuffer[4:8] != b"TFL3":
        fail("no 'TFL3' identifier")

    def count(length: int, what: str) -> int:
        if length < 0 or length > size // 4:  # every element takes at least 4 bytes
            fail(f"{what}: {length} entries in a {size}-byte file")
        return length

    def indices(values, limit: int, what: str, optional: bool = False):
        values = np.asarray(values).reshape(-1)
        low = -1 if optional else 0
        if values.size and (values.min() < low or values.max() >= limit):
            fail(f"{what} refers to index {int(values.max() if values.max() >= limit else values.min())} "
                 f"of {limit}")

    try:
        model = tflite.Model.GetRootAsModel(flatbuffer, 0)
        buffers = count(model.BuffersLength(), "buffers")
        for i in range(buffers):
            buffer = model.Buffers(i)
            if buffer.Offset() > 1:
                if buffer.Offset() + buffer.Size() > size:
                    fail(f"buffer {i} ends at byte {buffer.Offset() + buffer.Size()}, past the file's {size}")
            elif buffer.DataLength():
                count(buffer.DataLength() // 4, f"buffer {i}")
                buffer.DataAsNumpy()
        codes = count(model.OperatorCodesLength(), "operator codes")
        for i in range(codes):
            code = model.OperatorCodes(i)
            code.BuiltinCode(), code.DeprecatedBuiltinCode(), code.CustomCode()
        subgraphs = count(model.SubgraphsLength(), "subgraphs")
        if subgraphs < 1:
            fail("no subgraph")
        for g in range(subgraphs):
            subgraph = model.Subgraphs(g)
            tensors = count(subgraph.TensorsLength(), "tensors")
            for i in range(tensors):
                tensor = subgraph.Tensors(i)
                tensor.Name(), tensor.Type(), tensor.ShapeAsNumpy() if tensor.ShapeLength() else None
                indices([tensor.Buffer()], buffers, f"tensor {i}")
            for i in range(count(subgraph.OperatorsLength(), "operators")):
                op = subgraph.Operators(i)
                indices([op.OpcodeIndex()], codes, f"operator {i}")
                indices(op.InputsAsNumpy() if op.InputsLength() else [], tensors, f"operator {i}'s inputs", True)
                indices(op.OutputsAsNumpy() if op.OutputsLength() else [], tensors, f"operator {i}'s outputs")
                if op.CustomOptionsLength():
                    op.CustomOptionsAsNumpy()
            if not subgraph.InputsLength() or not subgraph.OutputsLength():
                fail(f"subgraph {g} has no inputs or no outputs")
            indices(subgraph.InputsAsNumpy(), tensors, f"subgraph {g}'s inputs")
            indices(subgraph.OutputsAsNumpy(), tensors, f"subgraph {g}'s outputs")
    except CorruptModelError:
        raise
    except (IndexError, struct.error, ValueError, TypeError, AttributeError, UnicodeDecodeError) as error:
        fail(f"{type(error).__name__}: {error}")


def read_graph(flatbuffer: bytes, name: str = "model") -> Graph:
    """Parse the first subgraph of ``flatbuffer``; ``name`` is how errors refer to the file.

    Raises:
        CorruptModelError: the file is truncated or corrupt (:func:`verify_flatbuffer`).
        UnsupportedModelError: it holds what the runtime does not run."""
    import tflite
    from flatbuffers import flexbuffers

    verify_flatbuffer(flatbuffer, name)
    try:
        model = tflite.Model.GetRootAsModel(flatbuffer, 0)
        if model.SubgraphsLength() != 1:
            raise UnsupportedModelError(f"{name}: {model.SubgraphsLength()} subgraphs; the runtime runs one")
        subgraph = model.Subgraphs(0)
        names = builtin_names()
        tensors = []
        for i in range(subgraph.TensorsLength()):
            t = subgraph.Tensors(i)
            if t.Type() not in _DTYPES:
                raise UnsupportedModelError(f"{name}: tensor {t.Name().decode()} has TFLite type {t.Type()}")
            dtype = np.dtype(_DTYPES[t.Type()])
            shape = tuple(int(v) for v in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            if t.Sparsity() is not None:  # TFLite's sparse weights (read through DENSIFY)
                raise UnsupportedModelError(f"{name}: tensor {t.Name().decode()} is stored sparse; the runtime "
                                            "reads dense tensors (convert without sparsity)")
            buffer = model.Buffers(t.Buffer())
            data = None
            if buffer.Offset() > 1:  # stored after the flatbuffer (files over 2 GB)
                raw = flatbuffer[buffer.Offset() : buffer.Offset() + buffer.Size()]
                data = np.frombuffer(raw, dtype).reshape(shape)
            elif buffer.DataLength():
                data = buffer.DataAsNumpy().view(dtype).reshape(shape)
            quantization = None
            q = t.Quantization()
            if q is not None and q.ScaleLength() and (q.ScaleLength() == 1 or q.QuantizedDimension() == 0):
                zero_points = q.ZeroPointAsNumpy() if q.ZeroPointLength() else np.zeros(q.ScaleLength(), np.int64)
                quantization = (np.asarray(q.ScaleAsNumpy(), np.float32), np.asarray(zero_points, np.int64))
            tensors.append(Tensor(i, t.Name().decode(), shape, dtype, data, quantization))
        operators = []
        for i in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == tflite.BuiltinOperator.CUSTOM:
                op_name = code.CustomCode().decode()
                raw = bytes(op.CustomOptionsAsNumpy()) if op.CustomOptionsLength() else b""
                options = flexbuffers.Loads(raw) if raw else {}
            else:
                op_name = names.get(builtin, str(builtin))
                options = _options_class(op)
            operators.append(Operator(i, op_name, [int(v) for v in op.InputsAsNumpy()],
                                      [int(v) for v in op.OutputsAsNumpy()], options))
        inputs = [int(v) for v in subgraph.InputsAsNumpy()]
        outputs = [int(v) for v in subgraph.OutputsAsNumpy()]
    except UnsupportedModelError:
        raise
    except Exception as error:  # a corrupt or truncated flatbuffer
        raise UnsupportedModelError(f"{name}: cannot read the TFLite flatbuffer ({error})") from error
    return _float16_weights_folded(Graph(name, tensors, operators, inputs, outputs))


def _float16_weights_folded(graph: Graph) -> Graph:
    """``graph`` with float16 constants (TFLite's float16 quantisation: the weights stored in half
    precision, each read through a DEQUANTIZE to float32, as MediaPipe's BlazeFace files are) turned
    into the float32 constants those DEQUANTIZE ops compute, and the ops dropped (exact: every
    float16 value is a float32 one). A float16 tensor anywhere else is not supported. The operators
    that remain are numbered again in order (``Operator.index`` is a position in ``operators``)."""
    folded = set()
    for op in graph.operators:
        if op.name == "DEQUANTIZE" and len(op.inputs) == 1 and len(op.outputs) == 1:
            source, target = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
            if source.dtype == np.float16 and source.data is not None and target.dtype == np.float32 \
                    and op.outputs[0] not in graph.outputs:
                target.data = source.data.astype(np.float32).reshape(target.shape or source.data.shape)
                folded.add(op.index)
    operators = graph.operators if not folded else \
        [dataclasses.replace(op, index=position)
         for position, op in enumerate(op for op in graph.operators if op.index not in folded)]
    for op in operators:
        for i in op.inputs + op.outputs:
            if i >= 0 and graph.tensors[i].dtype == np.float16:
                raise UnsupportedModelError(f"{graph.name}: tensor {graph.tensors[i].name} is float16 and not a "
                                            "constant read by a DEQUANTIZE; the runtime runs float32 and int8 "
                                            "activations")
    return dataclasses.replace(graph, operators=operators) if folded else graph
