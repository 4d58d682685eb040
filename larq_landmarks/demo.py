"""The main job end to end on built-in synthetic data (``larq-landmarks demo``).

1. write a synthetic 300W-format data set (images + 1-based ``.pts``) and read it back with the
   real ``.pts`` reader;
2. train a small binary HPM hourglass with ``model.fit`` on the augmented ``tf.data`` pipeline
   (the default recipe: Adam with step decay), and its real-valued twin on the same data, steps
   and recipe, as the reference;
3. evaluate NME (inter-ocular and box) on held-out faces, with CED / AUC / failure rate;
4. convert with LCE to a bit-packed ``.tflite`` and check parity with Keras; time it against the
   float32 ``.tflite`` of the same network, side by side;
5. write ``report.md``, ``report.json`` and pictures.
"""
import json
import os
import time
from typing import Dict

import numpy as np
import tensorflow as tf

from larq_landmarks import export, layouts, metrics, synthetic, training, visualize
from larq_landmarks.atomic import atomic_path
from larq_landmarks.datasets import pipeline, readers, writers
from larq_landmarks.evaluation import predict_dataset
from larq_landmarks.models import BinaryHourglass
from larq_landmarks.speed import batch_one_ms

INPUT_SIZE = 64
BATCH = 16
LEARNING_RATE = 5e-3  # the small runs' peak rate (reproduce.py recipe: 2.5x 2e-3 trains both networks better)


def _face_scores(result: Dict[str, np.ndarray]) -> Dict[str, float]:
    truth, predicted = result["points"], result["predicted"]
    ocular = metrics.nme(predicted, truth, metrics.inter_ocular(truth))
    box = metrics.nme(predicted, truth, metrics.box_size(result["box"]))
    return {
        "nme_inter_ocular_%": 100 * float(ocular.mean()),
        "nme_box_%": 100 * float(box.mean()),
        "auc@0.08_inter_ocular": metrics.auc(ocular, 0.08),
        "failure_rate@0.08_inter_ocular": metrics.failure_rate(ocular, 0.08),
    }


