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


def test_a_trim_follows_growth_only():
    """Readings in the order trim_when_grown takes them: the floor at start, one per period, and one more right
    after each trim; growth within `slack` of the previous reading is left alone."""
    readings = [100, 100, 105, 200, 120, 121, 400, 130, 131]
    trims: list[int] = []

    def resident() -> int:
        if not readings:
            raise _Done
        resident.last = readings.pop(0)
        return resident.last

    def release() -> bool:
        trims.append(resident.last)
        return True

    with pytest.raises(_Done):
        asyncio.run(malloc.trim_when_grown(period=0, slack=50, release=release, resident=resident))
    assert trims == [200, 400]
