"""Hostile and heavy images (serving.images.decoding, serving.images.lanes), in-process: refused formats named, Pillow's bomb
limit following the flag, bounded memory for huge images, the per-request pixel budget, the bounded large-image
queue, the deadline checked between images, and small images never waiting behind large ones.
Run: .venv/bin/python -m pytest tests/serving/test_serving_decode_queue.py -q"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image

from serving.images.lanes import SMALL_PIXELS, Decoder
from serving.core.errors import DeadlineExceeded, ImageError, LimitExceeded
from serving.images.decoding import WORK_SIDE, Fit, Invert, configure_pillow, decode_image, open_image


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _big_png(side: int, mode: str = "RGBA", seed: int = 0) -> bytes:
    """A large image that compresses well (a gradient with a dark stroke) but costs its full size to decode."""
    ramp = np.linspace(180, 250, side, dtype=np.float32)
    gray = np.broadcast_to(ramp, (side, side)).astype(np.uint8).copy()
    gray[side // 4: 3 * side // 4, side // 2 - side // 40: side // 2 + side // 40] = 20
    return _encode(Image.fromarray(gray).convert(mode), compress_level=1)


def _ico_holding(png: bytes, declared: int = 0) -> bytes:
    """An ICO file whose single entry is `png` (Pillow decodes such an entry while opening the file)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def record_decoding(monkeypatch) -> list[tuple[str, tuple[int, int]]]:
    """Every image Pillow decodes from a file from now on (ImageFile.load, and ICO's own loader), as (format, size):
    what "refused without decoding" is checked against, instead of how long the refusal took."""
    from PIL import IcoImagePlugin, ImageFile

    decoded: list[tuple[str, tuple[int, int]]] = []
    for cls in (ImageFile.ImageFile, IcoImagePlugin.IcoImageFile):
        real = cls.load

        def load(self, *args, _real=real, **kwargs):
            decoded.append((self.format, self.size))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "load", load)
    return decoded


def test_ico_is_refused_by_name_without_decoding_its_png(monkeypatch):
    data = _ico_holding(_big_png(3000))
    decoded = record_decoding(monkeypatch)
    # Pillow itself decodes the PNG inside while opening an ICO: the recorder sees that.
    Image.open(io.BytesIO(_ico_holding(_big_png(64), declared=64))).close()
    assert decoded, "the recorder sees no decoding: the check below would prove nothing"
    decoded.clear()
    with pytest.raises(ImageError, match="image 0: ICO images are not accepted"):
        decode_image(0, data)
    assert decoded == []  # the 9-megapixel PNG inside was never decoded


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_every_accepted_format_decodes(fmt):
    image = Image.fromarray(np.full((60, 40), 255, np.uint8)).convert("RGB")
    assert decode_image(0, _encode(image, fmt)).shape == (28, 28)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX"])
def test_other_formats_are_refused(fmt):
    image = Image.fromarray(np.full((32, 32), 255, np.uint8)).convert("RGB")
    with pytest.raises(ImageError, match="not accepted|not an image this server reads"):
        decode_image(3, _encode(image, fmt))


