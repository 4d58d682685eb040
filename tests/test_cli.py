"""The larq-landmarks command line: train, evaluate, predict (issue 4)."""
import json
import os
import re
import warnings

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from larq_landmarks import cli, evaluation, metrics, visualize
from larq_landmarks.datasets import writers
from larq_landmarks.layouts import FACE_PART_CLASSES
from larq_landmarks.models import BinaryHourglass
from larq_landmarks.predictor import Predictor

SMALL = {"input_size": 64, "width": 32, "depth": 1, "batch_size": 4, "epochs": 2, "steps_per_epoch": 3, "quiet": True}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained through `larq-landmarks train --config` on synthetic 300W files."""
    root = tmp_path_factory.mktemp("cli")
    writers.write_300w(str(root / "train"), 12, seed=1, image_size=(120, 120))
    writers.write_300w(str(root / "test"), 6, seed=2, image_size=(120, 120))
    config = root / "train.json"
    config.write_text(json.dumps({"format": "300w", "data": str(root / "train"), "input_quantizer": "approx_sign",
                                  **SMALL}))
    assert cli.main(["train", "--config", str(config), "--out", str(root / "run")]) == 0
    return root


def test_train_writes_model_and_logs(trained):
    assert (trained / "run" / "model.keras").exists()
    model = tf.keras.models.load_model(trained / "run" / "model.keras")
    binary = [l for l in model.layers if getattr(l, "input_quantizer", None) is not None]
    assert binary and {l.input_quantizer.__class__.__name__ for l in binary} == {"ApproxSign"}
    assert (trained / "run" / "stage1" / "model.keras").exists()  # binary networks train in two stages
    assert list((trained / "run" / "logs" / "images").glob("events.out.tfevents.*"))


@pytest.mark.slow  # 20-26 s of training; the fast tier keeps test_training's Distiller tests
def test_train_distils_from_a_teacher_and_saves_the_student(trained, tmp_path):
    """--teacher: both stages train a Distiller; every model.keras written is the plain student."""
    teacher = tmp_path / "teacher.keras"
    BinaryHourglass(68, width=32, input_size=64, depth=1, binary=False).save(teacher)
    config = tmp_path / "distil.json"
    config.write_text(json.dumps({"format": "300w", "data": str(trained / "train"), "teacher": str(teacher),
                                  "attention_weight": 0.01, **SMALL}))
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    for folder in (tmp_path / "run", tmp_path / "run" / "stage1"):
        student = tf.keras.models.load_model(folder / "model.keras")
        assert type(student).__name__ == "Functional" and student.output_shape == (None, 16, 16, 68)
    assert [l for l in student.layers if getattr(l, "input_quantizer", None) is not None]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["options"]["attention_weight"] == 0.01
    pose = tmp_path / "pose.keras"
    BinaryHourglass(16, width=32, input_size=64, depth=1, binary=False).save(pose)
    config.write_text(json.dumps({"format": "300w", "data": str(trained / "train"), "teacher": str(pose), **SMALL}))
    with pytest.raises(SystemExit, match=r"--teacher .*pose.keras: student output .* and teacher output .* differ"):
        cli.main(["train", "--config", str(config), "--out", str(tmp_path / "other")])
    config.write_text(json.dumps({"format": "300w", "data": str(trained / "train"), "first_fraction": 1.5, **SMALL}))
    with pytest.raises(SystemExit, match=r"--first-fraction: first_fraction=1.5 must be between 0 and 1"):
        cli.main(["train", "--config", str(config), "--out", str(tmp_path / "fourth")])
    with pytest.raises(SystemExit, match="model '.*nowhere.keras' not found"):
        cli.main(["train", "--format", "300w", "--data", str(trained / "train"), "--teacher",
                  str(tmp_path / "nowhere.keras"), "--out", str(tmp_path / "third")])


def test_evaluate_prints_the_papers_tables_and_writes_json(trained, capsys, tmp_path):
    out, errors = tmp_path / "eval.json", tmp_path / "errors.csv"
    assert cli.main(["evaluate", "--model", str(trained / "run" / "model.keras"), "--format", "300w",
                     "--data", str(trained / "test"), "--json", str(out), "--flip-test", "--per-image", str(errors)]) == 0
    printed = capsys.readouterr().out
    assert "### NME" in printed and "NME inter-ocular %" in printed
    report = json.loads(out.read_text())
    assert report["count"] == 6 and report["flip_test"] is True
    assert set(report["tables"]["NME"]) >= {"NME box %", "NME inter-ocular %", "AUC@0.07 box"}
    # each image's error, in file order: their mean is the table's NME
    lines = errors.read_text().splitlines()
    assert lines[0] == "model,image_path,nme_box_%,nme_inter_ocular_%" and len(lines) == 7
    rows = [line.split(",") for line in lines[1:]]
    assert [os.path.basename(r[1]) for r in rows] == [f"{i:05d}.jpg" for i in range(6)]
    table = json.loads(out.read_text())["tables"]["NME"]
    assert np.mean([float(r[2]) for r in rows]) == pytest.approx(table["NME box %"], abs=1e-3)
    assert np.mean([float(r[3]) for r in rows]) == pytest.approx(table["NME inter-ocular %"], abs=1e-3)
    # a binary model and its real-valued twin on the same data: each one's tables, then side by side
    twin = tmp_path / "twin.keras"
    BinaryHourglass(68, width=32, input_size=64, depth=1, binary=False).save(twin)
    binary = str(trained / "run" / "model.keras")
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", binary, str(twin), "--format", "300w", "--data", str(trained / "test"),
                     "--json", str(out), "--per-image", str(errors), "--ced", str(tmp_path / "ced.png")]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [m["model"] for m in report["models"]] == [binary, str(twin)] and report["format"] == "300w"
    for m in report["models"]:  # each row of the side-by-side table is that model's own table
        nme = m["tables"]["NME"]
        assert f"| {m['model']} | " + " | ".join(evaluation._number("NME", k, v) for k, v in nme.items()) + " |" in printed
    assert "### NME, side by side" in printed and printed.count("### NME\n") == 2
    lines = errors.read_text().splitlines()
    assert len(lines) == 13 and {line.split(",")[0] for line in lines[1:]} == {binary, str(twin)}
    assert Image.open(tmp_path / "ced.png").size == (480, 360)


@pytest.mark.slow  # over 10 s on 2 cores; the fast tier covers `evaluate` on 300W files
def test_evaluate_aflw2000_by_yaw_and_mpii_pckh(tmp_path, capsys):
    writers.write_aflw2000(str(tmp_path / "aflw"), 6, seed=3, image_size=(120, 120))
    face = tmp_path / "face.keras"
    BinaryHourglass(68, width=32, input_size=64, depth=1).save(face)
    assert cli.main(["evaluate", "--model", str(face), "--format", "aflw2000", "--data", str(tmp_path / "aflw"),
                     "--per-image", str(tmp_path / "aflw.csv")]) == 0
    assert "[0,30] | [30,60] | [60,90] | mean" in capsys.readouterr().out
    assert (tmp_path / "aflw.csv").read_text().splitlines()[0] == \
        "model,image_path,nme_box_%,nme_inter_ocular_%,yaw_degrees"
    _, valid = writers.write_mpii_json(str(tmp_path / "mpii"), 8, seed=4, image_size=(120, 120))
    pose = tmp_path / "pose.keras"
    BinaryHourglass(16, width=32, input_size=64, depth=1).save(pose)
    assert cli.main(["evaluate", "--model", str(pose), "--format", "mpii-json", "--data", valid, "--images",
                     str(tmp_path / "mpii" / "images"), "--per-image", str(tmp_path / "mpii.csv")]) == 0
    lines = (tmp_path / "mpii.csv").read_text().splitlines()
    assert lines[0] == "model,image_path,pckh_%" and len(lines) == 1 + 2  # valid.json: 2 of the 8 people
    with pytest.raises(SystemExit, match="--ced plots faces' NME; format 'mpii-json' is scored by PCKh"):
        cli.main(["evaluate", "--model", str(pose), "--format", "mpii-json", "--data", valid, "--images",
                  str(tmp_path / "mpii" / "images"), "--ced", str(tmp_path / "pose.png")])
    printed = capsys.readouterr().out
    assert "PCKh@0.5 %" in printed and "| Head | Shoulder | Elbow | Wrist | Hip | Knee | Ankle | Mean |" in printed
    assert "### PCKh Mean % by threshold\n\n| @0.1 | @0.5 | AUC 0-0.5 |" in printed
    pckh_mean = re.search(r"\| Mean \|\n\|(?:---:\|)+\n\|(?: [0-9.]+ \|){7} ([0-9.]+) \|", printed).group(1)
    assert re.search(r"\| @0.1 \| @0.5 \| AUC 0-0.5 \|\n\|(?:---:\|)+\n\| [0-9.]+ \| ([0-9.]+) \|", printed).group(1) \
        == pckh_mean  # the same Mean as the PCKh@0.5 table's
    with pytest.raises(SystemExit, match="outputs 68 channels but format 'mpii-json'"):
        cli.main(["evaluate", "--model", str(face), "--format", "mpii-json", "--data", valid,
                  "--images", str(tmp_path / "mpii" / "images")])
    # a 16-joint model is a pose model: person boxes, given (only faces are detected), no --person needed
    image = str(next((tmp_path / "mpii" / "images").iterdir()))
    with pytest.raises(SystemExit, match=r"pose.keras is a pose model \(16 joints\): give the person boxes with --box"):
        cli.main(["predict", image, "--model", str(pose), "--out", str(tmp_path / "none")])
    assert cli.main(["predict", image, "--model", str(pose), "--box", "10,10,100,110", "--out",
                     str(tmp_path / "pose")]) == 0
    assert np.asarray(json.loads((tmp_path / "pose" / "landmarks.json").read_text())[image]["landmarks"]).shape == \
        (1, 16, 2)
    # --track: the images are frames; each box is the box of the joints found in the frame before
    frames = []
    for t in range(3):
        frames.append(str(tmp_path / f"frame{t}.png"))
        Image.open(image).save(frames[-1])
    with pytest.raises(SystemExit, match=r"--detect-every is for --track \(without it every image is searched\)"):
        cli.main(["predict", *frames, "--model", str(pose), "--box", "10,10,100,110", "--detect-every", "2"])
    assert cli.main(["predict", *frames, "--model", str(pose), "--box", "10,10,100,110", "--track",
                     "--detect-every", "2", "--out", str(tmp_path / "video")]) == 0  # no person detector: kept
    result = json.loads((tmp_path / "video" / "landmarks.json").read_text())
    assert result[frames[0]]["boxes"] == [[10, 10, 100, 110]]
    for before, now in zip(frames, frames[1:]):
        points = np.asarray(result[before]["landmarks"])
        if len(points):
            x1, y1, x2, y2 = *points[0].min(0), *points[0].max(0)
            inside = x2 > 0 and y2 > 0 and x1 < 120 and y1 < 120  # else the person left the picture
            assert len(result[now]["boxes"]) == inside
            if inside:
                np.testing.assert_allclose(result[now]["boxes"][0], [x1, y1, x2, y2], rtol=1e-5)


@pytest.mark.slow  # trains twice (23 s); the fast tier has test_training's SaveBestModel tests
def test_train_scores_validation_data_after_each_epoch_and_keeps_the_best(trained, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--input-size", "64", "--width", "32", "--depth", "1", "--batch-size", "4", "--steps-per-epoch", "3",
             "--quiet", "--format", "300w", "--data", str(trained / "train"), "--out", str(out)]
    assert cli.main(["train", *flags, "--epochs", "3", "--validation-data", str(trained / "test")]) == 0
    printed = capsys.readouterr().out
    binary = printed[printed.index("stage 2 of 2"):]  # best.keras is of the binary network's epochs
    scores = [float(v) for v in re.findall(r"val_nme: ([0-9.]+)", binary)]
    assert len(scores) == 2 and len(re.findall(r"val_nme: ", printed)) == 3  # stage 1 is scored too
    best = json.loads((out / "best.keras.json").read_text())
    assert best["metric"] == "val_nme" and best["value"] == pytest.approx(min(scores), abs=1e-4)
    assert best["epoch"] == 1 + scores.index(min(scores))
    assert f"best on the validation data: epoch {best['epoch']} of stage 2, val_nme {best['value']:.4f}" in printed
    kept = tf.keras.models.load_model(out / "best.keras")
    assert kept.count_params() == tf.keras.models.load_model(out / "model.keras").count_params()
    # resuming with other validation data is refused; --overwrite starts again without the old best
    (out / "backup").mkdir(exist_ok=True)
    (out / "backup" / "chief").write_text("an interrupted run")
    with pytest.raises(SystemExit, match=r"--validation-data \['.*test'\] then, None now"):
        cli.main(["train", *flags, "--epochs", "3"])
    assert cli.main(["train", *flags, "--epochs", "1", "--overwrite"]) == 0
    assert not (out / "best.keras").exists() and not (out / "best.keras.json").exists()


@pytest.mark.slow  # over 10 s on 2 cores
def test_300w_folders_are_scored_by_subset_and_training_on_its_test_images_is_warned(tmp_path, capsys, monkeypatch):
    """In iBUG's folders of 300W: several --data folders read as one data set; the common,
    challenging and full sets and the private test set get their own tables, each figure the mean
    of its images' rows in --per-image; train warns when --data holds the test images."""
    root = tmp_path / "300W"
    writers.write_300w_folders(str(root), 2, seed=3, image_size=(96, 96))
    face = tmp_path / "face.keras"
    BinaryHourglass(68, width=32, input_size=64, depth=1).save(face)
    test = [str(root / "lfpw" / "testset"), str(root / "helen" / "testset"), str(root / "ibug"),
            str(root / "300W" / "01_Indoor"), str(root / "300W" / "02_Outdoor")]
    out, errors = tmp_path / "eval.json", tmp_path / "errors.csv"
    plotted = type("Curves", (dict,), {})()
    draw = visualize.ced_plot

    def ced_plot(curves, x_label):
        plotted.update(curves)
        plotted.x_label = x_label
        return draw(curves, x_label=x_label)

    monkeypatch.setattr(visualize, "ced_plot", ced_plot)
    assert cli.main(["evaluate", "--model", str(face), "--format", "300w", "--data", *test, str(root / "afw"),
                     "--json", str(out), "--per-image", str(errors), "--ced", str(tmp_path / "ced.png")]) == 0
    printed = capsys.readouterr().out
    assert ("note: 2 of the 12 faces read are not in 300W's test folders (its training sets, say): the NME table "
            "counts them, the 300W tables do not") in printed
    assert "### 300W NME inter-ocular %\n\n| common | challenging | full |" in printed
    assert "### 300W images\n\n| common | challenging | full | private indoor | private outdoor | private indoor " \
           "+ outdoor |\n|---:|---:|---:|---:|---:|---:|\n| 4 | 2 | 6 | 2 | 2 | 4 |" in printed
    report = json.loads(out.read_text())
    assert report["count"] == 12 and report["data"] == test + [str(root / "afw")]
    tables = report["tables"]
    assert tables["300W images"] == {"common": 4, "challenging": 2, "full": 6, "private indoor": 2,
                                     "private outdoor": 2, "private indoor + outdoor": 4}
    rows = [line.split(",") for line in errors.read_text().splitlines()]
    assert rows[0] == ["model", "image_path", "nme_box_%", "nme_inter_ocular_%", "w300_subset"]
    ocular = {name: [float(r[3]) for r in rows[1:] if r[4] in members] for name, members in
              (("common", {"common"}), ("challenging", {"challenging"}), ("full", {"common", "challenging"}))}
    assert tables["300W NME inter-ocular %"] == pytest.approx({k: np.mean(v) for k, v in ocular.items()}, abs=1e-3)
    private = [float(r[3]) for r in rows[1:] if r[4] in ("indoor", "outdoor")]
    assert tables["300W private test, inter-ocular"]["NME indoor + outdoor %"] == pytest.approx(np.mean(private),
                                                                                                 abs=1e-3)
    assert tables["NME"]["NME inter-ocular %"] == pytest.approx(np.mean([float(r[3]) for r in rows[1:]]), abs=1e-3)
    # the CED: each set's inter-ocular curve up to 0.08, from its faces' rows
    assert Image.open(tmp_path / "ced.png").size == (480, 360)
    assert list(plotted) == ["common", "challenging", "private"] and plotted.x_label == "NME (inter-ocular)"
    for name, members in (("common", {"common"}), ("challenging", {"challenging"}), ("private", {"indoor", "outdoor"})):
        expected = metrics.ced(np.array([float(r[3]) for r in rows[1:] if r[4] in members]) / 100, 0.08)
        np.testing.assert_allclose(plotted[name], expected, atol=1e-5)
    # 300W-LP's IBUG folder holds views synthesised from iBUG to train on: not the challenging subset
    writers.write_300w_lp(str(tmp_path / "300W_LP" / "IBUG"), 2, seed=4, image_size=(96, 96))
    assert cli.main(["evaluate", "--model", str(face), "--format", "300w-lp", "--data", str(tmp_path / "300W_LP"),
                     "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())["tables"]) == ["NME", "NME box % by |yaw| (AFLW2000-3D layout)"]
    with pytest.raises(SystemExit, match="nowhere"):
        cli.main(["train", "--format", "300w-lp", "--data", str(tmp_path / "300W_LP"), "--model", "nowhere",
                  "--out", str(tmp_path / "r")])
    assert "warning" not in capsys.readouterr().err
    # training: the whole folder holds the test images, the three training sets do not
    for data, warned in (([str(root)], True), ([str(root / f) for f in ("afw", "lfpw/trainset", "helen/trainset")],
                                               False)):
        with pytest.raises(SystemExit, match="nowhere"):  # fails after reading the data, before training
            cli.main(["train", "--format", "300w", "--data", *data, "--model", "nowhere", "--out", str(tmp_path / "r")])
        said = capsys.readouterr().err
        assert ("warning: the training images include 300W's test images (4 of the common subset, 2 of the "
                "challenging subset, 2 of the indoor subset, 2 of the outdoor subset)" in said) is warned


@pytest.mark.slow  # trains, converts and runs a segmentation model: 30 s (the fast tier has test_inference's)
def test_segmentation_train_and_evaluate(trained, tmp_path, capsys):
    run = tmp_path / "seg"
    assert cli.main(["train", "--format", "300w", "--data", str(trained / "train"), "--task", "segmentation",
                     "--out", str(run), "--input-size", "64", "--width", "32", "--depth", "1",
                     "--batch-size", "4", "--epochs", "1", "--steps-per-epoch", "2", "--quiet"]) == 0
    assert cli.main(["evaluate", "--model", str(run / "model.keras"), "--format", "300w", "--task", "segmentation",
                     "--data", str(trained / "test")]) == 0
    assert "| pixel_accuracy | mean_accuracy | mean_iu |" in capsys.readouterr().out
    assert cli.main(["evaluate", "--model", str(run / "model.keras"), "--format", "300w", "--task", "segmentation",
                     "--data", str(trained / "test"), "--flip-test"]) == 0
    assert "| pixel_accuracy | mean_accuracy | mean_iu |" in capsys.readouterr().out
    # the parts of your own images, from the Keras model and from its converted file
    assert cli.main(["convert", str(run / "model.keras"), str(run / "model.tflite")]) == 0
    image = str(trained / "test" / "00000.jpg")
    maps = []
    for model in ("model.keras", "model.tflite"):
        out = tmp_path / model.replace(".", "_")
        assert cli.main(["predict", image, "--model", str(run / model), "--task", "segmentation",
                         "--box", "20,20,100,100", "--out", str(out)]) == 0
        result = json.loads((out / "parts.json").read_text())[image]
        mask = np.asarray(Image.open(out / result["mask"]))
        assert mask.shape == (120, 120) and mask.max() <= 6
        assert result["pixels"] == dict(zip(FACE_PART_CLASSES, np.bincount(mask.ravel(), minlength=7).tolist()))
        assert Image.open(out / "00000_parts.png").size == (120, 120)
        maps.append(mask)
    assert (maps[0] == maps[1]).mean() > 0.99  # the bit-packed file segments as Keras does (1.0 here)
    # without --task: 7 output channels are the part classes; --task heatmaps reads them as 7 "landmarks"
    assert cli.main(["predict", image, "--model", str(run / "model.tflite"), "--box", "20,20,100,100",
                     "--out", str(tmp_path / "inferred")]) == 0
    result = json.loads((tmp_path / "inferred" / "parts.json").read_text())[image]
    assert (np.asarray(Image.open(tmp_path / "inferred" / result["mask"])) == maps[1]).all()
    assert cli.main(["predict", image, "--model", str(run / "model.tflite"), "--box", "20,20,100,100",
                     "--task", "heatmaps", "--out", str(tmp_path / "as_landmarks")]) == 0
    points = json.loads((tmp_path / "as_landmarks" / "landmarks.json").read_text())[image]["landmarks"]
    assert np.asarray(points).shape == (1, 7, 2)
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(run / "model.tflite"), "--format", "300w",
                     "--data", str(trained / "test"), "--flip-test"]) == 0
    assert "| pixel_accuracy | mean_accuracy | mean_iu |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="outputs 68 channels; a part segmentation model outputs 7"):
        cli.main(["predict", image, "--model", str(trained / "run" / "model.keras"), "--task", "segmentation",
                  "--box", "20,20,100,100", "--out", str(tmp_path / "wrong")])
    with pytest.raises(SystemExit, match="trained for different tasks \\(heatmaps, segmentation\\): evaluate them apart"):
        cli.main(["evaluate", "--model", str(run / "model.keras"), str(trained / "run" / "model.keras"),
                  "--format", "300w", "--data", str(trained / "test")])
    with pytest.raises(SystemExit, match="--ced plots landmark errors; a part segmentation model has none"):
        cli.main(["evaluate", "--model", str(run / "model.keras"), "--format", "300w", "--data", str(trained / "test"),
                  "--ced", str(tmp_path / "parts.png")])
    # each image's scores: its masks have as many pixels as any other, so their pixel accuracies average
    # to the table's
    assert cli.main(["evaluate", "--model", str(run / "model.keras"), "--format", "300w", "--data",
                     str(trained / "test"), "--per-image", str(tmp_path / "parts.csv"),
                     "--json", str(tmp_path / "parts.json")]) == 0
    lines = (tmp_path / "parts.csv").read_text().splitlines()
    assert lines[0] == "model,image_path,pixel_accuracy_%,mean_accuracy_%,mean_iu_%" and len(lines) == 7
    table = json.loads((tmp_path / "parts.json").read_text())["tables"]["Part segmentation %"]
    assert np.mean([float(line.split(",")[2]) for line in lines[1:]]) == pytest.approx(table["pixel_accuracy"],
                                                                                        abs=1e-3)
    with pytest.raises(SystemExit, match="--track follows landmarks from frame to frame; a part segmentation"):
        cli.main(["predict", image, "--model", str(run / "model.keras"), "--track", "--box", "20,20,100,100"])
    for task in (["--task", "segmentation"], []):
        with pytest.raises(SystemExit, match="--person is for pose models; .* is a part segmentation model"):
            cli.main(["predict", image, "--model", str(run / "model.keras"), *task, "--person",
                      "--box", "20,20,100,100"])


