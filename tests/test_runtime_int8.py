"""The runtime on files with int8 activations (``export.convert(..., int8_calibration=...)``): the
requantising kernel by hand, every op of such a file against TFLite's integer arithmetic written
out in NumPy, whole files against LCE's interpreter with XNNPACK's int8 kernels, and the errors."""
import functools
import warnings

import numpy as np
import pytest
import tensorflow as tf

import larq as lq

from larq_landmarks import export, heatmaps as hm, models
from larq_landmarks.runtime import Engine, UnsupportedModelError, available_kernels, cuda, ops
from larq_landmarks.runtime import engine as engine_module
from larq_landmarks.runtime import kernels as kernel_paths
from larq_landmarks.runtime.graph import Graph, Operator, Tensor
from larq_landmarks.synthetic import trained_like_batch_norm

import fake_cupy
from binary_reference import CASES, bconv_graph, pack_bits, reference_accumulators

PATHS = available_kernels()
NONE = np.zeros(0, np.float32)


def _requantize(kernels, a, scale, shift=0.0, op=0, add=0.0, low=-128.0, high=127.0, subtract=0.0, rounded=True,
                b=NONE):
    channels = a.shape[-1]
    scale, shift = (np.broadcast_to(np.float32(v), (channels,)).copy() for v in (scale, shift))
    out = np.empty_like(a)
    kernels.requantize(a, b, scale, shift, op, add, low, high, subtract, rounded, out)
    return out


@pytest.mark.parametrize("path", PATHS)
def test_requantize_rounds_half_away_from_zero_the_code_or_q(path):
    """``out = clamp(round(v + add), low, high) - subtract``: ties away from zero (TFLite's
    TfLiteRound), just below a tie down, the range's ends, NaN to the top; rounding the code
    (add 0) and rounding q (add and subtract the zero point 3) differ exactly at the ties whose
    shifted value changes sign; the three forms of v; no rounding at all."""
    k = kernel_paths.load(path)
    below = np.nextafter(np.float32(2.5), np.float32(0))
    x = np.array([[0.5, -0.5, 1.5, -1.5, below, -below, 126.6, -200.0, np.nan, 0.49999997]], np.float32)
    np.testing.assert_array_equal(_requantize(k, x, 1.0), [[1, -1, 2, -2, 2, -2, 127, -128, 127, 0]])
    # q with zero point 3: round(v + 3) - 3 within [-128, 127] in q; v + 3 is a float32 sum, which
    # takes the values just below 2.5 and 0.5 onto the ties 5.5 and 3.5 (as LCE's bias holding the
    # zero point does)
    np.testing.assert_array_equal(_requantize(k, x, 1.0, add=3.0, subtract=3.0),
                                  [[1, 0, 2, -1, 3, -2, 124, -131, 124, 1]])
    a = np.array([[1.0, 2.0, -3.0, 5.0]], np.float32)
    b = np.array([[1.0, 0.0, 1.0, -2.0]], np.float32)
    scale = np.array([0.25, 0.75, 0.5, 0.1], np.float32)
    out = np.empty_like(a)
    k.requantize(a, NONE, scale, np.array([0.25, 0.0, 0.0, 0.0], np.float32), 0, 0.0, -128.0, 127.0, 0.0, True, out)
    np.testing.assert_array_equal(out, [[1, 2, -2, 1]])  # 0.5, 1.5, -1.5, 0.5000000074
    k.requantize(a, b, scale, np.full(4, 0.25, np.float32), 1, 0.0, -128.0, 127.0, 0.0, True, out)
    np.testing.assert_array_equal(out, [[1, 2, -1, 0]])  # 0.5, 1.5, -1.25, 0
    k.requantize(a, b, scale, np.zeros(4, np.float32), 2, 0.0, -128.0, 127.0, 0.0, True, out)
    np.testing.assert_array_equal(out, [[0, 0, -2, -1]])  # 0.25, 0, -1.5, -1.0000000149
    k.requantize(a, NONE, scale, np.zeros(4, np.float32), 0, 0.0, 0.0, 0.0, 0.0, False, out)
    np.testing.assert_array_equal(out, a * scale)
    # many rows (several tasks), per-channel constants: NumPy's float32 arithmetic, rounded by hand
    rng = np.random.default_rng(0)
    big = rng.integers(-255, 256, (3, 37, 41, 24)).astype(np.float32)
    other = rng.integers(-255, 256, big.shape).astype(np.float32)
    scale, shift = rng.uniform(-2, 2, 24).astype(np.float32), rng.uniform(-50, 50, 24).astype(np.float32)
    out = np.empty_like(big)
    k.requantize(big, other, scale, shift, 1, 0.0, -100.0, 90.0, 0.0, True, out)
    v = np.clip((big * scale + other * shift).astype(np.float64), -100, 90)
    np.testing.assert_array_equal(out, np.sign(v) * np.floor(np.abs(v) + 0.5))
    # few channels (an image's 3 at the QUANTIZE in): the kernel runs rows of 21 pixels with the
    # constants repeated; 70 pixels are 3 such rows and 7 left over
    image = rng.uniform(-300, 300, (2, 7, 5, 3)).astype(np.float32)
    scale3, shift3 = np.array([0.5, -1.25, 2.0], np.float32), np.array([3.0, 0.0, -7.5], np.float32)
    out = np.empty_like(image)
    k.requantize(image, NONE, scale3, shift3, 0, 0.0, -128.0, 127.0, 0.0, True, out)
    np.testing.assert_array_equal(out, _round(np.clip((image * scale3 + shift3).astype(np.float64), -128, 127)))
    for bad in ((NONE, scale[:3], shift[:3]), (other[:1], scale, shift)):
        with pytest.raises(ValueError, match="requantize: shapes"):
            k.requantize(big, bad[0], bad[1], bad[2], 1, 0.0, -128.0, 127.0, 0.0, True, out)


