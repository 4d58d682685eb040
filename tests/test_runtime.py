"""The bit-packed runtime (issue 10): binary-conv accumulators bit-exact against a NumPy reference
of LCE's semantics on every kernel path; whole converted models against LCE's interpreter; the
engine selection, threads, unsupported ops, and running without TensorFlow."""
import functools
import json
import os
import re
import subprocess
import sys
import threading
import types
import warnings

import numpy as np
import pytest
import tensorflow as tf

import larq as lq
from PIL import Image

from larq_landmarks import cli, export, heatmaps as hm, models
from larq_landmarks.predictor import Predictor
from larq_landmarks.runtime import CorruptModelError, CudaUnavailableError, Engine, UnsupportedModelError
from larq_landmarks.runtime import available_kernels
from larq_landmarks.runtime import cuda, engine as engine_module, kernels as kernel_paths, ops
from larq_landmarks.synthetic import trained_like_batch_norm

import fake_cupy
import no_tensorflow
from script_modules import load_script
from binary_reference import CASES, bconv_graph, next_batch_norm, next_layer_bits, pack_bits, reference_accumulators

PATHS = available_kernels()


# and sums of 45 and 63 words (the avx512bw kernels' carry-save adders: groups of 8, then half a
# group and 1 or 3 words counted alone), of 32 channels and of 64 + 6
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cin,cout,k,stride,same,pad_value",
                         CASES + [(160, 20, 3, 1, True, 0), (224, 70, 3, 1, True, 1)])
def test_binary_conv_accumulators_are_bit_exact(path, cin, cout, k, stride, same, pad_value):
    rng = np.random.default_rng(cin * 1000 + cout)
    x_bits = rng.integers(0, 2, (2, 9, 11, cin), dtype=np.uint8)
    w_bits = rng.integers(0, 2, (cout, k, k, cin), dtype=np.uint8)
    expected = reference_accumulators(x_bits, w_bits, stride, same, pad_value)
    module = kernel_paths.load(path)
    filters = pack_bits(w_bits)
    total = k * k * cin

    # float output with post_mul = -1/2, post_bias = K/2: LCE's transform gives the accumulator itself
    graph, op = bconv_graph(filters, cin, stride, same, pad_value, "float",
                            np.full(cout, -0.5, np.float32), np.full(cout, total / 2, np.float32))
    values = ops.Values(6, {})
    values[0] = pack_bits(x_bits)
    ops.lce_bconv2d(graph, op, module)(values)
    np.testing.assert_array_equal(values[5], expected.astype(np.float32))

    # the next layer's LceQuantize (a batch norm folded in) packed by the same call: its bits as
    # that op would pack the float output, the float output unchanged
    scale, shift = next_batch_norm(rng, cout, total)
    for next_scale, next_shift in ((scale, shift), (None, shift), (scale, None)):
        values = ops.Values(7, {})
        values[0] = pack_bits(x_bits)
        ops.lce_bconv2d(graph, op, module, (6, next_scale, next_shift))(values)
        np.testing.assert_array_equal(values[5], expected.astype(np.float32))
        np.testing.assert_array_equal(values[6], next_layer_bits(values[5], next_scale, next_shift))

    # one part of a channel CONCATENATION + ADD: written at its channels of the sum, the residual
    # added there; the other channels left alone
    residual = rng.normal(size=expected.shape[:3] + (cout + 7,)).astype(np.float32)
    values = ops.Values(8, {})
    values[0], values[7] = pack_bits(x_bits), residual
    values[6] = np.full(residual.shape, 5.0, np.float32)  # allocated by an earlier part
    ops.lce_bconv2d(graph, op, module, into=(6, 3, cout + 7, 7))(values)
    np.testing.assert_array_equal(values[6][..., 3:3 + cout], expected.astype(np.float32) + residual[..., 3:3 + cout])
    assert (values[6][..., :3] == 5).all() and (values[6][..., 3 + cout:] == 5).all() and values[5] is None

    # bit-packed output: bit = accumulator > threshold
    thresholds = rng.integers(0, total, cout).astype(np.int32)
    graph, op = bconv_graph(filters, cin, stride, same, pad_value, "bits", thresholds=thresholds)
    values = ops.Values(6, {})
    values[0] = pack_bits(x_bits)
    ops.lce_bconv2d(graph, op, module)(values)
    np.testing.assert_array_equal(values[5], pack_bits((expected > thresholds).astype(np.uint8)))


@pytest.mark.parametrize("path", PATHS)
def test_binary_conv_long_sums_are_bit_exact(path):
    """A 1x1 convolution over 2100 words (67,200 channels): past the AVX2 kernel's 16-bit sums
    (2044 words at most 32 a word) and its 7-word byte sums, and past the AVX-512BW and the x86
    portable kernels' 31-word byte sums; with inputs and weights mostly equal, mostly opposite and
    random, so that the counts reach near 0 and near the most."""
    rng = np.random.default_rng(5)
    cin = 2100 * 32
    w_bits = rng.integers(0, 2, (3, 1, 1, cin), dtype=np.uint8)
    x_bits = np.stack([w_bits[0, 0, 0], 1 - w_bits[1, 0, 0], rng.integers(0, 2, cin, dtype=np.uint8)])
    x_bits = x_bits.reshape(1, 1, 3, cin)
    expected = reference_accumulators(x_bits, w_bits, 1, False, 1)
    assert expected[0, 0, 0, 0] == 0 and expected[0, 0, 1, 1] == cin  # the extremes are reached
    graph, op = bconv_graph(pack_bits(w_bits), cin, 1, False, 1, "float",
                            np.full(3, -0.5, np.float32), np.full(3, cin / 2, np.float32))
    values = ops.Values(6, {})
    values[0] = pack_bits(x_bits)
    ops.lce_bconv2d(graph, op, kernel_paths.load(path))(values)
    np.testing.assert_array_equal(values[5], expected.astype(np.float32))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("cout,pad_value", [(20, 0), (70, 1)])
def test_binary_conv_threads_split_rows_anywhere(path, threads, cout, pad_value):
    """The thread pool's chunks of tiles may start and end inside an output row (7 rows of 3 or 4
    tiles of 8 or 4 pixels, handed out to 2 or 3 threads); the accumulators stay bit-exact, with the
    border correction."""
    rng = np.random.default_rng(threads * 100 + cout)
    x_bits = rng.integers(0, 2, (1, 7, 13, 33), dtype=np.uint8)
    w_bits = rng.integers(0, 2, (cout, 3, 3, 33), dtype=np.uint8)
    expected = reference_accumulators(x_bits, w_bits, 1, True, pad_value)
    module = kernel_paths.load(path)
    graph, op = bconv_graph(pack_bits(w_bits), 33, 1, True, pad_value, "float",
                            np.full(cout, -0.5, np.float32), np.full(cout, 9 * 33 / 2, np.float32))
    values = ops.Values(6, {})
    values[0] = pack_bits(x_bits)
    module.set_num_threads(threads)
    try:
        ops.lce_bconv2d(graph, op, module)(values)
    finally:
        module.set_num_threads(1)
    np.testing.assert_array_equal(values[5], expected.astype(np.float32))


@pytest.mark.parametrize("path", PATHS)
def test_prepared_binary_conv_runs_any_input_size_and_rejects_bad_arrays(path):
    """One prepared LceBconv2d runs inputs of different batch and size (its padding and output
    shape follow each input); arrays the kernel cannot read are errors naming the argument."""
    rng = np.random.default_rng(7)
    cin, cout = 40, 24
    w_bits = rng.integers(0, 2, (cout, 3, 3, cin), dtype=np.uint8)
    module = kernel_paths.load(path)
    graph, op = bconv_graph(pack_bits(w_bits), cin, 2, True, 0, "float",
                            np.full(cout, -0.5, np.float32), np.full(cout, 9 * cin / 2, np.float32))
    run = ops.lce_bconv2d(graph, op, module)
    for shape in ((1, 9, 11), (3, 6, 5), (1, 9, 11)):
        x_bits = rng.integers(0, 2, shape + (cin,), dtype=np.uint8)
        values = ops.Values(6, {})
        values[0] = pack_bits(x_bits)
        run(values)
        np.testing.assert_array_equal(values[5], reference_accumulators(x_bits, w_bits, 2, True, 0).astype(np.float32))

    weights = module.prepare_binary_weights(pack_bits(w_bits))
    conv = module.binary_conv2d(weights, [cin, cout, 3, 3, 1, 1, 1, 1, 1], np.ones(cout, np.float32),
                                np.zeros(cout, np.float32), -2**31, 2**31 - 1, np.zeros(0, np.int32),
                                np.zeros((9, cout), np.int32))
    x = pack_bits(rng.integers(0, 2, (1, 4, 4, cin), dtype=np.uint8))
    out = np.empty((1, 4, 4, cout), np.float32)
    conv(x, out, 1, 1)
    with pytest.raises(ValueError, match="binary_conv2d input: expected a C-contiguous 4-d int32"):
        conv(x.astype(np.float32), out, 1, 1)
    with pytest.raises(ValueError, match="binary_conv2d input: expected a C-contiguous"):
        conv(np.asfortranarray(np.concatenate([x, x], 3))[..., ::2], out, 1, 1)
    with pytest.raises(ValueError, match=r"binary_conv2d output \(float\): expected .* \(writeable\)"):
        readonly = out.copy()
        readonly.flags.writeable = False
        conv(x, readonly, 1, 1)
    with pytest.raises(ValueError, match="input words per pixel"):
        conv(np.zeros((1, 4, 4, 1), np.int32), out, 1, 1)
    with pytest.raises(ValueError, match="output batch or channels"):
        conv(x, np.empty((1, 4, 4, cout + 1), np.float32), 1, 1)
    wide = np.zeros((1, 4, 4, cout + 3), np.float32)  # a concatenation: its channels 2 .. cout + 1
    conv(x, wide, 1, 1, channel_offset=2)
    np.testing.assert_array_equal(wide[..., 2:-1], out)
    assert not wide[..., :2].any() and not wide[..., -1].any()
    for offset in (-1, 4):
        with pytest.raises(ValueError, match="output batch or channels"):
            conv(x, wide, 1, 1, channel_offset=offset)
    with pytest.raises(ValueError, match="residual shape"):
        conv(x, wide, 1, 1, channel_offset=2, residual=np.zeros((1, 4, 4, cout), np.float32))
    with pytest.raises(ValueError, match="next_bits given without pack_next"):
        conv(x, out, 1, 1, np.zeros((1, 4, 4, 1), np.int32))
    for bad_weights, geometry in ((weights, [cin + 32, cout, 3, 3, 1, 1, 1, 1, 1]),
                                  (weights[:, :cout], [cin, cout, 3, 3, 1, 1, 1, 1, 1])):  # not 64-channel blocks
        with pytest.raises(ValueError, match="weights are not prepare_binary_weights of this geometry"):
            module.binary_conv2d(bad_weights, geometry, np.ones(cout, np.float32), np.zeros(cout, np.float32), 0, 0,
                                 np.zeros(0, np.int32), np.zeros((9, cout), np.int32))


@pytest.mark.parametrize("path", PATHS)
def test_binary_conv_output_transform_and_relu_match_the_conv_of_signs(path):
    """Float output = clamp(conv of +-1 values, activation) * post_mul + post_bias (one padding)."""
    rng = np.random.default_rng(3)
    cin, cout = 45, 20
    x_bits = rng.integers(0, 2, (1, 6, 7, cin), dtype=np.uint8)
    w_bits = rng.integers(0, 2, (cout, 3, 3, cin), dtype=np.uint8)
    post_mul = rng.uniform(0.5, 2, cout).astype(np.float32)
    post_bias = rng.normal(0, 5, cout).astype(np.float32)
    signs = np.pad(1.0 - 2.0 * x_bits, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0)
    conv = tf.nn.conv2d(signs, np.transpose(1.0 - 2.0 * w_bits, (1, 2, 3, 0)), 1, "VALID").numpy()
    for activation, clip in ((0, (-np.inf, np.inf)), (1, (0, np.inf))):
        graph, op = bconv_graph(pack_bits(w_bits), cin, 1, True, 1, "float", post_mul, post_bias, activation=activation)
        values = ops.Values(6, {})
        values[0] = pack_bits(x_bits)
        ops.lce_bconv2d(graph, op, kernel_paths.load(path))(values)
        np.testing.assert_allclose(values[5], np.clip(conv, *clip) * post_mul + post_bias, rtol=1e-5, atol=1e-4)


def test_bitpacking_matches_lce_sign_convention():
    x = np.array([[-1.0, 0.0, -0.0, 2.0, -1e-30, 1.0, np.nan, -np.inf] + [1.0] * 27 + [-3.0]], np.float32)  # 36
    expected = pack_bits((x < 0).astype(np.uint8))
    for path in PATHS:
        out = np.empty((1, 2), np.int32)
        kernel_paths.load(path).bitpack(x, np.zeros(0, np.float32), np.zeros(0, np.float32), out)
        np.testing.assert_array_equal(out, expected)
        # -0.0 and NaN are not negative, -inf is (in the full word, which the vector paths pack); padding bits 0
        assert out[0, 0] == 0b10010001 and out[0, 1] == 0b1000
    # with a batch norm folded in: the product and the sum rounded apart, as NumPy rounds them
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 7, 70)).astype(np.float32)
    scale, shift = rng.normal(size=70).astype(np.float32), rng.normal(size=70).astype(np.float32)
    expected = pack_bits(((x * scale + shift) < 0).astype(np.uint8))
    for path in PATHS:
        out = np.empty((2, 5, 7, 3), np.int32)
        kernel_paths.load(path).bitpack(x, scale, shift, out)
        np.testing.assert_array_equal(out, expected, err_msg=path)


