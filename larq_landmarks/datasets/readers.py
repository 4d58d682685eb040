"""Readers: data-set folders in their real on-disk formats -> annotation :class:`Record` lists.

Coordinates in records are 0-based pixels ``(x, y)`` with pixel centres at integers: 1-based
formats (``.pts``, MPII) are shifted by -1 on reading. ``.mat`` files of 300W-LP / AFLW2000-3D are
used as stored (the convention of the public evaluation code).

Every reader checks what it reads and raises :class:`DatasetError` naming the file, or, with
``skip_bad=True``, warns once with the count and names of the skipped files.
"""
import dataclasses
import glob
import json
import math
import os
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
from PIL import Image

from larq_landmarks.cropping import face_crop
from larq_landmarks.datasets import matlab_files

# Tried first, without opening the file; any other file beside the annotation with the same stem
# is used when Pillow can decode it (TIFF, PPM, WebP, JPEG 2000, ...).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG", ".BMP")
ANNOTATION_EXTENSIONS = (".pts", ".mat", ".json", ".txt", ".csv", ".xml")


class DatasetError(ValueError):
    """A data-set file is missing, unreadable or holds invalid annotations."""


@dataclasses.dataclass
class Record:
    """One annotated object (face or person) in one image.

    Attributes:
        image_path: path of the image file.
        points: ``(K, 2)`` float32 landmark ``(x, y)`` in 0-based pixels.
        visible: ``(K,)`` bool.
        centre: ``(2,)`` crop centre in pixels.
        scale: crop scale: the crop is a square of ``200 * scale`` pixels (METHOD.md 3).
        box: ``(4,)`` ``x1, y1, x2, y2`` box of the object (for faces: of the landmarks).
        extras: data-set specifics, e.g. ``yaw`` (degrees), ``head_size`` (MPII), ``subset``.
    """

    image_path: str
    points: np.ndarray
    visible: np.ndarray
    centre: np.ndarray
    scale: float
    box: np.ndarray
    extras: Dict[str, object] = dataclasses.field(default_factory=dict)


def points_box(points: np.ndarray, visible: Optional[np.ndarray] = None) -> np.ndarray:
    """``x1, y1, x2, y2`` of the (visible) points."""
    use = points if visible is None or not visible.any() else points[visible]
    return np.concatenate([use.min(0), use.max(0)]).astype(np.float32)


