"""Pictures: landmark and skeleton overlays, part masks in colour (alone or over the image), CED
plots (PNG, Pillow)."""
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from larq_landmarks.atomic import atomic_path
from larq_landmarks.layouts import MPII_SKELETON

PART_COLOURS = np.array(
    [[0, 0, 0], [230, 180, 150], [150, 20, 90], [230, 60, 70], [60, 0, 10], [255, 255, 255], [90, 200, 90]],
    np.uint8,
)


def draw_landmarks(image: np.ndarray, points: np.ndarray, truth: Optional[np.ndarray] = None,
                   radius: float = 2.0) -> Image.Image:
    """Overlay predicted ``points`` (green) and optional ``truth`` (red) on an RGB ``image``;
    16-point layouts are joined as the MPII skeleton."""
    canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for pts, colour in ((truth, (255, 40, 40)), (points, (40, 255, 40))):
        if pts is None:
            continue
        if np.ndim(pts) != 2 or np.shape(pts)[1] != 2:
            raise ValueError(f"points to draw must be (N, 2) x, y pixels, got shape {np.shape(pts)}")
        if len(pts) == 16:
            for a, b in MPII_SKELETON:
                draw.line([tuple(pts[a]), tuple(pts[b])], fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return canvas


def colour_mask(mask: np.ndarray) -> Image.Image:
    """A 7-class facial part mask as an RGB picture."""
    return Image.fromarray(PART_COLOURS[np.asarray(mask, np.int64)])


def overlay_mask(image: np.ndarray, mask: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """The parts of a class ``mask`` (``(H, W)``, 0 background) in colour over an RGB ``image`` of
    the same size; background pixels keep the image."""
    image, mask = np.asarray(image, np.uint8), np.asarray(mask, np.int64)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask of shape {mask.shape} for an image of shape {image.shape}")
    blended = (1 - opacity) * image + opacity * PART_COLOURS[mask]
    return Image.fromarray(np.where(mask[..., None] > 0, np.round(blended), image).astype(np.uint8))


def grid(pictures: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """Tile pictures of equal size into one."""
    if len(pictures) == 0 or columns < 1:
        raise ValueError(f"grid needs at least one picture and one column, got {len(pictures)} and columns={columns}")
    width, height = pictures[0].size
    rows = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, picture in enumerate(pictures):
        sheet.paste(picture, ((i % columns) * width, (i // columns) * height))
    return sheet


def ced_plot(curves: Dict[str, tuple], size=(480, 360), x_label: str = "NME") -> Image.Image:
    """Plot cumulative error distributions ``{name: (thresholds, fractions)}``."""
    width, height = size
    left, bottom, right, top = 50, 40, 15, 15
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    x_max = max(float(t[-1]) for t, _ in curves.values())
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]

    def to_pixel(x, y):
        return (left + (width - left - right) * x / x_max, height - bottom - (height - top - bottom) * y)

    for k in range(6):
        y = k / 5
        draw.text((8, to_pixel(0, y)[1] - 6), f"{y:.1f}", fill="black")
        x = x_max * k / 5
        draw.text((to_pixel(x, 0)[0] - 12, height - bottom + 6), f"{x:.3g}", fill="black")
    draw.text((width // 2 - 10, height - 16), x_label, fill="black")
    for i, (name, (thresholds, fractions)) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        draw.line([to_pixel(x, y) for x, y in zip(thresholds, fractions)], fill=colour, width=2)
        draw.text((left + 10, top + 8 + 14 * i), name, fill=colour)
    return image


def save_png(picture: Image.Image, path: str) -> str:
    """Save a picture as PNG atomically."""
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
    return path
