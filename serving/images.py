"""Turn request images (encoded files or raw pixels) into the model's input: uint8 [N, 1, 28, 28], MNIST polarity.

Encoded images (any format Pillow reads except EPS, which would run Ghostscript; any size and mode):
1. The header is read first and the declared size checked against `max_image_pixels` *before* any pixel
   is decoded, so a 50,000 x 50,000 PNG costs nothing. EXIF orientation is applied; animations use frame 0.
2. To 8-bit grayscale: 16-bit images are scaled by 1/257, float images read as 0..1 (or clipped to 0..255);
   images with transparency are composited onto the background that contrasts with their ink (white
   behind dark ink, black behind light ink), so a digit drawn on a transparent canvas stays visible.
3. Polarity: the model wants a light digit on black. INVERT_AUTO inverts when the image's outermost
   pixel ring averages above 127 (dark ink on light paper); INVERT_ALWAYS / INVERT_NEVER force it.
4. Fitting (FIT_AUTO: 28x28 images are taken as they are, anything else gets FIT_DIGIT):
   FIT_DIGIT is MNIST's own recipe (LeCun et al.): subtract the background (median of the border ring),
   stretch the ink to 0..255, crop to the bounding box of pixels above 10% of the peak, resize the crop
   (Lanczos, antialiased) so its longer side is 20 px keeping the aspect ratio, and paste it into a black
   28x28 field so the centre of mass lands on the field's centre (13.5, 13.5), kept inside the field.
   A blank image becomes an all-black 28x28. FIT_RESIZE is a plain Lanczos resize to 28x28.
Raw pixels: exactly 784 bytes, row-major 28x28, used as they are (only INVERT_ALWAYS flips them).

Every failure raises serving.errors.ImageError naming the image's index in the request and the reason.
"""

from __future__ import annotations

import enum
import io
import re
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from serving.errors import ImageError, InvalidInput

__all__ = ["Invert", "Fit", "SIDE", "PIXELS", "DEFAULT_MAX_IMAGE_PIXELS", "decode_batch", "decode_image",
           "raw_pixels", "fit_digit"]

SIDE = 28
PIXELS = SIDE * SIDE
BOX = 20  # MNIST: the digit's longer side is normalised to 20 px inside the 28 px field
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
_INK_THRESHOLD = 0.1  # fraction of the peak above which a pixel counts as ink for the bounding box

Image.init()
# EPS is decoded by running Ghostscript: not something a network service should do on request.
_FORMATS = tuple(sorted(fmt for fmt in Image.OPEN if fmt != "EPS"))


class Invert(enum.IntEnum):
    """Same numbers as lsoftmax.v1.Invert."""
    AUTO = 0
    NEVER = 1
    ALWAYS = 2


class Fit(enum.IntEnum):
    """Same numbers as lsoftmax.v1.Fit."""
    AUTO = 0
    DIGIT = 1
    RESIZE = 2


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _border(gray: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of a [H, W] array."""
    if min(gray.shape) <= 2:
        return gray.ravel()
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def _open(index: int, data: bytes, max_image_pixels: int) -> Image.Image:
    if not data:
        raise ImageError(index, "empty image (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageError(index, "not an image Pillow can read (unknown format or corrupt header)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own, far larger limit, checked at open
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" of {declared.group(1)} pixels" if declared else ""
        raise ImageError(index, f"declared size{size} exceeds the limit of {max_image_pixels} pixels") from None
    except Exception as exc:  # Pillow's plugins raise many types on malformed headers
        raise ImageError(index, f"corrupt image header ({_first_line(exc)})") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageError(index, f"image has no pixels ({width}x{height})")
    if width * height > max_image_pixels:
        raise ImageError(index, f"{im.format} image of {width}x{height} pixels exceeds the limit of "
                                f"{max_image_pixels} pixels")
    return im


def _to_gray(im: Image.Image) -> np.ndarray:
    """uint8 [H, W] luminance; transparency composited onto the background that contrasts with the ink."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.round(np.asarray(im, dtype=np.float64) / 257.0).astype(np.uint8)
    if mode in ("I", "F"):
        values = np.asarray(im, dtype=np.float64)
        if mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0
        elif mode == "I" and values.size and values.max() > 255:
            values = values / 257.0  # 16-bit data in a 32-bit container
        return np.clip(np.round(values), 0, 255).astype(np.uint8)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        la = np.asarray(im.convert("RGBA").convert("LA"), dtype=np.float64)
        lum, alpha = la[..., 0], la[..., 1] / 255.0
        coverage = alpha.sum()
        ink = (lum * alpha).sum() / coverage if coverage > 0 else 255.0
        background = 255.0 if ink < 128 else 0.0
        return np.round(lum * alpha + background * (1.0 - alpha)).astype(np.uint8)
    try:
        return np.asarray(im.convert("L"), dtype=np.uint8)
    except ValueError:  # modes without a direct path to L (e.g. LAB)
        return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)


def _resize(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize of a float [H, W] array (Pillow mode F), clipped to 0..255."""
    out = Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 255.0)


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


def decode_image(index: int, data: bytes, invert: Invert = Invert.AUTO, fit: Fit = Fit.AUTO,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An encoded image → uint8 [28, 28], light digit on black. Raises ImageError(index, reason)."""
    im = _open(index, data, max_image_pixels)
    try:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im)
        gray = _to_gray(im)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(index, f"decoded size exceeds the limit of {max_image_pixels} pixels") from None
    except Exception as exc:  # truncated data, bad chunks, unsupported compression, ...
        raise ImageError(index, f"corrupt or truncated {im.format} image ({_first_line(exc)})") from None
    if invert == Invert.ALWAYS or (invert == Invert.AUTO and float(_border(gray).mean()) > 127.0):
        gray = 255 - gray
    if fit == Fit.RESIZE:
        return np.round(_resize(gray.astype(np.float32), SIDE, SIDE)).astype(np.uint8)
    if fit == Fit.AUTO and gray.shape == (SIDE, SIDE):
        return np.ascontiguousarray(gray)
    return fit_digit(gray)


def raw_pixels(index: int, data: bytes, invert: Invert = Invert.AUTO) -> np.ndarray:
    """784 raw bytes → uint8 [28, 28]; only Invert.ALWAYS changes them."""
    if len(data) != PIXELS:
        raise ImageError(index, f"raw pixels must be exactly {PIXELS} bytes (28x28 uint8), got {len(data)}")
    pixels = np.frombuffer(data, np.uint8).reshape(SIDE, SIDE)
    return 255 - pixels if invert == Invert.ALWAYS else pixels


def _enum(kind: type[enum.IntEnum], value: int, what: str) -> enum.IntEnum:
    try:
        return kind(value)
    except ValueError:
        raise InvalidInput(f"unknown {what} value {value}; choose from "
                           + ", ".join(f"{m.value} ({m.name})" for m in kind)) from None


def decode_batch(images: Sequence[tuple[str | None, bytes]], invert: int = 0, fit: int = 0,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """[(kind, data)] with kind "encoded", "pixels" or None (nothing set) → uint8 [N, 1, 28, 28].

    Raises InvalidInput for an empty batch or unknown option values, ImageError for the first bad image."""
    if not images:
        raise InvalidInput("the request has no images")
    invert_mode, fit_mode = _enum(Invert, invert, "invert"), _enum(Fit, fit, "fit")
    if invert_mode != Invert.ALWAYS and all(k == "pixels" and len(d) == PIXELS for k, d in images):
        # Fast path for raw batches: one copy, no per-image Python work.
        return np.frombuffer(b"".join(d for _, d in images), np.uint8).reshape(len(images), 1, SIDE, SIDE)
    batch = np.empty((len(images), 1, SIDE, SIDE), np.uint8)
    for index, (kind, data) in enumerate(images):
        if kind == "pixels":
            batch[index, 0] = raw_pixels(index, data, invert_mode)
        elif kind == "encoded":
            batch[index, 0] = decode_image(index, data, invert_mode, fit_mode, max_image_pixels)
        else:
            raise ImageError(index, "no data: set either `encoded` or `pixels`")
    return batch
