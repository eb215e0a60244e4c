"""Finding the digit in real captures (serving.images.framing through serving.images.decoding.decode_image), in-process: photos
with uneven light, noise and JPEG, scans, drawing-pad exports, chalkboards, ruled lines, a page edge, specks, and
blank pages. Each capture is compared with the same digit framed from a clean rendering: what users send must
reach the model looking like MNIST. Run: .venv/bin/python -m pytest tests/serving/test_serving_framing.py -q"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bench.real_inputs_render import GENERATORS
from serving.images.framing import fit_digit, is_light_background
from serving.images.decoding import decode_image


def _seven() -> np.ndarray:
    """A 28x28 MNIST-polarity '7' with antialiased strokes (drawn at 4x, then reduced)."""
    big = Image.new("L", (112, 112), 0)
    ImageDraw.Draw(big).line([(28, 24), (84, 24), (48, 92)], fill=255, width=12)
    return np.asarray(big.resize((28, 28), Image.Resampling.LANCZOS))


def _four() -> np.ndarray:
    big = Image.new("L", (112, 112), 0)
    draw = ImageDraw.Draw(big)
    draw.line([(36, 16), (28, 64), (84, 64)], fill=255, width=11)
    draw.line([(70, 30), (70, 96)], fill=255, width=11)
    return np.asarray(big.resize((28, 28), Image.Resampling.LANCZOS))


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def _encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@pytest.mark.parametrize("digit", [_seven, _four], ids=["seven", "four"])
def test_captures_reach_the_model_looking_like_the_clean_digit(kind, digit):
    clean = fit_digit(digit())
    other = fit_digit(_four() if digit is _seven else _seven())
    for seed in range(4):
        seen = decode_image(0, GENERATORS[kind](digit(), np.random.default_rng(seed)))
        assert seen.shape == (28, 28) and seen.dtype == np.uint8
        assert seen.max() >= 200  # the ink is stretched to MNIST's levels
        similarity = _similarity(seen, clean)
        assert similarity > 0.7, (kind, seed, similarity)  # photos are rotated up to 12 degrees
        assert similarity > _similarity(seen, other) + 0.05, (kind, seed)  # it is this digit, not any digit


def _lit_page(width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """A page under a lamp: 250 at one corner, 140 at the opposite one, with sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    page = 250.0 - 110.0 * (x / width * 0.6 + y / height * 0.4)
    return page + rng.normal(0, 4, page.shape)


def _ink(page: np.ndarray, digit: np.ndarray, top: int, left: int, scale: int = 4) -> np.ndarray:
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC),
                     np.float32) / 255.0
    out = page.copy()
    region = out[top:top + big.shape[0], left:left + big.shape[1]]
    region[:] = region * (1 - big) + 25.0 * big
    return out


def _jpeg(page: np.ndarray) -> bytes:
    return _encode(np.clip(page, 0, 255).astype(np.uint8), "JPEG", quality=75)


def test_a_lighting_gradient_is_not_taken_for_ink():
    clean = fit_digit(_seven())
    seen = decode_image(0, _jpeg(_ink(_lit_page(), _seven(), top=60, left=150)))
    assert _similarity(seen, clean) > 0.85


def test_ruled_lines_specks_and_a_page_edge_are_dropped():
    clean = fit_digit(_seven())
    page = _ink(_lit_page(seed=1), _seven(), top=70, left=110)
    page[40:42, :] = 90.0  # ruled lines across the page, clear of the digit
    page[200:202, :] = 90.0
    page[:, :18] = 30.0  # the dark table beyond the page's left edge
    page[20:24, 280:284] = 40.0  # a speck of dirt
    seen = decode_image(0, _jpeg(page))
    assert _similarity(seen, clean) > 0.85


def test_a_ruled_line_through_the_digit_does_not_stretch_its_box():
    clean = fit_digit(_seven())
    page = _ink(_lit_page(seed=2), _seven(), top=60, left=110)
    page[120:122, :] = 100.0  # crosses the digit
    seen = decode_image(0, _jpeg(page))
    assert _similarity(seen, clean) > 0.8


@pytest.mark.parametrize("page", [
    np.full((240, 320), 235.0),  # a blank sheet
    _lit_page(seed=3),  # a blank sheet under uneven light, with noise
    np.random.default_rng(4).uniform(0, 255, (200, 200)),  # static
    np.full((100, 100), 20.0),  # a dark, empty board
], ids=["blank", "lit-blank", "static", "dark"])
def test_a_page_without_a_digit_gives_an_empty_field_not_an_error(page):
    seen = decode_image(0, _encode(np.clip(page, 0, 255).astype(np.uint8)))
    if page.std() > 50:  # static has "ink" everywhere; it must still give a valid input
        assert seen.shape == (28, 28)
    else:
        assert not seen.any()


def test_polarity_is_found_for_small_digits_on_large_pages():
    page = _ink(np.full((400, 400), 245.0), _seven(), top=300, left=40, scale=2)  # 2% of the page is ink
    assert is_light_background(page.astype(np.uint8))
    assert not is_light_background(255 - page.astype(np.uint8))
    assert _similarity(decode_image(0, _encode(page.astype(np.uint8))), fit_digit(_seven())) > 0.85


def test_28x28_inputs_and_raw_pixels_are_untouched(digits):
    images, _ = digits
    for image in images[:8]:
        np.testing.assert_array_equal(decode_image(0, _encode(image)), image)
