"""Training-serving consistency: the backfill computes exactly what Score serves.

A recorded stream of synthetic card transactions (out of order, some beyond the
allowed lateness, a few malformed records) is produced to a real Tansu topic and
applied to Redis by the real :class:`StreamWorker`; two batch snapshots per profile
group are loaded through ``batch_load``; the real server scores a spine of
(entities, time) rows with ``echo_features``; :func:`backfill` runs on the same
recorded events, spine and batch files. Every echoed feature must equal the
backfilled one (float32 tolerance: the model row is float32) for every row. Then
``streamscore score-batch`` (local engine) runs on the same spine, event log, batch
files and model artifact: every score equals the recorded Score answer exactly in
float32, row by row. The same spine is also scored by the server without an event
time (the store's clock, now) and by ``score-batch --features online`` on the same
Redis: those scores must be equal too. With the optional extra ``spark`` installed
(``make test`` installs it), ``score-batch --engine spark`` must give the recorded answers too.

Which query times are valid online: the store holds only the *current* tiles, and a
window read at ``t`` also counts applied events with event time ``>= t`` in its head
tile, which the point-in-time backfill (events ``< t``) never does. A time ``t`` is
therefore comparable when no event of the row's keys has event time ``>= t``: the
spine uses times after the end of the stream (minutes to 9 days later, so windows
decay and tiles fall out), plus times inside the stream shortly (1 ms to 3 min)
after a card's last event, sent without a merchant id (the busy merchants have later
events; a missing entity gets defaults on both sides). Likewise only the snapshot
active now can be served, so the current snapshots' ``valid_from`` is the earliest
spine time (exactly: a row sits on it) and the older ones, with different values,
must not be picked.

The topic has one partition, so log order is the file order for every key and the
lateness decisions of worker and backfill are the same ones.

Entity ids are spelled four ways (``"c"``, ``" c"``, ``"c "``, ``"\tc\n"``) in the
events, the batch files and the spine: worker, loader and backfill must all key them as
``"c"`` (the server is sent the canonical id; it refuses the others).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pytest
from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp

from demo.synthetic import (
    CARD_BATCH_FEATURES,
    CUSTOMER_BATCH_FEATURES,
    DEMO_FEATURES,
    DemoPopulation,
    make_population,
    sample_transaction,
)
from devstack.services import KafkaBroker
from feature_streams.backfill import BackfillReport, backfill, read_manifest_features
from feature_streams.batch_load import load_group_file
from feature_streams.definitions import FeatureDefinitions, parse_definitions
from feature_streams.redis_client import RedisOptions, connect, scan_keys
from feature_streams.stream_job import BatchReport, StreamWorker, WorkerConfig
from feature_streams.topics import ensure_topics
from protos.streamscore.v1 import scoring_pb2 as pb
from server.batch_scoring.cli import main_score_batch
from tests.support.model_factory import linear_scores, write_linear_model
from tests.support.server import running_server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000
MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
N_EVENTS = 3000
SPAN_MS = 3 * HOUR
MALFORMED = [b"{not json", b'{"card_id": "card-000001", "event_time_ms": "soon"}', b"[]"]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


SPELLINGS = ("{}", " {}", "{} ", "\t{}\n")


def spell(entity_id: str, i: int) -> str:
    """One of four raw spellings of the same id (every writer keys them alike)."""
    return SPELLINGS[i % len(SPELLINGS)].format(entity_id)


def recorded_stream(population: DemoPopulation, seed: int) -> list[bytes]:
    """Record values in log order: event time rises over SPAN_MS, mostly slightly out of
    order, ~5 % up to 14 min behind (beyond the 10 min lateness), plus malformed ones."""
    rng = np.random.default_rng(seed)
    records: list[bytes] = []
    for i in range(N_EVENTS):
        tx = sample_transaction(rng, population)
        u = rng.random()
        back = 14 * MINUTE if u < 0.05 else 9 * MINUTE if u < 0.2 else MINUTE
        event = {
            "card_id": spell(tx.card_id, i),
            "customer_id": spell(tx.customer_id, i + 1),
            "merchant_id": spell(tx.merchant_id, i + 2),
            "event_time_ms": T0 + i * SPAN_MS // N_EVENTS - int(rng.integers(0, back + 1)),
            "amount": tx.request["amount"],
            "is_international": int(tx.request["is_international"]),
            "mcc": int(tx.request["mcc"]),
        }
        records.append(json.dumps(event).encode())
        if i % 1000 == 500:
            records.append(MALFORMED[i // 1000])
    return records


def profile_tables(population: DemoPopulation, rng: np.random.Generator) -> dict[str, pa.Table]:
    """The current snapshots: a few entities dropped, a few empty cells."""
    out: dict[str, pa.Table] = {}
    for group, entity, ids, names, values in (
        (
            "customer_profile",
            "customer_id",
            population.customer_ids,
            CUSTOMER_BATCH_FEATURES,
            population.customer_batch,
        ),
        (
            "card_profile",
            "card_id",
            population.card_ids,
            CARD_BATCH_FEATURES,
            population.card_batch,
        ),
    ):
        keep = rng.random(len(ids)) > 0.1
        kept = [e for e, k in zip(ids, keep, strict=True) if k]
        columns: dict[str, Any] = {entity: [spell(e, i) for i, e in enumerate(kept)]}
        for j, name in enumerate(names):
            cells = values[keep, j].tolist()
            columns[name] = [None if rng.random() < 0.05 else v for v in cells]
        out[group] = pa.table(columns)
    return out


def older_tables(current: Mapping[str, pa.Table]) -> dict[str, pa.Table]:
    """Earlier snapshots with other values: picking one by mistake shows."""
    out = {}
    for group, table in current.items():
        columns = {table.column_names[0]: table.column(0)}
        for name in table.column_names[1:]:
            columns[name] = pa.array([7.0 + i for i in range(table.num_rows)])
        out[group] = pa.table(columns)
    return out


def last_event_times(records: Sequence[bytes], key: str) -> dict[str, int]:
    newest: dict[str, int] = {}
    for raw in records:
        try:
            event = json.loads(raw)
            value, ts = event[key].strip(), int(event["event_time_ms"])
        except (ValueError, KeyError, TypeError):
            continue
        newest[value] = max(ts, newest.get(value, ts))
    return newest


def make_spine(population: DemoPopulation, records: Sequence[bytes], seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    end = max(last_event_times(records, "merchant_id").values()) + 1
    rows: list[dict[str, Any]] = []

    def row(tx: Any, t: int, **ids: str | None) -> None:
        n = len(rows)
        entity = {"card_id": spell(tx.card_id, n), "customer_id": spell(tx.customer_id, n + 1)}
        entity["merchant_id"] = spell(tx.merchant_id, n + 2)
        rows.append({**entity, **ids, "ts_ms": t, **tx.request})

    offsets = [  # after the end of the stream: windows decay, tiles fall out
        *rng.integers(0, 10 * MINUTE, 60).tolist(),
        *rng.integers(10 * MINUTE, 2 * HOUR, 50).tolist(),
        *rng.integers(2 * HOUR, 30 * HOUR, 40).tolist(),
        *rng.integers(6 * DAY, 9 * DAY, 20).tolist(),
    ]
    for offset in offsets:
        row(sample_transaction(rng, population), end + int(offset))
    for card, last in sorted(last_event_times(records, "card_id").items())[:25]:
        tx = sample_transaction(rng, population)
        gap = 1 if len(rows) % 5 == 0 else int(rng.integers(1, 3 * MINUTE))
        row(tx, last + gap, card_id=card, merchant_id=None)
    tx = sample_transaction(rng, population)
    row(tx, end + HOUR, card_id="card-999999", customer_id="cust-999999")
    return pa.Table.from_pylist(rows)


async def produce(bootstrap: str, topic: str, records: Sequence[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, partition=0) for value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


class Progress:
    """``on_batch`` callback: totals of the worker's batch reports, awaitable."""

    def __init__(self) -> None:
        self.reports: list[BatchReport] = []
        self.changed = asyncio.Event()

    def __call__(self, report: BatchReport) -> None:
        self.reports.append(report)
        self.changed.set()

    def records(self) -> int:
        return sum(r.records for r in self.reports)

    def late(self, group: str) -> int:
        return sum(r.late.get(group, 0) for r in self.reports)

    async def wait_for_records(self, n: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while self.records() < n:
                self.changed.clear()
                await self.changed.wait()


async def apply_stream(
    kafka: KafkaBroker, redis_url: str, definitions: FeatureDefinitions, records: list[bytes]
) -> Progress:
    """Run the real worker until every record is applied; returns its batch reports."""
    progress = Progress()
    config = WorkerConfig(
        bootstrap_servers=kafka.bootstrap_servers,
        redis_url=redis_url,
        group_id=unique("g"),
        session_timeout_ms=1000,  # a group join takes ~1 s on Tansu instead of ~5 s
        heartbeat_interval_ms=250,
        max_batch_records=1000,
    )
    async with StreamWorker(config, definitions, on_batch=progress) as worker:
        task = asyncio.create_task(worker.run())
        try:
            await progress.wait_for_records(len(records), timeout_s=30)
        finally:
            worker.request_stop()
            await task
    return progress


def timestamp(t_ms: int) -> Timestamp:
    return Timestamp(seconds=t_ms // 1000, nanos=(t_ms % 1000) * 1_000_000)


def score_request(
    spine_row: Mapping[str, Any], features: Sequence[str], *, at_row_time: bool = True
) -> pb.ScoreRequest:
    """The spine row as a Score request, at its time (or, without event time, now)."""
    ids = {
        e: spine_row[e].strip()  # the server takes canonical ids only
        for e in ("card_id", "customer_id", "merchant_id")
        if spine_row[e]
    }
    return pb.ScoreRequest(
        model="fraud",
        entity_ids=ids,
        features={n: float(spine_row[n]) for n in features},
        event_time=timestamp(int(spine_row["ts_ms"])) if at_row_time else None,
        echo_features=True,
    )


@pytest.fixture(params=["standalone", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """One Redis, then the local Redis Cluster (3 primaries + 3 replicas): worker,
    loader, server and ``score-batch --features online`` detect the mode themselves."""
    name = "redis_url" if request.param == "standalone" else "redis_cluster_url"
    return cast(str, request.getfixturevalue(name))


async def test_backfill_matches_served_features_row_by_row(
    kafka: KafkaBroker, store_url: str, tmp_path: Path
) -> None:
    topic = unique("tx")
    text = (REPO / "features.yaml").read_text().replace("topic: transactions", f"topic: {topic}")
    (definitions_path := tmp_path / "features.yaml").write_text(text)
    definitions = parse_definitions(text)

    population = make_population(np.random.default_rng(5), n_customers=40, n_merchants=15)
    records = recorded_stream(population, seed=6)
    (events_path := tmp_path / "events.jsonl").write_bytes(b"\n".join(records) + b"\n")
    spine = make_spine(population, records, seed=8)
    pq.write_table(spine, spine_path := tmp_path / "spine.parquet")
    switch = min(spine.column("ts_ms").to_pylist())

    await ensure_topics(kafka.bootstrap_servers, {topic: 1})
    await produce(kafka.bootstrap_servers, topic, records)
    worker = await apply_stream(kafka, store_url, definitions, records)
    await assert_keys_canonical(store_url)

    current = profile_tables(population, np.random.default_rng(9))
    schedule: dict[str, list[tuple[int, Path]]] = {}
    for valid_from, tables in ((T0 - DAY, older_tables(current)), (switch, current)):
        for group, table in tables.items():
            pq.write_table(table, path := tmp_path / f"{group}-{valid_from}.parquet")
            await load_group_file(store_url, definitions, group, path, progress=False)
            schedule.setdefault(group, []).append((valid_from, path))

    version_dir, weights, bias = write_linear_model(
        tmp_path / "models", "fraud", "1", list(DEMO_FEATURES), seed=3, weight_scale=1e-3
    )
    request_features = list(definitions.request_features)
    rows = spine.to_pylist()
    overrides = [
        f"features.definitions_path={definitions_path}",
        f"redis.url={store_url}",
        "features.fetch_timeout_s=10",  # a noisy machine must not degrade answers
        "redis.socket_timeout_s=10",  # nor each read's own bound (0.2 s by default)
    ]
    async with running_server(tmp_path / "models", overrides) as srv:
        responses = await asyncio.gather(
            *(  # recorded times: the overrides permission (a replay's)
                srv.scoring.Score(score_request(r, request_features), metadata=srv.overrides)
                for r in rows
            )
        )
        now_responses = await asyncio.gather(
            *(
                srv.scoring.Score(score_request(r, request_features, at_row_time=False))
                for r in rows
            )
        )

    report = backfill(
        definitions,
        events_path,
        spine_path,
        out := tmp_path / "training.parquet",
        batch_snapshots=schedule,
        features=read_manifest_features(version_dir),
    )
    training = pq.read_table(out)
    assert training.column_names == [
        c for c in spine.column_names if c not in DEMO_FEATURES
    ] + list(DEMO_FEATURES)

    mismatches = []
    for i, response in enumerate(responses):
        served = {f.name: f.value for f in response.features}
        assert list(served) == list(DEMO_FEATURES)
        for name in DEMO_FEATURES:
            want = training.column(name)[i].as_py()
            if not math.isclose(served[name], want, rel_tol=1e-6, abs_tol=1e-6):
                mismatches.append(
                    (i, rows[i]["card_id"], rows[i]["ts_ms"], name, served[name], want)
                )
    assert mismatches == [], f"{len(mismatches)} mismatches, first: {mismatches[:5]}"

    matrix = np.array([training.column(n).to_pylist() for n in DEMO_FEATURES], np.float32).T
    expected = linear_scores(matrix, weights, bias)
    assert [r.score for r in responses] == pytest.approx(expected.tolist(), abs=1e-6)
    assert_worker_agrees(worker, report, len(records))
    assert_not_trivial(training, rows, definitions)

    async def score_batch(name: str, *args: str) -> pa.Table:
        out = tmp_path / f"{name}.parquet"
        status = await asyncio.to_thread(  # --features online runs its own event loop
            main_score_batch,
            [
                *("--model", "fraud", "--version", "1", "--input", str(spine_path)),
                *("--output", str(out), "--definitions", str(definitions_path)),
                *("--set", f"models.repository={tmp_path / 'models'}"),
                *("--set", "features.fetch_timeout_s=10"),
                *("--set", "redis.socket_timeout_s=10"),
                *("--workers", "1", "--no-progress", "--with-features", *args),
            ],
        )
        assert status == 0
        table = pq.read_table(out)
        assert table.column("card_id").to_pylist() == spine.column("card_id").to_pylist()
        return table

    batch_args = [f"{g}={t}:{p}" for g, files in schedule.items() for t, p in files]
    point_in_time = await score_batch(
        "batch-pit",
        *("--events", str(events_path)),
        *(w for spec in batch_args for w in ("--batch", spec)),
    )
    assert_same_answers("point-in-time", rows, responses, point_in_time)
    assert len(set(point_in_time.column("score").to_pylist())) > len(rows) // 2
    online = await score_batch(
        "batch-online", "--features", "online", "--set", f"redis.url={store_url}"
    )
    assert_same_answers("online", rows, now_responses, online)
    if importlib.util.find_spec("pyspark") is not None:  # the 'spark' extra: make test installs it
        on_spark = await score_batch(
            "batch-spark",
            *("--engine", "spark", "--spark-master", "local[2]", "--events", str(events_path)),
            *(w for spec in batch_args for w in ("--batch", spec)),
        )
        assert_same_answers("spark", rows, responses, on_spark)


def assert_same_answers(
    mode: str,
    rows: Sequence[Mapping[str, Any]],
    responses: Sequence[pb.ScoreResponse],
    batch: pa.Table,
) -> None:
    """Every batch score and feature value is the served one, exactly in float32.

    (At the wall clock every window has decayed and the linear model's score saturates:
    the features, batch ones varying per customer, are the non-trivial part there.)
    """
    assert batch.num_rows == len(responses) == len(rows)
    scores = batch.column("score").to_pylist()
    mismatches = [
        (i, rows[i]["card_id"], rows[i]["ts_ms"], "score", r.score, scores[i])
        for i, r in enumerate(responses)
        if np.float32(r.score) != np.float32(scores[i])
    ]
    for name in DEMO_FEATURES:
        column = batch.column(f"feature.{name}").to_pylist()
        mismatches += [
            (i, rows[i]["card_id"], rows[i]["ts_ms"], name, f.value, column[i])
            for i, r in enumerate(responses)
            for f in r.features
            if f.name == name and np.float32(f.value) != np.float32(column[i])
        ]
    assert mismatches == [], f"{mode}: {len(mismatches)} mismatches, first: {mismatches[:5]}"
    assert [len(r.features) for r in responses] == [len(DEMO_FEATURES)] * len(rows)
    distinct = {
        tuple(batch.column(f"feature.{n}").to_pylist()[i] for n in DEMO_FEATURES)
        for i in range(batch.num_rows)
    }
    assert len(distinct) > len(rows) // 2, mode


async def assert_keys_canonical(redis_url: str) -> None:
    """Every spelling of an id reached one key: no key holds whitespace."""
    client = await connect(RedisOptions(redis_url))
    try:
        keys = [k if isinstance(k, bytes) else k.encode() async for k in scan_keys(client, "*")]
    finally:
        await client.aclose()
    assert keys
    assert [k for k in keys if any(c in k for c in b" \t\n")] == []


def assert_worker_agrees(worker: Progress, report: BackfillReport, n_records: int) -> None:
    """The backfill replayed the same decisions as the worker did."""
    assert report.events_read == worker.records() == n_records
    assert report.events_malformed == sum(r.malformed for r in worker.reports) == len(MALFORMED)
    for group in ("card_activity", "merchant_activity"):
        assert report.events_late[group] == worker.late(group) > 0, group


def assert_not_trivial(
    training: pa.Table, rows: Sequence[Mapping[str, Any]], definitions: FeatureDefinitions
) -> None:
    """The compared values cover live windows, decayed ones and every kind of default."""

    def col(name: str) -> list[float]:
        return list(training.column(name).to_pylist())

    assert sum(v > 0 for v in col("card_txn_count_5m")) >= 5
    assert sum(v > 0 for v in col("merchant_txn_count_1h")) >= 50
    assert 0 < sum(v == 0 for v in col("card_txn_count_24h")) < len(rows)
    assert 0 < sum(v == 604800.0 for v in col("card_seconds_since_last_txn")) < len(rows)
    assert any(0 < v < 1 for v in col("card_seconds_since_last_txn"))  # 1 ms after the last
    customers = definitions.batch_groups["customer_profile"].fields
    defaults = [float(f.default) for f in customers.values()]
    got = list(zip(*(col(n) for n in customers), strict=True))
    assert sum(list(g) == defaults for g in got) >= 2  # dropped and unknown customers
    assert sum(list(g) != defaults for g in got) > len(rows) // 2
