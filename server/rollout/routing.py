"""Guarded rollouts meet the routing state: the controller's actions and its view.

``RoutingRolloutActions`` is the ``RolloutActions`` the controller calls: every
change goes through ``RoutingChanges.change`` (persisted, applied by every process,
audit-logged with the numbers that decided it) and is refused when the endpoint's
active rollout is no longer the one the decision was made for. A rollback gives the
canary no traffic and keeps the champion (unlike the admin ``Rollback``, which brings
back the previous champion).

Approval: a canary only gets a share above 0 once approved (``server.routing.changes``
refuses it), so a canary found unapproved when the controller advances or promotes
it lost its approval (revoked, or its artifact or report changed). The controller
then rolls it back rather than holding: holding would keep an unapproved version
answering its share of traffic. The refusal and the rollback are both audit-logged.

``rollout_states`` and ``sync_windows`` read the routing state: which endpoints have a
canary with a rollout policy, and which stats window each process records into.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

from server.rollout.policy import RolloutDocument, RolloutPolicy, RolloutState, rollout_document
from server.rollout.stats import StatsRecorder
from server.routing.approval import ApprovalRequired
from server.routing.changes import Actor, RoutingChanges
from server.routing.state import (
    EndpointState,
    RoutingConflict,
    RoutingState,
    promote,
)

logger = logging.getLogger(__name__)

ROLLOUT_ACTOR = Actor("rollout-controller")


def rollout_states(state: RoutingState) -> list[RolloutState]:
    """Every endpoint's active rollout."""
    states = []
    for name, endpoint in state.endpoints.items():
        document = rollout_document(endpoint)
        if document is not None and endpoint.canary is not None:
            try:
                states.append(
                    document.state(
                        name, endpoint.champion, endpoint.canary.version, endpoint.canary.share_bp
                    )
                )
            except ValueError as error:  # one bad endpoint must not stop the others'
                logger.warning(
                    "ignoring a rollout that does not match its canary",
                    extra={"endpoint": name, "error": str(error)},
                )
    return states


def sync_windows(recorder: StatsRecorder, state: RoutingState) -> None:
    """Point the recorder at each endpoint's current rollout step (or nothing)."""
    active = {s.endpoint: s for s in rollout_states(state)}
    for name in state.endpoints:
        rollout = active.get(name)
        recorder.set_window(name, rollout.window() if rollout is not None else None)


def _next_share(policy: RolloutPolicy, share_bp: int) -> int | None:
    """The share of the step after the one at ``share_bp`` (None: last or no step)."""
    try:
        index = policy.step_of(share_bp) + 1
    except ValueError:
        return None
    return policy.steps[index].share_bp if index < len(policy.steps) else None


def _reason(reason: str, numbers: Mapping[str, float]) -> str:
    return f"{reason} {json.dumps(dict(numbers), sort_keys=True)}"


class RoutingRolloutActions:
    """``server.rollout.controller.RolloutActions`` over the routing changes."""

    def __init__(self, routing: RoutingChanges, clock: Callable[[], float]) -> None:
        self._routing = routing
        self._clock = clock

    def _checked(self, endpoint: str, state: EndpointState, rollout_id: str) -> RolloutDocument:
        document = rollout_document(state)
        if document is None or document.id != rollout_id:
            raise RoutingConflict(f"endpoint {endpoint!r}: rollout {rollout_id} is not active")
        return document

    async def set_canary_share(
        self,
        endpoint: str,
        share_bp: int,
        reason: str,
        numbers: Mapping[str, float],
        *,
        rollout_id: str,
    ) -> None:
        """Advance the canary to ``share_bp`` (same salt: cards only move to the canary)."""
        now = self._clock()

        def transition(s: RoutingState) -> EndpointState:
            current = s.endpoint(endpoint)
            document = self._checked(endpoint, current, rollout_id)
            assert current.canary is not None
            at = current.canary.share_bp
            if _next_share(document.policy, at) != share_bp:
                # a decision made on an older share (e.g. by a former leader) is stale
                raise RoutingConflict(
                    f"endpoint {endpoint!r}: {share_bp} is not the step after the current {at}"
                )
            return replace(
                current,
                canary=replace(current.canary, share_bp=share_bp),
                rollout=document.advanced(now).model_dump(mode="json"),
            )

        try:
            await self._routing.change(
                endpoint, "rollout_advance", transition, ROLLOUT_ACTOR, _reason(reason, numbers)
            )
        except ApprovalRequired as refused:
            await self._unapproved(endpoint, refused, numbers, rollout_id)

    async def promote(
        self, endpoint: str, reason: str, numbers: Mapping[str, float], *, rollout_id: str
    ) -> None:
        """Every step passed: the canary becomes champion."""

        def transition(s: RoutingState) -> EndpointState:
            current = s.endpoint(endpoint)
            self._checked(endpoint, current, rollout_id)
            return promote(endpoint, current)

        try:
            await self._routing.change(
                endpoint, "rollout_promote", transition, ROLLOUT_ACTOR, _reason(reason, numbers)
            )
        except ApprovalRequired as refused:
            await self._unapproved(endpoint, refused, numbers, rollout_id)

    async def _unapproved(
        self,
        endpoint: str,
        refused: ApprovalRequired,
        numbers: Mapping[str, float],
        rollout_id: str,
    ) -> None:
        """The canary lost its approval: roll it back instead of advancing/promoting."""
        logger.warning(
            "canary not approved: rolling it back",
            extra={"endpoint": endpoint, "error": str(refused)},
        )
        await self.rollback(
            endpoint, f"canary not approved ({refused})", numbers, rollout_id=rollout_id
        )

    async def rollback(
        self, endpoint: str, reason: str, numbers: Mapping[str, float], *, rollout_id: str
    ) -> None:
        """A guardrail tripped: the canary gets no traffic; the champion stays."""

        def transition(s: RoutingState) -> EndpointState:
            current = s.endpoint(endpoint)
            self._checked(endpoint, current, rollout_id)
            return replace(current, canary=None, rollout=None)

        await self._routing.change(
            endpoint, "rollout_rollback", transition, ROLLOUT_ACTOR, _reason(reason, numbers)
        )
