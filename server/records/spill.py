"""A bounded, append-only local spill of Kafka records (the durable sink's overflow).

Records are appended to segment files ``<seq>.spill`` in one directory and read back
from the oldest in the same order; a record is removed (``consume``) only after the
broker acknowledged it. Fully consumed segments are deleted; the position inside the
head segment is kept in a ``cursor`` file (written on each consume, without fsync: a
lost cursor re-sends, it never loses; consumers drop duplicates by key).

Framing, per segment: the 8-byte magic ``SSPILL01`` then frames of
``>II`` (body length, CRC-32 of the body) + body, body = ``>H`` topic length, topic,
``>i`` key length (-1: no key), key, value. A torn or corrupt tail (a crash in the
middle of a write) ends the segment: on open the last segment is truncated to its
last whole frame; a bad frame inside an older segment skips the rest of it (logged).

Durability: writes go to the OS at once (a crashed process loses nothing written);
``sync`` fsyncs (the sink calls it after every batch it spills and on close), so a
machine crash loses at most what was written since the last ``sync``.

The byte budget counts the segment files on disk; ``append`` refuses records past it
(the caller drops and counts them). One process owns a directory (``flock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["SpillFile", "SpillLocked", "SpillRecord"]

logger = logging.getLogger(__name__)

MAGIC = b"SSPILL01"
_FRAME = struct.Struct(">II")
_TOPIC = struct.Struct(">H")
_KEY = struct.Struct(">i")
_SUFFIX = ".spill"
_CURSOR = "cursor"
_LOCK = "lock"


@dataclass(frozen=True, slots=True)
class SpillRecord:
    """One spilled record."""

    topic: str
    key: bytes | None
    value: bytes

    def encoded(self) -> bytes:
        """The framed record (header + body)."""
        topic = self.topic.encode()
        key = self.key
        body = b"".join(
            (
                _TOPIC.pack(len(topic)),
                topic,
                _KEY.pack(-1 if key is None else len(key)),
                key or b"",
                self.value,
            )
        )
        return _FRAME.pack(len(body), zlib.crc32(body)) + body


class SpillLocked(RuntimeError):
    """Another process owns the spill directory."""


def _decode(body: bytes) -> SpillRecord:
    (topic_len,) = _TOPIC.unpack_from(body, 0)
    at = _TOPIC.size
    topic = body[at : at + topic_len].decode()
    at += topic_len
    (key_len,) = _KEY.unpack_from(body, at)
    at += _KEY.size
    key = None if key_len < 0 else body[at : at + key_len]
    at += max(key_len, 0)
    return SpillRecord(topic, key, body[at:])


def _read_frame(file: BinaryIO) -> tuple[SpillRecord, int] | None:
    """The next whole, intact frame and its size, or None (end, torn or corrupt)."""
    header = file.read(_FRAME.size)
    if len(header) < _FRAME.size:
        return None
    length, crc = _FRAME.unpack(header)
    body = file.read(length)
    if len(body) < length or zlib.crc32(body) != crc:
        return None
    try:
        record = _decode(body)
    except (struct.error, UnicodeDecodeError):
        return None
    return record, _FRAME.size + length


def _scan(path: Path, start: int) -> tuple[int, int]:
    """Whole frames of a segment from ``start``: (count, offset after the last one)."""
    count, end = 0, start
    with path.open("rb") as file:
        if file.read(len(MAGIC)) != MAGIC:
            return 0, len(MAGIC)
        file.seek(start)
        while (frame := _read_frame(file)) is not None:
            count += 1
            end += frame[1]
    return count, end


def _advance(path: Path, start: int, frames: int) -> int:
    """The offset ``frames`` whole frames after ``start`` (headers only are read)."""
    at = start
    with path.open("rb") as file:
        for _ in range(frames):
            file.seek(at)
            header = file.read(_FRAME.size)
            if len(header) < _FRAME.size:
                break
            at += _FRAME.size + _FRAME.unpack(header)[0]
    return at


@dataclass(slots=True)
class _Segment:
    seq: int
    count: int  # whole frames
    size: int  # bytes on disk


class SpillFile:
    """Segmented append-only record file with a read cursor.

    Used from one thread (the event loop), except the fsync half of ``sync``.
    """

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int) -> None:
        """Open (creating) ``directory``; recover what a previous run left there."""
        if max_bytes < 1 or segment_bytes < 1:
            raise ValueError("max_bytes and segment_bytes must be >= 1")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._lock: BinaryIO | None = (directory / _LOCK).open("a+b")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise SpillLocked(f"spill directory {directory} is in use by another process") from None
        self._segments: list[_Segment] = []
        self._head_offset = len(MAGIC)  # read position in the head segment
        self._head_index = 0  # frames of the head segment before the read position
        self._writer: BinaryIO | None = None
        self._retired: list[BinaryIO] = []  # rotated writers, closed by the next sync
        #: Records not yet consumed.
        self.pending = 0
        #: Bytes of the segment files (the budget counts these).
        self.bytes = 0
        self._recover()

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}{_SUFFIX}"

    def _recover(self) -> None:
        seqs = sorted(int(p.stem) for p in self.directory.glob(f"*{_SUFFIX}") if p.stem.isdigit())
        head_seq, head_offset = self._read_cursor()
        for seq in seqs:
            path = self._path(seq)
            if seq < head_seq:
                path.unlink(missing_ok=True)  # consumed; the cursor had moved past it
                continue
            count, end = _scan(path, len(MAGIC))
            size = path.stat().st_size
            if end < size:
                logger.warning(
                    "spill: segment %s has a torn or corrupt tail; ignoring %d bytes",
                    path.name,
                    size - end,
                )
                with path.open("r+b") as file:
                    file.truncate(end)
            if count == 0:
                path.unlink(missing_ok=True)
                continue
            self._segments.append(_Segment(seq, count, end))
            self.bytes += end
            self.pending += count
        head = self._segments[0] if self._segments else None
        if head is not None and head.seq == head_seq and head_offset > len(MAGIC):
            path = self._path(head.seq)
            at, index = len(MAGIC), 0
            while index < head.count and at < head_offset:
                at = _advance(path, at, 1)
                index += 1
            self._head_offset, self._head_index = at, index
            self.pending -= index
            if index >= head.count:
                self._drop_head()
        if self.pending:
            logger.info(
                "spill: %d records (%d bytes) left by a previous run in %s",
                self.pending,
                self.bytes,
                self.directory,
            )
        elif self._segments:
            self._reset()

    def _read_cursor(self) -> tuple[int, int]:
        with contextlib.suppress(OSError, ValueError):
            seq, offset = (self.directory / _CURSOR).read_text().split()
            return int(seq), int(offset)
        return -1, 0

    def _write_cursor(self) -> None:
        path = self.directory / _CURSOR
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{self._segments[0].seq} {self._head_offset}\n")
        os.replace(tmp, path)

    def has_room(self, size: int) -> bool:
        """Whether a record of ``size`` bytes (about) still fits the budget."""
        return self.bytes + size + _FRAME.size + len(MAGIC) <= self.max_bytes

    def append(self, records: Iterable[SpillRecord]) -> int:
        """Append records in order until the budget is reached; how many were written.

        The caller drops (and counts) the records past the returned count.
        """
        written = 0
        for record in records:
            frame = record.encoded()
            if self.bytes + len(frame) + len(MAGIC) > self.max_bytes:
                break
            writer = self._writer_for(len(frame))
            writer.write(frame)
            segment = self._segments[-1]
            segment.count += 1
            segment.size += len(frame)
            self.bytes += len(frame)
            self.pending += 1
            written += 1
        if self._writer is not None:
            self._writer.flush()  # to the OS: a crashed process loses nothing written
        return written

    def _writer_for(self, size: int) -> BinaryIO:
        writer = self._writer
        if writer is not None and self._segments[-1].size + size <= self.segment_bytes:
            return writer
        if writer is not None:
            writer.flush()
            self._retired.append(writer)
        seq = self._segments[-1].seq + 1 if self._segments else 0
        writer = self._path(seq).open("ab")
        writer.write(MAGIC)
        self._writer = writer
        self._segments.append(_Segment(seq, 0, len(MAGIC)))
        self.bytes += len(MAGIC)
        return writer

    def peek(self, max_records: int, max_bytes: int) -> list[SpillRecord]:
        """Up to ``max_records`` oldest unconsumed records within ``max_bytes`` (>= 1 record)."""
        out: list[SpillRecord] = []
        size = 0
        offset, index = self._head_offset, self._head_index
        if self._writer is not None:
            self._writer.flush()
        for segment in self._segments:
            if len(out) >= max_records:
                break
            with self._path(segment.seq).open("rb") as file:
                file.seek(offset)
                while index < segment.count and len(out) < max_records:
                    frame = _read_frame(file)
                    if frame is None:
                        logger.warning("spill: unreadable frame in %s; skipping", segment.seq)
                        break
                    if out and size + frame[1] > max_bytes:
                        return out
                    out.append(frame[0])
                    size += frame[1]
                    index += 1
            offset, index = len(MAGIC), 0
        return out

    def consume(self, count: int) -> None:
        """Forget the ``count`` oldest records (the broker acknowledged them).

        Nothing to forget touches no file: a memory-only round (every round while
        Kafka is up) would otherwise unlink or rewrite the cursor each time."""
        count = min(count, self.pending)
        if count <= 0:
            return
        self.pending -= count
        while count > 0 and self._segments:
            head = self._segments[0]
            take = min(count, head.count - self._head_index)
            self._head_offset = _advance(self._path(head.seq), self._head_offset, take)
            self._head_index += take
            count -= take
            if self._head_index >= head.count and len(self._segments) > 1:
                self._drop_head()
            elif self._head_index >= head.count:
                break
        if not self.pending:
            self._reset()
        else:
            self._write_cursor()

    def _drop_head(self) -> None:
        head = self._segments.pop(0)
        self._path(head.seq).unlink(missing_ok=True)
        self.bytes -= head.size
        self._head_offset, self._head_index = len(MAGIC), 0

    def _reset(self) -> None:
        """Everything consumed: delete every segment (the next append starts a new one)."""
        if self._writer is not None:
            self._retired.append(self._writer)
            self._writer = None
        for segment in self._segments:
            self._path(segment.seq).unlink(missing_ok=True)
        self._segments.clear()
        (self.directory / _CURSOR).unlink(missing_ok=True)
        self.bytes = 0
        self._head_offset, self._head_index = len(MAGIC), 0

    def sync_begin(self) -> tuple[list[BinaryIO], list[BinaryIO]]:
        """On the loop: (files to fsync, files to close after) for ``sync_files``."""
        retired, self._retired = self._retired, []
        files = list(retired)
        if self._writer is not None:
            self._writer.flush()
            files.append(self._writer)
        return files, retired

    @staticmethod
    def sync_files(files: list[BinaryIO], close: list[BinaryIO]) -> None:
        """Off the loop: fsync ``files``, then close ``close``."""
        for file in files:
            with contextlib.suppress(OSError, ValueError):  # a file already deleted
                os.fsync(file.fileno())
        for file in close:
            file.close()

    def sync(self) -> None:
        """Flush and fsync everything written (blocking)."""
        self.sync_files(*self.sync_begin())

    def close(self) -> None:
        """Fsync, close and release the directory."""
        self.sync()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