def run(out: str, steps: int = 1000, seed: int = 0, train_images: int = 400, test_images: int = 64,
        two_stage: bool = True, width: int = 64, depth: int = 2) -> Dict:
    """Run the demo into folder ``out``; returns the report dict. ``two_stage`` trains the binary
    network in two stages (:func:`larq_landmarks.training.two_stage`: real weights for the first
    ``training.DEFAULT_FIRST_FRACTION`` of the epochs, then fully binary). ``width`` and ``depth``
    are the hourglass's (``BinaryHourglass``'s arguments), for the binary network, its real-valued
    twin and the untrained reference alike."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out}: a file, not a folder (the demo writes its data, model and report into a folder)")
    started = time.time()
    tf.keras.utils.set_random_seed(seed)
    data_root = os.path.join(out, "data", "300w")
    train_dir, test_dir = os.path.join(data_root, "trainset"), os.path.join(data_root, "testset")
    if not os.path.isdir(train_dir):
        print(f"writing synthetic 300W-format faces to {data_root}")
        writers.write_300w(train_dir, train_images, seed=seed, image_size=(160, 160))
        writers.write_300w(test_dir, test_images, seed=seed + 1, image_size=(160, 160))
    train_columns = readers.to_columns(readers.read_pts_folder(train_dir))
    test_columns = readers.to_columns(readers.read_pts_folder(test_dir))

    import larq as lq

    epochs = max(2 if two_stage else 1, steps // 100)
    steps_per_epoch = max(1, steps // epochs)
    train_data = pipeline.landmark_dataset(
        train_columns, INPUT_SIZE, sigma=1.5, flip_permutation=layouts.flip_permutation(68),
        seed=seed, batch_size=BATCH,
    )
    losses = []

    def build(**stage):
        return BinaryHourglass(68, width=width, depth=depth, input_size=INPUT_SIZE, **stage)

    def train(network, stage_epochs):
        training.compile_model(network, steps_per_epoch=steps_per_epoch, epochs=stage_epochs, learning_rate=LEARNING_RATE)
        stage = os.path.join(out, "train", f"stage{len(losses) + 1}")
        history = network.fit(train_data, epochs=stage_epochs, steps_per_epoch=steps_per_epoch, verbose=2,
                              callbacks=training.training_callbacks(stage))
        losses.append(float(history.history["loss"][-1]))

    print(f"training {epochs} x {steps_per_epoch} steps on {len(train_columns['scale'])} faces"
          + (f" in two stages (real weights for {training.DEFAULT_FIRST_FRACTION:.0%} of the epochs, then binary)"
             if two_stage else ""))
    fit_started = time.time()
    if two_stage:
        model = training.two_stage(build, train, epochs)
    else:
        model = build()
        train(model, epochs)
    fit_seconds = time.time() - fit_started
    lq.models.summary(model)
    training.save_model(model, os.path.join(out, "model.keras"))

    # the real-valued twin: the same network with real blocks, data, steps and recipe
    tf.keras.utils.set_random_seed(seed)
    twin = BinaryHourglass(68, width=width, depth=depth, input_size=INPUT_SIZE, binary=False)
    training.compile_model(twin, steps_per_epoch=steps_per_epoch, epochs=epochs, learning_rate=LEARNING_RATE)
    print(f"training the real-valued twin for the same {epochs} x {steps_per_epoch} steps")
    twin_started = time.time()
    twin.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=2)
    twin_seconds = time.time() - twin_started

    test_data = pipeline.evaluation_dataset(test_columns, INPUT_SIZE, batch_size=16)
    keras_result = predict_dataset(lambda x: model.predict_on_batch(x), test_data)
    twin_result = predict_dataset(lambda x: twin.predict_on_batch(x), test_data)
    untrained = BinaryHourglass(68, width=width, depth=depth, input_size=INPUT_SIZE)
    untrained_result = predict_dataset(lambda x: untrained.predict_on_batch(x), test_data)

    tflite_path = os.path.join(out, "model.tflite")
    flatbuffer = export.convert(model, tflite_path)
    runtime = export.TfliteModel(flatbuffer, engine="runtime", name=tflite_path)  # our bit-packed kernels
    runtime_result = predict_dataset(runtime.predict, test_data)
    lce = export.TfliteModel(flatbuffer, engine="lce")
    lce_result = predict_dataset(lce.predict, test_data)
    float_flatbuffer = export.convert(model, binary=False)
    float_size = len(float_flatbuffer)
    speed = batch_one_ms({
        "binary .tflite, larq_landmarks.runtime": runtime.predict,
        "binary .tflite, LCE interpreter": lce.predict,
        "float32 .tflite, TFLite interpreter (XNNPACK)": export.interpreter(float_flatbuffer, use_xnnpack=True).predict,
    }, np.asarray(next(iter(test_data))["image"][:1]))
    tracking = _tracking(tflite_path, seed)
    difference = np.linalg.norm(lce_result["predicted"] - keras_result["predicted"], axis=-1)
    runtime_difference = np.linalg.norm(runtime_result["predicted"] - lce_result["predicted"], axis=-1)

    report = {
        "trained_keras": _face_scores(keras_result),
        "real_twin_keras": _face_scores(twin_result),
        "trained_lce_tflite": _face_scores(lce_result),
        "untrained_keras": _face_scores(untrained_result),
        "lce_vs_keras_landmarks_within_0.5px": float(np.mean(difference <= 0.5)),
        "lce_vs_keras_max_landmark_difference_px": float(difference.max()),
        "trained_runtime_tflite": _face_scores(runtime_result),
        "tflite_engine": runtime.engine,
        "runtime_kernels": runtime.kernels,
        "runtime_vs_lce_landmarks_within_0.5px": float(np.mean(runtime_difference <= 0.5)),
        "runtime_vs_lce_max_landmark_difference_px": float(runtime_difference.max()),
        "ops": dict(export.op_counts(flatbuffer)),
        "tflite_bytes_binary": len(flatbuffer),
        "tflite_bytes_float32": float_size,
        "batch_one_ms": speed,
        "tracking": tracking,
        "parameters": model.count_params(),
        "final_loss": losses[-1],
        "train_seconds": round(fit_seconds, 1),
        "twin_train_seconds": round(twin_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "settings": {"steps": epochs * steps_per_epoch, "seed": seed, "input_size": INPUT_SIZE,
                     "width": width, "depth": depth, "batch": BATCH, "learning_rate": LEARNING_RATE,
                     "recipe": "Adam with step decay (training.compile_model's default), ApproxSign gradient"
                               + (f", two stages, real weights for the first {training.DEFAULT_FIRST_FRACTION:.0%} of the epochs"
                                  if two_stage else "")},
    }
    report["binary_vs_real_twin_nme"] = (report["trained_keras"]["nme_inter_ocular_%"]
                                         / report["real_twin_keras"]["nme_inter_ocular_%"])
    _write_pictures(out, keras_result, twin_result, test_columns)
    _write_report(out, report)
    print(json.dumps(report, indent=2))
    print(f"report: {os.path.join(out, 'report.md')}")
    return report


class _CountedDetector:
    """A face detector that counts its calls."""

    def __init__(self):
        from larq_landmarks.detection import FaceDetector

        self.detector, self.calls = FaceDetector(), 0

    def detect(self, image):
        self.calls += 1
        return self.detector.detect(image)


def _tracking(model_path: str, seed: int) -> Dict:
    """A synthetic video (one face moving and turning over 30 frames) through ``Predictor.track``,
    which detects the face in the first frame and follows its landmarks, against the landmarks from
    each frame's true box and against detecting the face in every frame."""
    from larq_landmarks.predictor import Predictor

    video = synthetic.face_video(seed)
    frames, truth = video["frames"], video["points"]
    true_boxes = np.stack([readers.points_box(points) for points in truth])
    scale = metrics.box_size(true_boxes)
    predictor = Predictor.from_path(model_path)
    given = np.stack([predictor.predict(frame, [box])[0][0] for frame, box in zip(frames, true_boxes)])
    predictor.detector = _CountedDetector()
    tracked = [points for points, _, _ in predictor.track(frames)]
    calls = predictor.detector.calls
    detected = [predictor.predict(frame)[0] for frame in frames]
    found = [i for i, points in enumerate(tracked) if len(points)]
    seen = [i for i, points in enumerate(detected) if len(points)]

    def score(points, indices):
        return 100 * float(metrics.nme(points, truth[indices], scale[indices]).mean()) if indices else None

    return {"frames": len(frames), "detector_calls": calls, "frames_tracked": len(found),
            "frames_detected_each": len(seen), "nme_box_%_true_boxes": score(given, list(range(len(frames)))),
            "nme_box_%_tracked": score(np.stack([tracked[i][0] for i in found]) if found else None, found),
            "nme_box_%_detected_each": score(np.stack([detected[i][0] for i in seen]) if seen else None, seen)}