@pytest.mark.parametrize("path", PATHS)
def test_kernels_refuse_outputs_they_cannot_write_in_place(path):
    """An output of another type, not contiguous, read-only or of the wrong size is an error that
    names the kernel (a converted copy would have been written and thrown away)."""
    module = kernel_paths.load(path)
    none = np.zeros(0, np.float32)
    x = -np.ones((1, 2, 2, 32), np.float32)
    with pytest.raises(ValueError, match="bitpack output: expected a C-contiguous int32"):
        module.bitpack(x, none, none, np.zeros((1, 2, 2, 1), np.int64))
    with pytest.raises(ValueError, match="unpack output: expected a C-contiguous float32"):
        module.unpack(np.zeros((1, 2, 2, 1), np.int32), 32, np.zeros((1, 2, 2, 32), np.float64))
    with pytest.raises(ValueError, match="unpack: output has the wrong size"):
        module.unpack(np.zeros((1, 2, 2, 1), np.int32), 32, np.zeros((1, 2, 2, 16), np.float32))
    weights = module.prepare_float_weights(np.ones((8, 1, 1, 32), np.float32))
    geometry = [1, 1, 1, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match=r"conv2d output: expected a C-contiguous 4-d float32 array \(writeable\)"):
        module.conv2d(x, weights, np.zeros(8, np.float32), geometry, -np.inf, np.inf, [], none, none, -np.inf, np.inf,
                      np.zeros((1, 2, 2, 16), np.float32)[..., ::2])
    with pytest.raises(ValueError, match="conv2d: output batch differs"):
        module.conv2d(x, weights, np.zeros(8, np.float32), geometry, -np.inf, np.inf, [], none, none, -np.inf, np.inf,
                      np.zeros((2, 2, 2, 8), np.float32))
    with pytest.raises(ValueError, match="pool2d: output batch or channels differ"):
        module.pool2d(x, [2, 2, 2, 2, 0, 0], 0, -np.inf, np.inf, np.zeros((1, 1, 1, 16), np.float32))
    readonly = np.zeros((1, 2, 2, 32), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match=r"binary_elementwise output: .* \(writeable\)"):
        module.binary_elementwise(x, x.reshape(-1), 0, -np.inf, np.inf, readonly)
    out = np.zeros((1, 2, 2, 1), np.int32)
    module.bitpack(x, none, none, out)
    assert (out == -1).all()  # all 32 bits set: every value negative, written in place
    with pytest.raises(ValueError, match="elementwise: shapes"):  # an empty operand: not a broadcast
        module.binary_elementwise(x, none, 0, -np.inf, np.inf, np.zeros_like(x))
    module.binary_elementwise(none, none, 0, -np.inf, np.inf, none)  # nothing to do (was a division by zero)


def _landmarks(heatmaps):
    return hm.heatmap_to_input(hm.decode_heatmaps(heatmaps)[0]).numpy()


def _assert_same_heatmaps(got, expected, what):
    """Issue 10's parity bound: mean difference at most 1e-5 of the mean magnitude, and at least 99%
    of the decoded landmarks within 0.5 px."""
    assert got.shape == expected.shape, what
    assert np.abs(got - expected).mean() <= 1e-5 * np.abs(expected).mean(), what
    moved = np.abs(_landmarks(got) - _landmarks(expected)).max(-1)
    assert np.mean(moved <= 0.5) >= 0.99, what


def _assert_parity_with_lce(flatbuffer, images, paths=PATHS):
    lce = export.TfliteModel(flatbuffer, engine="lce").predict(images)
    for path in paths:
        _assert_same_heatmaps(Engine(flatbuffer, kernels=path).predict(images), lce, path)


BINARY_CONFIGS = [name for name, c in models.named_configurations().items() if c["kwargs"].get("binary", True)]


