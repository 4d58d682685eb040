"""A NumPy model of the CUDA binary convolution (``runtime/csrc/kernels.cu``): the same implicit-GEMM
indexing, block tiles, thread-to-data mapping, m16n8k256 fragment layout and AND-popcount
formulation, one step at a time, so the CPU tests check the GPU's arithmetic and indexing against
LCE's reference (the GPU tests then check the CUDA code against this runtime's CPU kernels).

    acc = bconv2d_model(x_packed, filters_packed, geometry, (out_h, out_w))  # LCE's XOR counts

The MMA itself is modelled from PTX's documented layout for ``mma.m16n8k256 .b1`` (lane = 4 *
group + t): A registers ``a0 = A[g][t]``, ``a1 = A[g+8][t]``, ``a2 = A[g][t+4]``,
``a3 = A[g+8][t+4]`` (32-bit words of the 256-bit rows), B ``b0 = B[t][g]``, ``b1 = B[t+4][g]``
(words of column g), D ``d0, d1 = D[g][2t], D[g][2t+1]``, ``d2, d3 = D[g+8][2t], D[g+8][2t+1]``.
"""
from typing import Sequence

import numpy as np

from larq_landmarks.runtime.cuda import BLOCK_CHANNELS, BLOCK_ROWS, CHUNK_WORDS, STEP_WORDS, THREADS, layout_binary_weights

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.int64)


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint32."""
    b = np.asarray(words, np.uint32).view(np.uint8).reshape(np.shape(words) + (4,))
    return _POPCOUNT8[b].sum(-1)


def mma_and_popc(a_regs: np.ndarray, b_regs: np.ndarray) -> np.ndarray:
    """``mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc`` with C = 0, from the
    registers of the 32 lanes: ``a_regs [32, 4]``, ``b_regs [32, 2]`` -> ``d [32, 4]``."""
    lane = np.arange(32)
    group, t = lane // 4, lane % 4
    a = np.zeros((16, 8), np.uint32)
    b = np.zeros((8, 8), np.uint32)  # [column, word]
    a[group, t], a[group + 8, t], a[group, t + 4], a[group + 8, t + 4] = a_regs.T
    b[group, t], b[group, t + 4] = b_regs.T
    d = popcount(a[:, None, :] & b[None, :, :]).sum(-1)  # [16, 8]
    return np.stack([d[group, 2 * t], d[group, 2 * t + 1], d[group + 8, 2 * t], d[group + 8, 2 * t + 1]], 1)


def _rows(batch, out_h, out_w, geometry):
    """Each output pixel's image, top-left input coordinates (as the kernel computes them)."""
    _, _, _, _, sh, sw, _, _, pad_top, pad_left, _ = geometry
    m = np.arange(batch * out_h * out_w)
    b = m // (out_h * out_w)
    rest = m - b * out_h * out_w
    oy, ox = rest // out_w, rest % out_w
    return b, oy * sh - pad_top, ox * sw - pad_left


