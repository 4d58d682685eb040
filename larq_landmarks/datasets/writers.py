"""Write synthetic data sets in the real on-disk formats (for tests, the demo and tutorials).

Each writer draws with :mod:`larq_landmarks.synthetic` and stores what the real data set stores:
``.pts`` text files (300W), ``.mat`` files (300W-LP, AFLW2000-3D, AFLW-PIFA), the MPII ``.mat``
release struct and the MPII JSON conversion. Files are written atomically.
"""
import json
import os
from typing import Optional, Tuple

import numpy as np
import scipy.io
from PIL import Image

from larq_landmarks import synthetic
from larq_landmarks.layouts import FACE34_FROM_68
from larq_landmarks.atomic import atomic_path

AFLW21_FROM_68 = (17, 19, 21, 22, 24, 26, 36, 39, 42, 45, 31, 30, 35, 48, 51, 54, 57, 0, 8, 16, 33)


def _save_image(array: np.ndarray, path: str) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="JPEG" if path.endswith(".jpg") else "PNG", quality=95)


def write_pts(path: str, points: np.ndarray) -> None:
    """Write 0-based ``(N, 2)`` points as a 1-based ``.pts`` file."""
    lines = ["version: 1", f"n_points: {len(points)}", "{"]
    lines += [f"{x + 1:.3f} {y + 1:.3f}" for x, y in points]
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        f.write("\n".join(lines + ["}"]) + "\n")


def _check_count(count, argument: str, minimum: int = 0) -> None:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < minimum:
        raise ValueError(f"{argument} must be an integer of at least {minimum}, got {count!r}")


def _check_image_size(image_size) -> None:
    if (len(np.shape(image_size)) != 1 or len(image_size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                       for v in image_size)):
        raise ValueError(f"image_size must be two positive integers (width, height), got {image_size!r}")


def _start(folder: str, count, image_size) -> None:
    """Checks a writer's arguments and makes its folder."""
    _check_count(count, "count")
    _check_image_size(image_size)
    os.makedirs(folder, exist_ok=True)


def _savemat(path: str, data: dict) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        scipy.io.savemat(f, data)


def write_300w(folder: str, count: int, seed: int = 0, image_size: Tuple[int, int] = (256, 256),
               image_format: str = "jpg", max_yaw_degrees: float = 45.0) -> str:
    """``count`` faces as ``NNNNN.jpg`` + ``NNNNN.pts`` (68 points, 1-based) in ``folder``;
    ``image_format`` is ``"jpg"`` or ``"png"``."""
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    _start(folder, count, image_size)
    rng = np.random.default_rng(seed)
    for i in range(count):
        face = synthetic.random_face(rng, image_size, max_yaw_degrees)
        _save_image(face["image"], os.path.join(folder, f"{i:05d}.{image_format}"))
        write_pts(os.path.join(folder, f"{i:05d}.pts"), face["points"])
    return folder


W300_FOLDERS = ("afw", "lfpw/trainset", "helen/trainset", "lfpw/testset", "helen/testset", "ibug",
                "300W/01_Indoor", "300W/02_Outdoor")


def write_300w_folders(root: str, count: int, seed: int = 0, image_size: Tuple[int, int] = (256, 256)) -> str:
    """300W in the folders of iBUG's downloads (:data:`W300_FOLDERS`): the training sets ``afw``,
    ``lfpw/trainset``, ``helen/trainset``; the test subsets ``lfpw/testset`` + ``helen/testset``
    (common), ``ibug`` (challenging), ``300W/01_Indoor`` + ``300W/02_Outdoor`` (the private test
    set); ``count`` faces in each, as :func:`write_300w` writes them (the ibug faces turned further)."""
    _check_count(count, "count")
    for number, folder in enumerate(W300_FOLDERS):
        write_300w(os.path.join(root, *folder.split("/")), count, seed + number, image_size,
                   max_yaw_degrees=75.0 if folder == "ibug" else 45.0)
    return root


