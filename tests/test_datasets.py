import json
import os
import warnings

import numpy as np
import pytest
import scipy.io
import tensorflow as tf
from PIL import Image, ImageDraw

from larq_landmarks import heatmaps as hm
from larq_landmarks import layouts, synthetic
from larq_landmarks.datasets import pipeline, readers, writers
from larq_landmarks.datasets.readers import DatasetError
from larq_landmarks.datasets.segmentation import inside_polygon, render_part_mask
from larq_landmarks.runtime.decoding import decode_heatmaps_array

HAND_PTS = """version: 1
n_points: 3
{
10.5 20
1 1
100.25 50.75
}
"""


def _image(path, size=(120, 80)):
    Image.new("RGB", size, (10, 20, 30)).save(path)


def test_read_pts_hand_written_fixture_is_shifted_to_zero_based(tmp_path):
    path = tmp_path / "a.pts"
    path.write_text(HAND_PTS)
    np.testing.assert_allclose(readers.read_pts(str(path), 3), [[9.5, 19], [0, 0], [99.25, 49.75]])
    # as Windows tools write it: CRLF line ends, a byte-order mark, the header's spaces doubled
    path.write_bytes(b"\xef\xbb\xbf" + HAND_PTS.replace("n_points: 3", "n_points:  3").replace("\n", "\r\n").encode())
    np.testing.assert_allclose(readers.read_pts(str(path), 3), [[9.5, 19], [0, 0], [99.25, 49.75]])


@pytest.mark.parametrize(
    "text,message",
    [
        (HAND_PTS.replace("version: 1", "vers 1"), "malformed header"),
        (HAND_PTS.replace("n_points: 3", "points 3"), "malformed header"),
        (HAND_PTS.replace("{\n", ""), "malformed"),
        (HAND_PTS.replace("1 1\n", "1 nan\n"), "NaN"),
        (HAND_PTS.replace("n_points: 3", "n_points: 2").replace("1 1\n", ""), "expected 3 points"),
        # fewer lines than n_points says (it read 'list index out of range')
        (HAND_PTS.replace("n_points: 3", "n_points: 68"), r"n_points is 68, but 4 lines follow '\{'"),
        ("version: 1\n", "not a .pts file \\(1 non-empty lines"),
        ("", "not a .pts file \\(0 non-empty lines"),
    ],
)
def test_bad_pts_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.pts"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message) as error:
        readers.read_pts(str(path), 3)
    assert "bad.pts" in str(error.value)


def test_pts_folder_round_trip_and_bad_samples(tmp_path):
    folder = tmp_path / "300w"
    writers.write_300w(str(folder / "01_Indoor"), 3, seed=3, image_size=(200, 160))
    rng = np.random.default_rng(3)
    expected = [synthetic.random_face(rng, (200, 160), 45.0)["points"] for _ in range(3)]
    records = readers.read_pts_folder(str(folder))
    assert [r.extras["subset"] for r in records] == ["01_Indoor"] * 3
    for record, points in zip(records, expected):
        np.testing.assert_allclose(record.points, points, atol=1e-3)  # .pts keeps 3 decimals
        x1, y1, x2, y2 = record.box
        np.testing.assert_allclose(record.centre, [(x1 + x2) / 2, (y1 + y2) / 2 - 0.12 * (y2 - y1)], rtol=1e-5)
        assert record.scale == pytest.approx(((x2 - x1) + (y2 - y1)) / 195, rel=1e-5)

    # a truncated image, a missing image, a .pts with 67 points
    jpg = folder / "01_Indoor" / "00001.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    os.remove(folder / "01_Indoor" / "00002.jpg")
    lines = (folder / "01_Indoor" / "00000.pts").read_text().splitlines()
    (folder / "01_Indoor" / "00000.pts").write_text("\n".join(lines[:1] + ["n_points: 67"] + lines[2:4] + lines[5:]))
    with pytest.raises(DatasetError, match="00000.pts"):
        readers.read_pts_folder(str(folder))
    writers.write_300w(str(folder / "extra"), 1, seed=9)
    with pytest.warns(UserWarning, match=r"skipped 3 bad sample\(s\)") as caught:
        records = readers.read_pts_folder(str(folder), skip_bad=True)
    message = str(caught[0].message)
    assert "00000.pts" in message and "00001.jpg" in message and "00002" in message
    assert len(records) == 1


