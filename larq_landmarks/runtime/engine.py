"""``Engine``: runs the ``.tflite`` file that :func:`larq_landmarks.export.convert` writes (the same
file LCE runs on ARM) with this package's own bit-packed kernels, on x86-64 without LCE or
TensorFlow.

    engine = Engine("face.tflite", num_threads=2)
    heatmaps = engine.predict(images)        # (B, S, S, 3) float32 -> (B, S/4, S/4, K)
    engine.kernels                           # "avx512", "avx2" or "portable"
"""
import os
from typing import List, Optional, Union

import numpy as np

from larq_landmarks.runtime import kernels as kernel_paths
from larq_landmarks.runtime import ops
from larq_landmarks.runtime.graph import Graph, UnsupportedModelError, read_graph


def _fusable_multiplier(graph: Graph, op, consumers) -> Optional[np.ndarray]:
    """The constant per-channel (or scalar) factor of a MUL whose only consumer is an
    LceQuantize, so that the product can be formed inside the bit-packing."""
    if op.name != "MUL" or (op.options and op.options.FusedActivationFunction() != 0):
        return None
    out = op.outputs[0]
    if out in graph.outputs or len(consumers.get(out, [])) != 1 or consumers[out][0].name != "LceQuantize":
        return None
    constant = [i for i in op.inputs if graph.tensors[i].data is not None]
    variable = [i for i in op.inputs if graph.tensors[i].data is None]
    if len(constant) != 1 or len(variable) != 1:
        return None
    factor = graph.tensors[constant[0]].data
    channels = graph.tensors[variable[0]].shape[-1]
    if factor.size not in (1, channels) or (factor.size == channels and factor.shape[-1:] != (channels,)):
        return None
    return factor


class Engine:
    """Runs a converted landmark model with the bit-packed runtime.

    Args:
        model: path of a ``.tflite`` file, or its bytes.
        num_threads: threads the kernels split each op over.
        kernels: ``"auto"`` (the best the CPU runs), ``"avx512"``, ``"avx2"`` or ``"portable"``.

    Raises:
        UnsupportedModelError: the file is not a TFLite flatbuffer, or holds an op or option the
            runtime does not implement (the message names both; LCE's interpreter runs it).
    """

    def __init__(self, model: Union[str, os.PathLike, bytes], num_threads: int = 1, kernels: str = "auto"):
        if isinstance(model, (bytes, bytearray)):
            flatbuffer, name = bytes(model), "model"
        else:
            name = str(model)
            if not os.path.isfile(name):
                raise FileNotFoundError(f"{name}: model file not found")
            with open(name, "rb") as f:
                flatbuffer = f.read()
        if num_threads < 1:
            raise ValueError(f"num_threads={num_threads} must be at least 1")
        self.graph = read_graph(flatbuffer, name)
        self._kernels = kernel_paths.load(kernels)
        self.kernels: str = self._kernels.path
        self.num_threads = num_threads
        if len(self.graph.inputs) != 1 or len(self.graph.outputs) != 1:
            raise UnsupportedModelError(f"{name}: {len(self.graph.inputs)} inputs and {len(self.graph.outputs)} "
                                        "outputs; the runtime runs one-input, one-output models")
        self._steps = self._plan()

    def _plan(self) -> List:
        graph = self.graph
        consumers = {}
        for op in graph.operators:
            for i in op.inputs:
                consumers.setdefault(i, []).append(op)
        fused = {}  # LceQuantize operator index -> (multiplier, source tensor)
        steps = []
        for op in graph.operators:
            if op.name not in ops.OPS:
                raise UnsupportedModelError(
                    f"{graph.name}: operator {op.index} {op.name} is not supported by larq_landmarks.runtime; "
                    "run this file with LCE's interpreter (engine='lce')")
            factor = _fusable_multiplier(graph, op, consumers)
            if factor is not None:
                source = [i for i in op.inputs if graph.tensors[i].data is None][0]
                fused[consumers[op.outputs[0]][0].index] = (factor, source)
                continue
            if op.name == "LceQuantize" and op.index in fused:
                factor, source = fused[op.index]
                steps.append(ops.lce_quantize(graph, op, self._kernels, factor, source))
            else:
                steps.append(ops.OPS[op.name](graph, op, self._kernels))
        return steps

    @property
    def input_shape(self) -> tuple:
        return self.graph.tensors[self.graph.inputs[0]].shape

    @property
    def output_shape(self) -> tuple:
        return self.graph.tensors[self.graph.outputs[0]].shape

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Run the model on ``images`` (``(B, H, W, C)`` float32, any batch size)."""
        images = np.asarray(images)
        expected = self.input_shape[1:]
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"{self.graph.name}: input must have shape (B, {', '.join(map(str, expected))}), "
                             f"got {images.shape}")
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"{self.graph.name}: input must be float, got {images.dtype}")
        values: List[Optional[np.ndarray]] = [None] * len(self.graph.tensors)
        values[self.graph.inputs[0]] = np.ascontiguousarray(images, np.float32)
        self._kernels.set_num_threads(self.num_threads)
        for step in self._steps:
            step(values)
        return values[self.graph.outputs[0]]
