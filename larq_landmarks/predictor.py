"""Run a trained model on your own images: boxes in, landmarks out (like face-alignment's API).

    predictor = Predictor.from_path("face.tflite")      # or a saved Keras model
    points, scores = predictor.predict("photo.jpg", boxes=[[x1, y1, x2, y2]])
    points, scores = predictor.predict("photo.jpg")     # faces found by BlazeFace

    parts = Predictor.from_path("parts.tflite")         # 7 outputs: the facial part classes
    labels = parts.segment("photo.jpg")                 # (H, W) class map

A model's output channels say what it is when nobody says (``task``, ``box_kind``): 7 the facial
part classes (segmentation), 16 MPII's joints (landmarks in person boxes), 68 or 34 face landmarks.

A ``.tflite`` run by this package's runtime (CPU or CUDA) needs no TensorFlow: crops, decoding and
the mapping back to the image are NumPy (or CuPy); only Keras models and LCE's interpreter need it.
"""
import contextlib
import os
import sys
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from larq_landmarks import layouts, tflite_model
from larq_landmarks.cropping import (crop_labels_to_image, crop_matrices, crop_points_to_image, face_crop,
                                     person_crop, sampling_params, warp_crops)
from larq_landmarks.images import rgb_from_pil, scaled_to_uint8
from larq_landmarks.runtime.decoding import decode_heatmaps_array

if TYPE_CHECKING:
    import tensorflow as tf
    from PIL import Image

    from larq_landmarks.detection import FaceDetector

ImageLike = Union[str, os.PathLike, "Image.Image", np.ndarray]
TASKS = ("heatmaps", "segmentation")


class InputError(ValueError):
    """An image, box or model given to the predictor cannot be used."""


