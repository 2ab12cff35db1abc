"""Loaded model versions and the routing table over them.

The registry owns, per version, the verified ONNX model, its feature layout and
its micro-batcher. Its state is two immutable mappings replaced whole (atomic
swap), so a request that looked a version up keeps it even if it is unloaded
meanwhile; unloading closes the batcher, which lets queued work finish first.

Which versions are loaded and how they are routed is decided by the caller
(``server.routing.sync``): ``load``/``unload`` change the loaded set and
``publish`` sets the routing, restricted to what is loaded here. ``unload``
refuses a version the table routes, so the table never names a missing version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from feature_streams.definitions import FeatureDefinitions
from server.batcher import BatchObserver, BatchPolicy, MicroBatcher
from server.errors import ModelLoadError, ModelNotFound
from server.executor import Job, JobResult, VersionBatchRunner
from server.explain.service import DEFAULT_REASONS, ReasonPolicy, VersionReasons, load_reasons
from server.feature_store import FeatureStore
from server.features import FailurePolicy, FeatureLayout
from server.manifest import ModelManifest
from server.router import CanaryRoute, EndpointRouting, RoutingTable, version_sort_key
from server.runtime import OnnxModel, RuntimeOptions, load_version

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServingOptions:
    """Per-model serving knobs the registry needs (from settings)."""

    policy: BatchPolicy
    runtime: RuntimeOptions
    versions: tuple[str, ...] | None = None
    champion: str | None = None
    failure_policy: FailurePolicy = "degrade"
    reasons: ReasonPolicy = DEFAULT_REASONS


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    """One servable version: model, input layout, batcher, and its reasons (explainer,
    catalogue, explanation batcher) when it has an explainer."""

    model: OnnxModel
    layout: FeatureLayout
    batcher: MicroBatcher[Job, JobResult]
    reasons: VersionReasons | None = None
    reason_policy: ReasonPolicy = DEFAULT_REASONS

    @property
    def name(self) -> str:
        return self.model.manifest.name

    @property
    def version(self) -> str:
        return self.model.manifest.version


ObserverFactory = Callable[[str, str], BatchObserver]


class DriftHooks(Protocol):
    """What the registry tells drift monitoring (``server.drift.monitor.DriftMonitor``)."""

    def attach(
        self, version_dir: Path, manifest: ModelManifest, feature_names: Sequence[str]
    ) -> BatchDrift | None: ...
    def detach(self, model: str, version: str) -> None: ...


class BatchDrift(Protocol):
    """One version's drift counts; ``observe`` gets every answered batch."""

    def observe(
        self,
        matrix: npt.NDArray[np.float32],
        outputs: Mapping[str, npt.NDArray[Any]],
        jobs: list[Job],
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """Wanted routing of one endpoint; versions need not be loaded (see ``publish``)."""

    champion: str
    canary: CanaryRoute | None = None
    shadows: tuple[str, ...] = ()


class ModelRegistry:
    """Versions by name and version, plus the routing table built over them."""

    def __init__(
        self,
        observer_factory: ObserverFactory | None = None,
        definitions: FeatureDefinitions | None = None,
        store: FeatureStore | None = None,
    ) -> None:
        self._versions: Mapping[str, Mapping[str, LoadedVersion]] = MappingProxyType({})
        self._routing = RoutingTable()
        self._observer_factory = observer_factory
        self._definitions = definitions
        self._store = store
        self._retire_hooks: list[Callable[[LoadedVersion], Awaitable[None]]] = []
        self._drift: DriftHooks | None = None

    def on_retire(self, hook: Callable[[LoadedVersion], Awaitable[None]]) -> None:
        """Call ``hook(version)`` when a version is unloaded or replaced, before its
        batcher is drained and its model closed (e.g. shadow lanes let go of it)."""
        self._retire_hooks.append(hook)

    def use_drift(self, hooks: DriftHooks) -> None:
        """Monitor drift of the versions loaded from now on (call before any load)."""
        if self._versions:
            raise RuntimeError("drift monitoring attached after versions were loaded")
        self._drift = hooks

    def use_features(self, definitions: FeatureDefinitions, store: FeatureStore) -> None:
        """Serve store features to the versions loaded from now on (call before any load)."""
        if self._versions:
            raise RuntimeError("feature store attached after versions were loaded")
        self._definitions = definitions
        self._store = store

    @property
    def routing(self) -> RoutingTable:
        """The current routing table (immutable snapshot)."""
        return self._routing

    def serves(self, name: str) -> bool:
        """True when ``name`` has a loaded version."""
        return name in self._versions

    def names(self) -> list[str]:
        """Served model names, sorted."""
        return sorted(self._versions)

    def versions(self, name: str) -> list[str]:
        """Loaded versions of ``name``, oldest first."""
        return sorted(self._versions.get(name, {}), key=version_sort_key)

    def get(self, name: str, version: str) -> LoadedVersion:
        """The loaded version; ``ModelNotFound`` when absent."""
        loaded = self._versions.get(name, {}).get(version)
        if loaded is None:
            raise ModelNotFound(f"model {name!r} version {version!r} is not loaded")
        return loaded

    def all_versions(self) -> list[LoadedVersion]:
        """Every loaded version."""
        return [v for versions in self._versions.values() for v in versions.values()]

    def has(self, name: str, version: str) -> bool:
        """True when ``name``/``version`` is loaded."""
        return version in self._versions.get(name, {})

    async def try_load(
        self, version_dir: Path, options: ServingOptions
    ) -> LoadedVersion | ModelLoadError:
        """``load``, but a refused artifact is logged and returned instead of raised."""
        try:
            return await self.load(version_dir, options)
        except ModelLoadError as error:
            logger.error("model refused", extra={"path": str(version_dir), "error": str(error)})
            return error

    async def load(self, version_dir: Path, options: ServingOptions) -> LoadedVersion:
        """Verify and load one version off the event loop, then make it pinnable.

        Routing of an endpoint that already has a champion is unchanged; a new
        endpoint gets this version as its champion.
        """
        model = await asyncio.to_thread(load_version, version_dir, options.runtime)
        name, version = model.manifest.name, model.manifest.version
        try:
            layout = FeatureLayout.from_manifest(model.manifest, self._definitions)
            reasons = await asyncio.to_thread(
                load_reasons,
                version_dir,
                model.manifest,
                self._definitions,
                options.reasons,
                options.policy,
            )
        except ModelLoadError:
            model.close()
            raise
        observer = self._observer_factory(name, version) if self._observer_factory else None
        drift = (
            self._drift.attach(version_dir, model.manifest, layout.names) if self._drift else None
        )
        runner = VersionBatchRunner(
            model,
            layout,
            self._store,
            options.failure_policy,
            on_batch=drift.observe if drift is not None else None,
        )
        batcher: MicroBatcher[Job, JobResult] = MicroBatcher(
            f"{name}/{version}", runner.run, options.policy, observer, run_now=runner.run_now
        )
        batcher.start()
        if reasons is not None:
            reasons.start()
        loaded = LoadedVersion(model, layout, batcher, reasons, options.reasons)
        versions = dict(self._versions)
        previous = versions.get(name, {}).get(version)
        versions[name] = MappingProxyType({**versions.get(name, {}), version: loaded})
        self._versions = MappingProxyType(versions)
        self.publish(self._current_specs())
        logger.info(
            "model loaded",
            extra={"model": name, "version": version, "execution": options.runtime.execution},
        )
        if previous is not None:
            await self._retire(previous)
        return loaded

    def publish(self, wanted: Mapping[str, RouteSpec]) -> RoutingTable:
        """Make ``wanted`` the routing table, restricted to the loaded versions.

        Every loaded endpoint gets routing: the wanted one where its versions are
        loaded; otherwise a champion that is not loaded falls back to the current
        one, else the highest loaded version (logged), and a canary or shadow that
        is not loaded is left out. ``versions`` (pinnable) is always the loaded set.
        """
        endpoints: dict[str, EndpointRouting] = {}
        for name, versions in self._versions.items():
            available = frozenset(versions)
            want = wanted.get(name)
            current = self._routing.endpoints.get(name)
            champion = want.champion if want else None
            if champion not in available:
                fallback = (
                    current.champion
                    if current and current.champion in available
                    else max(available, key=version_sort_key)
                )
                if champion is not None:
                    logger.error(
                        "champion not loaded here; serving another version",
                        extra={"model": name, "wanted": champion, "serving": fallback},
                    )
                champion = fallback
            canary = want.canary if want else None
            if canary is not None and (
                canary.version not in available or canary.version == champion
            ):
                canary = None
            shadows = tuple(
                s for s in (want.shadows if want else ()) if s in available and s != champion
            )
            endpoints[name] = EndpointRouting(champion, available, canary, shadows)
        self._routing = RoutingTable(MappingProxyType(endpoints))
        return self._routing

    async def unload(self, name: str, version: str) -> None:
        """Stop routing to nothing new: remove the version, then drain and release it.

        Refused (``ValueError``) while the routing table sends it traffic. Requests
        already routed to it keep it and finish on it.
        """
        loaded = self._versions.get(name, {}).get(version)
        if loaded is None:
            return
        routing = self._routing.endpoints.get(name)
        if routing is not None and version in routing.routed:
            raise ValueError(f"{name}/{version} is routed; publish a table without it first")
        versions = dict(self._versions)
        remaining = {v: lv for v, lv in versions[name].items() if v != version}
        if remaining:
            versions[name] = MappingProxyType(remaining)
        else:
            del versions[name]
        self._versions = MappingProxyType(versions)
        self.publish(self._current_specs())
        logger.info("model unloading", extra={"model": name, "version": version})
        await self._retire(loaded)
        logger.info("model unloaded", extra={"model": name, "version": version})

    def _current_specs(self) -> dict[str, RouteSpec]:
        return {
            name: RouteSpec(r.champion, r.canary, r.shadows)
            for name, r in self._routing.endpoints.items()
        }

    async def close(self) -> None:
        """Drain every batcher and release every model."""
        loaded = self.all_versions()
        self._versions = MappingProxyType({})
        self._routing = RoutingTable()
        for version in loaded:
            await self._retire(version)

    async def _retire(self, loaded: LoadedVersion) -> None:
        for hook in self._retire_hooks:
            try:
                await hook(loaded)
            except Exception:  # a hook must not keep the model loaded
                logger.exception("retire hook failed", extra={"model": loaded.name})
        await loaded.batcher.close()
        if self._drift is not None and not self.has(loaded.name, loaded.version):
            self._drift.detach(loaded.name, loaded.version)
        if loaded.reasons is not None:
            await loaded.reasons.close()
        await asyncio.to_thread(loaded.model.close)


def scan_repository(repository: Path) -> list[Path]:
    """``<name>/<version>`` directories under ``repository``, versions in order."""
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} does not exist")
    found: list[Path] = []
    for model_dir in sorted(p for p in repository.iterdir() if _visible_dir(p)):
        versions = [p for p in model_dir.iterdir() if _visible_dir(p)]
        found.extend(sorted(versions, key=lambda p: version_sort_key(p.name)))
    return found


def _visible_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")
