"""Turn request images (encoded files or raw pixels) into the model's input: uint8 [N, 1, 28, 28], MNIST polarity.

Encoded images (decode_image; serving.images.lanes runs it off the event loop, one image at a time):
1. Only PNG, JPEG, GIF, BMP, TIFF and WebP are opened (ACCEPTED_FORMATS); anything else is refused by name
   (ICO, EPS, ...: some of Pillow's other plugins decode pixels or run programs before any size check).
   The header is read first and the declared size checked against `max_image_pixels` *before* any pixel
   is decoded, so a 50,000 x 50,000 PNG costs nothing; Pillow's own decompression-bomb warning is a
   refusal too (configure_pillow). Animations use frame 0; EXIF orientation is applied.
2. Early downscale: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps WORK_SIDE pixels
   on its longer side, and any image larger than that is shrunk to it before any arithmetic, so a
   12-megapixel photo costs about what a small one does (the digit ends up 20 px tall anyway).
3. To 8-bit grayscale (uint8/float32 arithmetic, on the downscaled image): 16-bit images are scaled by 1/257,
   float images read as 0..1 (or clipped to 0..255); images with transparency are composited onto the
   background that contrasts with their ink (white behind dark ink, black behind light ink), so a digit
   drawn on a transparent canvas stays visible.
4. Polarity and framing: serving.images.framing (INVERT_* / FIT_* options; FIT_AUTO keeps a 28x28 image as it is).
Raw pixels: exactly 784 bytes, row-major 28x28, used as they are (only INVERT_ALWAYS flips them).

Every failure raises serving.core.errors.ImageError naming the image's index in the request and the reason.
"""

from __future__ import annotations

import enum
import io
import re
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from serving.core.errors import ImageError, InvalidInput
from serving.images.framing import SIDE, fit_digit, is_light_background, resize_to

__all__ = ["Invert", "Fit", "SIDE", "PIXELS", "DEFAULT_MAX_IMAGE_PIXELS", "ACCEPTED_FORMATS", "WORK_SIDE",
           "configure_pillow", "open_image", "prepare_image", "decode_cost", "decode_batch", "decode_image",
           "raw_pixels"]

PIXELS = SIDE * SIDE
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
WORK_SIDE = 160  # longer side images are shrunk to before any arithmetic: the digit ends up 20 px tall, 160 px finds it
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
# Peak bytes per declared pixel while an image is decoded and converted (decode_cost), a margin over what one decode
# of a 4096x4096 image measured (VmHWM growth, glibc's mmap threshold fixed as the server sets it): grey 1.0; RGB
# PNG/BMP/TIFF and palette PNG/GIF 5.0; 16-bit TIFF 6.0; with alpha 8.1; WebP 16.0 (Pillow decodes it through
# libwebp's animation decoder: two canvases, the frame's bytes and the image, 4 bytes a pixel each).
GREY_BYTES_PER_PIXEL = 2
COLOUR_BYTES_PER_PIXEL = 7
ALPHA_BYTES_PER_PIXEL = 9
WEBP_BYTES_PER_PIXEL = 17

Image.init()


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