def test_writers_refuse_bad_arguments_before_writing(tmp_path):
    bad = [
        (lambda f: writers.write_300w(f, -1), "count must be an integer of at least 0, got -1"),
        (lambda f: writers.write_300w(f, 2.0), "count must be an integer"),
        (lambda f: writers.write_300w_lp(f, True), "count must be an integer"),
        (lambda f: writers.write_aflw_pifa(f, 1, image_size=(0, 64)), "image_size must be two positive"),
        (lambda f: writers.write_aflw2000(f, 1, image_size=(64,)), "image_size must be two positive"),
        (lambda f: writers.write_mpii_mat(f, -2), "count must be"),
        (lambda f: writers.write_300w(f, 1, image_format="gif"), "image_format must be 'jpg' or 'png', got 'gif'"),
        (lambda f: writers.write_mpii_json(f, 4, validation_fraction=1.5), "validation_fraction must be between 0 and 1"),
        (lambda f: writers.write_mpii_json(f, 4, validation_fraction=float("nan")), "validation_fraction"),
        (lambda f: writers.write_layout(f, 0, 0), "train must be an integer of at least 1, got 0"),
        (lambda f: writers.write_layout(f, 4, -1), "test must be an integer of at least 1, got -1"),
    ]
    for i, (write, message) in enumerate(bad):
        folder = tmp_path / str(i)
        with pytest.raises(ValueError, match=message):
            write(str(folder))
        assert not folder.exists()
    # the edge cases that are allowed: an empty folder, a PNG set, all of MPII's people for validation
    assert os.listdir(writers.write_300w(str(tmp_path / "empty"), 0)) == []
    assert sorted(os.listdir(writers.write_300w(str(tmp_path / "png"), 1, image_size=(48, 40), image_format="png"))) == ["00000.png", "00000.pts"]
    assert Image.open(tmp_path / "png" / "00000.png").format == "PNG"
    train, valid = writers.write_mpii_json(str(tmp_path / "mpii"), 2, image_size=(64, 64), validation_fraction=1.0)
    assert [len(json.load(open(p))) for p in (train, valid)] == [0, 2]


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="empty folder"):
        readers.read_pts_folder(str(tmp_path))
    with pytest.raises(DatasetError, match="not found"):
        readers.read_300w_lp(str(tmp_path / "nope"))


def test_out_of_image_coordinates_are_an_error(tmp_path):
    _image(tmp_path / "a.png", (120, 80))
    (tmp_path / "a.pts").write_text(HAND_PTS.replace("100.25 50.75", "500 50"))
    with pytest.raises(DatasetError, match="outside the 120x80 image"):
        readers.read_pts_folder(str(tmp_path), num_points=3)


def test_mat_readers_recover_generated_faces(tmp_path):
    writers.write_300w_lp(str(tmp_path / "lp"), 3, seed=5)
    writers.write_aflw2000(str(tmp_path / "aflw"), 3, seed=5)
    writers.write_aflw_pifa(str(tmp_path / "pifa"), 3, seed=5)
    rng = np.random.default_rng(5)
    faces = [synthetic.random_face(rng, (256, 256), 85.0) for _ in range(3)]
    for record, face in zip(readers.read_300w_lp(str(tmp_path / "lp")), faces):
        np.testing.assert_allclose(record.points, face["points"], atol=1e-3)
        assert record.extras["yaw"] == pytest.approx(np.degrees(face["pose"][1]), abs=1e-3)
    # 300W-LP's landmarks/ folder of separate *_pts.mat files is not read as samples
    (tmp_path / "lp" / "landmarks" / "AFW").mkdir(parents=True)
    scipy.io.savemat(tmp_path / "lp" / "landmarks" / "AFW" / "image00000_pts.mat", {"pts_2d": np.zeros((68, 2))})
    assert len(readers.read_300w_lp(str(tmp_path / "lp"))) == 3
    aflw = readers.read_aflw2000(str(tmp_path / "aflw"))  # pt2d is 21 points: pt3d_68 is used
    assert all(r.points.shape == (68, 2) for r in aflw)
    pifa = readers.read_aflw_pifa(str(tmp_path / "pifa"))
    rng = np.random.default_rng(5)
    face = synthetic.random_face(rng, (256, 256), 80.0)
    index = list(layouts.FACE34_FROM_68)
    np.testing.assert_allclose(pifa[0].points, face["points"][index], atol=1e-3)
    np.testing.assert_array_equal(pifa[0].visible, face["visible"][index])