@pytest.mark.slow  # the fast tier checks LCE parity through test_predictor_runs_tflite_with_the_runtime_by_default
@pytest.mark.parametrize("name", BINARY_CONFIGS)
def test_named_binary_configuration_matches_lce_on_every_path(name, monkeypatch):
    """Width 48 gives channel counts (24, 12) that are not multiples of 32; batch 3 on a batch-1 file.
    The GPU paths too (kernels.cu built for the CPU standing in for the GPU), as the GPU machine
    checks these models (tests/test_runtime_cuda.py on the prepared ones)."""
    tf.keras.utils.set_random_seed(0)
    model = trained_like_batch_norm(models.build_named(name, 68, input_size=64, width=48, depth=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flatbuffer = export.convert(model)
    images = np.random.default_rng(1).uniform(size=(3, 64, 64, 3)).astype(np.float32)
    _assert_parity_with_lce(flatbuffer, images)
    fake_cupy.install(monkeypatch)
    _assert_parity_with_lce(flatbuffer, images, cuda.PATHS)


@pytest.mark.slow  # a full-size conversion, and the GPU paths' kernels.cu run on the CPU (a few seconds a call)
def test_the_default_model_on_noise_matches_lce_on_every_path(monkeypatch):
    """The default network at full size on uniform noise: a binary convolution's float output is
    LCE's, ``float(acc) * multiplier`` rounded before the bias is added, as LCE's kernels compute it.
    With one FMA instead (the vector and GPU paths until 2026-12-03) outputs near zero changed sign
    for the next binary layer: on these two images (of 4; the other two and the networks of seeds 0
    and 3 unchanged) the mean difference was 8-9% of the mean magnitude."""
    tf.keras.utils.set_random_seed(2)
    model = trained_like_batch_norm(models.BinaryHourglass(68))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flatbuffer = export.convert(model)
    images = np.random.default_rng(7).uniform(-1, 1, (4, 256, 256, 3)).astype(np.float32)[[0, 3]]
    _assert_parity_with_lce(flatbuffer, images)
    fake_cupy.install(monkeypatch)
    _assert_parity_with_lce(flatbuffer, images, cuda.PATHS)


UNNAMED_SHAPES = [  # what the named configurations do not vary: depth, stacks, task, width, input size
    dict(width=20, depth=1, num_stacks=2, block="hpm", pooling="avg", relu=True, task="segmentation", input_size=32),
    dict(width=36, depth=3, num_stacks=1, block="bottleneck", pooling="avg", binary_skip=True, input_size=96,
         kernel_quantizer="ste_sign"),
    dict(width=44, depth=2, num_stacks=2, block="hpm", pooling="max", binary_skip=True, input_size=48),
    dict(width=12, depth=3, num_stacks=2, block="bottleneck", pooling="max", task="segmentation", input_size=64),
]


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", UNNAMED_SHAPES, ids=lambda kwargs: f"w{kwargs['width']}d{kwargs['depth']}")
def test_other_depths_stacks_widths_and_tasks_match_lce_on_every_path(kwargs, monkeypatch):
    tf.keras.utils.set_random_seed(3)
    model = trained_like_batch_norm(models.BinaryHourglass(7, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flatbuffer = export.convert(model)
    size = kwargs["input_size"]
    images = np.random.default_rng(2).uniform(size=(2, size, size, 3)).astype(np.float32)
    _assert_parity_with_lce(flatbuffer, images)
    fake_cupy.install(monkeypatch)
    _assert_parity_with_lce(flatbuffer, images, cuda.PATHS)


def test_bit_packed_outputs_and_strides_match_lce():
    """bconv -> batch norm -> bconv becomes an LceBconv2d with thresholds and int32 output."""
    tf.keras.utils.set_random_seed(2)
    x = tf.keras.Input((16, 16, 8), batch_size=1)
    kw = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
              use_bias=False, pad_values=1.0, padding="same")
    y = tf.keras.layers.Conv2D(40, 3, padding="same")(x)
    y = tf.keras.layers.BatchNormalization()(lq.layers.QuantConv2D(40, 3, **kw)(y))
    y = tf.keras.layers.BatchNormalization()(lq.layers.QuantConv2D(36, 3, strides=2, **kw)(y))
    flatbuffer = export.convert(trained_like_batch_norm(tf.keras.Model(x, y)))
    engine = Engine(flatbuffer)
    bconvs = [op for op in engine.graph.operators if op.name == "LceBconv2d"]
    assert [engine.graph.tensors[op.outputs[0]].dtype for op in bconvs] == [np.int32, np.float32]
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 8)).astype(np.float32)
    lce = export.TfliteModel(flatbuffer, engine="lce").predict(images)
    for path in PATHS:
        np.testing.assert_allclose(Engine(flatbuffer, kernels=path).predict(images), lce, rtol=1e-5, atol=1e-4)


def test_threads_and_kernel_choice(small_file):
    images = np.random.default_rng(2).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    one = Engine(small_file).predict(images)
    np.testing.assert_array_equal(Engine(small_file, num_threads=2).predict(images), one)
    assert Engine(small_file).kernels == PATHS[0]
    assert [Engine(small_file, kernels=p).kernels for p in PATHS] == PATHS
    with pytest.raises(ValueError, match="kernels='neon'"):
        Engine(small_file, kernels="neon")
    with pytest.raises(ValueError, match=r"input must have shape \(B, 64, 64, 3\)"):
        Engine(small_file).predict(images[:, :32])


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_reduced_precisions_give_the_same_outputs_whatever_the_threads_and_batch(small_file, precision):
    """A row's reduced-precision sums do not depend on how the rows are split: 2 threads give 1
    thread's outputs, a batch of 3 the images' one at a time, bit for bit (with AMX too, where every
    bfloat16 row takes the tiles: their sums differ from the vector kernels' in the last bits)."""
    if precision not in kernel_paths.reduced_precisions(kernel_paths.load()):
        pytest.skip(f"this CPU's kernels run no {precision}")
    images = np.random.default_rng(5).uniform(size=(3, 64, 64, 3)).astype(np.float32)
    one = Engine(small_file, float_precision=precision).predict(images)
    np.testing.assert_array_equal(Engine(small_file, num_threads=2, float_precision=precision).predict(images), one)
    single = Engine(small_file, float_precision=precision)
    np.testing.assert_array_equal(np.concatenate([single.predict(images[i:i + 1]) for i in range(3)]), one)


def test_auto_takes_the_table_popcount_kernels_where_avx512_lacks_vpopcntdq(small_file, monkeypatch):
    """A Skylake-SP or Cascade Lake Xeon (AVX-512 F/BW/VL/DQ, no VPOPCNTDQ) gets the avx512bw
    kernels, an AVX2 CPU the avx2 ones (the CPU's features stood in for)."""
    if "avx512bw" not in PATHS:
        pytest.skip("this CPU has no AVX-512 BW")
    real_module = kernel_paths._module
    for features, expected in ((("avx512bw", "avx2", "portable"), "avx512bw"), (("avx2", "portable"), "avx2")):
        cpu = types.SimpleNamespace(cpu_supports=lambda path, features=features: path in features)
        monkeypatch.setattr(kernel_paths, "_module", lambda path, cpu=cpu: cpu if path == "portable" else real_module(path))
        assert kernel_paths.available()[0] == expected
        assert Engine(small_file).kernels == expected


def _run_in_threads(predicts, images, repeats=8):
    """Each ``predicts[i](images[i])`` ``repeats`` times, all in threads at once: the results, after
    checking that every thread finished without an error."""
    results, errors = {}, []

    def work(i):
        try:
            results[i] = [predicts[i](images[i]) for _ in range(repeats)]
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck in the engine"
    assert not errors, errors
    return results


@pytest.mark.parametrize("engine", ["runtime", "lce"])
def test_engines_run_from_several_python_threads_at_once(small_file, engine):
    """Several Python threads (a server's workers) may run one model at once: every result equals
    the one-at-a-time result. The runtime's kernels release the GIL and share one thread pool (it
    deadlocked when two callers entered it together); LCE's interpreter shares its tensors (runs
    are serialised)."""
    rng = np.random.default_rng(5)
    images = [rng.uniform(size=(1 + i % 2, 64, 64, 3)).astype(np.float32) for i in range(4)]
    flatbuffer = open(small_file, "rb").read()
    shared = export.TfliteModel(flatbuffer, engine, num_threads=2)
    other = export.TfliteModel(flatbuffer, engine, num_threads=1)  # another thread count at once
    predicts = [shared.predict, shared.predict, shared.predict, other.predict]
    expected = [predict(x) for predict, x in zip(predicts, images)]
    results = _run_in_threads(predicts, images)
    for i in range(4):
        for got in results[i]:
            np.testing.assert_array_equal(got, expected[i])


@pytest.mark.parametrize("kernels", PATHS + ["cuda"])
def test_fused_hpm_block_steps_give_the_unfused_plans_outputs(small_file, monkeypatch, kernels):
    """In an HPM block, the LceQuantize reading each binary convolution's output (through its batch
    norm) is packed by that convolution, and the block's CONCATENATION + ADD is written by its
    convolutions into their channels: neither has a step of its own, and the outputs are bit for
    bit those of the plan where each is its own pass (the C++ paths, and kernels.cu built for the
    CPU standing in for the GPU)."""
    if kernels == "cuda":
        fake_cupy.install(monkeypatch)
    images = np.random.default_rng(8).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    fused = Engine(small_file, kernels=kernels, cuda_graphs=False)
    names = [name for name, _, _ in fused.profile(images)]
    assert {"LceBconv2d+LceQuantize+CONCATENATION+ADD", "LceBconv2d+CONCATENATION+ADD",
            "LceBconv2d+LceQuantize+CONCATENATION", "LceBconv2d+CONCATENATION"} <= set(names)
    assert not [name for name in names if name.startswith("CONCATENATION")]
    assert set(names) <= set(engine_module.PARTS) | {"MAX_POOL_2D+LceQuantize",
                                                     "RESIZE_NEAREST_NEIGHBOR+ADD+LceQuantize"}
    plain = Engine(small_file, kernels=kernels, cuda_graphs=False, fuse_blocks=False)
    plain_names = [name for name, _, _ in plain.profile(images)]
    packed = sum(name.startswith("LceBconv2d+LceQuantize") for name in names)
    concatenations = sum(name.startswith("CONCATENATION") for name in plain_names)
    # (the float steps that pack their output for an LceQuantize: the next test)
    packed_rows = sum(_packs_float_rows(name) for name in names)
    assert len(plain_names) == len(names) + packed + concatenations + packed_rows
    assert packed > 10 and concatenations > 3
    np.testing.assert_array_equal(np.asarray(fused.predict(images)), np.asarray(plain.predict(images)))


@pytest.mark.parametrize("kernels", PATHS + ["cuda"])
def test_float_steps_pack_the_lce_quantize_that_reads_their_output(small_file, monkeypatch, kernels):
    """An LceQuantize (with its batch norm) reading the float output of a CONV_2D, MAX_POOL_2D or
    RESIZE_NEAREST_NEIGHBOR step (the ADD's or the pool's done in it) has no step of its own: that
    step packs its rows as it writes them. The outputs are bit for bit the plan's with each
    LceQuantize its own step (the C++ paths, and kernels.cu built for the CPU standing in for the
    GPU, which packs after the op)."""
    if kernels == "cuda":
        fake_cupy.install(monkeypatch)
    images = np.random.default_rng(9).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    fused = Engine(small_file, kernels=kernels, cuda_graphs=False)
    names = [name for name, _, _ in fused.profile(images)]
    assert {"CONV_2D+LceQuantize", "BN+CONV_2D+ADD+MAX_POOL_2D+LceQuantize", "MAX_POOL_2D+LceQuantize",
            "RESIZE_NEAREST_NEIGHBOR+ADD+LceQuantize"} <= set(names)
    assert {engine_module.PARTS[name] for name in names if "CONV_2D" in name} == {"float convolutions"}
    monkeypatch.setattr(engine_module, "_packed_outputs", lambda *args: {})
    plain = Engine(small_file, kernels=kernels, cuda_graphs=False)
    plain_names = [name for name, _, _ in plain.profile(images)]
    packed_rows = sum(_packs_float_rows(name) for name in names)
    assert packed_rows >= 4 and len(plain_names) == len(names) + packed_rows
    assert plain_names.count("BN+LceQuantize") == names.count("BN+LceQuantize") + packed_rows
    np.testing.assert_array_equal(np.asarray(fused.predict(images)), np.asarray(plain.predict(images)))


def _packs_float_rows(step: str) -> bool:
    """Whether a profiled step is a float op that packs its output for an LceQuantize."""
    return step.endswith("+LceQuantize") and any(op in step for op in ("CONV_2D", "MAX_POOL_2D", "RESIZE"))


def _packing_batch_norm(rng, channels: int):
    """A folded batch norm for ``packed``: scales of both signs (a few zero), shifts of both signs."""
    scale = rng.uniform(0.5, 2.0, channels).astype(np.float32) * rng.choice([-1, 1], channels).astype(np.float32)
    scale[::7] = 0.0
    return scale, rng.normal(size=channels).astype(np.float32)


@pytest.mark.parametrize("path", PATHS)
def test_conv_pool_and_resize_pack_their_output_as_bitpack_packs_it(path):
    """``conv2d`` (alone, with a residual, pooled; in each float precision this CPU has), ``pool2d``
    and ``resize_nearest`` given ``packed``: their float output unchanged, and ``packed`` the bits
    an LceQuantize with the batch norm folded in packs from it (``x * scale + shift < 0``, rounded
    op by op), by NumPy: 40 channels (a word's tail), NaN, infinities and -0.0 in the output."""
    module = kernel_paths.load(path)
    rng = np.random.default_rng(21)
    none = np.zeros(0, np.float32)
    channels = 40
    x = rng.normal(size=(2, 8, 10, 24)).astype(np.float32)
    x[0, 1, 2, :] = np.nan
    filters = rng.normal(size=(channels, 3, 3, 24)).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    bias[5] = -0.0
    residual = rng.normal(size=(2, 8, 10, channels)).astype(np.float32)
    residual[1, 3, 4, :7] = [np.inf, -np.inf, -0.0, 0.0, np.inf, -np.inf, np.nan]
    scale, shift = _packing_batch_norm(rng, channels)
    geometry = [3, 3, 1, 1, 1, 1, 1, 1]
    cases = []
    for name, convolve, prepare in _precisions_on(path):
        weights = prepare(filters)
        for parts, window in (([], []), ([residual], []), ([residual], [2, 2])):
            shape = (2, 4, 5, channels) if window else (2, 8, 10, channels)

            def run(out, packing, convolve=convolve, weights=weights, parts=parts, window=window):
                convolve(x, weights, bias, geometry, -np.inf, np.inf, parts, none, none, -np.inf, np.inf, out,
                         pool_window=window, **packing)

            cases.append((f"conv2d {name} {len(parts)} {window}", shape, run))
    grid = rng.normal(size=(2, 7, 9, channels)).astype(np.float32)
    grid[1, 2, 3, :4] = [np.nan, np.inf, -np.inf, -0.0]
    cases.append(("pool2d", (2, 4, 5, channels), lambda out, packing: module.pool2d(
        grid, [2, 2, 2, 2, 0, 0], 0, -np.inf, np.inf, out, **packing)))
    rows, cols = np.array([0, 0, 1, 2, 3, 3, 4, 5], np.int32), np.array([0, 1, 1, 2, 3, 4, 5, 6, 7, 8], np.int32)
    cases.append(("resize_nearest", (2, 8, 10, channels), lambda out, packing: module.resize_nearest(
        grid, rows, cols, residual, -np.inf, np.inf, out, **packing)))
    for name, shape, run in cases:
        want = np.empty(shape, np.float32)
        run(want, {})
        for multiplier, offset in ((scale, shift), (none, shift), (scale, none), (none, none)):
            out = np.empty(shape, np.float32)
            packed = np.full(shape[:-1] + (2,), 12345, np.int32)
            run(out, {"packed": packed, "pack_multiplier": multiplier, "pack_bias": offset})
            np.testing.assert_array_equal(out, want, err_msg=name)
            np.testing.assert_array_equal(
                packed, next_layer_bits(want, multiplier if multiplier.size else None, offset if offset.size else None),
                err_msg=name)
    out = np.empty((2, 4, 5, channels), np.float32)
    with pytest.raises(ValueError, match="pool2d: packed output has the wrong size"):
        module.pool2d(grid, [2, 2, 2, 2, 0, 0], 0, -np.inf, np.inf, out, packed=np.zeros((2, 4, 5, 1), np.int32))
    with pytest.raises(ValueError, match="conv2d packed output: expected a C-contiguous int32"):
        module.conv2d(x, module.prepare_float_weights(filters), bias, geometry, -np.inf, np.inf, [], none, none,
                      -np.inf, np.inf, np.empty((2, 8, 10, channels), np.float32), packed=[[0, 0]])
    with pytest.raises(ValueError, match="resize_nearest: pack multiplier or bias size"):
        module.resize_nearest(grid, rows, cols, residual, -np.inf, np.inf, np.empty((2, 8, 10, channels), np.float32),
                              packed=np.zeros((2, 8, 10, 2), np.int32), pack_bias=shift[:3])


@pytest.mark.parametrize("kernels", ["cuda", "cuda-popcount"])
def test_gpu_engine_runs_its_cuda_kernels_on_the_cpu(small_file, monkeypatch, kernels):
    """The whole GPU engine on the CPU (tests/fake_cupy.py): every kernel launch matches its
    parameter list in kernels.cu (count and types) and its grid covers the work, and with
    kernels.cu's kernels built for the CPU (tests/cuda_on_cpu.py) the model's output is the CPU
    runtime's."""
    fake_cupy.install(monkeypatch)
    images = np.random.default_rng(3).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    gpu = Engine(small_file, kernels=kernels)
    assert gpu.kernels == kernels
    _assert_same_heatmaps(gpu.predict(images), Engine(small_file).predict(images), kernels)


def _memory_held(array) -> int:
    """Bytes of the allocation that ``array`` views (its own, for an array that owns its data)."""
    while array.base is not None:
        array = array.base
    return array.nbytes


def _pooled(pool) -> list:
    """Every free buffer of an engine's (or a run's) pool."""
    return [buffer for by_batch in pool.values() for free in by_batch.values() for buffer in free]


def test_a_pooled_buffer_serves_smaller_batches_and_goes_back_whole():
    pool = {}
    key = ((4, 5, 6), np.dtype(np.float32))
    values = ops.Values(2, pool)
    big = values.alloc((3, 4, 5, 6), np.float32)
    assert big.shape == (3, 4, 5, 6) and not values.is_part(big)
    values.release(big)
    small = values.alloc((2, 4, 5, 6), np.float32)  # the first 2 images of the batch-3 buffer
    assert small.shape == (2, 4, 5, 6) and small.flags.c_contiguous and values.is_part(small)
    assert small.ctypes.data == big.ctypes.data and not _pooled(pool)
    values.release(small)
    assert [b is big for b in _pooled(pool)] == [True]  # back whole
    other = values.alloc((2, 4, 5, 6), np.int32)  # another dtype: a buffer of its own
    assert other.dtype == np.int32 and other.ctypes.data != big.ctypes.data and not values.is_part(other)
    one = values.alloc((1, 4, 5, 6), np.float32)  # the batch-3 one, as no smaller one is free
    values.release(one)
    held = values.alloc((3, 4, 5, 6), np.float32)  # (another thread's run, say, holds the batch-3 one)
    one = values.alloc((1, 4, 5, 6), np.float32)  # none free: a batch-1 buffer of its own
    assert len(one) == 1 and not values.is_part(one)
    values.release(one)
    values.release(held)
    assert sorted(len(buffer) for free in pool[key].values() for buffer in free) == [1, 3]
    again = values.alloc((1, 4, 5, 6), np.float32)  # the smallest that fits: batch 1, not 3
    assert again is one
    values.release(again)
    bigger = values.alloc((4, 4, 5, 6), np.float32)  # none fits: made, and the smaller free ones dropped
    assert len(bigger) == 4 and not _pooled({key: pool[key]})
    values.release(bigger)
    values.release(other)
    assert {k: {size: len(free) for size, free in by_batch.items() if free} for k, by_batch in pool.items()} == {
        key: {4: 1}, ((4, 5, 6), np.dtype(np.int32)): {2: 1}}


@pytest.mark.parametrize("kernels", ["auto", "cuda"])
def test_predict_runs_a_large_batch_in_parts(small_file, monkeypatch, kernels):
    """``batch_size`` images at a time (memory for that many), the parts' results concatenated:
    the same as all at once (bit for bit on the CPU; on the GPU the float convolutions' cuBLAS
    products, NumPy's here, may sum in another order for another batch); NumPy or CuPy in, the
    same kind out."""
    if kernels == "cuda":
        fake_cupy.install(monkeypatch)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if kernels == "cuda" else {"rtol": 0, "atol": 0}
    images = np.random.default_rng(13).uniform(size=(5, 64, 64, 3)).astype(np.float32)
    whole = Engine(small_file, kernels=kernels, cuda_graphs=False).predict(images, batch_size=None)
    engine = Engine(small_file, kernels=kernels, cuda_graphs=False)
    got = engine.predict(images, batch_size=2)  # 2 + 2 + 1
    np.testing.assert_allclose(got, whole, **tolerance)
    assert {len(buffer) for buffer in _pooled(engine._buffers())} == {2}
    if kernels == "cuda":
        on_device = engine.predict(fake_cupy.asarray(images), batch_size=2)
        assert isinstance(on_device, fake_cupy.DeviceArray)
        np.testing.assert_allclose(np.asarray(on_device), whole, **tolerance)
    empty = engine.predict(images[:0])  # no image, no run (the kernels' grids assume one)
    assert type(empty) is np.ndarray and empty.shape == (0,) + whole.shape[1:] and empty.dtype == np.float32
    if kernels == "cuda":
        empty = engine.predict(fake_cupy.asarray(images[:0]))
        assert isinstance(empty, fake_cupy.DeviceArray) and empty.shape == (0,) + whole.shape[1:]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"batch_size={bad} must be a positive integer or None"):
            engine.predict(images, batch_size=bad)
    with pytest.raises(ValueError, match=r"input must have shape \(B, 64, 64, 3\)"):
        engine.predict(np.float32(1.0))
    # one image without its batch axis: named by its own shape (it was cut into parts of its rows,
    # and the error named the first part's shape, (2, 64, 3))
    with pytest.raises(ValueError, match=r"input must have shape \(B, 64, 64, 3\), got \(64, 64, 3\)"):
        engine.predict(images[0], batch_size=2)


@pytest.mark.parametrize("kernels", ["auto", "cuda"])
def test_buffers_of_the_largest_batch_serve_every_smaller_one(small_file, monkeypatch, kernels):
    """Called with batches 1, 3, 2, 1, 3 (as a Predictor is, with each image's faces), the engine
    keeps one set of buffers, of batch 3 (not one per batch size): the smaller runs take the first
    images of those and make no new ones but their outputs; every result is a fresh engine's, and
    none holds more memory than its own (a result that is part of a pooled buffer is copied)."""
    if kernels == "cuda":
        fake_cupy.install(monkeypatch)
    made = []
    init = ops.Values.__init__

    def counting_init(values, count, pool, empty=ops.aligned_empty):
        init(values, count, pool, lambda shape, dtype: made.append(tuple(shape)) or empty(shape, dtype))

    monkeypatch.setattr(ops.Values, "__init__", counting_init)
    images = np.random.default_rng(12).uniform(size=(3, 64, 64, 3)).astype(np.float32)
    engine = Engine(small_file, kernels=kernels, cuda_graphs=False)
    output_shape = engine.output_shape[1:]
    for position, batch in enumerate([1, 3, 2, 1, 3]):
        made.clear()
        got = engine.predict(images[:batch])
        if position >= 2:  # the batch-3 buffers serve every later run
            assert made == [(batch,) + output_shape], f"batch {batch}"
        assert _memory_held(got) <= got.nbytes + 64, f"batch {batch}: the result holds a bigger buffer"
        fresh = Engine(small_file, kernels=kernels, cuda_graphs=False)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(fresh.predict(images[:batch])), f"batch {batch}")
        pooled = {len(buffer) for buffer in _pooled(engine._buffers())}
        assert pooled == {max([1, 3, 2, 1, 3][:position + 1])}, f"batch {batch}: pooled batches {pooled}"


