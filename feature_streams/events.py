"""Event decoding and validation, and the dead-letter record format.

An event is one Kafka record whose value is a UTF-8 JSON object, e.g.::

    {"card_id": "c-1", "merchant_id": "m-9", "event_time_ms": 1700000000000,
     "amount": 12.5, "is_international": 0}

For each stream group reading its topic the event must hold the group's key
field (non-empty string or integer), its event-time field (non-negative integer
epoch ms), every value field of a slot the event feeds (a finite JSON number;
``true``/``false`` are not numbers), and every ``where``-filter field (a JSON
scalar: string, number or boolean). Anything else raises
:class:`MalformedEventError` naming the field. Validation is all-or-nothing
across the groups of a topic: a record malformed for one group feeds none.

Dead letters: a malformed record is re-published to ``<topic>.dlq`` with its
original key and value bytes untouched and the reason in headers
(``dlq.topic``, ``dlq.partition``, ``dlq.offset``, ``dlq.error``, ``dlq.field``,
``dlq.group``; all UTF-8). :meth:`DeadLetter.from_record` parses one back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from feature_streams.windows import (
    GroupPlan,
    InvalidEventError,
    TileUpdate,
    event_key,
    event_time,
    updates_for_event,
)

__all__ = [
    "DLQ_SUFFIX",
    "DeadLetter",
    "GroupEvent",
    "MalformedEventError",
    "dead_letter_topic",
    "decode_event",
    "group_events",
    "validate_event",
]

DLQ_SUFFIX = ".dlq"
_HEADER_PREFIX = "dlq."


class MalformedEventError(ValueError):
    """An event cannot be folded; ``field`` names the offending field (``None``
    when the record is not a JSON object at all) and ``group`` the stream group."""

    def __init__(self, reason: str, field: str | None = None, group: str | None = None) -> None:
        self.reason = reason
        self.field = field
        self.group = group
        where = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{where}{reason}")


@dataclass(frozen=True, slots=True)
class GroupEvent:
    """A valid event as one stream group sees it: entity key, event time, updates."""

    group: str
    key: str
    ts_ms: int
    updates: tuple[TileUpdate, ...]


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def decode_event(raw: bytes | None) -> dict[str, object]:
    """JSON bytes -> dict; raises :class:`MalformedEventError` (``field=None``) for
    an empty record, invalid UTF-8/JSON (``NaN``/``Infinity`` included) or a
    non-object."""
    if raw is None:
        raise MalformedEventError("record has no value")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting: Recursion
        raise MalformedEventError(f"not valid JSON: {exc!r}"[:300]) from None
    if not isinstance(value, dict):
        raise MalformedEventError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _is_number(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def validate_event(plan: GroupPlan, event: Mapping[str, object]) -> GroupEvent:
    """Check ``event`` against one stream group and compute its tile updates.
    Raises :class:`MalformedEventError` naming the first bad field."""
    group = plan.group
    try:
        key = event_key(plan, event)
    except InvalidEventError as exc:
        raise MalformedEventError(_reason(exc), group.key, group.name) from None
    try:
        ts = event_time(plan, event)
    except InvalidEventError as exc:
        raise MalformedEventError(_reason(exc), group.event_time_field, group.name) from None
    for slot in plan.slots:
        matches = True
        for name, want in slot.where:
            got = event.get(name)
            if name not in event or not isinstance(got, str | int | float):
                raise MalformedEventError(
                    f"expected a JSON scalar for a where filter, got {got!r}", name, group.name
                )
            matches = matches and got == want
        if (
            matches
            and slot.field is not None
            and slot.field != group.event_time_field
            and not _is_number(event.get(slot.field))
        ):
            raise MalformedEventError(
                f"expected a finite number, got {event.get(slot.field)!r}", slot.field, group.name
            )
    try:
        updates = updates_for_event(plan, event)
    except InvalidEventError as exc:  # pragma: no cover - the checks above cover it
        raise MalformedEventError(_reason(exc), None, group.name) from None
    return GroupEvent(group.name, key, ts, tuple(updates))


def _reason(exc: InvalidEventError) -> str:
    text = str(exc)
    _, sep, rest = text.partition("': ")
    return rest if sep else text


def group_events(plans: Sequence[GroupPlan], raw: bytes | None) -> list[GroupEvent]:
    """Decode one record and validate it against every group of its topic (all or
    nothing); raises :class:`MalformedEventError`."""
    event = decode_event(raw)
    return [validate_event(plan, event) for plan in plans]


def dead_letter_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``: ``<topic>.dlq``."""
    return topic + DLQ_SUFFIX


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A malformed record: original bytes plus where it came from and why."""

    topic: str
    partition: int
    offset: int
    error: str
    value: bytes | None
    key: bytes | None = None
    field: str | None = None
    group: str | None = None

    @classmethod
    def of(
        cls,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None,
        key: bytes | None,
        error: MalformedEventError,
    ) -> DeadLetter:
        """The dead letter of one record rejected with ``error``."""
        return cls(topic, partition, offset, str(error), value, key, error.field, error.group)

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka record headers carrying the metadata (value and key go unchanged)."""
        items = {
            "topic": self.topic,
            "partition": str(self.partition),
            "offset": str(self.offset),
            "error": self.error,
            "field": self.field,
            "group": self.group,
        }
        return [(_HEADER_PREFIX + k, v.encode()) for k, v in items.items() if v is not None]

    @classmethod
    def from_record(
        cls,
        value: bytes | None,
        key: bytes | None,
        headers: Iterable[tuple[str, bytes]],
    ) -> DeadLetter:
        """Parse a record read from a dead-letter topic; raises ``ValueError`` when a
        required header is missing."""
        meta = {
            k.removeprefix(_HEADER_PREFIX): v.decode()
            for k, v in headers
            if k.startswith(_HEADER_PREFIX)
        }
        try:
            return cls(
                topic=meta["topic"],
                partition=int(meta["partition"]),
                offset=int(meta["offset"]),
                error=meta["error"],
                value=value,
                key=key,
                field=meta.get("field"),
                group=meta.get("group"),
            )
        except KeyError as exc:
            raise ValueError(f"not a dead-letter record: header {exc} missing") from None
