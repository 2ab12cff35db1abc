"""ScoreStream ends at once when its request reader fails (garbage bytes, a reader
error), instead of holding the call until the deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from protos.streamscore.v1 import scoring_pb2 as pb
from server import grpc_api
from tests.conftest import TEST_FEATURES
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
DEADLINE_S = 600.0  # far beyond the test's own timeout: ending early is the only pass
VALID = pb.ScoreRequest(model="lin", request_id="ok-1", features=dict.fromkeys(TEST_FEATURES, 0.5))


async def test_garbage_message_ends_the_stream_with_invalid_argument(
    linear_repository: Path,
) -> None:
    stop = asyncio.Event()

    async def requests() -> AsyncIterator[bytes]:
        yield VALID.SerializeToString()
        yield b"\xff\xff\xff\xff"  # not a ScoreRequest
        await stop.wait()  # the client keeps its side open

    async with running_server(linear_repository) as srv:
        method = srv.channel.stream_stream(
            "/streamscore.v1.Scoring/ScoreStream",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        call = method(requests(), timeout=DEADLINE_S)
        try:
            answers = [answer async for answer in call]
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
            assert "not a valid streamscore.v1.ScoreRequest message" in (error.details() or "")
        else:
            pytest.fail(f"stream ended OK after garbage: {answers}")
        finally:
            stop.set()


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted


async def test_reader_error_ends_the_handler(linear_repository: Path) -> None:
    """The reader raises mid-stream (no deadline at all): the handler still ends."""
    never = asyncio.Event()

    async def requests() -> AsyncIterator[pb.ScoreRequest]:
        yield VALID
        raise RuntimeError("transport went away")
        await never.wait()  # pragma: no cover

    async with running_server(linear_repository) as srv:
        app = srv.app
        service = grpc_api.ScoringService(app.pipeline, app.registry, app.metrics)
        context = _Context()
        stream = service.ScoreStream(requests(), context)  # type: ignore[arg-type]
        with pytest.raises(_Aborted):
            async with asyncio.timeout(30):
                async for _ in stream:
                    pass
    assert context.aborted is not None
    assert context.aborted[0] is grpc.StatusCode.INTERNAL
