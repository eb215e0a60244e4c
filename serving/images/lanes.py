"""Decoding a request's encoded images off the event loop, so that large or hostile images cannot hold up others.

    decoder = Decoder(threads=2, max_queued_large=8, max_image_pixels=..., max_request_pixels=...)
    batch = await decoder.decode(items, invert, fit, deadline)   # uint8 [N, 1, 28, 28]

Two lanes of worker threads:
- the *small* lane first reads every image's header (cheap: no pixels; a bad header or an overdrawn pixel budget
  is refused before anything is decoded), then decodes the images whose declared size is at most SMALL_PIXELS
  (phone-screen drawings, scans at web size, MNIST-sized files), in request order, SMALL_STEP images per job: a
  request of 256 images goes back behind the others' jobs after each step, so one client's batch never holds
  another client's single image for longer than a step per request ahead of it;
- the *large* lane decodes the rest, one image per job. Its queue is bounded (max_queued_large images waiting or
  running across all requests): beyond it a request gets RESOURCE_EXHAUSTED at once instead of waiting.
So a 28x28 PNG never waits behind someone's 4096x4096 PNGs. A count does not bound memory (a 700-byte WebP may
declare 4000x4000), so each large image also takes its decoding cost (serving.images.decoding.decode_cost) from the
server-wide byte budget (serving.images.budget: waits its turn within the deadline, refused when it could never
fit), and each decoded image is released as soon as its 28x28 exists. Between images the request's deadline and
cancellation are checked (a decode that started runs to its end: at most one image, bounded by the pixel
limit). Each request also has a pixel budget (the declared sizes of its images summed), refused with
RESOURCE_EXHAUSTED naming the image that overdraws it. All-raw requests never come here (no decoding to do).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image

from serving.images.budget import DEFAULT_MAX_DECODE_BYTES, DecodeBudget
from serving.core.errors import DeadlineExceeded, ImageError, InvalidInput, LimitExceeded
from serving.images.decoding import SIDE, Fit, Invert, decode_cost, open_image, prepare_image, raw_pixels

__all__ = ["Decoder", "SMALL_PIXELS"]

SMALL_PIXELS = 512 * 512  # decoded in a few milliseconds at most
SMALL_STEP = 4  # small images decoded per job before the request queues again behind other requests' jobs


class _Request:
    """One request's decoding state, shared by the event loop and the worker running its images."""

    def __init__(self, items: Sequence[tuple[str | None, bytes]], invert: Invert, fit: Fit,
                 deadline: float | None, max_image_pixels: int, max_request_pixels: int) -> None:
        self.items = items
        self.invert = invert
        self.fit = fit
        self.deadline = deadline
        self.max_image_pixels = max_image_pixels
        self.budget = max_request_pixels
        self.spent = 0
        self.cancelled = threading.Event()
        self.opened: list[Image.Image | None] = []
        self.out = np.empty((len(items), 1, SIDE, SIDE), np.uint8)

    def check(self) -> None:
        """Between images: stop when the caller went away or the deadline passed."""
        if self.cancelled.is_set():
            raise asyncio.CancelledError()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the request's deadline passed while its images were being decoded")

    def charge(self, index: int, im: Image.Image) -> None:
        width, height = im.size
        self.spent += width * height
        if self.spent > self.budget:
            raise LimitExceeded(f"image {index}: the request's images declare {self.spent} pixels in all, more "
                                f"than the {self.budget} one request may carry (--max-request-pixels)")

    def open_all(self) -> None:
        """Every image's header (no pixels decoded): bad headers and the request's pixel budget are refused
        before any decoding starts."""
        self.opened = []
        for index, (kind, data) in enumerate(self.items):
            if kind == "pixels":
                self.opened.append(None)
                continue
            if kind != "encoded":
                raise ImageError(index, "no data: set either `encoded` or `pixels`")
            im = open_image(index, data, self.max_image_pixels)
            self.charge(index, im)
            self.opened.append(im)

    def prepare(self, index: int, im: Image.Image) -> None:
        """Decode one opened image into out[index], then let go of it at once: the full-size pixels must not live
        until the request ends."""
        try:
            self.out[index, 0] = prepare_image(index, im, self.invert, self.fit)
        finally:
            self.opened[index] = None
            im.close()

    def run_small(self, start: int) -> tuple[int, Image.Image | None]:
        """Small-lane worker: decode items[start:] in order for SMALL_STEP images, or until the end, or until an
        image too large for this lane, returned opened (header only) with its index; else (where to go on, None)."""
        if start == 0:
            self.open_all()
        for index in range(start, min(len(self.items), start + SMALL_STEP)):
            self.check()
            im = self.opened[index]
            if im is None:
                self.out[index, 0] = raw_pixels(index, self.items[index][1], self.invert)
            elif im.size[0] * im.size[1] > SMALL_PIXELS:
                return index, im
            else:
                self.prepare(index, im)
        return min(len(self.items), start + SMALL_STEP), None

    def run_large(self, index: int, im: Image.Image) -> None:
        """Large-lane worker: one image."""
        self.check()
        self.prepare(index, im)