def test_gpu_runs_on_other_streams_and_threads_take_none_of_a_runs_buffers(small_file, monkeypatch):
    """A step-by-step run on the GPU releases an activation's buffer once its last reader is queued,
    not done, so only later work on the same CUDA stream may take it: a run on another stream, or
    from another thread, allocates its own (else it could overwrite a buffer that kernels queued
    on the first stream still read), while a later run on the same stream reuses them; every run
    gives the CPU runtime's output."""
    fake_cupy.install(monkeypatch)
    images = np.random.default_rng(5).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    expected = Engine(small_file).predict(images)
    gpu = Engine(small_file, kernels="cuda", cuda_graphs=False)
    taken = []
    alloc = ops.Values.alloc

    def recording_alloc(values, shape, dtype):
        taken.append(alloc(values, shape, dtype))
        return taken[-1]

    monkeypatch.setattr(ops.Values, "alloc", recording_alloc)

    def run(what):
        taken.clear()
        _assert_same_heatmaps(gpu.predict(images), expected, what)
        return {id(buffer) for buffer in taken}

    first = run("default stream")
    released = {id(b) for b in _pooled(gpu._buffers())}
    assert released and released <= first
    with fake_cupy.Stream(non_blocking=True):
        assert not run("another stream") & released
    in_thread = {}
    thread = threading.Thread(target=lambda: in_thread.update(buffers=run("another thread")))
    thread.start()
    thread.join()
    assert "buffers" in in_thread and not in_thread["buffers"] & released  # (missing: the run failed)
    assert run("the default stream again") & released  # its own released buffers, reused
    # a stream made for each call: the pools of the last GPU_STREAMS_KEPT streams are kept, the
    # default stream's among them while it keeps running
    streams = [fake_cupy.Stream(non_blocking=True) for _ in range(engine_module.GPU_STREAMS_KEPT + 2)]
    for stream in streams:
        with stream:
            run("a new stream")
        run("the default stream between them")
    kept = list(gpu._gpu_pools.by_stream)
    assert len(kept) == engine_module.GPU_STREAMS_KEPT and kept[-1] == fake_cupy.get_current_stream().ptr
    assert kept[:-1] == [stream.ptr for stream in streams[-(engine_module.GPU_STREAMS_KEPT - 1):]]


def test_gpu_engine_replays_each_shape_as_a_cuda_graph(small_file, monkeypatch):
    """A shape's first run is eager, its second is captured as CUDA graphs (CuPy stream capture,
    tests/fake_cupy.py: while capturing, every allocation must come from the engine's private pool,
    every launch must be on the capturing stream, no transfer, synchronisation or cuBLAS call may
    happen; so the graphs are split at the float convolutions' cuBLAS products), and
    later calls replay it: on new images (nothing of the captured call's data is baked in), from
    NumPy or CuPy, each result a copy the next call leaves alone; a capture that fails warns once
    and the engine runs eagerly from then on."""
    fake_cupy.install(monkeypatch)
    launches = []
    replay = fake_cupy.Graph.launch
    monkeypatch.setattr(fake_cupy.Graph, "launch", lambda graph, stream=None: launches.append(1) or replay(graph))
    rng = np.random.default_rng(11)
    batches = [rng.uniform(size=(2, 64, 64, 3)).astype(np.float32) for _ in range(4)]
    cpu = Engine(small_file)
    expected = [cpu.predict(x) for x in batches]
    gpu = Engine(small_file, kernels="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns
        results = [gpu.predict(batches[0])]
        assert [b for b in _pooled(gpu._buffers()) if len(b) == 2] and not launches  # eager, buffers kept for reuse
        results.append(gpu.predict(batches[1]))
        per_run = len(launches)  # graphs a replay launches: split at each float convolution's cuBLAS GEMM
        products = sum(op.name == "CONV_2D" for op in gpu.graph.operators)
        assert products >= 2 and per_run == products + 1
        results.append(gpu.predict(batches[2]))
        assert len(launches) == 2 * per_run and list(gpu._captured.captured) == [(2, 64, 64, 3)]  # captured at call 2
        assert not [b for b in _pooled(gpu._buffers()) if len(b) == 2]  # the eager run's buffers freed
        on_device = gpu.predict(fake_cupy.asarray(batches[3]))
        again = gpu.predict(batches[0])  # replayed after the CuPy call: its result is left alone
    assert isinstance(on_device, fake_cupy.DeviceArray) and len(launches) == 4 * per_run
    _assert_same_heatmaps(again, expected[0], "replayed again")
    for got, want, what in zip(results + [on_device], expected, ["eager", "captured", "replayed", "CuPy in"]):
        _assert_same_heatmaps(np.asarray(got), want, what)
    assert gpu.profile(batches[0]) and len(launches) == 4 * per_run  # profiling times the steps, eagerly
    gpu._captured.keep = 1
    three = rng.uniform(size=(3, 64, 64, 3)).astype(np.float32)
    for _ in range(3):
        _assert_same_heatmaps(gpu.predict(three), cpu.predict(three), "batch 3")
    assert list(gpu._captured.captured) == [(3, 64, 64, 3)] and len(launches) == 6 * per_run  # the least recent dropped
    eager = Engine(small_file, kernels="cuda", cuda_graphs=False)
    for x, want in zip(batches[:3], expected):
        _assert_same_heatmaps(eager.predict(x), want, "cuda_graphs=False")
    assert eager._captured is None and len(launches) == 6 * per_run
    mirrored = fake_cupy.asarray(batches[0])[:, :, ::-1]  # a strided CuPy view, step by step
    _assert_same_heatmaps(np.asarray(eager.predict(mirrored)), cpu.predict(batches[0][:, :, ::-1]), "strided")

    def refuse(stream, mode=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fake_cupy.Stream, "begin_capture", refuse)
    failing = Engine(small_file, kernels="cuda")
    failing.predict(batches[0])
    with pytest.warns(RuntimeWarning, match="capturing the model as a CUDA graph failed.*not permitted"):
        _assert_same_heatmaps(failing.predict(batches[1]), expected[1], "after a failed capture")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same_heatmaps(failing.predict(batches[2]), expected[2], "eager from then on")
    assert len(launches) == 6 * per_run


def test_gpu_profile_times_each_step_by_cuda_events(small_file, monkeypatch):
    """On the GPU kernels the profile queues the steps as ``predict`` does and reads each step's
    time from the CUDA events recorded before and after it (the GPU's time, not the Python launch
    cost), with one synchronisation at the end instead of one a step."""
    fake_cupy.install(monkeypatch)
    gpu = Engine(small_file, kernels="cuda")
    images = np.random.default_rng(4).uniform(size=(1, 64, 64, 3)).astype(np.float32)
    waits = []
    monkeypatch.setattr(fake_cupy.Stream, "synchronize", lambda stream: waits.append("stream"))
    monkeypatch.setattr(fake_cupy.Event, "synchronize", lambda event: waits.append("event"))
    stamps = iter(range(10**6))  # the k-th event at k * k milliseconds: step k takes 2 k + 1 ms
    monkeypatch.setattr(fake_cupy.Event, "record", lambda event, stream=None: setattr(event, "time", next(stamps) ** 2 / 1000))
    profile = gpu.profile(images)
    assert len(profile) == len(gpu._steps) > 10 and waits == ["event"]
    np.testing.assert_allclose([seconds for _, _, seconds in profile], [(2 * k + 1) / 1000 for k in range(len(profile))])
    assert [name for name, _, _ in profile] == [name for name, _, _ in Engine(small_file).profile(images)]


def test_gpu_engine_graph_repeats_the_padding(monkeypatch):
    """The authors' padding pads with PADV2, which the runtime does by filling its output with the
    value and assigning the input inside (on the GPU, CuPy kernels): its captured graph must repeat
    both at each replay, as CuPy's stream capture records its kernels (fake_cupy records them too).
    In fuzz_runtime's network of seed 7095 (bottleneck blocks, 3 images) the engine's recycled
    buffers overwrite a padded tensor's border later in the run, so a fill done only at capture
    shows at the replays (it did: fake_cupy did not record ``fill``)."""
    fake_cupy.install(monkeypatch)
    model, images = load_script("fuzz_runtime").seed_network(7095)
    with warnings.catch_warnings():  # LCE keeps these convolutions float (the padding is not its own)
        warnings.simplefilter("ignore")
        flatbuffer = export.convert(model)
    assert "PADV2" in {op.name for op in Engine(flatbuffer).graph.operators}
    rng = np.random.default_rng(2)
    batches = [images] + [rng.uniform(size=images.shape).astype(np.float32) for _ in range(3)]
    cpu, gpu = Engine(flatbuffer), Engine(flatbuffer, kernels="cuda")
    for x, what in zip(batches, ("eager", "captured", "replayed", "replayed again")):
        _assert_same_heatmaps(gpu.predict(x), cpu.predict(x), what)
    assert gpu._captured.failed is None and list(gpu._captured.captured) == [images.shape]


def test_gpu_crops_are_the_pipelines_crops(monkeypatch):
    """The Predictor's crops cut on the GPU (kernels.cu's warp_crops, here its CPU build) equal
    TensorFlow's ImageProjectiveTransformV3 crops of the pipeline (warp_image) to float rounding:
    scaled, rotated, flipped, and reaching past every edge of the image; a crop far outside it is
    zeros."""
    from larq_landmarks.datasets.pipeline import crop_matrix, sampling_params, warp_image

    fake_cupy.install(monkeypatch)
    image = np.random.default_rng(6).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    centres = np.array([[26, 18], [2, 3], [50, 35], [20, 30]], np.float32)
    matrices = tf.concat([crop_matrix(centres[:2], np.array([0.2, 0.3], np.float32), 24),
                          crop_matrix(centres[2:], np.array([0.25, 0.15], np.float32), 24, 30.0, True)], 0)
    got = cuda.load("cuda").warp_crops(image, sampling_params(matrices).numpy(), 24)
    assert isinstance(got, fake_cupy.DeviceArray) and got.shape == (4, 24, 24, 3)
    pixels = tf.image.convert_image_dtype(tf.constant(image), tf.float32)
    expected = np.stack([warp_image(pixels, m, 24).numpy() for m in matrices])
    assert (expected == 0).any() and (expected > 0).mean() > 0.3  # past the edges, and inside
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-6)
    far = crop_matrix(np.array([[3e9, -3e9]], np.float32), np.array([0.2], np.float32), 24)  # no int overflow
    assert not np.asarray(cuda.load("cuda").warp_crops(image, sampling_params(far).numpy(), 24)).any()


def test_unsupported_ops_are_named_and_auto_falls_back_to_lce(tmp_path):
    x = tf.keras.Input((8, 8, 3), batch_size=1)
    model = tf.keras.Model(x, tf.keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(x))
    path = tmp_path / "tanh.tflite"
    path.write_bytes(export.convert(model, binary=False))
    with pytest.raises(UnsupportedModelError, match=r"tanh.tflite: operator 1 TANH is not supported.*engine='lce'"):
        Engine(str(path))
    with pytest.warns(UserWarning, match="TANH is not supported.*LCE's interpreter instead"):
        fallback = export.TfliteModel(path.read_bytes(), name=str(path))
    assert fallback.engine == "lce"
    images = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(fallback.predict(images), model.predict(images, verbose=0), atol=1e-5)
    with pytest.raises(UnsupportedModelError):
        export.TfliteModel(path.read_bytes(), engine="runtime")
    with pytest.raises(CorruptModelError, match="junk.tflite: not a complete TFLite flatbuffer"):
        (tmp_path / "junk.tflite").write_bytes(b"junk" * 10)
        Engine(str(tmp_path / "junk.tflite"))
    with pytest.warns(UserWarning, match=r"tanh.tflite: operator 1 TANH"):  # a path, as Engine takes
        np.testing.assert_array_equal(export.TfliteModel(path).predict(images), fallback.predict(images))
    with pytest.raises(export.NotOurModelError, match="junk.tflite: not a complete TFLite flatbuffer"):
        export.TfliteModel(str(tmp_path / "junk.tflite"))
    with pytest.raises(FileNotFoundError, match="missing.tflite"):
        export.TfliteModel(tmp_path / "missing.tflite")
    # a Keras file given where a .tflite goes: said so, with the way to convert it
    for keras_file in (tmp_path / "tanh.keras", tmp_path / "tanh.h5"):
        with warnings.catch_warnings():  # Keras says HDF5 is legacy: the point here
            warnings.simplefilter("ignore", UserWarning)
            model.save(keras_file)
        with pytest.raises(CorruptModelError, match=rf"{keras_file.name}: a Keras model .* larq_landmarks.export.convert"):
            Engine(str(keras_file))
    with pytest.raises(IsADirectoryError, match="a folder, not a model file"):
        Engine(str(tmp_path))
    supported = export.convert(tf.keras.Model(x, tf.keras.layers.Conv2D(4, 3, padding="same")(x)), binary=False)
    assert Engine(supported, num_threads=np.int64(2)).num_threads == 2
    for threads in (0, 2.5, True):  # 2.5 was taken, and failed at the first predict inside the kernels
        with pytest.raises(ValueError, match=rf"num_threads={threads!r} must be a positive integer"):
            Engine(supported, num_threads=threads)


def test_auto_prefers_lce_where_the_runtime_has_only_its_portable_kernels(small_file, monkeypatch):
    from larq_landmarks import tflite_model

    flatbuffer = open(small_file, "rb").read()
    images = np.random.default_rng(5).uniform(size=(2,) + Engine(flatbuffer).input_shape[1:]).astype(np.float32)
    here = export.TfliteModel(flatbuffer)
    assert (here.engine, here.kernels) == (("lce", None) if available_kernels()[0] == "portable"
                                           else ("runtime", available_kernels()[0]))
    monkeypatch.setattr(kernel_paths, "available", lambda: ["portable"])  # an ARM CPU, say
    portable_cpu = export.TfliteModel(flatbuffer)
    assert (portable_cpu.engine, portable_cpu.kernels) == ("lce", None)
    lce = export.TfliteModel(flatbuffer, engine="lce").predict(images)
    np.testing.assert_array_equal(portable_cpu.predict(images), lce)
    assert export.TfliteModel(flatbuffer, engine="runtime").kernels == "portable"  # asked for: no LCE

    def no_lce(*args, **kwargs):
        raise ImportError("LCE's interpreter is not installed")

    monkeypatch.setattr(tflite_model, "interpreter", no_lce)  # and no LCE: the runtime's portable kernels
    without_lce = export.TfliteModel(flatbuffer)
    assert (without_lce.engine, without_lce.kernels) == ("runtime", "portable")
    np.testing.assert_allclose(without_lce.predict(images), lce, atol=1e-4)


def test_predictor_runs_tflite_with_the_runtime_by_default(small_file):
    image = (np.random.default_rng(4).uniform(size=(90, 100, 3)) * 255).astype(np.uint8)
    ours = Predictor.from_path(small_file)
    lce = Predictor.from_path(small_file, engine="lce")
    assert (ours.engine, lce.engine) == ("runtime", "lce")
    boxes = [[10, 10, 80, 70], [0, 0, 50, 50]]
    np.testing.assert_allclose(ours.predict(image, boxes)[0], lce.predict(image, boxes)[0], atol=0.5)


