"""Loaded model versions and the routing table over them.

The registry owns, per version, the verified ONNX model, its feature layout and
its micro-batcher. Its state is two immutable mappings replaced whole (atomic
swap), so a request that looked a version up keeps it even if it is unloaded
meanwhile; unloading closes the batcher, which lets queued work finish first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from feature_streams.definitions import FeatureDefinitions
from server.batcher import BatchObserver, BatchPolicy, MicroBatcher
from server.errors import ModelLoadError, ModelNotFound
from server.executor import Job, JobResult, VersionExecutor
from server.features import FailurePolicy, FeatureLayout, FeatureStore
from server.router import EndpointRouting, RoutingTable, version_sort_key
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


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    """One servable version: model, input layout, batcher."""

    model: OnnxModel
    layout: FeatureLayout
    batcher: MicroBatcher[Job, JobResult]

    @property
    def name(self) -> str:
        return self.model.manifest.name

    @property
    def version(self) -> str:
        return self.model.manifest.version


ObserverFactory = Callable[[str, str], BatchObserver]


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

    async def load_repository(
        self, repository: Path, options_for: Callable[[str], ServingOptions]
    ) -> list[ModelLoadError]:
        """Load every ``<name>/<version>`` under ``repository``; return what was refused.

        A refused artifact is logged and skipped; the others keep loading.
        """
        refused: list[ModelLoadError] = []
        for version_dir in await asyncio.to_thread(scan_repository, repository):
            options = options_for(version_dir.parent.name)
            if options.versions is not None and version_dir.name not in options.versions:
                continue
            try:
                await self.load(version_dir, options)
            except ModelLoadError as error:
                logger.error("model refused", extra={"path": str(version_dir), "error": str(error)})
                refused.append(error)
        # At start-up the champion is the configured one, else the highest version;
        # a version loaded later takes no unpinned traffic until it is promoted.
        self._rebuild_routing(
            champions={
                name: options_for(name).champion or max(versions, key=version_sort_key)
                for name, versions in self._versions.items()
            }
        )
        return refused

    async def load(self, version_dir: Path, options: ServingOptions) -> LoadedVersion:
        """Verify and load one version off the event loop, then publish it."""
        model = await asyncio.to_thread(load_version, version_dir, options.runtime)
        name, version = model.manifest.name, model.manifest.version
        try:
            layout = FeatureLayout.from_manifest(model.manifest, self._definitions)
        except ModelLoadError:
            model.close()
            raise
        observer = self._observer_factory(name, version) if self._observer_factory else None
        executor = VersionExecutor(model, layout, self._store, options.failure_policy)
        batcher: MicroBatcher[Job, JobResult] = MicroBatcher(
            f"{name}/{version}", executor.run, options.policy, observer
        )
        batcher.start()
        loaded = LoadedVersion(model, layout, batcher)
        versions = dict(self._versions)
        previous = versions.get(name, {}).get(version)
        versions[name] = MappingProxyType({**versions.get(name, {}), version: loaded})
        self._versions = MappingProxyType(versions)
        self._rebuild_routing(champions={})
        logger.info(
            "model loaded",
            extra={"model": name, "version": version, "execution": options.runtime.execution},
        )
        if previous is not None:
            await self._retire(previous)
        return loaded

    async def close(self) -> None:
        """Drain every batcher and release every model."""
        loaded = self.all_versions()
        self._versions = MappingProxyType({})
        self._routing = RoutingTable()
        for version in loaded:
            await self._retire(version)

    async def _retire(self, loaded: LoadedVersion) -> None:
        await loaded.batcher.close()
        await asyncio.to_thread(loaded.model.close)

    def _rebuild_routing(self, champions: Mapping[str, str | None]) -> None:
        """Routing over the loaded versions; a champion that is gone falls back."""
        endpoints: dict[str, EndpointRouting] = {}
        for name, versions in self._versions.items():
            available = frozenset(versions)
            current = self._routing.endpoints.get(name)
            champion = champions.get(name)
            if champion not in available:
                champion = current.champion if current and current.champion in available else None
            if champion is None:
                champion = max(available, key=version_sort_key)
            endpoints[name] = EndpointRouting(champion=champion, versions=available)
        self._routing = RoutingTable(MappingProxyType(endpoints))


def scan_repository(repository: Path) -> list[Path]:
    """``<name>/<version>`` directories under ``repository``, versions in order."""
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} does not exist")
    found: list[Path] = []
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = [p for p in model_dir.iterdir() if p.is_dir()]
        found.extend(sorted(versions, key=lambda p: version_sort_key(p.name)))
    return found