def test_pillows_bomb_limit_follows_the_flag_and_its_warning_is_a_refusal(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    data = _encode(Image.new("L", (60, 60), 255))
    with warnings.catch_warnings():
        configure_pillow(2500)  # 3600 pixels: over Pillow's limit, under twice it (a warning, not its error)
        assert Image.MAX_IMAGE_PIXELS == 2500
        with pytest.raises(ImageError, match="exceeds the limit"):
            open_image(0, data, max_image_pixels=10**6)


def test_a_huge_rgba_png_is_decoded_in_bounded_memory():
    data = _big_png(4096)
    tracemalloc.start()
    try:
        out = decode_image(0, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (28, 28) and out.max() > 200  # the stroke was found
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MiB of numpy intermediates for one image"


def test_a_large_jpeg_is_decoded_at_a_reduced_scale():
    gray = np.full((3000, 4000), 235, np.uint8)
    gray[1000:2000, 1900:2100] = 30
    data = _encode(Image.fromarray(gray).convert("RGB"), "JPEG", quality=80)
    im = open_image(0, data)
    out = decode_image(0, data)
    assert im.size == (4000, 3000) and out.shape == (28, 28) and out.max() > 200
    # draft() picks the smallest DCT scale that keeps WORK_SIDE px: 1/8 of a 4000x3000 JPEG.
    im.draft("L", (WORK_SIDE, WORK_SIDE))
    assert im.size == (500, 375)


def _run(coro):
    return asyncio.run(coro)


def _items(*datas: bytes) -> list[tuple[str, bytes]]:
    return [("encoded", d) for d in datas]


def test_the_request_pixel_budget_names_the_image_that_overdraws_it():
    small = _encode(Image.new("L", (100, 100), 255))
    decoder = Decoder(threads=1, max_request_pixels=25_000)
    try:
        assert _run(decoder.decode(_items(small, small), Invert.AUTO, Fit.AUTO)).shape == (2, 1, 28, 28)
        with pytest.raises(LimitExceeded, match="image 2: .*30000 pixels"):
            _run(decoder.decode(_items(small, small, small), Invert.AUTO, Fit.AUTO))
    finally:
        decoder.close()


def gate_prepare_image(monkeypatch, hold):
    """Replace serving.images.lanes.prepare_image (the decoding of one opened image, in a worker thread) with one
    that calls hold(index, im) first; returns the list of (index, size) of the images it was called for."""
    import serving.images.lanes as decode_queue

    real = decode_queue.prepare_image
    calls: list[tuple[int, tuple[int, int]]] = []

    def prepare_image(index, im, *args, **kwargs):
        calls.append((index, im.size))
        hold(index, im)
        return real(index, im, *args, **kwargs)

    monkeypatch.setattr(decode_queue, "prepare_image", prepare_image)
    return calls


def test_the_deadline_is_checked_between_images(monkeypatch):
    big = _big_png(1500)
    deadline = time.monotonic() + 0.2

    def until_the_deadline_passes(index, im):  # the deadline passes while image 0 decodes, however fast that is
        while time.monotonic() <= deadline:
            time.sleep(0.005)

    calls = gate_prepare_image(monkeypatch, until_the_deadline_passes)
    decoder = Decoder(threads=1, max_request_pixels=10**9)
    try:
        with pytest.raises(DeadlineExceeded):
            _run(decoder.decode(_items(*[big] * 40), Invert.AUTO, Fit.AUTO, deadline=deadline))
    finally:
        decoder.close()
    # Stopped before the next image: at most the one that was decoding when the deadline passed (none, on a machine
    # so busy that the deadline had passed before the first began), not forty.
    assert len(calls) <= 1, calls


def test_small_images_do_not_wait_behind_large_ones_and_the_large_queue_is_bounded(monkeypatch):
    big = _big_png(2048)
    small = _encode(Image.fromarray(np.zeros((28, 28), np.uint8)))
    gate = threading.Event()  # large images wait in the large lane until the test opens it
    entered = threading.Event()  # a large image is at the gate: the large lane's one thread is busy

    def hold_large(index, im):
        if im.size[0] * im.size[1] > SMALL_PIXELS:
            entered.set()
            assert gate.wait(60), "the test never opened the gate"

    gate_prepare_image(monkeypatch, hold_large)
    decoder = Decoder(threads=1, max_queued_large=2)
    finished: list[str] = []

    async def request(name: str, items):
        try:
            await decoder.decode(items, Invert.AUTO, Fit.AUTO)
            finished.append(name)
        except LimitExceeded as exc:
            finished.append(f"{name} refused: {exc}")

    async def until(condition, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"not reached: {finished}, {decoder.queued_large} large queued"
            await asyncio.sleep(0.001)

    async def main():
        heavy = [asyncio.ensure_future(request(f"large{i}", _items(*[big] * 3))) for i in range(3)]
        # The large lane's thread holds one request's image, a second request waits for the lane (the queue's 2),
        # the third is refused.
        await until(lambda: entered.is_set() and decoder.queued_large == 2 and any("refused" in f for f in finished))
        await request("small", _items(small))
        finished.append("small answered")
        assert not any(f.startswith("large") and "refused" not in f for f in finished)  # the large ones still held
        gate.set()
        await asyncio.gather(*heavy)

    try:
        _run(main())
    finally:
        gate.set()
        decoder.close()
    assert finished.index("small answered") < min(i for i, f in enumerate(finished) if f.startswith("large")
                                                   and "refused" not in f)
    refused = [f for f in finished if "refused" in f]
    assert len(refused) == 1 and "--max-decode-queue 2" in refused[0]
