"""Stream window values at many (key, time) points at once: numpy over sorted events.

:class:`GroupWindows` holds one stream group's kept events (after the worker's
lateness rule) sorted per slot by (key, time); :meth:`GroupWindows.values` answers
every aggregation for arrays of (key code, time) rows with binary searches, giving
what :func:`feature_streams.windows.point_in_time_values` (the reference fold: tiles
built from the events with time ``< t``, read by
:func:`feature_streams.windows.read_window`) gives, value for value:

* the events of a window at ``t`` are those with ``floor(t - W, T) <= ts < t``: an
  index range ``[a, b)`` of the slot's sorted events (the window start is a tile
  boundary, so whole tiles and the head tile's events before ``t``);
* ``count`` is ``b - a``; ``last`` and ``time_since_last`` are read at ``b - 1`` (events
  sorted by time, then value: the greatest ``(ts, value)``);
* ``sum`` (and ``mean``'s sum), ``min``, ``max``: within a tile the intermediate is
  accumulated in the fold's order (time, then log order), element by element, so a
  tile's value is the fold's bit for bit; the window then combines its tiles' values
  (the head tile's up to ``b - 1``). Sums over tiles are added with an error-free
  transformation (TwoSum) and a compensation term, which is the correctly rounded sum
  :func:`math.fsum` gives except when the exact sum lies within about ``2**-100`` of
  a rounding boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from feature_streams.definitions import AggKind
from feature_streams.point_in_time_events import GroupEvents, exclusive_running_max
from feature_streams.windows import GroupPlan, OutputPlan, Slot, SlotKind

__all__ = ["GroupWindows"]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

_LIMIT: Final = 1 << 62


@dataclass(frozen=True)
class _SlotEvents:
    """One slot's events sorted by (key code, time, log order or value)."""

    slot: Slot
    code: I64
    ts: I64
    value: F64
    tile_of: I64
    """Event -> index of its tile (a run of one key's events with one tile start)."""
    prefix: F64
    """Per event: its tile's intermediate over the tile's events up to it (fold order)."""
    tile_total: F64
    """Per tile: the intermediate over all its events."""
    packed: _Packed | None = None
    """(key code, time) packed in one int64 per event, when they fit (built once)."""

    @classmethod
    def of_sorted(
        cls,
        slot: Slot,
        code: I64,
        ts: I64,
        value: F64,
        ncodes: int = 0,
        same: _SlotEvents | None = None,
    ) -> _SlotEvents:
        """From events sorted by (key code, time, log order); ``same``: a slot built
        from the very same events (its packed keys are reused)."""
        if slot.kind is SlotKind.LAST and len(ts) > 1:
            tie = (code[1:] == code[:-1]) & (ts[1:] == ts[:-1])
            if tie.any():  # equal (key, time): the last is the greatest value
                order = np.lexsort((value, ts, code))
                code, ts, value = code[order], ts[order], value[order]
        start = ts - ts % slot.tile_ms
        n = len(ts)
        new_tile = np.ones(n, np.bool_)
        if n:
            new_tile[1:] = (code[1:] != code[:-1]) | (start[1:] != start[:-1])
        tile_of = np.cumsum(new_tile) - 1
        firsts = np.flatnonzero(new_tile)
        lengths = np.diff(np.append(firsts, n))
        prefix = value.copy()
        if slot.kind in (SlotKind.SUM, SlotKind.MIN, SlotKind.MAX):
            prefix = _tile_prefix(firsts, lengths, value, slot.kind)
        lasts = firsts + lengths - 1
        tile_total = prefix[lasts] if n else np.empty(0, np.float64)
        if same is not None:
            code, ts, packed = same.code, same.ts, same.packed
        else:
            packed = _Packed.of(code, ts, ncodes) if n else None
        return cls(slot, code, ts, value, tile_of.astype(np.int64), prefix, tile_total, packed)