@pytest.mark.skipif(cuda.gpu_name() is not None, reason="a GPU is present")
def test_cuda_engine_without_a_gpu_is_a_clear_error(small_file, tmp_path):
    with pytest.raises(CudaUnavailableError, match=r"kernels='cuda' needs .*(CuPy|GPU)"):
        Predictor.from_path(small_file, engine="cuda")
    image = tmp_path / "face.png"
    Image.new("RGB", (80, 80)).save(image)
    with pytest.raises(SystemExit, match=r"kernels='cuda' needs .*(CuPy|GPU)"):
        cli.main(["predict", str(image), "--model", small_file, "--box", "0,0,70,70", "--engine", "cuda",
                  "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


NO_TENSORFLOW = no_tensorflow.PRELUDE + """
import numpy as np
from larq_landmarks.runtime import Engine
images = np.load(sys.argv[2])
np.save(sys.argv[3], Engine(sys.argv[1], kernels=sys.argv[4]).predict(images))
assert not any(m.split(".")[0] in MISSING for m in sys.modules)
"""


def test_runtime_needs_neither_tensorflow_nor_lce(small_file, tmp_path):
    images = np.random.default_rng(5).uniform(size=(1, 64, 64, 3)).astype(np.float32)
    np.save(tmp_path / "in.npy", images)
    expected = Engine(small_file, kernels="portable").predict(images)
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, small_file, str(tmp_path / "in.npy"),
                             str(tmp_path / "out.npy"), "portable"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


RUNTIME_ONLY = """
import sys
import numpy as np
import larq_landmarks
from larq_landmarks.runtime import Engine
images = np.load(sys.argv[2])
np.save(sys.argv[3], Engine(sys.argv[1]).predict(images))
assert "tensorflow" not in sys.modules and "larq" not in sys.modules, "imported TensorFlow"
model = larq_landmarks.BinaryHourglass(5, width=8, depth=1, input_size=16)  # imports TensorFlow now
import tensorflow as tf
assert tf.keras.Model.__module__.startswith("tf_keras") and isinstance(model, tf.keras.Model)
"""


def test_a_runtime_only_process_imports_no_tensorflow(small_file, tmp_path):
    """With ``LARQ_LANDMARKS_RUNTIME_ONLY=1`` (TensorFlow installed) importing the package and running
    a file on the runtime imports neither TensorFlow nor Larq and gives the same outputs; its
    ``BinaryHourglass`` then imports TensorFlow as the package would have: Keras 2, and its
    start-up ERROR line about NVIDIA's missing driver held (TF_CPP_MIN_LOG_LEVEL set by the package)."""
    images = np.random.default_rng(6).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    np.save(tmp_path / "in.npy", images)
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL")}
    env["LARQ_LANDMARKS_RUNTIME_ONLY"] = "1"
    result = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, small_file, str(tmp_path / "in.npy"),
                             str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), Engine(small_file).predict(images))
    assert "cuInit" not in result.stderr and "E0000" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dilation,padding", [((2, 2), "SAME"), ((2, 3), "VALID"), ((1, 2), "SAME")])
def test_float_conv_with_dilation_and_batch_norm_matches_tensorflow(path, dilation, padding):
    """Dilated taps are read from the padded input one channel run per tap (one run per filter row
    when the width dilation is 1); the batch norm + ReLU applies to the input, not the padding."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 11, 12, 5)).astype(np.float32)
    filters = rng.normal(size=(9, 3, 3, 5)).astype(np.float32)
    bias = rng.normal(size=9).astype(np.float32)
    scale, shift = rng.uniform(0.5, 2, 5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    expected = tf.nn.conv2d(np.maximum(x * scale + shift, 0), np.transpose(filters, (1, 2, 3, 0)), 1, padding,
                            dilations=dilation).numpy() + bias
    code = {"SAME": 0, "VALID": 1}[padding]
    (out_h, top), (out_w, left) = (ops._same_padding(n, 3, 1, d, code) for n, d in zip(x.shape[1:3], dilation))
    assert (out_h, out_w) == expected.shape[1:3]
    module = kernel_paths.load(path)
    out = np.empty(expected.shape, np.float32)
    module.conv2d(x, module.prepare_float_weights(filters), bias, [3, 3, 1, 1, *dilation, top, left], -np.inf, np.inf,
                  [], scale, shift, 0.0, np.inf, out)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cout", [40, 4])
def test_float_conv_keeps_nan_as_tflite_does(path, cout):
    """A NaN input pixel makes the outputs that read it NaN, with or without the fused ReLU (TFLite
    clamps with min/max that pass NaN through); the other outputs are untouched. (4 channels: the
    AVX-512 kernels' dot products along K for the last 1-8 channels.)"""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, 6, 7, 20)).astype(np.float32)
    x[0, 2, 3, 5] = np.nan
    filters = rng.normal(size=(cout, 3, 3, 20)).astype(np.float32)
    bias = rng.normal(size=cout).astype(np.float32)
    expected = tf.nn.conv2d(x, np.transpose(filters, (1, 2, 3, 0)), 1, "SAME").numpy() + bias
    assert np.isnan(expected).sum() == 9 * cout
    module = kernel_paths.load(path)
    none = np.zeros(0, np.float32)
    for low, want in ((-np.inf, expected), (0.0, np.where(np.isnan(expected), np.nan, np.maximum(expected, 0)))):
        out = np.empty(expected.shape, np.float32)
        module.conv2d(x, module.prepare_float_weights(filters), bias, [3, 3, 1, 1, 1, 1, 1, 1], low, np.inf, [],
                      none, none, -np.inf, np.inf, out)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size,cin,cout,k,stride", [(20, 64, 70, 1, 1), (21, 3, 64, 7, 2), (9, 5, 7, 3, 1),
                                                   (8, 40, 96, 1, 1), (10, 16, 100, 3, 1), (9, 256, 68, 1, 1),
                                                   (12, 24, 68, 3, 1)])
def test_float_conv_with_fused_residual_and_batch_norm_matches_tensorflow(path, size, cin, cout, k, stride):
    """CONV_2D (SAME padding, bias, optional ReLU) with the ADD fused after it (the residual whole,
    or as the parts of a folded channel concatenation) and the batch norm + ReLU before it
    (``relu(x * m + b)``, the padding staying zero), against tf.nn.conv2d; 20x20 output pixels span
    several row chunks of the kernel. 70, 7 and 68 channels: the AVX-512 kernels' dot products
    along K for the last 1-8 channels (8 and 4 at a time; K a multiple of 16 or not)."""
    rng = np.random.default_rng(size)
    x = rng.normal(size=(2, size, size, cin)).astype(np.float32)
    filters = rng.normal(size=(cout, k, k, cin)).astype(np.float32)
    bias = rng.normal(size=cout).astype(np.float32)
    scale, shift = rng.uniform(0.5, 2, cin).astype(np.float32), rng.normal(size=cin).astype(np.float32)

    def conv(inputs):
        return tf.nn.conv2d(inputs, np.transpose(filters, (1, 2, 3, 0)), stride, "SAME").numpy() + bias

    expected, normalised = conv(x), conv(np.maximum(x * scale + shift, 0))
    residual = rng.normal(size=expected.shape).astype(np.float32)
    split = [np.ascontiguousarray(residual[..., :32]), np.ascontiguousarray(residual[..., 32:])]
    module = kernel_paths.load(path)
    weights = module.prepare_float_weights(filters)
    out_size = expected.shape[1]
    pad = max((out_size - 1) * stride + k - size, 0) // 2
    geometry = [k, k, stride, stride, 1, 1, pad, pad]
    none = np.zeros(0, np.float32)
    cases = [([], none, none, -np.inf, -np.inf, expected),
             ([residual], none, none, 0.0, -np.inf, np.maximum(expected + residual, 0)),
             ([residual], scale, shift, -np.inf, 0.0, normalised + residual)]
    if cout % 16 == 0 and cout > 32:  # the parts of a folded concatenation: 16-channel multiples
        cases.append((split, none, none, -np.inf, -np.inf, expected + residual))
    for parts, multiplier, offset, low, input_low, want in cases:
        out = np.empty(expected.shape, np.float32)
        module.conv2d(x, weights, bias, geometry, low, np.inf, parts, multiplier, offset, input_low, np.inf, out)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_prepared_weights_and_engine_buffers_start_on_a_cache_line(path):
    """The kernels' 64-byte vector loads of a weight row and stores of an output each touch one
    cache line only if the arrays start on a 64-byte boundary (numpy's own start 16 or 32 past)."""
    module = kernel_paths.load(path)
    rng = np.random.default_rng(0)
    filters = rng.normal(size=(70, 3, 3, 5)).astype(np.float32)
    packed = rng.integers(-2**31, 2**31 - 1, (40, 3, 3, 2), dtype=np.int64).astype(np.int32)
    for _ in range(3):
        weights = module.prepare_float_weights(filters)
        assert weights.ctypes.data % 64 == 0
        np.testing.assert_array_equal(weights[:, :70], filters.reshape(70, -1).T)
        assert module.prepare_binary_weights(packed).ctypes.data % 64 == 0
    for shape, dtype in (((1, 9, 9, 3), np.float32), ((7,), np.int32), ((0, 4), np.float32)):
        array = ops.aligned_empty(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous and array.flags.writeable
        assert array.size == 0 or array.ctypes.data % 64 == 0


BF16_PATHS = [p for p in PATHS if p.startswith("avx512") and kernel_paths.load(p).cpu_supports("avx512bf16")]
needs_bf16 = pytest.mark.skipif(not BF16_PATHS, reason="this CPU has no AVX512_BF16")


def _float_conv_cases(rng):
    """The reduced-precision convolution tests' shapes (the 7x7 stride-2 stem's 3 channels, odd
    channel counts, 1x1 with more channels than a tile, dilated taps) with random inputs, filters,
    biases and a batch norm's scale and shift: (size, cin, cout, k, stride, dilation, x, filters,
    bias, scale, shift)."""
    for size, cin, cout, k, stride, dilation in [(21, 3, 64, 7, 2, 1), (9, 5, 7, 3, 1, 1), (20, 64, 70, 1, 1, 1),
                                                 (11, 5, 9, 3, 1, 2), (8, 33, 96, 1, 1, 1)]:
        x = rng.normal(size=(2, size, size, cin)).astype(np.float32)
        filters = rng.normal(size=(cout, k, k, cin)).astype(np.float32)
        bias = rng.normal(size=cout).astype(np.float32)
        scale, shift = rng.uniform(0.5, 2, cin).astype(np.float32), rng.normal(size=cin).astype(np.float32)
        yield size, cin, cout, k, stride, dilation, x, filters, bias, scale, shift


def _bfloat16(values) -> np.ndarray:
    """float32 rounded to bfloat16 (nearest, ties to even; NaN stays NaN), as float32: by hand."""
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(values), np.float32(np.nan), rounded)


@needs_bf16
@pytest.mark.parametrize("path", BF16_PATHS)
def test_bfloat16_float_conv_is_the_conv_of_bfloat16_operands(path):
    """``float_precision="bfloat16"``'s convolution: products of the input and weights rounded to
    bfloat16 (by hand here: ties to even, NaN kept), summed in float32; odd channel counts (the 7x7
    stem's 3) with a zero channel added, so that a NaN or infinity reaches only the outputs that read
    it; dilated taps; the batch norm before it and the residual after it as in float32."""
    module = kernel_paths.load(path)
    none = np.zeros(0, np.float32)
    # a 1x1 identity filter gives the input's rounding itself: halfway cases round to even
    halves = np.array([1.00390625, 1.01171875, -3.0078125, 2.0 ** -130, np.nan, np.inf, 65504.0, 0.1],
                      np.float32).reshape(1, 1, 8, 1)
    out = np.empty((1, 1, 8, 1), np.float32)
    module.conv2d_bf16(halves, module.prepare_float_weights_bf16(np.ones((1, 1, 1, 1), np.float32)),
                       np.zeros(1, np.float32), [1, 1, 1, 1, 1, 1, 0, 0], -np.inf, np.inf, [], none, none, -np.inf,
                       np.inf, out)
    rounded = _bfloat16(halves).ravel()
    np.testing.assert_array_equal(out.ravel(), np.where(np.abs(rounded) < 2.0 ** -126, 0, rounded))
    assert out.ravel()[0] == 1.0 and out.ravel()[1] == 1.015625  # ties: down to even, up to even
    assert out.ravel()[3] == 0  # a subnormal product counts as zero (VDPBF16PS flushes them)
    rng = np.random.default_rng(11)
    for size, cin, cout, k, stride, dilation, x, filters, bias, scale, shift in _float_conv_cases(rng):
        out_size, pad = ops._same_padding(size, k, stride, dilation, 0)
        weights = module.prepare_float_weights_bf16(filters)
        assert weights.ctypes.data % 64 == 0
        for multiplier, offset, input_low in ((none, none, -np.inf), (scale, shift, 0.0)):
            source = x if multiplier.size == 0 else np.maximum(x * scale + shift, 0)
            expected = tf.nn.conv2d(_bfloat16(source).astype(np.float64),
                                    np.transpose(_bfloat16(filters), (1, 2, 3, 0)).astype(np.float64), stride, "SAME",
                                    dilations=dilation).numpy() + bias
            residual = rng.normal(size=expected.shape).astype(np.float32)
            out = np.empty(expected.shape, np.float32)
            module.conv2d_bf16(x, weights, bias, [k, k, stride, stride, dilation, dilation, pad, pad], -np.inf,
                               np.inf, [residual], multiplier, offset, input_low, np.inf, out)
            np.testing.assert_allclose(out, expected + residual, rtol=1e-5, atol=1e-4, err_msg=f"{size, cin, k}")
    with pytest.raises(ValueError, match="not prepare_float_weights_bf16 of this filter"):
        module.conv2d_bf16(x, module.prepare_float_weights_bf16(filters), bias, [3, 3, 1, 1, 1, 1, 1, 1],  # 1x1's
                           -np.inf, np.inf, [], none, none, -np.inf, np.inf, np.empty((2, 8, 8, 96), np.float32))