def _image_size(path: str) -> tuple:
    """Decode the whole image (catches truncated files) and return ``(width, height)``."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except Exception as error:
        raise DatasetError(f"{path}: image cannot be decoded ({error})") from error


def _find_image(annotation_path: str) -> str:
    """The image beside an annotation file: same folder and stem, any format Pillow decodes."""
    stem = os.path.splitext(annotation_path)[0]
    for ext in IMAGE_EXTENSIONS:
        if os.path.isfile(stem + ext):
            return stem + ext
    candidates = [
        path for path in sorted(glob.glob(glob.escape(stem) + ".*"))
        if os.path.isfile(path) and os.path.splitext(path)[1].lower() not in ANNOTATION_EXTENSIONS
    ]
    problems = []
    for path in candidates:
        try:
            with Image.open(path):  # reads the header: is this a format Pillow knows?
                return path
        except Exception as error:
            problems.append(f"{os.path.basename(path)}: {error}")
    tried = f"; tried {', '.join(problems)}" if problems else ""
    raise DatasetError(
        f"{annotation_path}: cannot pair it with an image: no file {os.path.basename(stem)}.<ext> "
        f"beside it that Pillow can decode{tried}"
    )


def _check_points(path: str, points: np.ndarray, num_points: int, size=None, visible=None):
    if points.shape != (num_points, 2):
        raise DatasetError(f"{path}: expected {num_points} points, found {points.shape[0]}")
    if not np.all(np.isfinite(points)):
        raise DatasetError(f"{path}: coordinates contain NaN or infinity")
    if size is not None:
        width, height = size
        use = points if visible is None else points[visible]
        margin = 0.1 * max(width, height)  # annotators place some points just off the border
        if use.size and (
            use.min() < -margin or (use[:, 0] > width + margin).any() or (use[:, 1] > height + margin).any()
        ):
            raise DatasetError(
                f"{path}: coordinates outside the {width}x{height} image "
                f"(x in [{use[:, 0].min():.1f}, {use[:, 0].max():.1f}], "
                f"y in [{use[:, 1].min():.1f}, {use[:, 1].max():.1f}])"
            )


def _collect(
    paths: Sequence[str], read_one: Callable[[str], List[Record]], skip_bad: bool, what: str
) -> List[Record]:
    if not paths:
        raise DatasetError(f"no {what} files found")
    records, skipped = [], []
    for path in paths:
        try:
            records.extend(read_one(path))
        except DatasetError as error:
            if not skip_bad:
                raise
            skipped.append(str(error))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} bad sample(s): " + "; ".join(skipped), stacklevel=3)
    if not records:
        raise DatasetError(f"no valid samples among {len(paths)} {what} files")
    return records


def _files(folder: str, pattern: str, recursive: bool) -> List[str]:
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: data-set folder not found")
    glob_pattern = os.path.join(folder, "**", pattern) if recursive else os.path.join(folder, pattern)
    paths = sorted(glob.glob(glob_pattern, recursive=recursive))
    if not paths:
        raise DatasetError(f"{folder}: no {pattern} files (an empty folder is not a data set)")
    return paths


# --- 300W / iBUG / LFPW / HELEN / AFW: images + .pts ----------------------------------------


def read_pts(path: str, num_points: Optional[int] = 68) -> np.ndarray:
    """Read a ``.pts`` file (``version: 1``, ``n_points: N``, ``{``, N lines ``x y``, ``}``).

    Returns ``(N, 2)`` float32 0-based pixel coordinates (the file is 1-based).
    """
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as some editors write, is not text
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read ({error})") from error
    if len(lines) < 3:
        raise DatasetError(f"{path}: not a .pts file ({len(lines)} non-empty lines; expected 'version: 1', "
                           "'n_points: N', '{', N points, '}')")
    try:
        if not lines[0].startswith("version"):
            raise DatasetError(f"{path}: malformed header: first line is {lines[0]!r}, expected 'version: 1'")
        key, _, value = lines[1].partition(":")
        if key.strip() != "n_points":
            raise DatasetError(f"{path}: malformed header: second line is {lines[1]!r}, expected 'n_points: N'")
        count = int(value)
        if lines[2] == "{" and len(lines) < 4 + count:  # the header, '{', the points and '}'
            raise DatasetError(f"{path}: n_points is {count}, but {len(lines) - 3} lines follow '{{' "
                               f"(expected {count} points and '}}')")
        if lines[2] != "{" or lines[3 + count] != "}":
            raise DatasetError(f"{path}: malformed file: points must be enclosed in '{{' and '}}'")
        points = np.array([[float(v) for v in line.split()[:2]] for line in lines[3 : 3 + count]], np.float32)
    except (IndexError, ValueError) as error:
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(f"{path}: malformed .pts file ({error})") from error
    if points.shape != (count, 2):
        raise DatasetError(f"{path}: expected {count} 'x y' lines")
    if num_points is not None:
        _check_points(path, points, num_points)
    return points - 1.0


def read_pts_folder(
    folder: str, num_points: int = 68, recursive: bool = True, skip_bad: bool = False
) -> List[Record]:
    """All ``image + .pts`` pairs under ``folder`` (300W train sets, iBUG, the 300W
    ``01_Indoor`` / ``02_Outdoor`` test folders). ``extras["subset"]`` is the sub-folder name."""

    def read_one(path):
        points = read_pts(path, num_points)
        image_path = _find_image(path)
        size = _image_size(image_path)
        _check_points(path, points, num_points, size)
        box = points_box(points)
        centre, scale = face_crop(box)
        subset = os.path.relpath(os.path.dirname(path), folder)
        return [Record(image_path, points, np.ones(num_points, bool), centre, scale, box, {"subset": subset})]

    return _collect(_files(folder, "*.pts", recursive), read_one, skip_bad, ".pts")


# --- 300W-LP, AFLW2000-3D, AFLW-PIFA: images + .mat ---------------------------------------


def _loadmat(path: str, keys: Iterable[str]) -> dict:
    try:
        data = matlab_files.loadmat(path)
    except Exception as error:
        raise DatasetError(f"{path}: cannot read .mat file ({error})") from error
    missing = [k for k in keys if k not in data]
    if missing:
        found = sorted(k for k in data if not k.startswith("__"))
        raise DatasetError(f"{path}: .mat file lacks {missing} (has {found})")
    return data


def _mat_face_record(path: str, num_points: int, skip_pose: bool = False) -> Record:
    data = _loadmat(path, [] if skip_pose else ["Pose_Para"])
    for key in ("pt3d_68", "pt2d"):
        if key in data and np.asarray(data[key]).shape[-1] == num_points:
            points = np.asarray(data[key], np.float32)[:2].T.copy()
            break
    else:
        shapes = {k: np.asarray(data[k]).shape for k in ("pt3d_68", "pt2d") if k in data}
        raise DatasetError(f"{path}: no {num_points}-point 'pt3d_68' or 'pt2d' array (found {shapes or 'neither'})")
    image_path = _find_image(path)
    size = _image_size(image_path)
    _check_points(path, points, num_points, size)
    box = points_box(points)
    centre, scale = face_crop(box)
    extras = {}
    if not skip_pose:
        pose = np.asarray(data["Pose_Para"], np.float64).ravel()
        if pose.size < 3 or not np.all(np.isfinite(pose[:3])):
            raise DatasetError(f"{path}: Pose_Para must start with finite pitch, yaw, roll")
        extras = {"pitch": math.degrees(pose[0]), "yaw": math.degrees(pose[1]), "roll": math.degrees(pose[2])}
    return Record(image_path, points, np.ones(num_points, bool), centre, scale, box, extras)


def read_300w_lp(folder: str, recursive: bool = True, skip_bad: bool = False) -> List[Record]:
    """300W-LP: ``image.jpg`` + ``image.mat`` with ``pt2d`` (2x68) or ``pt3d_68`` and
    ``Pose_Para`` (pitch, yaw, roll, ... in radians). ``extras`` has the angles in degrees.
    The release's ``landmarks/`` sub-folder (separate ``*_pts.mat`` files) is skipped."""
    # 300W-LP's landmarks/ folder holds separate *_pts.mat files (pts_2d, pts_3d): not samples
    paths = [p for p in _files(folder, "*.mat", recursive)
             if "landmarks" not in os.path.relpath(p, folder).split(os.sep)[:-1]]
    return _collect(paths, lambda p: [_mat_face_record(p, 68)], skip_bad, ".mat")