def test_hand_written_mat_fixture_and_missing_keys(tmp_path):
    _image(tmp_path / "image00001.jpg", (100, 100))
    pts = np.stack([np.linspace(10, 80, 68), np.linspace(20, 90, 68), np.zeros(68)])
    scipy.io.savemat(tmp_path / "image00001.mat", {"pt3d_68": pts, "Pose_Para": np.array([[0.1, -0.5, 0.2, 0, 0, 0, 1]])})
    (record,) = readers.read_aflw2000(str(tmp_path))
    np.testing.assert_allclose(record.points[[0, -1]], [[10, 20], [80, 90]])
    assert record.extras["yaw"] == pytest.approx(np.degrees(-0.5))
    scipy.io.savemat(tmp_path / "image00001.mat", {"pt2d": pts[:2]})
    with pytest.raises(DatasetError, match=r"image00001.mat: .mat file lacks \['Pose_Para'\]"):
        readers.read_aflw2000(str(tmp_path))


def test_mpii_mat_and_json_readers_agree(tmp_path):
    mat = writers.write_mpii_mat(str(tmp_path / "mat"), 10, seed=2)
    train_json, valid_json = writers.write_mpii_json(str(tmp_path / "json"), 10, seed=2, validation_fraction=0.0)
    from_mat = readers.read_mpii_mat(mat, str(tmp_path / "mat" / "images"))
    from_json = readers.read_mpii_json(train_json, str(tmp_path / "json" / "images"))
    names = [r.extras["image_name"] for r in from_mat]
    assert len(from_mat) == 8 and "000000004.jpg" not in names  # every 5th is a test image
    by_name = {r.extras["image_name"]: r for r in from_json}
    for record in from_mat:
        other = by_name[record.extras["image_name"]]
        np.testing.assert_array_equal(record.visible, other.visible)
        np.testing.assert_allclose(record.points[record.visible], other.points[other.visible], atol=1e-4)
        np.testing.assert_allclose(record.centre, other.centre, atol=1e-4)
        assert record.scale == pytest.approx(other.scale)
        assert record.extras["head_size"] == pytest.approx(other.extras["head_size"])
        # labelled = has a point entry; the occlusion flag is kept apart and NaN where unlabelled
        flags = record.extras["is_visible"]
        np.testing.assert_array_equal(np.isnan(flags), ~record.visible)
    occluded = np.concatenate([(r.extras["is_visible"] == 0) for r in from_mat])
    assert occluded.any() and np.concatenate([r.visible for r in from_mat])[occluded].all()
    validation = readers.read_mpii_mat(mat, str(tmp_path / "mat" / "images"), "validation",
                                       validation_images=["000000001.jpg"])
    assert [r.extras["image_name"] for r in validation] == ["000000001.jpg"]
    with pytest.raises(ValueError, match="validation_images"):
        readers.read_mpii_mat(mat, str(tmp_path / "mat" / "images"), "validation")


