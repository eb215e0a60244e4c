"""A server-wide byte budget for image decoding: how much memory decoded images may hold at once.

    budget = DecodeBudget(256 * 2**20)
    await budget.acquire(cost, deadline)      # waits (first come, first served) until `cost` bytes are free
    ...decode...
    budget.release(cost)

A count of images in flight does not bound memory: a 700-byte WebP may declare 4000x4000 and decode to ~95 MiB.
Each large image is charged what decoding it holds at its peak (serving.images.decoding.decode_cost) before it starts;
a request whose image would not fit now waits its turn, bounded by its deadline; one that could never fit (its
cost is over the whole budget) is refused at once. Used on the event loop only (no locks).
"""

from __future__ import annotations

import asyncio
import collections
import time

from serving.core.errors import DeadlineExceeded, LimitExceeded

__all__ = ["DecodeBudget", "DEFAULT_MAX_DECODE_BYTES"]

# Two 4096x4096 PNGs at their decoding peak (80-130 MiB each, serving.images.decoding.decode_cost) fit; a 4096x4096 WebP
# (~270 MiB charged) decodes alone under a budget of 320 MiB.
DEFAULT_MAX_DECODE_BYTES = 320 * 2**20


class DecodeBudget:
    def __init__(self, capacity: int = DEFAULT_MAX_DECODE_BYTES) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    def _fits(self, cost: int) -> bool:
        return self.used + cost <= self.capacity

    async def acquire(self, cost: int, deadline: float | None = None, what: str = "the image") -> None:
        """Take `cost` bytes, waiting behind earlier waiters; LimitExceeded when it can never fit,
        DeadlineExceeded when the deadline (time.monotonic()) passes while waiting."""
        if cost > self.capacity:
            raise LimitExceeded(f"{what} needs about {cost >> 20} MiB to decode, more than the "
                                f"{self.capacity >> 20} MiB all decoding may hold (--max-decode-memory-mb); "
                                "send a smaller image")
        if not self._waiters and self._fits(cost):
            self.used += cost
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (cost, waiter)
        self._waiters.append(entry)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():  # granted just as we gave up: hand the bytes back
                self.release(cost)
            else:
                waiter.cancel()
                self._waiters.remove(entry)
                self._wake()  # a large waiter leaving may let smaller ones behind it go
            if isinstance(exc, asyncio.TimeoutError):
                raise DeadlineExceeded(f"the request's deadline passed while {what} waited for decoding memory "
                                       f"({self.used >> 20} of {self.capacity >> 20} MiB in use)") from None
            raise

    def release(self, cost: int) -> None:
        self.used -= cost
        self._wake()

    def _wake(self) -> None:
        """Grant waiters in arrival order while the first one fits (no overtaking: large images do not starve)."""
        while self._waiters and self._fits(self._waiters[0][0]):
            cost, waiter = self._waiters.popleft()
            self.used += cost
            waiter.set_result(None)
