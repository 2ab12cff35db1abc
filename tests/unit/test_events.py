"""Event decoding/validation and the dead-letter record format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feature_streams.definitions import load_definitions
from feature_streams.events import (
    DeadLetter,
    MalformedEventError,
    dead_letter_topic,
    decode_event,
    group_events,
    validate_event,
)
from feature_streams.windows import GroupPlan, updates_for_event

REPO = Path(__file__).resolve().parents[2]
GOOD: dict[str, object] = {
    "card_id": "c-1",
    "merchant_id": "m-9",
    "event_time_ms": 1_700_000_000_000,
    "amount": 12.5,
    "is_international": 1,
}


@pytest.fixture(scope="module")
def plans() -> tuple[GroupPlan, GroupPlan]:
    defs = load_definitions(REPO / "features.yaml")
    return (
        GroupPlan.build(defs.stream_groups["card_activity"]),
        GroupPlan.build(defs.stream_groups["merchant_activity"]),
    )


def test_valid_event_yields_key_time_and_updates(plans: tuple[GroupPlan, GroupPlan]) -> None:
    card, merchant = plans
    evs = group_events(plans, json.dumps(GOOD).encode())
    assert [(e.group, e.key, e.ts_ms) for e in evs] == [
        ("card_activity", "c-1", 1_700_000_000_000),
        ("merchant_activity", "m-9", 1_700_000_000_000),
    ]
    assert list(evs[0].updates) == updates_for_event(card, GOOD)
    assert list(evs[1].updates) == updates_for_event(merchant, GOOD)


def test_integer_key_is_text(plans: tuple[GroupPlan, GroupPlan]) -> None:
    assert validate_event(plans[0], {**GOOD, "card_id": 42}).key == "42"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"', b'{"amount": NaN}', None],
)
def test_undecodable_records_are_malformed_without_a_field(raw: bytes | None) -> None:
    with pytest.raises(MalformedEventError) as info:
        decode_event(raw)
    assert info.value.field is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"card_id": None}, "card_id"),
        ({"card_id": ""}, "card_id"),
        ({"card_id": True}, "card_id"),
        ({"event_time_ms": "yesterday"}, "event_time_ms"),
        ({"event_time_ms": -5}, "event_time_ms"),
        ({"event_time_ms": 1.5}, "event_time_ms"),
        ({"amount": "12.50"}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": None}, "amount"),
        ({"amount": 1e400}, "amount"),
        ({"is_international": None}, "is_international"),
        ({"is_international": [1]}, "is_international"),
    ],
)
def test_bad_fields_are_named(
    plans: tuple[GroupPlan, GroupPlan], change: dict[str, object], field: str
) -> None:
    event = {**GOOD, **change}
    with pytest.raises(MalformedEventError) as info:
        validate_event(plans[0], event)
    assert info.value.field == field
    assert info.value.group == "card_activity"
    assert repr(field) in str(info.value)


def test_missing_fields_are_named(plans: tuple[GroupPlan, GroupPlan]) -> None:
    for name in ("card_id", "event_time_ms", "amount", "is_international"):
        event = {k: v for k, v in GOOD.items() if k != name}
        with pytest.raises(MalformedEventError) as info:
            validate_event(plans[0], event)
        assert info.value.field == name


def test_validation_is_all_or_nothing_across_groups(plans: tuple[GroupPlan, GroupPlan]) -> None:
    event = {k: v for k, v in GOOD.items() if k != "merchant_id"}
    assert validate_event(plans[0], event).key == "c-1"
    with pytest.raises(MalformedEventError) as info:
        group_events(plans, json.dumps(event).encode())
    assert (info.value.field, info.value.group) == ("merchant_id", "merchant_activity")


def test_dead_letter_round_trips_through_headers() -> None:
    err = MalformedEventError("expected a finite number, got '1'", "amount", "card_activity")
    letter = DeadLetter.of("tx", 3, 17, b'{"amount": "1"}', b"c-1", err)
    headers = letter.headers()
    assert ("dlq.offset", b"17") in headers
    assert DeadLetter.from_record(b'{"amount": "1"}', b"c-1", headers) == letter
    assert dead_letter_topic("tx") == "tx.dlq"


def test_dead_letter_without_field_and_bad_record() -> None:
    letter = DeadLetter.of("tx", 0, 1, b"{", None, MalformedEventError("not valid JSON"))
    parsed = DeadLetter.from_record(b"{", None, letter.headers())
    assert parsed.field is None and parsed.error == "not valid JSON"
    with pytest.raises(ValueError, match="not a dead-letter record"):
        DeadLetter.from_record(b"{}", None, [("dlq.topic", b"tx")])


def test_script_payload_refuses_a_newline_in_a_field() -> None:
    """The apply script splits each key's events on newlines: a field may never hold one."""
    from feature_streams.tile_store import EventUpdates, KeyBatch
    from feature_streams.windows import TileUpdate, UpdateOp

    good = TileUpdate(UpdateOp.INCR, "1700000000000:count@1m", 1.0)
    bad = TileUpdate(UpdateOp.INCR, "1700000000000:count@1m\nHSET x", 1.0)
    ok = KeyBatch("st:g:k", "t", 0, 60_000, 1_000, [EventUpdates(1, 1, [good])])
    assert len(ok.script_args()) == 4
    with pytest.raises(ValueError, match="newline"):
        KeyBatch("st:g:k", "t", 0, 60_000, 1_000, [EventUpdates(1, 1, [bad])]).script_args()
