import numpy as np
import pytest

from larq_landmarks import metrics


def test_nme_by_hand():
    truth = np.array([[[0, 0], [10, 0]], [[0, 0], [0, 10]]], float)
    predicted = truth + np.array([[[3, 4], [0, 0]], [[0, 0], [6, 8]]], float)
    # image 1: distances 5, 0 -> mean 2.5, / 10; image 2: 0, 10 -> 5 / 20
    np.testing.assert_allclose(metrics.nme(predicted, truth, [10, 20]), [0.25, 0.25])
    # visible only: image 1 keeps point 0 (5 / 10), image 2 keeps point 1 (10 / 20)
    np.testing.assert_allclose(metrics.nme(predicted, truth, [10, 20], [[1, 0], [0, 1]]), [0.5, 0.5])
    with pytest.raises(ValueError, match="no visible points"):
        metrics.nme(predicted, truth, [1, 1], [[0, 0], [1, 1]])


def test_normalisers_by_hand():
    assert metrics.box_size(np.array([[0, 0, 4, 9]]))[0] == pytest.approx(6.0)
    points = np.zeros((1, 68, 2))
    points[0, 36] = [10, 10]
    points[0, 45] = [40, 50]
    assert metrics.inter_ocular(points)[0] == pytest.approx(50.0)
    points[0, 36:42] = [0, 0]
    points[0, 42:48] = [6, 8]
    assert metrics.inter_pupil(points)[0] == pytest.approx(10.0)


def test_nme_by_yaw_bins_and_mean_of_bins():
    errors = np.array([1.0, 3.0, 10.0, 20.0, 40.0])
    yaw = np.array([5.0, -30.0, 45.0, -59.0, 89.0])
    result = metrics.nme_by_yaw(errors, yaw)
    assert result["[0,30]"] == 2.0 and result["[30,60]"] == 15.0 and result["[60,90]"] == 40.0
    assert result["mean"] == pytest.approx(19.0)


def test_ced_auc_failure_rate_by_hand():
    errors = np.array([0.01, 0.03, 0.05, 0.2])
    thresholds, fractions = metrics.ced(errors, 0.04, steps=4)
    np.testing.assert_allclose(thresholds, [0, 0.01, 0.02, 0.03, 0.04])
    np.testing.assert_allclose(fractions, [0, 0.25, 0.25, 0.5, 0.5])
    # trapezoids: 0.01 * (0.125 + 0.25 + 0.375 + 0.5) = 0.0125, / 0.04
    assert metrics.auc(errors, 0.04, steps=4) == pytest.approx(0.3125)
    assert metrics.failure_rate(errors, 0.04) == 0.5


def test_pckh_by_hand():
    truth = np.zeros((2, 16, 2))
    predicted = truth.copy()
    predicted[0, 9] = [6, 0]  # head: 6 > 0.5 * 10 -> wrong
    predicted[0, 12] = [4, 0]  # r shoulder: right
    predicted[1, 13] = [30, 0]  # l shoulder of person 2: wrong, but ...
    visible = np.ones((2, 16), bool)
    visible[1, 13] = False  # ... not labelled: excluded
    table = metrics.pckh(predicted, truth, visible, head_sizes=[10, 10])
    assert table["Head"] == 50.0
    assert table["Shoulder"] == 100.0  # 3 of 3 labelled shoulders
    assert table["Elbow"] == 100.0
    # mean over joints other than pelvis and thorax: 28 - 1 excluded = 27 labelled, 1 wrong
    assert table["Mean"] == pytest.approx(100 * 26 / 27)


def test_pckh_auc_by_hand():
    truth = np.zeros((1, 16, 2))
    predicted = truth.copy()
    predicted[0, :, 0] = 2.0  # every joint 0.2 head sizes off (head size 10)
    predicted[0, [6, 7], 0] = 9.0  # pelvis and thorax: left out of the Mean
    visible = np.ones((1, 16), bool)
    # the Mean is 0 below 0.2 and 100 from 0.2 on; thresholds 0.01 apart: the step's trapezoid
    # counts half of 0.19-0.20, so (0.3 + 0.005) * 100 / 0.5
    assert metrics.pckh_auc(predicted, truth, visible, [10.0]) == pytest.approx(61.0)
    assert metrics.pckh_auc(predicted, truth, visible, [10.0], max_alpha=0.1, steps=10) == 0.0
    # 7 of the 14 joints of the Mean 0.1 off, 7 0.3: the curve at 0, 0.1, ..., 0.5 is 0, 50, 50,
    # 100, 100, 100; trapezoids 2.5 + 5 + 7.5 + 10 + 10, over 0.5
    predicted[0, ::2, 0] = 1.0
    predicted[0, 1::2, 0] = 3.0
    assert metrics.pckh_auc(predicted, truth, visible, [10.0], steps=5) == pytest.approx(70.0)
    with pytest.raises(ValueError, match="max_alpha=0 must be positive"):
        metrics.pckh_auc(predicted, truth, visible, [10.0], max_alpha=0)


