"""Dynamic batching: requests of concurrent callers coalesced into one backend call, off the event loop.

    batcher = DynamicBatcher(backend.infer, BatchingConfig(max_batch_size=256, max_queue_delay_us=500,
                                                           max_queue_size=1024), stats)
    logits, embedding = await batcher.infer(uint8_images)   # [n, 1, 28, 28] → this caller's rows only

One queue and one worker thread per model (one copy of the model per device). Everything but the backend
call runs on the event loop thread, so the queue needs no locks and a request costs no thread hop of its
own: per batch there is one hand-off to the worker and one back (call_soon_threadsafe).

Scheduling, designed so that batching costs nothing when the server is idle:
- Backend idle: the queue is dispatched on the next turn of the event loop (call_soon, no timer), so a lone
  request waits for nothing while every request that arrived in the same turn joins it.
- Backend busy: requests queue up; when the running batch finishes, everything queued (up to
  max_batch_size images, oldest first) goes to the backend at once. Under load batches therefore grow by
  themselves to what arrived during one execution, with no delay setting at all.
- max_queue_delay_us (Triton's max_queue_delay_microseconds) only applies when waiting can help: when the
  backend is idle and fewer requests are queued than the previous batch carried (so more callers are
  probably on their way back), the batch waits until that many have arrived, max_batch_size images are
  queued, or the oldest request has waited max_queue_delay_us, whichever comes first. A lone client (whose
  batches hold one request) never waits.
- A request larger than max_batch_size is split into max_batch_size chunks (each its own queue entry) and
  its rows are put back together in order. Results go to each caller as views of the batch output, rows
  offset..offset+n, in queue order.
- More than max_queue_size queue entries (0: unbounded) → serving.core.errors.Overloaded ("Exceeds maximum queue
  size", UNAVAILABLE as Triton answers); a request that alone splits into more chunks than the queue holds
  could never be taken, so it gets LimitExceeded (RESOURCE_EXHAUSTED, not worth retrying). A caller that goes away (cancelled) while queued is skipped.
- enabled=False (--no-dynamic-batching): each request (or max_batch_size chunk) is its own backend call,
  handed to the worker thread's FIFO at once; max_queue_size bounds the calls waiting there. For
  comparisons and for models that must see one request at a time.

A lone request's cheap batch runs on the event loop itself (inline_below_us, --inline-below-us). The hand-off to
the worker and back costs the event loop a thread wake-up, a self-pipe write and read and two futures per batch,
tens of microseconds of CPU: more than a one-matmul model, or this net on a GPU, spends computing a small batch.
So when the backend's recent batches took less than inline_below_us each (a moving average of their measured
time, started after the first few batches, which run in the worker), and the batch holds one request, as did the
one before it (a lone client), the batch runs inline. Under concurrent load it stays in the worker: there the
model's run in the thread is when the next batch gathers, and inlining those batches made them smaller and cost
more CPU per request (BENCHMARKS.md, "Serving overhead"). After an inline batch the next one is dispatched on the
loop's next turn, so calls that arrived in the meantime are read first. When such a request finds the batcher
idle (nothing queued, running or scheduled), it runs at once within submit(), which hands back a future already
done: the batch it would have been anyway, without the queue entry, the dispatch callback and a turn of the loop
(in-process 31.9 → 21.8 µs per call on the one-matmul model, `python -m bench.handler_cpu`). Calls arriving in the
same turn as such a call are not alone: they queue and batch as usual.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from concurrent.futures import Future as WorkerFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import numpy as np

from serving.core.errors import LimitExceeded, NotReady, Overloaded
from serving.metrics import ModelStats

__all__ = ["BatchingConfig", "DynamicBatcher"]

Outputs = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 256
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024  # queue entries; 0 = unbounded
    enabled: bool = True
    inline_below_us: int = 0  # run batches on the event loop while they average less than this (0: never)


INLINE_AFTER = 4  # batches measured in the worker before one may run inline
INLINE_SMOOTHING = 0.125  # weight of the newest batch in the moving average of execution times


class _Entry:
    __slots__ = ("images", "size", "future", "enqueued_ns")

    def __init__(self, images: np.ndarray, future: asyncio.Future) -> None:
        self.images = images
        self.size = len(images)
        self.future = future
        self.enqueued_ns = time.perf_counter_ns()


class DynamicBatcher:
    def __init__(self, infer: Callable[[np.ndarray], Outputs], config: BatchingConfig, stats: ModelStats,
                 name: str = "model", clock: Callable[[], int] = time.perf_counter_ns) -> None:
        """infer: the backend call, uint8 [N, 1, 28, 28] → arrays with N rows; runs in the worker thread (or inline,
        see the module's docstring). clock: nanoseconds, what execution times are measured with."""
        if config.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {config.max_batch_size}")
        self.config = config
        self.stats = stats
        self._infer = infer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._delay_ns = config.max_queue_delay_us * 1000 if config.enabled else 0
        self._queue: deque[_Entry] = deque()
        self._queued_images = 0
        self._running = False  # a batch is in the worker thread
        self._outstanding = 0  # without batching: calls handed to the worker and not finished
        self._scheduled = False  # a dispatch is pending (next loop turn, or a delay timer)
        self._timer: asyncio.TimerHandle | None = None
        self._expected = 1  # requests in the previous batch: how many callers may be on their way back
        self._clock = clock
        self._inline_below_ns = config.inline_below_us * 1000
        self._measured = 0  # batches executed so far
        self._average_ns = 0.0  # moving average of their execution times
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ran_this_turn = False  # a call ran at once (_run_now) in the current turn of the event loop
        self._closed = False

    def pending(self) -> int:
        """Queue entries waiting for the backend (not counting the running batch)."""
        return len(self._queue) if self.config.enabled else max(0, self._outstanding - 1)

    def _publish(self) -> None:
        """The queue length into the model's metrics (a gauge read at scrape time), after every change."""
        self.stats.pending = self.pending()

    async def infer(self, images: np.ndarray) -> Outputs:
        """uint8 [n, 1, 28, 28] (n >= 1) → the backend's outputs for these n rows, computed in some batch."""
        return await self.submit(images)

    def submit(self, images: np.ndarray) -> Awaitable[Outputs]:
        """infer() without its coroutine: queue the images now (on the event loop thread) and return what to await.
        The hot paths await this directly: each coroutine frame between a handler and the batch's future is one
        more frame to resume when the batch ends, per request."""
        limit = self.config.max_batch_size
        if len(images) <= limit:
            if self._expected == 1 and not (self._queue or self._running or self._scheduled or self._closed
                                            or self._ran_this_turn) and self.config.enabled and self.inline():
                return self._run_now(images)  # a lone client's cheap batch: no queue, no loop turn
            return self._put((images,))[0]
        return self._gather(self._put([images[i:i + limit] for i in range(0, len(images), limit)]))

    def _run_now(self, images: np.ndarray) -> asyncio.Future:
        """The batch of one request, run within the caller's call: what the next loop turn would have dispatched
        alone anyway (nothing queued or running, and the last batch held one request), without the queue entry, the
        dispatch callback and the turn of the loop in between. Returns a future already done."""
        future = self._loop.create_future()
        # Calls that reach submit() later in this same turn of the loop came together with this one: they queue and
        # batch (and the batch's size, in _expected, keeps the next ones queuing while callers come together).
        self._ran_this_turn = True
        self._loop.call_soon(self._turn_over)
        try:
            outputs, start, end = self._execute((images,))
        except Exception as exc:  # the caller gets it, as from a batch
            future.set_exception(exc)
        else:
            future.set_result(outputs)
            self._record(len(images), 0, 1, start, end)
        return future

    def _turn_over(self) -> None:
        self._ran_this_turn = False

    def _record(self, images: int, queue_ns: int, requests: int, start: int, end: int) -> None:
        """A batch ran from start to end (ns): the model's metrics, and the moving average inline() reads."""
        self.stats.record_execution(images, queue_ns, requests, end - start)
        self._measured += 1
        self._average_ns += (end - start - self._average_ns) * (1.0 if self._measured == 1 else INLINE_SMOOTHING)

    @staticmethod
    async def _gather(futures: list[asyncio.Future]) -> Outputs:
        parts = await asyncio.gather(*futures)
        return tuple(np.concatenate(rows) for rows in zip(*parts))

    def _put(self, chunks: Sequence[np.ndarray]) -> list[asyncio.Future]:
        if self._closed:
            raise NotReady("the server is shutting down")
        size = self.config.max_queue_size
        if size and len(chunks) > size:  # could never fit, so retrying (what UNAVAILABLE invites) is pointless
            raise LimitExceeded(f"the request splits into {len(chunks)} batches of at most "
                                f"{self.config.max_batch_size} images, more than the queue holds for model "
                                f"'{self.stats.model}' (--max-queue-size {size}); send fewer images per request")
        if size and self.pending() + len(chunks) > size:
            raise Overloaded(f"Exceeds maximum queue size: {self.pending()} requests are queued for model "
                             f"'{self.stats.model}' (--max-queue-size {size}); retry later")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        futures = []
        for chunk in chunks:
            entry = _Entry(chunk, self._loop.create_future())
            futures.append(entry.future)
            if self.config.enabled:
                self._queue.append(entry)
                self._queued_images += entry.size
            else:
                self._outstanding += 1
                self._submit([entry])
        if self.config.enabled:
            self._kick()
        self._publish()
        return futures

    def _enough(self) -> bool:
        return len(self._queue) >= self._expected or self._queued_images >= self.config.max_batch_size

    def _kick(self) -> None:
        """After an enqueue: make sure a dispatch will happen (a finishing batch dispatches by itself)."""
        if self._running:
            return
        if self._timer is not None:
            if not self._enough():
                return
            self._timer.cancel()  # the batch filled up before its delay ran out
            self._timer = None
            self._scheduled = False
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        self._timer = None
        if self._running:
            return
        queue = self._queue
        while queue and queue[0].future.done():  # callers that went away while queued
            self._queued_images -= queue.popleft().size
        if not queue:
            self._publish()
            return
        if self._delay_ns and not self._enough():
            wait_ns = queue[0].enqueued_ns + self._delay_ns - time.perf_counter_ns()
            if wait_ns > 0:
                self._scheduled = True
                self._timer = self._loop.call_later(wait_ns / 1e9, self._dispatch)
                return
        limit = self.config.max_batch_size if self.config.enabled else 0
        entries: list[_Entry] = []
        images = 0
        while queue:
            entry = queue[0]
            if not entry.future.done():
                if entries and images + entry.size > limit:
                    break
                entries.append(entry)
                images += entry.size
            queue.popleft()
            self._queued_images -= entry.size
        if entries:
            self._running = True
            self._submit(entries)
        self._publish()

    def inline(self) -> bool:
        """Whether a lone request's batch may run on the event loop: recent batches were cheaper than the hop."""
        return self._measured >= INLINE_AFTER and self._average_ns < self._inline_below_ns

    def _submit(self, entries: list[_Entry]) -> None:
        arrays = [e.images for e in entries]
        if len(entries) == 1 and self._expected == 1 and self.inline():  # a lone client's cheap batch
            try:
                done = self._execute(arrays)
            except Exception as exc:  # every caller of this batch gets it, as from the worker
                self._finish(entries, None, exc, inline=True)
            else:
                self._finish(entries, done, None, inline=True)
            return
        job = self._pool.submit(self._execute, arrays)
        job.add_done_callback(functools.partial(self._from_worker, entries))

    def _execute(self, arrays: list[np.ndarray]) -> tuple[Outputs, int, int]:
        """One backend call on the concatenated batch (worker thread, or inline); returns (outputs, start_ns,
        end_ns)."""
        start = self._clock()
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        outputs = self._infer(batch)
        if any(len(o) != len(batch) for o in outputs):  # rows would go to the wrong callers
            raise RuntimeError(f"the backend returned {[len(o) for o in outputs]} rows for {len(batch)} images")
        return outputs, start, self._clock()

    def _from_worker(self, entries: list[_Entry], job: WorkerFuture) -> None:
        """The worker's done callback (worker thread, or close()'s): the outcome goes to the event loop."""
        done = error = None
        if job.cancelled():  # close() dropped it before it ran
            error = NotReady("the server is shutting down")
        else:
            error = job.exception()
            if error is None:
                done = job.result()
        try:
            self._loop.call_soon_threadsafe(self._finish, entries, done, error)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _finish(self, entries: list[_Entry], done: tuple[Outputs, int, int] | None, error: BaseException | None,
                inline: bool = False) -> None:
        """A batch ended: `done` (outputs, start_ns, end_ns), or `error` for every caller of the batch."""
        if not self.config.enabled:
            self._outstanding -= 1
        self._running = False
        if error is not None:  # the backend failed: every caller of this batch gets the error
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(error)
        else:
            outputs, start, end = done
            if len(entries) == 1:  # the batch is this caller's rows: no slicing
                entry = entries[0]
                if not entry.future.done():
                    entry.future.set_result(outputs)
                offset, queue_ns = entry.size, start - entry.enqueued_ns
            else:
                offset = queue_ns = 0
                for entry in entries:
                    if not entry.future.done():
                        end_row = offset + entry.size
                        entry.future.set_result(tuple([o[offset:end_row] for o in outputs]))
                    offset += entry.size
                    queue_ns += start - entry.enqueued_ns
            self._record(offset, queue_ns, len(entries), start, end)
        self._expected = len(entries)
        if self._queue and not self._scheduled:
            if inline:  # not from within this call: read what arrived meanwhile first, and never recurse
                self._scheduled = True
                self._loop.call_soon(self._dispatch)
            else:
                self._dispatch()
        self._publish()

    def close(self) -> None:
        """Refuse new requests, fail the queued ones (UNAVAILABLE), wait for the running batch. Call it on the
        event loop thread after the server stopped taking calls."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(NotReady("the server is shutting down"))
        self._queued_images = 0
        self._publish()
        self._pool.shutdown(wait=True, cancel_futures=True)