def read_aflw2000(folder: str, skip_bad: bool = False) -> List[Record]:
    """AFLW2000-3D: ``image00002.jpg`` + ``.mat`` with ``pt3d_68`` (3x68, x/y used) and
    ``Pose_Para``. ``extras["yaw"]`` (degrees) gives the [0,30] / [30,60] / [60,90] bins."""
    return read_300w_lp(folder, recursive=False, skip_bad=skip_bad)


def read_aflw_pifa(folder: str, skip_bad: bool = False) -> List[Record]:
    """AFLW-PIFA: ``image + .mat`` with ``pt2d`` (2x34) and ``visibility`` (34 zeros/ones).

    The 34-point layout is :data:`larq_landmarks.layouts.FACE34_FROM_68`.
    """

    def read_one(path):
        data = _loadmat(path, ["pt2d", "visibility"])
        points = np.asarray(data["pt2d"], np.float32)
        if points.ndim != 2 or points.shape[0] < 2:
            raise DatasetError(f"{path}: 'pt2d' must be 2x34, found {points.shape}")
        points = points[:2].T.copy()
        visible = np.asarray(data["visibility"]).ravel().astype(bool)
        if visible.shape != (points.shape[0],):
            raise DatasetError(f"{path}: 'visibility' has {visible.size} entries for {points.shape[0]} points")
        image_path = _find_image(path)
        size = _image_size(image_path)
        _check_points(path, points, 34, size, visible)
        box = points_box(points, visible)
        centre, scale = face_crop(box)
        return [Record(image_path, points, visible, centre, scale, box, {})]

    return _collect(_files(folder, "*.mat", False), read_one, skip_bad, ".mat")


# --- MPII ---------------------------------------------------------------------------------