@dataclass(frozen=True)
class _Packed:
    """Sorted ``code * span + (ts - base)`` keys: one binary search per (key, time)."""

    keys: I64
    base: int
    top: int
    span: int
    key_start: I64
    """Key code -> index of its first event (one entry more than codes)."""

    @classmethod
    def of(cls, code: I64, ts: I64, ncodes: int) -> _Packed | None:
        """``None`` when codes below ``ncodes`` times the time span overflow int64."""
        base = int(ts.min()) - 1
        top = int(ts.max()) + 1
        span = top - base + 1
        ncodes = max(ncodes, int(code.max()) + 2)
        if ncodes * span >= _LIMIT:
            return None
        key_start = np.searchsorted(code, np.arange(ncodes + 1, dtype=np.int64), side="left")
        return cls(code * span + (ts - base), base, top, span, key_start.astype(np.int64))

    def fits(self, code: I64) -> bool:
        """Whether every code of ``code`` packs (and has a :attr:`key_start` entry)."""
        return not len(code) or int(code.max()) + 2 <= len(self.key_start)

    def probe(self, code: I64, at: I64) -> I64:
        """The packed (key, time) of each row (``at`` clipped into the events' span)."""
        return code * self.span + (np.clip(at, self.base, self.top) - self.base)

    def positions(self, code: I64, at: I64) -> I64 | None:
        """First index with (key, time) >= (code, at); ``None`` if a code is too large."""
        if len(code) and int(code.max()) + 2 > _LIMIT // self.span:
            return None
        return np.searchsorted(self.keys, self.probe(code, at), side="left").astype(np.int64)


@dataclass(frozen=True)
class _RowEvents:
    """The packed keys of the events of some rows' keys only, for rows sorted by key
    code: a chunk's searches go into these (a chunk's keys hold a few % of the log's
    events: the searches stay in cache) and are shifted back to the log's indices.

    A row's (code, time) probe lands within its key's events in the log and in the
    excerpt alike (packed keys of other codes are all below or all above it), so the
    excerpt's index plus the key's shift is the log's index: the same answer."""

    packed: _Packed
    code: I64
    keys: I64
    shift: I64
    """Per row: log index minus excerpt index (rows without a key: 0)."""
    known: Mask
    """Rows with a key code (``-1``: no key, answer 0 as the whole search does)."""

    @classmethod
    def of(cls, packed: _Packed, code: I64) -> _RowEvents:
        """``code``: the rows' key codes, ascending, each below ``packed``'s codes."""
        n = len(code)
        first = np.ones(n, np.bool_)
        first[1:] = code[1:] != code[:-1]
        distinct = code[first]
        known = distinct >= 0
        safe = np.where(known, distinct, 0)
        start = packed.key_start[safe]
        length = np.where(known, packed.key_start[safe + 1] - start, 0)
        offset = np.cumsum(length) - length  # each key's first index in the excerpt
        total = int(length.sum())
        take = np.repeat(start - offset, length) + np.arange(total, dtype=np.int64)
        group = np.cumsum(first) - 1
        shift = (start - offset)[group]
        return cls(packed, code, packed.keys[take], shift, code >= 0)

    def positions(self, at: I64) -> I64:
        """:meth:`_Packed.positions` of the rows at times ``at``."""
        local = np.searchsorted(self.keys, self.packed.probe(self.code, at), side="left")
        return np.where(self.known, local + self.shift, 0).astype(np.int64)


def _tile_prefix(firsts: I64, lengths: I64, value: F64, kind: SlotKind) -> F64:
    """Running sum/min/max within each tile, element by element in order."""
    prefix = value.copy()
    if not len(firsts):
        return prefix
    order = np.argsort(-lengths, kind="stable")
    starts, lens = firsts[order], lengths[order]
    acc = value[starts].copy()
    negative_lens = -lens  # ascending
    for j in range(1, int(lens[0])):
        active = int(np.searchsorted(negative_lens, -j, side="left"))  # tiles longer than j
        idx = starts[:active] + j
        head = acc[:active]
        if kind is SlotKind.SUM:
            head = head + value[idx]
        elif kind is SlotKind.MIN:
            head = np.minimum(head, value[idx])
        else:
            head = np.maximum(head, value[idx])
        acc[:active] = head
        prefix[idx] = head
    return prefix


