"""Short form of the fuzz figure (bench/resilience/fuzz.py) against a live server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bench.resilience.fuzz import (
    all_rpcs,
    answers_valid_call,
    run_cases,
    serve,
    write_linear_repository,
)

pytestmark = pytest.mark.integration


def test_a_few_hundred_well_formed_hostile_messages_get_named_statuses(tmp_path: Path) -> None:
    write_linear_repository(tmp_path / "models")
    with serve(tmp_path / "models", tmp_path / "server.log") as (_pid, target):
        report = run_cases(target, 300, 1, origins=frozenset({"generated"}))
        with grpc.insecure_channel(target) as channel:
            assert answers_valid_call(channel)
    assert report.cases == 300
    assert report.findings == []


def test_undecodable_bytes_are_invalid_argument(tmp_path: Path) -> None:
    write_linear_repository(tmp_path / "models")
    with (
        serve(tmp_path / "models", tmp_path / "server.log") as (_pid, target),
        grpc.insecure_channel(target) as channel,
    ):
        for rpc in all_rpcs():
            if rpc.kind == "unary" and not rpc.admin:
                with pytest.raises(grpc.RpcError) as refused:
                    channel.unary_unary(
                        rpc.path, request_serializer=None, response_deserializer=None
                    )(b"\xff", timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc.path
