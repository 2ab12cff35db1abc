"""``--features online``: the store's current values, read by the server's own code.

This is the one place batch scoring touches the server's feature assembly
(:class:`server.features.FeatureLayout` and :class:`server.feature_store.FeatureStore`):
each row is prepared and filled exactly as a Score request without features of the
store would be, at the store's clock (now). When that code moves, this module is
the only one to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

from feature_streams.definitions import FeatureDefinitions, FeatureSource, resolve_features
from server.errors import InvalidInput
from server.features import FailurePolicy, FeatureLayout
from server.manifest import ModelManifest

__all__ = ["OnlineFeatures", "OnlineFeaturesError"]

_FILL_ROWS: Final = 1024


class OnlineFeaturesError(ValueError):
    """A row the server would refuse (the message names column and row)."""


@dataclass(frozen=True)
class OnlineFeatures:
    """Current feature values from Redis, assembled by the server's code (picklable)."""

    definitions: FeatureDefinitions
    manifest: ModelManifest
    redis_url: str
    timeout_s: float = 5.0
    policy: FailurePolicy = "fail"

    def table(self, chunk: pa.Table, first_row: int = 1) -> pa.Table:
        """The chunk plus the features' current values (request features from the chunk)."""
        import asyncio  # here, with the Redis client: the point-in-time path needs neither

        rows = asyncio.run(self._fill(chunk, first_row))
        out = chunk.drop_columns([c for c in chunk.column_names if c in self.manifest.features])
        for j, name in enumerate(self.manifest.features):
            out = out.append_column(name, pa.array(rows[:, j].astype(np.float64)))
        return out

    async def _fill(self, chunk: pa.Table, first_row: int) -> npt.NDArray[np.float32]:
        from feature_streams.fetcher import BatchSnapshotCache
        from feature_streams.redis_client import RedisOptions, connect
        from server.feature_store import FeatureStore, StoreOptions

        layout = FeatureLayout.from_manifest(self.manifest, self.definitions)
        refs = resolve_features(self.definitions, self.manifest.features).refs
        request = [r.name for r in refs if r.source is FeatureSource.REQUEST]
        entities = [e for e in self.definitions.entities if e in chunk.column_names]
        client = await connect(RedisOptions(self.redis_url))  # one Redis or a cluster
        try:
            snapshots = BatchSnapshotCache(client, self.definitions.batch_groups)
            await snapshots.refresh()
            store = FeatureStore(client, snapshots, StoreOptions(timeout_s=self.timeout_s))
            prepared = []
            columns = {n: chunk.column(n).to_pylist() for n in request if n in chunk.column_names}
            ids = {e: chunk.column(e).to_pylist() for e in entities}
            for i in range(chunk.num_rows):
                features = {n: float(v[i]) for n, v in columns.items() if v[i] is not None}
                entity_ids = {
                    e: self.definitions.entities[e].key(v[i])
                    for e, v in ids.items()
                    if _present(v[i])
                }
                try:
                    prepared.append(layout.prepare(features, entity_ids, store.now_ms()))
                except InvalidInput as exc:
                    raise OnlineFeaturesError(
                        f"spine column {exc.field.split('.', 1)[-1]!r}, row {first_row + i}: {exc}"
                    ) from None
            for start in range(0, len(prepared), _FILL_ROWS):
                await store.fill(layout, prepared[start : start + _FILL_ROWS], self.policy)
        finally:
            await client.aclose()
        if not prepared:
            return np.empty((0, layout.width), np.float32)
        return np.concatenate([p.row for p in prepared], axis=0)


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())