@pytest.mark.parametrize("precision, function, needs, paths, unbuilt", [
    ("bfloat16", "conv2d_bf16", "AVX512_BF16 and the avx512 or avx512bw kernels", ("avx512", "avx512bw"),
     r"built without bfloat16 \(a compiler before GCC 10 or Clang 9\)"),
    ("int8", "conv2d_int8", "AVX512_VNNI and the avx512 or avx512bw kernels, or the avx2 kernels",
     ("avx512", "avx512bw", "avx2"), r"built without int8 \(a compiler before GCC 8 or Clang 6\)")])
def test_reduced_precisions_are_refused_where_the_kernels_lack_them(small_file, monkeypatch, precision, function,
                                                                   needs, paths, unbuilt):
    """bfloat16 needs the avx512 or avx512bw kernels on a CPU with AVX512_BF16, int8 those on a CPU
    with AVX512_VNNI or the avx2 kernels (on any CPU: with AVX-VNNI or without); elsewhere (the
    portable kernels, a CPU without the instructions, kernels built by a compiler without them, the
    GPU) asking for it is an error that says which."""
    for path in PATHS:
        module = kernel_paths.load(path)
        feature = "avx512bf16" if precision == "bfloat16" else getattr(module, "int8_feature", "none")
        if hasattr(module, function) and ((precision, path) == ("int8", "avx2") or module.cpu_supports(feature)):
            assert path in paths
            assert Engine(small_file, kernels=path, float_precision=precision).float_precision == precision
            continue
        why = "which have no" if path not in paths else "and this CPU has no"
        with pytest.raises(ValueError, match=re.escape(f"needs {needs}; these are the {path} kernels, {why}")):
            Engine(small_file, kernels=path, float_precision=precision)
    # kernels built by a compiler without the instructions (GCC 9 for bfloat16, say) lack the function
    for path in set(paths) & set(PATHS):
        full = kernel_paths.load(path)
        without = types.SimpleNamespace(**{k: getattr(full, k) for k in dir(full)
                                           if not k.startswith("__") and k != function})
        monkeypatch.setattr(kernel_paths, "load", lambda kernels="auto": without)
        with pytest.raises(ValueError, match=fr"these are the {path} kernels, {unbuilt}"):
            Engine(small_file, float_precision=precision)
        monkeypatch.undo()
    fake_cupy.install(monkeypatch)
    with pytest.raises(ValueError, match=re.escape(f"float_precision='{precision}' is for the CPU kernels (it needs "
                                                   f"{needs}); the GPU kernels run float32")):
        Engine(small_file, kernels="cuda", float_precision=precision)


@needs_bf16
def test_bfloat16_through_the_predictor_and_the_command_line(small_file, tmp_path, capsys):
    """``Predictor.from_path(..., float_precision="bfloat16")`` and ``--float-precision bfloat16``
    run the runtime's bfloat16 convolutions; LCE's interpreter and Keras models run float32 only,
    and asking them for bfloat16 is an error that says so."""
    from larq_landmarks.datasets import writers
    from larq_landmarks.tflite_model import TfliteModel

    writers.write_300w(str(tmp_path / "faces"), 4, seed=3, image_size=(100, 100))
    image = str(tmp_path / "faces" / "00000.jpg")
    predictor = Predictor.from_path(small_file, float_precision="bfloat16")
    assert predictor.engine == "runtime" and predictor._predict.__self__.float_precision == "bfloat16"
    points, _ = predictor.predict(image, [[10, 10, 90, 90]])
    assert points.shape == (1, 68, 2)
    assert cli.main(["evaluate", "--model", small_file, "--format", "300w", "--data", str(tmp_path / "faces"),
                     "--float-precision", "bfloat16"]) == 0
    assert "NME box %" in capsys.readouterr().out
    with pytest.raises(ValueError, match="LCE's interpreter runs float32"):
        TfliteModel(small_file, engine="lce", float_precision="bfloat16")
    model = tf.keras.Sequential([tf.keras.Input((8, 8, 3)), tf.keras.layers.Conv2D(4, 1, strides=4)])
    model.save(tmp_path / "m.keras")
    with pytest.raises(SystemExit, match="m.keras: float_precision='bfloat16' is for a .tflite"):
        cli.main(["predict", image, "--model", str(tmp_path / "m.keras"), "--box", "10,10,90,90",
                  "--float-precision", "bfloat16", "--out", str(tmp_path / "out")])


# each int8 kernel path in each form this CPU runs: VNNI's (VPDPBUSD, where the CPU has it) and the
# avx2 kernels' pairs form (VPMADDWD), which every AVX2 CPU runs
INT8_FORMS = [(p, vnni) for p in PATHS for vnni in (True, False) if hasattr(kernel_paths.load(p), "conv2d_int8") and
              (kernel_paths.load(p).int8_pairs if not vnni else
               kernel_paths.load(p).cpu_supports(getattr(kernel_paths.load(p), "int8_feature", "none")))]
INT8_PATHS = sorted({p for p, _ in INT8_FORMS}, key=PATHS.index)
needs_int8 = pytest.mark.skipif(not INT8_PATHS, reason="no avx2 kernels and no AVX512_VNNI here")


def _quantised(values: np.ndarray):
    """Rows (the last axis) quantised to uint8 by hand: lo = min(0, min), hi = max(0, max),
    scale (hi - lo) / 255, zero point rint(-lo * 255 / (hi - lo)), q = clip(rint(x * 255 / (hi - lo))
    + zero, 0, 255), all in float32 as the kernel computes them; a row of zeros: scale 0, zero 0."""
    values = values.astype(np.float32)
    low, high = np.minimum(values.min(-1), np.float32(0)), np.maximum(values.max(-1), np.float32(0))
    width = high - low
    scale = width / np.float32(255)
    inverse = np.divide(np.float32(255), width, out=np.zeros_like(width), where=width > 0)
    zero = np.clip(np.rint(-low * inverse), 0, 255).astype(np.int64)
    q = np.clip(np.rint(values * inverse[..., None]) + zero[..., None], 0, 255).astype(np.int64)
    return q, scale, zero


def _int8_conv(x, filters, bias, stride, dilation, residual, per_pixel):
    """``conv2d_int8`` by hand, in integers: the weights a scale t an output channel (max |w| / 127,
    rint(w / t)), the input a scale s and zero point z a pixel (``per_pixel``) or an image, its
    "SAME" padding the zero point; out = float32(acc - z sum(w8)) * (s t) + bias + residual."""
    cout, k, _, cin = filters.shape
    largest = np.abs(filters.reshape(cout, -1)).max(1)
    t = np.where(largest > 0, largest / np.float32(127), np.float32(1)).astype(np.float32)
    w8 = np.rint(filters / t[:, None, None, None]).astype(np.int64)
    batch, size = x.shape[:2]
    if per_pixel:
        q, s, z = _quantised(x)
        acc = np.einsum("bhwc,oc->bhwo", q, w8[:, 0, 0, :])
    else:
        q, s, z = _quantised(x.reshape(batch, -1))
        q = q.reshape(x.shape)
        out_size, pad = ops._same_padding(size, k, stride, dilation, 0)
        reach = (out_size - 1) * stride + (k - 1) * dilation + 1
        padded = np.broadcast_to(z[:, None, None, None], (batch, reach + size, reach + size, cin)).copy()
        padded[:, pad:pad + size, pad:pad + size] = q
        acc = sum(np.einsum("bhwc,oc->bhwo", padded[:, fy * dilation:fy * dilation + stride * out_size:stride,
                                                    fx * dilation:fx * dilation + stride * out_size:stride], w8[:, fy, fx])
                  for fy in range(k) for fx in range(k))
        s, z = s[:, None, None], z[:, None, None]
    corrected = (acc - z[..., None] * w8.reshape(cout, -1).sum(1)).astype(np.float32)
    return corrected * (s[..., None].astype(np.float32) * t) + bias + residual


@needs_int8
@pytest.mark.parametrize("path, vnni", INT8_FORMS)
def test_int8_float_conv_is_the_quantised_arithmetic_by_hand(path, vnni):
    """``float_precision="int8"``'s convolution is, bit for bit, the integer arithmetic by hand, in
    VNNI's form and in the pairs form (int8 weights in quads, or the same values as int16 pairs): a
    1x1 convolution quantises each pixel with its own scale and zero point, any other (the 7x7
    stem, 3x3, dilated) each image, the padding being its zero point; odd channel counts; the batch
    norm before it and the residual after it. Its error against the float64 convolution stays
    within the rounding of the input and the weights (half a step each, bounded by hand)."""
    module = kernel_paths.load(path)
    none = np.zeros(0, np.float32)
    rng = np.random.default_rng(12)
    for size, cin, cout, k, stride, dilation, x, filters, bias, scale, shift in _float_conv_cases(rng):
        out_size, pad = ops._same_padding(size, k, stride, dilation, 0)
        weights, weight_scale, weight_sum = module.prepare_float_weights_int8(filters, vnni=vnni)
        assert weights.ctypes.data % 64 == 0 and weight_sum.dtype == np.int32
        assert (weights.dtype, weights.shape[-1]) == ((np.int8, 4) if vnni else (np.int16, 2))
        for multiplier, offset, input_low in ((none, none, -np.inf), (scale, shift, 0.0)):
            source = x if multiplier.size == 0 else np.maximum(x * scale + shift, 0).astype(np.float32)
            residual = rng.normal(size=(2, out_size, out_size, cout)).astype(np.float32)
            out = np.empty(residual.shape, np.float32)
            module.conv2d_int8(x, weights, weight_scale, weight_sum, bias, [k, k, stride, stride, dilation, dilation,
                               pad, pad], -np.inf, np.inf, [residual], multiplier, offset, input_low, np.inf, out)
            expected = _int8_conv(source, filters, bias, stride, dilation, residual, per_pixel=k == 1)
            np.testing.assert_array_equal(out, expected, err_msg=f"{size, cin, k}")
            exact = tf.nn.conv2d(source.astype(np.float64), np.transpose(filters, (1, 2, 3, 0)).astype(np.float64),
                                 stride, "SAME", dilations=dilation).numpy() + bias + residual
            # half an input step times sum |w|, plus half a weight step times sum |x| (of the taps)
            step = (np.maximum(source.max((1, 2, 3)), 0) - np.minimum(source.min((1, 2, 3)), 0)) / 255
            if k == 1:
                step = (np.maximum(source.max(-1), 0) - np.minimum(source.min(-1), 0))[..., None] / 255
            else:
                step = step[:, None, None, None]
            weight_step = np.abs(filters).reshape(cout, -1).max(1) / 127
            taps_abs = tf.nn.conv2d(np.abs(source).astype(np.float64), np.ones((k, k, cin, 1)), stride, "SAME",
                                    dilations=dilation).numpy()
            bound = step / 2 * np.abs(filters).reshape(cout, -1).sum(1) + weight_step / 2 * (taps_abs + step * k * k * cin)
            assert np.all(np.abs(out - exact) <= bound + 1e-4), f"{size, cin, k}"
            assert np.abs(out - exact).max() > 1e-3  # quantised: not float32's result
    with pytest.raises(ValueError, match="not prepare_float_weights_int8 of this filter"):
        module.conv2d_int8(x, *module.prepare_float_weights_int8(filters, vnni=vnni), bias, [3, 3, 1, 1, 1, 1, 1, 1],
                           -np.inf, np.inf, [], none, none, -np.inf, np.inf, np.empty((2, 8, 8, 96), np.float32))
    with pytest.raises(ValueError, match="a weight is NaN or infinite"):
        module.prepare_float_weights_int8(np.full((1, 1, 1, 4), np.nan, np.float32))
    if not module.int8_pairs:
        with pytest.raises(ValueError, match="vnni=False, the pairs form, is the avx2 kernels' only"):
            module.prepare_float_weights_int8(filters, vnni=False)


@needs_int8
@pytest.mark.parametrize("path, vnni", INT8_FORMS)
def test_int8_keeps_images_zeros_and_nans_where_float32_has_them(path, vnni):
    """An 8-bit image (values k / 255) is quantised without loss, so the stem's only error is its
    weights' rounding; a pixel of zeros gives the bias exactly; a NaN or infinity in a 1x1
    convolution's input pixel makes that pixel's outputs NaN and leaves the others as they were
    (in both forms)."""
    module = kernel_paths.load(path)
    module = types.SimpleNamespace(conv2d_int8=module.conv2d_int8,
                                   prepare_float_weights_int8=functools.partial(module.prepare_float_weights_int8,
                                                                                vnni=vnni))
    none = np.zeros(0, np.float32)
    rng = np.random.default_rng(13)
    image = (rng.integers(0, 256, size=(1, 16, 16, 3)) / 255).astype(np.float32)
    image[0, 0, 0, 0], image[0, 0, 0, 1] = 0, 1  # the full range
    filters = rng.normal(size=(8, 7, 7, 3)).astype(np.float32)
    weights, weight_scale, weight_sum = module.prepare_float_weights_int8(filters)
    out = np.empty((1, 8, 8, 8), np.float32)
    module.conv2d_int8(image, weights, weight_scale, weight_sum, np.zeros(8, np.float32), [7, 7, 2, 2, 1, 1, 2, 2],
                       -np.inf, np.inf, [], none, none, -np.inf, np.inf, out)
    t = np.abs(filters).reshape(8, -1).max(1) / np.float32(127)
    rounded_weights = (np.rint(filters / t[:, None, None, None]) * t[:, None, None, None]).astype(np.float64)
    exact = tf.nn.conv2d(image.astype(np.float64), np.transpose(rounded_weights, (1, 2, 3, 0)), 2, "SAME").numpy()
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)
    x = rng.normal(size=(1, 4, 4, 32)).astype(np.float32)
    x[0, 1, 2] = 0
    filters = rng.normal(size=(16, 1, 1, 32)).astype(np.float32)
    bias = rng.normal(size=16).astype(np.float32)
    prepared = module.prepare_float_weights_int8(filters)
    clean, spoilt = np.empty((1, 4, 4, 16), np.float32), np.empty((1, 4, 4, 16), np.float32)
    module.conv2d_int8(x, *prepared, bias, [1, 1, 1, 1, 1, 1, 0, 0], -np.inf, np.inf, [], none, none, -np.inf, np.inf,
                       clean)
    np.testing.assert_array_equal(clean[0, 1, 2], bias)
    x[0, 3, 3, 5], x[0, 0, 1, 0] = np.nan, np.inf
    module.conv2d_int8(x, *prepared, bias, [1, 1, 1, 1, 1, 1, 0, 0], -np.inf, np.inf, [], none, none, -np.inf, np.inf,
                       spoilt)
    bad = np.zeros((1, 4, 4), bool)
    bad[0, 3, 3] = bad[0, 0, 1] = True
    assert np.isnan(spoilt[bad]).all()
    np.testing.assert_array_equal(spoilt[~bad], clean[~bad])


