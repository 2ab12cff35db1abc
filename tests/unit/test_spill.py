"""SpillFile: order, budget, consume-after-ack, recovery of a torn tail, the directory lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.records.spill import SpillFile, SpillLocked, SpillRecord


def records(n: int, start: int = 0, size: int = 10) -> list[SpillRecord]:
    return [
        SpillRecord(f"t{i % 2}", None if i % 3 == 0 else f"k{i}".encode(), bytes([i % 256]) * size)
        for i in range(start, start + n)
    ]


def test_records_come_back_in_order_across_segments_and_reopen(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    written = records(40)
    assert spill.append(written) == 40
    assert len(list(tmp_path.glob("*.spill"))) > 3  # rolled over segments
    assert spill.peek(100, 1 << 20) == written
    spill.consume(15)
    assert spill.pending == 25
    assert spill.peek(5, 1 << 20) == written[15:20]
    spill.close()
    again = SpillFile(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    assert again.pending == 25  # the cursor survived
    assert again.peek(100, 1 << 20) == written[15:]
    assert again.append(records(3, start=40)) == 3
    assert again.peek(100, 1 << 20) == written[15:] + records(3, start=40)
    again.consume(28)
    assert again.pending == 0 and again.bytes == 0
    assert list(tmp_path.glob("*.spill")) == []  # trimmed once acknowledged
    again.close()


def test_consuming_nothing_touches_no_file(tmp_path: Path) -> None:
    # The durable sink consumes after every round, most of them with nothing spilled.
    spill = SpillFile(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    spill.consume(0)
    assert spill.append(records(3)) == 3
    files = sorted(p.name for p in tmp_path.iterdir())
    spill.consume(0)
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no cursor written
    assert spill.pending == 3 and spill.peek(10, 1 << 20) == records(3)
    spill.consume(1)
    assert (tmp_path / "cursor").exists() and spill.pending == 2
    spill.close()


def test_budget_refuses_past_max_bytes(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path, max_bytes=1000, segment_bytes=400)
    written = spill.append(records(100, size=30))
    assert 0 < written < 100
    assert spill.bytes <= 1000
    assert not spill.has_room(100)
    spill.consume(written)
    assert spill.has_room(100)
    spill.close()


def test_torn_tail_is_tolerated_and_truncated(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 20)
    spill.append(records(5))
    spill.close()
    (segment,) = tmp_path.glob("*.spill")
    whole = segment.stat().st_size
    with segment.open("ab") as file:
        file.write(SpillRecord("t", b"k", b"v" * 50).encoded()[:20])  # a crash mid-write
    again = SpillFile(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 20)
    assert again.pending == 5
    assert segment.stat().st_size == whole
    assert again.peek(10, 1 << 20) == records(5)
    again.close()


def test_corrupt_frame_ends_the_segment(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 20)
    spill.append(records(5))
    spill.close()
    (segment,) = tmp_path.glob("*.spill")
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # flip a byte of the last record's value: its CRC fails
    segment.write_bytes(bytes(data))
    again = SpillFile(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 20)
    assert again.peek(10, 1 << 20) == records(4)
    again.close()


def test_one_process_owns_a_directory(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path, max_bytes=1000, segment_bytes=400)
    with pytest.raises(SpillLocked, match="in use"):
        SpillFile(tmp_path, max_bytes=1000, segment_bytes=400)
    spill.close()
    SpillFile(tmp_path, max_bytes=1000, segment_bytes=400).close()


def test_sync_fsyncs_without_losing_the_writer(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    spill.append(records(20))
    spill.sync()  # closes rotated segments' handles, keeps the current writer
    spill.append(records(2, start=20))
    assert spill.peek(100, 1 << 20) == records(22)
    spill.close()