def configure_pillow(max_image_pixels: int) -> None:
    """Process-wide: Pillow's own decompression-bomb limit follows --max-image-pixels, and its warning (issued
    for sizes between the limit and twice it) is raised as an error, so no plugin decodes past the limit."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refused_format(data: bytes) -> str | None:
    """The name of a format Pillow recognises by its magic bytes but we do not accept (checked on the first
    bytes only, with the plugins' own `accept` tests; nothing is decoded)."""
    prefix = data[:16]
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in ACCEPTED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return fmt
        except Exception:  # a plugin's test that cannot cope with a short prefix
            continue
    return None


def open_image(index: int, data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Read the header of an encoded image (no pixels decoded) and check its format and declared size."""
    if not data:
        raise ImageError(index, "empty image (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.UnidentifiedImageError:
        refused = _refused_format(data)
        if refused:
            raise ImageError(index, f"{refused} images are not accepted; send "
                                    f"{', '.join(ACCEPTED_FORMATS[:-1])} or {ACCEPTED_FORMATS[-1]}") from None
        raise ImageError(index, "not an image this server reads (unknown format or corrupt header; accepted: "
                                f"{', '.join(ACCEPTED_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
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


def decode_cost(im: Image.Image) -> int:
    """Bytes decoding this opened image (open_image) holds at its peak: its declared size, a JPEG's at the DCT
    scale _load_small will use, times the bytes per pixel its mode needs. What the server-wide decode budget
    (serving.images.budget) charges before it starts."""
    width, height = im.size
    if im.format == "JPEG":
        scale = 1
        while scale < 8 and max(width, height) // (scale * 2) >= WORK_SIDE:
            scale *= 2
        width, height = -(-width // scale), -(-height // scale)
    if im.format == "WEBP":
        per_pixel = WEBP_BYTES_PER_PIXEL
    elif im.mode in ("L", "1"):
        per_pixel = GREY_BYTES_PER_PIXEL
    elif im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        per_pixel = ALPHA_BYTES_PER_PIXEL
    else:
        per_pixel = COLOUR_BYTES_PER_PIXEL
    return width * height * per_pixel


def _load_small(im: Image.Image) -> Image.Image:
    """Decode frame 0, a JPEG at a reduced DCT scale when it is large; upright (EXIF); longer side <= WORK_SIDE.
    Memory: the orientation is applied in place (exif_transpose copies a full-size image otherwise, even one
    with no orientation to apply), and each full-size intermediate is released as soon as the next exists, so
    at most two full-size images live at once (decode_cost charges that)."""
    if im.format == "JPEG" and max(im.size) > WORK_SIDE:
        im.draft("L" if im.mode in ("L", "RGB") else im.mode, (WORK_SIDE, WORK_SIDE))
    im.seek(0)
    im.load()
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode.startswith("I;16"):
        im = _replace(im, im.convert("I"))
    elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        im = _replace(im, im.convert("RGB" if im.mode != "1" else "L"))
    elif im.mode == "P":
        im = _replace(im, im.convert("RGBA" if "transparency" in im.info else "RGB"))
    if im.mode in ("RGB", "RGBX"):
        im = _replace(im, im.convert("L"))  # before shrinking: a third of the work
    elif im.mode in ("RGBA", "RGBa"):
        im = _replace(im, im.convert("LA"))
    elif im.mode == "PA":
        im = _replace(im, im.convert("RGBA").convert("LA"))
    if max(im.size) > WORK_SIDE:
        im.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return im


def _replace(old: Image.Image, new: Image.Image) -> Image.Image:
    """`new`, with `old`'s pixels released now (the caller may still hold `old`, e.g. the request's opened image)."""
    if new is not old:
        old.close()
    return new


def _to_gray(im: Image.Image) -> np.ndarray:
    """uint8 [H, W] luminance of a (small) image; transparency composited onto the contrasting background."""
    mode = im.mode
    if mode in ("I", "F"):
        values = np.asarray(im, dtype=np.float32)
        if mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0
        elif mode == "I" and values.size and values.max() > 255:
            values = values / 257.0  # 16-bit data in a 32-bit container
        return np.clip(np.round(values), 0, 255).astype(np.uint8)
    if mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"), dtype=np.float32)
        lum, alpha = la[..., 0], la[..., 1] * (1.0 / 255.0)
        coverage = float(alpha.sum())
        ink = float((lum * alpha).sum()) / coverage if coverage > 0 else 255.0
        background = 255.0 if ink < 128 else 0.0
        return np.round(lum * alpha + background * (1.0 - alpha)).astype(np.uint8)
    if mode != "L":
        im = im.convert("L")
    return np.asarray(im, dtype=np.uint8)


def prepare_image(index: int, im: Image.Image, invert: Invert = Invert.AUTO, fit: Fit = Fit.AUTO) -> np.ndarray:
    """An opened image (open_image) → uint8 [28, 28], light digit on black. Raises ImageError(index, reason)."""
    try:
        gray = _to_gray(_load_small(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(index, "decoded size exceeds the pixel limit") from None
    except Exception as exc:  # truncated data, bad chunks, unsupported compression, ...
        raise ImageError(index, f"corrupt or truncated {im.format} image ({_first_line(exc)})") from None
    if invert == Invert.ALWAYS or (invert == Invert.AUTO and is_light_background(gray)):
        gray = 255 - gray
    if fit == Fit.RESIZE:
        return resize_to(gray, SIDE, SIDE)
    if fit == Fit.AUTO and gray.shape == (SIDE, SIDE):
        return np.ascontiguousarray(gray)
    return fit_digit(gray)


def decode_image(index: int, data: bytes, invert: Invert = Invert.AUTO, fit: Fit = Fit.AUTO,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An encoded image → uint8 [28, 28], light digit on black. Raises ImageError(index, reason)."""
    return prepare_image(index, open_image(index, data, max_image_pixels), invert, fit)


def raw_pixels(index: int, data: bytes, invert: Invert = Invert.AUTO) -> np.ndarray:
    """784 raw bytes → uint8 [28, 28]; only Invert.ALWAYS changes them."""
    if len(data) != PIXELS:
        raise ImageError(index, f"raw pixels must be exactly {PIXELS} bytes (28x28 uint8), got {len(data)}")
    pixels = np.frombuffer(data, np.uint8).reshape(SIDE, SIDE)
    return 255 - pixels if invert == Invert.ALWAYS else pixels


def options(invert: int, fit: int) -> tuple[Invert, Fit]:
    """The request's option numbers as enums; InvalidInput for unknown values."""
    return _enum(Invert, invert, "invert"), _enum(Fit, fit, "fit")


def _enum(kind: type[enum.IntEnum], value: int, what: str) -> enum.IntEnum:
    try:
        return kind(value)
    except ValueError:
        raise InvalidInput(f"unknown {what} value {value}; choose from "
                           + ", ".join(f"{m.value} ({m.name})" for m in kind)) from None


def all_raw(images: Sequence[tuple[str | None, bytes]]) -> bool:
    return all(k == "pixels" and len(d) == PIXELS for k, d in images)


def decode_batch(images: Sequence[tuple[str | None, bytes]], invert: int = 0, fit: int = 0,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """[(kind, data)] with kind "encoded", "pixels" or None (nothing set) → uint8 [N, 1, 28, 28], in this thread.

    Raises InvalidInput for an empty batch or unknown option values, ImageError for the first bad image."""
    if not images:
        raise InvalidInput("the request has no images")
    invert_mode, fit_mode = options(invert, fit)
    if invert_mode != Invert.ALWAYS and all_raw(images):
        # Fast path for raw batches: one copy, no per-image Python work.
        return np.frombuffer(b"".join(d for _, d in images), np.uint8).reshape(len(images), 1, SIDE, SIDE)
    batch = np.empty((len(images), 1, SIDE, SIDE), np.uint8)
    for index, (kind, data) in enumerate(images):
        batch[index, 0] = decode_one(index, kind, data, invert_mode, fit_mode, max_image_pixels)
    return batch


def decode_one(index: int, kind: str | None, data: bytes, invert: Invert, fit: Fit,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    if kind == "pixels":
        return raw_pixels(index, data, invert)
    if kind == "encoded":
        return decode_image(index, data, invert, fit, max_image_pixels)
    raise ImageError(index, "no data: set either `encoded` or `pixels`")
