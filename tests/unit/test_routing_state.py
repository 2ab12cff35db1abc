"""Routing state transitions: validation names the problem; JSON round trips."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.errors import InvalidInput, ModelNotFound, ScoringError, Status
from server.routing.state import (
    AuditEntry,
    Canary,
    CanaryRequest,
    EndpointState,
    RoutingConflict,
    RoutingState,
    add_version,
    check_name,
    initial_state,
    parse_rollout,
    promote,
    remove_version,
    rollback,
    set_routing,
)

BASE = initial_state(["1", "2", "3", "10"], "2")


def route(
    state: EndpointState = BASE,
    *,
    champion: str | None = None,
    canary: CanaryRequest | None = None,
    shadows: tuple[str, ...] = (),
    rollout: dict[str, object] | None = None,
) -> EndpointState:
    return set_routing(
        "fraud",
        state,
        champion=champion,
        canary=canary,
        shadows=shadows,
        rollout=rollout,
        salt_factory=iter(f"salt-{i}" for i in range(100)).__next__,
    )


def test_initial_and_add_remove() -> None:
    assert BASE.loaded == ("1", "2", "3", "10")  # numeric order
    assert add_version(None, "7") == EndpointState(loaded=("7",), champion="7")
    assert add_version(BASE, "4").loaded == ("1", "2", "3", "4", "10")
    assert add_version(BASE, "3") is BASE
    assert remove_version("fraud", BASE, "3").loaded == ("1", "2", "10")


@pytest.mark.parametrize(
    ("version", "error", "needle"),
    [
        ("2", RoutingConflict, "champion"),
        ("3", RoutingConflict, "canary"),
        ("10", RoutingConflict, "shadow"),
        ("9", ModelNotFound, "'9'"),
    ],
)
def test_routed_or_unknown_version_cannot_be_unloaded(
    version: str, error: type[ScoringError], needle: str
) -> None:
    state = route(canary=CanaryRequest("3", 100), shadows=("10",))
    with pytest.raises(error, match=needle):
        remove_version("fraud", state, version)


def test_previous_champion_may_be_unloaded_then_rollback_is_refused() -> None:
    state = route(champion="3")
    assert state.previous_champion == "2"
    without = remove_version("fraud", state, "2")
    with pytest.raises(RoutingConflict, match="not loaded"):
        rollback("fraud", without)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"canary": CanaryRequest("3", 10_001)}, InvalidInput, "canary.share_bp"),
        ({"canary": CanaryRequest("3", -1)}, InvalidInput, "canary.share_bp"),
        ({"canary": CanaryRequest("2", 10)}, InvalidInput, "also the champion"),
        ({"canary": CanaryRequest("9", 10)}, ModelNotFound, "canary.version"),
        ({"champion": "9"}, ModelNotFound, "champion"),
        ({"shadows": ("2",)}, InvalidInput, r"shadows\[0\].*also the champion"),
        ({"shadows": ("1", "1")}, InvalidInput, r"shadows\[1\].*twice"),
        (
            {"canary": CanaryRequest("3", 10), "shadows": ("3",)},
            InvalidInput,
            "also the canary",
        ),
        ({"shadows": ("../x",)}, InvalidInput, "not a valid name"),
    ],
)
def test_set_routing_refusals_name_the_problem(
    kwargs: dict[str, object], error: type[ScoringError], needle: str
) -> None:
    with pytest.raises(error, match=needle):
        route(**kwargs)  # type: ignore[arg-type]


def test_canary_salt_is_kept_while_the_version_is_unchanged() -> None:
    first = route(canary=CanaryRequest("3", 1000))
    assert first.canary == Canary("3", 1000, "salt-0")
    raised = route(first, canary=CanaryRequest("3", 2000))
    assert raised.canary == Canary("3", 2000, "salt-0")
    given = route(raised, canary=CanaryRequest("3", 2000, salt="mine", entity="customer_id"))
    assert given.canary == Canary("3", 2000, "mine", "customer_id")
    kept_entity = route(given, canary=CanaryRequest("3", 3000))
    assert kept_entity.canary == Canary("3", 3000, "mine", "customer_id")


def test_new_canary_version_gets_a_new_salt() -> None:
    first = route(canary=CanaryRequest("3", 1000))
    salts = iter(["fresh"])
    moved = set_routing(
        "fraud",
        first,
        champion=None,
        canary=CanaryRequest("10", 1000),
        shadows=(),
        rollout=None,
        salt_factory=salts.__next__,
    )
    assert moved.canary == Canary("10", 1000, "fresh")


def test_promote_and_rollback() -> None:
    with pytest.raises(RoutingConflict, match="no canary"):
        promote("fraud", BASE)
    with pytest.raises(RoutingConflict, match="no previous champion"):
        rollback("fraud", BASE)
    canaried = route(canary=CanaryRequest("3", 500), rollout={"max_error_rate": 0.01})
    promoted = promote("fraud", canaried)
    assert (promoted.champion, promoted.previous_champion) == ("3", "2")
    assert promoted.canary is None and promoted.rollout is None
    back = rollback("fraud", promoted)
    assert (back.champion, back.previous_champion) == ("2", "3")
    # a canary or shadow of the version rolled back to is dropped
    busy = route(promoted, canary=CanaryRequest("10", 100), shadows=("2",))
    busy = replace(busy, previous_champion="2")
    restored = rollback("fraud", busy)
    assert restored.champion == "2" and restored.shadows == ()
    assert restored.canary is not None and restored.canary.version == "10"
    busy2 = replace(route(promoted, canary=CanaryRequest("2", 100)), previous_champion="2")
    assert rollback("fraud", busy2).canary is None


def test_changing_champion_records_previous() -> None:
    changed = route(champion="10")
    assert (changed.champion, changed.previous_champion) == ("10", "2")
    same = route(changed, champion="10")
    assert same.previous_champion == "2"


def test_state_and_audit_round_trip_through_json() -> None:
    endpoint = replace(
        route(canary=CanaryRequest("3", 250, entity="card_id"), shadows=("10",), rollout={"a": 1}),
        revision=4,
        updated_at=1.5,
        updated_by="alice",
    )
    state = RoutingState(4, {"fraud": endpoint, "credit": initial_state(["1"], "1")})
    again = RoutingState.from_json(4, state.to_json())
    assert again == state
    assert RoutingState.from_json(0, None) == RoutingState()
    entry = AuditEntry(
        time=2.0,
        actor="alice",
        peer="ipv4:1.2.3.4:5",
        endpoint="fraud",
        action="set_routing",
        reason="why",
        outcome="applied",
        before=BASE,
        after=endpoint,
        revision=4,
    )
    assert AuditEntry.from_json("1-0", entry.to_json()) == replace(entry, id="1-0")


def test_with_endpoint_bumps_revision_and_same_routing_ignores_stamps() -> None:
    state = RoutingState(3, {"fraud": BASE})
    assert state.with_endpoint("fraud", BASE).revision == 4
    assert BASE.same_routing(replace(BASE, revision=9, updated_by="x"))
    assert not BASE.same_routing(route(champion="3"))
    with pytest.raises(ModelNotFound, match=r"'credit'.*fraud"):
        state.endpoint("credit")


def test_names_and_rollout_parsing() -> None:
    assert check_name("version", "v1.2_b-3") == "v1.2_b-3"
    for bad in ("", "..", "a/b", "a b"):
        with pytest.raises(InvalidInput):
            check_name("version", bad)
    assert parse_rollout("") is None
    assert parse_rollout('{"max_p99_ms": 5}') == {"max_p99_ms": 5}
    with pytest.raises(InvalidInput, match="rollout_json: must be a JSON object"):
        parse_rollout("[1]")
    with pytest.raises(InvalidInput, match="rollout_json: not valid JSON"):
        parse_rollout("{")
    assert RoutingConflict("x").status == Status.FAILED_PRECONDITION


def test_names_longer_than_a_directory_name_are_refused_naming_the_limit() -> None:
    from server.errors import InvalidInput
    from server.manifest import MAX_MODEL_NAME_LENGTH
    from server.routing.state import check_name

    assert check_name("endpoint", "x" * MAX_MODEL_NAME_LENGTH) == "x" * MAX_MODEL_NAME_LENGTH
    with pytest.raises(InvalidInput) as refused:
        check_name("endpoint", "x" * 256)  # one path component past 255 bytes: ENAMETOOLONG
    assert str(refused.value) == "endpoint: 256 characters exceed the limit of 128"
