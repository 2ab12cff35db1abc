"""The C allocator of a server process: large buffers returned at once, free heap released.

Why: glibc's malloc raises its mmap threshold to the largest block freed so far (up to
32 MiB), so after one 4 MiB request every later large buffer (request bytes, parsed
strings, ONNX inputs) comes from the heap, and small long-lived objects placed after
them pin that memory: the fuzz figure grew the RSS by ~90% (bench/RESULTS.md "Fuzz")
with no Python object kept (tracemalloc diff: a few hundred KiB). A fixed threshold keeps
large blocks mmapped (unmapped on free); ``malloc_trim`` hands free heap pages (also in
the middle of the heap, and of every thread's arena) back to the kernel.

On anything but glibc both are no-ops.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import platform
import time

__all__ = ["MMAP_THRESHOLD_BYTES", "fix_mmap_threshold", "release_free_memory", "trim_periodically"]

logger = logging.getLogger(__name__)

#: Blocks at least this large are mmapped and unmapped on free (glibc's initial default,
#: kept fixed instead of following the largest block freed).
MMAP_THRESHOLD_BYTES = 128 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (and trim threshold) at ``threshold``; True when set."""
    libc = _libc()
    if libc is None:
        return False
    mmap_ok: bool = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    trim_ok: bool = libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1
    return mmap_ok and trim_ok


def release_free_memory() -> bool:
    """``malloc_trim(0)``: free heap pages of every arena back to the kernel; True when
    some were released."""
    libc = _libc()
    released: bool = libc is not None and libc.malloc_trim(0) == 1
    return released


async def trim_periodically(interval_s: float) -> None:
    """Release free heap memory every ``interval_s`` (off the event loop) until cancelled."""
    if _libc() is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        released = await asyncio.to_thread(release_free_memory)
        logger.debug(
            "malloc_trim",
            extra={"released": released, "ms": round((time.perf_counter() - started) * 1e3, 2)},
        )
