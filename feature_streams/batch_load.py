"""Load a batch group from a CSV or Parquet file into Redis, validated first.

``streamscore features load --group NAME --input FILE`` calls :func:`load_group_file`:

1. validate the whole file (:func:`validate_file`) — nothing is written unless it
   passes;
2. write a new snapshot in pipelined chunks (progress bar on a TTY stderr, periodic
   log lines otherwise);
3. flip the group's active pointer to it atomically, keeping the old one as previous;
4. delete snapshots that are due (:func:`feature_streams.batch_store.collect_garbage`).

``streamscore features rollback --group NAME`` calls :func:`rollback_group`.

File rules:

* One header row (CSV) / the schema (Parquet) names the columns: the group's entity
  column (e.g. ``customer_id``) and fields of the group. A column that is not a field
  of the group is refused by name; so is a duplicated column.
* Every field of the group must have a column: a missing column usually means a
  broken pipeline, and serving its default to every entity would hide that. Pass
  ``allow_missing_columns=True`` (CLI ``--allow-missing-columns``) to serve the
  defaults of absent columns instead.
* A value must parse per the field's dtype: ``float`` any finite number; ``int`` an
  integer (``3`` or ``3.0``); ``bool`` ``true``/``false``/``1``/``0``. NaN and
  infinities are refused. An empty cell (CSV) or null (Parquet) means "no value":
  the field is not stored and readers serve its default (counted per column).
* Entity ids become keys by the entity's rule (:meth:`Entity.key`, e.g. surrounding
  spaces dropped; ``int`` entities: ``" 042"`` and ``42.0`` are ``42``), refused by
  column and row when they cannot, and keys are unique within the file.
* A file without data rows is refused.

Problems are reported together (up to 20) in a :class:`BatchFileError`, each naming
the column and row, e.g. ``column 'credit_limit', row 17 (line 18): 'abc' is not a
number``. Rows count from 1 after the header. Parsing is CPU work done on the caller's
event loop: run loads from the CLI or before serving, not inside a serving process.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TextIO

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.compute as pc  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pyarrow.types as pat  # type: ignore[import-untyped, unused-ignore]

from feature_streams.definitions import (
    BatchField,
    BatchGroup,
    Entity,
    EntityKeyError,
    FeatureDefinitions,
)
from feature_streams.key_columns import already_keys

if TYPE_CHECKING:  # the Redis side is imported when loading: file readers need no redis
    from feature_streams.batch_store import ActivateResult
    from feature_streams.redis_client import AnyRedis, RedisMode

__all__ = [
    "BatchFileError",
    "FileColumns",
    "FileSummary",
    "LoadReport",
    "ProgressReporter",
    "iter_file_rows",
    "load_group_file",
    "read_file_columns",
    "rollback_group",
    "validate_file",
]

logger = logging.getLogger(__name__)

FileFormat = Literal["csv", "parquet"]
MAX_PROBLEMS: Final = 20
_FORMATS: Final[Mapping[str, FileFormat]] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_PARQUET_BATCH_ROWS: Final = 65_536
_MAX_EXACT_INT: Final = 2**53
_TRUE: Final = frozenset({"true", "1", "1.0"})
_FALSE: Final = frozenset({"false", "0", "0.0"})


class BatchFileError(ValueError):
    """A file was refused before anything was written; ``problems`` lists the first ones."""

    def __init__(self, path: str, problems: Sequence[str], total: int | None = None) -> None:
        self.path = path
        self.problems: tuple[str, ...] = tuple(problems)
        self.total = len(self.problems) if total is None else total
        more = self.total - len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"refused {path}:\n{lines}{tail}")


@dataclass(frozen=True)
class FileSummary:
    """A file that passed validation."""

    path: str
    file_format: FileFormat
    group: str
    rows: int
    columns: tuple[str, ...]
    """Fields present in the file, in file order."""
    defaulted_columns: tuple[str, ...]
    """Fields absent from the file (only with ``allow_missing_columns``)."""
    null_cells: Mapping[str, int]
    """Empty cells per field column (served as the field's default)."""
    size_bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_group_file` did."""

    group: str
    snapshot_id: str
    source: str
    rows: int
    defaulted_columns: tuple[str, ...]
    null_cells: Mapping[str, int]
    previous_snapshot_id: str | None
    deleted_snapshots: tuple[str, ...]
    deferred_snapshots: tuple[str, ...]
    """Retired snapshots kept until their grace period ends (deleted by a later load)."""
    elapsed_s: float


# --- cell conversion --------------------------------------------------------------


class _BadCell(ValueError):
    pass


Converter = Callable[[object], float | None]


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: object) -> float:
    """A finite number from a cell (bools are refused: they are not numbers)."""
    if isinstance(value, bool):
        raise _BadCell(f"{value!r} is a bool, not a number")
    if isinstance(value, int):
        if abs(value) > _MAX_EXACT_INT:
            raise _BadCell(f"{value!r} is too large to serve exactly")
        return float(value)
    if isinstance(value, float | Decimal):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _BadCell(f"{value!r} is not a number") from None
    else:
        raise _BadCell(f"{value!r} is not a number")
    if not math.isfinite(number):
        raise _BadCell(f"{value!r} is not a finite number")
    return number


def _to_float(value: object) -> float | None:
    return None if _is_blank(value) else _number(value)


def _to_int(value: object) -> float | None:
    if _is_blank(value):
        return None
    number = _number(value)
    if not number.is_integer():
        raise _BadCell(f"{value!r} is not an integer")
    return number


def _to_bool(value: object) -> float | None:
    if _is_blank(value):
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return 1.0
        if text in _FALSE:
            return 0.0
        raise _BadCell(f"{value!r} is not a bool (true/false/1/0)")
    if isinstance(value, int | float | Decimal) and value in (0, 1):
        return float(value)
    raise _BadCell(f"{value!r} is not a bool (true/false/1/0)")


_CONVERTERS: Final[Mapping[str, Converter]] = {
    "float": _to_float,
    "int": _to_int,
    "bool": _to_bool,
}


def _entity_converter(entity: Entity) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value is None:
            raise _BadCell("empty entity id")
        try:
            return entity.key(value)
        except EntityKeyError as exc:
            raise _BadCell(str(exc)) from None

    return convert


# --- reading files ----------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """How a validated header maps to the group."""

    path: Path
    file_format: FileFormat
    group: BatchGroup
    entity: Entity
    columns: tuple[str, ...]
    entity_index: int
    field_indexes: tuple[tuple[int, BatchField, Converter], ...]
    defaulted: tuple[str, ...]


def _file_format(path: Path) -> FileFormat:
    file_format = _FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise BatchFileError(
            str(path), [f"unknown file type {path.suffix!r} (use .csv, .parquet or .pq)"]
        )
    return file_format


def _read_header(path: Path, file_format: FileFormat) -> tuple[str, ...]:
    try:
        if file_format == "csv":
            with path.open(newline="", encoding="utf-8-sig") as handle:
                header = next(csv.reader(handle), None)
            if header is None:
                raise BatchFileError(str(path), ["empty file: no header row"])
            return tuple(name.strip() for name in header)
        return tuple(str(name) for name in pq.ParquetFile(path).schema_arrow.names)
    except BatchFileError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        # pyarrow's ArrowInvalid (not a Parquet file) is a ValueError.
        raise BatchFileError(str(path), [f"cannot read: {exc}"]) from None


def _parquet_type_problems(path: Path, layout_fields: Mapping[str, BatchField]) -> list[str]:
    schema = pq.ParquetFile(path).schema_arrow
    problems = []
    for name in schema.names:
        if name not in layout_fields:
            continue
        kind = schema.field(name).type
        numeric = pat.is_integer(kind) or pat.is_floating(kind) or pat.is_decimal(kind)
        textual = pat.is_string(kind) or pat.is_large_string(kind)
        if not (numeric or textual or pat.is_boolean(kind) or pat.is_null(kind)):
            problems.append(f"column {name!r}: Parquet type {kind} is not a number")
    return problems


def _layout(
    definitions: FeatureDefinitions, group_name: str, path: Path, allow_missing_columns: bool
) -> _Layout:
    group = definitions.batch_groups.get(group_name)
    if group is None:
        defined = ", ".join(sorted(definitions.batch_groups)) or "none"
        raise BatchFileError(
            str(path), [f"unknown batch group {group_name!r} (defined: {defined})"]
        )
    file_format = _file_format(path)
    columns = _read_header(path, file_format)
    problems: list[str] = []
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        problems.append(f"duplicated columns: {', '.join(map(repr, duplicated))}")
    if group.entity not in columns:
        problems.append(f"no entity column {group.entity!r}")
    unknown = [c for c in columns if c != group.entity and c not in group.fields]
    if unknown:
        problems.append(
            f"unknown columns for batch group {group.name!r}: {', '.join(map(repr, unknown))} "
            f"(fields: {', '.join(group.fields)})"
        )
    absent = tuple(f for f in group.fields if f not in columns)
    if absent and not allow_missing_columns:
        problems.append(
            f"missing columns: {', '.join(map(repr, absent))} "
            "(allow missing columns to serve their defaults)"
        )
    if file_format == "parquet" and not problems:
        problems.extend(_parquet_type_problems(path, group.fields))
    if problems:
        raise BatchFileError(str(path), problems)
    field_indexes = tuple(
        (i, group.fields[c], _CONVERTERS[group.fields[c].dtype])
        for i, c in enumerate(columns)
        if c in group.fields
    )
    return _Layout(
        path=path,
        file_format=file_format,
        group=group,
        entity=definitions.entities[group.entity],
        columns=columns,
        entity_index=columns.index(group.entity),
        field_indexes=field_indexes,
        defaulted=absent,
    )


def _raw_rows(layout: _Layout) -> Iterator[tuple[int, str, Sequence[object]]]:
    """``(row number, location text, cells)`` of every data row."""
    width = len(layout.columns)
    if layout.file_format == "csv":
        with layout.path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            next(reader, None)
            for number, cells in enumerate(reader, start=1):
                where = f"row {number} (line {reader.line_num})"
                if len(cells) != width:
                    if not any(c.strip() for c in cells):
                        continue  # a blank line
                    raise _RowShapeError(where, len(cells), width)
                yield number, where, cells
        return
    number = 0
    for batch in pq.ParquetFile(layout.path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        arrays = [batch.column(i).to_pylist() for i in range(width)]
        for values in zip(*arrays, strict=True):
            number += 1
            yield number, f"row {number}", values


class _RowShapeError(Exception):
    def __init__(self, where: str, got: int, expected: int) -> None:
        super().__init__(f"{where}: {got} cells, the header has {expected}")


@dataclass
class _Row:
    number: int
    where: str
    entity_id: str | None
    values: dict[str, float]
    problems: list[str] = field(default_factory=list)
    nulls: list[str] = field(default_factory=list)


def _rows(layout: _Layout) -> Iterator[_Row]:
    entity_name = layout.group.entity
    to_entity = _entity_converter(layout.entity)
    for number, where, cells in _raw_rows(layout):
        row = _Row(number, where, None, {})
        try:
            row.entity_id = to_entity(cells[layout.entity_index])
        except _BadCell as exc:
            row.problems.append(f"column {entity_name!r}, {where}: {exc}")
        for index, spec, convert in layout.field_indexes:
            try:
                value = convert(cells[index])
            except _BadCell as exc:
                row.problems.append(f"column {spec.name!r}, {where}: {exc}")
                continue
            if value is None:
                row.nulls.append(spec.name)
            else:
                row.values[spec.name] = value
        yield row


def validate_file(
    definitions: FeatureDefinitions,
    group: str,
    path: str | os.PathLike[str],
    *,
    allow_missing_columns: bool = False,
    max_problems: int = MAX_PROBLEMS,
) -> FileSummary:
    """Check a whole file against ``group``; raises :class:`BatchFileError` listing the
    first ``max_problems`` problems (and how many there are in all)."""
    layout = _layout(definitions, group, Path(path), allow_missing_columns)
    stat = layout.path.stat()
    problems: list[str] = []
    total = 0
    seen: dict[str, int] = {}
    nulls = dict.fromkeys((spec.name for _, spec, _ in layout.field_indexes), 0)
    rows = 0

    def problem(text: str) -> None:
        nonlocal total
        total += 1
        if len(problems) < max_problems:
            problems.append(text)

    try:
        for row in _rows(layout):
            rows += 1
            for text in row.problems:
                problem(text)
            for name in row.nulls:
                nulls[name] += 1
            if row.entity_id is not None:
                first = seen.setdefault(row.entity_id, row.number)
                if first != row.number:
                    problem(
                        f"column {layout.group.entity!r}, {row.where}: duplicate entity "
                        f"{row.entity_id!r} (first at row {first})"
                    )
    except _RowShapeError as exc:
        problem(str(exc))
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        problem(f"cannot read: {exc}")
    if rows == 0 and total == 0:
        problem("no data rows")
    if total:
        raise BatchFileError(str(layout.path), problems, total)
    return FileSummary(
        path=str(layout.path),
        file_format=layout.file_format,
        group=layout.group.name,
        rows=rows,
        columns=tuple(spec.name for _, spec, _ in layout.field_indexes),
        defaulted_columns=layout.defaulted,
        null_cells=nulls,
        size_bytes=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
    )


def iter_file_rows(
    definitions: FeatureDefinitions,
    group: str,
    path: str | os.PathLike[str],
    *,
    allow_missing_columns: bool = False,
) -> Iterator[tuple[str, dict[str, float]]]:
    """``(entity id, {field: value})`` per row (empty cells left out); raises
    :class:`BatchFileError` at the first problem. Validate first: this does not check
    for duplicate entities."""
    layout = _layout(definitions, group, Path(path), allow_missing_columns)
    try:
        for row in _rows(layout):
            if row.problems or row.entity_id is None:
                raise BatchFileError(str(layout.path), row.problems or ["bad row"])
            yield row.entity_id, row.values
    except _RowShapeError as exc:
        raise BatchFileError(str(layout.path), [str(exc)]) from None


@dataclass(frozen=True)
class FileColumns:
    """A batch file's rows column-wise: keys in file order, per field values and
    presence (``False``: an empty cell or an absent column, served the default)."""

    keys: list[str]
    values: dict[str, npt.NDArray[np.float64]]
    present: dict[str, npt.NDArray[np.bool_]]


def read_file_columns(
    definitions: FeatureDefinitions,
    group: str,
    path: str | os.PathLike[str],
    *,
    allow_missing_columns: bool = False,
) -> FileColumns | None:
    """The file read column-wise (numpy, no Python object per cell), or ``None`` when
    this path cannot prove it valid: not Parquet, ids not already keys
    (:func:`~feature_streams.key_columns.already_keys`, or an integer column for int
    entities) or repeated, a text, decimal or (for a number) bool column, or any cell
    the row rules refuse. Then
    :func:`validate_file` + :func:`iter_file_rows` read it and name the problem; for
    a valid file both give the same values. A bad header raises ``BatchFileError``."""
    layout = _layout(definitions, group, Path(path), allow_missing_columns)
    if layout.file_format != "parquet":
        return None
    try:
        table = pq.ParquetFile(layout.path).read()  # read_table would import pyarrow.dataset
    except (OSError, ValueError) as exc:
        raise BatchFileError(str(layout.path), [f"cannot read: {exc}"]) from None
    if table.num_rows == 0:
        return None  # refused by the row path, by name
    ids = table.column(layout.entity_index)
    kind = ids.type
    if ids.null_count:
        return None  # no key: the row path names the row
    if not (
        already_keys(ids, layout.entity.key_type)
        or (layout.entity.key_type == "int" and pat.is_integer(kind))
    ):
        return None
    if pc.count_distinct(ids).as_py() != len(ids):
        return None
    n = table.num_rows
    values = {name: np.zeros(n, np.float64) for name in layout.group.fields}
    present = {name: np.zeros(n, np.bool_) for name in layout.group.fields}
    for index, spec, _ in layout.field_indexes:
        column = _numeric_column(table.column(index), spec.dtype)
        if column is None:
            return None
        values[spec.name], present[spec.name] = column
    return FileColumns(pc.cast(ids, pa.string()).to_pylist(), values, present)


def _numeric_column(
    column: pa.ChunkedArray, dtype: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None:
    """Values and presence of a field column, or ``None`` where the row rules must speak."""
    kind = column.type
    present = np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), np.bool_)
    if pat.is_null(kind):
        return np.zeros(len(column), np.float64), present
    if pat.is_boolean(kind):
        if dtype != "bool":
            return None  # bools are not numbers: the row path refuses them by name
        numbers = np.asarray(pc.fill_null(column, False).to_numpy(zero_copy_only=False), np.float64)
        return numbers, present
    if not (pat.is_integer(kind) or pat.is_floating(kind)):
        return None
    numbers = np.asarray(pc.fill_null(column, 0).to_numpy(zero_copy_only=False), np.float64)
    if pat.is_integer(kind):
        # compared as integers: 2**53 + 1 rounds to 2**53 once it is a float
        raw = pc.fill_null(column, 0).to_numpy(zero_copy_only=False)
        if len(raw) and (int(raw.max()) > _MAX_EXACT_INT or int(raw.min()) < -_MAX_EXACT_INT):
            return None
    if not np.isfinite(numbers).all():
        return None
    if dtype == "int" and not (numbers == np.floor(numbers)).all():
        return None
    if dtype == "bool" and not np.isin(numbers, (0.0, 1.0)).all():
        return None
    return numbers, present


# --- progress ---------------------------------------------------------------------


class ProgressReporter:
    """Rows written so far: a redrawn bar on a TTY, else an INFO line every ``log_every_s``."""

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        log_every_s: float = 5.0,
    ) -> None:
        self._label = label
        self._total = max(total, 1)
        self._stream = sys.stderr if stream is None else stream
        self._tty = self._stream.isatty() if tty is None else tty
        self._every = 0.1 if self._tty else log_every_s
        self._started = time.monotonic()
        self._last = -math.inf
        self._done = 0

    def __call__(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
        if done < self._total and now - self._last < self._every:
            return
        self._last = now
        rate = done / max(now - self._started, 1e-9)
        if self._tty:
            filled = int(30 * min(done / self._total, 1.0))
            bar = "#" * filled + "-" * (30 - filled)
            self._stream.write(
                f"\r{self._label} [{bar}] {100 * done / self._total:5.1f}% "
                f"{done:,}/{self._total:,} rows {rate:,.0f}/s"
            )
            self._stream.flush()
        else:
            logger.info(
                "%s: %s/%s rows (%.0f rows/s)", self._label, f"{done:,}", f"{self._total:,}", rate
            )

    def close(self) -> None:
        """End the bar's line (TTY only)."""
        if self._tty and self._done:
            self._stream.write("\n")
            self._stream.flush()


# --- load / rollback ----------------------------------------------------------------


async def load_group_file(
    redis_url: str,
    definitions: FeatureDefinitions,
    group: str,
    path: str | os.PathLike[str],
    *,
    allow_missing_columns: bool = False,
    chunk_size: int | None = None,
    grace_s: float | None = None,
    progress: bool = True,
    progress_stream: TextIO | None = None,
    mode: RedisMode = "auto",
) -> LoadReport:
    """Validate ``path``, write it as a new snapshot of ``group``, make it active and
    delete due snapshots. Raises :class:`BatchFileError` (nothing written) for a bad
    file; a failure while writing deletes the partial snapshot (best effort) and
    leaves the active one untouched. ``mode`` is ``redis.mode`` (checked against the
    server: :class:`feature_streams.redis_client.RedisModeMismatchError`).
    ``chunk_size`` and ``grace_s`` default to :mod:`feature_streams.batch_store`'s
    ``DEFAULT_CHUNK_SIZE`` and ``DEFAULT_GRACE_S``."""
    from feature_streams.batch_store import (
        DEFAULT_CHUNK_SIZE,
        DEFAULT_GRACE_S,
        activate,
        collect_garbage,
        new_snapshot_id,
        write_snapshot,
    )
    from feature_streams.redis_client import RedisOptions, connect

    started = time.monotonic()
    summary = validate_file(definitions, group, path, allow_missing_columns=allow_missing_columns)
    source = summary.path
    snapshot_id = new_snapshot_id()
    reporter = (
        ProgressReporter(f"{group} {snapshot_id}", summary.rows, progress_stream)
        if progress
        else None
    )
    client = await connect(RedisOptions(redis_url, mode))
    written = False
    try:
        try:
            info = await write_snapshot(
                client,
                group,
                iter_file_rows(
                    definitions, group, path, allow_missing_columns=allow_missing_columns
                ),
                chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
                progress=reporter,
                snapshot_id=snapshot_id,
                source=source,
            )
            _check_unchanged(summary)
            result: ActivateResult = await activate(client, group, info.snapshot_id)
            written = True
        finally:
            if reporter is not None:
                reporter.close()
            if not written:
                await _discard(client, group, snapshot_id)
        grace = DEFAULT_GRACE_S if grace_s is None else grace_s
        deleted, deferred = await collect_garbage(client, group, grace_s=grace)
    finally:
        await client.aclose()
    report = LoadReport(
        group=group,
        snapshot_id=info.snapshot_id,
        source=source,
        rows=info.rows,
        defaulted_columns=summary.defaulted_columns,
        null_cells=summary.null_cells,
        previous_snapshot_id=result.previous,
        deleted_snapshots=deleted,
        deferred_snapshots=deferred,
        elapsed_s=time.monotonic() - started,
    )
    logger.info(
        "batch group loaded",
        extra={
            "group": group,
            "snapshot_id": report.snapshot_id,
            "rows": report.rows,
            "previous": report.previous_snapshot_id,
            "deleted": list(deleted),
        },
    )
    return report


def _check_unchanged(summary: FileSummary) -> None:
    stat = Path(summary.path).stat()
    if (stat.st_size, stat.st_mtime_ns) != (summary.size_bytes, summary.mtime_ns):
        raise BatchFileError(summary.path, ["the file changed while it was being loaded"])


async def _discard(client: AnyRedis, group: str, snapshot_id: str) -> None:
    from feature_streams.batch_store import delete_snapshot

    try:
        await delete_snapshot(client, group, snapshot_id)
    except Exception as error:  # the original error matters more; GC removes it later
        logger.warning(
            "could not delete the partial snapshot",
            extra={"group": group, "snapshot_id": snapshot_id, "error": repr(error)},
        )


async def rollback_group(redis_url: str, group: str) -> ActivateResult:
    """Make ``group``'s previous snapshot active again (the current one becomes previous).

    Raises :class:`feature_streams.batch_store.SnapshotStateError` when there is none.
    """
    from feature_streams.batch_store import rollback
    from feature_streams.redis_client import RedisOptions, connect

    client = await connect(RedisOptions(redis_url))
    try:
        return await rollback(client, group)
    finally:
        await client.aclose()