def test_int8_needs_vnni_on_the_avx512_kernels_only(small_file, monkeypatch):
    """On a CPU without VNNI (stood for by kernels whose ``cpu_supports`` says no to it) the avx512
    and avx512bw kernels refuse int8, saying so; the avx2 kernels still run it, in the pairs form."""
    for path in set(PATHS) & {"avx512", "avx512bw", "avx2"}:
        full = kernel_paths.load(path)
        feature = getattr(full, "int8_feature", "none")
        without_vnni = types.SimpleNamespace(**{k: getattr(full, k) for k in dir(full) if not k.startswith("__")})
        without_vnni.cpu_supports = lambda name, full=full, feature=feature: name != feature and full.cpu_supports(name)
        monkeypatch.setattr(kernel_paths, "load", lambda kernels="auto", module=without_vnni: module)
        if path == "avx2":
            assert "int8" in kernel_paths.reduced_precisions(without_vnni) and not kernel_paths.int8_vnni(without_vnni)
            assert Engine(small_file, float_precision="int8").float_precision == "int8"
        elif hasattr(full, "conv2d_int8"):
            with pytest.raises(ValueError, match=f"these are the {path} kernels, and this CPU has no AVX512_VNNI"):
                Engine(small_file, float_precision="int8")
        monkeypatch.undo()


@pytest.mark.skipif("avx2" not in INT8_PATHS, reason="needs the avx2 kernels")
def test_int8_model_is_the_same_with_and_without_vnni(small_file, monkeypatch):
    """On the avx2 kernels a whole model under ``float_precision="int8"`` gives the same outputs bit
    for bit whether its convolutions take VNNI's form (where this CPU has AVX-VNNI) or the pairs
    form that AVX2 CPUs without it run (``LARQ_LANDMARKS_NO_VNNI=1`` makes this CPU take it),
    batch 1 and 3. The avx512 and avx512bw kernels have VNNI's form only: the variable leaves them."""
    avx2 = kernel_paths.load("avx2")
    images = np.random.default_rng(4).uniform(size=(3, 64, 64, 3)).astype(np.float32)
    monkeypatch.delenv(kernel_paths.NO_VNNI, raising=False)
    first = Engine(small_file, kernels="avx2", float_precision="int8")
    assert kernel_paths.int8_vnni(avx2) == (("avx2", True) in INT8_FORMS)
    monkeypatch.setenv(kernel_paths.NO_VNNI, "1")
    assert not kernel_paths.int8_vnni(avx2)
    assert all(kernel_paths.int8_vnni(kernel_paths.load(p)) for p in INT8_PATHS if p != "avx2")
    pairs = Engine(small_file, kernels="avx2", float_precision="int8")
    np.testing.assert_array_equal(pairs.predict(images), first.predict(images))
    np.testing.assert_array_equal(pairs.predict(images[1:2]), first.predict(images[1:2]))
    float32 = Engine(small_file, kernels="avx2").predict(images)
    assert np.abs(pairs.predict(images) - float32).max() > 0  # int8's rounding, not float32's


AMX = kernel_paths.load("avx512") if "avx512" in PATHS else None
needs_amx = pytest.mark.skipif(not (AMX and kernel_paths.amx(AMX, "int8") and kernel_paths.amx(AMX, "bfloat16")),
                               reason="this CPU has no AMX (Intel Xeons from Sapphire Rapids on)")


def test_amx_is_off_where_the_kernels_lack_it(monkeypatch):
    """``kernels.amx`` is False for kernels built without AMX (every path but avx512, and an avx512
    build without it, stood for by a module without ``amx``) and under ``LARQ_LANDMARKS_NO_AMX=1``;
    on the avx512 kernels it is the CPU's answer, for int8 and bfloat16 alike on the CPUs that have
    AMX (AMX-INT8 and AMX-BF16 came together)."""
    for path in set(PATHS) - {"avx512"}:
        module = kernel_paths.load(path)
        assert not hasattr(module, "amx")
        assert not kernel_paths.amx(module, "int8") and not kernel_paths.amx(module, "bfloat16")
    without = types.SimpleNamespace()
    assert not kernel_paths.amx(without, "int8")
    if AMX is not None and hasattr(AMX, "amx"):
        assert kernel_paths.amx(AMX, "int8") == kernel_paths.amx(AMX, "bfloat16")
        monkeypatch.setenv(kernel_paths.NO_AMX, "1")
        assert not kernel_paths.amx(AMX, "int8") and not kernel_paths.amx(AMX, "bfloat16")


