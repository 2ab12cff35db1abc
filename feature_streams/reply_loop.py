"""A micro-batch's read commands on a standalone Redis: one write, one reply loop.

redis-py's pipeline reads each reply through a chain of coroutines
(``Pipeline.parse_response`` -> ``Redis.parse_response`` -> ``read_response``, which
enters an ``asyncio.timeout`` per reply) and a response callback, after packing each
command on its own. With ~100 ``HGETALL`` per 64-request micro-batch that was ~14% of
the server's loop in the Score bench at 64 callers (py-spy, bench/RESULTS.md).
:func:`execute_reads` keeps redis-py's connection (pool, handshake, TLS, auth, its
``Retry``) and only public calls on it: the commands are packed in one buffer and sent
with one write (``send_packed_command``), then the replies are read in one loop
(``read_response(timeout=math.inf)``: no timer per reply) under ONE deadline for the
whole round trip.

Replies are what the pipeline returns with ``raise_on_error=False`` for the commands
the fetcher sends (``HGETALL``, ``HMGET``, ``HGET``): an error reply is its
``ResponseError`` in place (e.g. ``WRONGTYPE``: one key's problem) and an ``HGETALL``
reply is a ``dict`` (a RESP3 map is one already; a RESP2 flat list is paired up).
Only these commands are accepted: others may need redis-py's response callbacks.

Failure semantics are the pipeline's: connection errors are retried by the
connection's ``Retry`` (as ``Pipeline.execute`` does), and when the round trip does not
finish (timeout, cancellation, lost connection, protocol error) the connection is
disconnected before it goes back to the pool, so no caller ever reads another's
replies. Not kept: redis-py's own per-pipeline observability hooks.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

__all__ = ["READ_COMMANDS", "execute_reads", "pack_commands"]

READ_COMMANDS = frozenset({"HGETALL", "HMGET", "HGET"})
"""The commands :func:`execute_reads` runs (their replies need no callback)."""


def pack_commands(commands: Sequence[tuple[Any, ...]], encoding: str = "utf-8") -> bytes:
    """The RESP encoding of ``commands`` (``str`` or ``bytes`` arguments), one buffer."""
    parts: list[bytes] = []
    append = parts.append
    for args in commands:
        append(b"*%d\r\n" % len(args))
        for arg in args:
            if isinstance(arg, str):
                arg = arg.encode(encoding)
            elif not isinstance(arg, bytes):
                raise TypeError(f"only str or bytes arguments are packed, got {type(arg)!r}")
            append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


async def execute_reads(
    client: Redis, commands: Sequence[tuple[Any, ...]], timeout_s: float | None
) -> list[object]:
    """Each command's reply, in order (an error reply as its ``ResponseError``).

    ``commands`` are ``(NAME, key, *args)`` with ``NAME`` in :data:`READ_COMMANDS`.
    Raises ``TimeoutError`` when the round trip (taking a connection, retries
    included) takes longer than ``timeout_s`` (``None``: the client's socket timeout,
    if any), a ``RedisError`` (e.g. ``ConnectionError``) when Redis cannot be reached;
    the connection is then dropped.
    """
    if not commands:
        return []
    for args in commands:
        if args[0] not in READ_COMMANDS:
            raise ValueError(f"execute_reads runs {sorted(READ_COMMANDS)}, not {args[0]!r}")
    pool: Any = client.connection_pool  # redis-py's pool methods are untyped
    packed = pack_commands(commands, pool.get_encoder().encoding)
    count = len(commands)
    conn: AbstractConnection | None = None
    try:
        async with asyncio.timeout(timeout_s if timeout_s is not None else _socket_timeout(pool)):
            conn = await pool.get_connection()
            connection = conn

            async def round_trip() -> list[object]:
                await connection.send_packed_command(packed)
                return await _read_replies(connection, count)

            async def dropped(error: Exception) -> None:  # before a retry, as redis-py does
                await connection.disconnect(nowait=True)

            replies: list[object] = await conn.retry.call_with_retry(round_trip, dropped)
    except BaseException:
        # Replies may be left unread on the socket: it must not be reused as is.
        if conn is not None:
            await asyncio.shield(_drop(pool, conn))
        raise
    await pool.release(conn)
    for position, args in enumerate(commands):
        reply = replies[position]
        if isinstance(reply, list) and args[0] == "HGETALL":  # RESP2: [field, value, ...]
            it = iter(reply)
            replies[position] = dict(zip(it, it, strict=False))
    return replies


def _socket_timeout(pool: Any) -> float | None:
    value = pool.connection_kwargs.get("socket_timeout")
    return None if value is None else float(value)


async def _drop(pool: Any, conn: AbstractConnection) -> None:
    try:
        await conn.disconnect(nowait=True)
    finally:
        await pool.release(conn)


async def _read_replies(conn: AbstractConnection, count: int) -> list[object]:
    """``count`` replies from ``conn`` (the caller drops the connection on failure).

    ``timeout=math.inf``: no ``asyncio.timeout`` per reply (the round trip's one
    deadline bounds the reads); an error reply is kept in place, as the pipeline does
    with ``raise_on_error=False``."""
    replies: list[object] = []
    append = replies.append
    read = conn.read_response
    try:
        for _ in range(count):
            try:
                append(await read(timeout=math.inf))
            except ResponseError as error:
                append(error)
    except OSError as error:  # the stream's own error, as redis-py reports it
        raise RedisConnectionError(f"Error while reading from Redis: {error.args}") from error
    return replies