def _round(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _int8_codes(graph, index):
    tensor = graph.tensors[index]
    return float(tensor.quantization[0][0]), int(tensor.quantization[1][0])


def _unpack(words, channels):
    return np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[..., :channels]


def _tflite_reference(graph, op, values):
    """The op's output as TFLite's (and LCE's) integer kernels define it, from its inputs in
    ``values``, in float64: ``(expected, v)``, the output (codes, as the runtime holds them; bits
    for LceQuantize) and what was rounded (None where nothing is)."""
    t = graph.tensors
    name, ins = op.name, [values[i] if t[i].data is None else t[i].data for i in op.inputs if i >= 0]
    out = op.outputs[0]
    if name == "DEQUANTIZE":
        return ins[0] * _int8_codes(graph, op.inputs[0])[0], None
    if name == "LceQuantize":
        return pack_bits((ins[0] < 0).astype(np.uint8)), None
    if name in ("CONCATENATION", "MAX_POOL_2D", "RESIZE_NEAREST_NEIGHBOR", "PAD"):  # moves and compares codes
        if name == "CONCATENATION":
            return np.concatenate(ins, axis=-1), None
        if name == "PAD":  # with the zero point: code 0
            return np.pad(ins[0], ins[1]), None
        if name == "RESIZE_NEAREST_NEIGHBOR":
            return ins[0].repeat(2, axis=1).repeat(2, axis=2), None
        b, h, w, c = ins[0].shape
        return ins[0].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4)), None
    s_out, zero_point = _int8_codes(graph, out)
    if name == "QUANTIZE":
        v = ins[0].astype(np.float64) / s_out
    elif name == "CONV_2D":
        (s_in, _), weights = _int8_codes(graph, op.inputs[0]), ins[1].astype(np.int64)
        cout, fh, fw, _ = weights.shape
        x = np.pad(ins[0].astype(np.int64), ((0, 0), (fh // 2, fh // 2), (fw // 2, fw // 2), (0, 0)))
        height, width = ins[0].shape[1:3]
        acc = ins[2].astype(np.int64) + sum(x[:, dy:dy + height, dx:dx + width] @ weights[:, dy, dx].T
                                            for dy in range(fh) for dx in range(fw))
        v = acc * (s_in * t[op.inputs[1]].quantization[0].astype(np.float64) / s_out)
    elif name in ("ADD", "MUL"):
        (s1, z1), (s2, z2) = _int8_codes(graph, op.inputs[0]), _int8_codes(graph, op.inputs[1])
        c1, c2 = (ins[i].astype(np.float64) - (z if t[op.inputs[i]].data is not None else 0)
                  for i, z in ((0, z1), (1, z2)))
        v = s1 / s_out * c1 + s2 / s_out * c2 if name == "ADD" else s1 * s2 / s_out * (c1 * c2)
    elif name == "RELU":
        v = ins[0].astype(np.float64) * _int8_codes(graph, op.inputs[0])[0] / s_out
        return np.clip(_round(v) + zero_point, max(-128, zero_point), 127) - zero_point, v
    elif name == "AVERAGE_POOL_2D":  # TFLite rounds the mean of q
        b, h, w, c = ins[0].shape
        v = (ins[0].astype(np.float64) + zero_point).reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)) - zero_point
        return np.clip(_round(v + zero_point), -128, 127) - zero_point, v
    elif name == "LceBconv2d":  # LCE: the conv of signs times the multiplier, plus the bias, over the scale, q rounded
        filters, cin = ins[1], op.options["channels_in"]
        acc = reference_accumulators(_unpack(ins[0], cin), _unpack(filters, cin), 1, True, 1)
        signs = filters.shape[1] * filters.shape[2] * cin - 2 * acc
        post_mul, post_bias = (a.astype(np.float64) for a in ins[2:4])
        v = (signs * post_mul + post_bias) / s_out
        return np.clip(_round(v + zero_point), -128, 127) - zero_point, v
    else:
        raise AssertionError(f"no reference for {name}")
    relu = op.options is not None and op.options.FusedActivationFunction() == 1
    low = max(-128, zero_point) if relu else -128
    return np.clip(_round(v) + zero_point, low, 127) - zero_point, v


def _every_tensor(engine, images):
    """Run ``engine``'s steps, keeping every tensor."""
    values = ops.Values(len(engine.graph.tensors), {})
    values[engine.graph.inputs[0]] = images
    for step in engine._steps:
        step(values)
    return values


def _ops_model():
    """A model whose int8 file has every op the runtime runs for int8 files."""
    tf.keras.utils.set_random_seed(4)
    L = tf.keras.layers
    kw = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
              use_bias=False, pad_values=1.0, padding="same")
    x = tf.keras.Input((16, 16, 3), batch_size=1)
    y = L.Conv2D(24, 3, padding="same", activation="relu")(x)
    skip = L.Conv2D(40, 1)(y)
    y = lq.layers.QuantConv2D(40, 3, **kw)(L.BatchNormalization()(y))
    y = L.MaxPool2D()(L.Add()([y, skip]))
    y = L.Concatenate()([y, lq.layers.QuantConv2D(8, 3, **kw)(L.BatchNormalization()(y))])
    y = L.ReLU()(L.UpSampling2D()(L.AveragePooling2D()(y)))
    return trained_like_batch_norm(tf.keras.Model(x, L.Conv2D(5, 1)(L.ZeroPadding2D(1)(y))))


