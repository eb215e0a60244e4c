"""The call boundary both transports pass through: draining, and each inference call's outcome on its model's
counters. Transport-neutral: the gRPC interceptor (serving.grpc.interceptors) and the HTTP middleware
(serving/http/app.py) call these with their own requests and statuses.

    start = drain.arrived()              # the call counts as in flight ...
    ...
    drain.answered()                     # ... until its answer has been sent
    record(charged(), error, time.perf_counter_ns() - start)   # on the model the core charged it to, if any
"""

from __future__ import annotations

import asyncio
import time

from serving.core.errors import DeadlineExceeded, Overloaded, ServingError
from serving.metrics import ModelStats

__all__ = ["Drain", "failure_reason", "record"]


class Drain:
    """Calls in flight and the last arrival or answer, for graceful shutdown (SIGTERM); `draining` set → new
    calls (health checks excepted) are refused with NotReady "shutting down", which clients retry elsewhere.

    A call counts from its arrival until its answer has been sent (gRPC: the context's done callback; HTTP: the
    response written), not until its handler returns: a client that just got its answer is likely to send its next
    call at once, and that call must find the server still taking calls (answered "shutting down") rather than a
    stopped one. So the quiet window runs from the last arrival *and* the last answer."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.last_event_ns = 0  # the latest arrival or completed answer
        self.draining = False

    def arrived(self) -> int:
        now = self.last_event_ns = time.perf_counter_ns()
        self.in_flight += 1
        return now

    def answered(self, _context=None) -> None:
        """The call's answer has been sent (or the call was cancelled): it no longer counts."""
        self.in_flight -= 1
        self.last_event_ns = time.perf_counter_ns()

    async def wait(self, quiet: float, timeout: float) -> bool:
        """After `draining` is set: wait until no call is in flight and no call arrived or was answered for
        `quiet` seconds (clients have noticed), at most `timeout` seconds; True when drained."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.in_flight and time.perf_counter_ns() - self.last_event_ns >= quiet * 1e9:
                return True
            await asyncio.sleep(min(0.01, quiet))
        return False


def failure_reason(error: BaseException | None, cancelled: bool = False) -> str:
    """Triton's failure reasons: REJECTED (queue full), CANCELED (client gone, deadline), BACKEND (the model
    failed), OTHER (bad input, not ready, ...)."""
    if isinstance(error, Overloaded):
        return "REJECTED"
    if cancelled or isinstance(error, (DeadlineExceeded, asyncio.CancelledError)):
        return "CANCELED"
    if error is not None and not isinstance(error, ServingError) and isinstance(error, Exception):
        return "BACKEND"
    return "OTHER"


def record(stats: ModelStats | None, ok: bool, error: BaseException | None, duration_ns: int,
           cancelled: bool = False) -> None:
    """One inference call ended: on the counters of the model it was charged to (none: not an inference call)."""
    if stats is not None:
        stats.record_request(None if ok else failure_reason(error, cancelled), duration_ns)