def load_rgb(image: ImageLike, name: str = "image") -> np.ndarray:
    """A path, PIL image or array as an ``(H, W, 3)`` uint8 array; errors name the input. Files
    are decoded with Pillow and turned upright as their EXIF orientation says (a phone's photo as a
    viewer shows it: the landmarks are in those pixels). A PIL image or an array is taken as its
    pixels are; 16-bit grey, in a file, a PIL image or a uint16 array, is scaled to 8 bits
    (:func:`larq_landmarks.images.rgb_from_pil`); arrays need no Pillow (a GPU machine may lack it)."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise InputError(f"{image}: image file not found")
        from PIL import Image, ImageOps

        try:
            with Image.open(image) as opened:
                return rgb_from_pil(ImageOps.exif_transpose(opened))
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"{image}: image cannot be decoded ({error})") from error
    pil = sys.modules.get("PIL.Image")  # where Pillow was never imported, no PIL image exists
    if pil is not None and isinstance(image, pil.Image):
        return rgb_from_pil(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise InputError(f"{name}: expected an (H, W, 3) image array, got shape {array.shape}")
    if array.size == 0:
        raise InputError(f"{name}: an image of no pixels (shape {array.shape})")
    if array.dtype == np.uint8:
        return array[..., :3]
    if array.dtype == np.bool_ or array.dtype.kind not in "uif":
        raise InputError(f"{name}: expected an integer or float image array, got dtype {array.dtype}")
    if array.dtype.kind in "ui":  # scaled by the type's range: uint16 65535 -> 255
        if array.min() < 0:
            raise InputError(f"{name}: {array.dtype} image has negative values; "
                             f"expected 0..{np.iinfo(array.dtype).max}")
        return scaled_to_uint8(array[..., :3])
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name}: image array contains NaN or infinity")
    if array.min() < 0 or array.max() > 1:
        raise InputError(f"{name}: float images must be in [0, 1], got values in "
                         f"[{float(array.min()):g}, {float(array.max()):g}] (give uint8 for 0..255)")
    return np.round(array[..., :3].astype(np.float64) * 255.0).astype(np.uint8)


def _check_model_shapes(inputs: tuple, outputs: tuple, name: str) -> None:
    """A landmark model: one ``(B, S, S, 3)`` image input, one ``(B, S/4, S/4, K)`` output."""
    ok = (len(inputs) == 4 and len(outputs) == 4 and inputs[-1] == 3 and inputs[1] is not None
          and inputs[1] == inputs[2] and outputs[1] is not None and outputs[1] == outputs[2]
          and outputs[1] * 4 == inputs[1])
    if not ok:
        raise InputError(f"{name}: not a larq_landmarks model (input {inputs}, output {outputs}; "
                         "expected one (B, S, S, 3) image input and one (B, S/4, S/4, K) output)")


def check_boxes(boxes, name: str = "image") -> np.ndarray:
    """``boxes`` as an ``(N, 4)`` float32 array of finite ``x1, y1, x2, y2``; anything else (a flat
    or 8-number list, three values, None, strings, NaN) is an :class:`InputError` saying what was
    expected. An empty list is no boxes."""
    expected = "boxes must be [[x1, y1, x2, y2], ...]"
    try:
        array = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name}: {expected}, got {str(boxes)[:80]!r}") from None
    if array.size == 0:
        return np.zeros((0, 4), np.float32)
    if array.ndim != 2 or array.shape[1] != 4:
        raise InputError(f"{name}: {expected} (shape (N, 4)), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name}: boxes contain NaN or infinity")
    return array.astype(np.float32)


def flip_test(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, permutation, xp=np) -> np.ndarray:
    """The papers' flip test: ``f(x) + unflip(swapLR(f(flip(x))))`` on heatmaps (``xp``: the
    array module of what ``predict`` returns, NumPy or CuPy)."""
    heatmaps = xp.asarray(predict(images))
    flipped = xp.asarray(predict(images[:, :, ::-1]))[:, :, ::-1]
    return heatmaps + flipped[..., xp.asarray(permutation)]


class Predictor:
    """Landmarks (or facial part classes) for boxes in images, from a Keras model or a converted
    ``.tflite``.

    Args:
        predict: crops ``(B, S, S, 3)`` float in [0, 1] -> heatmaps (or class logits)
            ``(B, S/4, S/4, K)``.
        input_size: S.
        num_landmarks: K, the landmarks, or the classes of a segmentation model.
        box_kind: ``"face"`` (face-alignment's crop from a face box) or ``"person"``; None: from
            K (``"person"`` for MPII's 16 joints, else ``"face"``:
            :func:`~larq_landmarks.layouts.default_box_kind`).
        use_flip_test: average with the mirrored image (landmarks: needs a known layout, 68, 34
            or 16; segmentation: the classes are their own mirror images).
        detector: finds face boxes when :meth:`predict` gets none (default: a
            :class:`~larq_landmarks.detection.FaceDetector`, made on first use).
        task: ``"heatmaps"`` (a landmark model: :meth:`predict`) or ``"segmentation"`` (a part
            segmentation model, ``--task segmentation`` in training: :meth:`segment`); None: from
            K (a model file does not say; the 7 part classes are ``"segmentation"``, the landmark
            layouts 68, 34 and 16 ``"heatmaps"``: :func:`~larq_landmarks.layouts.default_task`).
    """

    def __init__(self, predict, input_size: int, num_landmarks: int, box_kind: Optional[str] = None,
                 use_flip_test: bool = False, detector: Optional["FaceDetector"] = None,
                 task: Optional[str] = None):
        task = layouts.default_task(num_landmarks) if task is None else task
        if task not in TASKS:
            raise ValueError(f"task={task!r} must be one of {TASKS}")
        box_kind = layouts.default_box_kind(num_landmarks, task) if box_kind is None else box_kind
        if box_kind not in ("face", "person"):
            raise ValueError(f"box_kind={box_kind!r} must be 'face' or 'person'")
        if task == "segmentation" and box_kind != "face":
            raise ValueError("a part segmentation model segments faces: box_kind must be 'face'")
        self._predict = predict
        # what _heatmaps runs, where its heatmaps are and what cuts the crops (NumPy; CuPy for the
        # GPU engine: _warp_crops(image, sampling parameters, size) there uploads only the image)
        self._predict_heatmaps, self._array_module, self._warp_crops = predict, np, warp_crops
        self._device = contextlib.nullcontext()  # the GPU engine's device, entered around the work there
        self.input_size = input_size
        self.num_landmarks = num_landmarks
        self.box_kind = box_kind
        self.task = task
        self.permutation = layouts.flip_permutation(num_landmarks, task) if use_flip_test else None
        self.detector = detector
        self.engine = "python"  # what runs the model: "keras", "runtime" or "lce"

    def detect(self, image: ImageLike, name: Optional[str] = None) -> np.ndarray:
        """Face boxes ``(N, 4)`` ``x1, y1, x2, y2`` in pixels, most confident first.

        People are not detected: a pose model needs the person boxes given to :meth:`predict`."""
        name = name or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
        if self.box_kind != "face":
            raise InputError(f"{name}: person boxes are not detected; give boxes=[[x1, y1, x2, y2], ...]")
        if self.detector is None:
            from larq_landmarks.detection import FaceDetector

            self.detector = FaceDetector()
        return self.detector.detect(load_rgb(image, name))[0]

    @classmethod
    def from_path(cls, path: str, box_kind: Optional[str] = None, use_flip_test: bool = False,
                  num_threads: int = 1, engine: str = "auto", task: Optional[str] = None,
                  float_precision: str = "float32") -> "Predictor":
        """Load a saved Keras model (``.keras`` / SavedModel folder / ``.h5``) or a ``.tflite``.

        ``engine`` runs a ``.tflite``: ``"auto"`` (this package's bit-packed runtime, or LCE's
        interpreter with a warning where the runtime cannot run the file; on a CPU without AVX2,
        an ARM one say, LCE's interpreter where installed: :class:`tflite_model.TfliteModel`),
        ``"runtime"``, ``"lce"`` or ``"cuda"`` (the runtime on an NVIDIA GPU, CuPy needed; CuPy's
        current device, or GPU N with ``"cuda:N"``). ``task`` and ``box_kind``: as
        :class:`Predictor` takes them (None: from the model's output channels).
        ``float_precision="bfloat16"`` or ``"int8"``: the runtime's bfloat16 or int8 float
        convolutions (a ``.tflite`` on a CPU with AVX512_BF16; int8 with AVX512_VNNI or on the avx2
        kernels; see :class:`~larq_landmarks.runtime.Engine`)."""
        if task not in (None, *TASKS):  # before loading anything
            raise ValueError(f"task={task!r} must be one of {TASKS}")
        if box_kind not in (None, "face", "person"):
            raise ValueError(f"box_kind={box_kind!r} must be 'face' or 'person'")
        if not os.path.exists(path):
            raise InputError(f"{path}: model not found")
        if str(path).endswith(".tflite"):
            if os.path.isdir(path):
                raise InputError(f"{path}: a folder, not a .tflite file")
            return cls._from_tflite(path, box_kind, use_flip_test, num_threads, engine, task, float_precision)
        if float_precision != "float32":
            raise ValueError(f"{path}: float_precision={float_precision!r} is for a .tflite run by the runtime; "
                             "a Keras model runs float32")
        import tensorflow as tf

        try:
            model = tf.keras.models.load_model(path)
        except Exception as error:
            raise InputError(f"{path}: cannot load a Keras model ({error})") from error
        return cls.from_model(model, box_kind, use_flip_test, name=str(path), task=task)

    @classmethod
    def from_model(cls, model: "tf.keras.Model", box_kind: Optional[str] = None, use_flip_test: bool = False,
                   name: Optional[str] = None, task: Optional[str] = None):
        """Wrap an in-memory Keras model (its last stack). It must map ``(B, S, S, 3)`` images to
        ``(B, S/4, S/4, K)`` heatmaps (or logits), as the ``.tflite`` path checks; ``name`` is how
        errors refer to it (default the model's name). A model trained in mixed precision runs as
        its float32 copy (``models.float32_model``), the network ``export.convert`` converts."""
        from larq_landmarks import export, models

        model = export.last_stack(models.float32_model(model))
        shape = model.output_shape
        _check_model_shapes(tuple(model.input_shape), tuple(shape), name or model.name)

        def predict(images):
            return model.predict_on_batch(images)

        predictor = cls(predict, model.input_shape[1], shape[-1], box_kind, use_flip_test, task=task)
        predictor.engine = "keras"
        return predictor

    @classmethod
    def _from_tflite(cls, path, box_kind, use_flip_test, num_threads, engine, task, float_precision):
        model = tflite_model.TfliteModel(path, engine, num_threads, float_precision=float_precision)
        inputs, outputs = model.input_shape, model.output_shape
        _check_model_shapes(tuple(inputs), tuple(outputs), str(path))
        predictor = cls(model.predict, inputs[1], outputs[-1], box_kind, use_flip_test, task=task)
        predictor.engine = model.engine
        if model.engine == "cuda":  # crops cut, heatmaps made and decoded on the GPU: images in, points out
            from larq_landmarks.runtime import cuda

            kernels = cuda.load(model.kernels)
            cp = kernels.cp
            predictor._array_module, predictor._warp_crops, predictor._device = cp, kernels.warp_crops, kernels.device
            predictor._predict_heatmaps = lambda crops: model.predict(cp.asarray(crops))
        return predictor

    def _crops(self, image: np.ndarray, boxes: np.ndarray, name: str):
        height, width = image.shape[:2]
        centres, scales = [], []
        for i, box in enumerate(boxes):
            x1, y1, x2, y2 = box
            if not np.all(np.isfinite(box)) or x2 <= x1 or y2 <= y1:
                raise InputError(f"{name}: box {i} {box.tolist()} has zero or negative size (or NaN)")
            if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
                raise InputError(f"{name}: box {i} {box.tolist()} lies outside the {width}x{height} image")
            centre, scale = face_crop(box) if self.box_kind == "face" else person_crop(box)
            centres.append(centre)
            scales.append(scale)
        matrices = crop_matrices(np.stack(centres), np.array(scales, np.float32), self.input_size)
        with self._device:
            return self._warp_crops(image, sampling_params(matrices), self.input_size), matrices

    def _check_task(self, task: str, method: str) -> None:
        if self.task != task:
            other = "segment" if method == "predict" else "predict"
            raise InputError(f"{method}() needs a {task} model; this predictor's task is {self.task!r} "
                             f"(use {other}(), or load the model with task={task!r})")

    def predict(self, image: ImageLike, boxes: Optional[Sequence[Sequence[float]]] = None,
                name: Optional[str] = None):
        """Landmarks for each box in one image.

        Args:
            image: file path, PIL image or ``(H, W, 3)`` array (uint8, or float in [0, 1]).
            boxes: ``(N, 4)`` ``x1, y1, x2, y2`` in pixels (face or person boxes). ``None``: the
                faces :meth:`detect` finds (face models only; given boxes always win).
            name: how errors refer to the image (default its path, or "image").

        Returns:
            ``(points, scores)``: ``(N, K, 2)`` image pixels and ``(N, K)`` heatmap peaks.
        """
        self._check_task("heatmaps", "predict")
        crops, matrices, shape = self._prepare(image, boxes, name)
        return self._points_in_image(self._decode(crops) if len(crops) else (), matrices, shape)

    def track(self, frames: Iterable[ImageLike], boxes: Optional[Sequence[Sequence[float]]] = None,
              min_score: float = 0.4, detect_every: int = 0,
              names: Optional[Sequence[str]] = None) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Landmarks through a video, frame after frame: each face's box in a frame is the box of its
        landmarks in the frame before (the box the models were trained with: the landmarks' extent),
        so that the face detector runs on the first frame and where a face is lost, not on every frame.

        Args:
            frames: the frames in order (paths, PIL images or ``(H, W, 3)`` arrays); read one at a
                time, so a generator of camera frames works.
            boxes: the first frame's boxes (default: the faces :meth:`detect` finds; a pose model
                needs them given, people are not detected).
            min_score: a face whose landmarks' mean heatmap peak falls below this is lost: the
                frame is searched again with the detector and the faces found replace the tracked
                ones (faces only: a person is tracked on, there is no person detector). The demo's
                trained model gives 0.84-0.91 on faces, 0.24-0.26 on background.
            detect_every: also search every this many frames (new faces come in); 0: only where
                a face is lost or none is tracked.
            names: how errors refer to the frames (default a frame's path, or "frame i").

        Returns:
            An iterator of ``(points, scores, boxes)``, one a frame as it is read: as
            :meth:`predict` returns, and the ``(N, 4)`` boxes the landmarks come from. The
            arguments are checked when it is made; a frame's errors come when it is reached.
        """
        self._check_task("heatmaps", "predict")  # the arguments checked now, not at the first frame
        if not np.isfinite(min_score) or min_score < 0:
            raise ValueError(f"min_score={min_score!r} must be a number of at least 0")
        if detect_every < 0:
            raise ValueError(f"detect_every={detect_every!r} must be 0 (only when lost) or a number of frames")
        return self._track(frames, None if boxes is None else check_boxes(boxes, "boxes"), min_score, detect_every,
                           names)

    def _track(self, frames, tracked, min_score, detect_every, names):
        for index, frame in enumerate(frames):
            name = names[index] if names is not None else (
                str(frame) if isinstance(frame, (str, os.PathLike)) else f"frame {index}")
            pixels = load_rgb(frame, name)
            searched = tracked is None or not len(tracked) or (detect_every and index and index % detect_every == 0)
            if searched:
                tracked = self.detect(pixels, name) if self.box_kind == "face" or tracked is None else tracked
            points, scores = self.predict(pixels, tracked, name)
            lost = scores.mean(axis=1) < min_score if self.box_kind == "face" else np.zeros(len(points), bool)
            if lost.any() and not searched:  # look for the faces again in this frame
                tracked = self.detect(pixels, name)
                points, scores = self.predict(pixels, tracked, name)
                lost = scores.mean(axis=1) < min_score
            yield points, scores, tracked
            following = np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1).astype(np.float32)
            flat = ~np.all(np.isfinite(following), axis=1) | (following[:, 2] - following[:, 0] < 1) | (
                following[:, 3] - following[:, 1] < 1)  # landmarks on a line, a point, or NaN: no box
            if self.box_kind == "face":  # a face without a box is lost
                lost |= flat
            else:  # no detector finds a person again: it keeps the box it had
                following = np.where(flat[:, None], tracked, following)
            height, width = pixels.shape[:2]
            x1, y1, x2, y2 = following.T
            gone = (x2 <= 0) | (y2 <= 0) | (x1 >= width) | (y1 >= height)  # it left the picture
            tracked = following[~(lost | gone)]

    def segment(self, image: ImageLike, boxes: Optional[Sequence[Sequence[float]]] = None,
                name: Optional[str] = None) -> np.ndarray:
        """Facial part classes of one image, from a segmentation model (``task="segmentation"``).

        Args:
            image, boxes, name: as for :meth:`predict` (``None``: the faces BlazeFace finds).

        Returns:
            ``(H, W)`` uint8 class map of the image (:data:`larq_landmarks.layouts.FACE_PART_CLASSES`:
            0 background, 1 skin, ..., 6 nose): each face's crop scores mapped back to the image's
            pixels (:func:`~larq_landmarks.cropping.crop_labels_to_image`); background outside
            every crop.
        """
        self._check_task("segmentation", "segment")
        crops, matrices, shape = self._prepare(image, boxes, name)
        return self._labels_in_image((self._logits(crops),) if len(crops) else (), matrices, shape)

    def _prepare(self, image: ImageLike, boxes, name: Optional[str]):
        """The model's input crops of ``image`` for ``boxes`` (detected when None), their
        image -> crop matrices (None without boxes) and the image's ``(height, width)``."""
        name = name or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
        pixels = load_rgb(image, name)
        if boxes is None:
            boxes = self.detect(pixels, name)
        boxes = check_boxes(boxes, name)
        if not len(boxes):
            return np.zeros((0, self.input_size, self.input_size, 3), np.float32), None, pixels.shape[:2]
        return (*self._crops(pixels, boxes, name), pixels.shape[:2])

    def _points_in_image(self, rows: tuple, matrices, shape) -> Tuple[np.ndarray, np.ndarray]:
        """An image's ``(points, scores)`` from its crops' decoded ``rows`` (``()``: no crops)."""
        if matrices is None:
            return np.zeros((0, self.num_landmarks, 2), np.float32), np.zeros((0, self.num_landmarks), np.float32)
        points, scores = rows
        return crop_points_to_image(points, matrices), scores

    def _labels_in_image(self, rows: tuple, matrices, shape) -> np.ndarray:
        """An image's class map from its crops' ``rows`` (``(logits,)``; ``()``: no crops)."""
        if matrices is None:
            return np.zeros(shape, np.uint8)
        return crop_labels_to_image(rows[0], matrices, self.input_size, *shape)

    def _heatmaps(self, crops: np.ndarray):
        if self.permutation is not None:
            return flip_test(self._predict_heatmaps, crops, self.permutation, self._array_module) / 2.0
        return self._predict_heatmaps(crops)

    def _decode(self, crops: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The model's landmarks for ``crops``: ``(points, scores)``, NumPy, points in crop pixels."""
        xp = self._array_module
        with self._device:
            heatmaps = xp.asarray(self._heatmaps(crops))
            points, scores = decode_heatmaps_array(heatmaps, xp)
            if xp is not np:
                points, scores = xp.asnumpy(points), xp.asnumpy(scores)
        # heatmap pixel centres -> crop pixel centres (heatmaps.heatmap_to_input, which needs TensorFlow)
        stride = self.input_size / heatmaps.shape[1]
        return (points + 0.5) * stride - 0.5, scores

    def _logits(self, crops: np.ndarray) -> np.ndarray:
        """The segmentation model's class logits for ``crops``, NumPy ``(B, S/4, S/4, K)``."""
        xp = self._array_module
        with self._device:
            logits = xp.asarray(self._heatmaps(crops))
            return xp.asnumpy(logits) if xp is not np else np.asarray(logits, np.float32)

    def predict_many(self, images: Sequence[ImageLike],
                     boxes: Optional[Sequence[Optional[Sequence[Sequence[float]]]]] = None,
                     progress: bool = False, batch_size: int = 64,
                     names: Optional[Sequence[str]] = None) -> List[tuple]:
        """:meth:`predict` over many images (``boxes[i]`` for ``images[i]``; ``None``: detect).
        The faces of several images go through the model together, ``batch_size`` crops every call
        but the last (an image's faces may be split between two calls): a GPU engine needs large
        batches to be fast, and one batch size to replay its CUDA graphs. ``names[i]``: how errors
        refer to ``images[i]`` (default its path, or "image")."""
        self._check_task("heatmaps", "predict")
        return self._run_many(images, boxes, names, progress, batch_size, self._decode, self._points_in_image)

    def segment_many(self, images: Sequence[ImageLike],
                     boxes: Optional[Sequence[Optional[Sequence[Sequence[float]]]]] = None,
                     progress: bool = False, batch_size: int = 64,
                     names: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """:meth:`segment` over many images, their faces batched as :meth:`predict_many` does."""
        self._check_task("segmentation", "segment")
        return self._run_many(images, boxes, names, progress, batch_size,
                              lambda crops: (self._logits(crops),), self._labels_in_image)

    def _run_many(self, images, boxes, names, progress: bool, batch_size: int,
                  run: Callable[[np.ndarray], tuple], finish: Callable[[tuple, Optional[np.ndarray], tuple], object]):
        """``finish(rows, matrices, shape)`` of each image, where ``run(crops)`` gives a tuple of
        NumPy arrays with one row a crop and ``rows`` are an image's rows (``()`` for no crops)."""
        if boxes is None:
            boxes = [None] * len(images)
        if names is None:
            names = [None] * len(images)
        if not len(images) == len(boxes) == len(names):
            raise InputError(f"{len(images)} images but {len(boxes)} box lists and {len(names)} names")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be a positive integer")
        items = zip(images, boxes, names)
        if progress:
            from tqdm import tqdm

            items = tqdm(items, total=len(images), desc="predict", unit="image")
        results: list = []
        waiting: List[tuple] = []  # (result index, crop count, matrices, shape): images whose rows are not all run
        queued: list = []  # crops not yet run (on the GPU engine's device there)
        done: List[tuple] = []  # rows of crops run, not yet handed to their images

        def run_queued(final: bool) -> None:
            """Runs the queued crops in calls of ``batch_size`` (and, when ``final``, the rest in one
            last call; otherwise the rest waits for the next images' crops), then hands every image
            whose crops have all run its result."""
            if queued:
                with self._device:  # the crops are on the GPU engine's device
                    crops = self._array_module.concatenate(queued) if len(queued) > 1 else queued[0]
                ready = len(crops) if final else len(crops) - len(crops) % batch_size
                done.extend(run(crops[i:i + batch_size]) for i in range(0, ready, batch_size))
                queued[:] = [crops[ready:]] if ready < len(crops) else []
            if not done:
                return
            rows = tuple(np.concatenate(parts) for parts in zip(*done))
            start = 0
            while waiting and start + waiting[0][1] <= len(rows[0]):
                index, count, matrices, shape = waiting.pop(0)
                end = start + count
                results[index] = finish(tuple(part[start:end] for part in rows), matrices, shape)
                start = end
            done[:] = [tuple(part[start:] for part in rows)] if start < len(rows[0]) else []

        for image, image_boxes, name in items:
            crops, matrices, shape = self._prepare(image, image_boxes, name)
            results.append(finish((), None, shape) if not len(crops) else None)
            if len(crops):
                waiting.append((len(results) - 1, len(crops), matrices, shape))
                queued.append(crops)
            if sum(len(crops) for crops in queued) >= batch_size:
                run_queued(final=False)
        run_queued(final=True)
        return results
