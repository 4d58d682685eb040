"""Synthetic faces and people drawn with Pillow, with exact landmarks.

The shapes move with pose and scale, so a network can learn them: a face is a 3-D 68-point
template rotated by (pitch, yaw, roll), projected, and drawn as filled parts (skin, brows, eyes,
nose, lips, inner mouth) whose outlines are the landmarks; a person is a 16-joint MPII skeleton
drawn as thick limbs with a head. :mod:`larq_landmarks.datasets.writers` writes these in the real
data-set formats.
"""
from typing import Dict, Tuple

import numpy as np
from PIL import Image, ImageDraw

from larq_landmarks.layouts import FACE_PART_POLYGONS, MPII_SKELETON


def face_template() -> np.ndarray:
    """The 68-point template as ``(68, 3)`` (x right, y down, z toward the camera), face width 2."""
    pts = []
    for i in range(17):  # jaw, image-left ear to image-right ear through the chin
        phi = np.pi - np.pi * i / 16
        pts.append((0.9 * np.cos(phi), -0.15 + 1.1 * np.sin(phi)))
    for xs in (np.linspace(-0.75, -0.15, 5), np.linspace(0.15, 0.75, 5)):  # brows
        for x in xs:
            centre = -0.45 if x < 0 else 0.45
            pts.append((x, -0.45 - 0.12 * (1 - ((x - centre) / 0.3) ** 2)))
    for y in np.linspace(-0.3, 0.15, 4):  # nose bridge
        pts.append((0.0, y))
    for x in np.linspace(-0.2, 0.2, 5):  # nostrils
        pts.append((x, 0.25 + 0.04 * (1 - abs(x) / 0.2)))
    for cx, order in ((-0.4, (np.pi, 0.6 * np.pi, 0.4 * np.pi, 0.0, -0.4 * np.pi, -0.6 * np.pi)),
                      (0.4, (np.pi, 0.6 * np.pi, 0.4 * np.pi, 0.0, -0.4 * np.pi, -0.6 * np.pi))):
        for a in order:  # eyes: outer/inner corner, two upper lids, two lower lids
            pts.append((cx + 0.18 * np.cos(a), -0.25 - 0.08 * np.sin(a)))
    outer = [(-0.35, 0.55), (-0.22, 0.47), (-0.08, 0.44), (0.0, 0.46), (0.08, 0.44),
             (0.22, 0.47), (0.35, 0.55), (0.22, 0.66), (0.1, 0.71), (0.0, 0.72),
             (-0.1, 0.71), (-0.22, 0.66)]  # fmt: skip
    inner = [(-0.26, 0.555), (-0.1, 0.53), (0.0, 0.535), (0.1, 0.53), (0.26, 0.555),
             (0.1, 0.6), (0.0, 0.61), (-0.1, 0.6)]  # fmt: skip
    pts += outer + inner
    xy = np.asarray(pts, np.float64)
    z = 0.6 * (1.0 - np.clip(xy[:, 0] ** 2, 0, 1))
    z[27:31] += np.linspace(0.1, 0.4, 4)  # the nose sticks out
    z[31:36] += 0.25
    return np.concatenate([xy, z[:, None]], axis=1)


