"""Routing: which loaded version answers a request. Pure: no I/O, no clock.

An endpoint (e.g. ``fraud``) has a champion version. A caller may pin a version.
Canary and shadow routing extend ``EndpointRouting`` without changing callers:
``choose`` stays the one place a version is picked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from server.errors import ModelNotFound


class Route(StrEnum):
    """How the answering version was chosen (mirrors ``streamscore.v1.Route``)."""

    CHAMPION = "champion"
    CANARY = "canary"
    PINNED = "pinned"


@dataclass(frozen=True, slots=True)
class EndpointRouting:
    """Routing of one endpoint."""

    champion: str
    versions: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.champion not in self.versions:
            raise ValueError(f"champion {self.champion!r} is not a loaded version")


@dataclass(frozen=True, slots=True)
class Decision:
    """The version that answers, and why."""

    version: str
    route: Route


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Immutable routing of every endpoint; replaced whole, never mutated."""

    endpoints: Mapping[str, EndpointRouting] = field(default_factory=dict)

    def choose(self, endpoint: str, pinned_version: str | None) -> Decision:
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
        return Decision(routing.champion, Route.CHAMPION)


def version_sort_key(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones."""
    return (1, int(version)) if version.isdigit() else (0, version)
