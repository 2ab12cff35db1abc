"""Domain errors, each carrying the gRPC status it maps to.

    ScoringError                     base; ``code`` is the gRPC status
    ├── InvalidInput                 INVALID_ARGUMENT: names the bad field
    ├── ModelNotFound                NOT_FOUND: unknown model or version
    ├── QueueFull                    RESOURCE_EXHAUSTED: micro-batch queue over its bound
    ├── DeadlineExceeded             DEADLINE_EXCEEDED: dropped before running
    ├── RequestCancelled             CANCELLED: caller went away before running
    ├── DependencyUnavailable        UNAVAILABLE: a dependency is down and policy says fail
    ├── ShuttingDown                 UNAVAILABLE: the server is draining
    └── ModelLoadError               FAILED_PRECONDITION: an artifact was refused at load

Servicers catch ``ScoringError`` and abort with ``error.code`` and ``str(error)``;
anything else is a bug, logged and answered with INTERNAL.
"""

from __future__ import annotations

import grpc


class ScoringError(Exception):
    """Base of every error that becomes a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(ScoringError):
    """The request is malformed; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ModelNotFound(ScoringError):
    """No loaded model/version answers to the name asked for."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFull(ScoringError):
    """The version's micro-batch queue is at ``max_queue_size``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ScoringError):
    """The caller's deadline passed before the request ran; it was never computed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class RequestCancelled(ScoringError):
    """The caller cancelled before the request ran; it was never computed."""

    code = grpc.StatusCode.CANCELLED


class DependencyUnavailable(ScoringError):
    """A dependency (e.g. Redis) is down and the model's policy is to fail."""

    code = grpc.StatusCode.UNAVAILABLE


class ShuttingDown(ScoringError):
    """The server is draining and accepts no new work."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelLoadError(ScoringError):
    """A model artifact was refused (bad file, sha256 mismatch, manifest/graph mismatch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InferenceFailed(ScoringError):
    """The runtime raised while running a batch; every request in it gets this."""

    code = grpc.StatusCode.INTERNAL
