"""Routing: which loaded version answers a request. Pure: no I/O, no clock.

An endpoint (e.g. ``fraud``) has a champion version, optionally one canary taking a
sticky share of traffic, and any number of shadows (mirrored after the answer,
never answering). A caller may pin a version. ``choose`` is the one place a
version is picked.

Sticky canary: ``canary_bucket(salt, entity_id)`` maps an entity (e.g. a card id)
to a bucket in ``[0, 10000)`` with a keyed hash that is stable across processes
and restarts (never Python's randomised ``hash``); the entity goes to the canary
iff its bucket is below the share in basis points. So the same card sees the same
version while the share and salt are unchanged, and raising the share only moves
cards from champion to canary. A request without the entity id goes to the champion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from server.errors import ModelNotFound

#: Basis points in a whole: a canary share is ``0..BASIS_POINTS``.
BASIS_POINTS = 10_000
_NO_ENTITIES: Mapping[str, str] = MappingProxyType({})


class Route(StrEnum):
    """How the answering version was chosen (mirrors ``streamscore.v1.Route``)."""

    CHAMPION = "champion"
    CANARY = "canary"
    PINNED = "pinned"


def canary_bucket(salt: str, entity_id: str) -> int:
    """Stable bucket of ``entity_id`` in ``[0, BASIS_POINTS)`` for a rollout's ``salt``."""
    digest = hashlib.blake2b(f"{salt}:{entity_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BASIS_POINTS


@dataclass(frozen=True, slots=True)
class CanaryRoute:
    """The canary of an endpoint: ``share_bp`` of the entities keyed by ``entity``."""

    version: str
    share_bp: int
    salt: str
    entity: str

    def __post_init__(self) -> None:
        if not 0 <= self.share_bp <= BASIS_POINTS:
            raise ValueError(f"canary share {self.share_bp} is outside 0..{BASIS_POINTS}")

    def takes(self, entity_id: str) -> bool:
        """True when ``entity_id`` belongs to the canary's share."""
        return canary_bucket(self.salt, entity_id) < self.share_bp


@dataclass(frozen=True, slots=True)
class Decision:
    """The version that answers, why, and the shadows that get a copy afterwards."""

    version: str
    route: Route
    shadows: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointRouting:
    """Routing of one endpoint over its loaded ``versions``."""

    champion: str
    versions: frozenset[str] = field(default_factory=frozenset)
    canary: CanaryRoute | None = None
    shadows: tuple[str, ...] = ()
    _champion_decision: Decision = field(init=False, repr=False, compare=False)
    _canary_decision: Decision | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.champion not in self.versions:
            raise ValueError(f"champion {self.champion!r} is not a loaded version")
        if self.canary is not None:
            if self.canary.version not in self.versions:
                raise ValueError(f"canary {self.canary.version!r} is not a loaded version")
            if self.canary.version == self.champion:
                raise ValueError(f"canary {self.canary.version!r} is also the champion")
        for shadow in self.shadows:
            if shadow not in self.versions:
                raise ValueError(f"shadow {shadow!r} is not a loaded version")
        # Decisions are immutable: build them once, not per request.
        object.__setattr__(
            self, "_champion_decision", Decision(self.champion, Route.CHAMPION, self.shadows)
        )
        object.__setattr__(
            self,
            "_canary_decision",
            Decision(self.canary.version, Route.CANARY, self.shadows) if self.canary else None,
        )

    @property
    def routed(self) -> frozenset[str]:
        """Versions that take (or mirror) unpinned traffic."""
        canary = (self.canary.version,) if self.canary else ()
        return frozenset((self.champion, *canary, *self.shadows))

    def choose(self, entity_ids: Mapping[str, str]) -> Decision:
        """Champion or canary for an unpinned request."""
        canary = self.canary
        if canary is not None and canary.share_bp:
            entity_id = entity_ids.get(canary.entity)
            if entity_id and canary.takes(entity_id):
                assert self._canary_decision is not None
                return self._canary_decision
        return self._champion_decision


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Immutable routing of every endpoint; replaced whole, never mutated."""

    endpoints: Mapping[str, EndpointRouting] = field(default_factory=dict)

    def choose(
        self,
        endpoint: str,
        pinned_version: str | None,
        entity_ids: Mapping[str, str] = _NO_ENTITIES,
    ) -> Decision:
        """Pick the version for one request; ``ModelNotFound`` names what is unknown."""
        routing = self.endpoints.get(endpoint)
        if routing is None:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise ModelNotFound(f"model {endpoint!r} is not served (served: {known})")
        if pinned_version:
            if pinned_version not in routing.versions:
                known = ", ".join(sorted(routing.versions, key=version_sort_key))
                raise ModelNotFound(
                    f"model {endpoint!r} has no loaded version {pinned_version!r} (loaded: {known})"
                )
            return Decision(pinned_version, Route.PINNED)
        return routing.choose(entity_ids)


def version_sort_key(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones."""
    return (1, int(version)) if version.isdigit() else (0, version)
