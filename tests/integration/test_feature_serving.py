"""Score with features from the store: batch snapshots and stream tiles in a real Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis

from demo.synthetic import DEMO_FEATURES
from devstack.services import RedisServer, redis_server
from feature_streams.batch_store import activate, write_snapshot
from feature_streams.definitions import FeatureDefinitions, load_definitions
from feature_streams.fetcher import BatchSnapshotCache
from feature_streams.keys import tile_key
from feature_streams.tile_store import EventUpdates, KeyBatch, TileStore
from feature_streams.windows import GroupPlan, point_in_time_values, updates_for_event
from protos.streamscore.v1 import scoring_pb2 as pb
from server.feature_store import FeatureStore
from tests.support.model_factory import linear_scores, write_linear_model
from tests.support.server import running_server

pytestmark = pytest.mark.integration

DEFINITIONS = Path(__file__).resolve().parents[2] / "features.yaml"
T0 = 1_700_000_000_000  # a fixed "now" (epoch ms), tile-aligned to the minute
REQUEST = {
    "amount": 120.0,
    "mcc": 5411.0,
    "channel": 1.0,
    "hour_of_day": 14.0,
    "day_of_week": 2.0,
    "is_international": 0.0,
    "card_present": 0.0,
    "distance_from_home_km": 3.5,
}


@dataclass
class Store:
    url: str
    client: Redis
    definitions: FeatureDefinitions
    plans: Mapping[str, GroupPlan]
    events: list[dict[str, Any]]


@pytest.fixture
def repository(tmp_path: Path) -> tuple[Path, np.ndarray, float]:
    version_dir, weights, bias = write_linear_model(
        tmp_path / "models", "fraud", "1", list(DEMO_FEATURES), seed=3, weight_scale=1e-3
    )
    return version_dir.parent.parent, weights, bias


def _events(card: str, merchant: str) -> list[dict[str, Any]]:
    """A card's recent activity, out of order, relative to T0."""
    minutes_ago = [1, 3, 2, 30, 59, 61, 300, 1500, 2]
    return [
        {
            "card_id": card,
            "merchant_id": merchant,
            "event_time_ms": T0 - m * 60_000 - 1234,
            "amount": 10.0 * (i + 1),
            "is_international": i % 2,
        }
        for i, m in enumerate(minutes_ago)
    ]


async def _apply(
    client: Redis, plans: Mapping[str, GroupPlan], events: Sequence[dict[str, Any]]
) -> None:
    store = TileStore(client)
    batches = []
    for group, plan in plans.items():
        by_key: dict[str, list[EventUpdates]] = {}
        for offset, event in enumerate(events):
            key = tile_key(group, str(event[plan.group.key]))
            by_key.setdefault(key, []).append(
                EventUpdates(offset, int(event["event_time_ms"]), updates_for_event(plan, event))
            )
        for key, updates in by_key.items():
            batches.append(KeyBatch(key, "transactions", 0, plan.retention_ms, 10**12, updates))
    await store.apply(batches)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    definitions = load_definitions(DEFINITIONS)
    client = Redis.from_url(redis_url)
    plans = {name: GroupPlan.build(g) for name, g in definitions.stream_groups.items()}
    events = _events("card-1", "merch-1")
    await _apply(client, plans, events)
    for group, rows in {
        "customer_profile": [
            (
                "cust-1",
                {
                    f: float(i + 1)
                    for i, f in enumerate(definitions.batch_groups["customer_profile"].fields)
                },
            )
        ],
        "card_profile": [("card-1", {"card_age_days": 400.0, "preapproved_limit": 2500.0})],
    }.items():
        info = await write_snapshot(client, group, rows)
        await activate(client, group, info.snapshot_id)
    try:
        yield Store(redis_url, client, definitions, plans, events)
    finally:
        await client.aclose()


