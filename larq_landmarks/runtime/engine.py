"""``Engine``: runs the ``.tflite`` file that :func:`larq_landmarks.export.convert` writes (the same
file LCE runs on ARM) with this package's own bit-packed kernels, on x86-64 without LCE or
TensorFlow.

    engine = Engine("face.tflite", num_threads=2)
    heatmaps = engine.predict(images)        # (B, S, S, 3) float32 -> (B, S/4, S/4, K)
    engine.kernels                           # "avx512", "avx512bw", "avx2" or "portable"

    gpu = Engine("face.tflite", kernels="cuda")  # the whole model on an NVIDIA GPU (needs CuPy)
"""
import collections
import contextlib
import os
import struct
import threading
import time
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from larq_landmarks.runtime import cuda
from larq_landmarks.runtime import kernels as kernel_paths
from larq_landmarks.runtime import ops
from larq_landmarks.runtime.graph import CorruptModelError, Graph, UnsupportedModelError, read_graph


def _fused_affine(graph: Graph, reader, producers, consumers, activation: bool = False):
    """The batch norm folded before an LceQuantize or a CONV_2D (``reader``) as ``MUL`` by and/or
    ``ADD`` of per-channel constants (each read only by the next op, no fused activation, except
    on the op next to the reader where ``activation``): returns ``(source tensor, multiplier or
    None, bias or None, indices of the folded ops, activation code)``, computed ``clamp(x * m + b)``."""
    source, multiplier, bias, folded, code = reader.inputs[0], None, None, [], 0
    for kind in ("ADD", "MUL"):  # walking back from the reader: the ADD comes last
        op = producers.get(source)
        if op is None or op.name != kind:
            continue
        op_code = op.options.FusedActivationFunction() if op.options else 0
        if op_code != 0 and (folded or not activation):
            continue
        out = op.outputs[0]
        if out in graph.outputs or len(consumers.get(out, [])) != 1:
            break
        constant = [i for i in op.inputs if graph.tensors[i].data is not None]
        variable = [i for i in op.inputs if graph.tensors[i].data is None]
        if len(constant) != 1 or len(variable) != 1:
            break
        factor = graph.tensors[constant[0]].data
        channels = graph.tensors[variable[0]].shape[-1]
        if factor.size not in (1, channels) or (factor.size == channels > 1 and factor.shape[-1] != channels):
            break
        if kind == "ADD":
            bias = factor
        else:
            multiplier = factor
        source = variable[0]
        code = code if folded else op_code
        folded.append(op.index)
    return source, multiplier, bias, folded, code


def _int8_sign_threshold(graph: Graph, reader, producers, consumers, kernels) -> Optional[tuple]:
    """In an int8 file, the batch norm's MUL and ADD before an LceQuantize (``reader``), as
    :func:`_fused_affine` finds them, each requantising: the bit is a function of the code they
    read, one per channel, found by running those ops' own steps on every code it can take; where
    it is ``code < T`` or ``code > T`` (or constant), as bitpack's fused ``code * m + b < 0``:
    ``(source tensor, m, b, indices of the folded ops)``, else None."""
    source, _, _, folded, _ = _fused_affine(graph, reader, producers, consumers)
    if not folded:
        return None
    scale_zero = graph.tensors[source].quantization
    channels = graph.tensors[source].shape[-1]
    if graph.tensors[source].dtype != np.int8 or scale_zero is None or len(scale_zero[1]) != 1:
        return None
    codes = np.arange(-128, 128, dtype=np.float32) - float(scale_zero[1][0])  # every code, each channel
    values = ops.Values(len(graph.tensors), {})
    values[source] = np.ascontiguousarray(np.broadcast_to(codes[None, None, :, None], (1, 1, 256, channels)))
    for index in reversed(folded):  # folded walks back from the reader
        ops.OPS[graph.operators[index].name](graph, graph.operators[index], kernels)(values)
    negative = values[reader.inputs[0]][0, 0] < 0  # (256 codes, channels): the bits
    count = negative.sum(0)
    m, b = np.zeros(channels, np.float32), np.where(count == 256, -1.0, 1.0).astype(np.float32)
    for c in np.flatnonzero((count > 0) & (count < 256)):
        if negative[:count[c], c].all():  # the lowest codes: code < codes[count]
            m[c], b[c] = 1.0, -codes[count[c]]
        elif negative[256 - count[c]:, c].all():  # the highest: code > codes[255 - count]
            m[c], b[c] = -1.0, codes[255 - count[c]]
        else:
            return None
    return source, m, b, folded


def _same_codes(graph: Graph, a: int, b: int) -> bool:
    """Whether tensors ``a`` and ``b`` are quantised alike (or neither is): an int8 value moved from
    one to the other keeps its code."""
    qa, qb = graph.tensors[a].quantization, graph.tensors[b].quantization
    if qa is None or qb is None:
        return qa is None and qb is None
    return all(np.array_equal(x, y) for x, y in zip(qa, qb))


