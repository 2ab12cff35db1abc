"""Desired routing state: what every server process should load and route. Pure.

``RoutingState`` is the persisted document (see ``server.routing.store``): a global
``revision`` bumped by every change, and per endpoint an ``EndpointState``:

* ``loaded``: versions every process keeps loaded (pinnable);
* ``champion``, ``previous_champion`` (the target of a rollback);
* ``canary``: one version, its share in basis points, the rollout's hash ``salt``
  and optionally the entity it is keyed on (else ``routing.canary_entity``);
* ``shadows``: versions mirrored after the answer (run by the shadow runner);
* ``rollout``: an opaque JSON object for the guarded-rollout policy;
* ``revision``, ``updated_at``, ``updated_by``: the change that last touched it.

The transitions (``add_version``, ``remove_version``, ``set_routing``, ``promote``,
``rollback``) validate and return a new ``EndpointState``; they raise
``ScoringError`` subclasses naming the problem (NOT_FOUND, INVALID_ARGUMENT,
FAILED_PRECONDITION), which ``server.grpc_status`` turns into gRPC statuses.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from server.errors import InvalidInput, ModelNotFound, ScoringError, Status
from server.manifest import MAX_MODEL_NAME_LENGTH, MODEL_NAME_PATTERN
from server.router import BASIS_POINTS, version_sort_key
from server.routing.approval import Records, records_from_dict, records_to_dict

_NAME = re.compile(MODEL_NAME_PATTERN)

Outcome = Literal["applied", "refused"]


class RoutingConflict(ScoringError):
    """The change contradicts the current state (e.g. unloading a routed version)."""

    status = Status.FAILED_PRECONDITION


class ConcurrentUpdate(ScoringError):
    """Someone else changed the endpoint since the caller read it (``expected_revision``)."""

    status = Status.ABORTED


def check_name(field_name: str, value: str) -> str:
    """``value`` if it is a valid endpoint/version name (a path segment), else InvalidInput."""
    if not value:
        raise InvalidInput(field_name, "required")
    if len(value) > MAX_MODEL_NAME_LENGTH:
        raise InvalidInput(
            field_name, f"{len(value)} characters exceed the limit of {MAX_MODEL_NAME_LENGTH}"
        )
    if not _NAME.match(value) or value in {".", ".."}:
        raise InvalidInput(field_name, f"{value!r} is not a valid name ([A-Za-z0-9_.-]+)")
    return value


def new_salt() -> str:
    """A fresh per-rollout hash salt."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Canary:
    """A canary: ``share_bp`` of the entities (by hash with ``salt``) go to ``version``."""

    version: str
    share_bp: int
    salt: str
    entity: str | None = None


@dataclass(frozen=True, slots=True)
class CanaryRequest:
    """A canary as asked for; ``salt``/``entity`` None = keep the current one (or default)."""

    version: str
    share_bp: int
    salt: str | None = None
    entity: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointState:
    """Desired state of one endpoint."""

    loaded: tuple[str, ...]
    champion: str
    previous_champion: str | None = None
    canary: Canary | None = None
    shadows: tuple[str, ...] = ()
    rollout: Mapping[str, Any] | None = None
    revision: int = 0
    updated_at: float = 0.0
    updated_by: str = ""

    @property
    def routed(self) -> frozenset[str]:
        """Versions that take or mirror traffic (cannot be unloaded)."""
        canary = (self.canary.version,) if self.canary else ()
        return frozenset((self.champion, *canary, *self.shadows))

    def role_of(self, version: str) -> list[str]:
        """Roles of ``version``: champion, canary, shadow, previous_champion."""
        roles = []
        if version == self.champion:
            roles.append("champion")
        if self.canary is not None and version == self.canary.version:
            roles.append("canary")
        if version in self.shadows:
            roles.append("shadow")
        if version == self.previous_champion:
            roles.append("previous_champion")
        return roles

    def same_routing(self, other: EndpointState) -> bool:
        """True when both states load and route identically (stamps aside)."""
        return _content(self) == _content(other)


def _content(state: EndpointState) -> dict[str, Any]:
    data = endpoint_to_dict(state)
    for stamp in ("revision", "updated_at", "updated_by"):
        data.pop(stamp)
    return data


