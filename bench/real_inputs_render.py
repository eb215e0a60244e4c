"""Render MNIST digits as users' captures look: phone photos, scans, drawing-pad exports, chalkboards, upscales.

Every generator is a pure function `(digit uint8 [28, 28] MNIST polarity, rng) -> bytes` (an encoded file),
deterministic given the rng's state. The digit's pixel values are used as ink coverage (0..1) after a smooth
(bicubic) upsampling, so the rendered digit is the MNIST digit's own shape, only bigger, rotated and placed.
numpy + Pillow + scipy.ndimage; a few ms per image at the default sizes.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

__all__ = ["GENERATORS", "EXTENSIONS", "photo", "scan", "canvas", "chalkboard", "upscaled"]


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _coverage(digit: np.ndarray, size: int, angle: float = 0.0) -> np.ndarray:
    """The digit as float32 ink coverage 0..1, bicubic-upsampled to size x size, rotated by angle (expanded)."""
    image = Image.fromarray(np.asarray(digit, np.float32) / 255.0, mode="F")
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0.0)
    return np.clip(np.asarray(image, np.float32), 0.0, 1.0)


def _place(patch: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """patch pasted at a random position fully inside a zero [height, width] field (cropped if it is bigger)."""
    patch = patch[:height, :width]
    field = np.zeros((height, width), np.float32)
    top = int(rng.integers(0, height - patch.shape[0] + 1))
    left = int(rng.integers(0, width - patch.shape[1] + 1))
    field[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
    return field


def _lighting(height: int, width: int, rng: np.random.Generator, spread: float) -> np.ndarray:
    """float32 [height, width] in [1 - spread, 1]: a linear gradient in a random direction + a radial falloff
    around a random centre, rescaled so the brightest point is 1 and the darkest 1 - spread."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    linear = np.cos(theta) * x + np.sin(theta) * y
    cy, cx = rng.uniform(0.2, 0.8, 2)
    radial = (x - cx) ** 2 + (y - cy) ** 2
    shade = rng.uniform(0.3, 1.0) * linear + rng.uniform(0.3, 1.0) * radial  # larger = darker
    shade -= shade.min()
    shade /= max(float(shade.max()), 1e-6)
    return (1.0 - spread * shade).astype(np.float32)


