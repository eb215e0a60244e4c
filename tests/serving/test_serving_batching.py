"""serving.backends.batching.DynamicBatcher in-process with a fake backend (no gRPC): callers get exactly their own rows,
concurrent requests share backend calls, a lone request never waits for the queue delay, large requests are
split, the queue bound answers Overloaded, failures and cancellations stay contained, close() fails what is
queued. Run: .venv/bin/python -m pytest tests/serving/test_serving_batching.py -q"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.backends.batching import BatchingConfig, DynamicBatcher
from serving.core.errors import LimitExceeded, NotReady, Overloaded
from serving.metrics import ModelStats


class FakeBackend:
    """Outputs that identify each input row: (row sums [N, 1], first three pixels [N, 3]); records batch sizes.
    `gate` (a threading.Event) holds every call until set; `delay` seconds per call."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.delay = delay
        self.gate = gate
        self.fail = fail
        self.batches: list[int] = []
        self.started = threading.Event()

    def __call__(self, images: np.ndarray):
        self.batches.append(len(images))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("backend exploded")
        flat = images.reshape(len(images), -1).astype(np.float32)
        return flat.sum(1, keepdims=True), flat[:, :3].copy()


def expected(images: np.ndarray):
    return FakeBackend()(images)


def make(backend, **config) -> DynamicBatcher:
    return DynamicBatcher(backend, BatchingConfig(**config), ModelStats("m", "1"), name="test")


