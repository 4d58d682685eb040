"""Decoded images as ``(H, W, 3)`` uint8 RGB, the same for the predictor and the data pipeline."""
import numpy as np


def scaled_to_uint8(array: np.ndarray) -> np.ndarray:
    """An unsigned integer image scaled by its type's range (uint16 65535 -> 255), rounded."""
    return np.round(array.astype(np.float64) * (255.0 / np.iinfo(array.dtype).max)).astype(np.uint8)


def rgb_from_pil(image) -> np.ndarray:
    """A PIL image's pixels as uint8 RGB: 16-bit grey (modes ``I;16*``, and ``I`` within 0..65535)
    scaled to 8 bits, as :func:`scaled_to_uint8` scales a uint16 array (Pillow's own conversion
    clips it at 255: a white picture); every other mode by Pillow's conversion."""
    sixteen_bits = image.mode.startswith("I;16") or (image.mode == "I" and 0 <= min(image.getextrema())
                                                     and max(image.getextrema()) <= 65535)
    if sixteen_bits:
        grey = scaled_to_uint8(np.asarray(image).astype(np.uint16))
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))