def test_predict_writes_landmarks_and_overlays(trained, tmp_path):
    image = str(trained / "test" / "00000.jpg")
    assert cli.main(["predict", image, "--model", str(trained / "run" / "model.keras"),
                     "--box", "20,20,100,100", "--box", "10,10,60,60", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "landmarks.json").read_text())
    assert len(result[image]["landmarks"]) == 2 and len(result[image]["landmarks"][0]) == 68
    assert Image.open(tmp_path / "00000_landmarks.png").size == (120, 120)
    with pytest.raises(SystemExit, match="zero or negative size"):
        cli.main(["predict", image, "--model", str(trained / "run" / "model.keras"), "--box", "5,5,5,9",
                  "--out", str(tmp_path)])
    # folders stand for their images in name order; pictures of same-named images in two folders both kept
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for name in ("0002.png", "0001.jpg"):
            Image.open(image).save(tmp_path / folder / name)
        (tmp_path / folder / "notes.txt").write_text("not an image")
    out = tmp_path / "folders"
    assert cli.main(["predict", str(tmp_path / "a"), str(tmp_path / "b"), "--model",
                     str(trained / "run" / "model.keras"), "--box", "20,20,100,100", "--out", str(out)]) == 0
    expected = [str(tmp_path / f / n) for f in ("a", "b") for n in ("0001.jpg", "0002.png")]
    assert list(json.loads((out / "landmarks.json").read_text())) == expected
    pictures = sorted(p.name for p in out.glob("*_landmarks.png"))
    assert len(pictures) == 4 and all("_a_000" in p or "_b_000" in p for p in pictures)
    assert cli._picture_stems(["x/1.png", "y/2.png", "x/1.png"]) == ["1", "2", "1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: a folder without images"):
        cli.main(["predict", str(tmp_path / "empty"), "--model", str(trained / "run" / "model.keras")])