@needs_amx
def test_amx_int8_is_vnni_bit_for_bit_and_bfloat16_the_conv_of_bfloat16_operands(monkeypatch):
    """On a CPU with AMX the avx512 kernels' int8 and bfloat16 convolutions take its tiles (1x1 with
    64 or 128 input channels; a 3x3's on 64, its rows in runs along each output row, blocks of 32, 16
    or fewer rows; in bfloat16 also the 7x7 stem's 3 channels, gathered): int8 gives VNNI's outputs bit
    for bit (``LARQ_LANDMARKS_NO_AMX=1`` runs the vector kernels), NaN pixels, a batch norm before,
    a residual in two parts after, a max pool, 68 output channels and rows not a multiple of 16
    included; bfloat16 the float64 convolution of bfloat16-rounded operands to float32's rounding,
    its sums not the vector kernels' bit for bit (another order: the tiles ran), a NaN or infinity
    reaching only the outputs that read it."""
    none = np.zeros(0, np.float32)
    rng = np.random.default_rng(21)
    monkeypatch.setenv(kernel_paths.NO_AMX, "1")
    assert not kernel_paths.amx(AMX, "int8") and not kernel_paths.amx(AMX, "bfloat16")
    monkeypatch.delenv(kernel_paths.NO_AMX)
    with pytest.raises(ValueError, match="precision is 'int8' or 'bfloat16'"):
        AMX.amx("float32")
    for batch, size, cin, cout, k, pool, parts in [(2, (7, 9), 64, 68, 1, [], [68]), (1, (20, 20), 128, 96, 1, [], [64, 32]),
                                                    (1, (16, 16), 64, 128, 1, [2, 2], [128]), (1, (40, 40), 64, 32, 3, [], [32]),
                                                    (2, (24, 24), 3, 64, 7, [], [64])]:
        clean = rng.normal(size=(batch, *size, cin)).astype(np.float32)
        # a NaN and an infinity: in 1x1 convolutions without the batch norm and the pool (its clamp and
        # their maxima may drop a NaN; a 3x3's int8 quantises the image with one range: all NaN)
        spoil = k == 1 and not pool
        spoilt = clean.copy()
        if spoil:
            spoilt[0, 1, 2, 5], spoilt[-1, 3, 4, 7] = np.nan, np.inf
        filters = rng.normal(size=(cout, k, k, cin)).astype(np.float32)
        bias = rng.normal(size=cout).astype(np.float32)
        residual = [rng.normal(size=(batch, *size, width)).astype(np.float32) for width in parts]
        scale, shift = rng.uniform(0.5, 2, cin).astype(np.float32), rng.normal(size=cin).astype(np.float32)
        geometry = [k, k, 1, 1, 1, 1, k // 2, k // 2]
        shape = (batch, *(s // 2 for s in size), cout) if pool else (batch, *size, cout)
        for x, multiplier, offset, input_low in ((spoilt, none, none, -np.inf), (clean, scale, shift, 0.0)):
            runs = {}
            for precision in ("int8", "bfloat16"):
                for form in ("amx", "vector"):
                    if form == "vector":
                        monkeypatch.setenv(kernel_paths.NO_AMX, "1")
                    out = np.empty(shape, np.float32)
                    if precision == "int8":
                        AMX.conv2d_int8(x, *AMX.prepare_float_weights_int8(filters), bias, geometry, -np.inf, np.inf,
                                        residual, multiplier, offset, input_low, np.inf, out, pool)
                    else:
                        AMX.conv2d_bf16(x, AMX.prepare_float_weights_bf16(filters), bias, geometry, -np.inf, np.inf,
                                        residual, multiplier, offset, input_low, np.inf, out, pool)
                    monkeypatch.delenv(kernel_paths.NO_AMX, raising=False)
                    runs[precision, form] = out
            case = f"{batch, size, cin, cout, k, pool, multiplier.size}"
            np.testing.assert_array_equal(runs["int8", "amx"], runs["int8", "vector"], err_msg=case)
            assert np.isnan(runs["int8", "amx"]).any() == (x is spoilt and spoil)
            assert not np.isnan(runs["int8", "amx"]).all()
            source = x if multiplier.size == 0 else np.maximum(x * scale + shift, 0)
            expected = tf.nn.conv2d(_bfloat16(source).astype(np.float64),
                                    np.transpose(_bfloat16(filters), (1, 2, 3, 0)).astype(np.float64), 1, "SAME").numpy()
            expected = expected + bias + np.concatenate(residual, -1)
            if pool:
                expected = tf.nn.max_pool2d(expected, 2, 2, "VALID").numpy()
            np.testing.assert_allclose(runs["bfloat16", "amx"], expected, rtol=1e-5, atol=1e-4, err_msg=case)
            assert np.isnan(runs["bfloat16", "amx"]).sum() == np.isnan(expected).sum()
            assert np.isnan(expected).any() == (x is spoilt and spoil)
            assert not np.array_equal(runs["bfloat16", "amx"], runs["bfloat16", "vector"]), case


@pytest.mark.parametrize("precision, low, high", [pytest.param("bfloat16", 1e-5, 3e-2, marks=needs_bf16),
                                                   pytest.param("int8", 1e-4, 5e-2, marks=needs_int8)])
def test_reduced_precision_engine_runs_float_models_to_its_rounding(tmp_path, precision, low, high):
    """A float .tflite (every convolution float) under ``float_precision="bfloat16"`` gives float32's
    outputs to bfloat16's rounding, under ``"int8"`` to int8's (about a percent of their range); the
    binary model's landmarks mostly stay where they were (a sign near zero may flip, so they are not
    bit-exact)."""
    tf.keras.utils.set_random_seed(1)
    real = trained_like_batch_norm(models.build_named("real_hpm", 16, input_size=64, width=32, depth=2))
    path = tmp_path / "real.tflite"
    export.convert(real, str(path), binary=False)
    images = np.random.default_rng(2).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    float32, reduced = (Engine(str(path), float_precision=p) for p in ("float32", precision))
    assert (float32.float_precision, reduced.float_precision) == ("float32", precision)
    want, got = float32.predict(images), reduced.predict(images)
    scale = np.abs(want).max()
    assert low * scale < np.abs(got - want).max() < high * scale  # rounded, and only by that much
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999
    with pytest.raises(ValueError, match="float_precision='float16' must be one of"):
        Engine(str(path), float_precision="float16")


@needs_int8
def test_int8_through_the_predictor_and_the_command_line(small_file, tmp_path, capsys):
    """``Predictor.from_path(..., float_precision="int8")`` and ``--float-precision int8`` run the
    runtime's int8 convolutions; ``evaluate`` given several precisions scores the model in each, side
    by side (each one's JSON tables those of the model run alone in it); LCE's interpreter runs
    float32 only, and asking it for int8 is an error that says so."""
    from larq_landmarks.datasets import writers
    from larq_landmarks.tflite_model import TfliteModel

    writers.write_300w(str(tmp_path / "faces"), 4, seed=3, image_size=(100, 100))
    image = str(tmp_path / "faces" / "00000.jpg")
    predictor = Predictor.from_path(small_file, float_precision="int8")
    assert predictor.engine == "runtime" and predictor._predict.__self__.float_precision == "int8"
    points, _ = predictor.predict(image, [[10, 10, 90, 90]])
    assert points.shape == (1, 68, 2) and np.isfinite(points).all()
    evaluate = ["evaluate", "--model", small_file, "--format", "300w", "--data", str(tmp_path / "faces")]
    alone = {}
    for precision in ("float32", "int8"):
        assert cli.main(evaluate + ["--float-precision", precision, "--json", str(tmp_path / f"{precision}.json")]) == 0
        alone[precision] = json.loads((tmp_path / f"{precision}.json").read_text())["tables"]
    assert "NME box %" in capsys.readouterr().out
    assert cli.main(evaluate + ["--float-precision", "float32", "int8", "--json", str(tmp_path / "both.json")]) == 0
    printed = capsys.readouterr().out
    labels = [f"{small_file} (float32)", f"{small_file} (int8)"]
    assert all(f"model {label}\n" in printed and f"| {label} | " in printed for label in labels)
    both = json.loads((tmp_path / "both.json").read_text())["models"]
    assert [m["model"] for m in both] == labels
    assert [m["tables"] for m in both] == [alone["float32"], alone["int8"]]
    with pytest.raises(ValueError, match="float_precision='int8' is the runtime's; LCE's interpreter runs float32"):
        TfliteModel(small_file, engine="lce", float_precision="int8")


def test_cpu_kernels_run_a_batch_as_many_images_at_a_time_as_fit(small_file, monkeypatch):
    """The CPU kernels run a batch in runs of as many images as keep the largest activation under
    ``CPU_BATCH_BYTES``; the result is the whole batch's, bit for bit."""
    # the small model's largest activation: its 16x16x68 float32 heatmaps, 68 KiB an image (more than
    # the 32x32x16 of its stem block)
    assert Engine(small_file)._images_a_run == engine_module.CPU_BATCH_BYTES // (16 * 16 * 68 * 4) == 120
    monkeypatch.setattr(engine_module, "CPU_BATCH_BYTES", 2 * 16 * 16 * 68 * 4 + 100)
    engine = Engine(small_file)
    runs, run = [], engine._run
    engine._run = lambda images, times: runs.append(len(images)) or run(images, times)
    images = np.random.default_rng(0).uniform(size=(5, 64, 64, 3)).astype(np.float32)
    batch = engine.predict(images)
    assert runs == [2, 2, 1]
    np.testing.assert_array_equal(batch, np.concatenate([run(images[i:i + 1], None) for i in range(5)]))
    runs.clear()
    engine.predict(images, batch_size=1)
    assert runs == [1] * 5


def _precisions_on(path: str) -> list:
    """The float convolutions' precisions the kernels of ``path`` run on this CPU: (name, conv2d
    called as ``conv2d`` is, prepare)."""
    module = kernel_paths.load(path)
    found = [("float32", module.conv2d, module.prepare_float_weights)]
    if path in BF16_PATHS:
        found.append(("bfloat16", module.conv2d_bf16, module.prepare_float_weights_bf16))
    for form, vnni in ((f"int8 {'VNNI' if vnni else 'pairs'}", vnni) for p, vnni in INT8_FORMS if p == path):
        # prepared: (weights, scales, sums), as conv2d_int8 takes them after the input
        found.append((form, lambda x, prepared, *args, **kwargs: module.conv2d_int8(x, *prepared, *args, **kwargs),
                      functools.partial(module.prepare_float_weights_int8, vnni=vnni)))
    return found


@pytest.mark.parametrize("path", PATHS)
def test_float_conv_pools_its_output_as_max_pool_2d_does(path):
    """``conv2d(..., pool_window=(ph, pw))`` writes the convolution's output (its batch norm before,
    residual after) max-pooled by that window and stride: bit for bit ``conv2d`` then ``pool2d``, in
    every precision this CPU runs, a NaN dropped as MAX_POOL_2D drops it; tasks of ph rows longer
    than the kernel's 96-row GEMM chunks (a 2 x 50 strip), the 7x7 stride-2 stem, 3-row windows."""
    rng = np.random.default_rng(11)
    module = kernel_paths.load(path)
    none = np.zeros(0, np.float32)
    for (height, width), cin, cout, k, stride, window in [((12, 50), 64, 48, 1, 1, (2, 2)),
                                                         ((24, 24), 3, 32, 7, 2, (3, 2)),
                                                         ((9, 9), 5, 7, 3, 1, (3, 3))]:
        x = rng.normal(size=(2, height, width, cin)).astype(np.float32)
        x[1, 3, 4, 0] = np.nan
        filters = rng.normal(size=(cout, k, k, cin)).astype(np.float32)
        bias = rng.normal(size=cout).astype(np.float32)
        scale, shift = rng.uniform(0.5, 2, cin).astype(np.float32), rng.normal(size=cin).astype(np.float32)
        out_h, pad_top = ops._same_padding(height, k, stride, 1, 0)
        out_w, pad_left = ops._same_padding(width, k, stride, 1, 0)
        geometry = [k, k, stride, stride, 1, 1, pad_top, pad_left]
        residual = rng.normal(size=(2, out_h, out_w, cout)).astype(np.float32)
        ph, pw = window
        for precision, convolve, prepare in _precisions_on(path):
            weights = prepare(filters)
            for parts, multiplier, offset in (([], none, none), ([residual], scale, shift)):
                full = np.empty((2, out_h, out_w, cout), np.float32)
                convolve(x, weights, bias, geometry, -np.inf, np.inf, parts, multiplier, offset, -np.inf, np.inf, full)
                want = np.empty((2, out_h // ph, out_w // pw, cout), np.float32)
                module.pool2d(full, [ph, pw, ph, pw, 0, 0], 0, -np.inf, np.inf, want)
                got = np.full_like(want, 7.0)
                convolve(x, weights, bias, geometry, -np.inf, np.inf, parts, multiplier, offset, -np.inf, np.inf, got,
                         pool_window=[ph, pw])
                assert np.isnan(full).any() and not np.isnan(want).all()
                np.testing.assert_array_equal(got, want, err_msg=f"{precision}, {k}x{k}, window {window}")
                # by hand: the maximum over each window of the convolution's output, NaN left out
                windows = full.reshape(2, out_h // ph, ph, out_w // pw, pw, cout)
                np.testing.assert_array_equal(got, np.where(np.isnan(windows), -np.inf, windows).max(axis=(2, 4)))
    with pytest.raises(ValueError, match="conv2d: pool_window needs 2 positive numbers"):
        module.conv2d(x, module.prepare_float_weights(filters), bias, geometry, -np.inf, np.inf, [], none, none,
                      -np.inf, np.inf, got, pool_window=[2])


@pytest.fixture(scope="module")
def pooled_convs_file(tmp_path_factory):
    """A float model of convolutions read by MAX_POOL_2Ds: a 1x1 + ADD pooled 2x2 (the HPM stem's
    pattern), a 3x3 + ReLU pooled 2x2 "VALID" on a 9x9 output (the window does not divide it: the
    last row and column are left out), a 1x1 pooled 3x3 "SAME" on a 4x4 output (one row and column
    of padding), a 1x1 pooled 2x2 with stride 1 (overlapping windows, not a convolution's to pool)
    and a 1x1 also read by an ADD (not either)."""
    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(5)
    inputs = tf.keras.Input((18, 18, 8))
    x = layers.Add()([layers.Conv2D(16, 1)(inputs), layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)])
    x = layers.MaxPool2D(2)(x)
    x = layers.MaxPool2D(2)(layers.Conv2D(16, 3, padding="same", activation="relu")(x))
    x = layers.MaxPool2D(3, padding="same")(layers.Conv2D(16, 1)(x))
    x = layers.MaxPool2D(2, strides=1)(layers.Conv2D(16, 1)(x))
    shared = layers.Conv2D(16, 1)(x)
    x = layers.Add()([layers.MaxPool2D(1)(shared), shared])
    path = tmp_path_factory.mktemp("pooled") / "pooled.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inputs, x)).convert())
    return str(path)


@pytest.mark.parametrize("kernels", PATHS + ["cuda"])
def test_max_pool_after_a_float_conv_is_done_in_its_pass(pooled_convs_file, monkeypatch, kernels):
    """A MAX_POOL_2D whose stride is its window, reading only a float convolution's output (after
    its ADD), has no step of its own: the convolution pools as it computes (by ``pool2d`` after it
    where the window does not divide its output, and on the GPU). The outputs are bit for bit the
    plan's with every pool its own step, and TensorFlow Lite's to float rounding; overlapping
    windows and an output read by another op stay separate steps (LCE's interpreter runs the file
    as TensorFlow Lite does)."""
    if kernels == "cuda":
        fake_cupy.install(monkeypatch)
    images = np.random.default_rng(4).normal(size=(3, 18, 18, 8)).astype(np.float32)
    fused = Engine(pooled_convs_file, kernels=kernels, cuda_graphs=False)
    names = [name for name, _, _ in fused.profile(images)]
    assert names[:5] == ["CONV_2D", "CONV_2D+ADD+MAX_POOL_2D", "CONV_2D+MAX_POOL_2D", "CONV_2D+MAX_POOL_2D", "CONV_2D"]
    assert names.count("MAX_POOL_2D") == 2 and set(names) <= set(engine_module.PARTS) | {"MAX_POOL_2D", "ADD"}
    got = np.asarray(fused.predict(images))
    monkeypatch.setattr(engine_module, "_following_max_pool", lambda *args: None)
    plain = Engine(pooled_convs_file, kernels=kernels, cuda_graphs=False)
    assert [name for name, _, _ in plain.profile(images)].count("MAX_POOL_2D") == 5
    np.testing.assert_array_equal(got, np.asarray(plain.predict(images)))
    want = export.TfliteModel(pooled_convs_file, engine="lce").predict(images)
    assert got.shape == want.shape == (3, 1, 1, 16)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_pools_are_each_windows_maximum_and_mean_by_hand(path):
    """``pool2d``: MAX_POOL_2D and AVERAGE_POOL_2D as TFLite defines them, by hand: the taps inside
    the input only (a "SAME" window at the border averages fewer), in order (the mean's float32 sum
    tap by tap, times the float32 reciprocal of their count), a NaN left out of the maximum (a window
    of NaN only gives -inf) and kept by the mean, infinities kept, then the clamp of the fused
    activation; 37 channels, so that every path's vectors leave a tail."""
    module = kernel_paths.load(path)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 7, 9, 37)).astype(np.float32) * 4
    x[0, 1, 2, 3] = x[1, 6, 8, 36] = np.nan
    x[0, 0:2, 0:2, 5] = np.nan  # a whole VALID 2x2 window of NaN in channel 5
    x[1, 3, 4, 20], x[0, 5, 5, 0] = np.inf, -np.inf
    for (fh, fw, sh, sw), padding in (((2, 2, 2, 2), "VALID"), ((3, 3, 2, 2), "SAME"), ((3, 2, 1, 3), "SAME")):
        out_h = (7 - fh) // sh + 1 if padding == "VALID" else -(-7 // sh)
        out_w = (9 - fw) // sw + 1 if padding == "VALID" else -(-9 // sw)
        pad_top = max((out_h - 1) * sh + fh - 7, 0) // 2 if padding == "SAME" else 0
        pad_left = max((out_w - 1) * sw + fw - 9, 0) // 2 if padding == "SAME" else 0
        for kind in (0, 1):
            for low, high in ((-np.inf, np.inf), (0.0, 6.0)):
                want = np.empty((2, out_h, out_w, 37), np.float32)
                for b in range(2):
                    for oy in range(out_h):
                        for ox in range(out_w):
                            taps = [x[b, iy, ix] for iy in range(oy * sh - pad_top, oy * sh - pad_top + fh)
                                    for ix in range(ox * sw - pad_left, ox * sw - pad_left + fw)
                                    if 0 <= iy < 7 and 0 <= ix < 9]
                            if kind == 0:
                                v = np.where(np.isnan(taps), -np.inf, taps).max(axis=0).astype(np.float32)
                            else:
                                v = np.zeros(37, np.float32)
                                for tap in taps:
                                    v = v + tap
                                v = v * (np.float32(1) / np.float32(len(taps)))
                            want[b, oy, ox] = np.where(np.isnan(v), v, np.clip(v, low, high))
                got = np.full_like(want, 123.0)
                module.pool2d(x, [fh, fw, sh, sw, pad_top, pad_left], kind, low, high, got)
                np.testing.assert_array_equal(got, want, err_msg=f"{fh}x{fw}/{sh}x{sw} {padding} kind {kind} {low}")
                if padding == "VALID":  # the window of NaN only: the maximum -inf (0 after a ReLU), the mean NaN
                    corner = got[0, 0, 0, 5]
                    assert np.isnan(corner) if kind == 1 else corner == max(low, -np.inf)


@pytest.mark.parametrize("path", PATHS)
def test_heatmap_peaks_are_the_numpy_decoding_bit_for_bit(path):
    """The kernels' ``heatmap_peaks`` (what ``decode_heatmaps_array`` runs on NumPy arrays) gives
    ``decode_heatmaps_with(maps, np)``'s points and scores bit for bit: map counts below, at and
    above a vector's width (68: the last vector overlapping), ties, peaks on the border, equal
    neighbours, NaNs (the first is the peak, as ``numpy.argmax`` has it; a NaN neighbour makes its
    shift NaN); a 1-pixel-wide map. Wrong output shapes are refused."""
    from larq_landmarks.runtime.decoding import decode_heatmaps_array, decode_heatmaps_with

    module = kernel_paths.load(path)
    rng = np.random.default_rng(12)
    for shape in [(2, 9, 11, 3), (1, 16, 16, 16), (2, 64, 64, 68), (1, 5, 1, 20)]:
        maps = rng.normal(size=shape).astype(np.float32)
        batch, height, width, count = shape
        maps[0, 2, 0, 1] = maps[0, 4, 0, 1] = 50.0  # a tie on the left border: the first wins,
        maps[0, 1, 0, 1] = maps[0, 3, 0, 1] = 1.0  # its neighbours above and below equal
        if width > 2:
            maps[0, 3, 1, 0] = np.nan  # the first NaN is the peak
            maps[0, 6, 1, 0] = np.nan
            maps[-1, 4, 1, 2] = maps[-1, 4, 2, 2] = np.nan  # the peak's right neighbour NaN: its x NaN
        if count > 3 and width > 6:
            maps[-1, 3, 5, count - 1] = 70.0  # equal neighbours: no shift
            maps[-1, 3, 4, count - 1] = maps[-1, 3, 6, count - 1] = 3.0
        points = np.full((batch, count, 2), 7.0, np.float32)
        scores = np.full((batch, count), 7.0, np.float32)
        module.heatmap_peaks(maps, points, scores)
        want_points, want_scores = decode_heatmaps_with(maps, np)
        np.testing.assert_array_equal(points, want_points, err_msg=str(shape))
        np.testing.assert_array_equal(scores, want_scores, err_msg=str(shape))
        assert np.isnan(points).any() == np.isnan(scores).any() == (width > 2)
        np.testing.assert_array_equal(points[0, 1], [0, 2])
        if width > 2:
            assert np.isnan(scores[0, 0]) and np.isnan(points[-1, 2, 0]) and abs(points[-1, 2, 1] - 4) <= 0.25
            np.testing.assert_allclose(points[0, 0], [1, 3], atol=0.25)
        if count > 3 and width > 6:
            assert points[-1, count - 1, 0] == 5 and abs(points[-1, count - 1, 1] - 3) <= 0.25
        if path == PATHS[0]:
            got = decode_heatmaps_array(maps)
            np.testing.assert_array_equal(got[0], want_points)
            np.testing.assert_array_equal(got[1], want_scores)
    with pytest.raises(ValueError, match=r"heatmap_peaks: points must be \(B, K, 2\)"):
        module.heatmap_peaks(maps, np.empty((1, 20, 3), np.float32), np.empty((1, 20), np.float32))
    # one image's maps without the batch axis: named as decode_heatmaps names it ('not enough
    # values to unpack' before), on NumPy and through the CuPy path's functions
    for xp in (np, fake_cupy):
        with pytest.raises(ValueError, match=r"heatmaps must have shape \(batch, H, W, K\), got \(16, 16, 68\)"):
            decode_heatmaps_array(xp.asarray(np.zeros((16, 16, 68), np.float32)), xp)
