"""Giving freed memory back (serving.malloc): the mmap threshold is pinned, malloc_trim is called only when the
resident set grew, and the server's memory returns to idle after a burst (fake clocks and fake RSS: no timing).
Run: .venv/bin/python -m pytest tests/serving/test_serving_malloc.py -q"""

from __future__ import annotations

import asyncio

import pytest

from serving import malloc


def test_pinning_the_mmap_threshold_and_trimming_work_on_this_libc():
    if malloc._libc() is None:
        pytest.skip("not glibc: nothing to pin or trim")
    assert malloc.fix_mmap_threshold() is True
    malloc.trim()  # returns whether anything was released; it must simply not fail
    assert malloc.resident_bytes() > 0


class _Done(Exception):
    pass


def _run(readings: list[int], **kwargs) -> tuple[list[int], list[float]]:
    """trim_when_grown over scripted resident-set readings (the floor at start, one per look, one more right after
    each trim); returns the readings that led to a trim and the waits between looks."""
    trims: list[int] = []
    waits: list[float] = []

    def resident() -> int:
        if not readings:
            raise _Done
        resident.last = readings.pop(0)
        return resident.last

    def release() -> bool:
        trims.append(resident.last)
        return True

    real_sleep = asyncio.sleep

    async def sleep(seconds):
        waits.append(seconds)
        await real_sleep(0)

    asyncio.sleep = sleep
    try:
        with pytest.raises(_Done):
            asyncio.run(malloc.trim_when_grown(release=release, resident=resident, **kwargs))
    finally:
        asyncio.sleep = real_sleep
    return trims, waits


def test_a_trim_follows_growth_and_repeats_until_the_floor_is_back():
    # floor 100; 105 is within the slack; 200 → trimmed to 160 (still above): trimmed again at 160 → 100.
    trims, waits = _run([100, 105, 200, 160, 160, 100, 101], period=1, slack=50)
    assert trims == [200, 160]
    assert waits == [1, 1, 2, 1, 1]  # 200 → 160 gave back less than the slack: the next look waits longer


def test_memory_in_use_backs_the_trims_off():
    # 300 stays 300 after each trim (live memory): the looks space out 1 → 2 → 4, and growth resets them.
    trims, waits = _run([100, 300, 300, 300, 300, 300, 300, 500, 200], period=1, slack=50, max_period=4)
    assert trims == [300, 300, 300, 500]
    assert waits == [1, 2, 4, 4, 1]
