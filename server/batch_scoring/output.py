"""The output Parquet file: written under a temporary name, renamed when complete.

A failed or interrupted run leaves no file at the output path (the temporary one is
removed on failure); only text columns are dictionary encoded. The lineage (model,
version, sha256, training metadata, feature source and inputs, the command) is stored
as JSON under the file metadata key ``streamscore.lineage``; a comparison's summary
under ``streamscore.comparison``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

__all__ = ["COMPARISON_KEY", "LINEAGE_KEY", "OutputFile"]

LINEAGE_KEY: Final = "streamscore.lineage"
COMPARISON_KEY: Final = "streamscore.comparison"


class OutputFile:
    """Append chunks in order; ``commit`` renames the finished file into place."""

    def __init__(self, path: Path, lineage: dict[str, Any]) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._lineage = lineage
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append one chunk's rows."""
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            schema = table.schema.with_metadata({LINEAGE_KEY: json.dumps(self._lineage)})
            self._writer = pq.ParquetWriter(self.tmp, schema, use_dictionary=_texts(schema))
        self._writer.write_table(table.replace_schema_metadata(self._writer.schema.metadata))
        self.rows += table.num_rows

    def commit(self, extra: dict[str, Any] | None = None) -> None:
        """Close and rename into place (the engines write at least one, maybe empty, chunk)."""
        if self._writer is None:
            raise RuntimeError("nothing was written")
        if extra:
            self._writer.add_key_value_metadata({k: json.dumps(v) for k, v in extra.items()})
        self._writer.close()
        self._writer = None
        self.tmp.replace(self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is not None:
            self.abort()


def _texts(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary encoding: text (ids, versions). Scores and feature values
    are nearly all distinct: trying a dictionary on them was ~3/4 of the write time."""
    return [
        f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]


def read_metadata(path: Path, key: str) -> Any:
    """A JSON value stored under ``key`` in a Parquet file's metadata."""
    metadata = pq.ParquetFile(path).metadata.metadata or {}
    return json.loads(metadata[key.encode()])
