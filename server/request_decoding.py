"""Undecodable request bytes answer INVALID_ARGUMENT, on every RPC we register.

grpc decodes a request with the handler's ``request_deserializer`` before our code
runs; when the bytes are not a valid message it answers ``UNKNOWN "Unexpected
DecodeError"`` (found by ``bench.resilience.fuzz``). :func:`add_servicer` registers a
generated ``add_*Servicer_to_server`` through a registrar that keeps each handler's
deserializer for itself: grpc hands the raw bytes over, and the bytes are decoded
here, once, exactly as grpc would, with a ``DecodeError`` turned into
INVALID_ARGUMENT naming the request message. The wrapping happens at registration,
so a call pays no interceptor dispatch, only the decode it always paid.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from server.errors import InvalidInput

__all__ = ["UndecodableRequest", "add_servicer"]

S = TypeVar("S")
Decode = Callable[[bytes], Any]
Behavior = Callable[..., Any]


class UndecodableRequest(InvalidInput):
    """A streamed request message that is not valid protobuf: INVALID_ARGUMENT."""

    def __init__(self, what: str, error: Exception) -> None:
        super().__init__("request", _problem(what, error))


def _problem(what: str, error: Exception) -> str:
    return f"not a valid {what} message ({error})"


def _message(what: str, error: Exception) -> str:
    return f"request: {_problem(what, error)}"


def _unary_request(behavior: Behavior, decode: Decode, what: str, streaming: bool) -> Behavior:
    async def undecodable(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(what, error))

    if not streaming:

        async def unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # decoded inline: no coroutine of its own per call on the hot path
            try:
                request = decode(raw)
            except DecodeError as error:
                return await undecodable(context, error)  # abort raises
            return await behavior(request, context)

        return unary

    async def unary_stream(
        raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            request = decode(raw)
        except DecodeError as error:
            await undecodable(context, error)  # abort raises
            return  # pragma: no cover
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:  # a handler that writes through context.write
            await result

    return unary_stream


def _stream_request(behavior: Behavior, decode: Decode, what: str, streaming: bool) -> Behavior:
    async def messages(raw_iterator: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in raw_iterator:
            try:
                yield decode(raw)
            except DecodeError as error:
                raise UndecodableRequest(what, error) from None

    if not streaming:

        async def stream_unary(
            raw_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            try:
                return await behavior(messages(raw_iterator), context)
            except UndecodableRequest as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

        return stream_unary

    async def stream_stream(
        raw_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            result = behavior(messages(raw_iterator), context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:
                await result
        except UndecodableRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    return stream_stream


def _guarded(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its request decoding done by us (same deserializer)."""
    decode = handler.request_deserializer
    if decode is None:
        return handler
    descriptor = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
    what = str(getattr(descriptor, "full_name", "request"))
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary_request(handler.unary_unary, decode, what, False),
            response_serializer=serialize,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _unary_request(handler.unary_stream, decode, what, True),
            response_serializer=serialize,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _stream_request(handler.stream_unary, decode, what, False),
            response_serializer=serialize,
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        _stream_request(handler.stream_stream, decode, what, True),
        response_serializer=serialize,
    )


class _Registrar:
    """What generated ``add_*_to_server`` functions see instead of the server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Ignored: the registered handlers below carry the same methods, guarded."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        guarded = {name: _guarded(handler) for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),)
        )
        # grpc >= 1.62 (not in grpc-stubs yet): methods found without a generic lookup
        self._server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]


def add_servicer(
    add_to_server: Callable[[S, Any], None], servicer: S, server: grpc.aio.Server
) -> None:
    """Register ``servicer`` with a generated ``add_*Servicer_to_server`` function so
    that undecodable requests answer INVALID_ARGUMENT instead of UNKNOWN."""
    add_to_server(servicer, _Registrar(server))
