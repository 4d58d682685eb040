"""One function per TFLite / LCE operator: each prepares its constants once (bit-packed weights
transposed for the kernels, LCE's output transform) and returns ``run(values)``, which reads its
inputs from ``values`` (a list indexed by tensor) and stores its outputs there.

Semantics follow TFLite's reference kernels and LCE's op definitions (``LceQuantize``,
``LceDequantize``, ``LceBconv2d``: bit set = negative, padding bits 0, float output
``float(clamp(2 * acc)) * -m + (b + K * m)``, the product rounded before the sum as LCE's kernels
round it, bit-packed output ``acc > threshold``).

An int8 tensor (a file converted with ``export.convert(..., int8_calibration=...)``) is held as its
codes, ``q - zero point``, in float32: integers, which the float kernels move, compare, pool and
(in a CONV_2D, the int8 weights as they are) sum exactly. Each op that makes new values then
requantises them as TFLite does, ``kernels.requantize``: the real-valued result divided by the
output's scale, rounded half away from zero (``q``, clamped to the int8 range and the fused
activation's), so that an int8 file runs its own int8 arithmetic, not its float network.
"""
import functools
import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from larq_landmarks.runtime import kernels as kernel_paths
from larq_landmarks.runtime.graph import Graph, Operator, UnsupportedModelError

Run = Callable[["Values"], None]


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """``np.empty`` whose data starts on a 64-byte boundary, so that the kernels' 64-byte vector
    loads and stores each touch one cache line (``np.empty`` starts 16 bytes past one for some
    sizes)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size].view(dtype).reshape(shape)


_DTYPES = {np.float32: np.dtype(np.float32), np.int32: np.dtype(np.int32)}  # np.dtype() costs 0.16 us a call


class Values(list):
    """The tensors of one run, indexed like the graph's; ``alloc`` hands out output buffers
    that the engine recycles once their last reader has run (no page faults after the first run).
    ``empty`` makes new buffers: :func:`aligned_empty`, or the GPU kernels' ``empty`` for CuPy arrays.

    ``pool`` maps an image shape and dtype to free buffers by batch size: a run of batch ``b``
    takes a free buffer of batch ``b``, or else the first ``b`` images of the smallest free buffer
    bigger than that (C-contiguous, as the kernels need); where none fits, it makes one and drops
    the free ones smaller than it (this one, or a bigger one, serves their batches from then on).
    So one engine called with many batch sizes in turn holds one set of buffers of the largest, not
    one set per batch size (called with batches 1 to 12, the default model's engine kept 3.5 GB
    that way), and runs of small batches in other threads take small buffers, not big ones."""

    def __init__(self, count: int, pool: Dict[tuple, Dict[int, list]], empty: Callable = aligned_empty):
        super().__init__([None] * count)
        self.pool = pool
        self.empty = empty
        self._bases: Dict[int, object] = {}  # id of a buffer handed out as a part of a bigger one -> that one

    def alloc(self, shape: tuple, dtype):
        shape = tuple(shape)
        batch = shape[0]
        kind = _DTYPES.get(dtype)
        by_batch = self.pool.get((shape[1:], np.dtype(dtype) if kind is None else kind))
        if by_batch:
            free = by_batch.get(batch)
            if free:  # the common case, first: a free buffer of this batch (the search below: ~1 us a step)
                try:
                    return free.pop()
                except IndexError:
                    pass
            sizes = sorted(by_batch)  # (the pool is the engine's: other threads' runs take and give too)
            for size in sizes:
                if size < batch:
                    continue
                try:
                    buffer = by_batch[size].pop()
                except (IndexError, KeyError):  # another thread's run took the last one, or dropped them
                    continue
                if size == batch:
                    return buffer
                part = buffer[:batch]
                self._bases[id(part)] = buffer
                return part
            for size in sizes:
                if size < batch:
                    by_batch.pop(size, None)
        return self.empty(shape, dtype)

    def release(self, array) -> None:
        buffer = self._bases.pop(id(array), array) if self._bases else array
        key = (buffer.shape[1:], buffer.dtype)
        try:
            self.pool[key][len(buffer)].append(buffer)
        except KeyError:  # the first of its kind
            self.pool.setdefault(key, {}).setdefault(len(buffer), []).append(buffer)

    def is_part(self, array) -> bool:
        """Whether ``array`` is the first images of a bigger pooled buffer (a graph output that is
        one is copied, so that the caller does not hold the whole buffer)."""
        return id(array) in self._bases


# TFLite ActivationFunctionType -> float clamp (and int32 range for LceBconv2d)
_ACTIVATIONS = {0: (-math.inf, math.inf), 1: (0.0, math.inf), 2: (-1.0, 1.0), 3: (0.0, 6.0)}
_INT32 = (-(2**31), 2**31 - 1)


def _unsupported(graph: Graph, op: Operator, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{graph.name}: operator {op.index} {op.name}: {what} is not supported by "
        "larq_landmarks.runtime; run this file with LCE's interpreter (engine='lce')"
    )


def _activation(graph, op, code: int):
    if code not in _ACTIVATIONS:
        raise _unsupported(graph, op, f"fused activation {code}")
    return _ACTIVATIONS[code]


def _constant(graph, op, position: int, dtype=None) -> np.ndarray:
    tensor = graph.tensors[op.inputs[position]]
    if tensor.data is None:
        raise _unsupported(graph, op, f"a non-constant input {position} ({tensor.name})")
    return np.ascontiguousarray(tensor.data if dtype is None else tensor.data.astype(dtype))


def _on_device(kernels, array: np.ndarray):
    """A constant where the kernels run: unchanged for the CPU modules, uploaded once for the GPU's."""
    upload = getattr(kernels, "upload", None)
    return array if upload is None else upload(array)


def _check_float(graph, op, positions=(0,), int8: bool = False):
    """The inputs at ``positions`` are float32 (or, with ``int8``, int8 codes)."""
    for position in positions:
        tensor = graph.tensors[op.inputs[position]]
        if tensor.dtype != np.float32 and not (int8 and tensor.dtype == np.int8):
            raise _unsupported(graph, op, f"input {tensor.name} of type {tensor.dtype}")


_INT8 = (-128, 127)