def _following_add(graph: Graph, op, producers, consumers):
    """For a channel CONCATENATION, a RESIZE_NEAREST_NEIGHBOR or a CONV_2D without activation
    read only by an ADD of a same-shape activation: ``(the tensors added, the ADD's output, the
    ADD's activation, ops folded in)``, else None (a float ADD without activation read only by a
    RELU gives the RELU's output and clamp, the RELU folded in); the op and the ADD are then one
    pass, run where the ADD was (the other tensor may be computed after the op, as an hourglass's skip branch
    after its upsampling). For a CONV_2D the tensor added may be a channel CONCATENATION read only
    by the ADD: its parts are then added directly and the concatenation is folded in too. In an
    int8 file a CONCATENATION (its binary convolutions then do the int8 ADD), a
    RESIZE_NEAREST_NEIGHBOR (the int8 ADD in its pass) and a CONV_2D whose ADD's output a max pool
    alone reads (:func:`_following_max_pool`: the convolution then adds, pools and packs in one pass,
    its full-size output never written) qualify."""
    if op.name == "CONCATENATION":
        if op.options.Axis() not in (-1, 3) or op.options.FusedActivationFunction() != 0:
            return None
    elif op.name == "CONV_2D":
        if op.options.FusedActivationFunction() != 0:
            return None
    elif op.name != "RESIZE_NEAREST_NEIGHBOR":
        return None
    out = op.outputs[0]
    readers = consumers.get(out, [])
    if out in graph.outputs or len(readers) != 1 or readers[0].name != "ADD":
        return None
    add = readers[0]
    activation = add.options.FusedActivationFunction() if add.options else 0
    if activation != 0 and op.name == "CONCATENATION":
        return None
    others = [i for i in add.inputs if i != out]
    if len(others) != 1 or graph.tensors[others[0]].data is not None:
        return None
    dtypes = [graph.tensors[i].dtype for i in (out, others[0], add.outputs[0])]
    int8 = all(dtype == np.int8 for dtype in dtypes) and (
        op.name in ("CONCATENATION", "RESIZE_NEAREST_NEIGHBOR")
        or (op.name == "CONV_2D" and _following_max_pool(graph, add.outputs[0], consumers) is not None))
    if graph.tensors[others[0]].shape != graph.tensors[out].shape or \
            not (int8 or all(dtype == np.float32 for dtype in dtypes)):
        return None
    concat = producers.get(others[0])
    if op.name == "CONV_2D" and concat is not None and concat.name == "CONCATENATION" \
            and concat.options.Axis() in (-1, 3) and concat.options.FusedActivationFunction() == 0 \
            and len(consumers.get(others[0], [])) == 1 and others[0] not in graph.outputs \
            and all(graph.tensors[i].data is None and graph.tensors[i].dtype == graph.tensors[others[0]].dtype
                    and _same_codes(graph, i, others[0]) and graph.tensors[i].shape[-1] % 16 == 0
                    for i in concat.inputs):
        return list(concat.inputs), add.outputs[0], activation, [concat.index]
    relu = _following_relu(graph, add, consumers)
    if relu is not None and activation == 0 and op.name != "CONCATENATION" and not int8:
        return others, relu.outputs[0], _RELU, [relu.index]
    return others, add.outputs[0], activation, []


_RELU = 1  # TFLite's fused activation code for RELU


def _following_relu(graph: Graph, op, consumers: dict):
    """The RELU alone reading ``op``'s float32 output (not a graph output), else None: the op's pass
    can clamp its output as the RELU does (MediaPipe's BlazeFace blocks end in ``ADD`` then
    ``RELU``)."""
    out = op.outputs[0]
    readers = consumers.get(out, [])
    if out in graph.outputs or len(readers) != 1 or readers[0].name != "RELU" \
            or graph.tensors[out].dtype != np.float32:
        return None
    return readers[0]


def _following_max_pool(graph: Graph, tensor: int, consumers: dict) -> Optional[tuple]:
    """For a float convolution's output (its ADD's, where one is fused) read only by a MAX_POOL_2D
    whose stride is its window, without activation (int8: its output quantised as its input, so
    that its codes are the maxima of its input's): ``(that pool, (window height, window width),
    padding code)``, else None; the convolution can then pool its output as it computes it."""
    readers = consumers.get(tensor, [])
    if tensor in graph.outputs or len(readers) != 1 or readers[0].name != "MAX_POOL_2D":
        return None
    pool = readers[0]
    o = pool.options
    window = (o.FilterHeight(), o.FilterWidth())
    if o.FusedActivationFunction() != 0 or window != (o.StrideH(), o.StrideW()) or window[0] * window[1] < 2 \
            or graph.tensors[pool.outputs[0]].dtype != graph.tensors[tensor].dtype \
            or graph.tensors[tensor].dtype not in (np.float32, np.int8) \
            or not _same_codes(graph, tensor, pool.outputs[0]):
        return None
    return pool, window, o.Padding()


def _packed_quantizes(graph: Graph, fused: dict, producers: dict) -> dict:
    """The LceQuantize ops that read an LceBconv2d's float output (through a batch norm folded into
    them, ``fused``, or directly), whose bits the convolution's epilogue can pack: LceBconv2d index
    -> ``(quantize output, multiplier or None, bias or None, quantize index)``."""
    packs = {}
    for op in graph.operators:
        if op.name != "LceQuantize":
            continue
        source, multiplier, bias = fused[op.index][:3] if op.index in fused else (op.inputs[0], None, None)
        producer = producers.get(source)
        if producer is not None and producer.name == "LceBconv2d" and producer.index not in packs \
                and graph.tensors[source].dtype in (np.float32, np.int8):
            packs[producer.index] = (op.outputs[0], multiplier, bias, op.index)
    return packs


def _same_values(part, whole) -> bool:
    """Whether a float32 or int8 tensor's values go into another unchanged (an int8 one in the same
    scale and zero point)."""
    if part.dtype != whole.dtype or part.dtype not in (np.float32, np.int8):
        return False
    return part.dtype == np.float32 or (part.quantization is not None and whole.quantization is not None and all(
        np.array_equal(a, b) for a, b in zip(part.quantization, whole.quantization)))


def _concatenated_outputs(graph: Graph, residuals: dict, folded: set, packs: dict, chains: dict,
                          producers: dict, consumers: dict, position: Optional[dict] = None) -> dict:
    """The channel CONCATENATIONs (alone, or done with the ADD after them, ``residuals``) whose parts
    are all LceBconv2d float outputs read by nothing else (but the LceQuantize that convolution
    packs, ``packs``, through the batch norm folded into it, ``chains``), any residual computed
    before the first of them (``position``: each op's place in the run, by index where not given):
    each part's convolution can write its channels of the output (the ADD's, plus the residual)
    itself. Returns ``{concatenation index: {LceBconv2d index: (output, channel offset, channels,
    residual or None)}}``."""
    place = (lambda index: index) if position is None else position.__getitem__
    found = {}
    for op in graph.operators:
        if op.name != "CONCATENATION" or op.options.Axis() not in (-1, 3) or op.options.FusedActivationFunction() != 0:
            continue
        if op.index in residuals:
            (residual,), target, _ = residuals[op.index]
        elif op.index in folded:  # done inside another op (a convolution's residual)
            continue
        else:
            residual, target = None, op.outputs[0]
        parts, offset = {}, 0
        for tensor in op.inputs:
            writer = producers.get(tensor)
            if writer is None or writer.name != "LceBconv2d" or writer.index in parts or tensor in graph.outputs \
                    or not _same_values(graph.tensors[tensor], graph.tensors[op.outputs[0]]):
                break
            readers = {op.index}
            if writer.index in packs:
                quantize = packs[writer.index][3]
                readers |= {quantize, *chains.get(quantize, [])}
            if any(reader.index not in readers for reader in consumers[tensor]):
                break
            parts[writer.index] = (target, offset, graph.tensors[target].shape[-1], residual)
            offset += graph.tensors[tensor].shape[-1]
        else:
            source = producers.get(residual)
            if residual is None or residual in graph.inputs or \
                    (source is not None and place(source.index) < min(place(part) for part in parts)):
                found[op.index] = parts
    return found


