"""The ``larq-landmarks`` command: demo, train, evaluate, predict, convert, benchmark.

Every subcommand takes its options as flags or from a JSON file given with ``--config`` (keys are
the flag names with ``_`` for ``-``); flags given on the command line win.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np

from larq_landmarks.detection import DETECTOR_MODELS


def _fail(command: str, message: str):
    raise SystemExit(f"larq-landmarks {command}: {message}")


def _check_output_folder(command: str, path: str) -> None:
    """``--out``, a folder to write into: refused before any work when a file has its name."""
    if os.path.exists(path) and not os.path.isdir(path):
        _fail(command, f"--out {path} is a file, not a folder")


def _make_output_folder(command: str, path: str) -> None:
    """``--out`` made (with its parents) when the first output is written, or a one-line error."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        _fail(command, f"--out {path}: cannot make the folder ({error.strerror or error})")


def _check_output_file(command: str, option: str, path: Optional[str]) -> None:
    """An option naming a file to write (``--json``, ``--per-image``, ``--ced``): refused before
    any work when it is a folder or its folder does not exist (the file is written at the end)."""
    if not path:
        return
    if os.path.isdir(path):
        _fail(command, f"{option} {path} is a folder; give the file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        _fail(command, f"{option} {path}: folder {folder} not found")


def _load_model(command: str, path: str):
    import tensorflow as tf

    if not os.path.exists(path):
        _fail(command, f"model {path!r} not found")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(8)[4:8] == b"TFL3":
                _fail(command, f"{path!r} is a converted .tflite; {command} takes the Keras model (.keras) it came from")
    try:
        return tf.keras.models.load_model(path)
    except Exception as error:  # Keras raises many kinds for a file that is not a model
        _fail(command, f"cannot load model {path!r} ({error})")


def _read(args, command, option: str = "data"):
    from larq_landmarks.datasets import formats
    from larq_landmarks.datasets.readers import DatasetError

    try:
        return formats.read_columns(args.format, _data_paths(args, option), args.images, args.skip_bad)
    except (DatasetError, ValueError) as error:
        _fail(command, f"--validation-data: {error}" if option == "validation_data" else str(error))


def _data_paths(args, option: str = "data") -> List[str]:
    """``--data`` (or another option of paths): one path or several (a --config file may give a string)."""
    value = getattr(args, option)
    return [value] if isinstance(value, str) else list(value)


def _warn_300w_test_images(columns) -> None:
    """Say so when the images to train on include 300W's test subsets (``--data`` the whole 300W
    folder, say): every published 300W figure is on images the model was not trained on."""
    from larq_landmarks import metrics

    subsets = list(metrics.w300_subsets(columns["image_path"]))
    found = {name: subsets.count(name) for name in ("common", "challenging", "indoor", "outdoor") if name in subsets}
    if found:
        said = ", ".join(f"{count} of the {name} subset" for name, count in found.items())
        print(f"larq-landmarks train: warning: the training images include 300W's test images ({said}); "
              "300W's protocol trains on afw, lfpw/trainset and helen/trainset only: give those folders to --data",
              file=sys.stderr)


def _say_300w_training_images(columns) -> None:
    """``evaluate``: where some faces are in 300W's test folders and some are not (``--data`` the whole
    download, say), say that the first table counts them all."""
    from larq_landmarks import metrics

    subsets = metrics.w300_subsets(columns["image_path"])
    tested, count = int((subsets != "").sum()), len(subsets)
    if 0 < tested < count:
        print(f"note: {count - tested} of the {count} faces read are not in 300W's test folders (its training "
              "sets, say): the NME table counts them, the 300W tables do not")


def _demo(args: argparse.Namespace) -> int:
    from larq_landmarks import demo

    _check_output_folder("demo", args.out)  # demo.run says so too, as a ValueError
    _make_output_folder("demo", args.out)  # (its synthetic data are the first thing it writes there)
    demo.run(args.out, steps=args.steps, seed=args.seed, train_images=args.train_images,
             test_images=args.test_images, two_stage=not args.one_stage, width=args.width, depth=args.depth)
    return 0


def _training_data(args: argparse.Namespace, columns, points: int, size: int, segmentation: bool):
    """The augmented pipeline that ``train`` and ``convert --int8-fine-tune`` fit on (``--seed``,
    ``--batch-size``; part masks for segmentation, else heatmaps of ``--sigma``)."""
    from larq_landmarks import layouts
    from larq_landmarks.datasets import pipeline

    options = dict(flip_permutation=layouts.flip_permutation(points), seed=args.seed, batch_size=args.batch_size)
    if segmentation:
        return pipeline.segmentation_dataset(columns, size, **options)
    return pipeline.landmark_dataset(columns, size, sigma=args.sigma, **options)


def _validation_data(args: argparse.Namespace, columns, size: int, segmentation: bool):
    """``--validation-data``'s crops, unaugmented, in file order (as ``evaluate`` crops them)."""
    from larq_landmarks.datasets import pipeline

    if segmentation:
        return pipeline.segmentation_dataset(columns, size, train=False, batch_size=args.batch_size)
    return pipeline.landmark_dataset(columns, size, sigma=args.sigma, train=False, batch_size=args.batch_size)


def _train(args: argparse.Namespace) -> int:
    from larq_landmarks import models

    with models.dtype_policy(args.dtype_policy):  # the networks built here compute in it
        return _train_in_policy(args)


def _train_in_policy(args: argparse.Namespace) -> int:
    import tensorflow as tf

    from larq_landmarks import models, tensorboard, training
    from larq_landmarks.datasets import formats

    fmt = formats.get_format(args.format)
    _check_output_folder("train", args.out)
    if args.validation_data is not None:  # a list, also where a --config file gives one path (run.json compares it)
        args.validation_data = _data_paths(args, "validation_data")
    _check_rerun(args)
    columns = _read(args, "train")
    if fmt.name == "300w":  # (300W-LP's IBUG folder is synthesised views, its training set)
        _warn_300w_test_images(columns)
    validation = _read(args, "train", "validation_data") if args.validation_data else None
    count = len(columns["scale"])
    segmentation = args.task == "segmentation"
    if segmentation and fmt.num_points != 68:
        _fail("train", f"segmentation needs 68-point faces; format {args.format!r} has {fmt.num_points}")
    overrides = {k: v for k, v in (("width", args.width), ("depth", args.depth), ("num_stacks", args.num_stacks),
                                   ("input_quantizer", args.input_quantizer)) if v is not None}
    outputs = 7 if segmentation else fmt.num_points
    try:
        model = models.build_named(args.model, outputs, input_size=args.input_size,
                                   task=args.task, **overrides)
    except ValueError as error:
        _fail("train", str(error))
    steps = args.steps_per_epoch or max(1, count // args.batch_size)
    import larq as lq

    # two stages (one half of the network real first, then binary from those weights) for binary networks
    two_stage = (not args.one_stage and args.epochs >= 2
                 and any(isinstance(layer, lq.layers.QuantConv2D) for layer in model.layers))
    fraction = training.DEFAULT_FIRST_FRACTION if args.first_fraction is None else args.first_fraction
    try:
        first_epochs = training.first_stage_epochs(args.epochs, fraction) if two_stage else 0
    except ValueError as error:
        _fail("train", f"--first-fraction: {error}")

    teacher = _load_model("train", args.teacher) if args.teacher else None

    def trainee(network):
        """What fit trains: the network, or a Distiller of it from --teacher."""
        if teacher is None:
            return network
        from larq_landmarks.distillation import Distiller

        try:
            return Distiller(network, teacher, attention_weight=args.attention_weight)
        except ValueError as error:
            _fail("train", f"--teacher {args.teacher}: {error}")

    def compile_for(network, epochs):
        metrics = None if validation is None else training.validation_metrics(args.task, fmt.num_points)
        training.compile_model(network, args.task, steps, epochs, args.learning_rate, metrics=metrics,
                               optimizer=args.optimizer, schedule=args.schedule, warmup_fraction=args.warmup)

    fitted = trainee(model)
    try:
        compile_for(fitted, args.epochs - first_epochs)
    except ValueError as error:
        _fail("train", str(error))
    data = _training_data(args, columns, fmt.num_points, args.input_size, segmentation)
    checked = None if validation is None else _validation_data(args, validation, args.input_size, segmentation)
    best_metric = None if validation is None else training.best_epoch_metric(args.task, fmt.num_points)
    _make_output_folder("train", args.out)  # (the callbacks' log writer is the first to write there)
    callbacks = training.training_callbacks(args.out, log_dir=os.path.join(args.out, "logs"), best_metric=best_metric)
    if not segmentation:
        preview = next(iter(data))[0].numpy()[:4]
        callbacks.append(tensorboard.HeatmapImages(os.path.join(args.out, "logs", "images"), preview))
    tf.keras.utils.set_random_seed(args.seed)
    _record_run(args)
    backup = os.path.join(args.out, "backup")
    stage1 = os.path.join(args.out, "stage1")
    try:
        if two_stage and _finished(stage1):
            first = tf.keras.models.load_model(os.path.join(stage1, "model.keras"))
            print(f"stage 1 finished before: its weights from {stage1}")
        elif two_stage:
            backup = os.path.join(stage1, "backup")
            first = models.build_named(args.model, outputs, input_size=args.input_size, task=args.task,
                                       **training.FIRST_STAGES[args.first_stage], **overrides)
            first_fitted = trainee(first)
            compile_for(first_fitted, first_epochs)
            kept = "activations" if args.first_stage == "binary_weights" else "weights"
            print(f"stage 1 of 2: {first_epochs} epochs with real-valued {kept}, in {stage1}")
            first_fitted.fit(training.for_stacks(data, first), epochs=first_epochs, steps_per_epoch=steps,
                             validation_data=None if checked is None else training.for_stacks(checked, first),
                             callbacks=training.training_callbacks(stage1), verbose=2 if args.quiet else 1)
        if two_stage:
            training.transfer_weights(first, model)
            backup = os.path.join(args.out, "backup")
            print(f"stage 2 of 2: {args.epochs - first_epochs} epochs fully binary")
        fitted.fit(training.for_stacks(data, model), epochs=args.epochs - first_epochs, steps_per_epoch=steps,
                   validation_data=None if checked is None else training.for_stacks(checked, model),
                   callbacks=callbacks, verbose=2 if args.quiet else 1)
    except KeyboardInterrupt:
        where = (f"the last finished epoch is backed up in {backup}" if os.path.isdir(backup)
                 else "no epoch had finished")
        _fail("train", f"interrupted; {where}: run the same command again to resume")
    print(f"model: {os.path.join(args.out, 'model.keras')}")
    best = next((c.best for c in callbacks if isinstance(c, training.SaveBestModel)), None)
    if best is not None:
        stage = " of stage 2" if two_stage else ""
        print(f"best on the validation data: epoch {best['epoch']}{stage}, {best['metric']} {best['value']:.4f}: "
              f"{os.path.join(args.out, 'best.keras')}")
    return 0


# what defines a training run: resuming in the same --out with other values would not resume it
RUN_OPTIONS = ("format", "model", "task", "input_size", "width", "depth", "num_stacks", "sigma", "batch_size",
               "epochs", "steps_per_epoch", "learning_rate", "optimizer", "schedule", "warmup", "one_stage", "seed",
               "input_quantizer", "first_stage", "first_fraction", "teacher", "attention_weight", "dtype_policy",
               "validation_data")
# train --dtype-policy: the Keras dtype policies it takes
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def _finished(folder: str) -> bool:
    """A training run in ``folder`` finished: its model is saved and its backup is gone or empty."""
    backup = os.path.join(folder, "backup")
    return os.path.exists(os.path.join(folder, "model.keras")) and not (os.path.isdir(backup) and os.listdir(backup))


def _check_rerun(args: argparse.Namespace) -> None:
    """A finished run in ``--out`` (a model and an empty or no backup) is kept unless ``--overwrite``; an
    interrupted one resumes only with the options it started with (``run.json``)."""
    import shutil

    model_path, backup = os.path.join(args.out, "model.keras"), os.path.join(args.out, "backup")
    run_file = os.path.join(args.out, "run.json")
    options = {k: getattr(args, k) for k in RUN_OPTIONS}
    if args.overwrite:
        best = os.path.join(args.out, "best.keras")
        for path in (backup, run_file, os.path.join(args.out, "stage1"), best, best + ".json"):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif _finished(args.out):
        _fail("train", f"{args.out} holds a finished run ({model_path}); use --overwrite to train again "
                       "there, or another --out")
    elif os.path.isdir(backup) and os.listdir(backup) and os.path.exists(run_file):
        with open(run_file, encoding="utf-8") as f:
            previous = json.load(f).get("options", {})
        differing = [k for k in RUN_OPTIONS if k in previous and previous[k] != options[k]]
        if differing:
            said = ", ".join(f"--{k.replace('_', '-')} {previous[k]!r} then, {options[k]!r} now" for k in differing)
            _fail("train", f"{args.out} holds an interrupted run started with other options ({said}); "
                           "resume with the same options, or use --overwrite to start again")


def _record_run(args: argparse.Namespace) -> None:
    """``--out/run.json``: the options the run starts with (checked when it is resumed); ``--out``
    is made before the callbacks."""
    from larq_landmarks.atomic import atomic_path

    with atomic_path(os.path.join(args.out, "run.json")) as temporary, open(temporary, "w", encoding="utf-8") as f:
        json.dump({"options": {k: getattr(args, k) for k in RUN_OPTIONS}}, f, indent=1)


def _evaluate(args: argparse.Namespace) -> int:
    from larq_landmarks import evaluation, layouts
    from larq_landmarks.atomic import atomic_path
    from larq_landmarks.datasets import formats
    from larq_landmarks.predictor import Predictor, flip_test
    from larq_landmarks.runtime import CudaUnavailableError

    fmt = formats.get_format(args.format)
    for option, path in (("--json", args.json), ("--per-image", args.per_image), ("--ced", args.ced)):
        _check_output_file("evaluate", option, path)  # before the models run (they are written at the end)
    paths = [args.model] if isinstance(args.model, str) else list(args.model)  # a --config file may give one
    precisions = [args.float_precision] if isinstance(args.float_precision, str) else list(args.float_precision)
    predictors = {}
    for path, precision in ((p, q) for p in paths for q in precisions):  # all checked before the data are read
        label = path if len(precisions) == 1 else f"{path} ({precision})"
        try:
            predictor = Predictor.from_path(path, num_threads=args.threads, engine=args.engine, task=args.task,
                                            float_precision=precision)
        except (ValueError, CudaUnavailableError) as error:  # the model and input errors are ValueErrors
            _fail("evaluate", str(error))
        expected = 7 if predictor.task == "segmentation" else fmt.num_points  # --task, or what its outputs say
        if predictor.num_landmarks != expected:
            _fail("evaluate", f"model {path!r} outputs {predictor.num_landmarks} channels but "
                              f"format {args.format!r} with task {predictor.task!r} needs {expected}")
        predictors[label] = predictor
    tasks = {p.task for p in predictors.values()}
    if len(tasks) > 1:
        _fail("evaluate", f"the models were trained for different tasks ({', '.join(sorted(tasks))}): "
                          "evaluate them apart")
    task = tasks.pop()
    if args.ced and task == "segmentation":
        _fail("evaluate", "--ced plots landmark errors; a part segmentation model has none")
    if args.ced and fmt.kind != "face":
        _fail("evaluate", f"--ced plots faces' NME; format {args.format!r} is scored by PCKh")
    columns = _read(args, "evaluate")
    if fmt.name == "300w" and task != "segmentation":
        _say_300w_training_images(columns)
    results = {}
    for path, predictor in predictors.items():
        predict = predictor._predict
        if args.flip_test:  # the part classes are their own mirror images; landmarks swap left and right
            permutation = layouts.flip_permutation(predictor.num_landmarks, task)
            predict = lambda images, p=predictor._predict, q=permutation: flip_test(p, images, q) / 2.0  # noqa: E731
        if task == "segmentation":
            results[path] = evaluation.evaluate_segmentation(predict, columns, predictor.input_size,
                                                             args.batch_size, progress=True)
        else:
            results[path] = evaluation.evaluate_landmarks(predict, columns, fmt.kind, predictor.input_size,
                                                          args.batch_size, progress=True, w300=fmt.name == "300w")
        print(f"\n{results[path]['count']} samples of {' '.join(_data_paths(args))} ({args.format}), model {path}\n")
        print(evaluation.format_tables(results[path]["tables"]))
    if len(results) > 1:  # the models side by side, first table of each
        print(evaluation.format_comparison({path: result["tables"] for path, result in results.items()}))
    if args.per_image:
        import csv

        with atomic_path(args.per_image) as temporary, open(temporary, "w", newline="") as f:
            writer = csv.writer(f)
            for number, (path, result) in enumerate(results.items()):
                rows = result["per_image"]
                if number == 0:
                    writer.writerow(["model", *rows])
                for i in range(result["count"]):
                    writer.writerow([path] + [rows[key][i] if rows[key].dtype.kind in "SUO" else f"{float(rows[key][i]):.4f}"
                                              for key in rows])
        print(f"wrote {args.per_image}")
    if args.ced:
        from larq_landmarks import metrics, visualize

        curves = {path: metrics.ced(result["per_image"]["nme_box_%"] / 100, 0.07) for path, result in results.items()}
        x_label = "NME (box)"
        if "w300_subset" in next(iter(results.values()))["per_image"]:  # 300W's test folders: its own curves
            curves, x_label = _w300_curves(results), "NME (inter-ocular)"
        visualize.save_png(visualize.ced_plot(curves, x_label=x_label), args.ced)
        print(f"wrote {args.ced}")
    if args.json:
        reports = [{"model": path, "task": task, "count": result["count"], "tables": result["tables"]}
                   for path, result in results.items()]
        data = _data_paths(args)
        data = data[0] if len(data) == 1 else data
        report = {**reports[0], "data": data, "format": args.format, "flip_test": bool(args.flip_test)}
        if len(reports) > 1:
            report = {"data": data, "format": args.format, "flip_test": bool(args.flip_test), "task": task,
                      "models": reports}
        with atomic_path(args.json) as temporary, open(temporary, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _w300_curves(results) -> dict:
    """``--ced`` on 300W's test folders: each model's inter-ocular CED up to 0.08 on the common,
    challenging and private (indoor + outdoor) sets present."""
    from larq_landmarks import metrics

    curves = {}
    for path, result in results.items():
        rows = result["per_image"]
        for name, members in (("common", ("common",)), ("challenging", ("challenging",)),
                              ("private", ("indoor", "outdoor"))):
            chosen = np.isin(rows["w300_subset"], members)
            if chosen.any():
                label = name if len(results) == 1 else f"{path}: {name}"
                curves[label] = metrics.ced(rows["nme_inter_ocular_%"][chosen] / 100, 0.08)
    return curves


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _image_files(paths: List[str]) -> List[str]:
    """The image files named, a folder standing for the images in it (by name: a video's frames in order)."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        inside = sorted(os.path.join(path, name) for name in os.listdir(path)
                        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, name)))
        if not inside:
            _fail("predict", f"{path}: a folder without images ({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(inside)
    return files


def _picture_stems(paths: List[str]) -> List[str]:
    """A name for each image's pictures: its file name without extension, or where images in
    different folders share one, its path with the folders joined by ``_`` (a/0001.png: a_0001)."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    paths_of: dict = {}  # stem -> the distinct paths that have it (one pass: a folder may hold many frames)
    for path, stem in zip(paths, stems):
        paths_of.setdefault(stem, set()).add(path)
    shared = {stem for stem, named in paths_of.items() if len(named) > 1}
    return [os.path.splitext(os.path.normpath(path))[0].replace(os.sep, "_").lstrip("._") if stem in shared else stem
            for path, stem in zip(paths, stems)]


def _predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from larq_landmarks import visualize
    from larq_landmarks.atomic import atomic_path
    from larq_landmarks.layouts import FACE_PART_CLASSES
    from larq_landmarks.predictor import InputError, Predictor, load_rgb
    from larq_landmarks.runtime import CudaUnavailableError

    _check_output_folder("predict", args.out)  # before the model is loaded or any image read
    try:  # the task and the kind of box: as given, or what the model's outputs say (7 part classes, 16 joints)
        predictor = Predictor.from_path(args.model, None, args.flip_test, num_threads=args.threads,
                                        engine=args.engine, task=args.task, float_precision=args.float_precision)
    except (ValueError, CudaUnavailableError, ImportError) as error:  # the model and input errors are ValueErrors
        _fail("predict", str(error))
    segmentation = predictor.task == "segmentation"
    if args.person and segmentation:
        _fail("predict", f"--person is for pose models; {args.model} is a part segmentation model (it segments faces)")
    if args.person:
        predictor.box_kind = "person"
    if segmentation and predictor.num_landmarks != len(FACE_PART_CLASSES):
        _fail("predict", f"model {args.model!r} outputs {predictor.num_landmarks} channels; a part segmentation "
                         f"model outputs {len(FACE_PART_CLASSES)} (one per class)")
    if args.track and segmentation:
        _fail("predict", "--track follows landmarks from frame to frame; a part segmentation model has none")
    if args.detect_every and not args.track:
        _fail("predict", "--detect-every is for --track (without it every image is searched)")
    boxes = list(args.box or [])
    if args.person and not boxes:
        _fail("predict", "--person needs --box x1,y1,x2,y2: only faces are detected")
    if predictor.box_kind == "person" and not boxes:
        _fail("predict", f"{args.model} is a pose model ({predictor.num_landmarks} joints): give the person boxes "
                         "with --box x1,y1,x2,y2 (only faces are detected)")
    if predictor.box_kind == "face" and (not boxes or args.track):  # tracking looks again for lost faces
        from larq_landmarks.detection import FaceDetector

        try:
            predictor.detector = FaceDetector(args.detector, args.min_score)
        except ImportError as error:
            _fail("predict", str(error))
    from tqdm import tqdm

    # every image first, then the files: a failure leaves no folder, overlay or landmarks.json
    args.images = _image_files(args.images)
    images, image_boxes = [], []
    for path in tqdm(args.images, desc="read", unit="image"):
        try:
            images.append(load_rgb(path))
            if not args.track:
                image_boxes.append(boxes or predictor.detect(images[-1], name=path).tolist())
        except InputError as error:
            _fail("predict", str(error))
    try:
        if args.track:  # frames in order: each face's box from its landmarks in the frame before
            tracked = list(predictor.track(tqdm(images, desc="track", unit="frame"), boxes or None,
                                           detect_every=args.detect_every, names=args.images))
            found = [(points, scores) for points, scores, _ in tracked]
            image_boxes = [frame_boxes.tolist() for _, _, frame_boxes in tracked]
        else:  # the faces of all images together, --batch-size crops a model call
            run_many = predictor.segment_many if segmentation else predictor.predict_many
            found = run_many(images, image_boxes, progress=True, batch_size=args.batch_size, names=args.images)
    except InputError as error:
        _fail("predict", str(error))
    results, pictures = {}, {}
    for path, stem, image, box_list, result in zip(args.images, _picture_stems(args.images), images, image_boxes, found):
        if segmentation:  # the class map as a grey PNG of class numbers, and in colour over the image
            counts = np.bincount(result.ravel(), minlength=len(FACE_PART_CLASSES))
            results[path] = {"boxes": box_list, "mask": f"{stem}_mask.png",
                             "pixels": dict(zip(FACE_PART_CLASSES, counts.tolist()))}
            pictures[f"{stem}_mask"] = Image.fromarray(result, mode="L")
            pictures[f"{stem}_parts"] = visualize.overlay_mask(image, result)
            continue
        points, scores = result
        results[path] = {"boxes": box_list, "landmarks": points.tolist(), "scores": scores.tolist()}
        picture = visualize.draw_landmarks(image, np.zeros((0, 2)))
        for p in points:
            picture = visualize.draw_landmarks(np.asarray(picture), p)
        pictures[f"{stem}_landmarks"] = picture
    _make_output_folder("predict", args.out)
    for name, picture in pictures.items():
        visualize.save_png(picture, os.path.join(args.out, f"{name}.png"))
    written = os.path.join(args.out, "parts.json" if segmentation else "landmarks.json")
    with atomic_path(written) as temporary, open(temporary, "w") as f:
        json.dump(results, f)
    print(f"wrote {written} and {'masks' if segmentation else 'overlays'} in {args.out}")
    return 0


def _int8_fine_tune(args: argparse.Namespace, model, columns, calibration, path: str) -> None:
    """``convert --int8-fine-tune``: quantisation-aware fine-tuning of ``model`` on ``columns``,
    saved to ``path`` (the output's name with .keras: the model the int8 .tflite is converted from)."""
    import tensorflow as tf

    from larq_landmarks import quantization, training
    from larq_landmarks.datasets import formats

    size, channels = model.input_shape[1], model.outputs[-1].shape[-1]
    points = formats.get_format(args.format).num_points
    task = "segmentation" if channels == 7 else "heatmaps"  # the 7 facial part classes, as Predictor reads them
    if (task == "heatmaps" and channels != points) or (task == "segmentation" and points != 68):
        wanted = "68 (its part masks are drawn from 68-point faces)" if task == "segmentation" else channels
        _fail("convert", f"--int8-fine-tune: {args.model} has {channels} output channels, so it trains on {wanted} "
                         f"points; format {args.format!r} has {points}")
    data = _training_data(args, columns, points, size, task == "segmentation")
    tf.keras.utils.set_random_seed(args.seed)
    print(f"int8 fine-tuning: {args.int8_fine_tune} steps of {args.batch_size} at rate {args.learning_rate:g}")
    history = quantization.int8_fine_tune(model, data, calibration, args.int8_fine_tune, args.learning_rate, task,
                                          verbose=0)
    training.save_model(model, path)
    print(f"fine-tuned model (loss {history.history['loss'][-1]:.4g}): {path}")


def _convert(args: argparse.Namespace) -> int:
    from larq_landmarks import export, models

    if os.path.isdir(args.output):
        _fail("convert", f"{args.output} is a folder; give the .tflite file to write, e.g. {os.path.join(args.output, 'model.tflite')}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        _fail("convert", f"{os.path.dirname(os.path.abspath(args.output))}: folder not found")
    if args.int8_calibration and args.float:
        _fail("convert", "--int8-calibration is for LCE files; --float writes float32")
    if args.int8_calibration and not args.format:
        _fail("convert", "--int8-calibration needs --format (the calibration data set's format)")
    if args.int8_fine_tune and not args.int8_calibration:
        _fail("convert", "--int8-fine-tune needs --int8-calibration (the data set to fine-tune and calibrate on)")
    tuned = os.path.splitext(args.output)[0] + ".keras"
    if args.int8_fine_tune and os.path.abspath(tuned) == os.path.abspath(args.model):
        _fail("convert", f"--int8-fine-tune saves the fine-tuned model as {tuned}, the model it reads: name the "
                         "output otherwise")
    # a model trained in mixed precision (train --dtype-policy): its float32 copy, converted,
    # calibrated and fine-tuned (the .keras saved by --int8-fine-tune is float32)
    model = models.float32_model(_load_model("convert", args.model))
    calibration = None
    if args.int8_calibration:
        from larq_landmarks.datasets import pipeline

        args.data, args.skip_bad = args.int8_calibration, False
        columns = _read(args, "convert")
        crops = pipeline.evaluation_dataset(columns, export.last_stack(model).input_shape[1], args.calibration_count)
        calibration = next(iter(crops))["image"].numpy()
        print(f"calibrating int8 ranges on {len(calibration)} crops of {args.int8_calibration}")
        if args.int8_fine_tune:
            _int8_fine_tune(args, model, columns, calibration, tuned)
    flatbuffer = export.convert(
        model, args.output, binary=not args.float, batch_size=None if args.dynamic_batch else 1,
        int8_calibration=calibration,
    )
    counts = export.op_counts(flatbuffer)
    kind = "float" if calibration is None else "int8"
    print(f"wrote {args.output}: {len(flatbuffer):,} bytes, "
          f"{counts.get('LceBconv2d', 0)} LceBconv2d, {counts.get('CONV_2D', 0)} {kind} CONV_2D"
          + ("" if calibration is None else ", int8 activations"))
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from larq_landmarks import speed
    from larq_landmarks.atomic import atomic_path

    _check_output_file("benchmark", "--json", args.json)  # before the timing (written at the end)
    try:
        model = speed.load_or_build(args.model, args.landmarks, args.input_size)
        print(f"converting {model.name} and timing it here ({args.rounds} rounds of {args.runs} calls an engine)")
        result = speed.compare(model, args.threads, args.rounds, args.runs)
    except ValueError as error:
        _fail("benchmark", str(error))
    print("\n" + speed.markdown(result))
    if args.json:
        with atomic_path(args.json) as temporary, open(temporary, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _data_arguments(parser, task_default: Optional[str], task_help: str):
    from larq_landmarks.datasets.formats import FORMATS

    parser.add_argument("--format", required=True, choices=tuple(FORMATS), help="data-set format")
    parser.add_argument("--data", required=True, nargs="+", metavar="DATA",
                        help="data-set folder (or the MPII .mat / .json annotation file); several are read "
                        "as one data set (300W's training sets: afw lfpw/trainset helen/trainset)")
    parser.add_argument("--images", help="image folder (MPII formats)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad samples with a warning")
    parser.add_argument("--task", default=task_default, choices=("heatmaps", "segmentation"), help=task_help)
    parser.add_argument("--batch-size", type=positive_int, default=10)


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (also the scripts' counts)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def _engine(text: str) -> str:
    from larq_landmarks.tflite_model import check_engine

    try:
        return check_engine(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _box(text: str) -> List[float]:
    """``--box x1,y1,x2,y2``: four finite numbers."""
    parts = text.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{text!r} is not x1,y1,x2,y2 (four numbers)")
    return values


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _tflite_arguments(parser, several_precisions: bool = False):
    parser.add_argument("--engine", default="auto", type=_engine,
                        help=".tflite only: auto (the bit-packed runtime, LCE's interpreter where it "
                        "cannot run the file or where the CPU lacks AVX2, an ARM one say), runtime, lce, or cuda "
                        "(the runtime on an NVIDIA GPU; needs CuPy); cuda:N runs it on GPU N")
    parser.add_argument("--threads", type=positive_int, default=usable_cores(),
                        help="threads for a .tflite model on the CPU (default: every core this process may use)")
    parser.add_argument("--float-precision", default="float32", choices=("float32", "bfloat16", "int8"),
                        nargs="+" if several_precisions else None,
                        help=".tflite on the runtime only: bfloat16 runs the float convolutions with bfloat16 "
                        "products, on CPUs with AVX512_BF16 (faster on the AMD Zen 5 and, on its AMX tiles, the Intel "
                        "Xeon measured); int8 with int8 products of inputs quantised "
                        "as they are read, faster still, on CPUs with AVX512_VNNI or on the avx2 kernels (landmarks "
                        "may move slightly)" + ("; several: each model in each, side by side" if several_precisions else ""))


def build_parser() -> argparse.ArgumentParser:
    from larq_landmarks.datasets import formats

    parser = argparse.ArgumentParser(
        prog="larq-landmarks", description="Binarized landmark localizers (Larq / LCE)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="the main job end to end on built-in synthetic data",
        description="Write a synthetic 300W-format data set, train a small binary model on it, "
        "evaluate it, convert it with LCE, and write a report with pictures.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=positive_int, default=1000, help="training steps (default 1000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-images", type=positive_int, default=400, help="synthetic training faces (default 400)")
    demo.add_argument("--test-images", type=positive_int, default=64, help="synthetic test faces (default 64)")
    demo.add_argument("--width", type=positive_int, default=64, help="the hourglass's width (default 64)")
    demo.add_argument("--depth", type=positive_int, default=2, help="the hourglass's depth (default 2)")
    demo.add_argument("--one-stage", action="store_true",
                      help="train the binary network in one stage (default: two, real weights first)")
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train a named model on a data set",
                                description="Train with model.fit on the augmented tf.data pipeline; "
                                "resumes an interrupted run in the same --out folder.")
    _data_arguments(train, "heatmaps", "landmark heatmaps (default) or facial part segmentation (7 classes, "
                    "from 68-point faces)")
    train.add_argument("--out", required=True, help="run folder: model.keras, backup/, logs/ (and best.keras)")
    train.add_argument("--validation-data", nargs="+", metavar="DATA",
                       help="data-set folders (or annotation file) in --format to score after every epoch: "
                       "the loss and the NME of the heatmaps' peaks in the crops (keras_metrics.HeatmapNME; "
                       "inter-ocular for 68 points; for MPII also their PCK@0.5 of a tenth of the heatmap side, "
                       "keras_metrics.HeatmapPCK, which picks the best epoch) or the mean IU of the parts, in "
                       "the log and TensorBoard; the best epoch's model is kept as --out/best.keras (evaluate "
                       "gives the papers' protocol on the original images)")
    train.add_argument("--model", default="binary_hpm", help="named configuration (models/*.json)")
    train.add_argument("--epochs", type=positive_int, default=100)
    train.add_argument("--steps-per-epoch", type=positive_int, help="default: data-set size / batch size")
    train.add_argument("--learning-rate", type=_positive_float, default=2.5e-4)
    train.add_argument("--optimizer", choices=["adam", "rmsprop"], default="adam",
                       help="adam (default) or rmsprop (the papers')")
    train.add_argument("--schedule", choices=["step", "cosine", "constant"], default="step",
                       help="step (the papers' decay, default), cosine with a linear warm-up, or constant")
    train.add_argument("--warmup", type=float, default=None,
                       help="fraction of the steps warming up (cosine only; default 0.05)")
    train.add_argument("--input-size", type=int, default=256)
    train.add_argument("--width", type=int, help="override the configuration's width")
    train.add_argument("--depth", type=int, help="override the configuration's depth")
    train.add_argument("--num-stacks", type=int, help="override the configuration's stacks")
    train.add_argument("--sigma", type=_positive_float, default=1.5, help="heatmap Gaussian sigma (pixels)")
    train.add_argument("--input-quantizer", choices=["ste_sign", "approx_sign", "swish_sign"],
                       help="binary networks: the activations' sign and its gradient (default approx_sign; "
                       "ste_sign is the papers'; all convert to LCE)")
    train.add_argument("--dtype-policy", choices=DTYPE_POLICIES, default="float32",
                       help="Keras dtype policy of the networks trained: mixed_bfloat16 computes in bfloat16 "
                       "with float32 weights (CPUs with AVX512_BF16 or AMX, GPUs from Ampere), mixed_float16 "
                       "in float16 with loss scaling (GPUs with tensor cores); the model converts as before "
                       "(default float32)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quiet", action="store_true", help="one line per epoch")
    train.add_argument("--one-stage", action="store_true",
                       help="binary networks: train in one stage (the papers'); default two, one half of the "
                       "network real-valued for the first epochs (--out/stage1, see --first-stage and "
                       "--first-fraction), then binary")
    train.add_argument("--first-stage", choices=["binary_weights", "binary_activations"], default="binary_activations",
                       help="two-stage training: what the first stage binarizes (default binary_activations: "
                       "real weights first; binary_weights: real activations first)")
    train.add_argument("--first-fraction", type=float,
                       help="two-stage training: the first stage's share of the epochs (default "
                       "training.DEFAULT_FIRST_FRACTION)")
    train.add_argument("--teacher", metavar="MODEL",
                       help="distil from this trained model (a real-valued twin, e.g. --model real_hpm, with the "
                       "same outputs): its heatmaps and attention maps at the block outputs join the loss in "
                       "every stage (larq_landmarks.distillation.Distiller); model.keras is the student")
    train.add_argument("--attention-weight", type=_non_negative_float, default=1.0,
                       help="with --teacher: weight of the attention-map loss (0: heatmaps only; default 1)")
    train.add_argument("--overwrite", action="store_true",
                       help="train again in an --out that holds a finished (or interrupted) run")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="the papers' tables for a model on a data set",
                                   description="Print NME (by yaw bin, visible points), PCKh by joint "
                                   "or segmentation scores, and optionally write them as JSON.")
    _data_arguments(evaluate, None, "what the model was trained for (default: from its outputs, segmentation "
                    "for 7 channels, the part classes)")
    evaluate.add_argument("--model", required=True, nargs="+",
                          help=".keras / SavedModel / .tflite; several (a binary model and its real-valued twin, "
                          "say) are scored on the same data and compared side by side")
    _tflite_arguments(evaluate, several_precisions=True)
    evaluate.add_argument("--flip-test", action="store_true", help="add the mirrored prediction")
    evaluate.add_argument("--json", help="write the tables to this JSON file")
    evaluate.add_argument("--per-image", help="write each image's error to this CSV file (NME, PCKh or segmentation scores)")
    evaluate.add_argument("--ced", help="faces: plot each model's cumulative error distribution (NME by box, up to "
                          "0.07) to this PNG; on 300W's test folders, its common, challenging and private sets' "
                          "(inter-ocular NME, up to 0.08)")
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="landmarks (or facial parts) for boxes in your own images",
                                  description="Write landmarks.json and overlay PNGs to --out; with --task "
                                  "segmentation, parts.json, each image's class map (<name>_mask.png, grey "
                                  "levels 0-6) and its parts in colour (<name>_parts.png).")
    predict.add_argument("images", nargs="+", help="image files, or folders of them (in name order)")
    predict.add_argument("--model", required=True, help=".keras / SavedModel / .tflite")
    _tflite_arguments(predict)
    predict.add_argument("--box", action="append", type=_box, help="x1,y1,x2,y2 in pixels, may be negative "
                         "(repeat for several; default: the faces BlazeFace finds)")
    predict.add_argument("--detector", default="front", choices=list(DETECTOR_MODELS),
                         help="BlazeFace model for images without --box: front (close faces, "
                         "default), back, short (MediaPipe's newer close-range one), full (faces up to ~5 m)")
    predict.add_argument("--min-score", type=_fraction, default=0.5, help="detection confidence to keep a face (0..1)")
    predict.add_argument("--person", action="store_true",
                         help="boxes are person boxes (default: for a 16-joint MPII model, else face boxes)")
    predict.add_argument("--task", choices=("heatmaps", "segmentation"),
                         help="what the model was trained for, landmarks or facial parts (default: from its "
                         "outputs, segmentation for 7 channels, the part classes)")
    predict.add_argument("--flip-test", action="store_true")
    predict.add_argument("--track", action="store_true",
                         help="the images are a video's frames, in order: each face's box is the box of its landmarks "
                         "in the frame before (the detector runs on the first frame and where a face is lost)")
    predict.add_argument("--detect-every", type=positive_int, default=0,
                         help="with --track: also look for faces every this many frames (new faces come in)")
    predict.add_argument("--batch-size", type=positive_int, default=64,
                         help="face crops a model call, from as many images as it takes (a GPU wants many)")
    predict.add_argument("--out", default="predictions")
    predict.set_defaults(run=_predict)

    convert = commands.add_parser(
        "convert", help="convert a saved Keras model to a .tflite flatbuffer",
        description="Convert a saved model (its last stack) with Larq Compute Engine to a "
        "bit-packed .tflite (with --int8-calibration, int8 activations), or with --float to a plain float32 "
        "TFLite reference.",
    )
    convert.add_argument("model", help="saved Keras model (.keras file or SavedModel folder)")
    convert.add_argument("output", help="the .tflite file to write (atomically)")
    convert.add_argument("--float", action="store_true", help="plain float32 TFLite, no LCE ops")
    convert.add_argument("--dynamic-batch", action="store_true", help="keep the batch size dynamic")
    convert.add_argument("--int8-calibration", metavar="DATA",
                         help="int8 activations and float weights (for LCE's int8 kernels on ARM), each tensor's "
                         "range measured on the crops of this data set (its first --calibration-count samples)")
    convert.add_argument("--format", choices=tuple(formats.FORMATS), help="--int8-calibration's data-set format")
    convert.add_argument("--images", help="--int8-calibration's image folder (MPII formats)")
    convert.add_argument("--calibration-count", type=positive_int, default=32,
                         help="crops to calibrate on (default 32)")
    convert.add_argument("--int8-fine-tune", metavar="STEPS", type=positive_int,
                         help="first fine-tune the model STEPS steps with int8 activations (quantisation-aware, on "
                         "--int8-calibration's data augmented as in training), and save it as the output's name "
                         "with .keras; a few hundred steps")
    convert.add_argument("--learning-rate", type=_positive_float, default=2e-5,
                         help="--int8-fine-tune's constant Adam rate (default 2e-5)")
    convert.add_argument("--batch-size", type=positive_int, default=10, help="--int8-fine-tune's batch (default 10)")
    convert.add_argument("--sigma", type=_positive_float, default=1.5,
                         help="--int8-fine-tune's heatmap Gaussian sigma, as the model was trained (default 1.5)")
    convert.add_argument("--seed", type=int, default=0, help="--int8-fine-tune's augmentation and shuffling seed")
    convert.set_defaults(run=_convert)

    benchmark = commands.add_parser(
        "benchmark", help="time the binary model against its float32 twin on this machine",
        description="Convert a model with LCE and to float32 TFLite, and time every engine that runs them here "
        "(XNNPACK the float32 file; LCE's interpreter and this package's runtime the binary one; LCE's interpreter "
        "the binary one with int8 activations) at batch 1, the engines taking turns; print the table (and write it "
        "as JSON).")
    benchmark.add_argument("--model", default="binary_hpm",
                           help="a saved Keras model, or a named configuration (default binary_hpm, the papers' "
                           "network; docs/models.md)")
    benchmark.add_argument("--landmarks", type=positive_int, default=68, help="a named configuration's outputs")
    benchmark.add_argument("--input-size", type=positive_int,
                           help="a named configuration's input side (default its own, 256)")
    benchmark.add_argument("--threads", type=positive_int, default=1, help="threads of every engine (default 1)")
    benchmark.add_argument("--rounds", type=positive_int, default=5)
    benchmark.add_argument("--runs", type=positive_int, default=20, help="calls an engine makes in a round")
    benchmark.add_argument("--json", help="write the result to this JSON file")
    benchmark.set_defaults(run=_benchmark)

    for sub in (demo, train, evaluate, predict, convert, benchmark):
        sub.add_argument("--config", help="JSON file of options (flags given here win)")
    return parser


def _join_negative_boxes(argv: List[str]) -> List[str]:
    """``--box -50,-50,100,100`` as ``--box=-50,-50,100,100`` (argparse would read the value,
    which starts with "-", as an option)."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] == "--box" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            joined.append(f"--box={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _join_negative_boxes(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    subparsers = parser._subparsers._group_actions[0].choices
    command = argv[0] if argv and argv[0] in subparsers else None
    if config_path and command:
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as error:
            _fail(command, f"cannot read config {config_path!r} ({error})")
        subparser = subparsers[command]
        known = {action.dest for action in subparser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            _fail(command, f"config {config_path!r} has unknown options {unknown}")
        for action in subparser._actions:  # a number in the file gets the check its flag gets
            value = config.get(action.dest)
            if action.type is not None and isinstance(value, (bool, int, float)):
                try:
                    action.type(str(value))
                except (argparse.ArgumentTypeError, ValueError) as error:
                    _fail(command, f"config {config_path!r}: {action.dest}={value!r}: {error}")
        subparser.set_defaults(**config)
        for action in subparser._actions:  # the config may supply required options
            if action.dest in config:
                action.required = False
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
