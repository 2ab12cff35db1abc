"""Sealed tiles of stream-group hashes kept in process; only open tiles are read. Pure.

The tile store's apply script drops an event whose time is below the hash's
``_last_ts`` minus the group's allowed lateness, and ``_last_ts`` only grows
(:mod:`feature_streams.tile_store`). So a tile ``[s, s + T)`` with
``s + T <= _last_ts - lateness`` never changes again: it is *sealed*. For a slot of
tile ``T`` the sealed tiles at ``_last_ts = L`` are those starting before
``bound(L, T) = floor(L - lateness, T)``.

:class:`TileCache` keeps, per tile hash, the fields of sealed tiles seen at the last
read (``L``), and the fetcher then reads the hash with :func:`open_tiles_script`'s
script instead of ``HGETALL``: one ``EVALSHA`` returning ``_last_ts`` and only the
tile fields starting at or after ``bound(L, T)`` of their slot (the tiles that were
open at ``L``; filtered inside Redis, so the reply is a few fields instead of the
whole hash). The cache then holds a *view* equal to the hash: the sealed fields,
the fields just returned and ``_last_ts``; fields returned that are sealed at the
new ``_last_ts`` join the sealed ones. The reader evaluates windows on that view
exactly as on an ``HGETALL`` reply, and the merge of each read layout is memoised
per view (``memo``), so an entity read again within the same minute with nothing new
costs no merge at all.

Kept equal to an uncached read:

* a hash whose ``_last_ts`` is gone or lower than the cached one was deleted or
  re-created (expired, Redis restarted empty or restored from an older dump): the
  script then returns the whole hash and the entry is rebuilt from it;
* when ``_last_ts`` advances, sealed fields the worker's trim deletes at the new
  ``_last_ts`` (:func:`~feature_streams.windows.expiry_cutoff`) are dropped too
  (which also bounds the entry), so the view is the hash as it is once trimmed. No
  window read at ``t >= _last_ts - lateness`` reads such a tile; an uncached read at
  an earlier ``t`` sees them until the trim runs;
* fields of unknown slots and reserved fields other than ``_last_ts`` are left out of
  the view (the reader never reads them);
* only ``bytes`` replies are cached (a client decoding replies reads as before).

Residual: a hash that expires and is re-created by an event older than the cached
``bound`` and is then raised past the cached ``_last_ts`` before the next read would
keep the old sealed tiles of the window. That needs a whole retention period without
writes (days for the demo groups) followed by such a replay; :attr:`TileCache.max_age_s`
bounds how long an entry is trusted without a full read.

Bounded (``max_entries``, least recently used first out); ``max_entries == 0``
disables it. One per fetcher, used on the event loop only.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from feature_streams.keys import LAST_TS_FIELD, LAST_TS_FIELD_BYTES
from feature_streams.windows import GroupPlan, expiry_cutoff, tile_start

__all__ = ["OpenTilesScript", "TileCache", "TileCacheStats", "TileEntry", "open_tiles_script"]

_FULL = 1


@dataclass(frozen=True, slots=True)
class OpenTilesScript:
    """The read script of one stream group and its SHA1 (for ``EVALSHA``)."""

    source: str
    sha: str


def _lua_bytes(text: str) -> str:
    """``text`` as a Lua string literal of decimal escapes (safe for any slot name)."""
    return '"' + "".join(f"\\{b:03d}" for b in text.encode()) + '"'


def open_tiles_script(plan: GroupPlan) -> OpenTilesScript:
    """The script reading one hash of ``plan``'s group: ``KEYS[1]`` the hash,
    ``ARGV[1]`` the cached ``_last_ts``. Returns ``{_last_ts, full, f1, v1, ...}``:
    with ``full == 0`` the tile fields open at the cached ``_last_ts`` (start >=
    ``floor(ARGV[1] - lateness, T)`` of their slot); with ``full == 1`` (no
    ``_last_ts``, or lower than ``ARGV[1]``: the hash was re-created) every field."""
    suffixes = []
    for slot in plan.slots:
        names = [slot.name] + ([slot.name + ":ts"] if slot.kind.value == "last" else [])
        suffixes += [f"[{_lua_bytes(n)}] = {slot.tile_ms}" for n in names]
    source = f"""
