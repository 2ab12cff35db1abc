"""The answers of one ScoreStream between their completion and the transport.

Bounded twice: at most ``max_items`` items are read and not yet sent (being scored,
or answered and unsent), and the stream stops reading while its unsent answers hold
``max_bytes`` or more (serialized size; one answer always fits, so a single large
answer cannot wedge the stream). A client that stops reading therefore stops the
reads too (HTTP/2 flow control pushes back on the transport) and pins at most about
``max_bytes`` plus ``max_items`` answers in flight.
One producer (the stream's reader) and one consumer (the handler's generator).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["AnswerBuffer"]

T = TypeVar("T")


class AnswerBuffer(Generic[T]):
    """Unsent answers of one stream, bounded in items and bytes."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("max_items and max_bytes must be >= 1")
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._queue: deque[tuple[T, int]] = deque()
        self._items = 0
        self._bytes = 0
        self._closed = False
        self._answered = asyncio.Event()
        self._freed = asyncio.Event()

    @property
    def buffered_bytes(self) -> int:
        """Serialized bytes of the answers waiting to be sent."""
        return self._bytes

    @property
    def items(self) -> int:
        """Items admitted and not yet sent."""
        return self._items

    def has_room(self) -> bool:
        """True when one more item may be read now."""
        return self._items < self._max_items and self._bytes < self._max_bytes

    async def admit(self) -> None:
        """Wait until one more item may be read, then count it."""
        while not self.has_room():
            self._freed.clear()
            await self._freed.wait()
        self._items += 1

    def put(self, answer: T, size: int) -> None:
        """The answer of an admitted item, ``size`` bytes once serialized."""
        self._queue.append((answer, size))
        self._bytes += size
        self._answered.set()

    def close(self) -> None:
        """No more items will be admitted (the reader ended)."""
        self._closed = True
        self._answered.set()

    async def take_all(self) -> list[tuple[T, int]]:
        """Every answer waiting (at least one), with its size, in order; ``[]`` once
        closed and every item was sent. One wait for a burst of answers, not one each."""
        while not self._queue:
            if self._closed and self._items == 0:
                return []
            self._answered.clear()
            await self._answered.wait()
        taken = list(self._queue)
        self._queue.clear()
        return taken

    def sent(self, size: int) -> None:
        """A taken answer of ``size`` bytes left with the transport: its room is free."""
        self._items -= 1
        self._bytes -= size
        self._freed.set()
