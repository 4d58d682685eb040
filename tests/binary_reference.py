"""LCE's binary-convolution semantics in NumPy, for the runtime's CPU and GPU tests (no
TensorFlow here, so the GPU tests run on a machine without it)."""
import numpy as np

from larq_landmarks.runtime.graph import Graph, Operator, Tensor


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """LCE's bit-packing of 0/1 values (1 = negative) along the last axis: int32 words, bit i of
    word w is channel 32 w + i, padding bits 0."""
    channels = bits.shape[-1]
    words = (channels + 31) // 32
    padded = np.zeros(bits.shape[:-1] + (32 * words,), np.uint8)
    padded[..., :channels] = bits
    return np.packbits(padded, axis=-1, bitorder="little").view("<i4")


def next_layer_bits(out: np.ndarray, scale=None, shift=None) -> np.ndarray:
    """The bits an LceQuantize packs from a float output with a batch norm folded in (``scale`` and
    ``shift``, each optional): ``out * scale + shift < 0``, each op rounded to float32 (NumPy uses
    no FMA)."""
    q = out.astype(np.float32)
    if scale is not None:
        q = q * scale
    if shift is not None:
        q = q + shift
    return pack_bits((q < 0).astype(np.uint8))


def next_batch_norm(rng, cout: int, total: int):
    """A folded batch norm ``(scale, shift)`` for the LceQuantize after a convolution whose float
    outputs are its accumulators (``total`` taps x channels): some scales negative, and each shift
    the negated float32 product of the scale and a typical accumulator, so that an output equal to
    it gives exactly 0 (bit 0) when the product is rounded first, as separate ops round, and the
    product's rounding error, negative about half the time, where an FMA fuses them."""
    scale = rng.normal(size=cout).astype(np.float32)
    typical = rng.integers(total // 2 - 2, total // 2 + 3, cout).astype(np.float32)
    return scale, -(typical * scale)


def reference_accumulators(x_bits, w_bits, stride, same, pad_value, dilation=(1, 1)):
    """LCE's reference XOR-popcount accumulators, counted over unpacked 0/1 values; ``dilation``
    (height, width): tap (fy, fx) reads the input ``fy * dilation[0]``, ``fx * dilation[1]`` from
    the window's corner.

    An outside tap counts as a +1 input (bit 0) for pad_value 1, and adds channels_in // 2 for
    pad_value 0 (LCE's reference kernel)."""
    batch, height, width, cin = x_bits.shape
    cout, fh, fw, _ = w_bits.shape

    def geometry(size, k, d):
        reach = (k - 1) * d + 1
        out = -(-size // stride) if same else (size - reach) // stride + 1
        total = max((out - 1) * stride + reach - size, 0) if same else 0
        return out, total // 2

    (out_h, top), (out_w, left) = geometry(height, fh, dilation[0]), geometry(width, fw, dilation[1])
    acc = np.zeros((batch, out_h, out_w, cout), np.int64)
    x = x_bits.astype(np.int64)
    w = w_bits.astype(np.int64)
    for fy in range(fh):
        for fx in range(fw):
            ys = np.arange(out_h) * stride - top + fy * dilation[0]
            xs = np.arange(out_w) * stride - left + fx * dilation[1]
            inside = ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]
            patch = x[:, np.clip(ys, 0, height - 1)][:, :, np.clip(xs, 0, width - 1)]
            patch = np.where(inside[None, :, :, None], patch, 0)
            taps = w[:, fy, fx]  # (cout, cin)
            count = patch @ (1 - taps).T + (1 - patch) @ taps.T  # XOR count per output channel
            if pad_value == 0:
                count = np.where(inside[None, :, :, None], count, cin // 2)
            acc += count
    return acc


def bconv_graph(filters_packed, cin, stride, same, pad_value, output, post_mul=None, post_bias=None,
                thresholds=None, activation=0, dilation=(1, 1)):
    """A one-operator graph (no flatbuffer) for ``ops.lce_bconv2d``."""
    cout = filters_packed.shape[0]
    tensors = [
        Tensor(0, "x", (1,), np.int32, None),
        Tensor(1, "filters", filters_packed.shape, np.int32, filters_packed),
        Tensor(2, "post_mul", (cout,), np.float32, post_mul),
        Tensor(3, "post_bias", (cout,), np.float32, post_bias),
        Tensor(4, "thresholds", (cout,), np.int32, thresholds),
        Tensor(5, "y", (1,), np.int32 if output == "bits" else np.float32, None),
    ]
    options = {"channels_in": cin, "stride_height": stride, "stride_width": stride,
               "dilation_height_factor": dilation[0], "dilation_width_factor": dilation[1], "padding": 0 if same else 1, "pad_values": pad_value,
               "fused_activation_function": activation}
    op = Operator(0, "LceBconv2d", [0, 1, 2, 3, 4], [5], options)
    return Graph("test", tensors, [op], [0], [5]), op


CASES = [  # channels_in, channels_out, filter, stride, SAME, pad_value
    (16, 5, 3, 1, True, 1),
    (40, 33, 3, 2, True, 1),
    (70, 64, 3, 1, True, 0),
    (100, 100, 1, 1, False, 1),
    (256, 128, 3, 1, True, 1),
    (96, 65, 3, 2, False, 1),
    (33, 130, 3, 2, True, 0),
]
