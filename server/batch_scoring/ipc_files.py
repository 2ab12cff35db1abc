"""Chunks handed between score-batch processes as Arrow IPC files (nothing big pickled).

Written once, uncompressed, and memory-mapped when read: the reader gets the columns
without a copy.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.ipc as ipc  # type: ignore[import-untyped, unused-ignore]

__all__ = ["read_ipc", "write_ipc"]


def write_ipc(table: pa.Table, path: Path) -> int:
    """``table`` as an Arrow IPC file (uncompressed: read back memory-mapped); bytes."""
    with ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)
    return path.stat().st_size


def read_ipc(path: Path) -> pa.Table:
    """An IPC file written by :func:`write_ipc`, memory-mapped (no copy)."""
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()
