"""Router: champion / sticky canary / pinned choice, shadows on the decision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.errors import ModelNotFound
from server.router import (
    BASIS_POINTS,
    CanaryRoute,
    EndpointRouting,
    Route,
    RoutingTable,
    canary_bucket,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CARDS = [f"card-{i}" for i in range(10_000)]
VERSIONS = frozenset({"1", "2", "3", "4"})


def table(share_bp: int, salt: str = "s1", shadows: tuple[str, ...] = ()) -> RoutingTable:
    canary = CanaryRoute("3", share_bp, salt, "card_id")
    return RoutingTable({"fraud": EndpointRouting("2", VERSIONS, canary, shadows)})


def versions_by_card(routing: RoutingTable) -> dict[str, str]:
    return {card: routing.choose("fraud", None, {"card_id": card}).version for card in CARDS}


def test_canary_share_is_sticky_and_grows_one_way() -> None:
    first = versions_by_card(table(1000))
    share = sum(v == "3" for v in first.values()) / len(CARDS)
    assert 0.09 <= share <= 0.11, share
    assert versions_by_card(table(1000)) == first  # same cards, same versions
    raised = versions_by_card(table(2000))
    assert 0.19 <= sum(v == "3" for v in raised.values()) / len(CARDS) <= 0.21
    moved_back = [c for c, v in first.items() if v == "3" and raised[c] != "3"]
    assert moved_back == []
    # a new rollout (new salt) reshuffles which cards are in the share
    other = versions_by_card(table(1000, salt="s2"))
    assert other != first


def test_share_bounds() -> None:
    assert set(versions_by_card(table(0)).values()) == {"2"}
    assert set(versions_by_card(table(BASIS_POINTS)).values()) == {"3"}
    with pytest.raises(ValueError, match="outside"):
        CanaryRoute("3", BASIS_POINTS + 1, "s", "card_id")


def test_bucket_is_stable_across_processes() -> None:
    """Not Python's randomised hash(): another interpreter with another seed agrees."""
    probe = "from server.router import canary_bucket; print(canary_bucket('salt', 'card-42'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, check=True
    )
    assert int(out.stdout) == canary_bucket("salt", "card-42")
    assert 0 <= canary_bucket("salt", "card-42") < BASIS_POINTS


def test_decisions_name_route_and_shadows() -> None:
    routing = table(BASIS_POINTS, shadows=("4",))
    canary = routing.choose("fraud", None, {"card_id": "c"})
    assert (canary.version, canary.route, canary.shadows) == ("3", Route.CANARY, ("4",))
    no_entity = routing.choose("fraud", None, {"customer_id": "c"})
    assert (no_entity.version, no_entity.route, no_entity.shadows) == ("2", Route.CHAMPION, ("4",))
    assert routing.choose("fraud", None).route == Route.CHAMPION
    pinned = routing.choose("fraud", "1", {"card_id": "c"})
    assert (pinned.version, pinned.route, pinned.shadows) == ("1", Route.PINNED, ())


def test_unknown_endpoint_or_version_is_not_found() -> None:
    routing = table(0)
    with pytest.raises(ModelNotFound, match="'nope'"):
        routing.choose("nope", None)
    with pytest.raises(ModelNotFound, match="'9'"):
        routing.choose("fraud", "9")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"champion": "9"}, "champion '9'"),
        ({"canary": CanaryRoute("9", 10, "s", "card_id")}, "canary '9'"),
        ({"canary": CanaryRoute("2", 10, "s", "card_id")}, "also the champion"),
        ({"shadows": ("9",)}, "shadow '9'"),
    ],
)
def test_routing_only_over_loaded_versions(kwargs: dict[str, object], needle: str) -> None:
    arguments: dict[str, object] = {"champion": "2", "versions": VERSIONS, **kwargs}
    with pytest.raises(ValueError, match=needle):
        EndpointRouting(**arguments)  # type: ignore[arg-type]