def _packed_outputs(graph: Graph, folded: set, deferred: dict, residuals: dict, max_pools: dict,
                    fused: dict) -> dict:
    """The LceQuantize ops (with the batch norm folded into them, ``fused``, or alone) that read the
    float output (in an int8 file, the codes) a CONV_2D, RESIZE_NEAREST_NEIGHBOR or MAX_POOL_2D step
    writes (the ADD's or the pool's where one is done in that step: ``residuals``, ``max_pools``),
    one a step: that step can pack its output rows as it writes them, while they are in cache, where
    a step of its own would read the whole tensor again. Returns ``{step op index: (quantize output,
    multiplier or None, bias or None, quantize index)}``."""
    written = {}  # float or int8 tensor -> the step op that writes it
    for op in graph.operators:
        if op.index in folded:
            continue
        op = deferred.get(op.index, op)  # an op done with the ADD after it runs at the ADD's place
        if op.name == "CONV_2D" and op.index in max_pools:
            tensor = max_pools[op.index][0]
        elif op.name in ("CONV_2D", "RESIZE_NEAREST_NEIGHBOR"):
            tensor = residuals[op.index][1] if op.index in residuals else op.outputs[0]
        elif op.name == "MAX_POOL_2D":
            tensor = op.outputs[0]
        else:
            continue
        if graph.tensors[tensor].dtype in (np.float32, np.int8):  # int8: codes, as the step writes them
            written[tensor] = op.index
    packs = {}
    for op in graph.operators:
        if op.name != "LceQuantize" or op.index in folded or op.outputs[0] in graph.outputs:
            continue
        source, multiplier, bias = fused[op.index][:3] if op.index in fused else (op.inputs[0], None, None)
        writer = written.get(source)
        if writer is not None and writer not in packs:
            packs[writer] = (op.outputs[0], multiplier, bias, op.index)
    return packs


def _hoisted_residuals(graph: Graph, order: list, residuals: dict, folded: set, producers: dict) -> list:
    """The run order ``order`` (the graph's operators) with, for each channel CONCATENATION done with
    the ADD after it (``residuals``) whose residual is computed after its first part (an int8
    downsampling block's skip branch: the batch norm's MUL and ADD and the 1x1 CONV_2D, after the
    block's binary convolutions in the file), the ops that compute that residual moved to just
    before the first part, where they read nothing computed from there on but each other (and are
    no part, nor done inside another op): the parts can then do the ADD (``_concatenated_outputs``).
    The moved ops keep their order among themselves."""
    for concat, (added, _, _) in residuals.items():
        op = graph.operators[concat]
        if op.name != "CONCATENATION" or len(added) != 1:
            continue
        residual = added[0]
        position = {o.index: i for i, o in enumerate(order)}
        writers = [producers.get(t) for t in op.inputs]
        if any(w is None for w in writers):
            continue
        start = min(position[w.index] for w in writers)
        moved, pending, movable = set(), [residual], True
        while pending and movable:
            writer = producers.get(pending.pop())
            if writer is None or position[writer.index] < start or writer.index in moved:
                continue
            movable = writer not in writers and writer.index != concat and writer.index not in folded
            moved.add(writer.index)
            pending.extend(i for i in writer.inputs if i >= 0 and graph.tensors[i].data is None)
        if movable and moved:
            order = order[:start] + [o for o in order[start:] if o.index in moved] + \
                [o for o in order[start:] if o.index not in moved]
    return order


# what each profiled step is, for Engine.time_by_part (fused steps are named as profile names them)
PARTS = {"LceBconv2d": "binary convolutions", "LceBconv2d+LceQuantize": "binary convolutions",
         "LceBconv2d+CONCATENATION": "binary convolutions",
         "LceBconv2d+LceQuantize+CONCATENATION": "binary convolutions",
         "LceBconv2d+CONCATENATION+ADD": "binary convolutions",
         "LceBconv2d+LceQuantize+CONCATENATION+ADD": "binary convolutions",
         "CONV_2D": "float convolutions", "CONV_2D+ADD": "float convolutions",
         "BN+CONV_2D": "float convolutions", "BN+CONV_2D+ADD": "float convolutions",
         "CONV_2D+MAX_POOL_2D": "float convolutions", "CONV_2D+ADD+MAX_POOL_2D": "float convolutions",
         "BN+CONV_2D+MAX_POOL_2D": "float convolutions", "BN+CONV_2D+ADD+MAX_POOL_2D": "float convolutions",
         "LceQuantize": "bit-packing (with fused batch norm)", "BN+LceQuantize": "bit-packing (with fused batch norm)",
         "LceDequantize": "bit-packing (with fused batch norm)"}
# a float convolution that also does the RELU reading its output (the ADD's, where one is done)
PARTS.update({label.replace("CONV_2D+ADD", "CONV_2D+ADD+RELU") if "+ADD" in label else
              label.replace("CONV_2D", "CONV_2D+RELU"): part for label, part in PARTS.items()
              if part == "float convolutions"})
# a float convolution that also packs its output for the LceQuantize reading it (_packed_outputs)
PARTS.update({label + "+LceQuantize": part for label, part in PARTS.items() if part == "float convolutions"})
# an int8 file's convolution that quantises its float input as it reads it
PARTS.update({"QUANTIZE+" + label: part for label, part in PARTS.items() if part == "float convolutions"})

FLOAT_PRECISIONS = ("float32", "bfloat16", "int8")

