"""The Predictor's crops in NumPy (larq_landmarks.cropping) against the tf.data pipeline's crops in
TensorFlow (crop_matrix, sampling_params, ImageProjectiveTransformV3) and hand computation."""
import numpy as np
import pytest
import tensorflow as tf

from larq_landmarks import cropping, heatmaps as hm
from larq_landmarks.datasets import pipeline
from larq_landmarks.evaluation import heatmap_points_to_image


def test_face_and_person_crops_match_hand_computation():
    centre, scale = cropping.face_crop([10, 20, 110, 140])  # w 100, h 120
    np.testing.assert_allclose(centre, [60, 80 - 0.12 * 120], rtol=1e-6)
    assert scale == pytest.approx(220 / 195)
    centre, scale = cropping.person_crop([0, 10, 40, 110])  # longer side 100
    np.testing.assert_allclose(centre, [20, 60])
    assert scale == pytest.approx(1.25 * 100 / 200)


def test_crop_matrices_are_the_pipelines():
    centres = np.array([[26.5, 18.25], [2, 3], [1234.5, -77.0]], np.float32)
    scales = np.array([0.2, 0.31, 7.5], np.float32)
    for size in (24, 64, 256):
        got = cropping.crop_matrices(centres, scales, size)
        np.testing.assert_array_equal(got, pipeline.crop_matrix(centres, scales, size).numpy())
        # hand computation: the centre goes to the crop's middle, 200 * scale pixels to its side
        middle = np.einsum("nij,nj->ni", got[:, :2, :2], centres) + got[:, :2, 2]
        np.testing.assert_allclose(middle, np.full((3, 2), (size - 1) / 2), atol=2e-3)
        np.testing.assert_allclose(got[:, 0, 0] * 200 * scales, size, rtol=1e-6)


def test_crops_are_the_pipelines_crops():
    """Zoomed, rotated, mirrored, reaching past every edge of the image: TensorFlow's warp to
    float rounding; a crop far outside the image is zeros; any channel count."""
    image = np.random.default_rng(6).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    centres = np.array([[26, 18], [2, 3], [50, 35], [20, 30]], np.float32)
    matrices = tf.concat([pipeline.crop_matrix(centres[:2], np.array([0.2, 0.3], np.float32), 24),
                          pipeline.crop_matrix(centres[2:], np.array([0.25, 0.15], np.float32), 24, 30.0, True),
                          pipeline.crop_matrix(centres[:1], np.array([0.22], np.float32), 24, 0.0, True)], 0)
    tf_params = pipeline.sampling_params(matrices).numpy()  # inverted in float32
    got = cropping.warp_crops(image, tf_params, 24)
    pixels = tf.image.convert_image_dtype(tf.constant(image), tf.float32)
    expected = np.stack([pipeline.warp_image(pixels, m, 24).numpy() for m in matrices])
    assert got.shape == (5, 24, 24, 3) and got.dtype == np.float32
    assert (expected == 0).any() and (expected > 0).mean() > 0.3  # past the edges, and inside
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    # upright crops alone (mirrored or not) take the separable path: the same values
    upright = [0, 1, 4]
    np.testing.assert_array_equal(cropping.warp_crops(image, tf_params[upright], 24), got[upright])
    np.testing.assert_allclose(got[upright], expected[upright], rtol=0, atol=2e-6)
    # the parameters computed here: TensorFlow's float32 values for upright crops, the rotated ones
    # inverted in float64 (the same crops to 1e-4)
    params = cropping.sampling_params(matrices.numpy())
    np.testing.assert_array_equal(params[upright], tf_params[upright])
    np.testing.assert_allclose(params, tf_params, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cropping.warp_crops(image, params, 24), expected, rtol=0, atol=1e-4)
    far = cropping.crop_matrices(np.array([[3e9, -3e9]], np.float32), np.array([0.2], np.float32), 24)
    assert not cropping.warp_crops(image, cropping.sampling_params(far), 24).any()
    grey = image[..., :1]
    np.testing.assert_array_equal(cropping.warp_crops(grey, tf_params, 24), got[..., :1])