def head_size(head_box: np.ndarray) -> float:
    """MPII head size: 0.6 x the diagonal of the head rectangle (PCKh normaliser)."""
    x1, y1, x2, y2 = [float(v) for v in head_box]
    return 0.6 * math.hypot(x2 - x1, y2 - y1)


def _person_record(where, image_path, joints, visible, centre, scale, head_box, extras) -> Record:
    joints = np.asarray(joints, np.float32)
    _check_points(where, joints, 16)
    if not (np.isfinite(scale) and scale > 0):
        raise DatasetError(f"{where}: scale must be positive, found {scale}")
    extras = dict(extras)
    if head_box is not None:
        extras["head_box"] = np.asarray(head_box, np.float32)
        extras["head_size"] = head_size(head_box)
        if not (np.isfinite(extras["head_size"]) and extras["head_size"] > 0):  # PCKh divides by it
            raise DatasetError(f"{where}: head box {extras['head_box'].tolist()} has no size")
    labelled = np.asarray(visible, bool)
    box = points_box(joints, labelled)
    return Record(image_path, joints, labelled, np.asarray(centre, np.float32), float(scale), box, extras)


def read_mpii_json(path: str, image_dir: str, skip_bad: bool = False) -> List[Record]:
    """The common JSON conversion of MPII: a list of people with ``image``, ``center``,
    ``scale``, ``joints`` (16x2, 1-based like the .mat), ``joints_vis`` (16; 1 = labelled) and, when present,
    ``head_box`` (x1, y1, x2, y2; needed for PCKh). Centre and scale are adjusted as the usual
    training code does (centre 15*scale lower, scale x1.25)."""
    try:
        with open(path, encoding="utf-8") as f:
            people = json.load(f)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read MPII JSON ({error})") from error
    if not isinstance(people, list) or not people:
        raise DatasetError(f"{path}: expected a non-empty list of people")

    def read_one(index):
        where = f"{path}[{index}]"
        person = people[index]
        missing = [k for k in ("image", "center", "scale", "joints", "joints_vis") if k not in person]
        if missing:
            raise DatasetError(f"{where}: missing keys {missing}")
        image_path = os.path.join(image_dir, person["image"])
        _image_size(image_path)
        centre = np.asarray(person["center"], np.float32) - 1.0
        scale = float(person["scale"])
        centre[1] += 15 * scale
        head_box = np.asarray(person["head_box"], np.float32) - 1.0 if "head_box" in person else None
        joints = np.asarray(person["joints"], np.float32) - 1.0
        return [_person_record(where, image_path, joints, person["joints_vis"], centre, scale * 1.25,
                               head_box, {"image_name": person["image"]})]

    return _collect(list(range(len(people))), read_one, skip_bad, "person")


def _field(struct, name, default=None):
    return getattr(struct, name, default) if struct is not None else default


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value.ravel())
    return [value]


