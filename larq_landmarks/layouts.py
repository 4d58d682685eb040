"""Landmark layouts: point counts, left/right flip permutations, face-part polygons.

A flip permutation ``p`` says that after a horizontal flip, landmark ``i`` of the flipped image is
landmark ``p[i]`` of the original (the subject's left and right swap).
"""
from typing import Dict, List, Tuple

import numpy as np


def _permutation(size: int, pairs: List[Tuple[int, int]]) -> List[int]:
    perm = list(range(size))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


# 68-point Multi-PIE / 300W markup (0-based).
FACE68_FLIP = _permutation(
    68,
    [(i, 16 - i) for i in range(8)]
    + [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22)]
    + [(31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]
    + [(60, 64), (61, 63), (65, 67)],
)
FACE68_OUTER_EYE_CORNERS = (36, 45)  # inter-ocular normalisation (300W)
FACE68_LEFT_EYE = tuple(range(36, 42))  # image-left eye (the subject's right)
FACE68_RIGHT_EYE = tuple(range(42, 48))

# 34-point AFLW-PIFA layout, as indices into the 68-point markup (our convention: jaw every other
# point, brows, nose, eyes by corners and lids, mouth by its outline).
FACE34_FROM_68 = (
    0, 2, 4, 6, 8, 10, 12, 14, 16,  # jaw (9)
    17, 19, 21, 22, 24, 26,  # brows (6)
    27, 30, 31, 33, 35,  # nose (5)
    36, 37, 39, 40, 42, 44, 45, 47,  # eyes (8)
    48, 51, 54, 57, 62, 66,  # mouth (6)
)  # fmt: skip
FACE34_FLIP = [
    FACE34_FROM_68.index(FACE68_FLIP[i]) if FACE68_FLIP[i] in FACE34_FROM_68 else None
    for i in FACE34_FROM_68
]

# MPII: 0 r ankle, 1 r knee, 2 r hip, 3 l hip, 4 l knee, 5 l ankle, 6 pelvis, 7 thorax,
# 8 upper neck, 9 head top, 10 r wrist, 11 r elbow, 12 r shoulder, 13 l shoulder, 14 l elbow,
# 15 l wrist.
MPII_JOINTS = (
    "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
    "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow",
    "l_wrist",
)  # fmt: skip
MPII_FLIP = _permutation(16, [(0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)])
MPII_SKELETON = (
    (0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9),
    (7, 12), (12, 11), (11, 10), (7, 13), (13, 14), (14, 15),
)  # fmt: skip

# Facial part segmentation (supplementary Table 6): classes and the closed polygons of the
# 68-point markup that outline them. Polygons are filled in this order, later ones on top.
FACE_PART_CLASSES = (
    "background", "skin", "lower_lip", "upper_lip", "inner_mouth", "eyes", "nose",
)  # fmt: skip
FACE_PART_POLYGONS: Tuple[Tuple[int, Tuple[int, ...]], ...] = (
    (1, tuple(range(0, 17)) + tuple(range(26, 16, -1))),  # skin: jaw then brows back
    (6, (27, 35, 34, 33, 32, 31)),  # nose
    (5, tuple(range(36, 42))),  # eye
    (5, tuple(range(42, 48))),  # eye
    (3, (48, 49, 50, 51, 52, 53, 54, 64, 63, 62, 61, 60)),  # upper lip
    (2, (54, 55, 56, 57, 58, 59, 48, 60, 67, 66, 65, 64)),  # lower lip
    (4, tuple(range(60, 68))),  # inner mouth
)

FLIP_PERMUTATIONS: Dict[int, List[int]] = {68: FACE68_FLIP, 34: FACE34_FLIP, 16: MPII_FLIP}


def flip_permutation(num_points: int, task: str = "heatmaps") -> np.ndarray:
    """The left/right permutation of a model's ``num_points`` output channels: for
    ``task="heatmaps"`` the landmark layout's (68, 34 or 16 points); for ``"segmentation"`` the
    identity (every part class, both eyes one, is its own mirror image)."""
    if task == "segmentation":
        return np.arange(num_points, dtype=np.int32)
    if task != "heatmaps":
        raise ValueError(f"task={task!r} must be 'heatmaps' or 'segmentation'")
    if num_points not in FLIP_PERMUTATIONS:
        raise ValueError(
            f"no left/right permutation for {num_points} points; known: {sorted(FLIP_PERMUTATIONS)}"
        )
    return np.asarray(FLIP_PERMUTATIONS[num_points], np.int32)


def default_task(num_outputs: int) -> str:
    """What a model with ``num_outputs`` output channels was trained for, when nobody says:
    ``"segmentation"`` for the 7 facial part classes, else ``"heatmaps"`` (68 or 34 face
    landmarks, MPII's 16 joints): the layouts this package trains have these counts and no other."""
    return "segmentation" if num_outputs == len(FACE_PART_CLASSES) else "heatmaps"


def default_box_kind(num_outputs: int, task: str) -> str:
    """The boxes a model's crops are cut from, when nobody says: ``"person"`` for MPII's 16
    joints, else ``"face"``."""
    return "person" if task == "heatmaps" and num_outputs == len(MPII_JOINTS) else "face"