def _low_freq(height: int, width: int, rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    """Smooth random texture in about -1..1 (a coarse random grid, bicubic-upsampled)."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC), np.float32)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def photo(digit: np.ndarray, rng: np.random.Generator, size: tuple[int, int] = (240, 180)) -> bytes:
    """Phone photo: dark ink on tinted paper under uneven light (30-50% brightness spread), the digit 3-5x
    (at 240x180; proportionally at other sizes) off-centre, rotated up to ±12°, blurred (sigma 0.5-1.5 px at
    240x180), sensor noise sigma 3-8, colour JPEG q70. `size` is (width, height)."""
    width, height = size
    scale = height / 180.0
    side = int(round(28 * rng.uniform(3.0, 5.0) * scale))
    ink = _place(_coverage(digit, side, rng.uniform(-12.0, 12.0)), height, width, rng)
    paper = (rng.uniform(190.0, 235.0) + rng.uniform(-12.0, 12.0, 3)).astype(np.float32)  # tinted per channel
    pen = (rng.uniform(15.0, 60.0) + rng.uniform(-10.0, 10.0, 3)).astype(np.float32)
    light = _lighting(height, width, rng, rng.uniform(0.3, 0.5))
    ink3 = ink[..., None]
    rgb = (paper * (1.0 - ink3) + pen * ink3) * light[..., None]
    image = Image.fromarray(_to_uint8(rgb), mode="RGB")
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5) * scale))
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(3.0, 8.0)
    noisy = np.asarray(image, np.float32) + noise
    return _encode(Image.fromarray(_to_uint8(noisy), mode="RGB"), "JPEG", quality=70)


def scan(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Flatbed scan: a 300-400 x 300 page crop, white paper 235-250, dark ink, the digit 2-4x, rotated ±3°,
    mild noise; grayscale or RGB, PNG or JPEG q90 (chosen by the rng)."""
    width, height = int(rng.integers(300, 401)), 300
    ink = _place(_coverage(digit, int(round(28 * rng.uniform(2.0, 4.0))), rng.uniform(-3.0, 3.0)), height, width, rng)
    paper, pen = rng.uniform(235.0, 250.0), rng.uniform(10.0, 60.0)
    gray = paper * (1.0 - ink) + pen * ink
    gray += rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(1.0, 3.0)
    image = Image.fromarray(_to_uint8(gray), mode="L")
    if rng.random() < 0.5:
        image = image.convert("RGB")
    if rng.random() < 0.5:
        return _encode(image, "PNG", compress_level=1)  # the level changes the file's size, not its pixels
    return _encode(image, "JPEG", quality=90)


_PENS = np.array([(0, 0, 0), (0, 0, 0), (20, 40, 200), (200, 30, 30), (30, 130, 50), (90, 30, 150)], np.float32)


def canvas(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Drawing-pad export: a thick anti-aliased stroke, the digit's ink 60-80% of the canvas height, on a
    280x280 or 400x400 canvas; either RGBA with a transparent background (ink black or coloured, alpha =
    stroke coverage, transparent pixels (0, 0, 0, 0) as browsers write them) or RGB on white. PNG."""
    side = 280 if rng.random() < 0.5 else 400
    rows = np.flatnonzero(digit.max(axis=1) > 25)
    extent = (rows[-1] - rows[0] + 1) if rows.size else 20
    factor = side * rng.uniform(0.6, 0.8) / extent
    # The pen's shape is worked out at half scale (smooth, so nothing is lost), then thresholded at full scale.
    half = factor / 2.0
    up = _coverage(digit, int(round(28 * half)), rng.uniform(-5.0, 5.0))
    up = ndimage.maximum_filter(up, size=max(1, int(round(half * rng.uniform(0.2, 0.6)))))  # a thicker pen
    up = ndimage.gaussian_filter(up, half * 0.25)
    up = Image.fromarray(up, mode="F").resize((2 * up.shape[1], 2 * up.shape[0]), Image.Resampling.BILINEAR)
    cover = np.clip((np.asarray(up, np.float32) - 0.35) / 0.25, 0.0, 1.0)  # solid stroke, anti-aliased edges
    # The digit's ink box is centred-ish, as people draw in the middle of the pad.
    ys, xs = np.nonzero(cover > 0)
    cover = cover[ys.min():ys.max() + 1, xs.min():xs.max() + 1] if ys.size else cover[:1, :1]
    field = np.zeros((side, side), np.float32)
    h, w = min(cover.shape[0], side), min(cover.shape[1], side)
    top = int(np.clip((side - h) // 2 + rng.integers(-side // 10, side // 10 + 1), 0, side - h))
    left = int(np.clip((side - w) // 2 + rng.integers(-side // 10, side // 10 + 1), 0, side - w))
    field[top:top + h, left:left + w] = cover[:h, :w]
    pen = _PENS[int(rng.integers(0, len(_PENS)))]
    if rng.random() < 0.6:
        alpha = _to_uint8(field * 255.0)
        rgba = np.zeros((side, side, 4), np.uint8)
        rgba[alpha > 0, :3] = pen.astype(np.uint8)
        rgba[..., 3] = alpha
        return _encode(Image.fromarray(rgba, mode="RGBA"), "PNG", compress_level=1)
    rgb = 255.0 * (1.0 - field[..., None]) + pen * field[..., None]
    return _encode(Image.fromarray(_to_uint8(rgb), mode="RGB"), "PNG", compress_level=1)


def chalkboard(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Chalk on a board: light grey, grainy strokes with partial coverage on a dark green or grey board with a
    brightness gradient and a smudgy texture; 320x240, the digit 3-5.5x, rotated ±10°, RGB JPEG q80."""
    width, height = 320, 240
    ink = _place(_coverage(digit, int(round(28 * rng.uniform(3.0, 5.5))), rng.uniform(-10.0, 10.0)), height, width, rng)
    grain = np.clip(rng.uniform(0.35, 1.15, (height, width)).astype(np.float32), 0.0, 1.0)
    chalk = np.clip(ink * grain * rng.uniform(0.7, 1.0), 0.0, 1.0)
    chalk = ndimage.gaussian_filter(chalk, 0.6)
    board = np.array([(38, 62, 48), (44, 48, 50), (30, 52, 40)][int(rng.integers(0, 3))], np.float32)
    board = board * np.float32(rng.uniform(0.8, 1.2))
    light = _lighting(height, width, rng, rng.uniform(0.25, 0.45))
    smudge = 1.0 + 0.15 * _low_freq(height, width, rng, 8)  # half-wiped chalk dust
    background = board * (light * smudge)[..., None]
    background += rng.standard_normal((height, width, 1), dtype=np.float32) * 4.0
    white = (rng.uniform(200.0, 240.0) + rng.uniform(-6.0, 6.0, 3)).astype(np.float32)
    rgb = background + chalk[..., None] * (white * light[..., None] - background)
    return _encode(Image.fromarray(_to_uint8(rgb), mode="RGB"), "JPEG", quality=80)


def upscaled(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """The MNIST digit itself, bicubic-upscaled to a random 56..224 square, grayscale PNG, white on black."""
    side = int(rng.integers(56, 225))
    image = Image.fromarray(np.asarray(digit, np.uint8), mode="L").resize((side, side), Image.Resampling.BICUBIC)
    return _encode(image, "PNG")


GENERATORS: dict[str, Callable[[np.ndarray, np.random.Generator], bytes]] = {
    "photo": photo, "scan": scan, "canvas": canvas, "chalkboard": chalkboard, "upscaled": upscaled,
}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}