def _tracking_sentence(t: Dict) -> str:
    """The tracking check in words."""
    def pct(value):
        return "-" if value is None else f"{value:.2f}%"

    return (f"Video (`Predictor.track`, a synthetic face moving and turning over {t['frames']} frames): landmarks in "
            f"{t['frames_tracked']}/{t['frames']} frames with {t['detector_calls']} detector call(s), NME (box) "
            f"{pct(t['nme_box_%_tracked'])} against {pct(t['nme_box_%_true_boxes'])} from each frame's true box; "
            f"the detector run on every frame finds the face in {t['frames_detected_each']}/{t['frames']} "
            f"(NME {pct(t['nme_box_%_detected_each'])}).\n\n")


def _write_pictures(out, result, twin_result, columns):
    from PIL import Image

    pictures = []
    for i in range(min(8, len(result["predicted"]))):
        image = np.asarray(Image.open(columns["image_path"][i]).convert("RGB"))
        pictures.append(visualize.draw_landmarks(image, result["predicted"][i], result["points"][i]))
    visualize.save_png(visualize.grid(pictures, 4), os.path.join(out, "predictions.png"))
    curves = {}
    for label, r in (("binary HPM (Keras)", result), ("real-valued twin (Keras)", twin_result)):
        errors = metrics.nme(r["predicted"], r["points"], metrics.inter_ocular(r["points"]))
        curves[label] = metrics.ced(errors, 0.2)
    visualize.save_png(visualize.ced_plot(curves), os.path.join(out, "ced.png"))


