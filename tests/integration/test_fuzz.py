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
from protos.inference import grpc_service_pb2 as v2
from protos.streamscore.v1 import scoring_pb2 as pb
from tests.conftest import TEST_FEATURES
from tests.support.server import running_server

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


async def test_caller_chosen_names_leave_no_per_name_state(linear_repository: Path) -> None:
    """Hundreds of distinct unknown model/version names (Score, ScoreStream and v2) grow no
    metric label set: a fuzzer's or attacker's names cannot pin memory per name."""
    names = [f"leak-{i}" for i in range(200)]
    async with running_server(linear_repository) as srv:
        for i, name in enumerate(names):
            features = {f: 1.0 for f in TEST_FEATURES}
            with pytest.raises(grpc.aio.AioRpcError):
                await srv.scoring.Score(pb.ScoreRequest(model=name, features=features))
            with pytest.raises(grpc.aio.AioRpcError):
                await srv.scoring.Score(
                    pb.ScoreRequest(model="lin", model_version=name, features=features)
                )
            infer = v2.ModelInferRequest(model_name=name, model_version=str(i), id=name)
            with pytest.raises(grpc.aio.AioRpcError):
                await srv.inference.ModelInfer(infer)
            with pytest.raises(grpc.aio.AioRpcError):
                await srv.inference.ModelMetadata(v2.ModelMetadataRequest(name=name))
        stream = srv.scoring.ScoreStream(
            iter([pb.ScoreRequest(model=name, request_id=name) for name in names])
        )
        answers = [answer async for answer in stream]
        assert len(answers) == len(names)
        labels = {
            value
            for family in srv.app.metrics.registry.collect()
            for sample in family.samples
            for value in sample.labels.values()
        }
    assert not {label for label in labels if label.startswith("leak-")}