@dataclass(frozen=True)
class GroupWindows:
    """One stream group's kept events, indexed for window reads at any (key, time)."""

    plan: GroupPlan
    codes: Mapping[str, int]
    """Key -> key code (keys with no kept event may be absent)."""
    slots: Mapping[str, _SlotEvents]
    applied: int
    late: int
    family: Mapping[str, str]
    """Slot -> the first slot with the very same events (same ``where``): their
    (key, time) searches are the same, done once per chunk."""

    @classmethod
    def build(cls, events: GroupEvents) -> GroupWindows:
        """Apply the lateness rule to ``events`` and index what is kept."""
        plan = events.plan
        code, ts, feeds, values = events.columns()
        by_key = np.argsort(code, kind="stable")
        has_prev, newest = exclusive_running_max(code, ts, by_key)
        late = has_prev & (ts < newest - plan.group.allowed_lateness_ms)
        kept = ~late
        ncodes = max(events.codes.values(), default=0) + 2  # every code a row can ask for
        # one sort by (key, time, log order) for every slot: a slot's events are a subset
        order = _key_time_order(code, ts, by_key)
        code, ts, kept = code[order], ts[order], kept[order]
        slots: dict[str, _SlotEvents] = {}
        family: dict[str, str] = {}
        masks: list[tuple[str, Mask]] = []
        for slot in plan.slots:
            take = kept & feeds[slot.name][order]
            value = values[slot.name][order[take]]
            first = next((n for n, m in masks if np.array_equal(m, take)), None)
            if first is None:
                masks.append((slot.name, take))
            family[slot.name] = first or slot.name
            slots[slot.name] = _SlotEvents.of_sorted(
                slot, code[take], ts[take], value, ncodes, slots[first] if first else None
            )
        return cls(plan, dict(events.codes), slots, int(kept.sum()), int(late.sum()), family)

    def codes_of(self, keys: list[str | None]) -> I64:
        """Key codes of ``keys`` (``-1``: no key, or no event of it)."""
        return np.array([self.codes.get(k, -1) if k is not None else -1 for k in keys], np.int64)

    def values(self, code: I64, times: I64) -> dict[str, F64]:
        """Every aggregation at each row ``(code[i], times[i])`` (``code -1``: defaults)."""
        times = np.asarray(times, np.int64)
        # rows sorted by (code, time): every binary search's probes are then ascending
        # (window starts are monotone in time), several times faster than in row order
        order = _row_order(code, times)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return {name: v[back] for name, v in self._sorted_values(code[order], times[order]).items()}

    def _sorted_values(self, code: I64, times: I64) -> dict[str, F64]:
        """:meth:`values` of rows sorted by (code, time)."""
        ends: dict[str, I64] = {}
        starts: dict[tuple[str, int, int], I64] = {}
        excerpts: dict[str, _RowEvents | None] = {}

        def search(same: str, at: I64) -> I64:
            events = self.slots[same]
            if same not in excerpts:
                packed = events.packed
                fits = packed is not None and packed.fits(code)
                excerpts[same] = _RowEvents.of(packed, code) if packed and fits else None
            excerpt = excerpts[same]
            return excerpt.positions(at) if excerpt is not None else _positions(events, code, at)

        def bounds(slot: Slot, lo: I64, window: int, tile: int) -> tuple[I64, I64]:
            same = self.family[slot.name]
            if same not in ends:
                ends[same] = search(same, times)
            key = (same, window, tile)
            if key not in starts:
                starts[key] = search(same, lo)
            return starts[key], ends[same]

        out: dict[str, F64] = {}
        for output in self.plan.outputs:
            shifted = times - output.window_ms
            lo = shifted - shifted % output.tile_ms
            ranges = [bounds(s, lo, output.window_ms, output.tile_ms) for s in output.slots]
            out[output.name] = _finalize(
                output, [self.slots[s.name] for s in output.slots], ranges, times
            )
        return out


