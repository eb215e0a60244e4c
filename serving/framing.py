"""MNIST framing of a grayscale image: polarity, and the digit cut out and normalised as MNIST's were.

FIT_DIGIT is MNIST's own recipe (LeCun et al.): subtract the background (median of the border ring),
stretch the ink to 0..255, crop to the bounding box of pixels above 10% of the peak, resize the crop
(Lanczos, antialiased) so its longer side is 20 px keeping the aspect ratio, and paste it into a black
28x28 field so the centre of mass lands on the field's centre (13.5, 13.5), kept inside the field.
A blank image becomes an all-black 28x28. FIT_RESIZE is a plain Lanczos resize to 28x28.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["SIDE", "BOX", "fit_digit", "is_light_background", "resize_to"]

SIDE = 28
BOX = 20  # MNIST: the digit's longer side is normalised to 20 px inside the 28 px field
_INK_THRESHOLD = 0.1  # fraction of the peak above which a pixel counts as ink for the bounding box


def _border(gray: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of a [H, W] array."""
    if min(gray.shape) <= 2:
        return gray.ravel()
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def is_light_background(gray: np.ndarray) -> bool:
    """Dark ink on light paper (so the image must be inverted for the model): the border ring is light."""
    return float(_border(gray).mean()) > 127.0


def _resize(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize of a float [H, W] array (Pillow mode F), clipped to 0..255."""
    out = Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 255.0)


def resize_to(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """FIT_RESIZE: uint8 [H, W] → uint8 [height, width], Lanczos."""
    return np.round(_resize(gray.astype(np.float32), width, height)).astype(np.uint8)


def fit_digit(gray: np.ndarray) -> np.ndarray:
    """MNIST framing of a light-on-dark uint8 [H, W] image → uint8 [28, 28] (see the module docstring)."""
    values = gray.astype(np.float32)
    ink = np.clip(values - np.median(_border(values)), 0.0, None)
    peak = float(ink.max())
    if peak <= 0.0:
        return np.zeros((SIDE, SIDE), np.uint8)
    ink *= 255.0 / peak
    rows = np.flatnonzero((ink > _INK_THRESHOLD * 255.0).any(axis=1))
    cols = np.flatnonzero((ink > _INK_THRESHOLD * 255.0).any(axis=0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = crop.shape
    scale = BOX / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    patch = _resize(crop, new_w, new_h)
    mass = float(patch.sum())
    if mass <= 0.0:
        return np.zeros((SIDE, SIDE), np.uint8)
    cy = float((patch.sum(axis=1) * np.arange(new_h)).sum()) / mass
    cx = float((patch.sum(axis=0) * np.arange(new_w)).sum()) / mass
    centre = (SIDE - 1) / 2.0
    top = min(max(round(centre - cy), 0), SIDE - new_h)
    left = min(max(round(centre - cx), 0), SIDE - new_w)
    field = np.zeros((SIDE, SIDE), np.float32)
    field[top:top + new_h, left:left + new_w] = patch
    return np.round(field).astype(np.uint8)
