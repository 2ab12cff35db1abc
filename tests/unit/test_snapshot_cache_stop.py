"""``BatchSnapshotCache.stop`` ends the background refresh even when the read it
cancels answers the cancellation with redis-py's ``TimeoutError`` (seen hanging the
integration suite: the loop logged the "timeout", slept and refreshed forever while
``stop`` waited for it)."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, cast

from redis.exceptions import TimeoutError as RedisTimeout

from feature_streams.fetcher import BatchSnapshotCache
from feature_streams.redis_client import AnyRedis


class _SwallowingPipeline:
    """A pipeline whose reads block, and whose cancellation comes back as a
    ``redis.exceptions.TimeoutError`` (a read timing out while being cancelled)."""

    def __init__(self, client: _Client) -> None:
        self._client = client

    async def __aenter__(self) -> _SwallowingPipeline:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def get(self, key: str) -> None:
        pass

    async def execute(self) -> list[Any]:
        self._client.reads += 1
        if self._client.reads != 2:
            return [b"s1"]  # start()'s first refresh; any after the swallowed cancel
        self._client.blocked.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RedisTimeout("Timeout reading from 127.0.0.1:6379") from None
        return [b"s1"]


class _Client:
    def __init__(self) -> None:
        self.reads = 0
        self.blocked = asyncio.Event()

    def pipeline(self, transaction: bool = True) -> _SwallowingPipeline:
        return _SwallowingPipeline(self)


async def test_stop_ends_the_refresh_when_the_cancelled_read_raises_a_redis_error() -> None:
    client = _Client()
    cache = BatchSnapshotCache(cast(AnyRedis, client), ["profile"], refresh_interval_s=0.001)
    await cache.start()
    assert cache.snapshot_id("profile") == "s1"
    await asyncio.wait_for(client.blocked.wait(), 5)  # the refresh is inside its read
    stopping = asyncio.create_task(cache.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert stopping in done, "stop() still waiting for the refresh loop"
    reads = client.reads
    await asyncio.sleep(0.05)
    assert client.reads == reads  # nothing refreshes after stop