@dataclass(frozen=True, slots=True)
class RoutingState:
    """Every endpoint's desired state at one ``revision`` (0 = nothing persisted yet),
    and the versions' governance records (who loaded them, approvals)."""

    revision: int = 0
    endpoints: Mapping[str, EndpointState] = field(default_factory=dict)
    records: Records = field(default_factory=dict)

    def endpoint(self, name: str) -> EndpointState:
        """The endpoint's state; ``ModelNotFound`` naming the known ones."""
        state = self.endpoints.get(name)
        if state is None:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise ModelNotFound(f"endpoint {name!r} is unknown (known: {known})")
        return state

    def with_endpoint(self, name: str, state: EndpointState) -> RoutingState:
        """A copy with ``name`` replaced, at the next revision."""
        endpoints = {**self.endpoints, name: state}
        return RoutingState(self.revision + 1, MappingProxyType(endpoints), self.records)

    def with_records(self, records: Records) -> RoutingState:
        """A copy with the governance records replaced (same revision)."""
        return replace(self, records=records)

    def records_json(self) -> str:
        """The governance records as JSON (stored beside the endpoints)."""
        return json.dumps(records_to_dict(self.records), sort_keys=True, separators=(",", ":"))

    def to_json(self) -> str:
        """The endpoints as JSON (the revision is stored beside it)."""
        return json.dumps(
            {name: endpoint_to_dict(s) for name, s in sorted(self.endpoints.items())},
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(
        cls, revision: int, text: str | bytes | None, records: str | bytes | None = None
    ) -> RoutingState:
        """Parse what ``to_json`` and ``records_json`` wrote (``None`` = empty)."""
        parsed = records_from_dict(json.loads(records)) if records else MappingProxyType({})
        if not text:
            return cls(revision, MappingProxyType({}), parsed)
        data = json.loads(text)
        endpoints = {name: endpoint_from_dict(item) for name, item in data.items()}
        return cls(revision, MappingProxyType(endpoints), parsed)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One admin action, applied or refused."""

    time: float
    actor: str
    peer: str
    endpoint: str
    action: str
    reason: str
    outcome: Outcome
    error: str = ""
    before: EndpointState | None = None
    after: EndpointState | None = None
    revision: int = 0
    id: str = ""
    #: What else the action concerned (e.g. an approval's version and hashes).
    detail: Mapping[str, Any] | None = None

    def to_json(self) -> str:
        """JSON of everything but ``id`` (assigned by the store)."""
        return json.dumps(
            {
                "time": self.time,
                "actor": self.actor,
                "peer": self.peer,
                "endpoint": self.endpoint,
                "action": self.action,
                "reason": self.reason,
                "outcome": self.outcome,
                "error": self.error,
                "before": endpoint_to_dict(self.before) if self.before else None,
                "after": endpoint_to_dict(self.after) if self.after else None,
                "revision": self.revision,
                "detail": dict(self.detail) if self.detail else None,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, entry_id: str, text: str | bytes) -> AuditEntry:
        """Parse what ``to_json`` wrote."""
        data = json.loads(text)
        before, after = data.get("before"), data.get("after")
        return cls(
            time=float(data["time"]),
            actor=str(data["actor"]),
            peer=str(data.get("peer", "")),
            endpoint=str(data["endpoint"]),
            action=str(data["action"]),
            reason=str(data.get("reason", "")),
            outcome="refused" if data["outcome"] == "refused" else "applied",
            error=str(data.get("error", "")),
            before=endpoint_from_dict(before) if before else None,
            after=endpoint_from_dict(after) if after else None,
            revision=int(data.get("revision", 0)),
            id=entry_id,
            detail=MappingProxyType(dict(data["detail"])) if data.get("detail") else None,
        )


def endpoint_to_dict(state: EndpointState) -> dict[str, Any]:
    """JSON-ready form of an ``EndpointState``."""
    canary = state.canary
    return {
        "loaded": list(state.loaded),
        "champion": state.champion,
        "previous_champion": state.previous_champion,
        "canary": (
            {
                "version": canary.version,
                "share_bp": canary.share_bp,
                "salt": canary.salt,
                "entity": canary.entity,
            }
            if canary
            else None
        ),
        "shadows": list(state.shadows),
        "rollout": dict(state.rollout) if state.rollout is not None else None,
        "revision": state.revision,
        "updated_at": state.updated_at,
        "updated_by": state.updated_by,
    }


def endpoint_from_dict(data: Mapping[str, Any]) -> EndpointState:
    """Inverse of ``endpoint_to_dict``."""
    canary = data.get("canary")
    rollout = data.get("rollout")
    return EndpointState(
        loaded=tuple(str(v) for v in data["loaded"]),
        champion=str(data["champion"]),
        previous_champion=data.get("previous_champion"),
        canary=(
            Canary(
                version=str(canary["version"]),
                share_bp=int(canary["share_bp"]),
                salt=str(canary["salt"]),
                entity=canary.get("entity"),
            )
            if canary
            else None
        ),
        shadows=tuple(str(v) for v in data.get("shadows", ())),
        rollout=MappingProxyType(dict(rollout)) if rollout is not None else None,
        revision=int(data.get("revision", 0)),
        updated_at=float(data.get("updated_at", 0.0)),
        updated_by=str(data.get("updated_by", "")),
    )


# ----------------------------------------------------------------------- transitions


def _sorted_versions(versions: Sequence[str] | set[str]) -> tuple[str, ...]:
    return tuple(sorted(set(versions), key=version_sort_key))


def initial_state(versions: Sequence[str], champion: str) -> EndpointState:
    """A new endpoint serving ``versions`` with ``champion``."""
    if champion not in versions:
        raise RoutingConflict(f"champion {champion!r} is not among the loaded versions")
    return EndpointState(loaded=_sorted_versions(versions), champion=champion)


def add_version(state: EndpointState | None, version: str) -> EndpointState:
    """``version`` loaded too; a new endpoint gets it as its champion."""
    if state is None:
        return initial_state([version], version)
    if version in state.loaded:
        return state
    return replace(state, loaded=_sorted_versions([*state.loaded, version]))


def remove_version(endpoint: str, state: EndpointState, version: str) -> EndpointState:
    """``version`` no longer loaded; refused while it takes or mirrors traffic."""
    if version not in state.loaded:
        raise ModelNotFound(
            f"endpoint {endpoint!r} has no loaded version {version!r} "
            f"(loaded: {', '.join(state.loaded)})"
        )
    roles = [r for r in state.role_of(version) if r != "previous_champion"]
    if roles:
        raise RoutingConflict(
            f"version {version!r} of {endpoint!r} is routed ({', '.join(roles)}); "
            "route it away before unloading"
        )
    return replace(state, loaded=tuple(v for v in state.loaded if v != version))


def _require_loaded(endpoint: str, state: EndpointState, field_name: str, version: str) -> None:
    check_name(field_name, version)
    if version not in state.loaded:
        raise ModelNotFound(
            f"{field_name}: endpoint {endpoint!r} has no loaded version {version!r} "
            f"(loaded: {', '.join(state.loaded)}); load it first"
        )


def set_routing(
    endpoint: str,
    state: EndpointState,
    *,
    champion: str | None,
    canary: CanaryRequest | None,
    shadows: Sequence[str],
    rollout: Mapping[str, Any] | None,
    salt_factory: Callable[[], str] = new_salt,
) -> EndpointState:
    """Replace champion (None = keep), canary, shadows and rollout policy of ``endpoint``.

    The canary keeps its salt while its version is unchanged (so changing the share
    only moves entities between champion and canary in one direction); a new canary
    version gets a new salt unless one is given.
    """
    new_champion = champion or state.champion
    _require_loaded(endpoint, state, "champion", new_champion)
    new_canary: Canary | None = None
    if canary is not None:
        _require_loaded(endpoint, state, "canary.version", canary.version)
        if not 0 <= canary.share_bp <= BASIS_POINTS:
            raise InvalidInput(
                "canary.share_bp", f"{canary.share_bp} is outside 0..{BASIS_POINTS} basis points"
            )
        if canary.version == new_champion:
            raise InvalidInput("canary.version", f"{canary.version!r} is also the champion")
        if canary.entity is not None and canary.entity != "":
            check_name("canary.entity", canary.entity)
        current = state.canary
        same = current is not None and current.version == canary.version
        salt = canary.salt or (current.salt if same and current else salt_factory())
        entity = canary.entity or (current.entity if same and current else None)
        new_canary = Canary(canary.version, canary.share_bp, salt, entity or None)
    seen: set[str] = set()
    for i, shadow in enumerate(shadows):
        where = f"shadows[{i}]"
        _require_loaded(endpoint, state, where, shadow)
        if shadow == new_champion:
            raise InvalidInput(where, f"{shadow!r} is also the champion")
        if new_canary is not None and shadow == new_canary.version:
            raise InvalidInput(where, f"{shadow!r} is also the canary")
        if shadow in seen:
            raise InvalidInput(where, f"{shadow!r} is listed twice")
        seen.add(shadow)
    previous = state.champion if new_champion != state.champion else state.previous_champion
    return replace(
        state,
        champion=new_champion,
        previous_champion=previous,
        canary=new_canary,
        shadows=tuple(shadows),
        rollout=MappingProxyType(dict(rollout)) if rollout is not None else None,
    )


def promote(endpoint: str, state: EndpointState) -> EndpointState:
    """The canary becomes champion; the champion becomes ``previous_champion``."""
    if state.canary is None:
        raise RoutingConflict(f"endpoint {endpoint!r} has no canary to promote")
    return replace(
        state,
        champion=state.canary.version,
        previous_champion=state.champion,
        canary=None,
        rollout=None,
    )


def rollback(endpoint: str, state: EndpointState) -> EndpointState:
    """``previous_champion`` becomes champion again (a canary or shadow of it is dropped)."""
    previous = state.previous_champion
    if previous is None:
        raise RoutingConflict(f"endpoint {endpoint!r} has no previous champion to roll back to")
    if previous not in state.loaded:
        raise RoutingConflict(
            f"previous champion {previous!r} of {endpoint!r} is not loaded; load it first"
        )
    canary = state.canary if state.canary and state.canary.version != previous else None
    return replace(
        state,
        champion=previous,
        previous_champion=state.champion,
        canary=canary,
        shadows=tuple(s for s in state.shadows if s != previous),
        rollout=state.rollout if canary is not None else None,
    )


def parse_rollout(text: str) -> Mapping[str, Any] | None:
    """The rollout policy from its JSON text ('' = none); must be a JSON object."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInput("rollout_json", f"not valid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise InvalidInput("rollout_json", "must be a JSON object")
    return MappingProxyType(value)