def read_mpii_mat(
    path: str,
    image_dir: str,
    split: str = "train",
    validation_images: Optional[Iterable[str]] = None,
    skip_bad: bool = False,
) -> List[Record]:
    """The official ``mpii_human_pose_v1_u12_1.mat`` (``RELEASE`` struct).

    Args:
        path: the ``.mat`` file.
        image_dir: folder of the MPII images.
        split: ``"train"`` or ``"validation"`` (both from the annotated ``img_train == 1``
            images; validation is those named in ``validation_images``), or ``"all"``.
        validation_images: image names of the validation split (e.g. Tompson et al.'s list).
        skip_bad: skip (with one warning) people whose annotation is incomplete.

    Only the ``single_person`` entries are read, as the single-person benchmark does. A joint
    counts as labelled (``Record.visible``: it gets a heatmap and is scored by PCKh) when it has
    an ``annopoints.point`` entry, as in the official evaluation, which scores occluded joints
    too; the release's own occlusion flag ``is_visible`` is kept as ``extras["is_visible"]``
    (16 floats: 1 visible, 0 occluded, NaN unlabelled or not given).
    """
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split={split!r} must be 'train', 'validation' or 'all'")
    if split == "validation" and validation_images is None:
        raise ValueError("split='validation' needs validation_images (the list of image names)")
    try:
        release = matlab_files.loadmat(path, struct_as_record=False, squeeze_me=True)["RELEASE"]
    except KeyError as error:
        raise DatasetError(f"{path}: no 'RELEASE' struct: not the official MPII annotation file") from error
    except Exception as error:
        raise DatasetError(f"{path}: cannot read .mat file ({error})") from error
    annolist = _as_list(_field(release, "annolist"))
    img_train = np.asarray(_field(release, "img_train", [])).ravel()
    single = _as_list(_field(release, "single_person"))
    if len(annolist) != len(img_train) or len(single) != len(annolist):
        raise DatasetError(f"{path}: annolist, img_train and single_person lengths differ")
    validation = set(validation_images or ())
    wanted = []
    for index, annotation in enumerate(annolist):
        name = str(_field(_field(annotation, "image"), "name", ""))
        if img_train[index] != 1:
            continue
        if split == "train" and name in validation or split == "validation" and name not in validation:
            continue
        for person in _as_list(single[index]):
            wanted.append((index, name, int(person)))

    def read_one(item):
        index, name, person_number = item
        where = f"{path}: annolist({index + 1}).annorect({person_number})"
        try:
            return read_person(where, index, name, person_number)
        except DatasetError:
            raise
        except (AttributeError, IndexError, TypeError, ValueError) as error:  # a field missing or of another kind
            raise DatasetError(f"{where}: malformed annotation ({type(error).__name__}: {error})") from error

    def read_person(where, index, name, person_number):
        rects = _as_list(_field(annolist[index], "annorect"))
        if not 1 <= person_number <= len(rects):
            raise DatasetError(f"{where}: no such person")
        rect = rects[person_number - 1]
        points = _as_list(_field(_field(rect, "annopoints"), "point"))
        objpos = _field(rect, "objpos")
        if not points or objpos is None or _field(rect, "scale") is None:
            raise DatasetError(f"{where}: missing annopoints, objpos or scale")
        joints = np.zeros((16, 2), np.float32)
        labelled = np.zeros(16, bool)
        occlusion = np.full(16, np.nan, np.float32)
        for point in points:
            joint = int(point.id)
            if not 0 <= joint < 16:
                raise DatasetError(f"{where}: joint id {joint} is not one of MPII's 0..15")
            joints[joint] = (float(point.x) - 1.0, float(point.y) - 1.0)
            labelled[joint] = True
            flag = _field(point, "is_visible", None)
            # is_visible may be missing, empty or a string in the release
            if flag is not None and not (isinstance(flag, np.ndarray) and flag.size == 0):
                occlusion[joint] = float(int(flag))
        image_path = os.path.join(image_dir, name)
        _image_size(image_path)
        scale = float(rect.scale)
        centre = np.array([float(objpos.x) - 1.0, float(objpos.y) - 1.0 + 15 * scale], np.float32)
        head_box = np.array([rect.x1, rect.y1, rect.x2, rect.y2], np.float32) - 1.0
        return [_person_record(where, image_path, joints, labelled, centre, scale * 1.25, head_box,
                               {"image_name": name, "is_visible": occlusion})]

    return _collect(wanted, read_one, skip_bad, "single-person")


def to_columns(records: Sequence[Record], extras: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Stack records into arrays (the input of :mod:`larq_landmarks.datasets.pipeline`).

    Keys: ``image_path`` (N,), ``points`` (N, K, 2), ``visible`` (N, K), ``centre`` (N, 2),
    ``scale`` (N,), ``box`` (N, 4), plus each name in ``extras`` (float32, NaN where absent).
    """
    if not records:
        raise DatasetError("no records")
    counts = {r.points.shape[0] for r in records}
    if len(counts) != 1:
        raise DatasetError(f"records have different point counts {sorted(counts)}")
    columns = {
        "image_path": np.array([r.image_path for r in records]),
        "points": np.stack([r.points for r in records]).astype(np.float32),
        "visible": np.stack([r.visible for r in records]).astype(bool),
        "centre": np.stack([r.centre for r in records]).astype(np.float32),
        "scale": np.array([r.scale for r in records], np.float32),
        "box": np.stack([r.box for r in records]).astype(np.float32),
    }
    for name in extras:
        values = [r.extras.get(name, np.nan) for r in records]
        columns[name] = np.stack([np.asarray(v, np.float32) for v in values])
    return columns
