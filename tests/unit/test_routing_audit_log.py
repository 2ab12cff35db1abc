"""The file routing store's audit log: read backwards from its end (a large log costs
what the listing returns, not the whole file) and rotated at a size bound."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

from server.routing.state import AuditEntry
from server.routing.store import FileRoutingStore, tail_lines


def _entry(i: int, endpoint: str = "fraud") -> AuditEntry:
    return AuditEntry(
        float(i), f"admin{i}", "peer", endpoint, "promote", "r", "applied", revision=i
    )


def _sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.glob("*.jsonl")}


def test_tail_lines_is_the_reversed_file_for_any_block_size(tmp_path: Path) -> None:
    rng = random.Random(7)
    lines = [b"x" * rng.randrange(0, 300) + str(i).encode() for i in range(300)]
    path = tmp_path / "log"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    for block in (3, 64, 4096, 1 << 20):
        assert list(tail_lines(path, block)) == lines[::-1], block
    assert list(tail_lines(tmp_path / "missing")) == []


async def test_a_large_log_is_read_from_its_tail(tmp_path: Path) -> None:
    store = FileRoutingStore(tmp_path / ".routing.json", audit_max_bytes=1 << 30)
    padding = "p" * 2500
    line_count = 20_000  # ~50 MB: reading it whole would allocate at least that
    with (tmp_path / ".routing.audit.jsonl").open("w") as out:
        for i in range(line_count):
            entry = _entry(i, "other" if i % 2 else "fraud")
            out.write(f'{i}-0 {entry.to_json()[:-1]},"pad":"{padding}"}}\n')
    size = (tmp_path / ".routing.audit.jsonl").stat().st_size
    assert size > 40 * 1024 * 1024
    tracemalloc.start()
    try:
        newest = await store.audit(None, 10)
        of_fraud = await store.audit("fraud", 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.actor for e in newest] == [
        f"admin{i}" for i in range(line_count - 1, line_count - 11, -1)
    ]
    assert [e.revision for e in of_fraud] == [19_998, 19_996, 19_994, 19_992, 19_990]
    assert peak < 2 * 1024 * 1024, peak  # a few blocks, not the file


async def test_the_log_is_rotated_at_its_size_bound_and_listed_across_files(tmp_path: Path) -> None:
    bound = 4 * 1024
    store = FileRoutingStore(tmp_path / ".routing.json", audit_max_bytes=bound)
    one = len(_entry(0).to_json()) + 30
    for i in range(300):  # ~ 20 x the bound
        await store.append_audit(_entry(i))
    current = tmp_path / ".routing.audit.jsonl"
    previous = tmp_path / ".routing.audit.1.jsonl"
    assert _sizes(tmp_path) == {
        current.name: _sizes(tmp_path)[current.name],
        previous.name: _sizes(tmp_path)[previous.name],
    }  # one previous generation, no more
    assert max(_sizes(tmp_path).values()) < bound + one
    kept = len(list(tail_lines(current))) + len(list(tail_lines(previous)))
    listed = await store.audit(None, 1000)
    # Newest first, contiguous across the rotation boundary, everything both files keep.
    assert [e.revision for e in listed] == list(range(299, 299 - kept, -1))
    assert len(listed) == kept > len(list(tail_lines(current)))
