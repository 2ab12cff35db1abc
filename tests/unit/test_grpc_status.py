"""Every domain error becomes its own gRPC status in one place; other failures INTERNAL."""

from __future__ import annotations

import logging

import grpc
import pytest

import server.admin.auth
import server.errors
import server.routing.state
from server.errors import InvalidInput, ModelNotFound, ScoringError, Status
from server.grpc_status import INTERNAL_MESSAGE, grpc_code, status_of


def _subclasses(cls: type[ScoringError]) -> list[type[ScoringError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_every_status_is_the_grpc_code_of_its_name() -> None:
    for status in Status:
        assert grpc_code(status).name == status.value


def test_every_domain_error_maps_to_a_status() -> None:
    modules = (server.errors, server.routing.state, server.admin.auth)
    errors = [e for e in _subclasses(ScoringError) if e.__module__ in {m.__name__ for m in modules}]
    assert {e.__name__ for e in errors} >= {
        "InvalidInput",
        "ModelNotFound",
        "QueueFull",
        "DeadlineExceeded",
        "DependencyUnavailable",
        "ShuttingDown",
        "ModelLoadError",
        "InferenceFailed",
        "RoutingConflict",
        "ConcurrentUpdate",
        "Unauthenticated",
        "PermissionDenied",
    }
    for error in errors:
        assert isinstance(error.status, Status), error
        assert isinstance(grpc_code(error.status), grpc.StatusCode)


def test_a_domain_error_keeps_its_status_and_message() -> None:
    assert status_of(InvalidInput("features.amount", "NaN"), "Score") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "features.amount: NaN",
    )
    assert status_of(ModelNotFound("model 'x'"), "Score")[0] is grpc.StatusCode.NOT_FOUND
    assert (
        status_of(server.routing.state.ConcurrentUpdate("again"), "admin")[0]
        is grpc.StatusCode.ABORTED
    )


def test_anything_else_is_logged_and_internal_without_detail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="server.grpc_status"):
        code, message = status_of(KeyError("secret-internal-detail"), "ModelInfer")
    assert (code, message) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert "secret-internal-detail" not in message
    (record,) = caplog.records
    assert "ModelInfer" in record.getMessage() and record.exc_info is not None