def rotation_matrix(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """Rotation ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` (radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw), np.cos(roll), np.sin(roll)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def project_face(centre, half_width: float, pitch: float, yaw: float, roll: float):
    """Rotate and project the template; returns ``(points (68, 2), points3d (68, 3), visible (68,))``.

    A point is marked invisible when the rotation turns the face surface at it away from the
    camera (the far side of the jaw at large yaw).
    """
    template = face_template()
    rotated = template @ rotation_matrix(pitch, yaw, roll).T
    points3d = rotated * half_width + np.array([centre[0], centre[1], 0.0])
    # surface normal of the template's cylinder-like face: (x, 0, 1) normalised
    normals = np.stack([template[:, 0] * 1.2, np.zeros(68), np.ones(68)], 1)
    facing = (normals @ rotation_matrix(pitch, yaw, roll).T)[:, 2]
    return points3d[:, :2], points3d, facing > 0.05


def _palette(rng: np.random.Generator) -> Dict[str, Tuple[int, int, int]]:
    def jitter(rgb, amount=25):
        return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)

    return {
        "skin": jitter((225, 180, 150)),
        "brow": jitter((70, 45, 30)),
        "eye": jitter((250, 250, 250), 5),
        "iris": jitter((60, 90, 140)),
        "nose": jitter((190, 130, 105)),
        "upper_lip": jitter((200, 60, 70)),
        "lower_lip": jitter((160, 40, 80)),
        "inner_mouth": jitter((40, 10, 15), 10),
    }


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    base = rng.integers(0, 256, size=3)
    gradient = np.linspace(-40, 40, width)[None, :, None] * rng.uniform(-1, 1, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    pixels = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def draw_face(image_size: Tuple[int, int], points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw a face whose part outlines are the 68 ``points`` ((x, y) pixels) on a noisy background.

    Returns an ``(height, width, 3)`` uint8 array.
    """
    width, height = image_size
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    colours = _palette(rng)
    names = {1: "skin", 6: "nose", 5: "eye", 3: "upper_lip", 2: "lower_lip", 4: "inner_mouth"}
    for label, polygon in FACE_PART_POLYGONS:
        draw.polygon([tuple(points[i]) for i in polygon], fill=colours[names[label]])
        if label == 5:  # iris in the middle of each eye
            centre = points[list(polygon)].mean(0)
            radius = 0.25 * np.ptp(points[list(polygon), 0])
            draw.ellipse([*(centre - radius), *(centre + radius)], fill=colours["iris"])
    brow_width = max(1, int(0.03 * np.ptp(points[:17, 0])))
    for brow in (range(17, 22), range(22, 27)):
        draw.line([tuple(points[i]) for i in brow], fill=colours["brow"], width=brow_width)
    return np.asarray(image)


def random_face(rng: np.random.Generator, image_size: Tuple[int, int] = (256, 256),
                max_yaw_degrees: float = 75.0) -> Dict[str, np.ndarray]:
    """One synthetic face at a random position, scale and pose.

    Returns a dict with ``image`` (H, W, 3) uint8, ``points`` (68, 2) 0-based pixels,
    ``points3d`` (68, 3), ``visible`` (68,) bool and ``pose`` (pitch, yaw, roll) radians.
    """
    width, height = image_size
    side = min(width, height)
    half_width = rng.uniform(0.22, 0.32) * side
    centre = (width / 2 + rng.uniform(-0.1, 0.1) * side, height / 2 + rng.uniform(-0.1, 0.05) * side)
    pose = np.radians([rng.uniform(-20, 20), rng.uniform(-max_yaw_degrees, max_yaw_degrees),
                       rng.uniform(-25, 25)])  # fmt: skip
    points, points3d, visible = project_face(centre, half_width, *pose)
    return {
        "image": draw_face(image_size, points, rng),
        "points": points.astype(np.float32),
        "points3d": points3d.astype(np.float32),
        "visible": visible,
        "pose": pose.astype(np.float32),
    }


def face_video(seed: int, frames: int = 30, image_size: Tuple[int, int] = (320, 240),
               step: Tuple[float, float] = (3.0, 1.5), turn_degrees: float = 1.0) -> Dict[str, np.ndarray]:
    """A synthetic video: one face (the same colours and background every frame) moving by
    ``step`` pixels and turning by ``turn_degrees`` of yaw a frame, from the left of the picture.

    Returns a dict with ``frames`` ``(T, H, W, 3)`` uint8 and ``points`` ``(T, 68, 2)``.
    """
    width, height = image_size
    half_width = 0.2 * min(width, height)
    start = (1.6 * half_width, 0.45 * height)
    images, tracks = [], []
    for t in range(frames):
        centre = (start[0] + step[0] * t, start[1] + step[1] * t)
        points, _, _ = project_face(centre, half_width, *np.radians([5.0, -15.0 + turn_degrees * t, 5.0]))
        images.append(draw_face(image_size, points, np.random.default_rng(seed)))
        tracks.append(points.astype(np.float32))
    return {"frames": np.stack(images), "points": np.stack(tracks)}


def random_person(rng: np.random.Generator, image_size: Tuple[int, int] = (256, 256)) -> Dict[str, np.ndarray]:
    """One synthetic person: a 16-joint MPII skeleton facing the camera (its right on image left).

    Returns ``image``, ``points`` (16, 2), ``visible`` (16,), ``head_box`` (x1, y1, x2, y2),
    ``centre`` (2,) and ``scale`` (person height / 200, as MPII).
    """
    width, height = image_size
    side = min(width, height)
    unit = rng.uniform(0.09, 0.13) * side  # roughly a head height
    pelvis = np.array([width / 2 + rng.uniform(-0.1, 0.1) * side, height / 2 + rng.uniform(0, 0.1) * side])
    lean = rng.uniform(-0.3, 0.3)

    def at(origin, angle, length):
        return origin + length * np.array([np.sin(angle), np.cos(angle)])

    p = np.zeros((16, 2))
    p[6] = pelvis
    p[7] = at(pelvis, np.pi + lean, 2.6 * unit)  # thorax above the pelvis
    p[8] = at(p[7], np.pi + lean, 0.6 * unit)
    p[9] = at(p[8], np.pi + lean, 1.0 * unit)
    for hip, knee, ankle, sign in ((2, 1, 0, -1), (3, 4, 5, 1)):
        p[hip] = pelvis + np.array([sign * 0.5 * unit, 0.0])
        p[knee] = at(p[hip], sign * rng.uniform(0.0, 0.5), 1.9 * unit)
        p[ankle] = at(p[knee], sign * rng.uniform(-0.3, 0.3), 1.8 * unit)
    for shoulder, elbow, wrist, sign in ((12, 11, 10, -1), (13, 14, 15, 1)):
        p[shoulder] = p[7] + np.array([sign * 0.9 * unit, 0.2 * unit])
        p[elbow] = at(p[shoulder], sign * rng.uniform(0.1, 2.0), 1.4 * unit)
        p[wrist] = at(p[elbow], sign * rng.uniform(0.1, 2.5), 1.3 * unit)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    limb = max(2, int(0.3 * unit))
    colours = {"leg": (40, 70, 200), "arm": (230, 160, 40), "torso": (40, 170, 60)}
    for a, b in MPII_SKELETON:
        kind = "leg" if max(a, b) <= 6 and (a, b) not in ((2, 6), (6, 3)) else "torso"
        kind = "arm" if min(a, b) >= 10 or (a, b) in ((7, 12), (7, 13)) else kind
        draw.line([tuple(p[a]), tuple(p[b])], fill=colours[kind], width=limb)
    head_centre = (p[8] + p[9]) / 2
    head_radius = 0.55 * np.linalg.norm(p[9] - p[8])
    draw.ellipse([*(head_centre - head_radius), *(head_centre + head_radius)], fill=(225, 180, 150))
    head_box = np.concatenate([head_centre - head_radius, head_centre + head_radius])
    visible = rng.uniform(size=16) > 0.1
    top, bottom = p[:, 1].min(), p[:, 1].max()
    return {
        "image": np.asarray(image),
        "points": p.astype(np.float32),
        "visible": visible,
        "head_box": head_box.astype(np.float32),
        "centre": np.array([pelvis[0], (top + bottom) / 2], np.float32),
        "scale": np.float32((bottom - top) * 1.25 / 200.0),
    }


def trained_like_batch_norm(model, seed: int = 0):
    """Give every BatchNormalization of ``model`` generic statistics, as training does.

    For checks on untrained models (conversion size and parity): at initialisation (beta = mean
    = 0) batch norms fold to a bare multiplication, and binary convolution outputs (sums of
    +-alpha) sit exactly on the sign threshold, where Larq and LCE break ties differently.
    Returns the model.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.3, shape),
                               rng.normal(0, 0.3, shape), rng.uniform(0.5, 2.0, shape)])
    return model