def test_upright_crops_sample_where_the_pipeline_samples_bit_for_bit():
    """The Predictor's crops are the evaluation pipeline's exactly (a binary network can turn a
    last-bit difference of its input into another landmark): the sampling parameters of many
    upright crops, mirrored or not, equal TensorFlow's float32 inverse bit for bit."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(-500, 3000, (5000, 2)).astype(np.float32)
    scales = rng.uniform(0.1, 20, 5000).astype(np.float32)
    for size, flip in ((64, False), (256, False), (256, True)):
        matrices = pipeline.crop_matrix(centres, scales, size, 0.0, flip)
        np.testing.assert_array_equal(cropping.sampling_params(matrices.numpy()),
                                      pipeline.sampling_params(matrices).numpy())


def test_a_crop_of_the_whole_image_at_its_own_size_is_the_image():
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    identity = np.eye(3, dtype=np.float32)[None]
    np.testing.assert_array_equal(cropping.warp_crops(image, cropping.sampling_params(identity), 16),
                                  image[None] * np.float32(1 / 255))


def test_points_go_back_to_the_image_as_evaluation_maps_them():
    rng = np.random.default_rng(3)
    centres = rng.uniform(0, 300, (5, 2)).astype(np.float32)
    scales = rng.uniform(0.5, 2, 5).astype(np.float32)
    matrices = cropping.crop_matrices(centres, scales, 64)
    heatmap_points = rng.uniform(0, 15, (5, 68, 2)).astype(np.float32)
    crop_points = (heatmap_points + 0.5) * 4 - 0.5  # heatmap pixel centres -> input pixel centres
    np.testing.assert_allclose(crop_points, hm.heatmap_to_input(heatmap_points).numpy(), rtol=1e-6)
    got = cropping.crop_points_to_image(crop_points, matrices)
    expected = heatmap_points_to_image(heatmap_points, matrices).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)
    # and the round trip: image -> crop -> image
    image_points = rng.uniform(0, 300, (5, 68, 2))
    to_crop = np.einsum("nij,nkj->nki", matrices[:, :2, :2].astype(np.float64), image_points) + matrices[:, None, :2, 2]
    np.testing.assert_allclose(cropping.crop_points_to_image(to_crop, matrices), image_points, atol=1e-3)


def test_bad_images_are_named():
    with pytest.raises(ValueError, match="image: expected an \\(H, W, C\\) uint8 array, got float32"):
        cropping.warp_crops(np.zeros((8, 8, 3), np.float32), np.zeros((1, 8), np.float32), 4)
    with pytest.raises(ValueError, match="got uint8 \\(8, 8\\)"):
        cropping.warp_crops(np.zeros((8, 8), np.uint8), np.zeros((1, 8), np.float32), 4)


def test_the_kernels_crops_are_numpys_bit_for_bit():
    """cropping.warp_crops runs in the runtime's C++ kernels: every kernel path gives the NumPy
    reference's crops bit for bit (upright, which the kernels compute a column and a row at a
    time, mirrored, rotated, projective, a NaN parameter and a zero divisor, zeros of either sign,
    one channel)."""
    from larq_landmarks.runtime import available_kernels, kernels

    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    matrices = cropping.crop_matrices(np.array([[35, 25], [5, 48], [80, 10]], np.float32),
                                      np.array([0.3, 0.2, 0.5], np.float32), 64)
    mirrored = matrices.copy()
    mirrored[:, 0, 0] *= -1
    turn = np.array([[np.cos(0.4), -np.sin(0.4), 0], [np.sin(0.4), np.cos(0.4), 0], [0, 0, 1]], np.float32)
    rotated = cropping.sampling_params(turn @ matrices)
    projective = rotated.copy()
    projective[:, 6:] = [1e-3, -2e-3]
    broken = cropping.sampling_params(matrices)
    broken[0, 0], broken[1, 6] = np.nan, -1 / 30  # row 30 of crop 1 divides by zero
    signed_zeros = cropping.sampling_params(mirrored)  # upright: the zeros' signs change no value
    signed_zeros[:, [1, 3, 6, 7]] = -0.0
    signed_zeros[0, [2, 5]] = -0.0
    cases = [cropping.sampling_params(matrices), cropping.sampling_params(mirrored), rotated, projective, broken,
             signed_zeros]
    for path in available_kernels():
        for params in cases:
            with np.errstate(invalid="ignore", divide="ignore"):
                expected = cropping.warp_crops_numpy(image, params, 64)
            np.testing.assert_array_equal(kernels.load(path).warp_crops(image, params, 64), expected)
        np.testing.assert_array_equal(kernels.load(path).warp_crops(image[..., :1], rotated, 64),
                                      cropping.warp_crops_numpy(image[..., :1], rotated, 64))
    assert (cropping.warp_crops_numpy(image, rotated, 64) > 0).mean() > 0.3