# what each reduced precision needs: the kernels' function, the kernel paths that may have it, what
# to say it needs, why a path that may have it does not, and the CPU feature it may lack
_REDUCED_PRECISIONS = {
    "bfloat16": ("conv2d_bf16", ("avx512", "avx512bw"), "AVX512_BF16 and the avx512 or avx512bw kernels",
                 "built without bfloat16 (a compiler before GCC 10 or Clang 9)", "AVX512_BF16"),
    "int8": ("conv2d_int8", ("avx512", "avx512bw", "avx2"),
             "AVX512_VNNI and the avx512 or avx512bw kernels, or the avx2 kernels",
             "built without int8 (a compiler before GCC 8 or Clang 6)", "AVX512_VNNI"),
}

# the CUDA streams per thread whose recycled buffers an engine keeps (Engine._buffers)
GPU_STREAMS_KEPT = 4

# On the CPU a batch runs as many images at a time as keep the model's largest activation under
# this: the default model (8.4 MB) one image at a time, 1.19x faster an image than batches of
# 8 and 32 at once, whose activations leave the caches (docs/benchmarks.md, "CPU batches"), where a
# small model's images go together (the per-step cost of a call shared: the 64px demo model took
# 0.49 ms an image alone, 0.31 in 16s; 1 thread, avx512 kernels).
CPU_BATCH_BYTES = 8 << 20