def test_malformed_mpii_mat_entries_are_dataset_errors_that_skip_bad_skips(tmp_path, monkeypatch):
    save = writers._savemat

    def corrupt(path, data):  # person 1: a joint id past 15; person 2: a head box corner that is not a number
        annolist = data["RELEASE"]["annolist"]
        annolist[0, 0]["annorect"][0, 0]["annopoints"]["point"]["id"][0, 0] = 16
        annolist[0, 1]["annorect"]["x1"][0, 0] = "left"
        save(path, data)

    monkeypatch.setattr(writers, "_savemat", corrupt)
    mat = writers.write_mpii_mat(str(tmp_path), 3, test_every=None)
    images = str(tmp_path / "images")
    with pytest.raises(DatasetError, match=r"annolist\(1\).annorect\(1\): joint id 16 is not one of MPII's 0..15"):
        readers.read_mpii_mat(mat, images)
    with pytest.warns(UserWarning, match=r"skipped 2 bad sample.*annolist\(2\).annorect\(1\): malformed annotation "
                                         r"\(ValueError"):
        (record,) = readers.read_mpii_mat(mat, images, skip_bad=True)
    assert record.extras["image_name"] == "000000002.jpg"


def test_mpii_hand_written_json_fixture(tmp_path):
    _image(tmp_path / "015601864.jpg", (400, 300))
    person = {"image": "015601864.jpg", "center": [200.0, 150.0], "scale": 1.0,
              "joints": [[101.0 + j, 51.0 + j] for j in range(16)], "joints_vis": [1] * 15 + [0],
              "head_box": [11, 21, 41, 61]}
    (tmp_path / "valid.json").write_text(json.dumps([person]))
    (record,) = readers.read_mpii_json(str(tmp_path / "valid.json"), str(tmp_path))
    np.testing.assert_allclose(record.points[0], [100, 50])
    np.testing.assert_allclose(record.centre, [199, 149 + 15])
    assert record.scale == pytest.approx(1.25)
    assert record.extras["head_size"] == pytest.approx(0.6 * np.hypot(30, 40))
    assert not record.visible[15]
    del person["joints_vis"]
    (tmp_path / "bad.json").write_text(json.dumps([person]))
    with pytest.raises(DatasetError, match=r"bad.json\[0\]: missing keys \['joints_vis'\]"):
        readers.read_mpii_json(str(tmp_path / "bad.json"), str(tmp_path))
    person["joints_vis"], person["head_box"] = [1] * 16, [11, 21, 11, 21]
    (tmp_path / "flat.json").write_text(json.dumps([person]))
    message = r"flat.json\[0\]: head box \[10.0, 20.0, 10.0, 20.0\] has no size"  # 1-based in the file
    with pytest.raises(DatasetError, match=message):
        readers.read_mpii_json(str(tmp_path / "flat.json"), str(tmp_path))


def test_decoding_a_rendered_heatmap_recovers_subpixel_positions():
    rng = np.random.default_rng(0)
    points = rng.uniform(2, 61, size=(8, 68, 2)).astype(np.float32)
    maps = hm.render_heatmaps(points, np.ones((8, 68)), 64, sigma=1.5)
    decoded, scores = hm.decode_heatmaps(maps)
    error = np.abs(decoded.numpy() - points)
    assert error.max() <= 0.25 + 1e-6
    assert error.mean() < 0.15
    assert np.all(scores.numpy() > 0.75)
    zero = hm.render_heatmaps(points[:1], np.zeros((1, 68)), 64)
    assert float(tf.reduce_max(zero)) == 0.0
    # input <-> heatmap pixel mapping is exact both ways
    np.testing.assert_allclose(hm.heatmap_to_input(hm.input_to_heatmap(points)), points, atol=1e-5)


