import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_landmarks import blocks, models
from larq_landmarks.models import BinaryHourglass
from tests.conftest import run_python

PAPER_PARAMETERS = 6.2e6


def test_default_model_reproduces_papers_parameter_count():
    model = BinaryHourglass(68)
    assert model.input_shape == (None, 256, 256, 3)
    assert model.output_shape == (None, 64, 64, 68)
    count = model.count_params()
    assert abs(count - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.03, count


def _hand_count_hpm(c_in, c):
    """3x3 convs C_in->C/2->C/4->C/4, BN (4 numbers per channel) before each, 1x1 skip if needed."""
    half, quarter = c - 2 * (c // 4), c // 4
    convs = 9 * (c_in * half + half * quarter + quarter * quarter)
    bns = 4 * (c_in + half + quarter)
    skip = 0 if c_in == c else c_in * c + 4 * c_in
    return convs + bns + skip


@pytest.mark.parametrize("c_in,c", [(64, 64), (32, 64), (48, 96)])
def test_hpm_block_parameter_count_matches_hand_count(c_in, c):
    inputs = tf.keras.Input((8, 8, c_in))
    model = tf.keras.Model(inputs, blocks.hpm_block(inputs, c))
    assert model.output_shape == (None, 8, 8, c)
    assert model.count_params() == _hand_count_hpm(c_in, c)


def test_bottleneck_block_parameter_count_matches_hand_count():
    inputs = tf.keras.Input((8, 8, 64))
    model = tf.keras.Model(inputs, blocks.bottleneck_block(inputs, 64))
    # 1x1 64->32, 3x3 32->32, 1x1 32->64, BN before each
    assert model.count_params() == 64 * 32 + 9 * 32 * 32 + 32 * 64 + 4 * (64 + 32 + 32)


def test_hpm_block_is_multi_scale_receptive_field_7():
    """Stages see 3x3, 5x5 and 7x7 windows: the gradient of the centre output of each stage's
    channels reaches exactly 1, 2 and 3 pixels away (positive weights and inputs keep every
    ReLU open, so no path is cut)."""
    inputs = tf.keras.Input((15, 15, 8))
    model = tf.keras.Model(inputs, blocks.hpm_block(inputs, 8, binary=False))
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            layer.set_weights([np.full(layer.kernel.shape, 0.01, np.float32)])
    x = tf.fill((1, 15, 15, 8), 1.0)
    for channels, radius in ((slice(0, 4), 1), (slice(4, 6), 2), (slice(6, 8), 3)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(model(x, training=False)[0, 7, 7, channels])
        grad = tf.reduce_sum(tf.abs(tape.gradient(y, x)[0]), -1).numpy()
        reached = np.argwhere(grad > 0)
        assert reached.min(0).tolist() == [7 - radius] * 2, channels
        assert reached.max(0).tolist() == [7 + radius] * 2, channels


def test_binary_blocks_use_larq_quantconv_configured_for_lce():
    model = BinaryHourglass(16, width=32, input_size=64, depth=2)
    quant = [l for l in model.layers if isinstance(l, lq.layers.QuantConv2D)]
    assert quant, "no binary convolutions"
    for layer in quant:
        assert layer.input_quantizer.__class__.__name__ == "ApproxSign"  # the default (docs/results.md)
        assert layer.kernel_quantizer.__class__.__name__ == "MagnitudeAwareSign"
        assert not layer.use_bias
        if layer.kernel_size == (3, 3):
            assert layer.pad_values == 1.0
    real = [l for l in model.layers if type(l) is tf.keras.layers.Conv2D]
    # real: stem, head 1x1, output, and the 1x1 skips where channels change (stem blocks 1, 3)
    assert sorted(l.name for l in real) == sorted(
        ["stem_conv", "hg1_head_conv", "stack_1", "stem_block1_skip_conv", "stem_block3_skip_conv"]
    )


def test_options_reach_the_layers():
    model = BinaryHourglass(
        16, width=32, input_size=64, depth=2, kernel_quantizer="ste_sign", pad_value=-1.0,
        binary_skip=True, relu=True, pooling="avg", input_quantizer="ste_sign",
    )
    quant = [l for l in model.layers if isinstance(l, lq.layers.QuantConv2D)]
    assert {l.kernel_quantizer.__class__.__name__ for l in quant} == {"SteSign"}
    assert {l.input_quantizer.__class__.__name__ for l in quant} == {"SteSign"}  # the papers'
    assert {l.pad_values for l in quant if l.kernel_size == (3, 3)} == {-1.0}
    assert "stem_block1_skip_bconv" in [l.name for l in quant]
    assert any(isinstance(l, tf.keras.layers.AveragePooling2D) for l in model.layers)
    assert not any(isinstance(l, tf.keras.layers.MaxPooling2D) for l in model.layers)
    assert sum(l.name.endswith("_relu") and "_s" in l.name for l in model.layers) > 0


def test_real_model_has_no_binary_layers():
    model = BinaryHourglass(16, width=32, input_size=64, depth=2, binary=False, block="bottleneck")
    assert not [l for l in model.layers if isinstance(l, lq.layers.QuantConv2D)]


@pytest.mark.parametrize("block", ["hpm", "bottleneck"])
def test_real_blocks_with_a_relu_after_each_convolution_build(block):
    """A real convolution's ReLU before it and the block's ReLU after it (``relu=True``) had one
    name: Keras refused the model ("The name ... is used 2 times")."""
    model = BinaryHourglass(16, width=32, input_size=32, depth=1, binary=False, relu=True, block=block)
    names = [l.name for l in model.layers]
    assert len(names) == len(set(names))
    stage = "s1" if block == "hpm" else "c1"
    assert {f"stem_block1_{stage}_input_relu", f"stem_block1_{stage}_relu"} <= set(names)
    assert model.get_layer(f"stem_block1_{stage}_relu").input is model.get_layer(f"stem_block1_{stage}_conv").output


def test_stacks_and_segmentation_outputs():
    model = BinaryHourglass(16, num_stacks=3, width=32, input_size=64, depth=2)
    assert [o.shape.as_list() for o in model.outputs] == [[None, 16, 16, 16]] * 3
    assert [n for n in model.output_names] == ["stack_1", "stack_2", "stack_3"]
    seg = BinaryHourglass(7, width=32, input_size=64, depth=2, task="segmentation")
    assert seg.output_shape == (None, 16, 16, 7)


@pytest.mark.slow
def test_named_configurations_build_and_differ():
    configs = models.named_configurations()
    assert {"binary_hpm", "binary_bottleneck", "real_bottleneck", "real_hpm", "binary_hpm_relu",
            "binary_hpm_avgpool"} <= set(configs)
    counts = {}
    for name in configs:
        model = models.build_named(name, 68, width=32, input_size=64, depth=2)
        assert model.name == name
        counts[name] = model.count_params()
    assert counts["binary_hpm"] == counts["real_hpm"]  # same shapes, quantized or not
    assert counts["binary_bottleneck"] < counts["binary_hpm"]
    full = {n: models.build_named(n, 68).count_params() for n in ("binary_hpm", "binary_bottleneck_matched")}
    assert abs(full["binary_bottleneck_matched"] / full["binary_hpm"] - 1) < 0.05
    with pytest.raises(ValueError, match="binary_hpm"):
        models.build_named("nope", 68)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(block="resnet"), "block"),
        (dict(pooling="min"), "pooling"),
        (dict(width=30), "width"),
        (dict(input_size=100), "input_size"),
        (dict(input_size=64, depth=5), "input_size"),
        (dict(num_stacks=0), "num_stacks"),
        (dict(task="depth"), "task"),
        (dict(kernel_quantizer="dorefa"), "kernel_quantizer"),
        (dict(input_quantizer="dorefa"), "input_quantizer"),
        (dict(pad_value=0.0), "pad_value"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        BinaryHourglass(68, **kwargs)


@pytest.mark.slow
def test_save_and_load_round_trip_without_custom_objects(tmp_path):
    model = BinaryHourglass(16, num_stacks=2, width=32, input_size=64, depth=2)
    # move the batch-norm statistics away from their initial values so they matter
    x = np.random.default_rng(0).uniform(size=(4, 64, 64, 3)).astype(np.float32)
    model.compile(optimizer="rmsprop", loss="mse")
    model.fit(x, [model.predict(x, verbose=0)[0] * 0 + 0.1] * 2, epochs=1, verbose=0)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    got = loaded.predict(x, verbose=0)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_import_sets_legacy_keras_in_a_fresh_interpreter():
    result = run_python(
        "import larq_landmarks, tensorflow as tf, os;"
        "print(tf.keras.Model.__module__.split('.')[0], os.environ['TF_USE_LEGACY_KERAS'])"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["tf_keras", "1"]


def test_import_lets_keras_load_a_saved_binary_model_in_a_fresh_interpreter(tmp_path):
    """The tutorials' ``import larq_landmarks`` then ``tf.keras.models.load_model``: Larq's layers
    and quantizers must be registered by the package's import alone (a lazy import of the models
    broke this: Keras failed with "'str' object is not callable")."""
    path = tmp_path / "binary.keras"
    BinaryHourglass(3, width=32, depth=2, input_size=64).save(path)
    result = run_python(
        "import larq_landmarks, tensorflow as tf;"
        f"model = tf.keras.models.load_model({str(path)!r});"
        "print(sum(type(l).__module__.startswith('larq.') for l in model.layers))"
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 0


@pytest.mark.slow  # three fresh interpreters importing TensorFlow: 12 s on 2 cores (Zen 4)
def test_import_is_quiet_at_the_default_log_level_and_keeps_tensorflows_lines_at_level_0():
    """TensorFlow 2.21 writes absl's notice and INFO lines on import whatever
    TF_CPP_MIN_LOG_LEVEL says; the package holds them to the level (2 unless set)."""
    code = "import os; os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None); import larq_landmarks; print('ok')"
    quiet = run_python(code)
    assert quiet.returncode == 0 and quiet.stdout.split() == ["ok"], quiet.stderr
    assert "InitializeLog" not in quiet.stderr and "I0000" not in quiet.stderr, quiet.stderr
    loud = run_python("import larq_landmarks", env_extra={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.returncode == 0, loud.stderr
    # (which INFO lines come depends on the CPU: oneDNN's notice only where it is on by default)
    assert "absl::InitializeLog()" in loud.stderr and "I0000" in loud.stderr
    # no temporary file to hold them in: TensorFlow imported as it is, its lines as they come
    unheld = run_python("import tempfile\ndef no_file(*a, **k): raise OSError('read-only')\n"
                        "tempfile.TemporaryFile = no_file\nimport larq_landmarks; print('ok')")
    assert unheld.returncode == 0 and unheld.stdout.split() == ["ok"], unheld.stderr
    assert "absl::InitializeLog()" in unheld.stderr


def test_import_writes_back_what_a_failing_tensorflow_import_wrote(tmp_path):
    """Descriptor 2 is held only while TensorFlow loads: what it writes (but the absl lines under
    the level) comes back, in order, also when the import fails."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os, sys\n"
        "os.write(2, b'I0000 00:00:12.5 1 port.cc:1] info from C++\\n')\n"
        "sys.stderr.write('a Python line\\n')\n"
        "os.write(2, b'E0000 00:00:12.5 1 port.cc:2] error from C++\\n')\n"
        "raise ImportError('the fake TensorFlow fails')\n"
    )
    result = run_python(
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import larq_landmarks",
        env_extra={"TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode != 0
    assert "info from C++" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines.index("a Python line") < lines.index("E0000 00:00:12.5 1 port.cc:2] error from C++")
    assert "the fake TensorFlow fails" in result.stderr


def test_import_after_keras3_raises_a_helpful_error():
    result = run_python("import tensorflow as tf; tf.keras.layers.Dense; import larq_landmarks")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "TF_USE_LEGACY_KERAS=1" in result.stderr and "before" in result.stderr


def test_mixed_precision_computes_in_bfloat16_and_its_float32_copy_is_the_float32_network(dtype_policy):
    """Under the Keras policy mixed_bfloat16 the blocks (a Larq layer's quantizers too) compute in
    bfloat16 on float32 weights and the outputs stay float32; float32_model gives back the
    float32 network, outputs bit for bit those of the same network built in float32."""
    tf.keras.utils.set_random_seed(0)
    shape = dict(width=16, depth=1, input_size=32, num_stacks=2)
    float32 = BinaryHourglass(5, **shape)
    dtype_policy("mixed_bfloat16")
    mixed = BinaryHourglass(5, **shape)
    mixed.set_weights(float32.get_weights())
    binary = next(l for l in mixed.layers if isinstance(l, lq.layers.QuantConv2D))
    assert binary.compute_dtype == binary.input_quantizer.compute_dtype == "bfloat16"
    assert binary.kernel.dtype == tf.float32 and mixed.get_layer("stem_bn").compute_dtype == "bfloat16"
    assert [o.dtype for o in mixed.outputs] == [tf.float32, tf.float32]
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    copy = models.float32_model(mixed)  # built while the global policy is still mixed_bfloat16
    assert {l.dtype_policy.name for l in copy.submodules if isinstance(l, tf.keras.layers.Layer)} == {"float32"}
    for a, b in zip(copy(x), float32(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(mixed(x)[0].numpy(), float32(x)[0].numpy())  # it did compute in bfloat16
    assert models.float32_model(float32) is float32

    class Subclassed(tf.keras.Model):
        def __init__(self):
            super().__init__(name="subclassed")
            self.dense = tf.keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="subclassed: a float32 copy needs a functional model"):
        models.float32_model(subclassed)