class Engine:
    """Runs a converted landmark model with the bit-packed runtime.

    Files with float32 activations (``export.convert``) and with int8 ones (``export.convert(...,
    int8_calibration=...)``, for LCE's int8 kernels on ARM) both run: an int8 file in its own int8
    arithmetic, as TFLite's reference kernels and LCE's binary convolution define each op (XNNPACK's
    int8 kernels, which LCE's interpreter takes with ``use_xnnpack=True``, give the same outputs but
    for values within a rounding of a tie), on the CPU kernels.

    Args:
        model: path of a ``.tflite`` file, or its bytes.
        num_threads: threads the kernels split each op over. The kernels' threads are one pool per
            process, sized by the engine that runs: :meth:`predict` may be called from several
            Python threads at once (results as if one at a time); while one op has the pool,
            another thread's op runs on its calling thread alone.
        kernels: ``"auto"`` (the best the CPU runs), ``"avx512"``, ``"avx512bw"``, ``"avx2"`` or ``"portable"``;
            or on an NVIDIA GPU (CuPy needed, weights uploaded once, inputs and outputs NumPy):
            ``"cuda"`` (1-bit tensor cores on sm_80 and newer, else the popcount kernel) or
            ``"cuda-popcount"``, on CuPy's current device, or on device N: ``"cuda:N"``. The
            engine keeps to that GPU: its weights live there and every run launches there,
            whichever device is current when :meth:`predict` is called (a CuPy input must be on
            it). On the GPU, runs from several threads or on several CUDA streams at once each
            keep their own activation buffers.
        name: how errors refer to the model when it is given as bytes (default "model").
        cuda_graphs: on the GPU kernels, capture each input shape's run as CUDA graphs at its second
            call and replay them from then on (a graph between each two float convolutions' cuBLAS
            products, instead of a launch a step; the shape's activations stay allocated, up to 4
            shapes). False runs every step from Python.
        fuse_blocks: a binary convolution packs the bits of the LceQuantize that reads its output
            and writes its output into the channel CONCATENATION (+ ADD) that reads it, so that an
            HPM block's ops take no pass of their own; the float ops (in an int8 file, the
            convolutions, max pools and upsamplings) pack the LceQuantize after them too, and in
            an int8 file a convolution does the QUANTIZE or batch norm before it (and the ADD and
            max pool after it, where that pool alone reads the ADD) and an upsampling the ADD after
            it (outputs bit-identical). False runs each of them as its own step, for comparisons.
        float_precision: for files with float32 activations: ``"float32"`` (the default: TFLite's
            and LCE's results) or
            ``"bfloat16"``: the float convolutions (stem, skips, heads) multiply in bfloat16 and
            sum in float32, on CPUs with AVX512_BF16 (AMD Zen 4 and newer, Intel Cooper Lake and
            Sapphire Rapids and newer; elsewhere an error): the whole model 1.27x faster on the
            AMD Zen 5 measured; on Intel's Xeons with AMX (Sapphire Rapids and newer) on AMX's
            tiles (``kernels.amx``), 1.3-1.4x faster on the Granite Rapids-class Xeon measured, whose
            VDPBF16PS alone gives about half the FMA's products a second (0.76x float32's speed
            without the tiles: ``LARQ_LANDMARKS_NO_AMX=1``). Outputs
            move by about bfloat16's rounding (a few parts in a thousand; subnormal products count
            as zero), and further where that flips a binary layer's sign. Or ``"int8"``: int8
            products and int32 sums, the weights quantised once, a scale an output channel; the
            input as it is read, a 1x1 convolution's each pixel with its own scale and zero point,
            any other's each image (an 8-bit image is kept exactly); a NaN or infinity makes the
            outputs that read it NaN (a stem's, its image's).
            The avx512 and avx512bw kernels need AVX512_VNNI (Intel Cascade Lake, Ice Lake and
            newer Xeons, AMD Zen 4 and newer): four times the FMA's rate. The avx2 kernels run it on
            every AVX2 CPU: with AVX-VNNI (Intel Alder Lake and newer client CPUs, AMD Zen 5) the
            same way, elsewhere (Intel Haswell to Comet Lake, AMD Zen 1 to 3) with 16-bit
            multiplies at about 1.4x the FMA's rate, the same outputs bit for bit
            (``kernels.int8_vnni``); on CPUs with AMX the 1x1 convolutions take its tiles, again
            the same outputs.
            Outputs move by about a percent of their range, and further where a sign flips.
            docs/benchmarks.md measures the speed and how far the landmarks move.

    Raises:
        UnsupportedModelError: the file is not a TFLite flatbuffer, or holds an op or option the
            runtime does not implement (the message names both; LCE's interpreter runs it).
        CorruptModelError: the file is damaged: truncated, offsets out of it, or parts that do not
            fit together (found while planning, or by :meth:`predict` where a tensor's shape does
            not fit its op); the message names the file.
        CudaUnavailableError: ``kernels="cuda"`` without CuPy or a GPU, or ``"cuda:N"`` without a GPU N.

    Attributes:
        kernels: the kernel path that runs (``"avx512"``, ..., ``"cuda"``, ``"cuda-popcount"``; on
            a GPU other than device 0 with ``":N"``).
        int8_file: whether the file's activations are int8.
    """

    def __init__(self, model: Union[str, os.PathLike, bytes], num_threads: int = 1, kernels: str = "auto",
                 name: Optional[str] = None, cuda_graphs: bool = True, fuse_blocks: bool = True,
                 float_precision: str = "float32"):
        if isinstance(model, (bytes, bytearray)):
            flatbuffer, name = bytes(model), name or "model"
        else:
            name = str(model)
            if os.path.isdir(name):
                raise IsADirectoryError(f"{name}: a folder, not a model file")
            if not os.path.isfile(name):
                raise FileNotFoundError(f"{name}: model file not found")
            with open(name, "rb") as f:
                flatbuffer = f.read()
        if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
            raise ValueError(f"num_threads={num_threads!r} must be a positive integer")
        self.graph = read_graph(flatbuffer, name)
        on_gpu = kernels.startswith("cuda")
        if on_gpu:
            self._kernels = cuda.load(kernels)
            self.kernels: str = self._kernels.name
            self._device = self._kernels.device  # entered around the plan and every run
        else:
            self._kernels = kernel_paths.load(kernels)
            self.kernels = self._kernels.path
            self._device = contextlib.nullcontext()
        self.num_threads = num_threads
        if float_precision not in FLOAT_PRECISIONS:
            raise ValueError(f"float_precision={float_precision!r} must be one of {FLOAT_PRECISIONS}")
        if len(self.graph.inputs) != 1 or not self.graph.outputs or (on_gpu and len(self.graph.outputs) != 1):
            raise UnsupportedModelError(f"{name}: {len(self.graph.inputs)} inputs and {len(self.graph.outputs)} "
                                        "outputs; the runtime runs one-input models with one output (several "
                                        "on the CPU kernels: predict_outputs)")
        self.int8_file: bool = any(t.dtype == np.int8 and t.data is None for t in self.graph.tensors)
        if self.int8_file:
            if on_gpu:
                raise UnsupportedModelError(f"{name}: a file with int8 activations; the GPU kernels run float32 "
                                            "files (the CPU kernels run this one)")
            ends = [self.graph.tensors[i] for i in self.graph.inputs + self.graph.outputs]
            if any(t.dtype != np.float32 for t in ends):
                raise UnsupportedModelError(f"{name}: {', '.join(f'{t.name} is {t.dtype}' for t in ends)}; the "
                                            "runtime runs files with a float32 input and output")
            if float_precision != "float32":
                raise ValueError(f"float_precision={float_precision!r} is for files with float32 activations; "
                                 f"{name} has int8 ones, which run their own int8 arithmetic")
        if float_precision in _REDUCED_PRECISIONS:
            function, paths, needs, unbuilt, feature = _REDUCED_PRECISIONS[float_precision]
            if on_gpu:
                raise ValueError(f"float_precision={float_precision!r} is for the CPU kernels (it needs {needs}); "
                                 "the GPU kernels run float32")
            if float_precision not in kernel_paths.reduced_precisions(self._kernels):
                if self.kernels not in paths:
                    why = f"which have no {float_precision} convolutions"
                elif not hasattr(self._kernels, function):
                    why = unbuilt
                else:
                    why = f"and this CPU has no {feature}"
                raise ValueError(f"float_precision={float_precision!r} needs {needs}; these are the {self.kernels} "
                                 f"kernels, {why}")
        self.float_precision = float_precision
        with self._device:  # the ops upload their constants
            try:
                self._steps, self._step_ops = self._plan(fuse_blocks)
            except (UnsupportedModelError, CorruptModelError):
                raise
            except (ValueError, TypeError, AttributeError, LookupError, struct.error, UnicodeError) as error:
                # a file that passes the flatbuffer checks but whose parts do not fit together (an
                # op's options of another op's type, a filter of no size, ...): damaged
                raise CorruptModelError(f"{name}: its operators and tensors do not fit together "
                                        f"({type(error).__name__}: {error})") from error
        activations = [int(np.prod(t.shape[1:])) * max(np.dtype(t.dtype).itemsize, 4 * (t.dtype == np.int8))
                       for t in self.graph.tensors
                       if t.data is None and len(t.shape) > 1 and min(t.shape[1:]) > 0]
        self._images_a_run = max(1, CPU_BATCH_BYTES // max(activations, default=1))  # the CPU kernels' batch
        self._captured = None
        if on_gpu and cuda_graphs:
            self._captured = cuda.CapturedRuns(self._kernels.cp, lambda images: self._run_steps(images, {}, None),
                                               on_capture=self._forget_batch)

    def _plan(self, fuse_blocks: bool = True) -> Tuple[list, list]:
        graph = self.graph
        consumers, producers = {}, {}
        for op in graph.operators:
            for i in op.inputs:
                consumers.setdefault(i, []).append(op)
            for i in op.outputs:
                producers[i] = op
        for op in graph.operators:
            if op.name not in ops.OPS:
                raise UnsupportedModelError(
                    f"{graph.name}: operator {op.index} {op.name} is not supported by larq_landmarks.runtime; "
                    "run this file with LCE's interpreter (engine='lce')")
        # LceQuantize / CONV_2D index -> (source, multiplier, bias[, activation]): the batch norm before it
        fused, folded, chains = {}, set(), {}  # folded: ops done inside others; chains: which, per reader
        for op in graph.operators if self.int8_file else ():
            found = _int8_sign_threshold(graph, op, producers, consumers, self._kernels) \
                if op.name == "LceQuantize" else None
            if found is not None:
                fused[op.index] = found[:3]
                folded.update(found[3])
                chains[op.index] = found[3]
        for op in graph.operators if not self.int8_file else ():
            if op.name in ("LceQuantize", "CONV_2D"):
                source, multiplier, bias, skipped, code = _fused_affine(graph, op, producers, consumers,
                                                                        activation=op.name == "CONV_2D")
                if skipped:
                    fused[op.index] = (source, multiplier, bias) + ((code,) if op.name == "CONV_2D" else ())
                    folded.update(skipped)
                    chains[op.index] = skipped
        packed_quantizes = _packed_quantizes(graph, fused, producers) if fuse_blocks else {}
        folded.update(index for _, _, _, index in packed_quantizes.values())
        packs = {bconv: pack[:3] for bconv, pack in packed_quantizes.items()}
        # op index -> (tensors added, ADD output, activation): op + ADD in one pass, at the ADD's
        # place; convolutions first, as they can take a concatenation in as well
        residuals, deferred = {}, {}  # deferred: ADD index -> the op done with it
        for op in sorted(graph.operators, key=lambda op: op.name != "CONV_2D"):
            add = _following_add(graph, op, producers, consumers)
            if add is not None and self.int8_file and op.name == "CONV_2D" and not fuse_blocks:
                add = None  # (the int8 plan's own steps, fuse_blocks=False: each op one)
            if add is None or op.index in folded or consumers[op.outputs[0]][0].index in deferred \
                    or any(i in folded or i in residuals for i in add[3]):
                continue
            residuals[op.index] = add[:3]
            deferred[consumers[op.outputs[0]][0].index] = op
            folded.add(op.index)
            folded.update(add[3])
        # a float CONV_2D without activation read only by a RELU: that RELU's clamp in its pass (as a
        # residual of no tensors), and the RELU no step (MediaPipe's full-range BlazeFace)
        for op in graph.operators:
            relu = _following_relu(graph, op, consumers) if op.name == "CONV_2D" else None
            if relu is not None and op.index not in folded and op.index not in residuals and relu.index not in folded \
                    and op.options.FusedActivationFunction() == 0 and graph.tensors[op.inputs[0]].dtype == np.float32:
                residuals[op.index] = ([], relu.outputs[0], _RELU)
                folded.add(relu.index)
        relus = {index for index, (_, target, _) in residuals.items() if producers[target].name == "RELU"}
        # LceBconv2d index -> (output, channel offset, channels, residual or None): convolutions
        # writing their channels of a concatenation (+ ADD) themselves, which has no step of its own
        intos = {}
        order = list(graph.operators)  # the run order of the ops (their steps, and ops done in them)
        if self.int8_file and fuse_blocks:
            order = _hoisted_residuals(graph, order, residuals, folded, producers)
        position = {op.index: i for i, op in enumerate(order)}
        concatenations = _concatenated_outputs(graph, residuals, folded, packed_quantizes, chains, producers,
                                               consumers, position) if fuse_blocks else {}
        undone = [index for index in residuals if index not in concatenations
                  and graph.operators[index].name == "CONCATENATION"] if self.int8_file else []
        if undone:
            # int8: only binary convolutions do a concatenation's ADD; where they cannot (its residual
            # computed after them) the ADD stays a step and they still write the concatenation
            for concat in undone:
                del residuals[concat], deferred[next(add for add, op in deferred.items() if op.index == concat)]
                folded.discard(concat)
            concatenations = _concatenated_outputs(graph, residuals, folded, packed_quantizes, chains, producers,
                                                   consumers, position) if fuse_blocks else {}
        for concat, parts in concatenations.items():
            intos.update(parts)
            if concat in residuals:  # the ADD after it is done too
                add = next(index for index, op in deferred.items() if op.index == concat)
                del residuals[concat], deferred[add]
                folded.add(add)
            folded.add(concat)
        # CONV_2D index -> (source, [ops]): in an int8 file, the batch norm before a convolution (its
        # MUL and ADD) and the QUANTIZE of a float input before that, each requantising the codes as
        # the convolution reads its input (after the hoisting above, which moves them with it)
        int8_inputs, quantized = {}, set()
        for op in graph.operators if self.int8_file and fuse_blocks else ():
            if op.name != "CONV_2D" or (op.index in folded and op.index not in residuals) \
                    or graph.tensors[op.inputs[0]].dtype != np.int8:
                continue
            # (an activation fused into the ADD is in its requantising's range)
            source, _, _, chain, _ = _fused_affine(graph, op, producers, consumers, activation=True)
            chain = [graph.operators[index] for index in reversed(chain)]
            first = producers.get(source)
            if first is not None and first.name == "QUANTIZE" and source not in graph.outputs \
                    and len(consumers[source]) == 1 and graph.tensors[first.inputs[0]].dtype == np.float32:
                chain, source = [first] + chain, first.inputs[0]
            if chain and not folded.intersection(o.index for o in chain):
                int8_inputs[op.index] = (source, chain)
                folded.update(o.index for o in chain)
                if chain[0].name == "QUANTIZE":
                    quantized.add(op.index)
        # CONV_2D index -> (pool output, window, padding): the MAX_POOL_2D after it done in its pass
        max_pools = {}
        for op in graph.operators if not self.int8_file or fuse_blocks else ():
            if op.name == "CONV_2D":
                found = _following_max_pool(graph, residuals[op.index][1] if op.index in residuals else op.outputs[0],
                                            consumers)
                if found is not None:
                    max_pools[op.index] = (found[0].outputs[0],) + found[1:]
                    folded.add(found[0].index)
        row_packs = _packed_outputs(graph, folded, deferred, residuals, max_pools, fused) if fuse_blocks else {}
        folded.update(index for _, _, _, index in row_packs.values())
        steps, step_ops = [], []
        for op in order:
            if op.index in folded:
                continue
            op = deferred.get(op.index, op)
            tensors, target, activation = residuals.get(op.index, (None, None, 0))
            pack = row_packs[op.index][:3] if op.index in row_packs else None
            if op.name == "CONV_2D":
                steps.append(ops.conv_2d(graph, op, self._kernels, tensors, target, activation, fused.get(op.index),
                                         precision=self.float_precision, max_pool=max_pools.get(op.index), pack=pack,
                                         input_requantize=int8_inputs.get(op.index)))
            elif op.index in fused:
                steps.append(ops.lce_quantize(graph, op, self._kernels, *fused[op.index]))
            elif op.index in packs or op.index in intos:
                steps.append(ops.lce_bconv2d(graph, op, self._kernels, packs.get(op.index), intos.get(op.index)))
            elif op.name == "CONCATENATION" and tensors is not None:
                steps.append(ops.concatenation(graph, op, self._kernels, tensors[0], target))
            elif op.name == "RESIZE_NEAREST_NEIGHBOR" and (tensors is not None or pack is not None):
                residual = None if tensors is None else tensors[0]
                steps.append(ops.resize_nearest_neighbor(graph, op, self._kernels, residual, target, activation, pack))
            elif op.name == "MAX_POOL_2D" and pack is not None:
                steps.append(ops.max_pool_2d(graph, op, self._kernels, pack))
            else:
                steps.append(ops.OPS[op.name](graph, op, self._kernels))
            step_ops.append(op)
        self._fused = set(fused) | {index for index, (_, chain) in int8_inputs.items() if chain[-1].name != "QUANTIZE"}
        self._quantized = quantized
        self._packs, self._intos, self._max_pools = set(packs), intos, max_pools
        self._row_packs = set(row_packs)
        # after which step each activation is read for the last time (then its buffer is reused)
        self._residuals, self._relus = residuals, relus
        last_read = {}
        for position, op in enumerate(step_ops):
            reads = [fused[op.index][0]] if op.index in fused else \
                [int8_inputs[op.index][0]] if op.index in int8_inputs else op.inputs
            if op.index in residuals:
                reads = list(reads) + residuals[op.index][0]
            if op.index in intos and intos[op.index][3] is not None:
                reads = list(reads) + [intos[op.index][3]]
            for i in set(reads):
                if i >= 0 and graph.tensors[i].data is None:
                    last_read[i] = position
        keep = set(graph.inputs) | set(graph.outputs)
        self._release_after = [[i for i, p in last_read.items() if p == position and i not in keep]
                               for position in range(len(step_ops))]
        self._pool: dict = {}  # the CPU kernels' recycled buffers, shared by all threads
        self._gpu_pools = threading.local()  # .by_stream: the GPU kernels', per thread and CUDA stream
        return steps, step_ops

    def _buffers(self) -> dict:
        """The recycled buffers a step-by-step run takes its activations from. On the CPU a run
        releases a buffer once its last reader has run, so one pool serves every thread. On the GPU
        it releases a buffer once its last reader is queued, so only later work on the same stream
        may reuse it (a run on another stream could overwrite it while it is still read): one pool
        per thread and CUDA stream, for the last ``GPU_STREAMS_KEPT`` streams a thread ran on (a
        thread that makes a stream for each call does not keep a pool for each; CuPy gives a
        dropped pool's memory only to later work on its stream)."""
        current_stream = getattr(self._kernels, "current_stream", None)
        if current_stream is None:
            return self._pool
        pools = self._gpu_pools.__dict__.setdefault("by_stream", collections.OrderedDict())
        stream = current_stream()
        pool = pools.setdefault(stream, {})
        pools.move_to_end(stream)
        while len(pools) > GPU_STREAMS_KEPT:
            pools.popitem(last=False)
        return pool

    def _forget_batch(self, shape: tuple) -> None:
        """Frees this thread's recycled buffers of ``shape``'s batch size (a CUDA graph of it has its own)."""
        for pool in self._gpu_pools.__dict__.get("by_stream", {}).values():
            for by_batch in pool.values():
                by_batch.pop(shape[0], None)

    @property
    def input_shape(self) -> tuple:
        return self.graph.tensors[self.graph.inputs[0]].shape

    @property
    def output_shape(self) -> tuple:
        return self.graph.tensors[self.graph.outputs[0]].shape

    def predict(self, images: np.ndarray, batch_size: Optional[int] = 64) -> np.ndarray:
        """Run the model on ``images`` (``(B, H, W, C)`` float32, any batch size), ``batch_size``
        at a time (as Keras's ``predict`` does: the activations of 64 images of the default model
        take about 2.4 GB, of 1,000 at once 38 GB; None runs them all at once). The CPU kernels run
        fewer at a time where the model is large (:data:`CPU_BATCH_BYTES`: the default model one
        image at a time, faster per image than batches). On the GPU kernels a CuPy array stays on
        the GPU: the result is then a CuPy array too."""
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise ValueError(f"{self.graph.name}: batch_size={batch_size!r} must be a positive integer or None")
        try:
            count = len(images)
        except TypeError:  # not a batch (a scalar, another library's GPU array): _run says what is wrong
            count = 0
        step = count if batch_size is None else batch_size
        if getattr(self._kernels, "upload", None) is None:  # the CPU kernels
            step = min(step, self._images_a_run)
        if count <= step:
            return self._run(images, None)
        # the whole input's shape, not a part's (a single image without its batch axis would be
        # cut into rows and named by the first row's shape)
        self._check_shape(images.shape if hasattr(images, "shape") else np.shape(images))
        parts = [self._run(images[start:start + step], None) for start in range(0, count, step)]
        with self._device:
            xp = self._kernels.cp if hasattr(parts[0], "__cuda_array_interface__") else np
            return xp.concatenate(parts)

    def predict_outputs(self, images: np.ndarray) -> List[np.ndarray]:
        """Every output of the file (in its order) for ``images`` (``(B, H, W, C)`` float32), on
        the CPU kernels: for files with more than one output, such as MediaPipe's face detectors
        (boxes and scores), where :meth:`predict` returns the first."""
        if getattr(self._kernels, "upload", None) is not None:
            raise ValueError(f"{self.graph.name}: predict_outputs runs on the CPU kernels; use predict on the GPU")
        images = np.asarray(images)
        self._check_shape(images.shape)
        step = self._images_a_run
        parts = [self._run(images[start:start + step], None, every_output=True)
                 for start in range(0, max(len(images), 1), step)]
        return [np.concatenate([part[i] for part in parts]) for i in range(len(self.graph.outputs))]

    def profile(self, images: np.ndarray) -> List[Tuple[str, str, float]]:
        """Run once and time each step: ``(op name, output shape, seconds)`` in graph order (a
        batch norm's MUL and ADD fused into the LceQuantize after them is one step named
        ``BN+LceQuantize``). On the GPU kernels a step's time is the GPU's, between CUDA events
        recorded before and after its launches (the steps are queued as :meth:`predict` queues
        them, not synchronised one by one, so a step's time is not its Python launch cost; at
        small batches, where the GPU waits for the launches, it includes that wait)."""
        times: List[Tuple[str, str, float]] = []
        self._run(images, times)
        return times

    def time_by_part(self, images: np.ndarray, repeats: int = 5) -> Dict[str, float]:
        """Milliseconds per part of the model (binary convolutions, float convolutions, bit-packing,
        element-wise), each step's median over ``repeats`` :meth:`profile` runs."""
        profiles = [self.profile(images) for _ in range(repeats)]
        totals: Dict[str, float] = {}
        for step in range(len(profiles[0])):
            part = PARTS.get(profiles[0][step][0], "element-wise (add, mul, concat, pool, resize)")
            totals[part] = totals.get(part, 0.0) + 1000 * float(np.median([p[step][2] for p in profiles]))
        return totals

    def _check_shape(self, shape: tuple) -> None:
        expected = self.input_shape[1:]
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise ValueError(f"{self.graph.name}: input must have shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(shape)}")

    def _run(self, images, times: Optional[list], every_output: bool = False):
        with self._device:
            return self._run_here(images, times, every_output)

    def _run_here(self, images, times: Optional[list], every_output: bool = False):
        """:meth:`_run` with the engine's device current (on the GPU): the first output, or with
        ``every_output`` (CPU kernels) the list of them."""
        kernels = self._kernels
        upload = getattr(kernels, "upload", None)
        on_device = upload is not None and hasattr(images, "__cuda_array_interface__")  # CuPy in, CuPy out
        if on_device and not isinstance(images, kernels.cp.ndarray):
            kind = type(images)
            raise TypeError(f"{self.graph.name}: images on the GPU must be a CuPy array, got {kind.__module__}."
                            f"{kind.__name__} (cupy.asarray(images) views it as one)")
        images = images if on_device else np.asarray(images)
        self._check_shape(images.shape)
        if images.dtype.kind != "f":
            raise ValueError(f"{self.graph.name}: input must be float, got {images.dtype}")
        if on_device:  # any strides in (a flipped view, say): the kernels read C order
            if images.device.id != kernels.device.id:
                raise ValueError(f"{self.graph.name}: the images are on GPU {images.device.id}, the engine runs on GPU "
                                 f"{kernels.device.id} (copy them there first: with cupy.cuda.Device("
                                 f"{kernels.device.id}): images = images.copy())")
            images = kernels.cp.ascontiguousarray(images.astype(np.float32, copy=False))
        else:
            images = np.ascontiguousarray(images, np.float32)
        if len(images) == 0:  # no image: nothing to run (the kernels' shapes assume at least one)
            if every_output:
                return [np.zeros((0,) + tuple(self.graph.tensors[i].shape[1:]), np.float32) for i in self.graph.outputs]
            return (kernels.cp if on_device else np).zeros((0,) + tuple(self.output_shape[1:]), np.float32)
        if self._captured is not None and times is None:
            output = self._captured(images, on_device)
            if output is not None:
                return output
        output = self._run_steps(images if upload is None or on_device else upload(images), self._buffers(), times,
                                 every_output)
        return output if upload is None or on_device else kernels.download(output)

    def _run_steps(self, images, pool: dict, times: Optional[list], every_output: bool = False):
        """The steps on ``images`` (where the kernels run), buffers recycled through ``pool``: the
        (first) output tensor, or with ``every_output`` the list of them."""
        kernels = self._kernels
        record_event = getattr(kernels, "record_event", None)  # GPU kernels run asynchronously: timed by events
        values = ops.Values(len(self.graph.tensors), pool, getattr(kernels, "empty", ops.aligned_empty))
        values[self.graph.inputs[0]] = images
        kernels.set_num_threads(self.num_threads)
        events = [record_event()] if times is not None and record_event is not None else []
        first = len(times) if times is not None else 0
        for step, op, release in zip(self._steps, self._step_ops, self._release_after):
            start = time.perf_counter()
            try:
                step(values)
            except (ValueError, TypeError, AttributeError, LookupError) as error:
                # (the input's shape was checked: a file whose tensors' shapes do not fit its ops)
                raise CorruptModelError(f"{self.graph.name}: operator {op.index} ({op.name}) cannot run on the "
                                        f"shapes the file gives it ({type(error).__name__}: {error})") from error
            except MemoryError as error:  # a batch too large, or a damaged file's shape
                raise MemoryError(f"{self.graph.name}: operator {op.index} ({op.name}) on {len(images)} images: "
                                  f"{error}") from error
            if times is not None:
                added = self._residuals.get(op.index, ([],))[0]  # (none where only a RELU is done)
                label = op.name + ("+ADD" if added else "")
                label += "+RELU" if op.index in self._relus else ""
                label += "+LceQuantize" if op.index in self._packs else ""
                if op.index in self._intos:
                    label += "+CONCATENATION" + ("+ADD" if self._intos[op.index][3] is not None else "")
                label = "BN+" + label if op.index in self._fused else label
                label = "QUANTIZE+" + label if op.index in self._quantized else label
                label += "+MAX_POOL_2D" if op.index in self._max_pools else ""
                label += "+LceQuantize" if op.index in self._row_packs else ""
                written = self._residuals[op.index][1] if op.index in self._residuals else op.outputs[0]
                written = self._intos[op.index][0] if op.index in self._intos else written
                written = self._max_pools[op.index][0] if op.index in self._max_pools else written
                if events:
                    events.append(record_event())
                times.append((label, str(values[written].shape), time.perf_counter() - start))
            for i in release:
                values.release(values[i])
                values[i] = None
        if events:
            events[-1].synchronize()
            for i, (start, end) in enumerate(zip(events, events[1:])):
                times[first + i] = times[first + i][:2] + (kernels.elapsed_seconds(start, end),)
        outputs = [values[i] for i in self.graph.outputs]
        outputs = [output.copy() if values.is_part(output) else output for output in outputs]
        return outputs if every_output else outputs[0]
