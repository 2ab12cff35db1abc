"""Keeps this process's loaded versions and routing equal to the persisted state.

Every server process runs one ``RoutingSync``:

* **start**: read the store; endpoints found in the repository but absent from the
  state are bootstrapped (configured champion, else the highest version that
  loads) and persisted with actor ``bootstrap``; then the state is applied. A model
  that requires approval (``server.routing.evidence``) is bootstrapped only with an
  approved champion (configured, else the highest approved): with none it is not
  served (Score: NOT_FOUND; logged, and ListModels shows why each version is
  unapproved) until a version is approved and then loaded with LoadVersion. A
  version left out for want of approval, and a configured champion the persisted
  routing does not serve because it is not approved, are logged once per process
  and problem (``<model>/<version> is not served: not approved: <problem>``). If the
  store cannot be reached the process serves the bootstrap state and keeps trying.
* **watch**: poll the store's revision every ``poll_interval_s``; on a new revision,
  apply it: load the versions that should be loaded (off the event loop; a version
  that fails is logged and counted, the others keep serving), publish the new
  routing table atomically, then unload what is no longer wanted (its batcher drains
  first). A request holds the version chosen for it, so in-flight requests finish on
  the version they started with.
* **restore**: a store found empty after this process synced (e.g. Redis restarted
  without persistence) gets the state this process serves written back.

Changes to the state (admin API, guarded rollouts) go through
``server.routing.changes``, which applies each one here under :attr:`RoutingSync.lock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from server.errors import DependencyUnavailable, ModelLoadError
from server.metrics import Metrics
from server.registry import LoadedVersion, ModelRegistry, RouteSpec, ServingOptions, scan_repository
from server.router import CanaryRoute, version_sort_key
from server.routing.evidence import ApprovalGate
from server.routing.state import AuditEntry, EndpointState, RoutingState, initial_state
from server.routing.store import RoutingStore

logger = logging.getLogger(__name__)

BOOTSTRAP = "bootstrap"
RESTORE = "restore"


class RoutingSync:
    """Applies the persisted routing state in this process and follows its changes."""

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
        gate: ApprovalGate | None = None,
    ) -> None:
        self._registry = registry
        self._gate = gate
        self._store = store
        self._repository = repository
        self._options_for = options_for
        self._canary_entity = canary_entity
        self._poll_interval_s = poll_interval_s
        self._metrics = metrics
        self._clock = clock
        self._on_applied = on_applied
        #: Held while the applied state changes (watch, or a change being made here).
        self.lock = asyncio.Lock()
        self._state = RoutingState()
        self._synced = False
        self._store_down = False
        self._failures: dict[tuple[str, str], str] = {}
        #: (model, version, problem) already logged as not served for want of approval.
        self._gated_logged: set[tuple[str, str, str]] = set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Set by ``close``: the watch ends after its current step even when the cancel
        #: was swallowed (redis-py can turn a cancelled read into its own TimeoutError).
        self._stopping = False

    @property
    def state(self) -> RoutingState:
        """The desired state this process applied last."""
        return self._state

    @property
    def load_failures(self) -> dict[str, str]:
        """Versions that failed to load in this process (``name/version`` -> error),
        until one loads."""
        return {f"{n}/{v}": error for (n, v), error in sorted(self._failures.items())}

    def load_error(self, name: str, version: str) -> str:
        """Why ``name/version`` last failed to load here ('' if it did not)."""
        return self._failures.get((name, version), "")

    @property
    def synced(self) -> bool:
        """False while the store has not been read since start (serving the bootstrap)."""
        return self._synced

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read (or bootstrap) the state, apply it, then watch for changes."""
        async with self.lock:
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
            await self.apply(state)
            await self._warn_overridden_settings(state)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="routing-watch")

    async def _warn_overridden_settings(self, state: RoutingState) -> None:
        """Configured champions only seed an endpoint's first start: say when they lost
        (and, when the configured one is not approved, that this is why)."""
        for name, endpoint in state.endpoints.items():
            configured = self._options_for(name).champion
            if configured is not None and configured != endpoint.champion:
                problem = None
                if self._gate is not None:
                    problem = await self._gate.problem(name, configured, state.records)
                if problem is not None:
                    self._log_gated(name, configured, problem, "configured champion")
                    continue
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
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_applied(self, revision: int) -> None:
        """Return once this process applied ``revision`` or a later one."""
        while self._state.revision < revision:
            await self._changed.wait()

    # ------------------------------------------------------------------ applying

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._poll_interval_s)
            if self._stopping:
                return
            try:
                revision = await self._store.revision()
                if revision != self._state.revision or not self._synced:
                    async with self.lock:
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
        await self.apply(state)

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
            1, {n: replace(e, revision=1) for n, e in applied.endpoints.items()}, applied.records
        )
        if await self._store.commit(0, restored, entries):
            logger.warning("routing store was empty; restored the applied state")
            return restored
        return await self._store.read()

    async def apply(self, state: RoutingState) -> None:
        """Make this process load and route as ``state`` says (:attr:`lock` held)."""
        registry = self._registry
        for name, endpoint in state.endpoints.items():
            for version in endpoint.loaded:
                if not registry.has(name, version):
                    await self.try_load(name, version)
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

    async def try_load(self, name: str, version: str) -> LoadedVersion | ModelLoadError:
        """Load ``name/version`` here; a refusal is remembered and counted, not raised."""
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
            allowed = await self._approved(name, [d.name for d in dirs], state)
            loaded = []
            for version_dir in dirs:
                version = version_dir.name
                if options.versions is not None and version not in options.versions:
                    continue
                if version not in allowed:
                    continue
                if self._registry.has(name, version):
                    loaded.append(version)
                    continue
                result = await self.try_load(name, version)
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
            new_state = RoutingState(revision, {**state.endpoints, **stamped}, state.records)
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

    async def _approved(
        self, name: str, loaded: list[str], state: RoutingState | None
    ) -> list[str]:
        """The versions of ``loaded`` that may be loaded at ``name``'s first start (a model
        requiring approval: only approved ones, so only they can become champion)."""
        if not loaded or self._gate is None or not await self._gate.required_async(name):
            return loaded
        records = state.records if state is not None else {}
        configured = self._options_for(name).champion
        approved = []
        for version in loaded:
            problem = await self._gate.problem(name, version, records)
            if problem is None:
                approved.append(version)
            else:
                named = "configured champion" if version == configured else "repository"
                self._log_gated(name, version, problem, named)
        if not approved:
            logger.error(
                "model requires approval and has no approved version: not served until one "
                "is approved and loaded",
                extra={"model": name},
            )
        return approved

    def _log_gated(self, name: str, version: str, problem: str, named_by: str) -> None:
        """Say once (per problem) that ``name/version`` is not served for want of approval."""
        key = (name, version, problem)
        if key in self._gated_logged:
            return
        self._gated_logged.add(key)
        logger.warning(
            "%s/%s is not served: not approved: %s",
            name,
            version,
            problem,
            extra={"model": name, "version": version, "problem": problem, "named_by": named_by},
        )


def _origin() -> str:
    """This process, as the peer of changes it makes on its own."""
    return f"{socket.gethostname()}:{os.getpid()}"