def test_array_decoding_is_the_tensorflow_decoding():
    """decode_heatmaps_array (NumPy here, CuPy on a GPU) gives decode_heatmaps' points and scores
    exactly: random maps, plus a tie (the first maximum wins), peaks on each border (no shift
    across it), equal neighbours (no shift) and a shift each way."""
    rng = np.random.default_rng(3)
    maps = rng.uniform(size=(3, 9, 11, 6)).astype(np.float32)
    maps[0, :, :, :5] = 0
    maps[0, 2, 3, 0] = maps[0, 6, 1, 0] = 5  # a tie: (3, 2) wins
    maps[0, 0, 4, 1] = maps[0, 8, 4, 2] = maps[0, 4, 0, 3] = maps[0, 4, 10, 4] = 7  # on the borders,
    maps[0, 1, 4, 1] = maps[0, 7, 4, 2] = maps[0, 4, 1, 3] = maps[0, 4, 9, 4] = 3  # the inner neighbour larger
    maps[1, :, :, 0] = 0
    maps[1, 4, 5, 0], maps[1, 4, 4, 0], maps[1, 4, 6, 0], maps[1, 3, 5, 0], maps[1, 5, 5, 0] = 9, 2, 2, 1, 3
    points, scores = decode_heatmaps_array(maps)
    expected_points, expected_scores = hm.decode_heatmaps(maps)
    assert points.dtype == np.float32 and points.shape == (3, 6, 2) and scores.shape == (3, 6)
    np.testing.assert_array_equal(points, expected_points.numpy())
    np.testing.assert_array_equal(scores, expected_scores.numpy())
    np.testing.assert_array_equal(points[0, :5], [[3, 2], [4, 0], [4, 8], [0, 4], [10, 4]])
    np.testing.assert_array_equal(points[1, 0], [5, 4.25])  # equal in x, larger below


def _dot_dataset(tmp_path):
    """An image with a bright dot at every one of 68 asymmetric points, others black."""
    rng = np.random.default_rng(1)
    face = synthetic.random_face(rng, (300, 260), max_yaw_degrees=10)
    image = Image.new("RGB", (300, 260))
    draw = ImageDraw.Draw(image)
    for x, y in face["points"]:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 255, 255))
    image.save(tmp_path / "dots.png")
    writers.write_pts(str(tmp_path / "dots.pts"), face["points"])
    return readers.to_columns(readers.read_pts_folder(str(tmp_path)))


@pytest.mark.parametrize("fields,message", [
    ({"scale_range": (1.3, 0.7)}, r"scale_range=\(1.3, 0.7\) must be \(low, high\) with low > 0 and low <= high"),
    ({"scale_range": (0.0, 1.3)}, "scale_range"),
    ({"colour_range": (0.7,)}, "colour_range"),
    ({"colour_range": (-0.1, 1.0)}, r"colour_range=\(-0.1, 1.0\) must be \(low, high\) with low >= 0"),
    ({"rotation_probability": 1.5}, r"rotation_probability=1.5 must be a probability in \[0, 1\]"),
    ({"flip_probability": -0.1}, "flip_probability"),
    ({"scale_sigma": float("nan")}, "scale_sigma=nan must be a number >= 0"),
    ({"rotation_limit": -5}, "rotation_limit"),
])
def test_augmentation_refuses_impossible_settings(fields, message):
    """Inverted ranges and probabilities outside [0, 1] were taken and clipped or sampled silently."""
    with pytest.raises(ValueError, match=message):
        pipeline.Augmentation(**fields)


def test_augmented_landmarks_land_on_the_transformed_image_features(tmp_path):
    columns = _dot_dataset(tmp_path)
    perm = layouts.flip_permutation(68)
    strong = pipeline.Augmentation(rotation_probability=1.0, flip_probability=0.5)
    data = pipeline.landmark_dataset(columns, input_size=128, flip_permutation=perm, augmentation=strong, seed=4)
    flips = 0
    for image, maps in data.take(12):
        points, scores = hm.decode_heatmaps(maps[None])
        points = hm.heatmap_to_input(points)[0].numpy()
        # 3x3 neighbourhood maximum: decoding is exact to a quarter heatmap pixel (1 px here)
        brightness = tf.nn.max_pool2d(image[None], 3, 1, "SAME")[0].numpy().mean(-1)
        inside = (scores[0].numpy() > 0.5) & (points > 1).all(1) & (points < 126).all(1)
        values = [brightness[int(round(y)), int(round(x))] for x, y in points[inside]]
        assert inside.sum() > 40
        assert np.mean(np.array(values) > 0.3) > 0.95  # decoded targets sit on the dots
        # the subject's right eye (36-41) stays image-left of the left eye, flipped or not
        assert points[36:42, 0].mean() < points[42:48, 0].mean()
        flips += int(points[0, 0] < points[16, 0]) == 0
    assert flips == 0  # jaw point 0 is always image-left after the permutation


