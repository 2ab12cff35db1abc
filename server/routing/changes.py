"""Changes to the persisted routing state, and the admin API's view of it.

* **change**: under the process's ``RoutingSync.lock``, read the state, apply a
  pure transition from ``server.routing.state``, write it with compare-and-set
  together with its audit entry (retrying, jittered, on a concurrent change), and
  apply it in this process before answering. A refused change is audit-logged with
  its error and changes nothing. The admin operations (``load_version``,
  ``unload_version``, ``set_routing``, ``promote``, ``rollback``) are transitions
  passed to it; the guarded-rollout controller passes its own, with its own actor.
* ``load_version`` loads the version in this process first, so a bad artifact is
  refused before the state names it; its actor is recorded as a submitter.
* **gate**: a change that makes a version champion or raises its canary share is
  refused (FAILED_PRECONDITION, naming what is missing) when its model requires
  approval and the version has none valid (``server.routing.approval``).
* ``approve`` / ``revoke``: an approval bound to the sha256 of the artifact and of
  the validation report, refused (PERMISSION_DENIED) for whoever submitted or
  loaded the version; persisted with the state, audit-logged.
* **reads**: ``list_models`` (persisted state, versions on disk, their status in
  this process and their approval) and ``audit``. A version of a model requiring
  approval that is not approved and answers no traffic carries the error
  ``not approved: <what is missing>`` (:data:`NOT_APPROVED`), so whoever routed or
  configured it sees why it is not served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from server.errors import (
    DependencyUnavailable,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ScoringError,
)
from server.lineage import Lineage
from server.manifest import ModelManifest
from server.registry import ModelRegistry, scan_repository
from server.rollout.policy import rollout_for_change
from server.router import version_sort_key
from server.routing.approval import (
    NOT_APPROVED,
    REPORT_FILE,
    Approval,
    ApprovalRequired,
    Records,
    SelfApproval,
    VersionRecord,
    approval_problem,
    exposure,
    makers,
    newly_exposed,
    record_of,
    with_record,
)
from server.routing.evidence import ApprovalGate
from server.routing.state import (
    AuditEntry,
    CanaryRequest,
    ConcurrentUpdate,
    EndpointState,
    RoutingConflict,
    RoutingState,
    add_version,
    check_name,
    promote,
    remove_version,
    rollback,
    set_routing,
)
from server.routing.store import RoutingStore
from server.routing.sync import RoutingSync

logger = logging.getLogger(__name__)

#: Compare-and-set attempts before a change gives up with ABORTED.
MAX_ATTEMPTS = 8
#: Base of the jittered backoff between attempts (up to ~1.3 s over all of them), so
#: one process's burst of changes cannot starve another's.
RETRY_BASE_S = 0.005

T = TypeVar("T")
Transition = Callable[[RoutingState], EndpointState]
VersionStatus = Literal["loaded", "pending", "failed", "available"]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks for a change: a credential's name and the peer address."""

    name: str
    peer: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    """What a change makes of the state: the endpoint (None = untouched or absent),
    the governance records, and details for the audit entry."""

    after: EndpointState | None
    records: Records
    detail: Mapping[str, Any] | None = None


Update = Callable[[RoutingState], Awaitable[Change]]


@dataclass(frozen=True, slots=True)
class ApprovalView:
    """A version's approval as it stands now."""

    required: bool
    #: Why it may not take traffic ('' = it may).
    problem: str
    record: VersionRecord
    submitters: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VersionView:
    """One version of an endpoint as this process sees it."""

    version: str
    status: VersionStatus
    roles: tuple[str, ...] = ()
    error: str = ""
    approval: ApprovalView | None = None
    lineage: Lineage | None = None


@dataclass(frozen=True, slots=True)
class ModelView:
    """An endpoint: its desired state (None when only on disk) and its versions."""

    endpoint: str
    state: EndpointState | None
    versions: tuple[VersionView, ...]


