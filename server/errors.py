"""Domain errors, each naming the status it answers with. Free of gRPC.

    ScoringError                     base; ``status`` is a :class:`Status`
    ├── InvalidInput                 INVALID_ARGUMENT: names the bad field
    ├── ModelNotFound                NOT_FOUND: unknown model or version
    ├── QueueFull                    RESOURCE_EXHAUSTED: micro-batch queue over its bound
    ├── DeadlineExceeded             DEADLINE_EXCEEDED: dropped before running
    ├── DependencyUnavailable        UNAVAILABLE: a dependency is down and policy says fail
    ├── ShuttingDown                 UNAVAILABLE: the server is draining
    ├── ModelLoadError               FAILED_PRECONDITION: an artifact was refused at load
    ├── NoExplainer                  FAILED_PRECONDITION: reasons asked of a model without one
    └── InferenceFailed              INTERNAL: the runtime raised while running a batch

Others live beside what raises them (``server.routing.state``: RoutingConflict,
ConcurrentUpdate; ``server.admin.auth``: Unauthenticated, PermissionDenied).
``server.grpc_status`` is the one place a ``Status`` becomes a gRPC status code;
anything that is not a ``ScoringError`` is a bug, logged there and answered INTERNAL.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class Status(StrEnum):
    """The status an error answers with; each value is the name of a gRPC status code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


class ScoringError(Exception):
    """Base of every error that is answered with its own status and message."""

    status: ClassVar[Status] = Status.INTERNAL


class InvalidInput(ScoringError):
    """The request is malformed; the message names the field."""

    status = Status.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ModelNotFound(ScoringError):
    """No loaded model/version answers to the name asked for."""

    status = Status.NOT_FOUND


class QueueFull(ScoringError):
    """The version's micro-batch queue is at ``max_queue_size``."""

    status = Status.RESOURCE_EXHAUSTED


class DeadlineExceeded(ScoringError):
    """The caller's deadline passed before the request ran; it was never computed."""

    status = Status.DEADLINE_EXCEEDED


class DependencyUnavailable(ScoringError):
    """A dependency (e.g. Redis) is down and the model's policy is to fail."""

    status = Status.UNAVAILABLE


class ShuttingDown(ScoringError):
    """The server is draining and accepts no new work."""

    status = Status.UNAVAILABLE


class ModelLoadError(ScoringError):
    """A model artifact was refused (bad file, sha256 mismatch, manifest/graph mismatch)."""

    status = Status.FAILED_PRECONDITION


class NoExplainer(ScoringError):
    """Reasons were asked of a version without an explainer; names the model."""

    status = Status.FAILED_PRECONDITION

    def __init__(self, model: str, version: str) -> None:
        super().__init__(
            f"model {model!r} version {version!r} has no explainer: it cannot give reasons"
        )


class InferenceFailed(ScoringError):
    """The runtime raised while running a batch; every request in it gets this."""

    status = Status.INTERNAL