def write_300w_lp(folder: str, count: int, seed: int = 0, image_size: Tuple[int, int] = (256, 256),
                  max_yaw_degrees: float = 85.0, aflw2000_style: bool = False) -> str:
    """300W-LP style ``.jpg`` + ``.mat`` (``pt2d`` 2x68, ``pt3d_68`` 3x68, ``Pose_Para`` 1x7 with
    pitch, yaw, roll in radians). With ``aflw2000_style`` the ``pt2d`` holds AFLW's 21 points, as
    in AFLW2000-3D, so readers must use ``pt3d_68``."""
    _start(folder, count, image_size)
    rng = np.random.default_rng(seed)
    for i in range(count):
        face = synthetic.random_face(rng, image_size, max_yaw_degrees)
        name = f"image{i:05d}"
        _save_image(face["image"], os.path.join(folder, name + ".jpg"))
        pt2d = face["points"][list(AFLW21_FROM_68)] if aflw2000_style else face["points"]
        pose = np.zeros((1, 7), np.float64)
        pose[0, :3] = face["pose"]
        pose[0, 6] = 1.0
        _savemat(os.path.join(folder, name + ".mat"), {
            "pt2d": pt2d.T.astype(np.float64),
            "pt3d_68": face["points3d"].T.astype(np.float64),
            "Pose_Para": pose,
        })
    return folder


def write_aflw2000(folder: str, count: int, seed: int = 0, image_size=(256, 256)) -> str:
    """AFLW2000-3D style: like :func:`write_300w_lp` with 21-point ``pt2d``, yaw up to 90."""
    return write_300w_lp(folder, count, seed, image_size, max_yaw_degrees=89.0, aflw2000_style=True)


def write_aflw_pifa(folder: str, count: int, seed: int = 0, image_size=(256, 256)) -> str:
    """AFLW-PIFA style ``.jpg`` + ``.mat`` with ``pt2d`` (2x34) and ``visibility`` (1x34)."""
    _start(folder, count, image_size)
    rng = np.random.default_rng(seed)
    for i in range(count):
        face = synthetic.random_face(rng, image_size, max_yaw_degrees=80.0)
        name = f"{i:05d}"
        _save_image(face["image"], os.path.join(folder, name + ".jpg"))
        index = list(FACE34_FROM_68)
        _savemat(os.path.join(folder, name + ".mat"), {
            "pt2d": face["points"][index].T.astype(np.float64),
            "visibility": face["visible"][index][None].astype(np.float64),
        })
    return folder


def _people(folder: str, count: int, seed: int, image_size):
    _start(os.path.join(folder, "images"), count, image_size)
    rng = np.random.default_rng(seed)
    people = []
    for i in range(count):
        person = synthetic.random_person(rng, image_size)
        name = f"{i:09d}.jpg"
        _save_image(person["image"], os.path.join(folder, "images", name))
        people.append((name, person))
    return people


def write_mpii_json(folder: str, count: int, seed: int = 0, image_size=(256, 256),
                    validation_fraction: float = 0.25) -> Tuple[str, str]:
    """MPII JSON conversion: ``folder/images/*.jpg``, ``folder/train.json`` and
    ``folder/valid.json`` (1-based ``joints``, ``joints_vis``, ``center``, ``scale``,
    ``head_box``). Returns the two JSON paths."""
    if not 0.0 <= validation_fraction <= 1.0:  # also NaN
        raise ValueError(f"validation_fraction must be between 0 and 1, got {validation_fraction!r}")
    people = _people(folder, count, seed, image_size)
    split = int(round(count * (1 - validation_fraction)))
    paths = []
    for name, chunk in (("train.json", people[:split]), ("valid.json", people[split:])):
        entries = [{
            "image": image,
            "center": (p["centre"] + 1.0 - np.array([0, 15 * p["scale"] / 1.25])).tolist(),
            "scale": float(p["scale"] / 1.25),
            "joints": (p["points"] + 1.0).tolist(),
            "joints_vis": p["visible"].astype(int).tolist(),
            "head_box": (p["head_box"] + 1.0).tolist(),
        } for image, p in chunk]
        path = os.path.join(folder, name)
        with atomic_path(path) as temporary, open(temporary, "w") as f:
            json.dump(entries, f)
        paths.append(path)
    return paths[0], paths[1]


