"""Data-set formats by name, for the command line and the reproduction scripts."""
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from larq_landmarks.datasets import readers


@dataclasses.dataclass(frozen=True)
class Format:
    """A data-set format: how to read it and what its records carry.

    Attributes:
        name: the format's name on the command line.
        num_points: landmarks per record (68 faces, 34 AFLW-PIFA, 16 MPII).
        kind: ``"face"`` or ``"pose"`` (what the evaluation tables report).
        extras: record extras kept as columns (e.g. ``yaw``, ``head_size``).
        needs_images: the annotation path is a file and the images live in ``image_dir``.
    """

    name: str
    num_points: int
    kind: str
    extras: Tuple[str, ...] = ()
    needs_images: bool = False


FORMATS: Dict[str, Format] = {
    "300w": Format("300w", 68, "face"),
    "300w-lp": Format("300w-lp", 68, "face", ("yaw",)),
    "aflw2000": Format("aflw2000", 68, "face", ("yaw",)),
    "aflw-pifa": Format("aflw-pifa", 34, "face"),
    "mpii-json": Format("mpii-json", 16, "pose", ("head_size",), needs_images=True),
    "mpii-mat": Format("mpii-mat", 16, "pose", ("head_size",), needs_images=True),
}


def get_format(name: str) -> Format:
    """The :class:`Format` called ``name``; a ValueError lists the known ones."""
    if name not in FORMATS:
        raise ValueError(f"data format {name!r} is not known; use one of {tuple(FORMATS)}")
    return FORMATS[name]


def read_dataset(
    name: str,
    path: str,
    image_dir: Optional[str] = None,
    skip_bad: bool = False,
    mpii_split: str = "all",
) -> List[readers.Record]:
    """Read the data set at ``path`` in format ``name`` (see :data:`FORMATS`)."""
    fmt = get_format(name)
    if fmt.needs_images and not image_dir:
        raise ValueError(f"format {name!r} reads an annotation file: image_dir (the image folder) is required")
    read: Dict[str, Callable[[], List[readers.Record]]] = {
        "300w": lambda: readers.read_pts_folder(path, skip_bad=skip_bad),
        "300w-lp": lambda: readers.read_300w_lp(path, skip_bad=skip_bad),
        "aflw2000": lambda: readers.read_aflw2000(path, skip_bad=skip_bad),
        "aflw-pifa": lambda: readers.read_aflw_pifa(path, skip_bad=skip_bad),
        "mpii-json": lambda: readers.read_mpii_json(path, image_dir, skip_bad=skip_bad),
        "mpii-mat": lambda: readers.read_mpii_mat(path, image_dir, split=mpii_split, skip_bad=skip_bad),
    }
    return read[name]()


def read_columns(name: str, path: Union[str, Sequence[str]], image_dir: Optional[str] = None,
                 skip_bad: bool = False) -> Dict[str, np.ndarray]:
    """:func:`read_dataset` stacked by :func:`readers.to_columns` with the format's extras; ``path``
    may be several paths (e.g. 300W's ``afw``, ``lfpw/trainset`` and ``helen/trainset``), read in
    turn as one data set."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        raise ValueError("no data-set path given")
    records = [record for each in paths for record in read_dataset(name, each, image_dir, skip_bad)]
    return readers.to_columns(records, get_format(name).extras)