def test_flip_swaps_left_and_right_points(tmp_path):
    columns = _dot_dataset(tmp_path)
    perm = layouts.flip_permutation(68)
    always = pipeline.Augmentation(0, (1, 1), 0, 0, 0, 1.0, (1, 1))
    plain = next(iter(pipeline.landmark_dataset(columns, 128, train=False)))
    flipped = next(iter(pipeline.landmark_dataset(columns, 128, augmentation=always, flip_permutation=perm)))
    np.testing.assert_allclose(flipped[0].numpy(), plain[0].numpy()[:, ::-1], atol=1e-4)
    p_plain = hm.decode_heatmaps(plain[1][None])[0][0].numpy()
    p_flip = hm.decode_heatmaps(flipped[1][None])[0][0].numpy()
    mirrored = p_plain[perm].copy()
    mirrored[:, 0] = 31 - mirrored[:, 0]
    np.testing.assert_allclose(p_flip, mirrored, atol=0.51)


def test_crop_matrix_by_hand_and_for_a_batch():
    """The crop of side 200 * scale around the centre maps onto the input (corner to corner), and a
    batch of centres and scales gives each one's matrix, rotated and flipped alike."""
    matrix = pipeline.crop_matrix([150.0, 80.0], 0.5, 64).numpy()  # a 100-pixel crop -> 64 pixels
    zoom = 64 / 100
    np.testing.assert_allclose(matrix, [[zoom, 0, 31.5 - 150 * zoom], [0, zoom, 31.5 - 80 * zoom], [0, 0, 1]],
                               rtol=1e-6, atol=1e-5)
    rng = np.random.default_rng(2)
    centres, scales = rng.uniform(0, 400, (5, 2)).astype(np.float32), rng.uniform(0.5, 3, 5).astype(np.float32)
    for rotation, flip in ((0.0, False), (25.0, True)):
        batch = pipeline.crop_matrix(centres, scales, 128, rotation, flip).numpy()
        assert batch.shape == (5, 3, 3)
        for i in range(5):
            np.testing.assert_array_equal(batch[i], pipeline.crop_matrix(centres[i], scales[i], 128, rotation, flip))


def test_pipeline_is_deterministic_given_a_seed(tmp_path):
    columns = readers.to_columns(readers.read_pts_folder(writers.write_300w(str(tmp_path), 4, image_size=(96, 96))))
    perm = layouts.flip_permutation(68)

    def first(seed):
        data = pipeline.landmark_dataset(columns, 64, flip_permutation=perm, seed=seed, batch_size=4)
        return next(iter(data))[0].numpy()

    np.testing.assert_array_equal(first(1), first(1))
    assert np.abs(first(1) - first(2)).max() > 0.1


def test_flip_without_permutation_is_refused(tmp_path):
    columns = readers.to_columns(readers.read_pts_folder(writers.write_300w(str(tmp_path), 1)))
    with pytest.raises(ValueError, match="flip_permutation"):
        pipeline.landmark_dataset(columns)


