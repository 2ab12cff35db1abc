"""score-batch's spine reader process: chunks in order, errors in their place, bounded."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pytest

from server.batch_scoring.feeder import SpineFeeder
from server.batch_scoring.ipc_files import read_ipc, write_ipc
from server.batch_scoring.spine import SpineError


def _chunks(n: int, rows: int = 1000, fail_at: int | None = None) -> Iterator[tuple[int, pa.Table]]:
    for i in range(n):
        if i == fail_at:
            raise SpineError(f"spine column 'card_id', row {i * rows + 1}: refused by the test")
        table = pa.table({"x": pa.array(range(i * rows, (i + 1) * rows), pa.int64())})
        yield i * rows + 1, table.append_column("pid", pa.array([os.getpid()] * rows))


def test_chunks_arrive_in_order_read_by_another_process(tmp_path: Path) -> None:
    got = []
    with SpineFeeder(_chunks(5), tmp_path) as feeder:
        for first, path in feeder:
            table = read_ipc(path)
            got.append((first, table.column("x")[0].as_py()))
            assert set(table.column("pid").to_pylist()) != {os.getpid()}  # read elsewhere
    assert got == [(1, 0), (1001, 1000), (2001, 2000), (3001, 3000), (4001, 4000)]


def test_an_error_is_raised_after_the_chunks_before_it(tmp_path: Path) -> None:
    seen = []
    with (
        pytest.raises(SpineError, match="row 2001: refused by the test"),
        SpineFeeder(_chunks(5, fail_at=2), tmp_path) as feeder,
    ):
        for first, _ in feeder:
            seen.append(first)
    assert seen == [1, 1001]


def test_reads_ahead_only_within_its_budget(tmp_path: Path) -> None:
    size = write_ipc(next(_chunks(1))[1], tmp_path / "probe.arrow")
    (tmp_path / "probe.arrow").unlink()
    budget = 3 * size  # three chunk files ahead, then it waits for the parent
    with SpineFeeder(_chunks(20), tmp_path, budget_bytes=budget) as feeder:
        time.sleep(1.0)  # plenty of time to read everything, were it unbounded
        assert len(list(tmp_path.glob("in-*.arrow"))) == 3
        taken = 0
        for _, path in feeder:
            path.unlink()
            taken += 1
            if taken == 5:
                time.sleep(0.5)
                assert len(list(tmp_path.glob("in-*.arrow"))) == 3  # refilled, no more
        assert taken == 20


def test_stopping_early_ends_the_reader(tmp_path: Path) -> None:
    with SpineFeeder(_chunks(1000), tmp_path, budget_bytes=1) as feeder:
        process = feeder._process
        next(iter(feeder))
    assert not process.is_alive()
    assert process.exitcode is not None
