"""Score and ScoreStream end to end against a real in-process server."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from protos.streamscore.v1 import scoring_pb2 as pb
from server.metrics import UNKNOWN_MODEL
from server.settings import LimitsSettings
from tests.conftest import TEST_FEATURES
from tests.support.model_factory import linear_scores, write_linear_model
from tests.support.server import running_server

pytestmark = pytest.mark.integration


def _request(values: np.ndarray, **kwargs: object) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        model="lin",
        features={name: float(v) for name, v in zip(TEST_FEATURES, values, strict=True)},
        **kwargs,  # type: ignore[arg-type]
    )


def _expected(repository: Path, version: str, values: np.ndarray) -> float:
    _, weights, bias = write_linear_model(
        repository / ".." / "ref", "lin", version, TEST_FEATURES, seed=int(version)
    )
    return float(linear_scores(values.reshape(1, -1).astype(np.float32), weights, bias)[0])


async def test_score_returns_champion_score(linear_repository: Path) -> None:
    values = np.linspace(-1, 1, len(TEST_FEATURES))
    async with running_server(linear_repository) as srv:
        response = await srv.scoring.Score(_request(values, request_id="r-1"))
    assert response.request_id == "r-1"
    assert response.model == "lin"
    assert response.model_version == "2"  # highest version is champion by default
    assert response.route == pb.ROUTE_CHAMPION
    assert response.score == pytest.approx(_expected(linear_repository, "2", values), abs=1e-6)
    assert response.server_time_us > 0


async def test_pinned_version_and_configured_champion(linear_repository: Path) -> None:
    values = np.full(len(TEST_FEATURES), 0.3)
    async with running_server(linear_repository, ["models.per_model.lin.champion=1"]) as srv:
        champion = await srv.scoring.Score(_request(values))
        pinned = await srv.scoring.Score(_request(values, model_version="2"))
    assert (champion.model_version, champion.route) == ("1", pb.ROUTE_CHAMPION)
    assert (pinned.model_version, pinned.route) == ("2", pb.ROUTE_PINNED)
    assert champion.score == pytest.approx(_expected(linear_repository, "1", values), abs=1e-6)
    assert pinned.score == pytest.approx(_expected(linear_repository, "2", values), abs=1e-6)
    assert champion.request_id and champion.request_id != pinned.request_id  # generated


async def test_echo_features_in_model_order(linear_repository: Path) -> None:
    values = np.arange(len(TEST_FEATURES), dtype=float)
    async with running_server(linear_repository) as srv:
        response = await srv.scoring.Score(_request(values, echo_features=True))
    assert [f.name for f in response.features] == TEST_FEATURES
    assert [f.value for f in response.features] == list(values)


@pytest.mark.parametrize(
    ("mutate", "code", "needle"),
    [
        (lambda r: setattr(r, "model", "nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda r: setattr(r, "model", ""), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (lambda r: setattr(r, "model_version", "9"), grpc.StatusCode.NOT_FOUND, "'9'"),
        (lambda r: r.features.pop("f3"), grpc.StatusCode.INVALID_ARGUMENT, "features.f3"),
        (lambda r: r.features.__setitem__("zz", 1.0), grpc.StatusCode.INVALID_ARGUMENT, "zz"),
        (
            lambda r: r.features.__setitem__("f2", math.nan),
            grpc.StatusCode.INVALID_ARGUMENT,
            "features.f2",
        ),
        (
            lambda r: r.features.__setitem__("f5", math.inf),
            grpc.StatusCode.INVALID_ARGUMENT,
            "features.f5",
        ),
        (  # finite as a double, infinite as the model's float32
            lambda r: r.features.__setitem__("f4", -1e300),
            grpc.StatusCode.INVALID_ARGUMENT,
            "features.f4",
        ),
        (
            lambda r: r.event_time.CopyFrom(Timestamp(seconds=2**62)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "event_time",
        ),
        (
            lambda r: r.event_time.CopyFrom(Timestamp(seconds=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "event_time",
        ),
    ],
    ids=[
        "unknown-model",
        "no-model",
        "unknown-version",
        "missing",
        "unknown",
        "nan",
        "inf",
        "beyond-float32",
        "event-time-overflow",
        "event-time-before-1970",
    ],
)
async def test_bad_input_gets_named_status(
    linear_repository: Path, mutate: object, code: grpc.StatusCode, needle: str
) -> None:
    request = _request(np.zeros(len(TEST_FEATURES)))
    mutate(request)  # type: ignore[operator]
    async with running_server(linear_repository) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.scoring.Score(request)
        assert caught.value.code() == code
        assert needle in (caught.value.details() or "")
        # the server is still healthy afterwards
        ok = await srv.scoring.Score(_request(np.zeros(len(TEST_FEATURES))))
        assert ok.model_version == "2"


async def test_oversized_message_is_resource_exhausted(linear_repository: Path) -> None:
    request = _request(np.zeros(len(TEST_FEATURES)), request_id="x" * 5_000_000)
    async with running_server(linear_repository) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.scoring.Score(request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_score_stream_answers_every_item(linear_repository: Path) -> None:
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(200, len(TEST_FEATURES)))
    requests = [_request(row, request_id=f"s-{i}") for i, row in enumerate(rows)]
    requests.insert(50, pb.ScoreRequest(model="lin", request_id="bad", features={"f0": 1.0}))

    async def produce() -> AsyncIterator[pb.ScoreRequest]:
        for request in requests:
            yield request

    async with running_server(linear_repository) as srv:
        answers = {r.request_id: r async for r in srv.scoring.ScoreStream(produce())}
    assert len(answers) == len(requests)
    assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "features.f1" in answers["bad"].error.message
    _, weights, bias = write_linear_model(
        linear_repository / ".." / "ref", "lin", "2", TEST_FEATURES, seed=2
    )
    expected = linear_scores(rows.astype(np.float32), weights, bias)
    for i in range(len(rows)):
        answer = answers[f"s-{i}"]
        assert not answer.HasField("error")
        assert answer.score == pytest.approx(float(expected[i]), abs=1e-6)


async def test_scatter_correctness_under_random_concurrency(linear_repository: Path) -> None:
    """Every caller gets exactly its own row's score, whatever batches formed."""
    rng = np.random.default_rng(11)
    rows = rng.normal(size=(600, len(TEST_FEATURES)))
    _, weights, bias = write_linear_model(
        linear_repository / ".." / "ref", "lin", "2", TEST_FEATURES, seed=2
    )
    expected = linear_scores(rows.astype(np.float32), weights, bias)
    async with running_server(linear_repository, ["models.defaults.max_batch_size=16"]) as srv:

        async def call(i: int) -> tuple[int, float]:
            if i % 2:  # half spread out in time, half released at once (a burst)
                await asyncio.sleep(float(rng.uniform(0, 0.02)))
            response = await srv.scoring.Score(_request(rows[i], request_id=str(i)))
            assert response.request_id == str(i)
            return i, response.score

        results = await asyncio.gather(*(call(i) for i in range(len(rows))))
        registry = srv.app.metrics.registry
        labels = {"model": "lin", "version": "2"}
        batches = registry.get_sample_value("streamscore_batch_requests_count", labels)
        batched = registry.get_sample_value("streamscore_batch_requests_sum", labels)
    for i, score in results:
        assert score == pytest.approx(float(expected[i]), abs=1e-6)
    assert batched == len(rows)
    assert batches is not None and batches < len(rows), (
        "no batch larger than one request formed under concurrency"
    )


