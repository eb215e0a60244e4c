"""Giving freed memory back to the operating system (glibc), so a server's RSS returns to idle after large requests.

Two glibc behaviours kept the memory of finished requests resident (measured: 124 MiB idle → 278 MiB after eight
requests of four 4000x4000 WebPs; 477 MiB after a flood of refused requests):
- the mmap threshold adapts upwards each time a large block is freed (up to 32 MiB), so later image buffers come
  from the heap, where freed memory stays mapped; `fix_mmap_threshold` pins it at 128 KiB (buffers above it are
  mapped on their own and unmapped when freed);
- freed chunks below it (message slices, protobuf parsing, gRPC's buffers) stay in each thread's arena:
  `trim_when_grown` runs malloc_trim(0) when the resident set has grown (measured after a refused flood: heap
  105 → 51 MiB).
Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os

__all__ = ["fix_mmap_threshold", "trim", "trim_when_grown", "resident_bytes", "MMAP_THRESHOLD"]

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Allocations of `threshold` bytes or more get their own mapping, returned on free; True when set."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1)


def trim() -> bool:
    """malloc_trim(0): release the free pages of every arena; True when some memory was released."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))


def resident_bytes() -> int:
    """This process's resident set size (/proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


async def trim_when_grown(period: float = 1.0, slack: int = 8 << 20, max_period: float = 32.0, release=trim,
                          resident=resident_bytes) -> None:
    """Run until cancelled: every `period` seconds, while the resident set is more than `slack` above the lowest it
    has been, one malloc_trim in a worker thread. It watches memory rather than calls because gRPC frees what it
    held for calls that never reach a handler too (a message over --max-message-bytes is read whole before it is
    refused: eight of 100 MB left 456 MiB resident until trimmed). When a trim gives back little (the memory is in
    use), the next look waits twice as long, up to `max_period`; growth brings it back to `period`. An idle server
    at its floor does nothing but read statm."""
    loop = asyncio.get_running_loop()
    floor = resident()
    wait = period
    while True:
        await asyncio.sleep(wait)
        now = resident()
        if now <= floor + slack:
            floor, wait = min(floor, now), period
            continue
        await loop.run_in_executor(None, release)
        after = resident()
        floor = min(floor, after)
        wait = period if now - after >= slack else min(wait * 2, max_period)