@pytest.fixture(scope="module")
def ops_file():
    calibration = np.random.default_rng(1).uniform(size=(8, 16, 16, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export.convert(_ops_model(), int8_calibration=calibration)


@pytest.mark.parametrize("path", PATHS + ["avx2-pairs"] * ("avx2" in PATHS))
def test_every_int8_op_is_tflites_integer_arithmetic(ops_file, path, monkeypatch):
    """Each op of an int8 file, from the runtime's own inputs to it, against its TFLite / LCE
    definition in exact arithmetic (above): equal, but where the exact value lies within 1e-4 of a
    rounding tie (float32 rounds the runtime's scale products), at most 1 in 1000 values. The
    batch norms' MUL and ADD before an LceQuantize are folded into its threshold: its bits are
    checked against theirs, computed exactly. The convolutions run on the int8 kernels (VNNI's
    form, the pairs form) where the path has them, in float32 on the portable one. Each op is its
    own step here (``fuse_blocks=False``); the plan with ops done in others gives the same output."""
    if path == "avx2-pairs":  # the int8 convolutions' 16-bit form, as on AVX2 CPUs without AVX-VNNI
        monkeypatch.setenv(kernel_paths.NO_VNNI, "1")
        path = "avx2"
    engine = Engine(ops_file, kernels=path, fuse_blocks=False)
    names = {op.name for op in engine.graph.operators}
    assert names == {"QUANTIZE", "CONV_2D", "MUL", "ADD", "LceQuantize", "LceBconv2d", "MAX_POOL_2D",
                     "CONCATENATION", "RESIZE_NEAREST_NEIGHBOR", "AVERAGE_POOL_2D", "RELU", "PAD", "DEQUANTIZE"}, names
    images = np.random.default_rng(2).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    values = _every_tensor(engine, images)
    checked, folded = 0, []
    for op in engine.graph.operators:
        expected, v = _tflite_reference(engine.graph, op, values)
        got = values[op.outputs[0]]
        if got is None:  # done inside the op that reads it (a batch norm before an LceQuantize): its result, exact
            values[op.outputs[0]] = expected
            folded.append(op.name)
            continue
        assert got.shape == expected.shape, op.name
        if op.name == "DEQUANTIZE":
            np.testing.assert_allclose(got, expected, rtol=1e-6)
            continue
        differ = got != expected
        if v is not None and differ.any():
            near_tie = np.abs(np.abs(v - np.trunc(v)) - 0.5) < 1e-4
            assert near_tie[differ].all() and differ.mean() <= 1e-3, (op.index, op.name, differ.mean())
            assert np.abs(got - expected).max() == 1, op.name
        else:
            assert not differ.any(), (op.index, op.name)
        checked += got.size
    assert checked > 10000 and folded == ["MUL", "ADD"] * 2
    np.testing.assert_allclose(engine.predict(images), values[engine.graph.outputs[0]], rtol=0, atol=0)
    fused = Engine(ops_file, kernels=path)
    assert len(fused._steps) < len(engine._steps)
    np.testing.assert_array_equal(fused.predict(images), values[engine.graph.outputs[0]])


def _requantize_with(module, x, constants):
    """``requantize``'s op 0 with ``_requantize_constants``' constants, into a new array."""
    scale, shift, add, low, high, subtract = constants
    out = np.empty_like(x)
    module.requantize(x, NONE, scale, shift, 0, add, low, high, subtract, True, out)
    return out


def _int8_conv_forms(module, zero_point: int) -> list:
    """An int8 file's convolution as the engine may run it on ``module``: ``(name, convolve,
    prepare, keyword arguments)`` in float32, and on the int8 kernels where the path has them (the
    input codes' range given, for inputs of ``zero_point``)."""
    forms = [("float32", module.conv2d, module.prepare_float_weights, {})]
    if "int8" in kernel_paths.reduced_precisions(module):
        forms.append(("int8", lambda x, prepared, *args, **kwargs: module.conv2d_int8(x, *prepared, *args, **kwargs),
                      functools.partial(module.prepare_float_weights_int8, vnni=kernel_paths.int8_vnni(module)),
                      {"input_range": [-128.0 - zero_point, 127.0 - zero_point]}))
    return forms


@pytest.mark.parametrize("path", PATHS)
def test_int8_conv_requantises_its_input_and_output_as_the_separate_passes_do(path):
    """An int8 file's convolution with ``requantize`` (its output codes, each task's rows as it
    writes them, then the bits its LceQuantize packs from them) and ``input_requantize`` (its batch
    norm's MUL and ADD, each requantising the input codes as the convolution reads them): bit for bit
    ``requantize`` run on the input twice, the convolution, ``requantize`` on its output and
    ``bitpack``; on the int8 kernels (the codes' range given) where the path has them, in float32
    on every path; 1x1, 3x3 and 7x7 (an image's 3 channels, QUANTIZE first), more pixels than a
    task's 96, an ADD's RELU range."""
    rng = np.random.default_rng(21)
    module = kernel_paths.load(path)
    forms = _int8_conv_forms(module, -9)  # the ADD's codes: zero point -9
    for (height, width), cin, cout, k in [((10, 13), 24, 40, 1), ((7, 9), 16, 8, 3), ((11, 12), 3, 8, 7)]:
        if cin == 3:  # an image's float values, the first step the QUANTIZE (1/255 a code, zero point 3)
            x = rng.uniform(-0.1, 1.1, size=(2, height, width, cin)).astype(np.float32)
            mul = ops._requantize_constants(module, cin, 255.0, 0.0, 3)
        else:  # codes (zero point 5), the first step a MUL by a constant a channel
            x = rng.integers(-128 - 5, 128 - 5, size=(2, height, width, cin)).astype(np.float32)
            mul = ops._requantize_constants(module, cin, rng.uniform(0.2, 1.5, cin), 0.0, 3)
        add = ops._requantize_constants(module, cin, rng.uniform(0.8, 1.2, cin), rng.uniform(-20, 20, cin), -9,
                                        (-9, 127))  # RELU: q from the zero point up
        filters = rng.integers(-127, 128, size=(cout, k, k, cin)).astype(np.float32)
        filters[:, 0, 0, 0] = 127  # each channel's largest weight 127, as TFLite's converter writes them
        bias = rng.integers(-3000, 3000, size=cout).astype(np.float32)
        out = ops._requantize_constants(module, cout, rng.uniform(0.001, 0.01, cout), 0.0, 4)
        geometry = [k, k, 1, 1, 1, 1, k // 2, k // 2]
        threshold = rng.integers(-20, 20, cout).astype(np.float32)
        pack_m, pack_b = np.where(rng.uniform(size=cout) < 0.5, 1.0, -1.0).astype(np.float32), -threshold
        for precision, convolve, prepare, kwargs in forms:
            weights = prepare(filters)
            args = (bias, geometry, -np.inf, np.inf, [], NONE, NONE, -np.inf, np.inf)
            codes = _requantize_with(module, _requantize_with(module, x, mul), add)
            full = np.empty((2, height, width, cout), np.float32)
            convolve(codes, weights, *args, full, **kwargs)
            want = _requantize_with(module, full, out)
            want_bits = np.empty((2, height, width, (cout + 31) // 32), np.int32)
            module.bitpack(want, pack_m, pack_b, want_bits)
            got, bits = np.full_like(want, 7.0), np.zeros_like(want_bits)
            convolve(x, weights, *args, got, requantize=out, input_requantize=[mul, add], packed=bits,
                     pack_multiplier=pack_m, pack_bias=pack_b, **kwargs)
            np.testing.assert_array_equal(got, want, err_msg=f"{precision}, {k}x{k}")
            np.testing.assert_array_equal(bits, want_bits)
            assert len(np.unique(got)) > 50 and 0 < np.mean(_unpack(bits, cout)) < 1
    with pytest.raises(ValueError, match="conv2d: residual_requantize needs requantize and a residual"):
        module.conv2d(x, module.prepare_float_weights(filters), *args, full, residual_requantize=out)
    with pytest.raises(ValueError, match="conv2d: requantize scale or shift size"):
        module.conv2d(x, module.prepare_float_weights(filters), *args, full, requantize=mul)
    with pytest.raises(ValueError, match="conv2d: requantize needs 6 values"):
        module.conv2d(x, module.prepare_float_weights(filters), *args, full, input_requantize=[mul[:5]])
    with pytest.raises(ValueError, match="conv2d: requantize scale and shift must be float32 arrays"):
        module.conv2d(x, module.prepare_float_weights(filters), *args, full, requantize=(list(out[0]),) + out[1:])


@pytest.mark.parametrize("path", PATHS)
def test_int8_conv_adds_its_residual_and_pools_its_codes_as_the_separate_passes_do(path):
    """An int8 file's downsampling block's skip convolution with ``requantize``,
    ``residual_requantize`` and ``pool_window``: its codes, the int8 ADD of the block's
    concatenation (two parts, 32 and 16 channels) and the 2x2 max pool after it, then the bits of
    the LceQuantize after that, in one pass: bit for bit the convolution, ``requantize`` on its
    output, ``requantize``'s op 1 (the codes and the concatenation, each rescaled, rounded into a
    RELU's range), ``pool2d`` on the codes and ``bitpack``; without the pool too, and on the int8
    kernels where the path has them."""
    rng = np.random.default_rng(41)
    module = kernel_paths.load(path)
    forms = _int8_conv_forms(module, 2)  # the input's codes: zero point 2
    cin, cout, height, width = 24, 48, 14, 20  # 280 pixels an image: tasks of 96 rows across rows of 20
    x = rng.integers(-128 + 2, 128 + 2, size=(2, height, width, cin)).astype(np.float32)
    filters = rng.integers(-127, 128, size=(cout, 1, 1, cin)).astype(np.float32)
    filters[:, 0, 0, 0] = 127
    bias = rng.integers(-3000, 3000, size=cout).astype(np.float32)
    out = ops._requantize_constants(module, cout, rng.uniform(0.001, 0.01, cout), 0.0, 4)
    parts = [rng.integers(-128 + 6, 128 + 6, size=(2, height, width, c)).astype(np.float32) for c in (32, 16)]
    add = ops._requantize_constants(module, cout, 0.7, 0.45, -6, (-6, 127))  # the ADD's RELU: q from its zero point
    scale, shift, plus, low, high, subtract = add
    pack_m, pack_b = np.ones(cout, np.float32), rng.integers(-3, 3, cout).astype(np.float32)
    args = (bias, [1, 1, 1, 1, 1, 1, 0, 0], -np.inf, np.inf)
    for precision, convolve, prepare, kwargs in forms:
        weights = prepare(filters)
        full = np.empty((2, height, width, cout), np.float32)
        convolve(x, weights, *args, [], NONE, NONE, -np.inf, np.inf, full, **kwargs)
        added = np.empty_like(full)
        module.requantize(_requantize_with(module, full, out), np.concatenate(parts, -1), scale, shift, 1, plus, low,
                          high, subtract, True, added)
        for window in ([], [2, 2]):
            want = added
            if window:
                want = np.empty((2, height // 2, width // 2, cout), np.float32)
                module.pool2d(added, [2, 2, 2, 2, 0, 0], 0, -np.inf, np.inf, want)
            want_bits = np.empty(want.shape[:3] + (2,), np.int32)
            module.bitpack(want, pack_m, pack_b, want_bits)
            got, bits = np.full_like(want, 7.0), np.zeros_like(want_bits)
            convolve(x, weights, *args, parts, NONE, NONE, -np.inf, np.inf, got, pool_window=window, requantize=out,
                     residual_requantize=add, packed=bits, pack_multiplier=pack_m, pack_bias=pack_b, **kwargs)
            np.testing.assert_array_equal(got, want, err_msg=f"{precision}, pool {window}")
            np.testing.assert_array_equal(bits, want_bits)
        assert added.min() == 0 and len(np.unique(added)) > 50 and len(np.unique(want)) > 30


@pytest.mark.parametrize("path", PATHS)
def test_int8_resize_does_the_add_after_it_as_the_add_step_does(path):
    """``resize_nearest`` with ``requantize``: an int8 file's upsampling and the ADD of its output
    and a residual (each input rescaled to the sum's scale, rounded into its range, here a RELU's),
    then the bits of the LceQuantize after it: bit for bit the gather, ``requantize``'s op 1 (the
    resized codes the ADD's first input or its second) and ``bitpack``."""
    rng = np.random.default_rng(31)
    module = kernel_paths.load(path)
    x = rng.integers(-120, 120, size=(2, 5, 6, 40)).astype(np.float32)
    residual = rng.integers(-120, 120, size=(2, 10, 12, 40)).astype(np.float32)
    rows, cols = np.arange(10, dtype=np.int32) // 2, np.arange(12, dtype=np.int32) // 2
    resized = np.ascontiguousarray(x[:, rows][:, :, cols])
    s_resized, s_residual = rng.uniform(0.3, 0.9, 2)
    pack_m, pack_b = np.ones(40, np.float32), rng.integers(-5, 5, 40).astype(np.float32)
    for first in (resized, residual):  # the ADD's first input
        second = residual if first is resized else resized
        scales = (s_resized, s_residual) if first is resized else (s_residual, s_resized)
        want = np.empty_like(residual)
        constants = ops._requantize_constants(module, 40, scales[0], scales[1], -7, (-7, 127))
        scale, shift, add, low, high, subtract = constants
        module.requantize(first, second, scale, shift, 1, add, low, high, subtract, True, want)
        want_bits = np.empty((2, 10, 12, 2), np.int32)
        module.bitpack(want, pack_m, pack_b, want_bits)
        mine = constants if first is resized else (shift, scale) + constants[2:]
        got, bits = np.full_like(want, 3.0), np.zeros_like(want_bits)
        module.resize_nearest(x, rows, cols, residual, -np.inf, np.inf, got, packed=bits, pack_multiplier=pack_m,
                              pack_bias=pack_b, requantize=mine)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(bits, want_bits)
        assert want.min() == 0 and len(np.unique(want)) > 50  # the RELU's floor (q = -7, code 0) reached
    with pytest.raises(ValueError, match="resize_nearest: requantize needs a residual"):
        module.resize_nearest(x, rows, cols, NONE, -np.inf, np.inf, got, requantize=constants)


def _landmarks(heat):
    return hm.heatmap_to_input(hm.decode_heatmaps(heat)[0]).numpy()


def _int8_bconv_add_graph(filters, cin, stride, same, pad_value, post_mul, post_bias, scales):
    """An int8 LceBconv2d (output 5) and the ADD of its output and a residual (7) into 6, with
    ``scales`` = (output's, sum's, residual's) and zero points 3, -5, 7; tensor 8: the residual's
    channels that meet the convolution's (the ADD step's other input)."""
    graph, op = bconv_graph(filters, cin, stride, same, pad_value, "float", post_mul, post_bias)
    q = [(np.array([scale], np.float32), np.array([zero], np.int64)) for scale, zero in zip(scales, (3, -5, 7))]
    tensors = graph.tensors[:5] + [Tensor(5, "y", (1,), np.dtype(np.int8), None, q[0]),
                                   Tensor(6, "sum", (1,), np.dtype(np.int8), None, q[1]),
                                   Tensor(7, "residual", (1,), np.dtype(np.int8), None, q[2]),
                                   Tensor(8, "residual part", (1,), np.dtype(np.int8), None, q[2])]
    add = Operator(1, "ADD", [5, 8], [6], None)
    return Graph("test", tensors, [op, add], [0], [6]), op, add


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cin,cout,k,stride,same,pad_value", CASES)
def test_int8_binary_conv_does_the_add_after_its_concatenation_as_the_add_step_does(path, cin, cout, k, stride,
                                                                                   same, pad_value):
    """An int8 file's binary convolution writing its part of a CONCATENATION with the ADD after it
    (``into`` with a residual): its int8 codes rescaled to the sum's scale, plus the residual's,
    rounded again, bit for bit what the convolution and then the ADD as its own step give; with
    scales that put many sums on a tie (0.5 and 0.25 of the sum's), exactly the sums rounded half
    away from zero by hand; the concatenation's other channels left alone."""
    module = kernel_paths.load(path)
    rng = np.random.default_rng(cin * 1000 + cout)
    x_bits = rng.integers(0, 2, (2, 9, 11, cin), dtype=np.uint8)
    filters = pack_bits(rng.integers(0, 2, (cout, k, k, cin), dtype=np.uint8))
    s_y = 0.0625
    post_mul = (s_y * 60 / np.sqrt(k * k * cin) * rng.uniform(0.5, 1.5, cout) * rng.choice([-1, 1], cout))
    post_bias = rng.normal(0, s_y * 20, cout)
    for scales in ((s_y, 0.125, 0.03125), (s_y, 0.0917, 0.0433)):
        graph, op, add = _int8_bconv_add_graph(filters, cin, stride, same, pad_value, post_mul.astype(np.float32),
                                               post_bias.astype(np.float32), scales)
        values = ops.Values(9, {})
        values[0] = pack_bits(x_bits)
        ops.lce_bconv2d(graph, op, module)(values)
        codes = values[5]
        assert codes.min() == -128 - 3 and codes.max() == 127 - 3  # clamped at both ends somewhere
        residual = rng.integers(-128, 128, codes.shape[:3] + (cout + 7,)).astype(np.float32) - 7
        values[8] = residual[..., 3:3 + cout]
        ops.add(graph, add, module)(values)  # the ADD as its own step
        separate = values[6]
        values[7], values[6], values[5] = residual, np.full(residual.shape, 5.0, np.float32), None
        ops.lce_bconv2d(graph, op, module, into=(6, 3, cout + 7, 7))(values)
        np.testing.assert_array_equal(values[6][..., 3:3 + cout], separate)
        assert (values[6][..., :3] == 5).all() and (values[6][..., 3 + cout:] == 5).all() and values[5] is None
        if scales[1] == 0.125:
            v = codes.astype(np.float64) * 0.5 + residual[..., 3:3 + cout] * 0.25
            ties = np.abs(v - np.trunc(v)) == 0.5
            assert ties.mean() > 0.2 and (v[ties] > 0).any() and (v[ties] < 0).any()  # many ties, both signs
            np.testing.assert_array_equal(separate, np.clip(_round(v), -128 + 5, 127 + 5))


@pytest.mark.parametrize("path", PATHS)
def test_int8_binary_conv_rounds_its_product_before_adding_the_bias(path):
    """An int8 output's q = float(2 * acc) * multiplier + bias is rounded op by op, the product and then
    the sum (as LCE computes it, and as its interpreter's outputs show), not as one FMA: each
    channel's bias puts the float32 sum of one pixel exactly on a tie where its exact sum is not,
    so that one rounding would take the other code in about half the channels (the AVX2 and AVX-512
    paths' did: 7% of one ste_sign network's int8 outputs, found by a fuzz run against XNNPACK).
    70 channels: a 64-channel block, a 6-channel one, the scalar tail on AVX2."""
    module = kernel_paths.load(path)
    rng = np.random.default_rng(11)
    cin, cout, zero = 64, 70, 3.0
    x_bits = rng.integers(0, 2, (1, 5, 6, cin), dtype=np.uint8)
    w_bits = rng.integers(0, 2, (cout, 3, 3, cin), dtype=np.uint8)
    # the kernel's transform of the XOR counts acc: float(2 * acc) * multiplier + bias (no clamp)
    acc = 2 * reference_accumulators(x_bits, w_bits, 1, True, 1).astype(np.float32)
    # products of a few hundred that the bias takes back to a small tie: the product's rounding
    # (up to 2^-16 there) is more than the tie's half unit in the last place (2^-20 at most)
    multiplier = rng.uniform(0.3, 0.45, cout).astype(np.float32)
    product = acc[0, 2, 3] * multiplier  # float32, rounded
    tie = rng.integers(0, 20, cout).astype(np.float32) + 0.5  # below the product: the bias is exact
    bias = (tie.astype(np.float64) - product.astype(np.float64)).astype(np.float32)
    assert (product + bias == tie).all() and (np.abs(product) > 128).all()  # float32 op by op: a tie
    exact = acc[0, 2, 3].astype(np.float64) * multiplier + bias.astype(np.float64)
    fused = exact.astype(np.float32)  # one FMA: the exact sum, rounded once
    assert 20 <= np.sum(fused < tie) and 20 <= np.sum(fused > tie)  # in these channels off the tie
    conv = module.binary_conv2d(module.prepare_binary_weights(pack_bits(w_bits)), [cin, cout, 3, 3, 1, 1, 1, 1, 1],
                                multiplier, bias, 0, 2 * 9 * cin, np.zeros(0, np.int32),
                                w_bits.reshape(cout, 9, cin).sum(-1).T.astype(np.int32).copy(), NONE, NONE, False,
                                [zero], [])
    out = np.zeros(acc.shape, np.float32)
    conv(pack_bits(x_bits), out, 1, 1)
    np.testing.assert_array_equal(out, np.clip(_round(acc * multiplier + bias), -128, 127) - zero)
    np.testing.assert_array_equal(out[0, 2, 3], tie + 0.5 - zero)  # every tie away from zero


def test_int8_binary_conv_needs_both_zero_point_and_residual_add_for_an_int8_residual():
    module = kernel_paths.load(PATHS[0])
    filters = pack_bits(np.ones((4, 3, 3, 8), np.uint8))
    weights = module.prepare_binary_weights(filters)
    geometry, popcounts = [8, 4, 3, 3, 1, 1, 1, 1, 1], np.full((9, 4), 8, np.int32)
    args = (weights, geometry, np.ones(4, np.float32), np.zeros(4, np.float32), 0, 144, np.zeros(0, np.int32),
            popcounts)
    with pytest.raises(ValueError, match="residual_add needs an int8 output and 4 values"):
        module.binary_conv2d(*args, residual_add=[0.5, 0.25, -128.0, 127.0])
    with pytest.raises(ValueError, match="residual_add needs an int8 output and 4 values"):
        module.binary_conv2d(*args, output_zero_point=[0.0], residual_add=[0.5, 0.25, 127.0, -128.0])
    conv = module.binary_conv2d(*args, output_zero_point=[0.0])
    x, out = np.zeros((1, 4, 4, 1), np.int32), np.zeros((1, 4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="a residual for an int8 output needs residual_add"):
        conv(x, out, 1, 1, None, 0, np.zeros_like(out))


@pytest.fixture(scope="module")
def hpm_int8_file():
    """A named binary network's int8 file (channel counts not multiples of 32)."""
    tf.keras.utils.set_random_seed(0)
    model = trained_like_batch_norm(models.build_named("binary_hpm", 16, input_size=64, width=48, depth=2))
    calibration = np.random.default_rng(1).uniform(size=(8, 64, 64, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export.convert(model, int8_calibration=calibration)


def test_int8_file_runs_as_lce_with_xnnpack_runs_it(hpm_int8_file):
    """The runtime against LCE's interpreter with XNNPACK's int8 kernels: almost every output value
    the same, landmarks within half a pixel. (Without XNNPACK, TFLite's own int8 kernels round
    values within 0.005 of a tie otherwise; through the binary layers' signs that moves most values,
    as it moves them from XNNPACK's: docs/benchmarks.md.)"""
    images = np.random.default_rng(2).uniform(size=(4, 64, 64, 3)).astype(np.float32)
    xnnpack = export.interpreter(hpm_int8_file, use_xnnpack=True)
    expected = np.concatenate([xnnpack.predict(images[i:i + 1]) for i in range(len(images))])
    for path in PATHS:
        got = Engine(hpm_int8_file, kernels=path).predict(images)
        assert np.mean(got == expected) >= 0.99, path
        moved = np.abs(_landmarks(got) - _landmarks(expected)).max(-1)
        assert np.mean(moved <= 0.5) >= 0.98, path


BINARY_CONFIGS = [name for name, c in models.named_configurations().items() if c["kwargs"].get("binary", True)]


@pytest.mark.slow
@pytest.mark.parametrize("name", BINARY_CONFIGS)
def test_every_named_binary_configurations_int8_file_runs_as_xnnpack_runs_it(name):
    """Each named binary network's int8 file (RELUs, the authors' padding's PADV2 around float
    convolutions, bottlenecks, binary skips, average pools): at least 95% of the output values
    XNNPACK's (96.8-99.96% measured) and 99% of the landmarks within half a pixel of its (all of
    them measured; LCE's interpreter without XNNPACK: 34-84% from either)."""
    tf.keras.utils.set_random_seed(0)
    model = trained_like_batch_norm(models.build_named(name, 16, input_size=64, width=48, depth=2))
    calibration = np.random.default_rng(1).uniform(size=(4, 64, 64, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flatbuffer = export.convert(model, int8_calibration=calibration)
    images = np.random.default_rng(5).uniform(size=(8, 64, 64, 3)).astype(np.float32)
    xnnpack = export.interpreter(flatbuffer, use_xnnpack=True)
    expected = np.concatenate([xnnpack.predict(images[i:i + 1]) for i in range(len(images))])
    got = Engine(flatbuffer).predict(images)
    assert np.mean(got == expected) >= 0.95, export.op_counts(flatbuffer)
    assert np.mean(np.abs(_landmarks(got) - _landmarks(expected)).max(-1) <= 0.5) >= 0.99


@pytest.mark.parametrize("path", PATHS)
def test_int8_hpm_blocks_fused_give_the_unfused_plans_outputs(hpm_int8_file, path):
    """In an int8 file's HPM blocks the binary convolutions round their int8 outputs themselves,
    pack the next layer's bits from them (the batch norm between as its exact threshold) and write
    them into their CONCATENATION, doing the ADD of the block's residual after it where that is
    computed before them; the max pools, the stem convolution and the upsamplings pack the bits of
    the LceQuantize after them, the upsamplings do the ADD after them, the stem convolution the
    QUANTIZE before it, the skip convolutions their batch norm's MUL and ADD, and the stem block's
    (before a max pool) the ADD after it, the pool and the LceQuantize after that: the outputs bit
    for bit those of the plan where each of those is its own step, and of two threads."""
    images = np.random.default_rng(8).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    fused, plain = Engine(hpm_int8_file, kernels=path), Engine(hpm_int8_file, kernels=path, fuse_blocks=False)
    names, plain_names = ([name for name, _, _ in e.profile(images)] for e in (fused, plain))
    assert {"LceBconv2d+LceQuantize+CONCATENATION+ADD", "LceBconv2d+CONCATENATION+ADD"} <= set(names)
    assert "CONCATENATION" not in names and "CONCATENATION" in plain_names
    # the max pools, the stem and the upsamplings (with the ADD after them) pack the bits their
    # LceQuantize reads; the stem quantises the image and the skip convolutions do their batch
    # norm's MUL and ADD as they read their input
    assert {"MAX_POOL_2D+LceQuantize", "QUANTIZE+CONV_2D+LceQuantize",
            "RESIZE_NEAREST_NEIGHBOR+ADD+LceQuantize"} <= set(names)
    assert not {"MUL", "ADD", "QUANTIZE", "MAX_POOL_2D", "RESIZE_NEAREST_NEIGHBOR"} & set(names)
    assert names.count("BN+CONV_2D+ADD+MAX_POOL_2D+LceQuantize") == 1
    assert names.count("BN+CONV_2D") + 1 == plain_names.count("MUL") == 2
    assert names.count("ADD") + 4 <= plain_names.count("ADD") and len(plain_names) > len(names) + 10
    np.testing.assert_array_equal(fused.predict(images), plain.predict(images))
    threads = Engine(hpm_int8_file, kernels=path, num_threads=2)  # rows split between threads: the same
    np.testing.assert_array_equal(threads.predict(images), fused.predict(images))


def test_int8_downsampling_blocks_compute_their_skip_branch_before_their_binary_convolutions(
        hpm_int8_file, monkeypatch):
    """In an int8 file a block whose channel count changes adds a 1x1 CONV_2D's output (after its
    batch norm's MUL and ADD) to its concatenation, and the file computes that branch after the
    block's binary convolutions. The engine runs it before them, so that they do the ADD too: one
    ADD step fewer a block, and the outputs bit for bit those of the file's order (and of the plan
    without any fusion). The stem block's skip convolution, whose ADD a max pool reads, does that
    ADD itself instead, with the pool and the LceQuantize after it, at the ADD's place."""
    images = np.random.default_rng(12).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    hoisted = Engine(hpm_int8_file)
    monkeypatch.setattr(engine_module, "_hoisted_residuals", lambda graph, order, *args: order)
    in_file_order = Engine(hpm_int8_file)
    names, file_names = ([name for name, _, _ in e.profile(images)] for e in (hoisted, in_file_order))
    graph = hoisted.graph
    skips = [op.index for op in graph.operators if op.name == "CONV_2D"
             and any(reader.name == "ADD" for reader in graph.operators if op.outputs[0] in reader.inputs)]
    assert len(skips) == 2 and names.count("ADD") + 1 == file_names.count("ADD")
    stem, skip = skips
    for e, step_names in ((hoisted, names), (in_file_order, file_names)):
        at = [op.index for op in e._step_ops].index(stem)
        assert step_names[at] == "BN+CONV_2D+ADD+MAX_POOL_2D+LceQuantize" and e._step_ops[at - 1].name == "LceBconv2d"
    # the other skip CONV_2D runs earlier, before the block's binary convolutions, its batch norm's
    # MUL and ADD done as it reads its input (BN+CONV_2D)
    at, file_at = ([op.index for op in e._step_ops].index(skip) for e in (hoisted, in_file_order))
    assert at < file_at and in_file_order._step_ops[file_at - 1].name == "LceBconv2d"
    assert names[at] == file_names[file_at] == "BN+CONV_2D"
    assert [op.name for op in hoisted._step_ops[at:at + 2]] == ["CONV_2D", "LceBconv2d"]
    got = hoisted.predict(images)
    np.testing.assert_array_equal(got, in_file_order.predict(images))
    np.testing.assert_array_equal(got, Engine(hpm_int8_file, fuse_blocks=False).predict(images))


def test_hoisted_residuals_moves_only_a_branch_that_needs_nothing_after_the_first_part():
    """``_hoisted_residuals`` on small graphs: the ops computing a CONCATENATION + ADD's residual
    after the first part move to just before it, in their order, where they read the block's input
    only; not where the branch reads a part's output, or one of its ops is done inside another."""
    tensors = [Tensor(i, f"t{i}", (1, 4, 4, 8), np.float32, None) for i in range(9)]
    ops_list = [Operator(0, "LceBconv2d", [0], [1], {}),  # part 1 of x = t0
                Operator(1, "LceBconv2d", [1], [2], {}),  # part 2
                Operator(2, "MUL", [0], [3], None),  # the skip branch: x -> t3 -> t4 -> t5
                Operator(3, "ADD", [3], [4], None),
                Operator(4, "CONV_2D", [4], [5], None),
                Operator(5, "CONCATENATION", [1, 2], [6], None),
                Operator(6, "ADD", [6, 5], [7], None)]
    graph = Graph("g", tensors, ops_list, [0], [7])
    producers = {t: op for op in ops_list for t in op.outputs}
    residuals = {5: ([5], 7, 0)}
    order = engine_module._hoisted_residuals(graph, list(ops_list), residuals, set(), producers)
    assert [op.index for op in order] == [2, 3, 4, 0, 1, 5, 6]
    assert engine_module._hoisted_residuals(graph, list(ops_list), residuals, {3}, producers) == ops_list
    ops_list[2] = Operator(2, "MUL", [1], [3], None)  # the branch reads part 1's output
    producers = {t: op for op in ops_list for t in op.outputs}
    assert engine_module._hoisted_residuals(graph, list(ops_list), residuals, set(), producers) == ops_list


def test_int8_files_run_on_the_cpu_kernels_in_their_own_arithmetic_only(ops_file, monkeypatch):
    with pytest.raises(ValueError, match=r"float_precision='bfloat16' is for files with float32 activations; "
                                         r"model has int8 ones"):
        Engine(ops_file, float_precision="bfloat16")
    fake_cupy.install(monkeypatch)
    with pytest.raises(UnsupportedModelError, match="model: a file with int8 activations; the GPU kernels run "
                                                    "float32 files"):
        Engine(ops_file, kernels=cuda.PATHS[0])