def a_words(x: np.ndarray, rows: np.ndarray, kk: np.ndarray, geometry, out_hw) -> np.ndarray:
    """The implicit GEMM's A words, element by element: output pixel ``rows[i]``, K word ``kk[i]``
    (tap-major: ``tap = kk // words``); zero outside the image, past the last pixel or past K."""
    _, _, fh, fw, _, _, dh, dw = geometry[:8]
    batch, height, width, words = x.shape
    total_rows = batch * out_hw[0] * out_hw[1]
    b, y0, x0 = (v[np.minimum(rows, total_rows - 1)] for v in _rows(batch, *out_hw, geometry))
    tap, word = kk // words, kk % words
    y, xx = y0 + (tap // fw) * dh, x0 + (tap % fw) * dw
    valid = (rows < total_rows) & (kk < fh * fw * words) & (y >= 0) & (y < height) & (xx >= 0) & (xx < width)
    index = ((b * height + np.clip(y, 0, height - 1)) * width + np.clip(xx, 0, width - 1)) * words + word
    return np.where(valid, x.view(np.uint32).reshape(-1)[np.where(valid, index, 0)], 0).astype(np.uint32)


def bconv2d_model(x: np.ndarray, filters: np.ndarray, geometry: Sequence[int], out_hw, tensor_cores: bool = True):
    """Run the model of ``bconv2d_tensor_cores`` (or ``bconv2d_popcount``) on bit-packed
    ``x [N, H, W, words]`` and LCE's ``filters [Cout, fh, fw, words]``: the accumulators
    ``[N, out_h, out_w, Cout]`` the epilogue turns into outputs. ``geometry`` is ``CudaKernels.bconv2d``'s
    (channels_in, channels_out, filter_h, filter_w, stride_h, stride_w, dilation_h, dilation_w,
    pad_top, pad_left, pad_value), ``out_hw`` the output's height and width."""
    cin, cout, fh, fw = geometry[:4]
    pad_value = geometry[10]
    batch, height, width, words = x.shape
    out_h, out_w = out_hw
    rows = batch * out_h * out_w
    weights, weight_pop = layout_binary_weights(filters)
    k_words = fh * fw * words
    # the taps outside the image of each output pixel (LCE's zero-padding correction)
    _, y0, x0 = _rows(batch, out_h, out_w, geometry)
    taps = fh * fw
    outside = np.zeros((rows, taps), bool)
    for tap in range(taps):
        y = y0 + (tap // fw) * geometry[6]
        xx = x0 + (tap % fw) * geometry[7]
        outside[:, tap] = ~((y >= 0) & (y < height) & (xx >= 0) & (xx < width))
    tap_pop = popcount(filters.view(np.uint32)).sum(-1).reshape(cout, taps).T  # [taps, Cout]

    acc = np.zeros((rows, cout), np.int64)
    tid = np.arange(THREADS)
    for block_m in range(-(-rows // BLOCK_ROWS)):
        for block_n in range(weights.shape[0] // BLOCK_CHANNELS):
            m0, n0 = block_m * BLOCK_ROWS, block_n * BLOCK_CHANNELS
            c_s = np.zeros((BLOCK_ROWS, BLOCK_CHANNELS), np.int64)
            my_pop = np.zeros(THREADS, np.int64)  # set bits each thread loaded: the row popcounts
            for chunk in range(-(-k_words // CHUNK_WORDS)):
                # loads: thread -> row tid // 2, its half (tid % 2) of the chunk's words rounded up to
                # whole steps; weight row tid // 4, words 10 (tid % 4) .. +9
                steps = min(CHUNK_WORDS // STEP_WORDS, -(-(k_words - chunk * CHUNK_WORDS) // STEP_WORDS))
                share = steps * STEP_WORDS // 2
                a_s = np.zeros((BLOCK_ROWS, CHUNK_WORDS), np.uint32)
                for j in range(share):
                    kk = chunk * CHUNK_WORDS + (tid % 2) * share + j
                    loaded = a_words(x, m0 + tid // 2, kk, geometry, out_hw)
                    my_pop += popcount(loaded)
                    a_s[tid // 2, (tid % 2) * share + j] = loaded
                b_s = np.zeros((BLOCK_CHANNELS, CHUNK_WORDS), np.uint32)
                quarter = CHUNK_WORDS // 4
                for j in range(quarter):
                    column = chunk * CHUNK_WORDS + (tid % 4) * quarter + j
                    b_s[tid // 4, (tid % 4) * quarter + j] = weights[n0 + tid // 4, column]
                for st in range(steps):
                    a_step, b_step = a_s[:, st * STEP_WORDS:(st + 1) * STEP_WORDS], b_s[:, st * STEP_WORDS:(st + 1) * STEP_WORDS]
                    if tensor_cores:
                        lane = np.arange(32)
                        group, t = lane // 4, lane % 4
                        for warp in range(THREADS // 32):
                            wm, wn = (warp % 4) * 32, (warp // 4) * 32
                            for i in range(2):
                                r = wm + i * 16 + group
                                a_regs = np.stack([a_step[r, t], a_step[r + 8, t], a_step[r, t + 4], a_step[r + 8, t + 4]], 1)
                                for j in range(4):
                                    n = wn + j * 8 + group
                                    d = mma_and_popc(a_regs, np.stack([b_step[n, t], b_step[n, t + 4]], 1))
                                    c = wn + j * 8 + 2 * t
                                    c_s[r, c] += d[:, 0]
                                    c_s[r, c + 1] += d[:, 1]
                                    c_s[r + 8, c] += d[:, 2]
                                    c_s[r + 8, c + 1] += d[:, 3]
                    else:
                        c_s += popcount(a_step[:, None, :] & b_step[None, :, :]).sum(-1)
            row_pop = my_pop[0::2] + my_pop[1::2]  # the two loaders of a row are neighbouring lanes
            # epilogue: XOR count = popc(a) + popc(w) - 2 popc(a & w), LCE's zero-padding correction
            r_end, c_end = min(BLOCK_ROWS, rows - m0), min(BLOCK_CHANNELS, cout - n0)
            if c_end <= 0:
                continue
            block_rows = slice(m0, m0 + r_end)
            block_cols = slice(n0, n0 + c_end)
            xor = row_pop[:r_end, None] + weight_pop[None, block_cols] - 2 * c_s[:r_end, :c_end]
            if pad_value == 0:
                correction = outside[block_rows].astype(np.int64) @ (cin // 2 - tap_pop[:, block_cols])
                xor = xor + correction
            acc[block_rows, block_cols] = xor
    return acc.reshape(batch, out_h, out_w, cout)
