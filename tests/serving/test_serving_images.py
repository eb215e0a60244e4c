"""Image decoding and MNIST fitting (serving.images.decoding), in-process: formats, modes, polarity, framing, and every
bad-input case raising ImageError with the image's index. Run: .venv/bin/python -m pytest tests/serving/test_serving_images.py -q"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from serving.core.errors import ImageError, InvalidInput
from serving.images.decoding import Fit, Invert, decode_batch, decode_image, fit_digit, raw_pixels


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR declaring width x height 8-bit grayscale, + an empty IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _drawn_seven(size=(240, 300), ink=0, paper=255, mode="L") -> Image.Image:
    image = Image.new(mode, size, paper)
    draw = ImageDraw.Draw(image)
    draw.line([(60, 60), (190, 60), (110, 250)], fill=ink, width=18)
    return image


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_28x28_png_is_the_raw_pixels(digits, helpers):
    images, _ = digits
    png_bytes = helpers.png_bytes
    for image in images[:4]:
        assert np.array_equal(decode_image(0, png_bytes(image)), image)
        assert np.array_equal(raw_pixels(0, image.tobytes()), image)


def test_dark_on_light_is_inverted_automatically(digits, helpers):
    image = digits[0][0]
    png_bytes = helpers.png_bytes
    inverted = png_bytes(255 - image)
    assert np.array_equal(decode_image(0, inverted), image)
    assert np.array_equal(decode_image(0, inverted, invert=Invert.NEVER), 255 - image)
    assert np.array_equal(decode_image(0, png_bytes(image), invert=Invert.ALWAYS), 255 - image)
    # Raw pixels are the model input: auto never touches them, ALWAYS flips them.
    assert np.array_equal(raw_pixels(0, image.tobytes(), Invert.AUTO), image)
    assert np.array_equal(raw_pixels(0, image.tobytes(), Invert.ALWAYS), 255 - image)


def _check_mnist_framed(out: np.ndarray) -> None:
    assert out.shape == (28, 28) and out.dtype == np.uint8
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) in (19, 20, 21)  # longer side ~20 px
    mass = out.astype(float)
    cy = (mass.sum(axis=1) * np.arange(28)).sum() / mass.sum()
    cx = (mass.sum(axis=0) * np.arange(28)).sum() / mass.sum()
    assert abs(cy - 13.5) <= 0.6 and abs(cx - 13.5) <= 0.6
    assert out[0].max() == 0 and out[:, 0].max() == 0  # black border, light ink
    assert out.max() >= 200


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"])
def test_large_photo_of_a_digit_is_fitted_like_mnist(fmt):
    out = decode_image(0, _encode(_drawn_seven(), fmt))
    _check_mnist_framed(out)


def test_fit_keeps_aspect_ratio():
    tall = np.zeros((100, 20), np.uint8)
    tall[:, :] = 255
    out = fit_digit(np.pad(tall, 30))
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert rows[-1] - rows[0] + 1 == 20 and cols[-1] - cols[0] + 1 == 4


def test_fit_modes():
    big = _encode(_drawn_seven(size=(56, 56)))
    assert decode_image(0, big, fit=Fit.RESIZE).shape == (28, 28)
    assert np.array_equal(decode_image(0, big, fit=Fit.AUTO), decode_image(0, big, fit=Fit.DIGIT))
    blank = _encode(Image.new("L", (50, 40), 255))
    assert decode_image(0, blank).max() == 0  # nothing to fit: black field, no error


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "1", "CMYK", "I;16", "I", "F"])
def test_modes_are_converted_to_8bit_grayscale(mode):
    seven = _drawn_seven()
    if mode in ("I;16", "I"):
        image = Image.fromarray(np.asarray(seven).astype(np.uint16) * 257)
        image = image if mode == "I;16" else image.convert("I")
        data = _encode(image, "PNG" if mode == "I;16" else "TIFF")
    elif mode == "F":
        data = _encode(Image.fromarray(np.asarray(seven, np.float32) / 255.0), "TIFF")
    else:
        data = _encode(seven.convert(mode), "JPEG" if mode == "CMYK" else "PNG")
    _check_mnist_framed(decode_image(0, data))


@pytest.mark.parametrize("ink", [0, 255])
def test_transparent_canvas_keeps_the_digit_visible(ink):
    canvas = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).line([(50, 40), (150, 40), (90, 170)], fill=(ink, ink, ink, 255), width=14)
    _check_mnist_framed(decode_image(0, _encode(canvas)))


def test_batch_fast_path_equals_slow_path(digits, helpers):
    images, _ = digits
    png_bytes = helpers.png_bytes
    raw = [("pixels", image.tobytes()) for image in images[:5]]
    mixed = raw[:4] + [("encoded", png_bytes(images[4]))]
    assert np.array_equal(decode_batch(raw), images[:5, None])
    assert np.array_equal(decode_batch(mixed), images[:5, None])


def _truncated_png() -> bytes:
    data = _encode(_drawn_seven())
    return data[: len(data) // 2]


@pytest.mark.parametrize("data, kind, reason", [
    (b"", "encoded", "empty image"),
    (b"definitely not an image", "encoded", "not an image"),
    (None, "encoded", "truncated"),
    (_png_header(50_000, 50_000), "encoded", "exceeds the limit"),
    (_png_header(0, 10), "encoded", ""),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "encoded", "EPS images are not accepted"),
    (bytes(783), "pixels", "exactly 784 bytes"),
    (bytes(785), "pixels", "exactly 784 bytes"),
    (b"", None, "no data"),
])
def test_bad_images_name_index_and_reason(digits, data, kind, reason, monkeypatch):
    from PIL import ImageFile

    if data is None:
        data = _truncated_png()
    good = ("pixels", digits[0][0].tobytes())
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(ImageError) as info:
        decode_batch([good, good, (kind, data)])
    if reason in ("exceeds the limit", "EPS images are not accepted"):
        assert decoded == []  # refused from the header: a huge declared size is never decoded, EPS never rendered
    assert info.value.index == 2
    assert str(info.value).startswith("image 2: ") and reason in str(info.value)


def test_empty_batch_and_bad_options(digits):
    with pytest.raises(InvalidInput, match="no images"):
        decode_batch([])
    with pytest.raises(InvalidInput, match="unknown invert value 7"):
        decode_batch([("pixels", bytes(784))], invert=7)
    with pytest.raises(InvalidInput, match="unknown fit value 9"):
        decode_batch([("pixels", bytes(784))], fit=9)


def test_pixel_limit_is_configurable():
    data = _encode(_drawn_seven(size=(100, 100)))
    with pytest.raises(ImageError, match="exceeds the limit of 5000 pixels"):
        decode_image(0, data, max_image_pixels=5000)
