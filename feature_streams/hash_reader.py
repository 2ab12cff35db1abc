"""Window values read straight from a fetched tile hash, without parsing its fields.

:func:`feature_streams.windows.read_hash` parses every field of an ``HGETALL``
reply (split ``"<start>:<slot>"``, look up the slot, convert the start) into tiles
and then merges them per window. On the server's read path that parse was most of
the cost of a feature fetch. :class:`HashWindowReader` turns it around: a window
``[floor(t - W, T), t)`` of one slot reads exactly the fields
``"<s>:<slot>"`` for ``s`` in ``range(floor(t - W, T), t, T)``, so it looks those
names up in the reply (C-level ``dict`` lookups) and only converts the values it
finds. The name lists depend on ``t`` only through ``t // step`` (``step``: the gcd
of the group's tile sizes, e.g. one minute) and whether ``t`` is on a step
boundary, so they are built once per step and cached.

The values are the same as ``read_window(plan, tiles_from_hash(plan, fields, t), t)``
(same slots, same merge rules, same :func:`~feature_streams.windows.finalize`, sums
correctly rounded by ``math.fsum`` in both, so the order of the hash's fields does
not matter), which the unit tests check on random hashes. When a hash holds far
fewer fields than the windows could read (a sparse entity under long windows of fine
tiles), looking up every candidate name would cost more than parsing what is there,
and the reader falls back to that generic path; so it does when the group's windows
read more than :data:`MAX_LOOKUPS` tiles in all, and for ``str`` keys (a client that
decodes replies). A replay at times scattered over more than
:data:`_MAX_CACHED_TIMES` steps rebuilds names often (about as costly as parsing one
hash), so it is no faster there than parsing.

Only hashes as the tile store writes them are read the same both ways: the lookup
path does not see fields the writer never produces (a negative or zero-padded tile
start), and it treats an empty value as an absent tile where parsing raises.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, cast

from feature_streams.definitions import AggKind
from feature_streams.windows import (
    TS_SUFFIX,
    GroupPlan,
    LastValue,
    Slot,
    SlotKind,
    SlotValue,
    read_window,
    tiles_from_hash,
    window_start,
)

__all__ = ["HashWindowReader"]

NAMES_PER_FIELD = 6.0
"""Fall back to parsing when the windows would look up more than this many names
per field the hash holds (a lookup costs about a sixth of parsing a field; measured
with ``bench.feature_bench``'s data)."""

MAX_LOOKUPS = 4096
"""A group whose windows read more tile fields than this in all (e.g. one of 30 days
of 1-minute tiles) is always read by parsing the hash; its names are never built."""

_MAX_CACHED_TIMES = 16
"""Read layouts kept before the cache is cleared (they advance with time, one per
step, so old ones are never read again)."""


class _RangeNames(NamedTuple):
    """The hash fields one slot contributes to one window at some time."""

    kind: SlotKind
    values: tuple[bytes, ...]  # "<start>:<slot>" for each tile start in the window
    stamps: tuple[bytes, ...]  # "<start>:<slot>:ts" for a ``last`` slot, else empty


class _Finish(Enum):
    """How an output's value follows from its merged slots (see ``windows.finalize``)."""

    VALUE = 1
    MEAN = 2
    SINCE = 3


@dataclass(frozen=True, slots=True)
class _ReadLayout:
    """Every field name the group's windows read at one time; ``lookups`` counts them.
    ``ranges`` is empty when there are more than :data:`MAX_LOOKUPS`."""

    ranges: tuple[_RangeNames, ...]
    lookups: int
    key: tuple[int, bool]
    """``(t // step, t on a step boundary)``: equal keys, equal names."""


class HashWindowReader:
    """Every feature of one stream group at time ``t`` from its fetched tile hash."""

    def __init__(self, plan: GroupPlan) -> None:
        self.plan = plan
        ranges: dict[tuple[str, int], tuple[Slot, int]] = {}
        outputs: list[tuple[int, ...]] = []
        for output in plan.outputs:
            if output.window_ms % output.tile_ms:
                raise ValueError(f"{output.name}: window is not a multiple of its tile")
            used = []
            for slot in output.slots:
                key = (slot.name, output.window_ms)
                ranges.setdefault(key, (slot, output.window_ms))
                used.append(list(ranges).index(key))
            if output.agg is AggKind.MEAN and len(used) != 2:
                raise ValueError(f"{output.name}: a mean reads (sum, count) slots")
            outputs.append(tuple(used))
        self._ranges = tuple(ranges.values())
        # (how, first slot's range, count slot's range for a mean, default, window):
        # a mean's slots are (sum, count), see windows.GroupPlan.build.
        self._finishers: tuple[tuple[_Finish, int, int, float, float], ...] = tuple(
            (_finish_of(output.agg), used[0], used[-1], output.default, float(output.window_ms))
            for output, used in zip(plan.outputs, outputs, strict=True)
        )
        # Every window is a multiple of its tile, so the tiles a window reads at t
        # depend only on t // step and on whether t is a tile boundary.
        self._step = math.gcd(*(slot.tile_ms for slot in plan.slots))
        self._layouts: dict[tuple[int, bool], _ReadLayout] = {}

    def layout_at(self, t_ms: int) -> _ReadLayout:
        """The field names every window reads at ``t_ms``: for a window ``W`` over a
        slot of tile ``T``, the tiles starting in ``range(floor(t - W, T), t, T)``."""
        key = (t_ms // self._step, t_ms % self._step == 0)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= _MAX_CACHED_TIMES:
                self._layouts.clear()
            layout = self._layouts[key] = self._build(t_ms, key)
        return layout

    def _build(self, t_ms: int, key: tuple[int, bool]) -> _ReadLayout:
        spans = [
            (slot, range(window_start(t_ms, window_ms, slot.tile_ms), t_ms, slot.tile_ms))
            for slot, window_ms in self._ranges
        ]
        lookups = sum(len(starts) * (2 if s.kind is SlotKind.LAST else 1) for s, starts in spans)
        if lookups > MAX_LOOKUPS:
            return _ReadLayout((), lookups, key)  # empty ranges: always parse
        built = []
        for slot, starts in spans:
            values = tuple(f"{s}:{slot.name}".encode() for s in starts)
            stamps: tuple[bytes, ...] = ()
            if slot.kind is SlotKind.LAST:
                stamps = tuple(f"{s}:{slot.name}{TS_SUFFIX}".encode() for s in starts)
            built.append(_RangeNames(slot.kind, values, stamps))
        return _ReadLayout(tuple(built), lookups, key)

    def read(self, fields: Mapping[bytes, bytes] | Mapping[str, str], t_ms: int) -> list[float]:
        """Feature values at ``t_ms``, in ``plan.outputs`` order."""
        return self.read_many(fields, (t_ms,))[0]

    def read_many(
        self,
        fields: Mapping[bytes, bytes] | Mapping[str, str],
        times: Sequence[int],
        memo: dict[object, Any] | None = None,
    ) -> list[list[float]]:
        """Feature values at each of ``times`` from one hash (e.g. every request of a
        micro-batch on one entity); tiles are merged once per distinct tile range.

        ``memo`` keeps those merges across calls on the SAME ``fields`` (never mutated
        meanwhile: e.g. a hash held by version, :mod:`feature_streams.tile_cache`),
        by read layout; it is filled here and must not be shared between groups."""
        if not fields:
            return [[output.default for output in self.plan.outputs] for _ in times]
        parse_only = not isinstance(next(iter(fields)), bytes)  # a decoding client
        results = []
        merged_by_layout: dict[object, Any] = {} if memo is None else memo
        for t_ms in times:
            layout = self.layout_at(t_ms)
            if parse_only or not layout.ranges or layout.lookups > NAMES_PER_FIELD * len(fields):
                by_name = read_window(self.plan, tiles_from_hash(self.plan, fields, t_ms), t_ms)
                results.append([by_name[output.name] for output in self.plan.outputs])
                continue
            merged = merged_by_layout.get(layout.key)
            if merged is None:
                merged = _merge(layout, cast(Mapping[bytes, bytes], fields))
                merged_by_layout[layout.key] = merged
            results.append(self._finish(merged, t_ms))
        return results

    def _finish(self, merged: Sequence[SlotValue | None], t_ms: int) -> list[float]:
        """``windows.finalize`` of every output, unrolled over precomputed specs."""
        out: list[float] = []
        for finish, first_at, count_at, default, window_ms in self._finishers:
            first = merged[first_at]
            if first is None:
                out.append(default)
            elif isinstance(first, LastValue):
                out.append(first.value)
            elif finish is _Finish.MEAN:
                count = merged[count_at]
                ok = isinstance(count, float) and count > 0
                out.append(first / count if ok else default)  # type: ignore[operator]
            elif finish is _Finish.SINCE:
                out.append(min(max(t_ms - first, 0.0), window_ms) / 1000.0)
            else:
                out.append(first)
        return out


def _merge(layout: _ReadLayout, fields: Mapping[bytes, bytes]) -> list[SlotValue | None]:
    """Each range's intermediate, merged over the tiles it reads (``None``: no tile)."""
    get = fields.get
    merged: list[SlotValue | None] = []
    for kind, values, stamps in layout.ranges:
        if kind is SlotKind.LAST:
            merged.append(_latest(map(get, values), map(get, stamps)))
            continue
        # filter(None) drops absent tiles (and b"", which is no number anyway)
        found = list(filter(None, map(get, values)))
        if not found:
            merged.append(None)
        elif kind is SlotKind.MIN:
            merged.append(min(map(float, found)))
        elif kind is SlotKind.MAX:
            merged.append(max(map(float, found)))
        else:
            merged.append(math.fsum(map(float, found)))
    return merged


def _finish_of(agg: AggKind) -> _Finish:
    if agg is AggKind.MEAN:
        return _Finish.MEAN
    if agg is AggKind.TIME_SINCE_LAST:
        return _Finish.SINCE
    return _Finish.VALUE


def _latest(values: Iterator[bytes | None], stamps: Iterator[bytes | None]) -> LastValue | None:
    """The greatest ``(ts, value)`` among tiles holding both halves of a ``last`` slot."""
    best: LastValue | None = None
    for raw, raw_ts in zip(values, stamps, strict=True):
        if raw is None or raw_ts is None:
            continue  # no event in the tile, or a half-written pair
        candidate = LastValue(int(float(raw_ts)), float(raw))
        if best is None or candidate > best:
            best = candidate
    return best