class Decoder:
    def __init__(self, threads: int = 2, max_queued_large: int = 8, max_image_pixels: int = 4096 * 4096,
                 max_request_pixels: int = 4 * 4096 * 4096, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> None:
        self.max_queued_large = max_queued_large
        self.budget = DecodeBudget(max_decode_bytes)
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self._small = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self._large = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode-large")
        self.queued_large = 0  # large images waiting or being decoded; touched on the event loop only

    async def decode(self, items: Sequence[tuple[str | None, bytes]], invert: Invert, fit: Fit,
                     deadline: float | None = None) -> np.ndarray:
        """[(kind, data)] → uint8 [N, 1, 28, 28]; deadline is a time.monotonic() value or None."""
        if not items:
            raise InvalidInput("the request has no images")
        request = _Request(items, invert, fit, deadline, self.max_image_pixels, self.max_request_pixels)
        loop = asyncio.get_running_loop()
        index = 0
        try:
            while index < len(items):
                index, large = await loop.run_in_executor(self._small, request.run_small, index)
                if large is None:
                    continue  # a step done (or all): the next one queues behind other requests' jobs
                if self.queued_large >= self.max_queued_large:
                    raise LimitExceeded(f"image {index}: the server is already decoding {self.queued_large} large "
                                        f"images (over {SMALL_PIXELS} pixels; --max-decode-queue "
                                        f"{self.max_queued_large}); send smaller images or retry later")
                await self._decode_large(loop, request, index, large)
                large = None
                index += 1
        except asyncio.CancelledError:
            request.cancelled.set()  # the worker stops before its next image
            raise
        return request.out

    async def _decode_large(self, loop: asyncio.AbstractEventLoop, request: _Request, index: int,
                            im: Image.Image) -> None:
        """One large image in the large lane, counted and charged to the byte budget until the worker is done with
        it (a caller that gives up does not stop a decode that has started: its bytes stay charged until it ends)."""
        self.queued_large += 1
        cost = decode_cost(im)
        try:
            await self.budget.acquire(cost, request.deadline, f"image {index}")
        except BaseException:
            self.queued_large -= 1
            raise

        def finished() -> None:
            self.queued_large -= 1
            self.budget.release(cost)

        def on_done(_) -> None:  # in the worker thread (or here, when cancelled before it started)
            try:
                loop.call_soon_threadsafe(finished)
            except RuntimeError:  # the loop has closed: the server is gone
                pass

        job = self._large.submit(request.run_large, index, im)
        job.add_done_callback(on_done)
        await asyncio.wrap_future(job, loop=loop)

    def close(self) -> None:
        for pool in (self._small, self._large):
            pool.shutdown(wait=True, cancel_futures=True)
