"""``RoutingSync.close`` ends the routing watch even when the read it cancels answers
the cancellation with an error instead (redis-py turns a cancelled read that is timing
out into its own ``TimeoutError``, which the store reports as unavailable). Seen
hanging the integration suite at ``AppContext.close()`` with the watch still polling."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

from server.errors import DependencyUnavailable
from server.registry import ModelRegistry, ServingOptions
from server.routing.store import RoutingStore
from server.routing.sync import RoutingSync


def _no_options(name: str) -> ServingOptions:
    raise AssertionError(f"the watch alone needs no serving options ({name})")


class _SwallowingStore:
    """Every revision read blocks; its cancellation comes back as the store's error."""

    def __init__(self) -> None:
        self.reads = 0
        self.blocked = asyncio.Event()

    async def revision(self) -> int:
        self.reads += 1
        self.blocked.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise DependencyUnavailable("routing store: Timeout reading") from None
        return 0


async def test_close_ends_the_watch_when_the_cancelled_read_raises_a_store_error() -> None:
    store = _SwallowingStore()
    sync = RoutingSync(
        cast(ModelRegistry, None),
        cast(RoutingStore, store),
        Path("."),
        _no_options,
        canary_entity="card_id",
        poll_interval_s=0.001,
    )
    # the watch alone (``start`` would bootstrap from the store first)
    sync._task = asyncio.get_running_loop().create_task(sync._watch())
    await asyncio.wait_for(store.blocked.wait(), 5)  # the watch is inside its read
    closing = asyncio.create_task(sync.close())
    done, _ = await asyncio.wait({closing}, timeout=5)
    assert closing in done, "close() still waiting for the routing watch"
    reads = store.reads
    await asyncio.sleep(0.05)
    assert store.reads == reads  # nothing polls after close
