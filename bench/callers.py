"""One request at a time against a gRPC channel: unary calls and a multiplexed bidi stream.

Requests are pre-serialised bytes (no client-side serialisation cost during the run).
Unary responses are not deserialised; only the status counts. ``call`` never raises for
RPC failures: it returns ``None`` on success or the name of the failing status code.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import grpc
import grpc.aio

from bench.payloads import PoolItem
from protos.streamscore.v1 import scoring_pb2

SCORE_METHOD = "/streamscore.v1.Scoring/Score"
SCORE_STREAM_METHOD = "/streamscore.v1.Scoring/ScoreStream"
MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"

#: Client-side label for stream items left unanswered when their stream ended.
STREAM_ENDED = "STREAM_ENDED"
#: ``google.rpc.Code`` number -> ``grpc.StatusCode`` name, for per-item stream errors.
CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}
#: ScoreRequest.request_id is field 3, length-delimited: appended last, it overrides the
#: id already in a pre-serialised request (protobuf "last one wins" for singular fields).
_REQUEST_ID_TAG = b"\x1a"


class Caller(Protocol):
    """Sends one request and reports how it ended."""

    async def call(self, item: PoolItem) -> str | None:
        """``None`` on success, else the failing status code name."""
        ...

    async def aclose(self) -> None:
        """Release what the caller holds (not the channel)."""
        ...


def _identity(data: bytes) -> bytes:
    return data


class UnaryCaller:
    """Unary calls of one method with pre-serialised requests (Score or ModelInfer)."""

    def __init__(self, channel: grpc.aio.Channel, method: str, deadline_s: float | None) -> None:
        self._callable: Any = channel.unary_unary(
            method, request_serializer=_identity, response_deserializer=_identity
        )
        self._timeout = deadline_s

    async def call(self, item: PoolItem) -> str | None:
        """Send ``item``; ``None`` if the server answered OK."""
        try:
            await self._callable(item.payload, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        return None

    async def aclose(self) -> None:
        """Nothing to release."""


def with_request_id(payload: bytes, request_id: str) -> bytes:
    """``payload`` (a serialised ScoreRequest) with its request_id replaced by ``request_id``."""
    encoded = request_id.encode()
    if len(encoded) > 127:
        raise ValueError("request_id longer than 127 bytes")
    return payload + _REQUEST_ID_TAG + bytes((len(encoded),)) + encoded


class StreamCaller:
    """Many requests multiplexed over one ``ScoreStream``, matched back by request_id.

    Each send gets a fresh id, so answers may come back in any order. If the stream
    breaks, its pending items fail with the stream's status and the next call opens a
    new stream. With a deadline, an item not answered in time counts as
    ``DEADLINE_EXCEEDED`` (the stream itself has no deadline).
    """

    def __init__(self, channel: grpc.aio.Channel, deadline_s: float | None) -> None:
        self._callable: Any = channel.stream_stream(
            SCORE_STREAM_METHOD,
            request_serializer=_identity,
            response_deserializer=scoring_pb2.ScoreResponse.FromString,
        )
        self._deadline_s = deadline_s
        self._stream: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._write_lock = asyncio.Lock()
        self._seq = 0

    def _open(self) -> Any:
        stream = self._callable()
        self._stream = stream
        self._reader = asyncio.get_running_loop().create_task(self._read(stream))
        return stream

    async def _read(self, stream: Any) -> None:
        reason = STREAM_ENDED
        try:
            async for response in stream:
                future = self._pending.pop(response.request_id, None)
                if future is None or future.done():
                    continue
                if response.HasField("error"):
                    future.set_result(CODE_NAMES.get(response.error.code, "UNKNOWN"))
                else:
                    future.set_result(None)
        except grpc.aio.AioRpcError as error:
            reason = str(error.code().name)
        finally:
            if self._stream is stream:
                self._stream = None
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_result(reason)

    async def call(self, item: PoolItem) -> str | None:
        """Send ``item`` on the stream and wait for its answer."""
        stream = self._stream if self._stream is not None else self._open()
        self._seq += 1
        request_id = str(self._seq)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with self._write_lock:
                await stream.write(with_request_id(item.payload, request_id))
        except grpc.aio.AioRpcError as error:
            self._pending.pop(request_id, None)
            return str(error.code().name)
        except asyncio.InvalidStateError:
            self._pending.pop(request_id, None)
            return STREAM_ENDED
        if self._deadline_s is None:
            return await future
        try:
            async with asyncio.timeout(self._deadline_s):
                return await future
        except TimeoutError:
            self._pending.pop(request_id, None)
            return "DEADLINE_EXCEEDED"

    async def aclose(self) -> None:
        """Half-close the stream, give the server a moment to finish it, then cancel."""
        stream, reader = self._stream, self._reader
        if stream is None or reader is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await stream.done_writing()
        done, _ = await asyncio.wait({reader}, timeout=1.0)
        if not done:
            stream.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
