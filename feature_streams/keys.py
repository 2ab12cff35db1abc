"""The Redis key layout of the feature store, named once for writers and readers.

The stream worker (:mod:`feature_streams.tile_store`), the batch loader
(:mod:`feature_streams.batch_store`) and the online fetcher
(:mod:`feature_streams.fetcher`) build every key and reserved field name here, and
the Lua scripts are built from these constants (:func:`lua_string`), so a name
cannot drift between the side that writes and the side that reads. Pure: no I/O.

Stream tiles, one hash per stream group and entity key::

    st:<group>:<entity key>          e.g.  st:card_activity:c-123

Group names match :data:`feature_streams.definitions.NAME_PATTERN`, so the prefix
is unambiguous even when the entity key holds ``:``. Fields: tile fields
``"<tile_start_ms>:<slot>"`` (see :mod:`feature_streams.windows`), the per-partition
offsets :func:`offset_field` and :data:`LAST_TS_FIELD`. Reserved fields start with
``_``; tile fields start with a digit.

Batch snapshots (``<g>`` group, ``<s>`` snapshot id, ``<e>`` entity id)::

    bf:<g>:<s>:<e>        hash    field -> value as float text, one per entity
    bf:{<g>}:active       string  id of the snapshot readers use
    bf:{<g>}:previous     string  id of the snapshot rollback restores
    bf:{<g>}:snapshots    hash    id -> JSON {state, created_at_ms, rows, ...}

The three metadata keys share the hash tag ``{<g>}`` (one Redis Cluster slot), so a
script may touch them together; data keys carry no tag and spread over the cluster.
"""

from __future__ import annotations

import re
from typing import Final

from feature_streams.definitions import NAME_PATTERN

__all__ = [
    "ACTIVE",
    "BATCH_PREFIX",
    "DELETING",
    "LAST_TS_FIELD",
    "LAST_TS_FIELD_BYTES",
    "LOADING",
    "PREVIOUS",
    "READABLE_STATES",
    "READY",
    "RETIRED",
    "TILE_PREFIX",
    "VERSION_FIELD",
    "VERSION_FIELD_BYTES",
    "active_key",
    "as_text",
    "check_group",
    "check_snapshot_id",
    "data_key",
    "data_key_pattern",
    "lua_string",
    "meta_keys",
    "offset_field",
    "previous_key",
    "registry_key",
    "tile_key",
]

# --- stream tiles ------------------------------------------------------------------

TILE_PREFIX: Final = "st"
LAST_TS_FIELD: Final = "_last_ts"
"""Tile hash field: the newest applied event time (epoch ms). The freshness mark,
the "max seen" of the lateness rule and the ``now`` of trimming."""
LAST_TS_FIELD_BYTES: Final = LAST_TS_FIELD.encode()
""":data:`LAST_TS_FIELD` as a client without ``decode_responses`` returns it."""
OFFSET_FIELD_PREFIX: Final = "_off"
VERSION_FIELD: Final = "_v"
"""Tile hash field: the hash's version, raised by every write that changes a tile
(the apply script, trimming) to ``max(version + 1, Redis TIME in microseconds)``, so
a hash deleted and created again (expiry, ``DEL``) or written after a failover starts
above any version it had. A reader holding the hash of one version may reuse it while
the version is the same (:mod:`feature_streams.tile_cache`)."""
VERSION_FIELD_BYTES: Final = VERSION_FIELD.encode()
""":data:`VERSION_FIELD` as a client without ``decode_responses`` returns it."""


def tile_key(group: str, entity_key: str) -> str:
    """Redis key of one entity's tiles in one stream group: ``st:<group>:<key>``."""
    return f"{TILE_PREFIX}:{group}:{entity_key}"


def offset_field(topic: str, partition: int) -> str:
    """Tile hash field holding the last applied offset of ``topic``/``partition``."""
    return f"{OFFSET_FIELD_PREFIX}:{topic}:{partition}"


# --- batch snapshots ---------------------------------------------------------------

BATCH_PREFIX: Final = "bf"

LOADING: Final = "loading"
READY: Final = "ready"
ACTIVE: Final = "active"
PREVIOUS: Final = "previous"
RETIRED: Final = "retired"
DELETING: Final = "deleting"
"""Snapshot states as stored in the registry entry's ``state``: ``loading`` ->
``ready`` -> ``active`` <-> ``previous`` -> ``retired`` -> ``deleting`` -> gone."""
READABLE_STATES: Final = frozenset({READY, ACTIVE, PREVIOUS, RETIRED})
"""States whose data keys are complete and not being deleted."""

_GROUP_RE: Final = re.compile(NAME_PATTERN)
_SNAPSHOT_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_group(group: str) -> str:
    """``group`` if it is a valid group name, else ``ValueError`` naming it."""
    if not _GROUP_RE.match(group):
        raise ValueError(f"invalid batch group name {group!r}")
    return group


def check_snapshot_id(snapshot_id: str) -> str:
    """``snapshot_id`` if it is a valid snapshot id, else ``ValueError`` naming it."""
    if not _SNAPSHOT_RE.match(snapshot_id):
        raise ValueError(f"invalid snapshot id {snapshot_id!r} (use [A-Za-z0-9_.-], 1-64)")
    return snapshot_id


def data_key(group: str, snapshot_id: str, entity_id: str) -> str:
    """Key of one entity's hash in one snapshot: ``bf:<g>:<s>:<e>``."""
    return f"{BATCH_PREFIX}:{group}:{snapshot_id}:{entity_id}"


def data_key_pattern(group: str, snapshot_id: str) -> str:
    """``SCAN MATCH`` pattern of every data key of one snapshot."""
    return f"{BATCH_PREFIX}:{group}:{snapshot_id}:*"


def active_key(group: str) -> str:
    """Pointer to the snapshot readers use: ``bf:{<g>}:active``."""
    return f"{BATCH_PREFIX}:{{{group}}}:active"


def previous_key(group: str) -> str:
    """Pointer to the snapshot a rollback restores: ``bf:{<g>}:previous``."""
    return f"{BATCH_PREFIX}:{{{group}}}:previous"


def registry_key(group: str) -> str:
    """Hash of every snapshot's JSON entry: ``bf:{<g>}:snapshots``."""
    return f"{BATCH_PREFIX}:{{{group}}}:snapshots"


def meta_keys(group: str) -> list[str]:
    """``[active, previous, registry]`` of a (validated) group: the scripts' ``KEYS``."""
    check_group(group)
    return [active_key(group), previous_key(group), registry_key(group)]


_LUA_SAFE: Final = re.compile(r"^[A-Za-z0-9_:.-]*$")


def lua_string(value: str) -> str:
    """``value`` as a single-quoted Lua string literal, for building script sources
    from these constants (``ValueError`` for a character that would need escaping)."""
    if not _LUA_SAFE.match(value):
        raise ValueError(f"{value!r} is not a plain Lua string")
    return f"'{value}'"


def as_text(value: object) -> str | None:
    """A pointer, id or field name as Redis returned it (``bytes`` or ``str``) as text."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