def _parity_sentence(within: float, largest_px: float) -> str:
    """How closely two engines' landmarks agree: ``within`` is the fraction within 0.5 px,
    ``largest_px`` the largest difference; where it is over 0.5 px, what moves a landmark that far."""
    text = f"{100 * within:.1f}% of landmarks within 0.5 px (largest difference {largest_px:.2f} px"
    if largest_px > 0.5:
        text += ": where two heatmap values nearly tie, a rounding difference moves the peak or its quarter-pixel shift"
    return text + ")"


def _speed_table(times: Dict[str, float]) -> str:
    """The engines' batch-1 times (ms) as a markdown table, each against the float32 file's."""
    reference = next(ms for name, ms in times.items() if name.startswith("float32"))
    rows = "".join(f"| {name} | {ms:.3f} | {reference / ms:.2f}x |\n" for name, ms in times.items())
    return ("One image at a time on this machine (this 64px model, 1 thread, medians of the engines taking "
            "turns; the papers' 256px model: docs/benchmarks.md):\n\n"
            "| engine | ms | vs float32 |\n|---|---:|---:|\n" + rows + "\n")


def _write_report(out, report):
    with atomic_path(os.path.join(out, "report.json")) as temporary, open(temporary, "w") as f:
        json.dump(report, f, indent=2)
    rows = [
        f"| {name} | {s['nme_inter_ocular_%']:.2f} | {s['nme_box_%']:.2f} | "
        f"{s['auc@0.08_inter_ocular']:.3f} | {s['failure_rate@0.08_inter_ocular']:.3f} |"
        for name, s in (("untrained (Keras)", report["untrained_keras"]),
                        ("trained (Keras)", report["trained_keras"]),
                        ("real-valued twin (Keras; same data, steps and recipe)", report["real_twin_keras"]),
                        ("trained (LCE .tflite)", report["trained_lce_tflite"]),
                        (f"trained (.tflite, {report['tflite_engine']} {report['runtime_kernels'] or ''})",
                         report["trained_runtime_tflite"]))
    ]
    text = (
        "# larq_landmarks demo report\n\n"
        "Synthetic 300W-format faces, read through the `.pts` reader; binary HPM hourglass "
        f"(width {report['settings']['width']}, depth {report['settings']['depth']}, "
        f"{report['settings']['input_size']}px input, {report['parameters']:,} parameters), "
        f"{report['settings']['steps']} steps in {report['train_seconds']} s ({report['settings']['recipe']}; "
        f"the real-valued twin in {report['twin_train_seconds']} s).\n\n"
        "| model | NME inter-ocular % | NME box % | AUC@0.08 | failures@0.08 |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + f"\n\nThe binary network's inter-ocular NME is {report['binary_vs_real_twin_nme']:.2f}x its "
        "real-valued twin's.\n"
        + "\nLCE vs Keras: " + _parity_sentence(report["lce_vs_keras_landmarks_within_0.5px"],
                                                report["lce_vs_keras_max_landmark_difference_px"]) + ".\n"
        f"Bit-packed runtime ({report['tflite_engine']}, {report['runtime_kernels']} kernels) vs LCE on the same "
        "file: " + _parity_sentence(report["runtime_vs_lce_landmarks_within_0.5px"],
                                    report["runtime_vs_lce_max_landmark_difference_px"]) + ".\n"
        f"Converted sizes: binary (LCE) {report['tflite_bytes_binary']:,} bytes, "
        f"float32 TFLite {report['tflite_bytes_float32']:,} bytes "
        f"({report['tflite_bytes_float32'] / report['tflite_bytes_binary']:.1f}x).\n\n"
        + _speed_table(report["batch_one_ms"]) + _tracking_sentence(report["tracking"]) +
        f"Ops in the LCE model: {report['ops']}\n\n"
        "![predictions (green) and ground truth (red)](predictions.png)\n\n![CED](ced.png)\n"
    )
    with atomic_path(os.path.join(out, "report.md")) as temporary, open(temporary, "w") as f:
        f.write(text)
