"""The server-wide byte budget for decoding (serving.images.budget) and what it charges (serving.images.decoding.decode_cost):
waiting in arrival order, refusing what can never fit, giving up at the deadline or on cancellation without
leaking bytes; the decoder charges large images, lets go of each decoded image at once, and refuses an image
larger than the whole budget. No timing: the event loop's own scheduling decides who got what.
Run: .venv/bin/python -m pytest tests/serving/test_serving_decode_budget.py -q"""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image

import serving.images.lanes as decode_queue
from serving.images.budget import DecodeBudget
from serving.images.lanes import Decoder
from serving.core.errors import DeadlineExceeded, LimitExceeded
from serving.images.decoding import (ALPHA_BYTES_PER_PIXEL, COLOUR_BYTES_PER_PIXEL, GREY_BYTES_PER_PIXEL,
                            WEBP_BYTES_PER_PIXEL, Fit, Invert, decode_cost, open_image)


async def _settle() -> None:
    for _ in range(5):  # let every ready task run its next step
        await asyncio.sleep(0)


def test_within_capacity_is_granted_at_once_and_released():
    async def run():
        budget = DecodeBudget(100)
        await budget.acquire(60)
        await budget.acquire(40)
        assert budget.used == 100
        budget.release(60)
        budget.release(40)
        assert budget.used == 0
    asyncio.run(run())


def test_waiters_are_granted_in_arrival_order_without_overtaking():
    async def run():
        budget = DecodeBudget(100)
        await budget.acquire(70)
        big = asyncio.ensure_future(budget.acquire(80))
        small = asyncio.ensure_future(budget.acquire(10))  # would fit now, but must not overtake the big one
        await _settle()
        assert not big.done() and not small.done()
        budget.release(70)
        await _settle()
        assert big.done() and small.done() and budget.used == 90
    asyncio.run(run())


def test_more_than_the_whole_budget_is_refused_at_once():
    async def run():
        with pytest.raises(LimitExceeded, match="--max-decode-memory-mb"):
            await DecodeBudget(100).acquire(101, what="image 3")
    asyncio.run(run())


def test_a_deadline_passing_while_waiting_gives_up_and_lets_the_next_one_in():
    async def run():
        budget = DecodeBudget(100)
        await budget.acquire(50)
        with pytest.raises(DeadlineExceeded, match="decoding memory"):
            await budget.acquire(80, deadline=time.monotonic())  # already due: no waiting at all
        behind = asyncio.ensure_future(budget.acquire(40))
        await _settle()
        assert behind.done() and budget.used == 90
    asyncio.run(run())


def test_a_cancelled_waiter_leaves_the_queue_and_nothing_leaks():
    async def run():
        budget = DecodeBudget(100)
        await budget.acquire(90)
        first = asyncio.ensure_future(budget.acquire(50))
        second = asyncio.ensure_future(budget.acquire(20))
        await _settle()
        first.cancel()  # the client went away: the waiter behind it may go once there is room
        await _settle()
        assert first.cancelled() and not second.done()
        budget.release(90)
        await _settle()
        assert second.done() and budget.used == 20
    asyncio.run(run())


def _encoded(mode: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "white" if mode != "L" else 255).save(buffer, fmt)
    return buffer.getvalue()


def test_decode_cost_follows_mode_size_and_jpeg_scale():
    assert decode_cost(open_image(0, _encoded("L", (1000, 800)))) == 1000 * 800 * GREY_BYTES_PER_PIXEL
    assert decode_cost(open_image(0, _encoded("RGB", (1000, 800)))) == 1000 * 800 * COLOUR_BYTES_PER_PIXEL
    assert decode_cost(open_image(0, _encoded("RGBA", (1000, 800)))) == 1000 * 800 * ALPHA_BYTES_PER_PIXEL
    assert decode_cost(open_image(0, _encoded("RGB", (1000, 800), "WEBP"))) == 1000 * 800 * WEBP_BYTES_PER_PIXEL
    # A 4000x3000 JPEG decodes at 1/8 scale (500x375): the budget charges that, not 12 megapixels.
    assert decode_cost(open_image(0, _encoded("RGB", (4000, 3000), "JPEG"))) == 500 * 375 * COLOUR_BYTES_PER_PIXEL


def test_the_decoder_refuses_an_image_larger_than_the_whole_budget():
    big = _encoded("RGB", (1200, 1200))  # ~10 MB to decode
    decoder = Decoder(threads=1, max_decode_bytes=4 * 2**20)
    try:
        with pytest.raises(LimitExceeded, match="image 1 needs about"):
            asyncio.run(decoder.decode([("encoded", _encoded("L", (28, 28))), ("encoded", big)], Invert.AUTO,
                                       Fit.AUTO))
        assert decoder.budget.used == 0 and decoder.queued_large == 0
    finally:
        decoder.close()


def test_each_decoded_image_is_let_go_before_the_next_one_decodes(monkeypatch):
    """The full-size pixels of image k are released when its 28x28 exists, not when the request ends."""
    seen: list[Image.Image] = []
    real = decode_queue.prepare_image

    def watching(index, im, *args):
        assert all(_closed(earlier) for earlier in seen), f"image {index}: an earlier decoded image is still open"
        seen.append(im)
        return real(index, im, *args)

    monkeypatch.setattr(decode_queue, "prepare_image", watching)
    gray = np.full((600, 600), 230, np.uint8)
    gray[150:450, 280:320] = 10
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, "PNG")
    items = [("encoded", buffer.getvalue())] * 3 + [("encoded", _encoded("L", (28, 28)))] * 2
    decoder = Decoder(threads=1)
    try:
        out = asyncio.run(decoder.decode(items, Invert.AUTO, Fit.AUTO))
    finally:
        decoder.close()
    assert out.shape == (5, 1, 28, 28) and len(seen) == 5 and all(_closed(im) for im in seen)
    assert decoder.budget.used == 0 and decoder.queued_large == 0


def _closed(im: Image.Image) -> bool:
    try:
        im.im
    except ValueError:
        return True
    return False
