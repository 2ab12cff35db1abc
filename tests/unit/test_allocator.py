"""server.allocator: large freed buffers do not stay in the RSS (glibc)."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from server import allocator

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc allocator")

REPO_ROOT = Path(__file__).resolve().parents[2]

#: A fresh interpreter allocates 3 x 48 blocks of 1 MiB (pages touched), each followed by
#: a small long-lived object, frees the blocks and prints the MiB its RSS kept. With
#: glibc's default, the first free raises the mmap threshold past 1 MiB, so later blocks
#: come from the heap and the small objects pin it: ~50 MiB kept.
CHILD = """
import sys
from pathlib import Path
from server.allocator import fix_mmap_threshold, release_free_memory

def rss_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

mode = sys.argv[1]
if mode == "fix":
    assert fix_mmap_threshold()
before = rss_kib()
pinned = []
for _ in range(3):
    big = []
    for i in range(48):
        big.append(bytearray(1 << 20))
        pinned.append(bytes(600 + i))
    del big
if mode == "trim":
    release_free_memory()
print((rss_kib() - before) // 1024)
"""


def _kept_mib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(out.stdout)


def test_a_fixed_mmap_threshold_returns_freed_large_buffers() -> None:
    assert _kept_mib("fix") < 8  # default allocator: ~50 MiB


def test_trimming_releases_free_heap_pinned_by_small_objects() -> None:
    assert _kept_mib("trim") < 8  # without malloc_trim: ~50 MiB


async def test_the_server_trims_periodically(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []

    def release() -> bool:
        calls.append(1.0)
        return True

    monkeypatch.setattr(allocator, "release_free_memory", release)
    task = asyncio.create_task(allocator.trim_periodically(0.01))
    await asyncio.sleep(0.3)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert len(calls) >= 3