def test_pipeline_arguments_are_checked_before_any_sample_is_read(tmp_path):
    columns = readers.to_columns(readers.read_pts_folder(writers.write_300w(str(tmp_path), 1)))
    perm = layouts.flip_permutation(68)
    cases = [
        (dict(input_size=50), "input_size=50 must be a positive multiple of 4"),
        (dict(input_size=0), "input_size=0 must be a positive multiple of 4"),
        (dict(batch_size=0), "batch_size=0 must be a positive integer or None"),
        (dict(sigma=0.0), "sigma=0.0 must be a positive number"),
        (dict(sigma=float("nan")), "sigma=nan must be a positive number"),
        (dict(flip_permutation=perm[:10]), r"flip_permutation must be a permutation of the 68 points' indices 0..67, got 10"),
        (dict(flip_permutation=[0] * 68), "flip_permutation must be a permutation"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipeline.landmark_dataset(columns, **{"flip_permutation": perm, **kwargs})
    with pytest.raises(ValueError, match="input_size=30 must be"):
        pipeline.segmentation_dataset(columns, 30, flip_permutation=perm)
    with pytest.raises(ValueError, match="batch_size=-1 must be"):
        pipeline.evaluation_dataset(columns, 64, batch_size=-1)
    # columns not as to_columns gives them (a KeyError inside tf.data's trace, or TensorFlow's
    # "buffer_size must be greater than zero" from the shuffle, before)
    without_centre = {k: v for k, v in columns.items() if k != "centre"}
    with pytest.raises(ValueError, match=r"columns lack \['centre'\]: a pipeline reads"):
        pipeline.evaluation_dataset(without_centre, 64)
    with pytest.raises(ValueError, match=r"columns lack \['centre'\]"):
        pipeline.landmark_dataset(without_centre, flip_permutation=perm)
    with pytest.raises(ValueError, match=r"columns need one entry per sample, at least one, got lengths \{'image_path': 0"):
        pipeline.landmark_dataset({k: v[:0] for k, v in columns.items()}, flip_permutation=perm)
    with pytest.raises(ValueError, match=r"got lengths \{'image_path': 1, 'points': 1, 'visible': 1, 'centre': 1, 'scale': 2\}"):
        pipeline.segmentation_dataset({**columns, "scale": np.ones(2, np.float32)}, flip_permutation=perm)


def test_evaluation_dataset_maps_predictions_back_to_the_image(tmp_path):
    columns = readers.to_columns(readers.read_pts_folder(writers.write_300w(str(tmp_path), 3, image_size=(300, 200))))
    for element in pipeline.evaluation_dataset(columns, 128, batch_size=3):
        crop = pipeline.transform_points(element["matrix"], element["points"])
        back = pipeline.transform_points(tf.linalg.inv(element["matrix"]), crop)
        np.testing.assert_allclose(back.numpy(), columns["points"], atol=1e-3)
        # the crop keeps the face inside
        assert float(tf.reduce_min(crop)) > 0 and float(tf.reduce_max(crop)) < 128


def test_inside_polygon_matches_hand_computation():
    square = [[1.5, 1.5], [4.5, 1.5], [4.5, 3.5], [1.5, 3.5]]
    got = inside_polygon(square, 6, 7).numpy()
    expected = np.zeros((6, 7), bool)
    expected[2:4, 2:5] = True  # pixel centres x in {2,3,4}, y in {2,3}
    np.testing.assert_array_equal(got, expected)


def test_part_mask_agrees_with_pillow_polygons():
    rng = np.random.default_rng(7)
    face = synthetic.random_face(rng, (96, 96), max_yaw_degrees=20)
    ours = render_part_mask(face["points"], 96, 96).numpy()
    reference = Image.new("L", (96, 96))
    draw = ImageDraw.Draw(reference)
    for label, polygon in layouts.FACE_PART_POLYGONS:
        draw.polygon([tuple(face["points"][i]) for i in polygon], fill=label)
    agreement = (ours == np.asarray(reference)).mean()
    assert agreement > 0.97, agreement  # they differ only on boundary pixels
    assert set(np.unique(ours)) == set(range(7))


def test_segmentation_dataset_yields_masks(tmp_path):
    columns = readers.to_columns(readers.read_pts_folder(writers.write_300w(str(tmp_path), 2)))
    perm = layouts.flip_permutation(68)
    image, mask = next(iter(pipeline.segmentation_dataset(columns, 128, flip_permutation=perm, batch_size=2)))
    assert image.shape == (2, 128, 128, 3) and mask.shape == (2, 32, 32) and mask.dtype == tf.int32
    assert set(np.unique(mask.numpy())) <= set(range(7)) and (mask.numpy() == 1).mean() > 0.05


@pytest.mark.parametrize("fmt,ext", [("TIFF", ".tif"), ("PPM", ".ppm"), ("WEBP", ".webp"), ("PNG", ".PNG")])
def test_any_image_pillow_decodes_is_paired_and_decoded_like_png(tmp_path, fmt, ext):
    """TIFF and PPM go through Pillow, WebP and PNG through TensorFlow: same pixels either way."""
    writers.write_300w(str(tmp_path / "jpg"), 2, seed=3, image_size=(96, 96))
    for folder, save_as, suffix in (("png", "PNG", ".png"), ("other", fmt, ext)):
        os.makedirs(tmp_path / folder)
        for name in ("00000", "00001"):
            pixels = Image.open(tmp_path / "jpg" / f"{name}.jpg").convert("RGB")
            pixels.save(tmp_path / folder / f"{name}{suffix}", save_as, **({"lossless": True} if save_as == "WEBP" else {}))
            (tmp_path / folder / f"{name}.pts").write_text((tmp_path / "jpg" / f"{name}.pts").read_text())
    png = readers.read_pts_folder(str(tmp_path / "png"))
    other = readers.read_pts_folder(str(tmp_path / "other"))
    assert [os.path.basename(r.image_path) for r in other] == [f"00000{ext}", f"00001{ext}"]
    crops = [np.stack([e["image"].numpy() for e in pipeline.evaluation_dataset(readers.to_columns(records), 64)])
             for records in (png, other)]
    assert crops[0].std() > 0.05
    np.testing.assert_array_equal(crops[0], crops[1])


def test_pipeline_decodes_every_image_as_the_predictor_does(tmp_path):
    """``pipeline.load_image`` (training and evaluation) and ``predictor.load_rgb`` (Pillow) give
    the same pixels: JPEG with libjpeg's accurate transform (TensorFlow's default fast one was off
    by 10 levels on average at quality 100), 8-bit palette BMPs through Pillow (TensorFlow read
    their indices as grey), 1-bit BMPs (which TensorFlow refused), 16-bit grey TIFF scaled (Pillow's
    conversion clipped it white), 16-bit grey PNG scaled and rounded (TensorFlow kept the high byte:
    28% of values a level lower)."""
    from larq_landmarks.predictor import load_rgb

    rng = np.random.default_rng(5)
    noise = rng.uniform(0, 255, (24, 40, 3)).astype(np.uint8)
    picture = Image.fromarray(noise)
    files = {"q100.jpg": (picture, "JPEG", dict(quality=100, subsampling=0)),
             "q90.jpg": (picture, "JPEG", dict(quality=90)), "cmyk.jpg": (picture.convert("CMYK"), "JPEG", {}),
             "grey.jpg": (picture.convert("L"), "JPEG", {}), "progressive.jpg": (picture, "JPEG", dict(progressive=True)),
             "palette.png": (picture.convert("P"), "PNG", {}), "rgb.bmp": (picture, "BMP", {}),
             "palette.bmp": (picture.convert("P"), "BMP", {}), "bits.bmp": (picture.convert("1"), "BMP", {}),
             "rgba.bmp": (picture.convert("RGBA"), "BMP", {}), "lossy.webp": (picture, "WEBP", {}),
             "animated.gif": (picture, "GIF", {}),
             "grey16.tif": (Image.fromarray((noise[..., 0].astype(np.uint16) * 257 + 100)), "TIFF", {}),
             "grey16.png": (Image.fromarray(rng.integers(0, 65536, (24, 40)).astype(np.uint16)), "PNG", {})}
    for name, (image, kind, options) in files.items():
        image.save(tmp_path / name, kind, **options)
        decoded = pipeline.load_image(tf.constant(str(tmp_path / name))).numpy()
        expected = load_rgb(str(tmp_path / name))
        assert decoded.shape == expected.shape, name
        np.testing.assert_array_equal(np.round(decoded * 255).astype(np.uint8), expected, err_msg=name)
    assert load_rgb(str(tmp_path / "grey16.tif")).mean() < 200  # scaled, not clipped at 255
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16"


def test_annotation_without_a_decodable_image_names_both_files(tmp_path):
    writers.write_300w(str(tmp_path), 2, seed=0, image_size=(64, 64))
    os.remove(tmp_path / "00001.jpg")
    (tmp_path / "00001.xyz").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"00001\.pts: cannot pair it with an image.*tried 00001\.xyz"):
        readers.read_pts_folder(str(tmp_path))
    os.remove(tmp_path / "00001.xyz")
    with pytest.raises(DatasetError, match=r"00001\.pts: cannot pair it with an image: no file 00001\.<ext>"):
        readers.read_pts_folder(str(tmp_path))
