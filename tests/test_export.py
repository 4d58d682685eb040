import warnings

import numpy as np
import pytest
import tensorflow as tf

from larq_landmarks import export, models
from larq_landmarks import heatmaps as hm


def _with_trained_like_batch_norm(model, seed=0):
    """Give every BatchNormalization generic statistics, as training does.

    At initialisation (beta = mean = 0) binary convolution outputs hit the sign threshold exactly
    (they are sums of +-alpha), and Larq and LCE break such ties differently.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.3, shape),
                               rng.normal(0, 0.3, shape), rng.uniform(0.5, 2.0, shape)])
    return model


SMALL = dict(width=32, input_size=64, depth=2)


def test_default_model_converts_every_binary_conv_to_lce_bconv():
    model = models.BinaryHourglass(68)
    counts = export.op_counts(export.convert(model))
    assert counts["LceBconv2d"] == len(export.binary_layers(model)) == 51
    # float CONV_2D only where the papers keep real layers: stem 7x7, head 1x1, output 1x1,
    # and the two real 1x1 skip convolutions where the channel count changes
    assert counts["CONV_2D"] == 5


@pytest.mark.parametrize("name", ["binary_hpm", "binary_bottleneck", "binary_hpm_relu", "binary_hpm_avgpool"])
def test_lce_interpreter_matches_keras(name):
    model = _with_trained_like_batch_norm(models.build_named(name, 68, **SMALL))
    flatbuffer = export.convert(model)
    assert export.op_counts(flatbuffer)["LceBconv2d"] == len(export.binary_layers(model))
    images = np.random.default_rng(1).uniform(size=(3, 64, 64, 3)).astype(np.float32)
    interpreter = export.interpreter(flatbuffer)
    lce = np.concatenate([interpreter.predict(images[i : i + 1]) for i in range(3)])
    keras = model.predict(images, verbose=0)
    np.testing.assert_allclose(lce, keras, atol=1e-3 * np.abs(keras).max())
    lce_points = hm.heatmap_to_input(hm.decode_heatmaps(lce)[0]).numpy()
    keras_points = hm.heatmap_to_input(hm.decode_heatmaps(keras)[0]).numpy()
    assert np.abs(lce_points - keras_points).max() <= 0.5


def test_stacked_model_exports_its_last_stack_and_float_reference_matches():
    model = _with_trained_like_batch_norm(models.BinaryHourglass(16, num_stacks=2, **SMALL))
    images = np.random.default_rng(2).uniform(size=(1, 64, 64, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)[-1]
    for binary in (True, False):
        flatbuffer = export.convert(model, binary=binary)
        got = export.interpreter(flatbuffer).predict(images)
        assert got.shape == (1, 16, 16, 16)
        np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max())
    assert "LceBconv2d" not in export.op_counts(export.convert(model, binary=False))


def test_unconvertible_layers_are_named_in_a_warning(tmp_path):
    model = models.BinaryHourglass(16, pad_value=-1.0, **SMALL)  # LCE has no -1 padding path
    with pytest.warns(UserWarning, match="stayed float: .*stem_block1_s1_bconv"):
        export.convert(model, str(tmp_path / "m.tflite"))
    assert (tmp_path / "m.tflite").exists()


def test_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "not.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(export.NotOurModelError, match="not.tflite"):
        export.load_flatbuffer(str(bad))
    good = tmp_path / "ok.tflite"
    export.convert(models.BinaryHourglass(16, **SMALL), str(good))
    assert export.op_counts(export.load_flatbuffer(str(good)))["LceBconv2d"] > 0