def _codes(graph: Graph, op: Operator, index: int) -> Optional[Tuple[float, int]]:
    """An int8 activation's ``(scale, zero point)`` (held as its codes, ``q - zero point``); None
    for a tensor of another type."""
    tensor = graph.tensors[index]
    if tensor.dtype != np.int8:
        return None
    if tensor.quantization is None or len(tensor.quantization[0]) != 1:
        raise _unsupported(graph, op, f"int8 tensor {tensor.name} without one scale and zero point")
    return float(tensor.quantization[0][0]), int(tensor.quantization[1][0])


def _tflite_round(x: float) -> int:
    """Half away from zero, as TFLite's ``TfLiteRound``."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def _int8_range(graph, op, code: int, scale: float, zero_point: int) -> Tuple[int, int]:
    """TFLite's q range of an int8 output with fused activation ``code``."""
    low, high = _activation(graph, op, code)
    lo = _INT8[0] if low == -math.inf else max(_INT8[0], zero_point + _tflite_round(low / scale))
    hi = _INT8[1] if high == math.inf else min(_INT8[1], zero_point + _tflite_round(high / scale))
    return lo, hi


def _requantize_constants(kernels, channels: int, scale, shift=0.0, zero_point: int = 0,
                          q_range: Tuple[int, int] = _INT8, rounding: Optional[str] = "code") -> tuple:
    """``kernels.requantize``'s constants, ``(scale, shift, add, low, high, subtract)``, for codes of
    an output with ``zero_point``, q clamped to ``q_range`` (``scale`` and ``shift`` a value or one
    per channel, computed in float64, stored as float32); a convolution given them as its
    ``requantize`` argument computes the same codes (:func:`_requantizer`'s op 0). ``rounding``:
    ``"code"``, ``q = round(v) + zero point``, as TFLite's QUANTIZE, CONV_2D, ADD, MUL and RELU;
    ``"q"``, ``q = round(v + zero point)``, as its AVERAGE_POOL_2D (and LCE's int8 binary
    convolution output, which ``binary_conv2d`` rounds itself); None: ``out = v`` (DEQUANTIZE)."""
    scale, shift = (_on_device(kernels, np.ascontiguousarray(np.broadcast_to(
        np.asarray(v, np.float64).astype(np.float32).reshape(-1), (channels,)))) for v in (scale, shift))
    if rounding not in ("code", "q", None):
        raise ValueError(f"rounding={rounding!r}")
    in_q = rounding == "q"
    add = subtract = float(zero_point) if in_q else 0.0
    low, high = (float(v - (0 if in_q else zero_point)) for v in q_range)
    return scale, shift, add, low, high, subtract


def _requantizing_run(kernels, constants: tuple, op: int = 0, rounded: bool = True) -> Callable:
    """``kernels.requantize`` with :func:`_requantize_constants`' ``constants`` as ``run(a, out,
    b=None)``: ``op`` 0, ``a * scale + shift``; 1, ``a * scale + b * shift``; 2, ``a * b * scale``."""
    scale, shift, add, low, high, subtract = constants
    none = _on_device(kernels, np.zeros(0, np.float32))

    def run(a, out, b=None):
        kernels.requantize(a, none if b is None else b, scale, shift, op, add, low, high, subtract, rounded, out)

    return run


def _requantizer(kernels, channels: int, scale, shift=0.0, op: int = 0, zero_point: int = 0,
                 q_range: Tuple[int, int] = _INT8, rounding: Optional[str] = "code") -> Callable:
    """:func:`_requantizing_run` of these constants (:func:`_requantize_constants`)."""
    constants = _requantize_constants(kernels, channels, scale, shift, zero_point, q_range, rounding)
    return _requantizing_run(kernels, constants, op, rounding is not None)


def _channels(graph: Graph, index: int) -> int:
    """A tensor's last dimension (1 for a scalar): the channels a per-channel constant spans."""
    shape = graph.tensors[index].shape
    return shape[-1] if shape else 1


def _elementwise_step(source: int, target: int, apply: Callable) -> Run:
    """A step that writes ``apply(x, out)`` of tensor ``source`` into a new ``target`` of its shape."""

    def run(values):
        x = values[source]
        out = values.alloc(x.shape, np.float32)
        apply(x, out)
        values[target] = out

    return run


def _same_quantization(graph: Graph, op: Operator, inputs) -> None:
    """An int8 op that only moves or compares values (CONCATENATION, MAX_POOL_2D, RESIZE...) needs
    its int8 inputs in its output's scale and zero point, as TFLite's converter writes them."""
    output = _codes(graph, op, op.outputs[0])
    for i in inputs:
        if graph.tensors[i].data is None and _codes(graph, op, i) != output:
            raise _unsupported(graph, op, f"input {graph.tensors[i].name} quantised unlike its output")


def _same_padding(size: int, filter_size: int, stride: int, dilation: int, padding: int):
    """TFLite's output size and leading padding (padding 0 = SAME, 1 = VALID)."""
    effective = (filter_size - 1) * dilation + 1
    out = (size + stride - 1) // stride if padding == 0 else (size - effective + stride) // stride
    total = max((out - 1) * stride + effective - size, 0) if padding == 0 else 0
    return out, total // 2


def _per_channel(values: Optional[np.ndarray], channels: int) -> np.ndarray:
    """A batch norm's folded constant (scalar or per channel) as ``channels`` float32 values; an
    empty array (no such constant) for None."""
    if values is None:
        return np.zeros(0, np.float32)
    return np.ascontiguousarray(np.broadcast_to(values.astype(np.float32).reshape(-1), (channels,)))