def write_mpii_mat(folder: str, count: int, seed: int = 0, image_size=(256, 256),
                   test_every: Optional[int] = 5) -> str:
    """The official MPII layout: ``folder/images/*.jpg`` and
    ``folder/mpii_human_pose_v1_u12_1.mat`` holding the ``RELEASE`` struct (``annolist`` with
    ``image.name`` and ``annorect`` (head box ``x1..y2``, ``annopoints.point`` with ``id, x, y,
    is_visible``, ``scale``, ``objpos``), ``img_train``, ``single_person``, ``act``). Every
    ``test_every``-th image is a test image (``img_train = 0``, no joints), as in the release (``None``:
    none)."""
    people = _people(folder, count, seed, image_size)
    point_dtype = [("x", "O"), ("y", "O"), ("id", "O"), ("is_visible", "O")]
    rect_dtype = [("x1", "O"), ("y1", "O"), ("x2", "O"), ("y2", "O"), ("annopoints", "O"),
                  ("scale", "O"), ("objpos", "O")]
    annolist = np.zeros((1, count), dtype=[("image", "O"), ("annorect", "O"), ("frame_sec", "O"),
                                           ("vididx", "O")])
    img_train = np.zeros((1, count), np.uint8)
    single_person = np.empty((count, 1), dtype=object)
    act = np.zeros((count, 1), dtype=[("act_name", "O"), ("cat_name", "O"), ("act_id", "O")])
    for i, (name, p) in enumerate(people):
        is_test = bool(test_every) and i % test_every == test_every - 1
        img_train[0, i] = 0 if is_test else 1
        labelled = np.flatnonzero(p["visible"])  # unlabelled joints have no point entry, as in the release
        points = np.zeros((1, len(labelled)), dtype=point_dtype)
        for k, j in enumerate(labelled):
            occluded = (i + j) % 7 == 0  # some labelled joints flagged occluded (is_visible 0)
            points[0, k] = (float(p["points"][j, 0] + 1), float(p["points"][j, 1] + 1), int(j), int(not occluded))
        rect = np.zeros((1, 1), dtype=rect_dtype)
        x1, y1, x2, y2 = (p["head_box"] + 1.0).tolist()
        centre = p["centre"] + 1.0 - np.array([0, 15 * p["scale"] / 1.25])
        rect[0, 0] = (x1, y1, x2, y2, {"point": points}, float(p["scale"] / 1.25),
                      {"x": float(centre[0]), "y": float(centre[1])})
        if is_test:  # test images carry only objpos and scale in the release
            rect = np.zeros((1, 1), dtype=[("scale", "O"), ("objpos", "O")])
            rect[0, 0] = (float(p["scale"] / 1.25), {"x": float(centre[0]), "y": float(centre[1])})
        annolist[0, i] = ({"name": name}, rect, 0, 0)
        single_person[i, 0] = np.array([[1]], np.uint8)
        act[i, 0] = ("synthetic", "synthetic", 1)
    release = {"annolist": annolist, "img_train": img_train, "version": "12",
               "single_person": single_person, "act": act, "video_list": np.zeros((1, 0))}
    path = os.path.join(folder, "mpii_human_pose_v1_u12_1.mat")
    _savemat(path, {"RELEASE": release})
    return path


def write_layout(root: str, train: int, test: int, seed: int = 0, image_size=(128, 128)) -> str:
    """Every format in the layout of the tutorials and ``scripts/reproduce.py --data-root``:
    ``300W_LP/``, ``AFLW2000/``, ``AFLW_PIFA/{train,test}/``, ``300W/{train,test}/``,
    ``mpii/{train,valid}.json`` + ``mpii/images/``, with ``train`` training and ``test`` test
    samples (each at least 1) in each. Folders that exist are left as they are."""
    _check_count(train, "train", minimum=1)
    _check_count(test, "test", minimum=1)
    jobs = [
        ("300W_LP", lambda p: write_300w_lp(p, train, seed, image_size)),
        ("AFLW2000", lambda p: write_aflw2000(p, test, seed + 1, image_size)),
        ("AFLW_PIFA/train", lambda p: write_aflw_pifa(p, train, seed + 2, image_size)),
        ("AFLW_PIFA/test", lambda p: write_aflw_pifa(p, test, seed + 3, image_size)),
        ("300W/train", lambda p: write_300w(p, train, seed + 4, image_size)),
        ("300W/test", lambda p: write_300w(p, test, seed + 5, image_size)),
        ("mpii", lambda p: write_mpii_json(p, train + test, seed + 6, image_size,
                                           validation_fraction=test / (train + test))),
    ]
    for folder, write in jobs:
        path = os.path.join(root, folder)
        if not os.path.exists(path):
            write(path)
    return root