async def test_score_stream_stops_reading_when_answers_are_not_taken(
    linear_repository: Path,
) -> None:
    """Answers nobody takes hold their slot: the call stops pulling requests at the
    in-flight bound instead of scoring and buffering everything the client sends."""
    from server import grpc_api

    pulled: list[int] = []

    async def requests() -> AsyncIterator[pb.ScoreRequest]:
        for i in range(500):
            pulled.append(i)
            yield _request(np.zeros(len(TEST_FEATURES)), request_id=f"b-{i}")

    class Context:
        def time_remaining(self) -> None:
            return None

    async with running_server(linear_repository) as srv:
        app = srv.app
        service = grpc_api.ScoringService(
            app.pipeline, app.registry, app.metrics, LimitsSettings(stream_max_in_flight=8)
        )
        stream = service.ScoreStream(requests(), Context())  # type: ignore[arg-type]
        answers = [await anext(stream)]  # the transport took one answer, then stalls

        # Positive signal: all 8 admitted requests were answered (each latency is observed
        # just before its answer is queued), so the reader had every chance to pull more.
        def answered() -> float:
            labels = {"api": "stream", "model": "lin"}
            name = "streamscore_request_latency_seconds_count"
            return app.metrics.registry.get_sample_value(name, labels) or 0.0

        async with asyncio.timeout(10):
            while answered() < 8:  # noqa: ASYNC110 (a metric: no event to await)
                await asyncio.sleep(0.01)
        assert len(pulled) <= 8 + 2  # the bound, the one taken, one waiting for a slot
        answers += [answer async for answer in stream]
    assert sorted(a.request_id for a in answers) == sorted(f"b-{i}" for i in range(500))
    assert all(not a.HasField("error") for a in answers)


