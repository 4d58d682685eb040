"""A TFLite flatbuffer read into plain Python: tensors (shape, type, constant data) and operators
(name, inputs, outputs, options), with the ``tflite`` schema package and ``flatbuffers`` for LCE's
custom-op options. No TensorFlow and no LCE are needed.
"""
import dataclasses
from typing import Any, Dict, List, Optional

import numpy as np


class UnsupportedModelError(ValueError):
    """The runtime cannot run this file (an op or option it does not implement, or a file that is
    not a TFLite flatbuffer); the message names the file and what is missing."""


_DTYPES = {0: np.float32, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 9: np.int8}


@dataclasses.dataclass
class Tensor:
    index: int
    name: str
    shape: tuple  # as stored (batch 1 for fixed-batch files)
    dtype: Any  # numpy dtype
    data: Optional[np.ndarray]  # constant values, or None for activations


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


def _builtin_names() -> Dict[int, str]:
    import tflite

    return {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


def _options_class(op, builtin_names):
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


def read_graph(flatbuffer: bytes, name: str = "model") -> Graph:
    """Parse the first subgraph of ``flatbuffer``; ``name`` is how errors refer to the file."""
    import tflite
    from flatbuffers import flexbuffers

    if len(flatbuffer) < 8 or flatbuffer[4:8] != b"TFL3":
        raise UnsupportedModelError(f"{name}: not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        model = tflite.Model.GetRootAsModel(flatbuffer, 0)
        if model.SubgraphsLength() != 1:
            raise UnsupportedModelError(f"{name}: {model.SubgraphsLength()} subgraphs; the runtime runs one")
        subgraph = model.Subgraphs(0)
        builtin_names = _builtin_names()
        tensors = []
        for i in range(subgraph.TensorsLength()):
            t = subgraph.Tensors(i)
            if t.Type() not in _DTYPES:
                raise UnsupportedModelError(f"{name}: tensor {t.Name().decode()} has TFLite type {t.Type()}")
            dtype = np.dtype(_DTYPES[t.Type()])
            shape = tuple(int(v) for v in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            buffer = model.Buffers(t.Buffer())
            data = None
            if buffer.Offset() > 1:  # stored after the flatbuffer (files over 2 GB)
                raw = flatbuffer[buffer.Offset() : buffer.Offset() + buffer.Size()]
                data = np.frombuffer(raw, dtype).reshape(shape)
            elif buffer.DataLength():
                data = buffer.DataAsNumpy().view(dtype).reshape(shape)
            tensors.append(Tensor(i, t.Name().decode(), shape, dtype, data))
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
                op_name = builtin_names.get(builtin, str(builtin))
                options = _options_class(op, builtin_names)
            operators.append(Operator(i, op_name, [int(v) for v in op.InputsAsNumpy()],
                                      [int(v) for v in op.OutputsAsNumpy()], options))
        inputs = [int(v) for v in subgraph.InputsAsNumpy()]
        outputs = [int(v) for v in subgraph.OutputsAsNumpy()]
    except UnsupportedModelError:
        raise
    except Exception as error:  # a corrupt or truncated flatbuffer
        raise UnsupportedModelError(f"{name}: cannot read the TFLite flatbuffer ({error})") from error
    return Graph(name, tensors, operators, inputs, outputs)
