"""The ScoreStream answer buffer: bounded in items and in bytes, one answer always fits."""

from __future__ import annotations

import asyncio

import pytest

from server.answer_buffer import AnswerBuffer


async def test_reads_stop_once_unsent_answers_hold_the_byte_bound() -> None:
    buffer: AnswerBuffer[str] = AnswerBuffer(max_items=100, max_bytes=1000)
    for i in range(3):
        await buffer.admit()
        buffer.put(f"a{i}", 400)  # 1200 bytes unsent after the third
    assert buffer.buffered_bytes == 1200 and not buffer.has_room()
    waiting = asyncio.create_task(buffer.admit())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()  # the reader is held: nothing more is read
    taken = await buffer.take_all()
    assert taken == [("a0", 400), ("a1", 400), ("a2", 400)]  # one wait for the burst
    assert buffer.buffered_bytes == 1200  # taken is not sent: still counted
    buffer.sent(400)  # the transport took one: 800 bytes, room again
    await asyncio.wait_for(waiting, 5)
    assert buffer.items == 3


async def test_one_answer_larger_than_the_bound_still_passes() -> None:
    buffer: AnswerBuffer[str] = AnswerBuffer(max_items=10, max_bytes=10)
    await buffer.admit()
    buffer.put("big", 10_000)
    buffer.close()
    assert await buffer.take_all() == [("big", 10_000)]
    buffer.sent(10_000)
    assert await buffer.take_all() == []  # closed and every item sent


async def test_items_bound_holds_while_answers_are_pending() -> None:
    buffer: AnswerBuffer[str] = AnswerBuffer(max_items=2, max_bytes=1 << 20)
    await buffer.admit()
    await buffer.admit()
    assert not buffer.has_room()
    buffer.put("x", 1)
    buffer.close()
    assert await buffer.take_all() == [("x", 1)]
    buffer.sent(1)
    assert buffer.has_room()
    taking = asyncio.create_task(buffer.take_all())  # the second item is still being scored
    for _ in range(5):
        await asyncio.sleep(0)
    assert not taking.done()
    buffer.put("y", 1)
    assert await asyncio.wait_for(taking, 5) == [("y", 1)]


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_items"):
        AnswerBuffer(max_items=0, max_bytes=1)
