"""Applies the persisted routing state in this process, and changes it for the admin API.

Every server process runs one ``RoutingController``:

* **start**: read the store; endpoints found in the repository but absent from the
  state are bootstrapped (configured champion, else the highest version that
  loads) and persisted with actor ``bootstrap``; then the state is applied. If the
  store cannot be reached the process serves the bootstrap state and keeps trying.
* **watch**: poll the store's revision every ``poll_interval_s``; on a new revision,
  apply it: load the versions that should be loaded (off the event loop; a version
  that fails is logged and counted, the others keep serving), publish the new
  routing table atomically, then unload what is no longer wanted (its batcher drains
  first). A request holds the version chosen for it, so in-flight requests finish on
  the version they started with.
* **change** (admin): under one lock per process, read the state, apply a pure
  transition from ``server.routing.state``, write it with compare-and-set together
  with its audit entry (retrying on a concurrent change), and apply it here before
  answering. A refused change is audit-logged with its error and changes nothing.
  ``load_version`` loads the version in this process first, so a bad artifact is
  refused before the state names it.

Other components (the guarded-rollout policy) change routing through ``change``
with their own transition and actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from server.errors import (
    DependencyUnavailable,
    ModelLoadError,
    ModelNotFound,
    ScoringError,
)
from server.metrics import Metrics
from server.registry import LoadedVersion, ModelRegistry, RouteSpec, ServingOptions, scan_repository
from server.rollout.policy import rollout_for_change
from server.router import CanaryRoute, version_sort_key
from server.routing.state import (
    AuditEntry,
    CanaryRequest,
    ConcurrentUpdate,
    EndpointState,
    RoutingState,
    add_version,
    check_name,
    initial_state,
    promote,
    remove_version,
    rollback,
    set_routing,
)
from server.routing.store import RoutingStore

logger = logging.getLogger(__name__)

#: Compare-and-set attempts before a change gives up with ABORTED.
MAX_ATTEMPTS = 8
#: Base of the jittered backoff between attempts (up to ~1.3 s over all of them), so
#: one process's burst of changes cannot starve another's.
RETRY_BASE_S = 0.005
BOOTSTRAP = "bootstrap"
RESTORE = "restore"

T = TypeVar("T")
Transition = Callable[[RoutingState], EndpointState]
VersionStatus = Literal["loaded", "pending", "failed", "available"]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks for a change: a credential's name and the peer address."""

    name: str
    peer: str = ""


@dataclass(frozen=True, slots=True)
class VersionView:
    """One version of an endpoint as this process sees it."""

    version: str
    status: VersionStatus
    roles: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True, slots=True)
class ModelView:
    """An endpoint: its desired state (None when only on disk) and its versions."""

    endpoint: str
    state: EndpointState | None
    versions: tuple[VersionView, ...]


class RoutingController:
    """Keeps this process's loaded versions and routing equal to the persisted state."""

    def __init__(
        self,
        registry: ModelRegistry,
        store: RoutingStore,
        repository: Path,
        options_for: Callable[[str], ServingOptions],
        *,
        canary_entity: str,
        poll_interval_s: float = 0.2,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        on_applied: Callable[[RoutingState], None] | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._repository = repository
        self._options_for = options_for
        self._canary_entity = canary_entity
        self._poll_interval_s = poll_interval_s
        self._metrics = metrics
        self._clock = clock
        self._on_applied = on_applied
        self._lock = asyncio.Lock()
        self._state = RoutingState()
        self._synced = False
        self._store_down = False
        self._failures: dict[tuple[str, str], str] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> RoutingState:
        """The desired state this process applied last."""
        return self._state

    @property
    def load_failures(self) -> dict[str, str]:
        """Versions that failed to load in this process (``name/version`` -> error),
        until one loads."""
        return {f"{n}/{v}": error for (n, v), error in sorted(self._failures.items())}

    @property
    def synced(self) -> bool:
        """False while the store has not been read since start (serving the bootstrap)."""
        return self._synced

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read (or bootstrap) the state, apply it, then watch for changes."""
        async with self._lock:
            try:
                state = await self._bootstrap(await self._store.read())
                self._synced = True
            except DependencyUnavailable as error:
                logger.error(
                    "routing store unreachable at start: serving the repository defaults "
                    "until it is back",
                    extra={"error": str(error)},
                )
                self._store_down = True
                state = await self._bootstrap(None)
            await self._apply(state)
            self._warn_overridden_settings(state)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="routing-watch")

    def _warn_overridden_settings(self, state: RoutingState) -> None:
        """Configured champions only seed an endpoint's first start: say when they lost."""
        for name, endpoint in state.endpoints.items():
            configured = self._options_for(name).champion
            if configured is not None and configured != endpoint.champion:
                logger.warning(
                    "persisted routing overrides the configured champion",
                    extra={
                        "model": name,
                        "configured": configured,
                        "champion": endpoint.champion,
                        "updated_by": endpoint.updated_by,
                    },
                )

    async def close(self) -> None:
        """Stop watching (loaded versions are released by the registry's ``close``)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_applied(self, revision: int) -> None:
        """Return once this process applied ``revision`` or a later one."""
        while self._state.revision < revision:
            await self._changed.wait()

    # ------------------------------------------------------------------ admin reads

    async def list_models(
        self, endpoint: str | None = None
    ) -> tuple[RoutingState, list[ModelView]]:
        """The persisted state (the applied one if the store is down) and every endpoint."""
        try:
            state = await self._store.read()
        except DependencyUnavailable:
            state = self._state
        on_disk: dict[str, set[str]] = {}
        with contextlib.suppress(ModelLoadError):
            for version_dir in await asyncio.to_thread(scan_repository, self._repository):
                on_disk.setdefault(version_dir.parent.name, set()).add(version_dir.name)
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
            views.append(
                ModelView(
                    name,
                    desired,
                    tuple(self._version_view(name, v, desired, v in wanted) for v in versions),
                )
            )
        return state, views

    def _version_view(
        self, name: str, version: str, desired: EndpointState | None, wanted: bool
    ) -> VersionView:
        roles = tuple(desired.role_of(version)) if desired else ()
        error = self._failures.get((name, version), "")
        status: VersionStatus
        if self._registry.has(name, version):
            status = "loaded"
        elif error:
            status = "failed"
        elif wanted:
            status = "pending"
        else:
            status = "available"
        return VersionView(version, status, roles, error)

    async def audit(self, endpoint: str | None, limit: int) -> list[AuditEntry]:
        """The newest audit entries, newest first."""
        return await self._store.audit(endpoint or None, limit)

    # ------------------------------------------------------------------ admin changes

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
            if not self._registry.has(endpoint, version):
                result = await self._try_load(endpoint, version)
                if isinstance(result, ModelLoadError):
                    raise result
            return await self._change(
                endpoint,
                "load",
                lambda s: add_version(s.endpoints.get(endpoint), version),
                actor,
                reason,
                expected_revision,
            )

        return await self._locked(endpoint, "load", actor, reason, work)

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

        async def work() -> EndpointState:
            return await self._change(
                endpoint, action, transition, actor, reason, expected_revision
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
        async with self._lock:
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
                    await self._apply(await self._store.read())
                raise

    async def _change(
        self,
        endpoint: str,
        action: str,
        transition: Transition,
        actor: Actor,
        reason: str,
        expected_revision: int,
    ) -> EndpointState:
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
            after = transition(current)
            if before is not None and after.same_routing(before):
                await self._apply(current)
                return before
            now = self._clock()
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
                revision=after.revision,
            )
            new_state = current.with_endpoint(endpoint, after)
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
                await self._apply(new_state)
                return after
        raise ConcurrentUpdate(f"endpoint {endpoint!r}: too many concurrent changes; retry")

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
            before=self._state.endpoints.get(endpoint),
            revision=self._state.revision,
        )
        try:
            await self._store.append_audit(entry)
        except DependencyUnavailable as down:
            logger.error("refusal not audit-logged", extra={"error": str(down)})

    # ------------------------------------------------------------------ applying

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                revision = await self._store.revision()
                if revision != self._state.revision or not self._synced:
                    async with self._lock:
                        await self._sync()
                if self._store_down:
                    logger.info("routing store reachable again")
                    self._store_down = False
            except DependencyUnavailable as error:
                if not self._store_down:
                    logger.error(
                        "routing store unreachable; serving the last applied routing",
                        extra={"error": str(error)},
                    )
                    self._store_down = True
            except Exception:
                logger.exception("routing watch failed; retrying")

    async def _sync(self) -> None:
        """Apply the stored state (lock held); bootstrap or restore it when needed."""
        state = await self._store.read()
        if state.revision == 0 and self._synced and self._state.endpoints:
            # The store lost its data (e.g. Redis restarted without persistence):
            # write back what this process serves rather than forget every change.
            state = await self._restore(self._state)
        if not self._synced:
            state = await self._bootstrap(state)
            self._synced = True
        await self._apply(state)

    async def _restore(self, applied: RoutingState) -> RoutingState:
        now = self._clock()
        entries = [
            AuditEntry(
                time=now,
                actor=RESTORE,
                peer=_origin(),
                endpoint=name,
                action=RESTORE,
                reason="the routing store was empty; rewrote the state this process served",
                outcome="applied",
                after=replace(endpoint, revision=1),
                revision=1,
            )
            for name, endpoint in sorted(applied.endpoints.items())
        ]
        restored = RoutingState(
            1, {n: replace(e, revision=1) for n, e in applied.endpoints.items()}
        )
        if await self._store.commit(0, restored, entries):
            logger.warning("routing store was empty; restored the applied state")
            return restored
        return await self._store.read()

    async def _apply(self, state: RoutingState) -> None:
        """Make this process load and route as ``state`` says (lock held)."""
        registry = self._registry
        for name, endpoint in state.endpoints.items():
            for version in endpoint.loaded:
                if not registry.has(name, version):
                    await self._try_load(name, version)
        table = registry.publish(
            {
                name: RouteSpec(
                    endpoint.champion,
                    CanaryRoute(
                        endpoint.canary.version,
                        endpoint.canary.share_bp,
                        endpoint.canary.salt,
                        endpoint.canary.entity or self._canary_entity,
                    )
                    if endpoint.canary
                    else None,
                    endpoint.shadows,
                )
                for name, endpoint in state.endpoints.items()
            }
        )
        keep = {(n, v) for n, e in state.endpoints.items() for v in e.loaded}
        keep |= {(n, v) for n, r in table.endpoints.items() for v in r.routed}
        for loaded in registry.all_versions():
            if (loaded.name, loaded.version) not in keep:
                await registry.unload(loaded.name, loaded.version)
        changed = state.revision != self._state.revision
        self._state = state
        if self._metrics is not None:
            self._metrics.models_loaded.set(len(registry.all_versions()))
        if changed:
            logger.info(
                "routing applied",
                extra={
                    "revision": state.revision,
                    "routing": {
                        n: {
                            "champion": r.champion,
                            "canary": r.canary.version if r.canary else None,
                        }
                        for n, r in table.endpoints.items()
                    },
                },
            )
        if self._on_applied is not None:
            self._on_applied(state)
        self._changed.set()
        self._changed = asyncio.Event()

    async def _try_load(self, name: str, version: str) -> LoadedVersion | ModelLoadError:
        result = await self._registry.try_load(
            self._repository / name / version, self._options_for(name)
        )
        if isinstance(result, ModelLoadError):
            self._failures[(name, version)] = str(result)
            if self._metrics is not None:
                self._metrics.model_load_failures.inc()
        else:
            self._failures.pop((name, version), None)
        return result

    async def _bootstrap(self, state: RoutingState | None) -> RoutingState:
        """Add the repository's endpoints missing from ``state`` (None = store unreachable:
        build a local, unpersisted state from the repository alone)."""
        known = state.endpoints if state is not None else {}
        on_disk: dict[str, list[Path]] = {}
        for version_dir in await asyncio.to_thread(scan_repository, self._repository):
            on_disk.setdefault(version_dir.parent.name, []).append(version_dir)
        fresh: dict[str, EndpointState] = {}
        for name, dirs in on_disk.items():
            if name in known:
                continue
            options = self._options_for(name)
            loaded = []
            for version_dir in dirs:
                version = version_dir.name
                if options.versions is not None and version not in options.versions:
                    continue
                if self._registry.has(name, version):
                    loaded.append(version)
                    continue
                result = await self._try_load(name, version)
                if not isinstance(result, ModelLoadError):
                    loaded.append(version)
            if loaded:
                champion = options.champion
                if champion not in loaded:
                    champion = max(loaded, key=version_sort_key)
                fresh[name] = initial_state(loaded, champion)
        if state is None:
            return RoutingState(0, fresh)
        while True:
            missing = {n: s for n, s in fresh.items() if n not in state.endpoints}
            if not missing:
                return state
            now = self._clock()
            revision = state.revision + 1
            stamped = {
                n: replace(s, revision=revision, updated_at=now, updated_by=BOOTSTRAP)
                for n, s in missing.items()
            }
            new_state = RoutingState(revision, {**state.endpoints, **stamped})
            entries = [
                AuditEntry(
                    time=now,
                    actor=BOOTSTRAP,
                    peer=_origin(),
                    endpoint=n,
                    action=BOOTSTRAP,
                    reason="first start with this endpoint in the repository",
                    outcome="applied",
                    after=s,
                    revision=revision,
                )
                for n, s in sorted(stamped.items())
            ]
            if await self._store.commit(state.revision, new_state, entries):
                logger.info("routing bootstrapped", extra={"endpoints": sorted(stamped)})
                return new_state
            state = await self._store.read()


def _origin() -> str:
    """This process, as the peer of changes it makes on its own."""
    return f"{socket.gethostname()}:{os.getpid()}"