def digits(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_concurrent_callers_get_exactly_their_own_rows_and_share_calls():
    backend = FakeBackend(delay=0.01)
    batcher = make(backend, max_batch_size=64, max_queue_delay_us=0)
    requests = [digits(1 + i % 5, seed=i) for i in range(40)]

    async def main():
        return await asyncio.gather(*(batcher.infer(x) for x in requests))

    results = run(main())
    for x, got in zip(requests, results):
        for a, b in zip(got, expected(x)):
            np.testing.assert_array_equal(a, b)
    assert sum(backend.batches) == sum(len(x) for x in requests)
    assert len(backend.batches) < len(requests) and max(backend.batches) > 5
    stats = batcher.stats
    assert stats.exec_count == len(backend.batches) and stats.inference_count == sum(backend.batches)
    batcher.close()


def test_requests_arriving_while_the_backend_is_busy_form_the_next_batch():
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    batcher = make(backend, max_batch_size=256, max_queue_delay_us=0)

    async def main():
        first = asyncio.ensure_future(batcher.infer(digits(1, 0)))
        await asyncio.sleep(0.01)  # the first request is in the backend
        assert backend.started.wait(30)
        rest = [asyncio.ensure_future(batcher.infer(digits(2, i))) for i in range(1, 11)]
        await asyncio.sleep(0.01)
        assert batcher.pending() == 10
        gate.set()
        await asyncio.gather(first, *rest)

    run(main())
    assert backend.batches == [1, 20]
    batcher.close()


# A queue delay no test outlives: a request that waited for it would never be answered (run() gives up after 30 s),
# so answers at all show that nothing waited for it, however fast or slow this machine is.
FOREVER_US = 10**12


def test_a_lone_request_does_not_wait_for_the_queue_delay():
    backend = FakeBackend()
    batcher = make(backend, max_batch_size=256, max_queue_delay_us=FOREVER_US)

    async def main():
        for i in range(5):
            await batcher.infer(digits(1, i))

    run(main())
    assert backend.batches == [1] * 5
    batcher.close()


def test_the_queue_delay_gathers_as_many_requests_as_the_last_batch_had():
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    batcher = make(backend, max_batch_size=256, max_queue_delay_us=FOREVER_US)

    async def main():
        # Batch 1: one request; 4 more arrive while it runs → batch 2 holds 4 (the backend was busy).
        first = asyncio.ensure_future(batcher.infer(digits(1, 0)))
        await asyncio.sleep(0.01)
        assert backend.started.wait(30)
        second = [asyncio.ensure_future(batcher.infer(digits(1, i))) for i in range(1, 5)]
        await asyncio.sleep(0.01)
        assert batcher.pending() == 4
        gate.set()
        await asyncio.gather(first, *second)
        # The backend is idle and the last batch had 4 requests: 4 staggered arrivals (each in a later turn of the
        # event loop) still share one call, released by the fourth arrival: the delay would outlive the test.
        third = []
        for i in range(4):
            third.append(asyncio.ensure_future(batcher.infer(digits(1, 10 + i))))
            await asyncio.sleep(0.02)
            assert backend.batches == [1, 4] or i == 3  # held for the others until the fourth has come
        await asyncio.gather(*third)

    run(main())
    assert backend.batches == [1, 4, 4]
    batcher.close()


def test_a_request_larger_than_the_max_batch_is_split_and_reassembled():
    backend = FakeBackend()
    batcher = make(backend, max_batch_size=4)
    x = digits(10, 1)
    got = run(batcher.infer(x))
    for a, b in zip(got, expected(x)):
        np.testing.assert_array_equal(a, b)
    assert backend.batches == [4, 4, 2]
    batcher.close()


def test_the_queue_bound_refuses_with_triton_words():
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    batcher = make(backend, max_batch_size=256, max_queue_size=3)

    async def main():
        running = asyncio.ensure_future(batcher.infer(digits(1, 0)))
        await asyncio.sleep(0.01)
        assert backend.started.wait(30)
        queued = [asyncio.ensure_future(batcher.infer(digits(1, i))) for i in range(1, 4)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="^Exceeds maximum queue size"):
            await batcher.infer(digits(1, 9))
        with pytest.raises(Overloaded):  # a split request needs room for all its chunks
            await batcher.infer(digits(600, 9))
        with pytest.raises(LimitExceeded, match="more than the queue holds"):  # 4 chunks never fit in 3
            await batcher.infer(digits(1000, 9))
        gate.set()
        await asyncio.gather(running, *queued)
        return await batcher.infer(digits(1, 5))  # room again

    run(main())
    batcher.close()


def test_without_batching_every_request_is_its_own_call():
    backend = FakeBackend(delay=0.005)
    batcher = make(backend, max_batch_size=4, enabled=False)
    requests = [digits(3, i) for i in range(8)] + [digits(9, 99)]

    async def main():
        return await asyncio.gather(*(batcher.infer(x) for x in requests))

    for x, got in zip(requests, run(main())):
        np.testing.assert_array_equal(got[0], expected(x)[0])
    assert sorted(backend.batches) == sorted([3] * 8 + [4, 4, 1])
    batcher.close()


def test_a_backend_failure_reaches_every_caller_of_the_batch_and_the_next_batch_works():
    backend = FakeBackend(fail=True)
    batcher = make(backend, max_batch_size=16)

    async def main():
        results = await asyncio.gather(*(batcher.infer(digits(1, i)) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        backend.fail = False
        return await batcher.infer(digits(2, 7))

    got = run(main())
    np.testing.assert_array_equal(got[0], expected(digits(2, 7))[0])
    batcher.close()


def test_a_cancelled_caller_is_skipped():
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    batcher = make(backend, max_batch_size=16)

    async def main():
        first = asyncio.ensure_future(batcher.infer(digits(1, 0)))
        await asyncio.sleep(0.01)
        assert backend.started.wait(30)
        gone = asyncio.ensure_future(batcher.infer(digits(5, 1)))
        kept = asyncio.ensure_future(batcher.infer(digits(2, 2)))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        await asyncio.gather(first, kept)

    run(main())
    assert backend.batches == [1, 2]
    batcher.close()


def test_close_fails_queued_requests_and_refuses_new_ones():
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    batcher = make(backend, max_batch_size=16)

    async def main():
        running = asyncio.ensure_future(batcher.infer(digits(1, 0)))
        await asyncio.sleep(0.01)
        assert backend.started.wait(30)
        queued = asyncio.ensure_future(batcher.infer(digits(1, 1)))
        await asyncio.sleep(0)
        threading.Timer(0.05, gate.set).start()
        batcher.close()  # waits for the running call
        await asyncio.sleep(0)
        with pytest.raises(NotReady):
            await queued
        with pytest.raises(NotReady):
            await batcher.infer(digits(1, 2))
        return await running

    run(main())


def test_a_backend_returning_the_wrong_number_of_rows_fails_the_batch():
    batcher = make(lambda x: (np.zeros((len(x) + 1, 1), np.float32),), max_batch_size=8)
    with pytest.raises(RuntimeError, match="rows for 2 images"):
        run(batcher.infer(digits(2, 0)))
    batcher.close()


class StepClock:
    """A clock the test sets: each backend call takes `step` ns of it, whatever the machine's speed."""

    def __init__(self, step: int) -> None:
        self.step, self.now, self.calls = step, 0, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls % 2 == 0:  # a call's end: the batch took `step`
            self.now += self.step
        return self.now


class ThreadRecordingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def __call__(self, images):
        self.threads.append(threading.get_ident())
        return super().__call__(images)


def _one_at_a_time(batcher, count: int) -> list:
    async def main():
        return [await batcher.infer(digits(1, seed=i)) for i in range(count)], threading.get_ident()

    return run(main())


def test_cheap_batches_run_on_the_event_loop_after_the_first_few():
    from serving.backends.batching import INLINE_AFTER

    backend = ThreadRecordingBackend()
    batcher = DynamicBatcher(backend, BatchingConfig(inline_below_us=100), ModelStats("m", "1"), name="test",
                             clock=StepClock(step=20_000))  # 20 us a batch
    results, loop_thread = _one_at_a_time(batcher, INLINE_AFTER + 6)
    for i, got in enumerate(results):
        for a, b in zip(got, expected(digits(1, seed=i))):
            np.testing.assert_array_equal(a, b)
    assert loop_thread not in backend.threads[:INLINE_AFTER]  # measured in the worker first
    assert backend.threads[INLINE_AFTER:] == [loop_thread] * 6 and batcher.inline()
    assert batcher.stats.exec_count == INLINE_AFTER + 6
    batcher.close()


def test_batches_slower_than_the_line_stay_in_the_worker_and_zero_turns_inline_off():
    for inline_below_us, step in ((100, 500_000), (0, 1)):  # 500 us batches; or inline off with 1 ns batches
        backend = ThreadRecordingBackend()
        batcher = DynamicBatcher(backend, BatchingConfig(inline_below_us=inline_below_us), ModelStats("m", "1"),
                                 name="test", clock=StepClock(step=step))
        _, loop_thread = _one_at_a_time(batcher, 12)
        assert loop_thread not in backend.threads and not batcher.inline()
        batcher.close()


def test_an_inline_batch_that_fails_fails_only_its_callers_and_the_next_one_is_served():
    backend = FakeBackend()
    batcher = DynamicBatcher(backend, BatchingConfig(inline_below_us=100), ModelStats("m", "1"), name="test",
                             clock=StepClock(step=1_000))

    async def main():
        for i in range(6):
            await batcher.infer(digits(1, seed=i))
        assert batcher.inline()
        backend.fail = True
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.infer(digits(2, seed=1))
        backend.fail = False
        return await asyncio.gather(*(batcher.infer(digits(1, seed=i)) for i in range(20)))

    results = run(main())
    for i, got in enumerate(results):
        for a, b in zip(got, expected(digits(1, seed=i))):
            np.testing.assert_array_equal(a, b)
    # 6 one by one, the failed one not counted, then the first of the 20 at once (a lone call: _run_now) and the 19
    # that came in its turn of the loop as one batch
    assert batcher.stats.exec_count == 8 and backend.batches[-2:] == [1, 19]
    batcher.close()


def test_batches_of_concurrent_callers_stay_in_the_worker_even_when_cheap():
    """Under concurrent load the model's run in the thread is when the next batch gathers: only a lone caller's
    batch runs inline."""
    backend = ThreadRecordingBackend()
    batcher = DynamicBatcher(backend, BatchingConfig(inline_below_us=100), ModelStats("m", "1"), name="test",
                             clock=StepClock(step=1_000))

    async def main():
        for i in range(6):  # a lone client: inline after the first few
            await batcher.infer(digits(1, seed=i))
        lone = list(backend.threads)
        together = await asyncio.gather(*(batcher.infer(digits(1, seed=i)) for i in range(8)))
        return lone, together, threading.get_ident()

    lone, together, loop_thread = run(main())
    assert loop_thread in lone and batcher.inline()
    # the first of the 8 found the batcher idle and ran at once; the 7 that came in the same turn batched, in the worker
    assert backend.batches[-2:] == [1, 7] and backend.threads[-2] == loop_thread != backend.threads[-1]
    for i, got in enumerate(together):
        for a, b in zip(got, expected(digits(1, seed=i))):
            np.testing.assert_array_equal(a, b)
    batcher.close()


def test_a_lone_cheap_call_runs_within_submit_and_calls_in_its_turn_still_batch():
    """Once batches are cheap and the client is alone, submit() runs the call at once (a future already done: no
    queue entry, no loop turn); a call made in the same turn of the loop, or while a batch is queued, queues as
    before, and everyone gets their own rows."""
    from serving.backends.batching import INLINE_AFTER

    backend = ThreadRecordingBackend()
    batcher = DynamicBatcher(backend, BatchingConfig(inline_below_us=100), ModelStats("m", "1"), name="test",
                             clock=StepClock(step=1_000))

    async def main():
        for i in range(INLINE_AFTER + 2):  # a lone client, each call in its own turn
            await batcher.infer(digits(1, seed=i))
            await asyncio.sleep(0)
        calls_before = batcher.stats.exec_count
        first = batcher.submit(digits(1, seed=50))
        done_at_once = first.done() and batcher.stats.exec_count == calls_before + 1
        second = batcher.submit(digits(1, seed=51))  # the same turn: queued, not run
        queued = not second.done() and batcher.pending() == 1
        results = [await first, await second]
        await asyncio.sleep(0)
        third = batcher.submit(digits(1, seed=52))  # alone again, in a later turn
        return done_at_once, queued, results + [await third], third.done(), threading.get_ident()

    done_at_once, queued, results, third_done, loop_thread = run(main())
    assert done_at_once and queued and third_done
    for seed, got in zip((50, 51, 52), results):
        for a, b in zip(got, expected(digits(1, seed=seed))):
            np.testing.assert_array_equal(a, b)
    assert backend.threads[-3:] == [loop_thread] * 3  # all cheap and lone: on the event loop
    assert batcher.stats.exec_count == INLINE_AFTER + 2 + 3
    batcher.close()