local key = KEYS[1]
local lc = tonumber(ARGV[1])
local last = redis.call('HGET', key, {_lua_bytes(LAST_TS_FIELD)})
local all = redis.call('HGETALL', key)
local out = {{last or false, {_FULL}}}
if not last or not lc or not tonumber(last) or tonumber(last) < lc then
  for i = 1, #all do out[i + 2] = all[i] end
  return out
end
out[2] = 0
local x = lc - {plan.group.allowed_lateness_ms}
local tiles = {{{", ".join(suffixes)}}}
local bounds = {{}}
for suffix, t in pairs(tiles) do bounds[suffix] = x - (x % t) end
local n = 2
for i = 1, #all, 2 do
  local f = all[i]
  local c = string.find(f, ':', 1, true)
  if c then
    local b = bounds[string.sub(f, c + 1)]
    local s = b and tonumber(string.sub(f, 1, c - 1))
    if s and s >= b then
      out[n + 1] = f
      out[n + 2] = all[i + 1]
      n = n + 2
    end
  end
end
return out
"""
    return OpenTilesScript(source, hashlib.sha1(source.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class TileCacheStats:
    """Counters of one :class:`TileCache`."""

    entries: int
    hits: int
    """Reads answered with open tiles only (the script's filtered reply)."""
    unchanged: int
    """Of those, reads where nothing had changed (view and merges reused)."""
    full_reads: int
    """Whole reads of a hash with events (not cached yet, re-created, entry too old)."""
    evictions: int


@dataclass(slots=True)
class TileEntry:
    """One hash's cached state at its ``last_ms``: the base a script read is made on.
    ``sealed``, ``open`` and ``view`` are never mutated once built."""

    last_ms: int
    read_at: float
    sealed: dict[bytes, bytes]
    open: dict[bytes, bytes]
    view: dict[bytes, bytes]
    memo: dict[object, object] = field(default_factory=dict)


class TileCache:
    """Bounded LRU of sealed tile fields per tile hash (see the module doc)."""

    def __init__(
        self,
        max_entries: int = 100_000,
        max_age_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 0 or max_age_s <= 0:
            raise ValueError("max_entries must be >= 0 and max_age_s > 0")
        self._max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: OrderedDict[str, TileEntry] = OrderedDict()
        self._scripts: dict[str, OpenTilesScript] = {}
        self._unloaded: list[OpenTilesScript] = []
        self._hits = 0
        self._unchanged = 0
        self._full = 0
        self._evictions = 0

    @property
    def enabled(self) -> bool:
        """False when built with ``max_entries == 0`` (nothing is ever kept)."""
        return self._max_entries > 0

    def stats(self) -> TileCacheStats:
        """Current size and counters."""
        return TileCacheStats(
            len(self._entries), self._hits, self._unchanged, self._full, self._evictions
        )

    def script(self, plan: GroupPlan) -> OpenTilesScript:
        """The read script of ``plan``'s group (built once per group)."""
        name = plan.group.name
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = open_tiles_script(plan)
            self._unloaded.append(script)
        return script

    def scripts(self) -> Sequence[OpenTilesScript]:
        """Every script handed out so far (to ``SCRIPT LOAD`` after ``NOSCRIPT``)."""
        return tuple(self._scripts.values())

    def take_unloaded(self) -> list[OpenTilesScript]:
        """Scripts handed out since the last call, to ``SCRIPT LOAD`` before a read
        that may use them (a read answered ``NOSCRIPT`` loads every script again)."""
        unloaded, self._unloaded = self._unloaded, []
        return unloaded

    def lookup(self, key: str) -> TileEntry | None:
        """The cached state of ``key``: pass its ``last_ms`` to the script and the entry
        to :meth:`reply` with the answer (it stays the base even if the cache drops it
        meanwhile). ``None``: read the whole hash (nothing cached, or the entry is
        older than ``max_age_s``)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry.read_at > self.max_age_s:
            del self._entries[key]
            return None
        return entry

    def drop(self, key: str) -> None:
        """Forget ``key`` (its read failed)."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget every hash (e.g. Redis lost its scripts: it may have lost data too)."""
        self._entries.clear()

    def full(
        self, plan: GroupPlan, key: str, fields: Mapping[bytes, bytes]
    ) -> tuple[Mapping[bytes, bytes], dict[object, object] | None]:
        """Take a whole hash as read (``HGETALL``); returns the view to read windows on
        and its merge memo (``None`` when not cached: no ``_last_ts``, ``str`` replies)."""
        raw_last = fields.get(LAST_TS_FIELD_BYTES)
        if not self.enabled or not isinstance(raw_last, bytes):
            self._entries.pop(key, None)
            return fields, None
        self._full += 1
        try:
            last_ms = int(float(raw_last))
            sealed, open_ = _split(plan, fields.items(), last_ms)
        except (ValueError, OverflowError):  # the reader reports it (VALUE_INVALID)
            self._entries.pop(key, None)
            return fields, None
        return self._keep(key, last_ms, raw_last, sealed, open_)

    def reply(
        self, plan: GroupPlan, key: str, reply: Sequence[object], entry: TileEntry
    ) -> tuple[Mapping[bytes, bytes], dict[object, object] | None]:
        """Take the script's reply for ``key``, read with ``entry.last_ms`` (``entry``:
        what :meth:`lookup` gave); returns the view and its memo."""
        raw_last, full = reply[0], reply[1]
        it = iter(reply[2:])
        returned: dict[bytes, bytes] = dict(zip(it, it, strict=True))  # type: ignore[arg-type]
        if full or not isinstance(raw_last, bytes):
            return self.full(plan, key, returned)
        try:
            last_ms = int(float(raw_last))
        except (ValueError, OverflowError):  # a number to Lua only: reported as invalid
            self._entries.pop(key, None)
            return {LAST_TS_FIELD_BYTES: raw_last}, None
        self._hits += 1
        if last_ms == entry.last_ms and returned == entry.open:
            self._unchanged += 1
            if self._entries.get(key) is entry:
                self._entries.move_to_end(key)
                entry.read_at = self._clock()
            return entry.view, entry.memo
        newly_sealed, open_ = _split(plan, returned.items(), last_ms)
        sealed = entry.sealed | newly_sealed
        if last_ms != entry.last_ms:
            sealed = _unexpired(plan, sealed, last_ms)
        return self._keep(key, last_ms, raw_last, sealed, open_)

    def _keep(
        self,
        key: str,
        last_ms: int,
        raw_last: bytes,
        sealed: dict[bytes, bytes],
        open_: dict[bytes, bytes],
    ) -> tuple[Mapping[bytes, bytes], dict[object, object]]:
        view = sealed | open_
        view[LAST_TS_FIELD_BYTES] = raw_last
        entry = TileEntry(last_ms, self._clock(), sealed, open_, view)
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self._max_entries:
            entries.popitem(last=False)
            self._evictions += 1
        return view, entry.memo


def _split(
    plan: GroupPlan, items: Iterable[tuple[bytes, bytes]], last_ms: int
) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """Tile fields of known slots split into (sealed at ``last_ms``, open)."""
    suffixes = plan.field_suffixes
    lateness = plan.group.allowed_lateness_ms
    bounds: dict[int, int] = {}
    sealed: dict[bytes, bytes] = {}
    open_: dict[bytes, bytes] = {}
    for name, value in items:
        start, sep, suffix = name.partition(b":")
        known = suffixes.get(suffix) if sep else None
        if known is None or not start.isdigit():
            continue  # reserved (_last_ts, _off:...) or a slot no longer defined
        tile_ms = known[0].tile_ms
        bound = bounds.get(tile_ms)
        if bound is None:
            bound = bounds[tile_ms] = tile_start(last_ms - lateness, tile_ms)
        (sealed if int(start) < bound else open_)[name] = value
    return sealed, open_


def _unexpired(plan: GroupPlan, sealed: dict[bytes, bytes], last_ms: int) -> dict[bytes, bytes]:
    """``sealed`` without the fields the worker's trim deletes at ``last_ms``."""
    suffixes = plan.field_suffixes
    cutoffs: dict[bytes, int] = {}
    kept: dict[bytes, bytes] = {}
    for name, value in sealed.items():
        start, _, suffix = name.partition(b":")
        cutoff = cutoffs.get(suffix)
        if cutoff is None:
            cutoff = cutoffs[suffix] = expiry_cutoff(plan, suffixes[suffix][0], last_ms)
        if int(start) >= cutoff:
            kept[name] = value
    return kept
