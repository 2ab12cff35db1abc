"""The fetcher's reply loop against a real Redis: the same replies as redis-py's
pipeline (every parser and protocol), and a round trip that does not finish (timeout,
cancellation) never leaves its replies on a pooled connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis._parsers import _AsyncRESP2Parser, _AsyncRESP3Parser
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from feature_streams.reply_loop import execute_reads, pack_commands
from tests.conftest import free_port

pytestmark = pytest.mark.integration

COMMANDS: list[tuple[Any, ...]] = [
    ("HGETALL", "h:1"),
    ("HGETALL", "h:missing"),
    ("HGETALL", "s:1"),  # WRONGTYPE: a string
    ("HMGET", "h:1", "a", "nope", "b"),
    ("HMGET", "s:1", "a"),  # WRONGTYPE
    ("HGET", "h:1", "b"),
    ("HGET", "h:1", "nope"),
    ("HGETALL", "h:é"),  # a non-ASCII key and field
]


async def _seed(client: Redis) -> None:
    await client.hset("h:1", mapping={"a": "1.5", "b": "x"})
    await client.hset("h:é", mapping={"ü": "2"})
    await client.set("s:1", "not a hash")


def _comparable(replies: list[Any]) -> list[Any]:
    return [(type(r), str(r)) if isinstance(r, BaseException) else r for r in replies]


@pytest.mark.parametrize(
    ("protocol", "parser"),
    [
        (3, _AsyncHiredisParser),
        (2, _AsyncHiredisParser),
        (3, _AsyncRESP3Parser),
        (2, _AsyncRESP2Parser),
    ],
)
async def test_replies_equal_redis_py_pipeline(redis_url: str, protocol: int, parser: type) -> None:
    client = Redis.from_url(redis_url, protocol=protocol, parser_class=parser)
    try:
        await _seed(client)
        async with client.pipeline(transaction=False) as pipe:
            for args in COMMANDS:
                pipe.execute_command(*args)
            expected = await pipe.execute(raise_on_error=False)
        got = await execute_reads(client, COMMANDS, 1.0)
        assert _comparable(got) == _comparable(expected)
        assert got[0] == {b"a": b"1.5", b"b": b"x"} and got[1] == {}
        assert isinstance(got[2], ResponseError) and str(got[2]).startswith("WRONGTYPE")
        assert got[7] == {"ü".encode(): b"2"}
        assert await execute_reads(client, [], 1.0) == []
    finally:
        await client.aclose()


def test_packing_is_redis_protocol() -> None:
    assert pack_commands([("HGET", "k", b"f"), ("HGETALL", "é")]) == (
        b"*3\r\n$4\r\nHGET\r\n$1\r\nk\r\n$1\r\nf\r\n*2\r\n$7\r\nHGETALL\r\n$2\r\n\xc3\xa9\r\n"
    )
    with pytest.raises(TypeError):
        pack_commands([("HGET", "k", 1)])


@pytest.fixture
async def paused(redis_url: str) -> AsyncIterator[tuple[Redis, Redis]]:
    """A client (one pooled connection) and a second one that pauses Redis."""
    client = Redis.from_url(redis_url, max_connections=1)
    admin = Redis.from_url(redis_url)
    await client.hset("a", "f", "1")
    await client.hset("b", "f", "2")
    try:
        yield client, admin
    finally:
        await admin.client_unpause()
        await client.aclose()
        await admin.aclose()


async def test_a_timed_out_round_trip_leaves_no_reply_behind(
    paused: tuple[Redis, Redis],
) -> None:
    client, admin = paused
    assert await execute_reads(client, [("HGETALL", "a")], 1.0) == [{b"f": b"1"}]
    await admin.client_pause(300)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await execute_reads(client, [("HGETALL", "a")], 0.05)
    assert asyncio.get_running_loop().time() - started < 0.25
    await admin.client_unpause()
    await asyncio.sleep(0.05)  # "a"'s late reply, if its connection were still pooled
    # The pool's only connection was dropped: "b" is read on a fresh one, not "a"'s reply.
    assert await execute_reads(client, [("HGETALL", "b")], 1.0) == [{b"f": b"2"}]


async def test_a_cancelled_round_trip_leaves_no_reply_behind(
    paused: tuple[Redis, Redis],
) -> None:
    client, admin = paused
    await admin.client_pause(300)
    task = asyncio.create_task(execute_reads(client, [("HGETALL", "a")], 1.0))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await admin.client_unpause()
    await asyncio.sleep(0.05)
    assert await execute_reads(client, [("HGETALL", "b")], 1.0) == [{b"f": b"2"}]


async def test_unreachable_redis_raises_a_connection_error() -> None:
    down = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    try:
        with pytest.raises(RedisConnectionError):
            await execute_reads(down, [("HGETALL", "a")], 5.0)
    finally:
        await down.aclose()


async def test_only_read_commands_are_run(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match="DEL"):
            await execute_reads(client, [("HGETALL", "a"), ("DEL", "a")], 1.0)
    finally:
        await client.aclose()
