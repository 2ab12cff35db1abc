"""Domain errors -> gRPC status: the one mapping every servicer uses.

``ScoringError`` carries a :class:`server.errors.Status`; its gRPC code is the code
of the same name and its message is the error's. Anything else is a bug: logged
with its traceback here and answered INTERNAL without detail, so the process never
dies from a request and no internals leak to the caller.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import NoReturn

import grpc

from server.errors import ScoringError, Status

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error (logged by the server)"

_CODES: MappingProxyType[Status, grpc.StatusCode] = MappingProxyType(
    {status: grpc.StatusCode[status.value] for status in Status}
)


def grpc_code(status: Status) -> grpc.StatusCode:
    """The gRPC status code of a domain ``status``."""
    return _CODES[status]


def status_of(error: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message ``error`` is answered with; ``where`` names the call
    in the log line of an unexpected error."""
    if isinstance(error, ScoringError):
        return grpc_code(error.status), str(error)
    logger.error("unexpected error in %s", where, exc_info=error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


async def abort(
    context: grpc.aio.ServicerContext[object, object], error: Exception, where: str
) -> NoReturn:
    """End the call with the status of ``error`` (``context.abort`` raises)."""
    code, message = status_of(error, where)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover
