"""The one Redis client factory: standalone ``Redis`` or ``RedisCluster``, by mode.

Every process (server, stream worker, CLI tools) builds its client here, so one
setting (``redis.mode``) decides whether the feature store, routing state and
rollout statistics live on one Redis or on a Redis Cluster:

* ``standalone``: ``redis.asyncio.Redis`` on the URL;
* ``cluster``: ``redis.asyncio.RedisCluster`` seeded from the URL (it discovers the
  other nodes), created with ``require_full_coverage=False`` so a process can start
  while slots are uncovered and report it (:func:`uncovered_reason`);
* ``auto``: whichever the server at the URL is (``INFO cluster``).

:func:`connect` checks the mode against the server and raises
:class:`RedisModeMismatchError` (one line naming both) when they disagree; the
commands turn it into exit code 2. See ``docs/redis-cluster.md`` for the key layout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

__all__ = [
    "MODES",
    "AnyRedis",
    "RedisMode",
    "RedisModeMismatchError",
    "RedisOptions",
    "client_for",
    "connect",
    "detect_mode",
    "is_cluster",
    "scan_keys",
    "uncovered_reason",
]

RedisMode: TypeAlias = Literal["standalone", "cluster", "auto"]
MODES: tuple[RedisMode, ...] = ("standalone", "cluster", "auto")
AnyRedis: TypeAlias = "Redis | RedisCluster"
CLUSTER_SLOTS = 16384


class RedisModeMismatchError(Exception):
    """``redis.mode`` disagrees with the server it points at (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """How to build a client: URL, mode and pool limits."""

    url: str
    mode: RedisMode = "auto"
    max_connections: int = 64
    socket_timeout_s: float | None = None
    decode_responses: bool = False


def is_cluster(client: AnyRedis) -> bool:
    """Whether ``client`` talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)


async def detect_mode(url: str, timeout_s: float = 5.0) -> Literal["standalone", "cluster"]:
    """``cluster`` when the server at ``url`` has cluster mode enabled, else ``standalone``."""
    probe = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        info = await probe.info("cluster")
    finally:
        await probe.aclose()
    return "cluster" if int(info.get("cluster_enabled", 0)) == 1 else "standalone"


def client_for(options: RedisOptions, mode: Literal["standalone", "cluster"]) -> AnyRedis:
    """A client of the given (resolved) mode; connects lazily, checks nothing."""
    timeout = options.socket_timeout_s
    if mode == "cluster":
        return RedisCluster.from_url(
            options.url,
            max_connections=options.max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            require_full_coverage=False,
            decode_responses=options.decode_responses,
        )
    return Redis.from_url(
        options.url,
        max_connections=options.max_connections,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=options.decode_responses,
    )


async def connect(options: RedisOptions, *, probe_timeout_s: float = 5.0) -> AnyRedis:
    """Detect the server's mode, check it against ``options.mode`` and build the client.

    Raises :class:`RedisModeMismatchError` when a set mode disagrees with the server,
    ``RedisError``/``OSError`` when it cannot be reached.
    """
    detected = await detect_mode(options.url, probe_timeout_s)
    if options.mode != "auto" and options.mode != detected:
        raise RedisModeMismatchError(
            f"redis.mode is {options.mode!r} but {_where(options.url)} is a {detected} Redis"
            + (" (cluster_enabled:1)" if detected == "cluster" else " (cluster_enabled:0)")
        )
    client = client_for(options, detected)
    if isinstance(client, RedisCluster):
        await client.initialize()
    return client


def _where(url: str) -> str:
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1].split("/", 1)[0]


async def uncovered_reason(client: AnyRedis) -> str | None:
    """Why the cluster cannot serve every slot (``None``: all covered, or standalone).

    Asks every known node for ``CLUSTER INFO`` and reports the first that sees
    ``cluster_state:fail`` or fewer than 16384 slots assigned and ok.
    """
    if not isinstance(client, RedisCluster):
        return None
    nodes = client.get_nodes()
    replies = await asyncio.gather(
        *(client.cluster_info(target_nodes=node) for node in nodes), return_exceptions=True
    )
    answered = 0
    for node, info in zip(nodes, replies, strict=True):
        if isinstance(info, BaseException) or not isinstance(info, dict):
            continue
        answered += 1
        state = str(info.get("cluster_state", ""))
        ok = int(info.get("cluster_slots_ok", 0))
        if state != "ok" or ok < CLUSTER_SLOTS:
            return (
                f"redis cluster: node {node.name} reports cluster_state:{state}, "
                f"{ok}/{CLUSTER_SLOTS} slots ok"
            )
    if answered == 0:
        return "redis cluster: no node answered CLUSTER INFO"
    return None


async def scan_keys(client: AnyRedis, match: str, count: int = 1000) -> AsyncIterator[bytes | str]:
    """Every key matching ``match``; on a cluster, from every primary (each scanned to
    the end), so nothing is missed however the keys spread over the slots."""
    if isinstance(client, RedisCluster):
        for node in client.get_primaries():
            cursor = 0
            while True:
                reply = await client.scan(cursor, match=match, count=count, target_nodes=node)
                next_cursor, keys = reply
                if isinstance(next_cursor, dict):  # the cluster client: {node name: cursor}
                    next_cursor = next_cursor[node.name]
                cursor = int(next_cursor)
                for key in keys:
                    yield key
                if cursor == 0:
                    break
        return
    async for key in client.scan_iter(match=match, count=count):
        yield key


def redis_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a Redis call raises when the store is unreachable or failing."""
    return (RedisError, OSError, asyncio.TimeoutError)
