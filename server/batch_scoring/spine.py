"""The spine: read in chunks, entity columns and times checked, row numbers global.

A spine is Parquet or CSV with the entity id columns the model's features need, an
event time per row (integer epoch milliseconds, a timestamp type, or ISO-8601 text)
or ``--as-of T`` for every row, and any request features. Chunks are read one at a
time, so memory does not depend on the spine's size. Every chunk gets the time as
the int64 column ``ts_ms`` (the point-in-time code's timestamp column).

A problem raises :class:`SpineError` whose message is one line naming the column and
the (1-based, whole-file) row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]
import pyarrow.csv as pacsv  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from feature_streams.definitions import Entity, EntityKeyError
from feature_streams.key_columns import already_keys
from feature_streams.point_in_time import DEFAULT_TIMESTAMP_COLUMN

__all__ = ["TIME_COLUMN", "SpineError", "SpineReader", "parse_time"]

TIME_COLUMN: Final = DEFAULT_TIMESTAMP_COLUMN
_PARQUET: Final = frozenset({".parquet", ".pq"})


class SpineError(ValueError):
    """The spine cannot be scored; the message names column and row."""


def parse_time(value: object) -> int:
    """Epoch milliseconds of an int, an integral float or ISO-8601 text (naive = UTC)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a time")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, datetime):
        return _datetime_ms(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            return _datetime_ms(datetime.fromisoformat(text.replace("Z", "+00:00")))
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not epoch milliseconds or an ISO-8601 time")


def _datetime_ms(value: datetime) -> int:
    from datetime import UTC

    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


@dataclass(frozen=True)
class SpineReader:
    """How to read one spine file in chunks."""

    path: Path
    entities: Sequence[Entity]
    """Entities whose id columns the model's features need (checked present)."""
    time_column: str = TIME_COLUMN
    as_of_ms: int | None = None
    chunk_rows: int = 100_000

    def total_rows(self) -> int | None:
        """Row count when cheap to know (Parquet footer), else ``None``."""
        if self.path.suffix.lower() in _PARQUET:
            return int(pq.ParquetFile(self.path).metadata.num_rows)
        return None

    def column_names(self) -> list[str]:
        """The spine's columns (read from the schema only)."""
        return list(self._open().schema.names) if self._is_parquet() else self._csv_names()

    def _is_parquet(self) -> bool:
        suffix = self.path.suffix.lower()
        if suffix in _PARQUET:
            return True
        if suffix == ".csv":
            return False
        raise SpineError(f"{self.path}: unknown spine file type {suffix!r} (use .parquet or .csv)")

    def _open(self) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.path)
        except (OSError, pa.ArrowException) as exc:
            raise SpineError(f"{self.path}: cannot read the spine: {exc}") from None

    def _csv_names(self) -> list[str]:
        try:
            with pacsv.open_csv(self.path) as reader:
                return list(reader.schema.names)
        except (OSError, pa.ArrowException) as exc:
            raise SpineError(f"{self.path}: cannot read the spine: {exc}") from None

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if self._is_parquet():
            yield from self._open().iter_batches(batch_size=self.chunk_rows)
            return
        names = self._csv_names()
        types = {e.name: pa.string() for e in self.entities if e.name in names}
        if self.time_column in names:
            types[self.time_column] = pa.string()  # parsed here, bad rows named
        options = pacsv.ConvertOptions(column_types=types)
        read = pacsv.ReadOptions(block_size=1 << 22)
        try:
            with pacsv.open_csv(self.path, read_options=read, convert_options=options) as reader:
                yield from reader
        except (OSError, pa.ArrowException) as exc:
            raise SpineError(f"{self.path}: cannot read the spine: {exc}") from None

    def chunks(self) -> Iterator[tuple[int, pa.Table]]:
        """``(first row number, chunk)`` in file order, each checked, with ``ts_ms``."""
        names = self.column_names()
        for entity in self.entities:
            if entity.name not in names:
                raise SpineError(
                    f"{self.path}: column {entity.name!r} missing (row 1, the header): "
                    f"the model's features are keyed by it"
                )
        if self.as_of_ms is None and self.time_column not in names:
            raise SpineError(
                f"{self.path}: column {self.time_column!r} missing (row 1, the header): "
                "give every row a time or use --as-of"
            )
        first = 1
        pending: list[pa.RecordBatch] = []
        size = 0
        schema: pa.Schema | None = None
        for batch in self._batches():
            schema = batch.schema
            pending.append(batch)
            size += batch.num_rows
            while size >= self.chunk_rows:
                table = pa.Table.from_batches(pending).combine_chunks()
                head, rest = table.slice(0, self.chunk_rows), table.slice(self.chunk_rows)
                yield first, self._checked(head, first)
                first += head.num_rows
                pending = rest.to_batches()
                size = rest.num_rows
        if size or first == 1:  # an empty spine still yields one (empty) chunk
            table = pa.Table.from_batches(pending, schema=schema or self._schema())
            yield first, self._checked(table.combine_chunks(), first)

    def _schema(self) -> pa.Schema:
        if self._is_parquet():
            return self._open().schema_arrow
        return pa.schema([(n, pa.string()) for n in self._csv_names()])

    def _checked(self, table: pa.Table, first: int) -> pa.Table:
        for entity in self.entities:
            _check_ids(table, entity, first)
        if self.as_of_ms is not None:
            times = pa.array([self.as_of_ms] * table.num_rows, pa.int64())
        else:
            times = _times(table.column(self.time_column), self.time_column, first)
        if TIME_COLUMN in table.column_names:
            return table.set_column(table.column_names.index(TIME_COLUMN), TIME_COLUMN, times)
        return table.append_column(TIME_COLUMN, times)


def _check_ids(table: pa.Table, entity: Entity, first: int) -> None:
    """Every non-blank id must be a key of its entity (null/blank: defaults, as online)."""
    column = table.column(entity.name)
    if already_keys(column, entity.key_type):
        return
    values = pc.unique(column).to_pylist()
    bad: set[object] = set()
    for value in values:
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        try:
            entity.key(value)
        except EntityKeyError:
            bad.add(value)
    if bad:
        for i, value in enumerate(column.to_pylist()):
            if value in bad:
                try:
                    entity.key(value)
                except EntityKeyError as exc:
                    raise SpineError(
                        f"spine column {entity.name!r}, row {first + i}: {exc}"
                    ) from None


def _times(column: pa.ChunkedArray, name: str, first: int) -> pa.Array:
    kind = column.type
    if pa.types.is_timestamp(kind):
        column = pc.cast(column, pa.timestamp("ms", tz=kind.tz)).cast(pa.int64())
    elif pa.types.is_date(kind):
        column = pc.cast(pc.cast(column, pa.timestamp("ms")), pa.int64())
    if pa.types.is_integer(column.type) and column.null_count == 0:
        return pc.cast(column, pa.int64()).combine_chunks()
    out: list[int] = []
    for i, value in enumerate(column.to_pylist()):
        try:
            if value is None:
                raise ValueError("no time (null)")
            out.append(parse_time(value))
        except ValueError as exc:
            raise SpineError(f"spine column {name!r}, row {first + i}: {exc}") from None
    return pa.array(out, pa.int64())


def spine_path(value: str | os.PathLike[str]) -> Path:
    """A spine argument as a path (checked to exist)."""
    path = Path(value)
    if not path.is_file():
        raise SpineError(f"{path}: no such spine file")
    return path