def lce_quantize(graph: Graph, op: Operator, kernels, source: Optional[int] = None,
                 multiplier: Optional[np.ndarray] = None, bias: Optional[np.ndarray] = None) -> Run:
    """Float -> bit-packed int32 (``x < 0``). ``source``, ``multiplier`` and ``bias`` fuse the
    per-channel MUL and ADD of a batch norm before it: ``bit = source * multiplier + bias < 0``,
    rounded as the separate ops round. An int8 input's bit: ``q < zero point`` (its code ``< 0``)."""
    _check_float(graph, op, int8=True)
    source, target = op.inputs[0] if source is None else source, op.outputs[0]
    channels = graph.tensors[source].shape[-1]

    scale, shift = (_on_device(kernels, _per_channel(v, channels)) for v in (multiplier, bias))

    def run(values):
        x = values[source]
        out = values.alloc(x.shape[:-1] + ((channels + 31) // 32,), np.int32)
        kernels.bitpack(x, scale, shift, out)
        values[target] = out

    return run


def _output_packing(graph: Graph, op: Operator, kernels, pack: Optional[tuple], channels: int):
    """For ``pack`` = ``(LceQuantize output, multiplier or None, bias or None)``, an LceQuantize (with
    the batch norm before it folded in) that reads a float op's output: a function of ``(values,
    output shape)`` that allocates the LceQuantize's bits and returns the keyword arguments with
    which the op's kernel (``conv2d``, ``pool2d``, ``resize_nearest``) packs them as it writes its
    output rows (the bits ``bitpack`` packs). For None, one that returns no arguments."""
    if pack is None:
        return lambda values, shape: {}
    target, multiplier, bias = pack
    if graph.tensors[op.outputs[0]].dtype not in (np.float32, np.int8):  # int8: its codes
        raise _unsupported(graph, op, "an LceQuantize fused after an output neither float32 nor int8")
    scale, shift = (_on_device(kernels, _per_channel(v, channels)) for v in (multiplier, bias))

    def arguments(values, shape):
        bits = values[target] = values.alloc(tuple(shape[:-1]) + ((channels + 31) // 32,), np.int32)
        return {"packed": bits, "pack_multiplier": scale, "pack_bias": shift}

    return arguments


def lce_dequantize(graph: Graph, op: Operator, kernels) -> Run:
    """Bit-packed int32 -> +1 / -1 floats."""
    source, target = op.inputs[0], op.outputs[0]
    channels = graph.tensors[target].shape[-1]
    if graph.tensors[target].dtype != np.float32:
        raise _unsupported(graph, op, f"output type {graph.tensors[target].dtype}")

    def run(values):
        x = values[source]
        out = values.alloc(x.shape[:-1] + (channels,), np.float32)
        kernels.unpack(x, channels, out)
        values[target] = out

    return run


def lce_bconv2d(graph: Graph, op: Operator, kernels, next_quantize: Optional[tuple] = None,
                into: Optional[tuple] = None) -> Run:
    """LCE's binary convolution: float output (multiplier, bias, fused clamp) or bit-packed
    output (thresholds). ``next_quantize`` = ``(tensor, multiplier or None, bias or None)`` fuses
    an LceQuantize that reads the float output (with a batch norm's MUL and ADD folded in):
    the convolution's epilogue also writes that LceQuantize's bits into ``tensor``. ``into`` =
    ``(tensor, channel offset, channels, residual tensor or None)`` fuses the channel
    CONCATENATION (and the ADD after it, with a residual) that reads the float output: the output
    goes straight into its channels of ``tensor``, plus the residual there (the first part run
    allocates ``tensor``). An int8 output's ADD is the int8 ADD's arithmetic on the codes: each
    rescaled to ``tensor``'s scale, summed and rounded, as ``_elementwise_int8`` does it."""
    o = op.options
    for key in ("channels_in", "stride_height", "stride_width", "padding", "pad_values", "fused_activation_function"):
        if key not in o:
            raise _unsupported(graph, op, f"custom options without {key}")
    filters = _constant(graph, op, 1)
    if filters.dtype != np.int32:
        raise _unsupported(graph, op, f"unpacked {filters.dtype} filters")
    cout, fh, fw, words = filters.shape
    cin = int(o["channels_in"])
    if words != (cin + 31) // 32:
        raise _unsupported(graph, op, "grouped binary convolution")
    if o["pad_values"] not in (0, 1):
        raise _unsupported(graph, op, f"pad_values={o['pad_values']}")
    out_tensor = graph.tensors[op.outputs[0]]
    packed = out_tensor.dtype == np.int32
    if out_tensor.dtype not in (np.float32, np.int32, np.int8):
        raise _unsupported(graph, op, f"{out_tensor.dtype} output")
    codes = _codes(graph, op, op.outputs[0])  # int8 output: LCE's float transform to q, rounded
    output_scale, output_zero_point = (1.0, 0) if codes is None else codes
    k_total = fh * fw * cin
    if packed:
        thresholds = _constant(graph, op, 4, np.int32)
        multiplier = bias = np.zeros(0, np.float32)
        clamp = (0, 0)
    else:
        thresholds = np.zeros(0, np.int32)
        post_mul = _constant(graph, op, 2).astype(np.float64)
        post_bias = _constant(graph, op, 3).astype(np.float64)
        multiplier = (-post_mul / output_scale).astype(np.float32)
        bias = ((post_bias + k_total * post_mul) / output_scale + output_zero_point).astype(np.float32)
        code = int(o["fused_activation_function"])
        ranges = {0: _INT32, 1: (0, _INT32[1]), 2: (-1, 1), 3: (0, 6)}
        if code not in ranges:
            raise _unsupported(graph, op, f"fused activation {code}")
        low, high = max(ranges[code][0], -k_total), min(ranges[code][1], k_total)
        clamp = (-high + k_total, -low + k_total)
    if (next_quantize is not None or into is not None) and packed:
        raise _unsupported(graph, op, "an LceQuantize or CONCATENATION fused after a bit-packed output")
    residual_add = {}
    if codes is not None and into is not None and into[3] is not None:  # the int8 ADD, on codes
        (s_out, zero_point), s_residual = _codes(graph, op, into[0]), _codes(graph, op, into[3])[0]
        low, high = _int8_range(graph, op, 0, s_out, zero_point)
        residual_add = {"residual_add": [codes[0] / s_out, s_residual / s_out, low - zero_point, high - zero_point]}
    next_target, next_scale, next_shift = next_quantize if next_quantize is not None else (None, None, None)
    next_scale, next_shift = (_on_device(kernels, _per_channel(v, cout)) for v in (next_scale, next_shift))
    weights = kernels.prepare_binary_weights(filters)
    bits = np.unpackbits(filters.view(np.uint8), axis=-1).reshape(cout, fh * fw, -1)
    weight_popcounts = _on_device(kernels, np.ascontiguousarray(bits.sum(-1, dtype=np.int32).T))  # [taps, Cout]
    multiplier, bias, thresholds = (_on_device(kernels, v) for v in (multiplier, bias, thresholds))
    sh, sw = int(o["stride_height"]), int(o["stride_width"])
    dh, dw = int(o.get("dilation_height_factor", 1)), int(o.get("dilation_width_factor", 1))
    conv = kernels.binary_conv2d(weights, [cin, cout, fh, fw, sh, sw, dh, dw, int(o["pad_values"])],
                                 multiplier, bias, clamp[0], clamp[1], thresholds, weight_popcounts,
                                 next_scale, next_shift, next_target is not None,
                                 **({} if codes is None else {"output_zero_point": [float(codes[1])]}), **residual_add)
    source, target = op.inputs[0], op.outputs[0]
    shapes = {}  # input shape -> (output shape, padding before the first row and column)

    def run(values):
        x = values[source]
        shape = shapes.get(x.shape)
        if shape is None:
            batch, height, width, _ = x.shape
            out_h, pad_top = _same_padding(height, fh, sh, dh, int(o["padding"]))
            out_w, pad_left = _same_padding(width, fw, sw, dw, int(o["padding"]))
            shape = shapes[x.shape] = ((batch, out_h, out_w, (cout + 31) // 32 if packed else cout), pad_top, pad_left)
        if into is None:
            out = values[target] = values.alloc(shape[0], np.int32 if packed else np.float32)
        else:
            out = values[into[0]]
            if out is None:
                out = values[into[0]] = values.alloc(shape[0][:-1] + (into[2],), np.float32)
        next_bits = None
        if next_target is not None:
            next_bits = values[next_target] = values.alloc(shape[0][:-1] + ((cout + 31) // 32,), np.int32)
        if into is None and next_bits is None:
            conv(x, out, shape[1], shape[2])
        else:
            conv(x, out, shape[1], shape[2], next_bits, None if into is None else into[1],
                 None if into is None or into[3] is None else values[into[3]])

    return run


def conv_2d(graph: Graph, op: Operator, kernels, residual: Optional[List[int]] = None, target: Optional[int] = None,
            add_activation: int = 0, input_affine: Optional[tuple] = None, precision: str = "float32",
            max_pool: Optional[tuple] = None, pack: Optional[tuple] = None,
            input_requantize: Optional[Tuple[int, List[Operator]]] = None) -> Run:
    """Float convolution with bias and fused activation. ``residual``, ``target`` and
    ``add_activation`` fuse the ADD that follows a convolution without activation: ``target =
    clamp(conv + residual)``, rounded as the two ops round, where ``residual`` lists the tensors
    whose channels, concatenated, are added (a CONCATENATION folded in; none: only the clamp, as a
    RELU after the convolution). ``input_affine`` =
    ``(source, multiplier or None, bias or None, activation code)`` folds the per-channel MUL / ADD
    (with its fused activation) of a batch norm before the convolution: it reads ``source`` and
    applies them to each pixel as it is read. ``precision`` (``Engine``'s ``float_precision``):
    ``"bfloat16"``, products of the input and weights rounded to bfloat16, sums in float32;
    ``"int8"``, the weights quantised a scale an output channel and the input as it is read (a 1x1
    convolution's each pixel with its own scale and zero point, any other's each image), products
    and sums in integers (in VNNI's form or the pairs form: ``kernel_paths.int8_vnni``), then
    scaled back to float32. ``max_pool`` = ``(pool output, (window
    height, window width), padding code)``: the MAX_POOL_2D (its stride its window, no activation)
    that reads the convolution's output (after the ADD), done in the same pass where the window
    divides that output (no padding then, either way), else by ``pool2d`` after it. ``pack`` =
    ``(tensor, multiplier or None, bias or None)``: the LceQuantize (with the batch norm before it)
    that reads the output the step writes (the pool's, the ADD's or the convolution's), done as
    each output row is written: its bits go into ``tensor`` (:func:`_output_packing`).

    An int8 convolution (int8 input and weights, a scale an output channel, int32 bias) sums its
    codes times the int8 weights, then requantises: ``q = round(sum * input scale * weight scale /
    output scale) + zero point``, clamped, each task's output rows as it writes them (``pack`` packs
    those codes); ``residual`` then adds the residual's codes as the int8 ADD writing ``target``
    requantises them (each rescaled to its output, rounded), before ``max_pool`` takes the maxima of
    the codes (an int8 pool's output is quantised as its input). ``input_requantize`` = ``(source,
    ops)``: the ops that compute its input from ``source``, in the order they run (the QUANTIZE of a
    float input, the int8 MUL and ADD by constants of a batch norm: :func:`_requantizing`), done on
    each input pixel as it is read, each requantising as its own step would.
    The sums are exact: in int32 with the int8 kernels where the CPU has them (``Engine``'s
    ``float_precision="int8"``; the codes and weights are theirs unchanged, as every channel's
    largest weight is 127, as TFLite's converter quantises them), else in float32 (exact while they
    stay below 2**24, as a 7x7x3 or a 1x1x256 filter's always do)."""
    codes = _codes(graph, op, op.inputs[0])
    _check_float(graph, op, int8=codes is not None)
    o = op.options
    filters = _constant(graph, op, 1, np.float32)
    cout, fh, fw, cin = filters.shape
    bias = _constant(graph, op, 2, np.float32) if len(op.inputs) > 2 and op.inputs[2] >= 0 else np.zeros(cout, np.float32)
    # (the options read here, once: a field of the flatbuffer costs microseconds a read in Python)
    sh, sw, dh, dw, conv_padding = o.StrideH(), o.StrideW(), o.DilationHFactor(), o.DilationWFactor(), o.Padding()
    requantize, input_range = None, None
    if codes is not None:
        weight_quantization, out_codes = graph.tensors[op.inputs[1]].quantization, _codes(graph, op, op.outputs[0])
        if out_codes is None or weight_quantization is None or graph.tensors[op.inputs[1]].dtype != np.int8 \
                or np.any(weight_quantization[1] != 0):
            raise _unsupported(graph, op, "an int8 input without symmetric int8 weights and an int8 output")
        if input_affine is not None or precision != "float32":
            raise _unsupported(graph, op, "a float batch norm or float precision on an int8 convolution")
        if input_requantize is not None:
            tensor, input_steps = input_requantize[0], []
            for step in input_requantize[1]:
                read, constants = _requantizing(graph, step, kernels)
                if read != tensor:
                    raise _unsupported(graph, op, f"operator {step.index} ({step.name}) reads another tensor")
                input_steps.append(constants)
                tensor = step.outputs[0]
            if tensor != op.inputs[0]:
                raise _unsupported(graph, op, "its input_requantize ends at another tensor")
        multiplier = codes[0] * np.broadcast_to(weight_quantization[0].astype(np.float64), (cout,)) / out_codes[0]
        requantize = _requantize_constants(kernels, cout, multiplier, zero_point=out_codes[1],
                                           q_range=_int8_range(graph, op, o.FusedActivationFunction(), *out_codes))
        if residual is not None:  # the int8 ADD writing target: the codes and the residual's rescaled to its output
            residual_requantize = _int8_add_after(graph, op, kernels, target)
        if "int8" in kernel_paths.reduced_precisions(kernels) and np.all(np.abs(filters).max(axis=(1, 2, 3)) == 127):
            precision = "int8"  # the codes quantised with scale 1 and their zero point: unchanged
            input_range = [float(_INT8[0] - codes[1]), float(_INT8[1] - codes[1])]
    elif input_requantize is not None:
        raise _unsupported(graph, op, "input_requantize on a convolution of float32 input")
    if precision == "bfloat16":
        weights, convolve = kernels.prepare_float_weights_bf16(filters), kernels.conv2d_bf16
    elif precision == "int8":
        weights, scales, sums = kernels.prepare_float_weights_int8(filters, vnni=kernel_paths.int8_vnni(kernels))
        convolve = functools.partial(_conv2d_int8, kernels.conv2d_int8, scales, sums,
                                     **({} if input_range is None else {"input_range": input_range}))
    else:
        weights, convolve = kernels.prepare_float_weights(filters), kernels.conv2d
    bias = _on_device(kernels, bias)
    if residual is not None and o.FusedActivationFunction() != 0:
        raise _unsupported(graph, op, "an ADD fused after an activation")
    low, high = _activation(graph, op, add_activation if residual is not None else o.FusedActivationFunction())
    source, target = op.inputs[0], op.outputs[0] if target is None else target
    if requantize is not None:
        low, high = -math.inf, math.inf  # the requantising clamps
        convolve = functools.partial(convolve, requantize=requantize)
        if residual is not None:
            convolve = functools.partial(convolve, residual_requantize=residual_requantize)
        if input_requantize is not None:
            source = input_requantize[0]
            convolve = functools.partial(convolve, input_requantize=input_steps)
    none = _on_device(kernels, np.zeros(0, np.float32))
    in_mul = in_bias = none
    in_low, in_high = -math.inf, math.inf
    if input_affine is not None:
        source, multiplier, offset, code = input_affine
        in_low, in_high = _activation(graph, op, code)
        in_mul, in_bias = (_on_device(kernels, _per_channel(v, cin)) for v in (multiplier, offset))
    packing = _output_packing(graph, op, kernels, pack, cout)

    def run(values):
        x = values[source]
        batch, height, width, _ = x.shape
        out_h, pad_top = _same_padding(height, fh, sh, dh, conv_padding)
        out_w, pad_left = _same_padding(width, fw, sw, dw, conv_padding)
        args = (x, weights, bias, [fh, fw, sh, sw, dh, dw, pad_top, pad_left], low, high,
                [] if residual is None else [values[i] for i in residual], in_mul, in_bias, in_low, in_high)
        if max_pool is None:
            out = values.alloc((batch, out_h, out_w, cout), np.float32)
            convolve(*args, out, **packing(values, out.shape))
            values[target] = out
            return
        pooled, (ph, pw), padding = max_pool
        if out_h % ph == 0 and out_w % pw == 0:
            out = values.alloc((batch, out_h // ph, out_w // pw, cout), np.float32)
            convolve(*args, out, pool_window=[ph, pw], **packing(values, out.shape))
        else:
            full = values.alloc((batch, out_h, out_w, cout), np.float32)
            convolve(*args, full)
            pool_h, pool_top = _same_padding(out_h, ph, ph, 1, padding)
            pool_w, pool_left = _same_padding(out_w, pw, pw, 1, padding)
            out = values.alloc((batch, pool_h, pool_w, cout), np.float32)
            kernels.pool2d(full, [ph, pw, ph, pw, pool_top, pool_left], 0, -math.inf, math.inf, out,
                           **packing(values, out.shape))
            values.release(full)
        values[pooled] = out

    return run


def _conv2d_int8(conv2d_int8, scales, sums, x, weights, *args, **kwargs):
    """``conv2d_int8`` called as ``conv2d`` is: the weights' scales and sums after them."""
    conv2d_int8(x, weights, scales, sums, *args, **kwargs)


def _elementwise(graph: Graph, op: Operator, kernels, code: int) -> Run:
    if _codes(graph, op, op.outputs[0]) is not None:
        return _elementwise_int8(graph, op, kernels, code)
    _check_float(graph, op, (0, 1))
    low, high = _activation(graph, op, op.options.FusedActivationFunction() if op.options else 0)
    first, second, target = op.inputs[0], op.inputs[1], op.outputs[0]
    constants = {i: _on_device(kernels, graph.tensors[i].data.astype(np.float32))
                 for i in (first, second) if graph.tensors[i].data is not None}

    def run(values):
        a = constants.get(first, values[first])
        b = constants.get(second, values[second])
        if a.size < b.size:  # both ops commute
            a, b = b, a
        trailing = b.shape[-1] if b.ndim else 1
        if b.size in (1, a.size) or (b.size == trailing and b.size == a.shape[-1]):
            out = values.alloc(a.shape, np.float32)
            a, b = (v if v.flags.c_contiguous else v.copy() for v in (a, b))  # NumPy or CuPy
            kernels.binary_elementwise(a, b.reshape(-1), code, low, high, out)
        else:  # general broadcasting, rare in these models
            out = np.clip(a + b if code == 0 else a * b, low, high).astype(np.float32)
        values[target] = out

    return run


def _int8_operands(graph: Graph, op: Operator) -> tuple:
    """An int8 ADD's or MUL's ``(input codes, output codes, q range, channels, which inputs are
    constant)``, after checking that both inputs are int8 and at most one constant."""
    _check_float(graph, op, (0, 1), int8=True)
    out_codes = _codes(graph, op, op.outputs[0])
    inputs = [_codes(graph, op, i) for i in op.inputs[:2]]
    if None in inputs:
        raise _unsupported(graph, op, "int8 and float inputs together")
    q_range = _int8_range(graph, op, op.options.FusedActivationFunction() if op.options else 0, *out_codes)
    constant = [graph.tensors[i].data is not None for i in op.inputs[:2]]
    if all(constant):
        raise _unsupported(graph, op, "two constant inputs")
    return inputs, out_codes, q_range, _channels(graph, op.outputs[0]), constant


def _int8_add_after(graph: Graph, op: Operator, kernels, target: int, other: Optional[int] = None) -> tuple:
    """The int8 ADD that writes ``target`` from ``op``'s output (and ``other``, where given), done by
    ``op``: requantize's op 1 constants (:func:`_requantize_constants`), ``op``'s codes times
    ``scale``, the other input's times ``shift``, each rescaled to the sum's."""
    add = next((a for a in graph.operators if a.name == "ADD" and a.outputs[0] == target
                and op.outputs[0] in a.inputs[:2] and (other is None or other in a.inputs[:2])), None)
    if add is None:
        raise _unsupported(graph, op, "an int8 ADD fused after it that the file does not have")
    inputs, (s_out, zero_point), q_range, channels, _ = _int8_operands(graph, add)
    mine = list(add.inputs[:2]).index(op.outputs[0])
    return _requantize_constants(kernels, channels, inputs[mine][0] / s_out, inputs[1 - mine][0] / s_out,
                                 zero_point, q_range)


def _int8_with_constant(graph: Graph, op: Operator, kernels) -> Tuple[int, tuple]:
    """An int8 ADD or MUL of a tensor and a constant (one value or one per channel) as requantize's
    op 0, ``a * scale[c] + shift[c]`` with the constant folded into scale or shift: ``(the tensor
    read, the requantize constants)`` (:func:`_requantize_constants`)."""
    inputs, (s_out, zero_point), q_range, channels, constant = _int8_operands(graph, op)
    if not any(constant):
        raise _unsupported(graph, op, "no constant input")
    source, other = (op.inputs[0], 1) if constant[1] else (op.inputs[1], 0)
    value = graph.tensors[op.inputs[other]].data.astype(np.float64).reshape(-1) - inputs[other][1]
    if value.size not in (1, channels):
        raise _unsupported(graph, op, "a constant of neither one value nor one per channel")
    s_x, s_k = inputs[1 - other][0], inputs[other][0]
    scale, shift = (s_x / s_out, s_k * value / s_out) if op.name == "ADD" else (s_x * s_k * value / s_out, 0.0)
    return source, _requantize_constants(kernels, channels, scale, shift, zero_point, q_range)


def _requantizing(graph: Graph, op: Operator, kernels) -> Tuple[int, tuple]:
    """An op that computes each int8 code from one value of its input and its channel: a QUANTIZE,
    or an int8 ADD or MUL of a tensor and a constant (:func:`_int8_with_constant`): ``(the tensor
    read, the requantize constants)``."""
    if op.name != "QUANTIZE":
        return _int8_with_constant(graph, op, kernels)
    _check_float(graph, op)
    out_codes = _codes(graph, op, op.outputs[0])
    if out_codes is None:
        raise _unsupported(graph, op, f"output type {graph.tensors[op.outputs[0]].dtype}")
    return op.inputs[0], _requantize_constants(kernels, _channels(graph, op.inputs[0]), 1.0 / out_codes[0], 0.0,
                                               out_codes[1])


def _elementwise_int8(graph: Graph, op: Operator, kernels, code: int) -> Run:
    """int8 ADD (``code`` 0) or MUL (1) of two tensors of one shape, or of a tensor and a constant
    (one value or one per channel): the real-valued sum or product in the output's scale,
    requantised."""
    inputs, (s_out, zero_point), q_range, channels, constant = _int8_operands(graph, op)
    target = op.outputs[0]
    if any(constant):  # op 0: a * scale[c] + shift[c], the constant folded into scale or shift
        source, constants = _int8_with_constant(graph, op, kernels)
        return _elementwise_step(source, target, _requantizing_run(kernels, constants))
    if code == 0:
        run_op = _requantizer(kernels, channels, inputs[0][0] / s_out, inputs[1][0] / s_out, 1, zero_point, q_range)
    else:
        run_op = _requantizer(kernels, channels, inputs[0][0] * inputs[1][0] / s_out, 0.0, 2, zero_point, q_range)
    first, second = op.inputs[:2]

    def run(values):
        a, b = values[first], values[second]
        if a.shape != b.shape:
            raise _unsupported(graph, op, f"int8 inputs of shapes {a.shape} and {b.shape} (broadcasting)")
        out = values.alloc(a.shape, np.float32)
        run_op(a, out, b)
        values[target] = out

    return run


def add(graph: Graph, op: Operator, kernels) -> Run:
    """ADD with broadcasting and fused activation."""
    return _elementwise(graph, op, kernels, 0)


def mul(graph: Graph, op: Operator, kernels) -> Run:
    """MUL with broadcasting and fused activation."""
    return _elementwise(graph, op, kernels, 1)


def relu(graph: Graph, op: Operator, kernels) -> Run:
    """RELU (int8: requantised to the output's scale, as TFLite)."""
    codes, out_codes = _codes(graph, op, op.inputs[0]), _codes(graph, op, op.outputs[0])
    _check_float(graph, op, int8=codes is not None and out_codes is not None)
    source, target = op.inputs[0], op.outputs[0]
    zero = _on_device(kernels, np.zeros(1, np.float32))
    if codes is not None:
        rescale = _requantizer(kernels, _channels(graph, source), codes[0] / out_codes[0], 0.0, 0, out_codes[1],
                               (max(_INT8[0], out_codes[1]), _INT8[1]))

    def run(values):
        x = values[source]
        out = values.alloc(x.shape, np.float32)
        if codes is None:
            kernels.binary_elementwise(x, zero, 0, 0.0, math.inf, out)
        else:
            rescale(x, out)
        values[target] = out

    return run


def concatenation(graph: Graph, op: Operator, kernels, residual: Optional[int] = None,
                  target: Optional[int] = None) -> Run:
    """CONCATENATION along any axis (fused activation NONE). ``residual`` and ``target`` fuse the
    ADD that follows (``target = concat + residual``, one pass), as a block's output plus its skip."""
    if op.options.FusedActivationFunction() != 0:
        raise _unsupported(graph, op, "a fused activation on CONCATENATION")
    _same_quantization(graph, op, op.inputs)
    axis, sources = op.options.Axis(), list(op.inputs)
    target = op.outputs[0] if target is None else target
    none = _on_device(kernels, np.zeros(0, np.float32))

    def run(values):
        parts = [values[s] for s in sources]
        shape = list(parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        out = values.alloc(tuple(shape), parts[0].dtype)
        if axis in (-1, len(shape) - 1) and out.dtype == np.float32:
            kernels.concat_channels(parts, none if residual is None else values[residual], out)
        else:
            np.concatenate(parts, axis=axis, out=out)
            if residual is not None:
                np.add(out, values[residual], out=out)
        values[target] = out

    return run


def _pool(graph: Graph, op: Operator, kernels, kind: int, pack: Optional[tuple] = None) -> Run:
    codes = _codes(graph, op, op.inputs[0])
    _check_float(graph, op, int8=True)
    o = op.options
    fh, fw, sh, sw, padding = o.FilterHeight(), o.FilterWidth(), o.StrideH(), o.StrideW(), o.Padding()
    low, high = _activation(graph, op, o.FusedActivationFunction())
    source, target = op.inputs[0], op.outputs[0]
    rounding = None
    if codes is not None:  # int8: the codes' maximum (one of them), or their mean requantised (q rounded)
        _same_quantization(graph, op, op.inputs)
        q_range = _int8_range(graph, op, o.FusedActivationFunction(), *codes)
        low, high = (float(q - codes[1]) for q in q_range)  # as codes: the maximum's clamp
        if kind != 0:
            low, high = -math.inf, math.inf
            rounding = _requantizer(kernels, _channels(graph, source), 1.0, 0.0, 0, codes[1], q_range, "q")
    if rounding is not None and pack is not None:
        raise _unsupported(graph, op, "an LceQuantize fused after an int8 average pool")
    packing = _output_packing(graph, op, kernels, pack, _channels(graph, source))

    def run(values):
        x = values[source]
        batch, height, width, channels = x.shape
        out_h, pad_top = _same_padding(height, fh, sh, 1, padding)
        out_w, pad_left = _same_padding(width, fw, sw, 1, padding)
        out = values.alloc((batch, out_h, out_w, channels), np.float32)
        kernels.pool2d(x, [fh, fw, sh, sw, pad_top, pad_left], kind, low, high, out, **packing(values, out.shape))
        if rounding is not None:
            rounding(out, out)
        values[target] = out

    return run


def max_pool_2d(graph: Graph, op: Operator, kernels, pack: Optional[tuple] = None) -> Run:
    """MAX_POOL_2D. ``pack``: the LceQuantize that reads its output, done as each row is written
    (:func:`_output_packing`)."""
    return _pool(graph, op, kernels, 0, pack)


def average_pool_2d(graph: Graph, op: Operator, kernels) -> Run:
    """AVERAGE_POOL_2D (mean over the taps inside the image, as TFLite)."""
    return _pool(graph, op, kernels, 1)


def _nearest_indices(size_in: int, size_out: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    """TFLite's RESIZE_NEAREST_NEIGHBOR source index for each output index."""
    scale = (size_in - 1) / (size_out - 1) if align_corners and size_out > 1 else size_in / size_out
    offset = 0.5 if half_pixel else 0.0
    position = (np.arange(size_out) + offset) * scale
    index = np.round(position) if align_corners else np.floor(position)
    return np.minimum(index.astype(np.int64), size_in - 1)


def resize_nearest_neighbor(graph: Graph, op: Operator, kernels, residual: Optional[int] = None,
                            target: Optional[int] = None, add_activation: int = 0, pack: Optional[tuple] = None) -> Run:
    """RESIZE_NEAREST_NEIGHBOR to the constant size of its second input. ``residual``, ``target``
    and ``add_activation`` fuse the ADD that follows (``target = clamp(resized + residual)``, one
    pass), as an hourglass's upsampled branch plus its skip; in an int8 file that ADD requantises
    the two codes as its own step does. ``pack``: the LceQuantize that reads the output (the ADD's,
    where one is fused), done as each row is written (:func:`_output_packing`)."""
    size = _constant(graph, op, 1).reshape(-1)
    _same_quantization(graph, op, op.inputs[:1])
    align, half = bool(op.options.AlignCorners()), bool(op.options.HalfPixelCenters())
    low, high = _activation(graph, op, add_activation)
    source, target = op.inputs[0], op.outputs[0] if target is None else target
    none = _on_device(kernels, np.zeros(0, np.float32))
    requantize = {}
    if residual is not None and _codes(graph, op, source) is not None:  # the int8 ADD writing target
        requantize["requantize"] = _int8_add_after(graph, op, kernels, target, residual)
    indices: Dict[tuple, tuple] = {}  # input (height, width) -> source rows and columns
    packing = _output_packing(graph, op, kernels, pack, _channels(graph, source))

    def run(values):
        x = values[source]
        batch, height, width, channels = x.shape
        out = values.alloc((batch, int(size[0]), int(size[1]), channels), x.dtype)
        if (height, width) not in indices:
            indices[height, width] = tuple(_on_device(kernels, _nearest_indices(n, int(m), align, half).astype(np.int32))
                                           for n, m in ((height, size[0]), (width, size[1])))
        rows, cols = indices[height, width]
        if x.dtype == np.float32:
            kernels.resize_nearest(x, rows, cols, none if residual is None else values[residual], low, high, out,
                                   **packing(values, out.shape), **requantize)
        else:  # bit-packed or other tensors: a gather, then the ADD (never fused for them)
            out[:] = x[:, rows][:, :, cols]
        values[target] = out

    return run


def _bilinear_taps(size_in: int, size_out: int, align_corners: bool, half_pixel: bool) -> tuple:
    """TFLite's RESIZE_BILINEAR along one axis: for each output index, the two source indices and
    the second one's weight. TFLite's source position, in float32 as it computes it, is clamped to
    the input (TFLite clamps the indices instead; the same values)."""
    scale = np.float32((size_in - 1) / (size_out - 1) if align_corners and size_out > 1 else size_in / size_out)
    index = np.arange(size_out, dtype=np.float32)
    position = (index + np.float32(0.5)) * scale - np.float32(0.5) if half_pixel else index * scale
    position = np.clip(position, 0, size_in - 1)
    lower = np.floor(position).astype(np.int32)
    upper = np.minimum(lower + 1, size_in - 1)
    return lower, upper, (position - lower).astype(np.float32)


def resize_bilinear(graph: Graph, op: Operator, kernels) -> Run:
    """RESIZE_BILINEAR of a float32 tensor to the constant size of its second input (as MediaPipe's
    full-range BlazeFace upsamples): each output value the two nearest source values along the
    rows, then along the columns, weighted by distance (:func:`_bilinear_taps`). On the CPU
    kernels only."""
    _check_float(graph, op)
    if not hasattr(kernels, "resize_bilinear"):
        raise _unsupported(graph, op, "bilinear resizing on these kernels (the CPU kernels run it)")
    size = _constant(graph, op, 1).reshape(-1)
    align, half = bool(op.options.AlignCorners()), bool(op.options.HalfPixelCenters())
    source, target = op.inputs[0], op.outputs[0]
    taps: Dict[tuple, tuple] = {}  # input (height, width) -> the rows' taps, then the columns'

    def run(values):
        x = values[source]
        batch, height, width, channels = x.shape
        if (height, width) not in taps:
            taps[height, width] = _bilinear_taps(height, int(size[0]), align, half) + \
                _bilinear_taps(width, int(size[1]), align, half)
        out = values.alloc((batch, int(size[0]), int(size[1]), channels), np.float32)
        kernels.resize_bilinear(x, *taps[height, width], out)
        values[target] = out

    return run


def depthwise_conv_2d(graph: Graph, op: Operator, kernels) -> Run:
    """DEPTHWISE_CONV_2D in float32, depth multiplier 1 (each channel its own ``fh x fw`` filter),
    with bias and fused activation: MediaPipe's BlazeFace face detectors use them. On the CPU
    kernels only."""
    _check_float(graph, op)
    if not hasattr(kernels, "depthwise_conv2d"):
        raise _unsupported(graph, op, "depthwise convolutions on these kernels (the CPU kernels run them)")
    o = op.options
    filters = _constant(graph, op, 1, np.float32)
    if filters.ndim != 4 or filters.shape[0] != 1 or filters.shape[3] != _channels(graph, op.inputs[0]):
        raise _unsupported(graph, op, f"a depth multiplier other than 1 (filters {filters.shape})")
    _, fh, fw, channels = filters.shape
    filters = np.ascontiguousarray(filters[0])
    bias = _constant(graph, op, 2, np.float32) if len(op.inputs) > 2 and op.inputs[2] >= 0 \
        else np.zeros(channels, np.float32)
    sh, sw, dh, dw, padding = o.StrideH(), o.StrideW(), o.DilationHFactor(), o.DilationWFactor(), o.Padding()
    low, high = _activation(graph, op, o.FusedActivationFunction())
    source, target = op.inputs[0], op.outputs[0]

    def run(values):
        x = values[source]
        batch, height, width, _ = x.shape
        out_h, pad_top = _same_padding(height, fh, sh, dh, padding)
        out_w, pad_left = _same_padding(width, fw, sw, dw, padding)
        out = values.alloc((batch, out_h, out_w, channels), np.float32)
        kernels.depthwise_conv2d(x, filters, bias, [fh, fw, sh, sw, dh, dw, pad_top, pad_left], low, high, out)
        values[target] = out

    return run


def reshape(graph: Graph, op: Operator, kernels) -> Run:
    """RESHAPE that keeps the batch axis (the file's output shape with the batch of the input run),
    copied into a buffer of its own (the engine recycles the input's once its last reader has run)."""
    source, target = op.inputs[0], op.outputs[0]
    stored_in, stored_out = graph.tensors[source].shape, graph.tensors[target].shape
    if not stored_in or not stored_out or stored_in[0] != stored_out[0] \
            or int(np.prod(stored_in)) != int(np.prod(stored_out)):
        raise _unsupported(graph, op, f"a reshape from {stored_in} to {stored_out} that does not keep the batch axis")

    def run(values):
        x = values[source]
        out = values.alloc((x.shape[0],) + tuple(stored_out[1:]), x.dtype)
        out[...] = x.reshape(out.shape)
        values[target] = out

    return run


def pad(graph: Graph, op: Operator, kernels) -> Run:
    """PAD / PADV2 with constant paddings (and constant value for PADV2; int8: the codes padded
    with the zero point's, or the value's)."""
    paddings = _constant(graph, op, 1).astype(np.int64)
    value = float(_constant(graph, op, 2).reshape(-1)[0]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else 0.0
    codes = _codes(graph, op, op.inputs[0])
    if codes is not None:
        _same_quantization(graph, op, op.inputs[:1])
        value = value - codes[1] if len(op.inputs) > 2 and op.inputs[2] >= 0 else 0.0
    source, target = op.inputs[0], op.outputs[0]

    def run(values):
        x = values[source]
        if x.ndim != len(paddings) or np.any(paddings < 0):
            raise ValueError(f"paddings {paddings.tolist()} for an input of shape {x.shape}")
        out = values.alloc(tuple(int(n) + int(before) + int(after) for n, (before, after) in zip(x.shape, paddings)),
                           x.dtype)
        out.fill(value)  # then the input in its place (np.pad took ~80 us a call, this ~35: BlazeFace front)
        out[tuple(slice(int(before), int(before) + n) for n, (before, _) in zip(x.shape, paddings))] = x
        values[target] = out

    return run


def quantize(graph: Graph, op: Operator, kernels) -> Run:
    """QUANTIZE float32 -> int8: ``q = round(x / scale) + zero point``, clamped (a NaN to 127)."""
    source, constants = _requantizing(graph, op, kernels)
    return _elementwise_step(source, op.outputs[0], _requantizing_run(kernels, constants))


def dequantize(graph: Graph, op: Operator, kernels) -> Run:
    """DEQUANTIZE int8 -> float32: ``scale * (q - zero point)``."""
    codes = _codes(graph, op, op.inputs[0])
    if codes is None or graph.tensors[op.outputs[0]].dtype != np.float32:
        raise _unsupported(graph, op, f"input type {graph.tensors[op.inputs[0]].dtype}")
    run_op = _requantizer(kernels, _channels(graph, op.inputs[0]), codes[0], 0.0, rounding=None)
    source, target = op.inputs[0], op.outputs[0]

    return _elementwise_step(source, target, run_op)


OPS: Dict[str, Callable[..., Run]] = {
    "LceQuantize": lce_quantize,
    "LceDequantize": lce_dequantize,
    "LceBconv2d": lce_bconv2d,
    "CONV_2D": conv_2d,
    "DEPTHWISE_CONV_2D": depthwise_conv_2d,
    "ADD": add,
    "MUL": mul,
    "RELU": relu,
    "CONCATENATION": concatenation,
    "MAX_POOL_2D": max_pool_2d,
    "AVERAGE_POOL_2D": average_pool_2d,
    "RESIZE_NEAREST_NEIGHBOR": resize_nearest_neighbor,
    "RESIZE_BILINEAR": resize_bilinear,
    "PAD": pad,
    "PADV2": pad,
    "RESHAPE": reshape,
    "QUANTIZE": quantize,
    "DEQUANTIZE": dequantize,
}