async def test_caller_chosen_names_do_not_become_metric_labels(linear_repository: Path) -> None:
    """Unknown models and versions are counted under placeholders, however many a
    client invents (Score and v2 alike)."""
    from protos.inference import grpc_service_pb2 as v2

    async with running_server(linear_repository) as srv:
        for i in range(5):
            request = _request(np.zeros(len(TEST_FEATURES)))
            request.model_version = f"made-up-{i}"
            with pytest.raises(grpc.aio.AioRpcError):
                await srv.scoring.Score(request)
            infer = v2.ModelInferRequest(model_name="lin", model_version=f"v2-made-up-{i}")
            with pytest.raises(grpc.aio.AioRpcError):
                await srv.inference.ModelInfer(infer)
            with pytest.raises(grpc.aio.AioRpcError):
                await srv.scoring.Score(pb.ScoreRequest(model=f"nope-{i}"))
        samples = [
            s.labels
            for metric in srv.app.metrics.registry.collect()
            if metric.name == "streamscore_requests"
            for s in metric.samples
        ]
    versions = {labels["version"] for labels in samples}
    models = {labels["model"] for labels in samples}
    assert versions == {"-"}, versions
    assert models == {"lin", UNKNOWN_MODEL}, models


async def test_abandoned_stream_releases_its_items(linear_repository: Path) -> None:
    """A stream closed with items still queued cancels them and leaves nothing in flight."""
    from server import grpc_api

    async def requests() -> AsyncIterator[pb.ScoreRequest]:
        for i in range(200):
            yield _request(np.zeros(len(TEST_FEATURES)), request_id=f"a-{i}")

    class Context:
        def time_remaining(self) -> None:
            return None

    async with running_server(linear_repository) as srv:
        app = srv.app
        service = grpc_api.ScoringService(app.pipeline, app.registry, app.metrics)
        stream = service.ScoreStream(requests(), Context())  # type: ignore[arg-type]
        first = await anext(stream)
        assert not first.HasField("error")
        await stream.aclose()  # type: ignore[attr-defined]  # the client went away mid-stream
        in_flight = app.metrics.registry.get_sample_value(
            "streamscore_in_flight_requests", {"api": "stream"}
        )
        assert in_flight == 0
        answer = await srv.scoring.Score(_request(np.zeros(len(TEST_FEATURES))))
        assert not answer.HasField("error")  # the batcher kept serving