def test_segmentation_scores_by_hand():
    truth = np.array([[0, 0, 1, 1], [0, 2, 2, 2]])
    predicted = np.array([[0, 1, 1, 1], [0, 2, 2, 0]])
    # confusion: class 0: t=3, n00=2; class 1: t=2, n11=2, predicted 3; class 2: t=3, n22=2, predicted 2
    scores = metrics.segmentation_scores(predicted, truth, num_classes=3)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 6 / 8)
    assert scores["mean_accuracy"] == pytest.approx(100 * (2 / 3 + 1 + 2 / 3) / 3)
    # IU: 0: 2 / (3 + 3 - 2) ; 1: 2 / (2 + 3 - 2) ; 2: 2 / (3 + 2 - 2)
    assert scores["mean_iu"] == pytest.approx(100 * (0.5 + 2 / 3 + 2 / 3) / 3)


def test_bad_arguments_are_named():
    points = np.zeros((2, 68, 2))
    cases = [
        (lambda: metrics.nme(points[:, :5], points, [1, 1]), r"predicted \(2, 5, 2\) and truth \(2, 68, 2\) differ"),
        (lambda: metrics.nme(points, points, [1, 1, 1]), r"normaliser must have shape \(2,\), got \(3,\)"),
        (lambda: metrics.nme(points, points, [1, 0]), "normaliser must be positive and finite: image 1 has 0"),
        (lambda: metrics.nme(points, points, [1, np.nan]), "normaliser must be positive and finite: image 1"),
        (lambda: metrics.nme(points, points, [1, 1], np.ones((2, 5))), r"visible must have shape \(2, 68\)"),
        (lambda: metrics.nme(points[0], points[0], [1]), r"predicted must have shape \(N, K, 2\), got \(68, 2\)"),
        (lambda: metrics.inter_ocular(points[:, :5]), r"points must have shape \(N, 68, 2\), got \(2, 5, 2\)"),
        (lambda: metrics.box_size([0, 0, 1, 1]), r"box must have shape \(N, 4\)"),
        (lambda: metrics.auc([]), "errors must be a non-empty 1-d array"),
        (lambda: metrics.failure_rate(np.zeros((2, 2))), "errors must be a non-empty 1-d array"),
        (lambda: metrics.pckh(points[:, :14], points[:, :14], np.ones((2, 14)), [1, 1]),
         r"predicted must have shape \(N, 16, 2\)"),
        (lambda: metrics.pckh(points[:, :16], points[:, :16], np.ones((2, 16)), [1, -1]),
         "head_sizes must be positive and finite: image 1 has -1"),
        (lambda: metrics.segmentation_scores(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)), 7), "differ in shape"),
        (lambda: metrics.segmentation_scores(np.full((2, 2), 7), np.zeros((2, 2)), 7),
         r"predicted must hold class indices 0..6, got values in \[7, 7\]"),
        (lambda: metrics.segmentation_scores(np.zeros((2, 2)), np.full((2, 2), 0.5), 7), "truth must hold class indices"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_a_nan_prediction_is_a_failure_everywhere_and_invisible_points_do_not_count():
    errors = np.array([0.01, np.nan])  # a model that output NaN for image 2
    assert metrics.failure_rate(errors, 0.05) == 0.5  # as the CED counts it: never within a threshold
    np.testing.assert_allclose(metrics.ced(errors, 0.05, steps=1)[1], [0.0, 0.5])
    truth = np.zeros((1, 2, 2))
    predicted = np.array([[[3.0, 4.0], [np.nan, np.nan]]])
    assert np.isnan(metrics.nme(predicted, truth, [1.0]))[0]
    assert metrics.nme(predicted, truth, [1.0], visible=[[True, False]])[0] == 5.0


def test_per_image_errors_by_hand():
    from larq_landmarks.evaluation import per_image_errors

    truth = np.zeros((2, 16, 2))
    predicted = np.zeros((2, 16, 2))
    predicted[0, :4, 0] = 3.0  # image 0: 4 joints 3 px off, head size 4 (0.75 > 0.5): 10 of 14 used joints correct
    predicted[0, 6, 0] = 30.0  # pelvis: left out, as PCKh's Mean leaves it out
    predicted[1, :, 0] = 1.0  # image 1: all 1 px off, head size 4; only joints 0-2 labelled
    visible = np.ones((2, 16), bool)
    visible[1, 3:] = False
    result = {"points": truth, "predicted": predicted, "visible": visible, "head_size": np.array([4.0, 4.0]),
              "image_path": np.array([b"a.jpg", b"b.jpg"])}
    rows = per_image_errors(result, "pose")
    assert rows["image_path"].tolist() == ["a.jpg", "b.jpg"]
    np.testing.assert_allclose(rows["pckh_%"], [100 * 10 / 14, 100.0])
    visible[1] = False
    assert np.isnan(per_image_errors(result, "pose")["pckh_%"][1])
    # faces: the mean distance over the box's sqrt(w * h); a hidden point counts only in the first
    faces = {"points": np.array([[[0.0, 0.0], [10.0, 0.0], [0.0, 40.0]]]),
             "predicted": np.array([[[3.0, 4.0], [10.0, 0.0], [0.0, 40.0]]]),
             "visible": np.array([[True, False, True]]), "box": np.array([[0.0, 0.0, 10.0, 40.0]]),
             "yaw": np.array([35.0]), "image_path": np.array(["c.png"])}
    rows = per_image_errors(faces, "face")
    np.testing.assert_allclose(rows["nme_box_%"], [100 * (5 / 3) / 20])
    np.testing.assert_allclose(rows["nme_box_visible_%"], [100 * (5 / 2) / 20])
    assert rows["yaw_degrees"].tolist() == [35.0] and "nme_inter_ocular_%" not in rows


def test_300w_subsets_are_the_image_folders_of_ibugs_layout():
    for path, subset in [
        ("/data/300W/lfpw/testset/image_0001.png", "common"),
        ("C:\\data\\Helen\\testset\\2815171722_1.jpg", "common"),
        ("ibug/image_003_1.jpg", "challenging"),
        ("/d/300W/01_Indoor/indoor_001.png", "indoor"),
        ("/d/300W/02_Outdoor/outdoor_300.png", "outdoor"),
        ("/home/ibug/300W/afw/1051618982_1.jpg", ""),  # only the image's own folder counts
        ("/d/lfpw/trainset/image_0001.png", ""),
        ("/d/afw/testset/x.png", ""),  # a testset of another data set
        ("image_003_1.jpg", ""),
    ]:
        assert metrics.w300_subset(path) == subset, path


def test_300w_tables_by_hand():
    ocular = np.array([0.02, 0.04, 0.09, 0.5, 0.03, 0.07, 0.10])
    pupil = 2 * ocular
    subsets = ["common", "common", "challenging", "", "indoor", "outdoor", "outdoor"]
    tables = metrics.w300_tables(ocular, pupil, subsets)
    assert tables["300W NME inter-ocular %"] == pytest.approx({"common": 3.0, "challenging": 9.0, "full": 5.0})
    assert tables["300W NME inter-pupil %"] == pytest.approx({"common": 6.0, "challenging": 18.0, "full": 10.0})
    private = tables["300W private test, inter-ocular"]
    assert private["NME indoor %"] == pytest.approx(3.0) and private["NME outdoor %"] == pytest.approx(8.5)
    assert private["NME indoor + outdoor %"] == pytest.approx(20 / 3)
    assert private["failures@0.08"] == pytest.approx(1 / 3)  # 0.10 of 0.03, 0.07, 0.10
    # the CED of 0.03, 0.07, 0.10 up to 0.08: 1/3 from 0.03, 2/3 from 0.07: (0.04 / 3 + 0.01 * 2 / 3) / 0.08
    assert private["AUC@0.08"] == pytest.approx((0.04 / 3 + 0.01 * 2 / 3) / 0.08, abs=1e-3)  # 0.25
    assert tables["300W images"] == {"common": 2, "challenging": 1, "full": 3, "private indoor": 1,
                                     "private outdoor": 2, "private indoor + outdoor": 3}
    # one subset alone: no "full", no private table; no 300W folder at all: no tables
    assert metrics.w300_tables(ocular[:2], pupil[:2], subsets[:2]) == {
        "300W NME inter-ocular %": {"common": pytest.approx(3.0)},
        "300W NME inter-pupil %": {"common": pytest.approx(6.0)}, "300W images": {"common": 2}}
    assert metrics.w300_tables(ocular[3:4], pupil[3:4], [""]) == {}
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.w300_tables(ocular, pupil, subsets[:3])