class RoutingChanges:
    """Audited changes to the persisted routing state, applied here through ``sync``."""

    def __init__(
        self,
        sync: RoutingSync,
        store: RoutingStore,
        registry: ModelRegistry,
        repository: Path,
        clock: Callable[[], float] = time.time,
        gate: ApprovalGate | None = None,
    ) -> None:
        self.sync = sync
        self._store = store
        self._registry = registry
        self._repository = repository
        self._clock = clock
        #: Without one, approvals are required where manifests have a governance block.
        self.gate = gate or ApprovalGate(repository, lambda _model: None)

    # ------------------------------------------------------------------ reads

    async def list_models(
        self, endpoint: str | None = None
    ) -> tuple[RoutingState, list[ModelView]]:
        """The persisted state (the applied one if the store is down) and every endpoint."""
        try:
            state = await self._store.read()
        except DependencyUnavailable:
            state = self.sync.state
        on_disk: dict[str, set[str]] = {}
        manifests: dict[tuple[str, str], ModelManifest] = {}
        with contextlib.suppress(ModelLoadError):
            for version_dir, manifest in await asyncio.to_thread(_scan_manifests, self._repository):
                on_disk.setdefault(version_dir.parent.name, set()).add(version_dir.name)
                if manifest is not None:
                    manifests[version_dir.parent.name, version_dir.name] = manifest
        names = sorted(set(state.endpoints) | set(on_disk))
        if endpoint:
            if endpoint not in names:
                raise ModelNotFound(
                    f"endpoint {endpoint!r} is unknown (known: {', '.join(names) or 'none'})"
                )
            names = [endpoint]
        views = []
        for name in names:
            desired = state.endpoints.get(name)
            wanted = set(desired.loaded) if desired else set()
            versions = sorted(on_disk.get(name, set()) | wanted, key=version_sort_key)
            required = await self.gate.required_async(name)
            version_views = []
            answering = _answering(desired)
            for v in versions:
                view = self._version_view(name, v, desired, v in wanted, manifests.get((name, v)))
                approval = await self._approval_view(name, v, required, state.records)
                view = replace(view, approval=approval)
                if required and approval.problem and not view.error and v not in answering:
                    view = replace(view, error=NOT_APPROVED + approval.problem)
                version_views.append(view)
            views.append(ModelView(name, desired, tuple(version_views)))
        return state, views

    async def _approval_view(
        self, name: str, version: str, required: bool, records: Records
    ) -> ApprovalView:
        record = record_of(records, name, version)
        evidence = await self.gate.evidence(name, version)
        problem = approval_problem(record, evidence)
        return ApprovalView(required, problem or "", record, makers(record, evidence))

    def _version_view(
        self,
        name: str,
        version: str,
        desired: EndpointState | None,
        wanted: bool,
        manifest: ModelManifest | None,
    ) -> VersionView:
        roles = tuple(desired.role_of(version)) if desired else ()
        error = self.sync.load_error(name, version)
        status: VersionStatus
        lineage = Lineage.of(manifest) if manifest is not None else None
        if self._registry.has(name, version):
            status = "loaded"
            loaded = self._registry.get(name, version)
            lineage = Lineage.of(loaded.model.manifest, explainer=loaded.reasons is not None)
        elif error:
            status = "failed"
        elif wanted:
            status = "pending"
        else:
            status = "available"
        return VersionView(version, status, roles, error, lineage=lineage)

    async def audit(self, endpoint: str | None, limit: int) -> list[AuditEntry]:
        """The newest audit entries, newest first."""
        return await self._store.audit(endpoint or None, limit)

    # ------------------------------------------------------------------ changes

    async def load_version(
        self, endpoint: str, version: str, actor: Actor, reason: str, expected_revision: int = 0
    ) -> EndpointState:
        """Load ``version`` here (refused if it does not load), then persist it as loaded."""

        async def work() -> EndpointState:
            check_name("endpoint", endpoint)
            check_name("version", version)
            version_dir = self._repository / endpoint / version
            if not await asyncio.to_thread(version_dir.is_dir):
                raise ModelNotFound(
                    f"version {version!r} of {endpoint!r} is not in the model repository"
                )
            if endpoint not in self.sync.state.endpoints:
                # Loading a new endpoint routes it at once: gate it before loading.
                problem = await self.gate.problem(endpoint, version, self.sync.state.records)
                if problem is not None:
                    raise ApprovalRequired(
                        f"champion {version!r} of {endpoint!r} is not approved: {problem}"
                    )
            if not self._registry.has(endpoint, version):
                result = await self.sync.try_load(endpoint, version)
                if isinstance(result, ModelLoadError):
                    raise result

            async def update(s: RoutingState) -> Change:
                record = record_of(s.records, endpoint, version).with_loader(actor.name)
                return Change(
                    add_version(s.endpoints.get(endpoint), version),
                    with_record(s.records, endpoint, version, record),
                )

            return _present(
                await self._change(endpoint, "load", update, actor, reason, expected_revision)
            )

        return await self._locked(endpoint, "load", actor, reason, work)

    async def approve(
        self, endpoint: str, version: str, actor: Actor, reason: str
    ) -> EndpointState | None:
        """Approve ``version`` as its files are now (refused for its submitters)."""
        now = self._clock()

        async def work() -> EndpointState | None:
            version_dir = await self._version_dir(endpoint, version)
            _require_reason(reason)
            evidence = await self.gate.evidence(endpoint, version)
            if evidence.artifact_sha256 is None:
                raise RoutingConflict(f"{endpoint}/{version} has no artifact in {version_dir}")
            artifact, report = evidence.artifact_sha256, evidence.report_sha256

            async def update(s: RoutingState) -> Change:
                record = record_of(s.records, endpoint, version)
                if actor.name in makers(record, evidence):
                    raise SelfApproval(
                        f"approver must differ from submitter: {actor.name!r} submitted or "
                        f"loaded {endpoint}/{version}"
                    )
                if report is None:
                    raise ApprovalRequired(
                        f"{endpoint}/{version} cannot be approved: no validation report "
                        f"({REPORT_FILE}); run 'streamscore models validate' first"
                    )
                approval = Approval(actor.name, now, reason, artifact, report)
                return Change(
                    s.endpoints.get(endpoint),
                    with_record(s.records, endpoint, version, replace(record, approval=approval)),
                    {"version": version, "artifact_sha256": artifact, "report_sha256": report},
                )

            return await self._change(endpoint, "approve", update, actor, reason, 0)

        return await self._locked(endpoint, "approve", actor, reason, work)

    async def revoke(
        self, endpoint: str, version: str, actor: Actor, reason: str
    ) -> EndpointState | None:
        """Withdraw ``version``'s approval (routing already given to it stays)."""

        async def work() -> EndpointState | None:
            await self._version_dir(endpoint, version)
            _require_reason(reason)

            async def update(s: RoutingState) -> Change:
                record = record_of(s.records, endpoint, version)
                if record.approval is None:
                    raise RoutingConflict(f"{endpoint}/{version} has no approval to revoke")
                previous = record.approval
                return Change(
                    s.endpoints.get(endpoint),
                    with_record(s.records, endpoint, version, replace(record, approval=None)),
                    {
                        "version": version,
                        "approved_by": previous.approver,
                        "artifact_sha256": previous.artifact_sha256,
                        "report_sha256": previous.report_sha256,
                    },
                )

            return await self._change(endpoint, "revoke", update, actor, reason, 0)

        return await self._locked(endpoint, "revoke", actor, reason, work)

    async def _version_dir(self, endpoint: str, version: str) -> Path:
        check_name("endpoint", endpoint)
        check_name("version", version)
        version_dir = self._repository / endpoint / version
        if not await asyncio.to_thread(version_dir.is_dir):
            raise ModelNotFound(
                f"version {version!r} of {endpoint!r} is not in the model repository"
            )
        return version_dir

    async def audit_refusal(
        self, endpoint: str, action: str, actor: Actor, reason: str, error: ScoringError
    ) -> None:
        """Audit-log a call refused before it reached a change (e.g. a missing role)."""
        await self._audit_refusal(endpoint, action, actor, reason, error)

    async def unload_version(
        self, endpoint: str, version: str, actor: Actor, reason: str, expected_revision: int = 0
    ) -> EndpointState:
        """Persist ``version`` as not loaded (refused while routed); it drains, then goes."""
        return await self.change(
            endpoint,
            "unload",
            lambda s: remove_version(endpoint, s.endpoint(endpoint), version),
            actor,
            reason,
            expected_revision,
        )

    async def set_routing(
        self,
        endpoint: str,
        *,
        champion: str | None,
        canary: CanaryRequest | None,
        shadows: tuple[str, ...],
        rollout: Mapping[str, Any] | str | None,
        actor: Actor,
        reason: str,
        expected_revision: int = 0,
    ) -> EndpointState:
        """Replace champion (None = keep), canary, shadows and rollout policy (a mapping,
        or its JSON text; None or '' = none)."""
        return await self.change(
            endpoint,
            "set_routing",
            lambda s: set_routing(
                endpoint,
                s.endpoint(endpoint),
                champion=champion,
                canary=canary,
                shadows=shadows,
                rollout=rollout_for_change(s.endpoint(endpoint), canary, rollout, self._clock()),
            ),
            actor,
            reason,
            expected_revision,
        )

    async def promote(
        self, endpoint: str, actor: Actor, reason: str, expected_revision: int = 0
    ) -> EndpointState:
        """The canary becomes champion."""
        return await self.change(
            endpoint,
            "promote",
            lambda s: promote(endpoint, s.endpoint(endpoint)),
            actor,
            reason,
            expected_revision,
        )

    async def rollback(
        self, endpoint: str, actor: Actor, reason: str, expected_revision: int = 0
    ) -> EndpointState:
        """The previous champion becomes champion again."""
        return await self.change(
            endpoint,
            "rollback",
            lambda s: rollback(endpoint, s.endpoint(endpoint)),
            actor,
            reason,
            expected_revision,
        )

    async def change(
        self,
        endpoint: str,
        action: str,
        transition: Transition,
        actor: Actor,
        reason: str,
        expected_revision: int = 0,
    ) -> EndpointState:
        """Apply ``transition`` to the persisted state of ``endpoint``, audit-logged.

        ``expected_revision`` > 0 refuses (ABORTED) when the endpoint changed since
        the caller read it at that revision. Returns the endpoint's new state,
        already applied in this process.
        """

        async def update(s: RoutingState) -> Change:
            return Change(transition(s), s.records)

        async def work() -> EndpointState:
            return _present(
                await self._change(endpoint, action, update, actor, reason, expected_revision)
            )

        return await self._locked(endpoint, action, actor, reason, work)

    async def _locked(
        self,
        endpoint: str,
        action: str,
        actor: Actor,
        reason: str,
        work: Callable[[], Awaitable[T]],
    ) -> T:
        """Run ``work`` under the lock; a refusal is audit-logged, then re-raised."""
        async with self.sync.lock:
            try:
                return await work()
            except DependencyUnavailable:
                raise
            except ScoringError as error:
                logger.warning(
                    "admin change refused",
                    extra={
                        "endpoint": endpoint,
                        "action": action,
                        "actor": actor.name,
                        "error": str(error),
                    },
                )
                await self._audit_refusal(endpoint, action, actor, reason, error)
                # Undo side effects (a version loaded for a refused change).
                with contextlib.suppress(DependencyUnavailable):
                    await self.sync.apply(await self._store.read())
                raise

    async def _change(
        self,
        endpoint: str,
        action: str,
        update: Update,
        actor: Actor,
        reason: str,
        expected_revision: int,
    ) -> EndpointState | None:
        for attempt in range(MAX_ATTEMPTS):
            if attempt:  # lost a compare-and-set to another process: back off, jittered
                await asyncio.sleep(random.uniform(0, RETRY_BASE_S * 2**attempt))
            current = await self._store.read()
            before = current.endpoints.get(endpoint)
            if expected_revision and (before is None or before.revision != expected_revision):
                have = before.revision if before else 0
                raise ConcurrentUpdate(
                    f"endpoint {endpoint!r} changed since revision {expected_revision} "
                    f"(now {have}); read it again"
                )
            change = await update(current)
            after = change.after
            if after is not None:
                await self._check_gate(endpoint, before, after, change.records)
            unchanged = after is None or (before is not None and after.same_routing(before))
            if unchanged and change.records == current.records:
                await self.sync.apply(current)
                return before
            now = self._clock()
            if after is not None and not unchanged:
                after = replace(
                    after, revision=current.revision + 1, updated_at=now, updated_by=actor.name
                )
            entry = AuditEntry(
                time=now,
                actor=actor.name,
                peer=actor.peer,
                endpoint=endpoint,
                action=action,
                reason=reason,
                outcome="applied",
                before=before,
                after=after,
                revision=current.revision + 1,
                detail=change.detail,
            )
            new_state = (
                current.with_endpoint(endpoint, after)
                if after is not None
                else replace(current, revision=current.revision + 1)
            ).with_records(change.records)
            if await self._store.commit(current.revision, new_state, [entry]):
                logger.info(
                    "routing changed",
                    extra={
                        "endpoint": endpoint,
                        "action": action,
                        "actor": actor.name,
                        "revision": new_state.revision,
                    },
                )
                await self.sync.apply(new_state)
                return after
        raise ConcurrentUpdate(f"endpoint {endpoint!r}: too many concurrent changes; retry")

    async def _check_gate(
        self, endpoint: str, before: EndpointState | None, after: EndpointState, records: Records
    ) -> None:
        """Refuse ``after`` if it raises the share of a version that is not approved."""

        versions = newly_exposed(_answering(before), _answering(after))
        if not versions or not await self.gate.required_async(endpoint):
            return
        for version in versions:
            problem = await self.gate.problem(endpoint, version, records)
            if problem is not None:
                role = "champion" if version == after.champion else "canary"
                raise ApprovalRequired(
                    f"{role} {version!r} of {endpoint!r} is not approved: {problem}"
                )

    async def _audit_refusal(
        self, endpoint: str, action: str, actor: Actor, reason: str, error: ScoringError
    ) -> None:
        entry = AuditEntry(
            time=self._clock(),
            actor=actor.name,
            peer=actor.peer,
            endpoint=endpoint,
            action=action,
            reason=reason,
            outcome="refused",
            error=f"{error.status}: {error}",
            before=self.sync.state.endpoints.get(endpoint),
            revision=self.sync.state.revision,
        )
        try:
            await self._store.append_audit(entry)
        except DependencyUnavailable as down:
            logger.error("refusal not audit-logged", extra={"error": str(down)})


def _answering(state: EndpointState | None) -> dict[str, int]:
    """The versions of ``state`` answering traffic (champion, canary with a share)."""
    if state is None:
        return {}
    canary = (state.canary.version, state.canary.share_bp) if state.canary else None
    return exposure(state.champion, canary)


def _present(state: EndpointState | None) -> EndpointState:
    """The endpoint a routing transition returned (it always returns one)."""
    if state is None:  # pragma: no cover - transitions never return None
        raise RoutingConflict("the change left no endpoint state")
    return state


def _require_reason(reason: str) -> None:
    if not reason.strip():
        raise InvalidInput("reason", "required: say why (it goes to the audit log)")


def _scan_manifests(repository: Path) -> list[tuple[Path, ModelManifest | None]]:
    """Every version directory with its manifest (None when unreadable)."""
    found: list[tuple[Path, ModelManifest | None]] = []
    for version_dir in scan_repository(repository):
        try:
            found.append((version_dir, ModelManifest.read(version_dir)))
        except (OSError, ValueError):
            found.append((version_dir, None))
    return found