def _overrides(url: str, *extra: str) -> list[str]:
    # Generous timeouts: these tests check values, and the 50 ms fetch default trips on a
    # loaded machine (answers then come degraded); tests of the outage path set their own.
    # The socket timeout too: each Redis read is also bounded by redis.socket_timeout_s
    # (0.2 s), which a loaded 2-core machine exceeds, degrading a batch despite the 2 s.
    timeout = "features.fetch_timeout_s=2.0"
    socket_timeout = "redis.socket_timeout_s=5.0"
    # Requests sit at the fixed T0, years from the wall clock: no skew bound here.
    skew = "server.limits.event_time_skew_s=1e12"
    return [
        f"features.definitions_path={DEFINITIONS}",
        f"redis.url={url}",
        timeout,
        socket_timeout,
        skew,
        *extra,
    ]


def _request(t_ms: int | None = T0, **entity_ids: str) -> pb.ScoreRequest:
    request = pb.ScoreRequest(
        model="fraud", features=REQUEST, entity_ids=entity_ids, echo_features=True
    )
    if t_ms is not None:
        request.event_time.CopyFrom(Timestamp(seconds=t_ms // 1000, nanos=(t_ms % 1000) * 10**6))
    return request


def _echo(response: pb.ScoreResponse) -> dict[str, float]:
    return {f.name: f.value for f in response.features}


def _expected_stream(store: Store, t_ms: int) -> dict[str, float]:
    values: dict[str, float] = {}
    for plan in store.plans.values():
        key = plan.group.key
        mine = [e for e in store.events if e[key] == ("card-1" if key == "card_id" else "merch-1")]
        values.update(point_in_time_values(plan, mine, [t_ms])[0])
    return values


async def test_score_fetches_batch_and_stream_features(
    store: Store, repository: tuple[Path, np.ndarray, float]
) -> None:
    repo, weights, bias = repository
    async with running_server(repo, _overrides(store.url)) as srv:
        response = await srv.scoring.Score(
            _request(card_id="card-1", customer_id="cust-1", merchant_id="merch-1")
        )
    echoed = _echo(response)
    customer_fields = list(store.definitions.batch_groups["customer_profile"].fields)
    for i, name in enumerate(customer_fields):
        assert echoed[name] == float(i + 1), name
    assert echoed["card_age_days"] == 400.0 and echoed["preapproved_limit"] == 2500.0
    expected = _expected_stream(store, T0)
    for name, value in expected.items():
        assert echoed[name] == pytest.approx(value, rel=1e-6), name
    assert echoed["card_txn_count_5m"] == 4  # events 1, 2, 2 and 3 minutes ago
    for name, value in REQUEST.items():
        assert echoed[name] == value
    row = np.array([[echoed[n] for n in DEMO_FEATURES]], dtype=np.float32)
    assert response.score == pytest.approx(float(linear_scores(row, weights, bias)[0]), abs=1e-6)
    assert list(response.defaulted_features) == []
    assert not response.degraded
    freshness = {(f.group, f.entity): f.age_ms for f in response.freshness}
    newest = max(e["event_time_ms"] for e in store.events)
    assert freshness[("card_activity", "card-1")] == T0 - newest
    assert freshness[("merchant_activity", "merch-1")] == T0 - newest


async def test_windows_decay_with_request_time_and_injected_clock(
    store: Store, repository: tuple[Path, np.ndarray, float]
) -> None:
    later = T0 + 10 * 60_000
    async with running_server(
        repository[0], _overrides(store.url), clock=lambda: later / 1000
    ) as srv:
        now = _echo(await srv.scoring.Score(_request(T0, card_id="card-1")))
        decayed = _echo(await srv.scoring.Score(_request(None, card_id="card-1")))  # clock
        much_later = _echo(await srv.scoring.Score(_request(T0 + 8 * 86_400_000, card_id="card-1")))
    assert now["card_txn_count_5m"] == 4
    assert decayed["card_txn_count_5m"] == 0  # the clock moved past the 5 min window
    assert decayed["card_txn_count_1h"] == pytest.approx(
        _expected_stream(store, later)["card_txn_count_1h"]
    )
    assert decayed["card_txn_count_1h"] < now["card_txn_count_1h"]
    assert much_later["card_txn_count_24h"] == 0
    assert much_later["card_amount_sum_24h"] == 0


async def test_missing_entities_get_defaults_and_are_listed(
    store: Store, repository: tuple[Path, np.ndarray, float]
) -> None:
    definitions = store.definitions
    async with running_server(repository[0], _overrides(store.url)) as srv:
        unknown = await srv.scoring.Score(_request(card_id="card-404", customer_id="cust-404"))
        absent = await srv.scoring.Score(_request())
    customer_fields = set(definitions.batch_groups["customer_profile"].fields)
    card_fields = {"card_age_days", "preapproved_limit"}
    assert customer_fields | card_fields <= set(unknown.defaulted_features)
    echoed = _echo(unknown)
    for name in customer_fields:
        default = float(definitions.batch_groups["customer_profile"].fields[name].default)
        assert echoed[name] == pytest.approx(default, rel=1e-6)  # float32 in the model row
    assert echoed["card_txn_count_24h"] == 0  # a card with no events: real zeros, not defaults
    # no entity ids at all: every store feature is a default, and listed
    store_features = set(DEMO_FEATURES) - set(REQUEST)
    assert store_features == set(absent.defaulted_features)
    assert not absent.degraded


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.entity_ids.__setitem__("planet_id", "x"), "entity_ids.planet_id"),
        (lambda r: r.entity_ids.__setitem__("card_id", " card-1"), "entity_ids.card_id"),
        (lambda r: r.entity_ids.__setitem__("card_id", ""), "entity_ids.card_id"),
        (lambda r: r.features.__setitem__("shoe_size", 42.0), "features.shoe_size"),
        (lambda r: r.features.__setitem__("hour_of_day", 25.0), "features.hour_of_day"),
        (lambda r: r.features.__setitem__("amount", -5.0), "features.amount"),
        (lambda r: r.features.__setitem__("amount", float("nan")), "features.amount"),
        (lambda r: r.features.__setitem__("amount", 1e300), "features.amount"),
        (lambda r: r.features.__setitem__("card_age_days", 1e300), "features.card_age_days"),
        (lambda r: r.event_time.CopyFrom(Timestamp(seconds=2**62)), "event_time"),
    ],
    ids=[
        "unknown-entity",
        "non-canonical-entity-id",
        "empty-entity-id",
        "unknown-feature",
        "hour-out-of-range",
        "negative-amount",
        "nan",
        "amount-beyond-float32",
        "store-feature-beyond-float32",
        "event-time-overflow",
    ],
)
async def test_bad_request_features_name_the_field(
    store: Store, repository: tuple[Path, np.ndarray, float], mutate: Any, field: str
) -> None:
    request = _request(card_id="card-1")
    mutate(request)
    async with running_server(repository[0], _overrides(store.url)) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.scoring.Score(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_features_sent_in_the_request_win_and_skip_the_store(
    store: Store, repository: tuple[Path, np.ndarray, float]
) -> None:
    everything = {name: 1.0 for name in DEMO_FEATURES} | REQUEST
    async with running_server(repository[0], _overrides(store.url)) as srv:
        request = _request(card_id="card-1", customer_id="cust-1")
        request.features.update(everything)
        response = await srv.scoring.Score(request, metadata=srv.overrides)
        fetches = srv.app.metrics.registry.get_sample_value(
            "streamscore_feature_fetch_seconds_count"
        )
    assert _echo(response) == pytest.approx(everything)
    assert fetches == 0


async def test_store_features_need_the_overrides_permission(
    store: Store, repository: tuple[Path, np.ndarray, float]
) -> None:
    """A caller may send its model's request features; a store feature (a fraudster's
    ``card_txn_count_1h: 0``) only with ``features.allow_overrides``."""
    stream_feature = next(n for n in DEMO_FEATURES if n not in REQUEST and "txn_count" in n)
    async with running_server(repository[0], _overrides(store.url)) as srv:
        request = _request(card_id="card-1", customer_id="cust-1")
        request.features[stream_feature] = 0.0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.scoring.Score(request)
        streamed = [a async for a in srv.scoring.ScoreStream(iter([request]))]
        allowed = await srv.scoring.Score(request, metadata=srv.overrides)
        plain = await srv.scoring.Score(_request(card_id="card-1", customer_id="cust-1"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert f"features.{stream_feature}: store feature" in details
    assert "features.allow_overrides" in details
    assert streamed[0].error.message == details
    assert _echo(allowed)[stream_feature] == 0.0
    assert not plain.HasField("error")


async def test_v2_rows_of_a_store_fed_model_need_the_overrides_permission(
    store: Store, repository: tuple[Path, np.ndarray, float]
) -> None:
    """A v2 row carries every column, store features included: the same permission."""
    from protos.inference import grpc_service_pb2 as v2

    request = v2.ModelInferRequest(model_name="fraud")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, len(DEMO_FEATURES)])
    tensor.contents.fp32_contents.extend([0.0] * len(DEMO_FEATURES))
    async with running_server(repository[0], _overrides(store.url)) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.inference.ModelInfer(request)
        allowed = await srv.inference.ModelInfer(request, metadata=srv.overrides)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "inputs[0]: rows carry store features" in details
    assert "features.allow_overrides" in details
    assert allowed.model_name == "fraud" and allowed.outputs


async def test_one_redis_round_trip_per_micro_batch(
    store: Store, repository: tuple[Path, np.ndarray, float]
) -> None:
    async with running_server(repository[0], _overrides(store.url)) as srv:
        requests = [
            _request(card_id="card-1", customer_id="cust-1", merchant_id="merch-1")
            for _ in range(300)
        ]
        responses = await asyncio.gather(*(srv.scoring.Score(r) for r in requests))
        registry = srv.app.metrics.registry
        fetches = registry.get_sample_value("streamscore_feature_fetch_seconds_count")
        batches = registry.get_sample_value(
            "streamscore_batch_requests_count", {"model": "fraud", "version": "1"}
        )
    assert len({r.score for r in responses}) == 1
    assert fetches == batches
    assert batches is not None and batches < 300


def _policy_overrides(url: str, policy: str) -> list[str]:
    return _overrides(
        url,
        f"redis.failure_policy={policy}",
        "features.fetch_timeout_s=0.2",
        "features.retry_interval_s=0.2",
    )


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


async def _seed(url: str) -> Store:
    definitions = load_definitions(DEFINITIONS)
    client = Redis.from_url(url)
    plans = {name: GroupPlan.build(g) for name, g in definitions.stream_groups.items()}
    events = _events("card-1", "merch-1")
    await _apply(client, plans, events)
    return Store(url, client, definitions, plans, events)


@pytest.mark.parametrize("policy", ["degrade", "fail"])
async def test_redis_down_follows_policy_and_recovers_without_restart(
    private_redis: RedisServer, repository: tuple[Path, np.ndarray, float], policy: str
) -> None:
    seeded = await _seed(private_redis.url)
    await seeded.client.aclose()
    async with running_server(repository[0], _policy_overrides(private_redis.url, policy)) as srv:
        before = await srv.scoring.Score(_request(card_id="card-1"))
        assert not before.degraded and _echo(before)["card_txn_count_5m"] == 4

        load = [srv.scoring.Score(_request(card_id="card-1")) for _ in range(20)]
        private_redis.stop()
        outcomes = await asyncio.gather(*load, return_exceptions=True)
        down = await asyncio.gather(
            *(srv.scoring.Score(_request(card_id="card-1")) for _ in range(20)),
            return_exceptions=True,
        )
        if policy == "degrade":
            assert all(isinstance(r, pb.ScoreResponse) for r in [*outcomes, *down])
            assert all(r.degraded and "redis_unavailable" in r.degraded_reasons for r in down)  # type: ignore[union-attr]
            assert "card_txn_count_5m" in down[0].defaulted_features  # type: ignore[union-attr]
        else:
            assert all(
                isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE
                for r in down
            )

        private_redis.restart()  # empty: no persistence
        reseeded = await _seed(private_redis.url)
        await reseeded.client.aclose()
        for _ in range(100):
            recovered = (
                await srv.scoring.Score(_request(card_id="card-1")) if policy == "degrade" else None
            )
            if policy == "fail":
                try:
                    recovered = await srv.scoring.Score(_request(card_id="card-1"))
                except grpc.aio.AioRpcError:
                    recovered = None
            if recovered is not None and not recovered.degraded:
                break
            await asyncio.sleep(0.05)
        assert recovered is not None and not recovered.degraded
        assert _echo(recovered)["card_txn_count_5m"] == 4


async def test_model_with_undefined_features_is_refused_naming_them(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = tmp_path / "models"
    write_linear_model(repository, "fraud", "1", list(DEMO_FEATURES), weight_scale=1e-3)
    write_linear_model(repository, "fraud", "2", [*DEMO_FEATURES[:5], "zodiac_sign", "shoe_size"])
    async with running_server(repository, _overrides(store.url)) as srv:
        assert srv.app.registry.versions("fraud") == ["1"]
        failures = srv.app.metrics.registry.get_sample_value(
            "streamscore_model_load_failures_total"
        )
        response = await srv.scoring.Score(_request(card_id="card-1"))
    assert failures == 1
    assert response.model_version == "1"
    logged = " ".join(str(record.__dict__) for record in caplog.records)
    assert "zodiac_sign" in logged and "shoe_size" in logged


async def test_feature_store_cannot_be_attached_after_versions_loaded(
    store: Store, linear_repository: Path
) -> None:
    async with running_server(linear_repository) as srv:  # request-only: no feature store
        feature_store = FeatureStore(store.client, BatchSnapshotCache(store.client, ()))
        with pytest.raises(RuntimeError, match="after versions were loaded"):
            srv.app.registry.use_features(store.definitions, feature_store)


def _breaker_overrides(url: str) -> list[str]:
    return _overrides(
        url,
        "features.fetch_timeout_s=0.05",
        "features.breaker_failures=3",
        "features.breaker_window_s=30",
        "features.retry_interval_s=0.3",
    )


def _breaker_state(srv: Any) -> str:
    registry = srv.app.metrics.registry
    for state in ("closed", "open", "half_open"):
        value = registry.get_sample_value(
            "streamscore_feature_store_breaker_state", {"state": state}
        )
        if value == 1.0:
            return state
    raise AssertionError("no breaker state set")


async def test_a_timeout_degrades_only_its_batch_and_repeated_ones_open_the_breaker(
    private_redis: RedisServer, repository: tuple[Path, np.ndarray, float]
) -> None:
    seeded = await _seed(private_redis.url)
    await seeded.client.aclose()
    async with running_server(repository[0], _breaker_overrides(private_redis.url)) as srv:
        assert not (await srv.scoring.Score(_request(card_id="card-1"))).degraded
        pid = private_redis.process.pid
        os.kill(pid, signal.SIGSTOP)  # Redis frozen: connections open, no answers
        try:
            slow = await srv.scoring.Score(_request(card_id="card-1"))
            assert list(slow.degraded_reasons) == ["redis_unavailable"]
            assert _breaker_state(srv) == "closed"  # one failure: only that batch degraded
            os.kill(pid, signal.SIGCONT)
            back = await srv.scoring.Score(_request(card_id="card-1"))
            assert not back.degraded, "no blackout after a single timeout"
            os.kill(pid, signal.SIGSTOP)
            for _ in range(3):
                answer = await srv.scoring.Score(_request(card_id="card-1"))
                assert list(answer.degraded_reasons) == ["redis_unavailable"]
            assert _breaker_state(srv) == "open"
            fetches = srv.app.metrics.registry.get_sample_value(
                "streamscore_feature_fetch_seconds_count"
            )
            open_answers = [await srv.scoring.Score(_request(card_id="card-1")) for _ in range(5)]
            assert all(a.degraded for a in open_answers)  # answered without touching Redis
        finally:
            os.kill(pid, signal.SIGCONT)
        for _ in range(400):  # the probe after retry_interval_s closes the breaker
            recovered = await srv.scoring.Score(_request(card_id="card-1"))
            if not recovered.degraded:
                break
            await asyncio.sleep(0.01)
        assert not recovered.degraded and _echo(recovered)["card_txn_count_5m"] == 4
        assert _breaker_state(srv) == "closed"
        registry = srv.app.metrics.registry
        assert registry.get_sample_value("streamscore_feature_fetch_seconds_count") == fetches + 1  # type: ignore[operator]
        for state in ("open", "half_open", "closed"):
            assert registry.get_sample_value(
                "streamscore_feature_store_breaker_transitions_total", {"state": state}
            )


async def test_a_key_error_degrades_only_that_request_and_never_the_breaker(
    private_redis: RedisServer, repository: tuple[Path, np.ndarray, float]
) -> None:
    seeded = await _seed(private_redis.url)
    await seeded.client.set(tile_key("card_activity", "card-bad"), "a string, not a hash")
    async with running_server(repository[0], _breaker_overrides(private_redis.url)) as srv:
        for _ in range(5):  # more than breaker_failures
            answers = await asyncio.gather(
                *(srv.scoring.Score(_request(card_id=c)) for c in ("card-bad", "card-1") * 10)
            )
            for answer in answers[0::2]:
                assert list(answer.degraded_reasons) == ["store_key_error"]
                assert "card_txn_count_5m" in answer.defaulted_features
            for answer in answers[1::2]:
                assert not answer.degraded and _echo(answer)["card_txn_count_5m"] == 4
        assert _breaker_state(srv) == "closed"
        assert (
            srv.app.metrics.registry.get_sample_value(
                "streamscore_degraded_answers_total", {"reason": "store_key_error"}
            )
            == 50
        )
    await seeded.client.aclose()


async def _until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110  (a count other tasks grow, no event)
            await asyncio.sleep(0.01)


async def test_redis_killed_under_load_every_call_answered_and_recovered(
    private_redis: RedisServer,
    repository: tuple[Path, np.ndarray, float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    seeded = await _seed(private_redis.url)
    await seeded.client.aclose()
    answers: list[pb.ScoreResponse | BaseException] = []
    stop = asyncio.Event()

    async def caller(srv: Any) -> None:
        while not stop.is_set():
            try:
                answers.append(await srv.scoring.Score(_request(card_id="card-1"), timeout=5))
            except grpc.aio.AioRpcError as error:
                answers.append(error)

    async with running_server(repository[0], _breaker_overrides(private_redis.url)) as srv:
        callers = [asyncio.create_task(caller(srv)) for _ in range(8)]
        await _until(lambda: len(answers) >= 50)
        private_redis.process.kill()  # SIGKILL
        private_redis.process.wait()
        seen = len(answers)
        await _until(lambda: len(answers) >= seen + 200)  # calls made while Redis is down
        down = answers[seen + 50 : seen + 200]
        private_redis.restart()  # empty: no persistence
        reseeded = await _seed(private_redis.url)
        await reseeded.client.aclose()
        back_at = asyncio.get_running_loop().time()
        while True:
            latest = answers[-1]
            if isinstance(latest, pb.ScoreResponse) and not latest.degraded:
                break
            await asyncio.sleep(0.005)
        recovery_s = asyncio.get_running_loop().time() - back_at
        stop.set()
        await asyncio.gather(*callers)
    assert all(isinstance(a, pb.ScoreResponse) for a in answers), "every call answered"
    assert all("redis_unavailable" in a.degraded_reasons for a in down)  # type: ignore[union-attr]
    assert recovery_s < 5.0, f"recovered {recovery_s:.2f}s after Redis was back"
    assert not [r for r in caplog.records if r.exc_info], "no exception in the logs"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert set(errors) <= {"routing store unreachable; serving the last applied routing"}
    print(f"recovery after Redis restart: {recovery_s * 1000:.0f} ms")  # bench/RESULTS.md


async def test_a_card_scored_again_is_served_from_its_kept_tile_hash(
    store: Store, repository: tuple[Path, np.ndarray, float]
) -> None:
    """The server keeps tile hashes by version: the second Score of the same card reads
    only the versions, answers the same, and the app's metrics count the hits."""
    repo, _, _ = repository
    request = _request(card_id="card-1", customer_id="cust-1", merchant_id="merch-1")
    async with running_server(repo, _overrides(store.url)) as srv:
        first = await srv.scoring.Score(request)
        second = await srv.scoring.Score(request)
        sample = srv.app.metrics.registry.get_sample_value
        hits = sample("streamscore_feature_tile_cache_hits_total")
        entries = sample("streamscore_feature_tile_cache_entries")
    assert _echo(second) == _echo(first) and second.score == first.score
    assert hits == 2.0  # the card's and the merchant's hash
    assert entries == 2.0