def _key_time_order(code: I64, ts: I64, by_key: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """``np.lexsort((log order, ts, code))``: ``by_key`` (the stable sort by code) itself
    when every key's events are in time order in the log (the usual case: one check
    instead of a three-key sort), else the lexsort."""
    c, t = code[by_key], ts[by_key]
    if bool(np.all((t[1:] >= t[:-1]) | (c[1:] != c[:-1]))):
        return by_key
    return np.lexsort((np.arange(len(ts), dtype=np.int64), ts, code))


def _row_order(code: I64, times: I64) -> npt.NDArray[np.intp]:
    """``np.lexsort((times, code))``, as one stable sort of packed (code, time) keys when
    they fit in int64 (several times faster; nearly free on a spine sorted by key)."""
    if len(times) == 0:
        return np.empty(0, np.intp)
    base = int(times.min())
    span = int(times.max()) - base + 1
    if int(code.min()) >= -1 and (int(code.max()) + 2) * span < _LIMIT:
        return np.argsort((code + 1) * span + (times - base), kind="stable")
    return np.lexsort((times, code))


def _positions(events: _SlotEvents, code: I64, at: I64) -> I64:
    """Per row: the first event index with (key, time) >= (code, at)."""
    n = len(events.ts)
    if n == 0:
        return np.zeros(len(at), np.int64)
    if events.packed is not None:
        found = events.packed.positions(code, at)
        if found is not None:
            return found
    base = int(events.ts.min()) - 1
    top = int(events.ts.max()) + 1
    span = top - base + 1
    ncodes = max(int(events.code.max()), int(code.max()) if len(code) else 0) + 2
    if ncodes * span < _LIMIT:
        keys = events.code * span + (events.ts - base)
        probe = code * span + (np.clip(at, base, top) - base)
        return np.searchsorted(keys, probe, side="left").astype(np.int64)
    # Times spread too far to pack with the key: rank them first (same order).
    every = np.unique(np.concatenate([events.ts, at]))
    span = len(every) + 1
    keys = events.code * span + np.searchsorted(every, events.ts)
    probe = code * span + np.searchsorted(every, at)
    return np.searchsorted(keys, probe, side="left").astype(np.int64)


def _finalize(
    output: OutputPlan,
    slots: list[_SlotEvents],
    ranges: list[tuple[I64, I64]],
    times: I64,
) -> F64:
    a, b = ranges[0]
    events = slots[0]
    out = np.full(len(times), output.default, np.float64)
    rows = np.flatnonzero(b > a)
    if not len(rows):
        return out
    lo, hi = a[rows], b[rows]
    kind = events.slot.kind
    if output.agg is AggKind.COUNT:
        out[rows] = (hi - lo).astype(np.float64)
    elif kind is SlotKind.LAST:
        out[rows] = events.value[hi - 1]
    elif output.agg is AggKind.TIME_SINCE_LAST:
        newest = events.ts[hi - 1].astype(np.float64)
        waited = np.minimum(np.maximum(times[rows] - newest, 0.0), float(output.window_ms))
        out[rows] = waited / 1000.0
    else:
        merged = _combine(events, lo, hi)
        if output.agg is AggKind.MEAN:
            ca, cb = ranges[1]
            count = (cb[rows] - ca[rows]).astype(np.float64)
            good = count > 0
            out[rows[good]] = merged[good] / count[good]
        else:
            out[rows] = merged
    return out


def _combine(events: _SlotEvents, lo: I64, hi: I64) -> F64:
    """The window's intermediate: its whole tiles' values and the head tile's prefix."""
    kind = events.slot.kind
    first_tile = events.tile_of[lo]
    head = hi - 1
    head_tile = events.tile_of[head]
    whole = head_tile - first_tile
    steps = int(whole.max()) if len(whole) else 0
    totals = events.tile_total
    if kind is SlotKind.SUM:
        total = np.zeros(len(lo), np.float64)
        error = np.zeros(len(lo), np.float64)
        for j in range(steps):
            x = np.where(j < whole, totals[np.minimum(first_tile + j, head_tile)], 0.0)
            total, error = _two_sum(total, error, x)
        total, error = _two_sum(total, error, events.prefix[head])
        return total + error
    pick = np.minimum if kind is SlotKind.MIN else np.maximum
    merged = events.prefix[head].copy()
    for j in range(steps):
        inside = j < whole
        x = totals[np.minimum(first_tile + j, head_tile)]
        merged = np.where(inside, pick(merged, x), merged)
    return merged


def _two_sum(total: F64, error: F64, x: F64) -> tuple[F64, F64]:
    """``total + x`` rounded, its exact rounding error added to ``error``."""
    s = total + x
    bp = s - total
    err = (total - (s - bp)) + (x - bp)
    return s, error + err
