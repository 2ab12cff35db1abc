"""Pipelines on a Redis Cluster: one per node, each on its own, concurrently.

The fetcher queues a micro-batch's reads on :class:`QueuedReads` (the same
:class:`~feature_streams.read_plan.ReadPipeline` surface a redis-py pipeline offers),
then :meth:`NodePipelines.execute` groups them by the primary that holds each key
(``RedisCluster.get_node_from_key``: the client's slot map, no I/O) and sends one
pipeline per node, all at once, each under the fetch timeout. The replies come back
in queue order.

A node that fails (connection refused or lost, no answer within the timeout, a
node-wide error reply such as ``LOADING``, ``CLUSTERDOWN`` or ``MOVED``) fails only
the commands it holds: their replies are :class:`NodeUnavailableError`, every other
reply is the node's real answer. Any single-key command can go this way (the stream
worker's apply-once ``EVALSHA`` calls do, see :meth:`NodePipelines.execute_keyed`).
redis-py's own ``ClusterPipeline`` is not used for this: on a connection error it
closes the whole client (every node's connections) and sleeps before retrying, so one
dead node would fail or stall the healthy ones.

After a node failure the slot map is refreshed in the background (at most one refresh
at a time, at most one per ``refresh_interval_s``), so once a replica has taken over
the failed primary's slots the next micro-batches read from it.

An optional :class:`NodeHealth` (the server's per-node circuit breakers) is asked
before each node's pipeline; a node it refuses fails its commands at once, without
costing the micro-batch a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode, PipelineCommand
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

__all__ = ["NodeHealth", "NodePipelines", "NodeUnavailableError", "QueuedReads"]

logger = logging.getLogger(__name__)

_NODE_ERRORS = (
    "MOVED",
    "ASK",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "LOADING",
    "BUSY",
    "OOM",
    "READONLY",
    "MASTERDOWN",
    "MISCONF",
)
"""Error replies about the node (its slots moved, it is loading, blocked, full...);
any other error reply (``WRONGTYPE``, ``NOSCRIPT``, a script's error) is the command's."""

_REFRESH_TIMEOUT_S = 5.0


class NodeUnavailableError(RedisError):
    """The reply of a command whose node could not answer (the node is named)."""

    def __init__(self, node: str, cause: str) -> None:
        super().__init__(f"redis node {node} unavailable: {cause}")
        self.node = node


class NodeHealth(Protocol):
    """Per-node gate (e.g. one circuit breaker per node), keyed by ``host:port``."""

    def allow(self, node: str) -> bool: ...
    def success(self, node: str) -> None: ...
    def failure(self, node: str) -> None: ...
    def abandon(self, node: str) -> None: ...


class QueuedReads:
    """Records read commands in order (a ``ReadPipeline`` for :class:`NodePipelines`)."""

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def hmget(self, name: str, keys: Any, /) -> None:
        """Queue ``HMGET name *keys``."""
        self.commands.append(("HMGET", name, *keys))

    def hget(self, name: str, key: str, /) -> None:
        """Queue ``HGET name key``."""
        self.commands.append(("HGET", name, key))

    def hgetall(self, name: str, /) -> None:
        """Queue ``HGETALL name``."""
        self.commands.append(("HGETALL", name))

    def __len__(self) -> int:
        return len(self.commands)


class NodePipelines:
    """Runs single-key commands as one pipeline per cluster node; one per client."""

    def __init__(
        self,
        client: RedisCluster,
        health: NodeHealth | None = None,
        *,
        refresh_interval_s: float = 0.25,
    ) -> None:
        self._client = client
        self._health = health
        self._refresh_interval_s = refresh_interval_s
        self._refreshing: asyncio.Task[None] | None = None
        self._next_refresh = 0.0

    async def execute(
        self, commands: Sequence[tuple[Any, ...]], timeout_s: float | None
    ) -> list[object]:
        """Every command's reply in order: a value, a key's error reply, or a
        :class:`NodeUnavailableError` for the commands of a node that failed.
        Each command is ``(NAME, key, *args)``."""
        return await self.execute_keyed([args[1] for args in commands], commands, timeout_s)

    async def execute_keyed(
        self,
        keys: Sequence[Any],
        commands: Sequence[tuple[Any, ...]],
        timeout_s: float | None,
        *,
        replica_wait_ms: int | None = None,
    ) -> list[object]:
        """As :meth:`execute`, with each command's one key given in ``keys``.

        ``replica_wait_ms`` (writes): each node's pipeline ends with ``WAIT 1 <ms>``, so
        it returns once a replica holds its writes (or after the wait, best effort: a
        primary without a replica must not stop the writer)."""
        results: list[object] = [None] * len(commands)
        by_node: dict[str, tuple[ClusterNode, list[PipelineCommand]]] = {}
        get_node = self._client.get_node_from_key
        for position, (key, args) in enumerate(zip(keys, commands, strict=True)):
            try:
                node = get_node(key)
            except RedisClusterException as error:  # slot not covered (yet)
                results[position] = NodeUnavailableError("?", str(error))
                self._schedule_refresh(None)
                continue
            if node is None:  # only with replica=True; kept for the type checker
                results[position] = NodeUnavailableError("?", "no node for key")
                continue
            entry = by_node.get(node.name)
            if entry is None:
                entry = by_node[node.name] = (node, [])
            entry[1].append(PipelineCommand(position, *args))
        if replica_wait_ms is not None:
            for _, queued in by_node.values():
                queued.append(PipelineCommand(-1, "WAIT", 1, replica_wait_ms))
        health = self._health
        runs = []
        for name, (node, queued) in by_node.items():
            if health is None or health.allow(name):
                runs.append(self._run_node(node, queued, timeout_s))
            else:
                refused = NodeUnavailableError(name, "circuit breaker open")
                for command in queued:
                    results[command.position] = refused
        if len(runs) == 1:
            await runs[0]
        elif runs:
            await asyncio.gather(*runs)
        for _, queued in by_node.values():
            for command in queued:
                if command.position >= 0 and results[command.position] is None:
                    results[command.position] = command.result
        return results

    async def _run_node(
        self, node: ClusterNode, queued: list[PipelineCommand], timeout_s: float | None
    ) -> None:
        """One node's pipeline; on failure every command's result names the node."""
        health = self._health
        cause: str | None = None
        try:
            async with asyncio.timeout(timeout_s):
                await node.execute_pipeline(queued)
        except (RedisError, OSError, TimeoutError) as error:
            cause = _describe(error)
        except BaseException:
            if health is not None:
                health.abandon(node.name)  # cancelled: no verdict on the node
            raise
        else:
            for command in queued:
                result = command.result
                if isinstance(result, BaseException) and _is_node_error(result):
                    cause = _describe(result)  # MOVED, LOADING, CLUSTERDOWN, connection lost
                    break
        if cause is None:
            if health is not None:
                health.success(node.name)
            return
        if health is not None:
            health.failure(node.name)
        unavailable = NodeUnavailableError(node.name, cause)
        for command in queued:
            command.result = unavailable
        self._schedule_refresh(node.name)

    def _schedule_refresh(self, failed_node: str | None) -> None:
        """Re-read the slot map soon (a replica may have taken the failed node's slots)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if (self._refreshing is not None and not self._refreshing.done()) or (
            now < self._next_refresh
        ):
            return
        self._next_refresh = now + self._refresh_interval_s
        self._refreshing = loop.create_task(
            self._refresh(failed_node), name="redis-cluster-slots-refresh"
        )

    async def _refresh(self, failed_node: str | None) -> None:
        try:
            async with asyncio.timeout(_REFRESH_TIMEOUT_S):
                await self._client.nodes_manager.initialize(last_failed_node_name=failed_node)
        except (RedisError, OSError, TimeoutError) as error:
            logger.warning("redis cluster slot map refresh failed: %r", error)

    async def aclose(self) -> None:
        """Stop a slot map refresh in flight (the client is the caller's)."""
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _is_node_error(reply: BaseException) -> bool:
    """A failure of the node (connection lost, a node-wide error reply), not of one
    command (redis-py parses ``MOVED``/``ASK`` replies into their own exceptions)."""
    if isinstance(reply, MovedError | AskError | TryAgainError | ClusterDownError):
        return True
    return not isinstance(reply, ResponseError) or str(reply).startswith(_NODE_ERRORS)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