def test_bad_config_and_missing_data_are_named(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"format": "300w", "data": "x", "colour": 3}))
    with pytest.raises(SystemExit, match=r"unknown options \['colour'\]"):
        cli.main(["train", "--config", str(config), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="nowhere: data-set folder not found"):
        cli.main(["train", "--format", "300w", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    for bad, message in [({"batch_size": 0}, "batch_size=0: 0 is not at least 1"),
                         ({"batch_size": 2.5}, "batch_size=2.5: invalid literal"),
                         ({"learning_rate": -1e-3}, "learning_rate=-0.001: -0.001 is not a positive number")]:
        config.write_text(json.dumps({"format": "300w", "data": "x", **bad}))  # checked as its flag is
        with pytest.raises(SystemExit, match=rf"larq-landmarks train: config .*c.json'?: {message}"):
            cli.main(["train", "--config", str(config), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--epochs", "0"), ("--steps-per-epoch", "-1"),
                                          ("--learning-rate", "0"), ("--learning-rate", "nan"), ("--sigma", "-1"),
                                          ("--attention-weight", "-1")])
def test_bad_training_numbers_are_named_before_anything_starts(option, value, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--format", "300w", "--data", "x", "--out", str(tmp_path / "o"), option, value])
    assert exit.value.code == 2 and f"argument {option}: {value} is not" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "predict", "convert", "benchmark"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_rerunning_a_finished_train_is_refused_and_options_are_checked(trained, tmp_path):
    config = trained / "train.json"
    model = trained / "run" / "model.keras"
    stamp = model.stat().st_mtime_ns
    with pytest.raises(SystemExit, match="holds a finished run.*--overwrite"):
        cli.main(["train", "--config", str(config), "--out", str(trained / "run")])
    assert model.stat().st_mtime_ns == stamp  # the trained model is untouched
    # an interrupted run (a backup and run.json) resumes only with the options it started with
    run = tmp_path / "run"
    (run / "backup").mkdir(parents=True)
    (run / "backup" / "checkpoint").write_text("a checkpoint of epoch 1")
    (run / "run.json").write_text(json.dumps({"options": {"width": 64, "model": "binary_hpm"}}))
    with pytest.raises(SystemExit, match=r"other options \(--width 64 then, 32 now\)"):
        cli.main(["train", "--config", str(config), "--out", str(run)])
    args = cli.build_parser().parse_args(["train", "--format", "300w", "--data", "x", "--out", str(run), "--overwrite"])
    cli._check_rerun(args)  # --overwrite clears the interrupted run's state
    assert not (run / "backup").exists() and not (run / "run.json").exists()


def test_ctrl_c_during_training_is_one_line_saying_how_to_resume(trained, tmp_path, monkeypatch):
    import tensorflow as tf

    def interrupted(model, *args, **kwargs):
        (tmp_path / "run" / "stage1" / "backup" / "chief").mkdir(parents=True)  # as if an epoch had finished
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.keras.Model, "fit", interrupted)
    with pytest.raises(SystemExit, match=r"interrupted; the last finished epoch is backed up in .*stage1.backup: "
                                         "run the same command again to resume"):
        cli.main(["train", "--config", str(trained / "train.json"), "--out", str(tmp_path / "run")])


def test_predict_writes_nothing_when_an_image_fails_and_convert_refuses_a_folder(trained, tmp_path, monkeypatch):
    good = next((trained / "test").glob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / "predictions"
    with pytest.raises(SystemExit, match="broken.jpg: image cannot be decoded"):
        cli.main(["predict", str(good), str(broken), "--model", str(trained / "run" / "model.keras"),
                  "--box", "0,0,60,60", "--out", str(out)])
    assert not out.exists()
    with pytest.raises(SystemExit, match="is a folder; give the .tflite file"):
        cli.main(["convert", str(trained / "run" / "model.keras"), str(tmp_path)])
    # --out naming a file: refused before the model is loaded or any image read
    taken = tmp_path / "taken"
    taken.write_text("kept")
    with monkeypatch.context() as patch:
        patch.setattr(Predictor, "from_path", lambda *a, **k: pytest.fail("loaded the model first"))
        with pytest.raises(SystemExit, match="--out .*taken is a file, not a folder"):
            cli.main(["predict", str(good), "--model", str(trained / "run" / "model.keras"), "--box", "0,0,60,60",
                      "--out", str(taken)])
    assert taken.read_text() == "kept"
    # a converted file given to convert: said to be one (Keras read it as a broken HDF5 file)
    tflite = tmp_path / "model.tflite"
    assert cli.main(["convert", str(trained / "run" / "model.keras"), str(tflite)]) == 0
    with pytest.raises(SystemExit, match=r"model.tflite' is a converted .tflite; convert takes the Keras model"):
        cli.main(["convert", str(tflite), str(tmp_path / "again.tflite")])
    (tmp_path / "folder.tflite").mkdir()  # was an IsADirectoryError traceback from the runtime
    with pytest.raises(SystemExit, match="folder.tflite: a folder, not a .tflite file"):
        cli.main(["predict", str(good), "--model", str(tmp_path / "folder.tflite"), "--box", "0,0,60,60",
                  "--out", str(out)])


EVALUATE = ["evaluate", "--format", "300w", "--data", "data", "--model", "model.keras"]


@pytest.mark.parametrize("argv,message", [
    (EVALUATE + ["--json", "{folder}"], "--json {folder} is a folder; give the file to write"),
    (EVALUATE + ["--per-image", "{missing}/errors.csv"], "--per-image {missing}/errors.csv: folder {missing} not found"),
    (EVALUATE + ["--ced", "{folder}"], "--ced {folder} is a folder; give the file to write"),
    (["benchmark", "--json", "{folder}"], "--json {folder} is a folder; give the file to write"),
    (["train", "--format", "300w", "--data", "data", "--out", "{file}"], "--out {file} is a file, not a folder"),
])
def test_outputs_that_cannot_be_written_are_refused_before_any_work(argv, message, tmp_path, monkeypatch):
    """A file option naming a folder or a missing folder, or --out naming a file: one line before a
    model is loaded or built or the data are read (these were tracebacks from the atomic write at
    the end, after every model had run, or from TensorBoard's writer)."""
    from larq_landmarks import speed

    monkeypatch.setattr(Predictor, "from_path", lambda *a, **k: pytest.fail("loaded a model first"))
    monkeypatch.setattr(speed, "load_or_build", lambda *a, **k: pytest.fail("built a model first"))
    monkeypatch.setattr(cli, "_read", lambda *a, **k: pytest.fail("read the data first"))
    (tmp_path / "file").write_text("kept")
    names = {"folder": str(tmp_path), "missing": str(tmp_path / "missing"), "file": str(tmp_path / "file")}
    with pytest.raises(SystemExit, match=re.escape(message.format(**names))):
        cli.main([a.format(**names) for a in argv])
    assert (tmp_path / "file").read_text() == "kept" and not (tmp_path / "missing").exists()


def test_an_out_folder_that_cannot_be_made_is_one_line(small_file, tmp_path):
    """--out under a file (or in /proc, ...): the folder cannot be made; one line naming it, where
    predict and demo gave os.makedirs' traceback and train TensorBoard's."""
    (tmp_path / "file").write_text("kept")
    out = tmp_path / "file" / "predictions"
    image = tmp_path / "face.png"
    Image.fromarray(np.full((80, 80, 3), 128, np.uint8)).save(image)
    for argv in (["predict", str(image), "--model", small_file, "--box", "0,0,60,60", "--out", str(out)],
                 ["demo", "--out", str(out), "--steps", "1"]):
        with pytest.raises(SystemExit, match=re.escape(f"--out {out}: cannot make the folder (Not a directory)")):
            cli.main(argv)
    assert (tmp_path / "file").read_text() == "kept"


def test_box_option_is_four_numbers_and_may_be_negative(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(cli._join_negative_boxes(["predict", "x.jpg", "--model", "m.tflite", "--box",
                                                       "-50,-50,100,100", "--box", "1,2,3,4"]))
    assert args.box == [[-50.0, -50.0, 100.0, 100.0], [1.0, 2.0, 3.0, 4.0]]
    for value in ("a,b,c,d", "1,2,3", "1,2,3,nan"):
        with pytest.raises(SystemExit) as exit:
            cli.main(["predict", "x.jpg", "--model", "m.tflite", "--box", value])
        assert exit.value.code == 2 and "argument --box" in capsys.readouterr().err


def test_tflite_models_run_on_every_usable_core_by_default():
    """A .tflite runs on every core this process may use unless --threads says otherwise."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = cli.build_parser()
    for command in (["predict", "x.jpg", "--model", "m.tflite"], ["evaluate", "--model", "m.tflite", "--format", "300w", "--data", "d"]):
        assert parser.parse_args(command).threads == cores == cli.usable_cores()
        assert parser.parse_args(command + ["--threads", "1"]).threads == 1


@pytest.mark.parametrize("option,value", [("--threads", "0"), ("--min-score", "1.5"), ("--threads", "two")])
def test_bad_runtime_and_detector_options_are_named(option, value, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["predict", "x.jpg", "--model", "m.tflite", option, value])
    assert exit.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_convert_with_int8_calibration_writes_an_int8_file_that_evaluate_runs(trained, tmp_path, capsys):
    """``convert --int8-calibration DATA --format F``: calibrated on that data set's crops, an LCE
    file with int8 activations (one QUANTIZE in, one DEQUANTIZE out) that ``evaluate`` scores
    (with the runtime, which runs int8 files too: no fallback warning); without
    --format, or with --float, an error before the model is loaded."""
    from larq_landmarks import export

    model, out = str(trained / "run" / "model.keras"), tmp_path / "int8.tflite"
    assert cli.main(["convert", model, str(out), "--int8-calibration", str(trained / "train"), "--format", "300w",
                     "--calibration-count", "5"]) == 0
    printed = capsys.readouterr().out
    assert "calibrating int8 ranges on 5 crops of" in printed and "int8 CONV_2D, int8 activations" in printed
    counts = export.op_counts(out.read_bytes())
    assert counts["QUANTIZE"] == 1 and counts["DEQUANTIZE"] == 1 and counts["LceBconv2d"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to LCE's interpreter
        assert cli.main(["evaluate", "--model", str(out), "--format", "300w", "--data", str(trained / "test")]) == 0
    assert "NME box %" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--int8-calibration needs --format"):
        cli.main(["convert", model, str(tmp_path / "x.tflite"), "--int8-calibration", str(trained / "train")])
    with pytest.raises(SystemExit, match="--int8-calibration is for LCE files; --float writes float32"):
        cli.main(["convert", model, str(tmp_path / "x.tflite"), "--float", "--int8-calibration",
                  str(trained / "train"), "--format", "300w"])
    assert not (tmp_path / "x.tflite").exists()


@pytest.mark.slow
def test_convert_int8_fine_tune_saves_the_fine_tuned_model_and_converts_it(trained, tmp_path, capsys):
    """``convert --int8-calibration DATA --int8-fine-tune STEPS``: the model fine-tuned through its
    int8 activations is saved beside the output (``.keras``, its weights moved from the input
    model's, its batch norms' statistics not), and the .tflite is the int8 file of those weights;
    a data set of another point count, or the option without --int8-calibration, is named."""
    from larq_landmarks import export

    model_path, out = str(trained / "run" / "model.keras"), tmp_path / "face.tflite"
    assert cli.main(["convert", model_path, str(out), "--int8-calibration", str(trained / "train"), "--format", "300w",
                     "--calibration-count", "5", "--int8-fine-tune", "3", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "int8 fine-tuning: 3 steps of 4 at rate 2e-05" in printed and f"fine-tuned model (loss" in printed
    original, tuned = tf.keras.models.load_model(model_path), tf.keras.models.load_model(tmp_path / "face.keras")
    moved = [not np.array_equal(a, b) for a, b in zip(original.get_weights(), tuned.get_weights())]
    statistics = [("moving_" in w.name) for w in original.weights]
    assert any(m for m, s in zip(moved, statistics) if not s) and not any(m for m, s in zip(moved, statistics) if s)
    assert export.op_counts(out.read_bytes())["QUANTIZE"] == 1
    with pytest.raises(SystemExit, match="--int8-fine-tune needs --int8-calibration"):
        cli.main(["convert", model_path, str(tmp_path / "x.tflite"), "--int8-fine-tune", "3"])
    before = os.path.getmtime(model_path)
    with pytest.raises(SystemExit, match="saves the fine-tuned model as .*model.keras, the model it reads"):
        cli.main(["convert", model_path, model_path[:-len(".keras")] + ".tflite", "--int8-calibration",
                  str(trained / "train"), "--format", "300w", "--int8-fine-tune", "3"])
    assert os.path.getmtime(model_path) == before
    writers.write_aflw_pifa(str(tmp_path / "pifa"), 3, seed=0, image_size=(120, 120))
    with pytest.raises(SystemExit, match="has 68 output channels, so it trains on 68 points; format 'aflw-pifa' has 34"):
        cli.main(["convert", model_path, str(tmp_path / "x.tflite"), "--int8-calibration", str(tmp_path / "pifa"),
                  "--format", "aflw-pifa", "--int8-fine-tune", "3"])
    assert not (tmp_path / "x.tflite").exists() and not (tmp_path / "x.keras").exists()
    # a part segmentation model (7 output channels) fine-tunes on the part masks, with cross-entropy
    from larq_landmarks import models, training

    parts = models.build_named("binary_hpm", 7, input_size=64, width=32, depth=1, task="segmentation")
    training.save_model(parts, str(tmp_path / "parts.keras"))
    assert cli.main(["convert", str(tmp_path / "parts.keras"), str(tmp_path / "parts_int8.tflite"), "--int8-calibration",
                     str(trained / "train"), "--format", "300w", "--calibration-count", "4", "--int8-fine-tune", "2",
                     "--batch-size", "4"]) == 0
    assert (tmp_path / "parts_int8.keras").exists() and export.op_counts((tmp_path / "parts_int8.tflite").read_bytes())["QUANTIZE"] == 1


@pytest.mark.slow
def test_train_in_mixed_precision_saves_a_mixed_model_that_converts(trained, tmp_path):
    """``train --dtype-policy mixed_bfloat16``: the networks compute in bfloat16 (the run records
    the policy; the process's own policy is float32 again afterwards); ``convert`` writes the LCE
    file of its float32 copy, and ``--int8-fine-tune`` fine-tunes and saves that copy."""
    from larq_landmarks import export

    config = tmp_path / "mixed.json"
    config.write_text(json.dumps({"format": "300w", "data": str(trained / "train"), "dtype_policy": "mixed_bfloat16",
                                  **SMALL}))
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["options"]["dtype_policy"] == "mixed_bfloat16"
    model = tf.keras.models.load_model(tmp_path / "run" / "model.keras")
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16" and model.output.dtype == tf.float32
    out = tmp_path / "face.tflite"
    assert cli.main(["convert", str(tmp_path / "run" / "model.keras"), str(out)]) == 0
    assert out.read_bytes() == export.convert(model)
    assert export.op_counts(out.read_bytes())["LceBconv2d"] == len(export.binary_layers(model))
    assert cli.main(["convert", str(tmp_path / "run" / "model.keras"), str(tmp_path / "int8.tflite"),
                     "--int8-calibration", str(trained / "train"), "--format", "300w", "--calibration-count", "4",
                     "--int8-fine-tune", "2", "--batch-size", "4"]) == 0
    tuned = tf.keras.models.load_model(tmp_path / "int8.keras")
    assert {l.dtype_policy.name for l in tuned.layers} == {"float32"}
    assert export.op_counts((tmp_path / "int8.tflite").read_bytes())["QUANTIZE"] == 1
