"""Replay recorded traffic against a server and compare with what was recorded.

``streamscore replay`` (and the bench's replay mode) reads traffic-log records
(``server.records.traffic_log``) from a Kafka topic (from the beginning up to the end
offsets seen at start) or a JSON-lines file, and sends them as ``Score`` calls to a
target server:

* version: pinned (``version``) or left to the target's routing (``None``);
* pace: the recorded inter-arrival times divided by ``pace`` (1.0 = as recorded,
  2.0 = twice as fast), or ``None`` = as fast as ``concurrency`` calls in flight allow;
* features: ``frozen`` sends the recorded assembled features as request features
  (a value sent wins over the store, so the store is bypassed and only the model
  is tested), at the recorded feature time; ``live`` sends what the caller sent
  (request features, entity ids, event time) so the target assembles features now.

The report: counts, errors by status code, decision agreement (each side's score
against the recorded threshold, or ``threshold``), score differences (target -
recorded) and their percentiles, answering versions, latency percentiles (HDR,
from send to answer), throughput. ``ReplayReport.format_text`` and ``to_json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import grpc
import grpc.aio
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp

from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.clients.channels import (
    ClientTLS,
    add_tls_arguments,
    aio_channel,
    distinct_connection,
    tls_from_args,
)
from server.clients.histogram import LatencyHistogram, LatencySummary
from server.clients.override_token import (
    add_override_arguments,
    override_metadata,
    token_from_args,
)
from server.records.traffic_log import DECISION_SCHEMA, RECORD_SCHEMAS, traffic_record

__all__ = [
    "FeatureMode",
    "ReplayConfig",
    "ReplayError",
    "ReplayRecord",
    "ReplayReport",
    "main_replay",
    "parse_record",
    "read_file",
    "read_topic",
    "read_topic_values",
    "record_from_exchange",
    "run_replay",
]

logger = logging.getLogger(__name__)

FeatureMode = Literal["frozen", "live"]
REPORT_SCHEMA = "streamscore.replay/1"
_LATE_NS = 2_000_000
_MISMATCHES_KEPT = 20
_ROUTE_NAMES = {
    pb.ROUTE_CHAMPION: "champion",
    pb.ROUTE_CANARY: "canary",
    pb.ROUTE_PINNED: "pinned",
    pb.ROUTE_UNSPECIFIED: "unspecified",
}


class ReplayError(Exception):
    """The replay could not run (no records, unreachable source or target, bad option)."""


class ReplayRecord(NamedTuple):
    """What replay needs of one traffic-log record."""

    ts: float
    request_id: str
    model: str
    entity_ids: Mapping[str, str]
    request_features: Mapping[str, float]
    event_time_ms: int | None
    t_ms: int
    features: Mapping[str, float]
    score: float
    version: str
    route: str
    threshold: float
    #: Reason codes of the recorded answer, in order (``None``: none were computed).
    reason_codes: tuple[str, ...] | None = None
    #: The recorded reasons as read (code, text, contribution, features) and their
    #: base value: what ``--save`` writes back.
    reasons: tuple[Mapping[str, Any], ...] | None = None
    reasons_base_value: float = 0.0


def parse_record(data: bytes | str) -> ReplayRecord:
    """Parse one traffic-log JSON record; ``ValueError`` names what is wrong."""
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from error
    if not isinstance(doc, dict) or doc.get("schema") not in RECORD_SCHEMAS:
        raise ValueError(f"not a {DECISION_SCHEMA} record")
    try:
        request = doc["request"]
        event_time = request.get("event_time_ms")
        return ReplayRecord(
            ts=float(doc["ts"]),
            request_id=str(request["request_id"]),
            model=str(doc["model"]),
            entity_ids={str(k): str(v) for k, v in request.get("entity_ids", {}).items()},
            request_features={str(k): float(v) for k, v in request["features"].items()},
            event_time_ms=None if event_time is None else int(event_time),
            t_ms=int(doc["t_ms"]),
            features={str(k): float(v) for k, v in doc["features"].items()},
            score=float(doc["score"]),
            version=str(doc["version"]),
            route=str(doc["route"]),
            threshold=float(doc.get("threshold", 0.5)),
            reason_codes=_reason_codes(doc.get("reasons")),
            reasons=None if doc.get("reasons") is None else tuple(doc["reasons"]),
            reasons_base_value=float(doc.get("reasons_base_value", 0.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"bad {DECISION_SCHEMA} record: {error!r}") from error


def _reason_codes(reasons: object) -> tuple[str, ...] | None:
    if reasons is None:
        return None
    if not isinstance(reasons, list):
        raise ValueError("reasons must be a list")
    return tuple(str(reason["code"]) for reason in reasons)


def _parse_all(lines: Iterable[bytes | str]) -> tuple[list[ReplayRecord], int]:
    records: list[ReplayRecord] = []
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(parse_record(line))
        except ValueError:
            skipped += 1
    records.sort(key=lambda r: r.ts)
    return records, skipped


def read_file(path: Path, limit: int | None = None) -> tuple[list[ReplayRecord], int]:
    """Records of a JSON-lines file, oldest first, and how many lines were skipped."""
    with path.open("rb") as handle:
        records, skipped = _parse_all(handle)
    return records[:limit], skipped


async def read_topic_values(
    bootstrap_servers: str, topic: str, *, limit: int | None = None, timeout_s: float = 30.0
) -> list[bytes]:
    """Message values of ``topic``, from the beginning to the end offsets seen now.

    With ``limit`` at most
    ``limit`` values per partition. Raises ``ReplayError`` when the topic does not
    exist, Kafka is unreachable, or reading takes longer than ``timeout_s``.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False
    )
    values: list[bytes] = []
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                raise ReplayError(f"topic {topic!r} does not exist on {bootstrap_servers}")
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends: dict[TopicPartition, int] = dict(await consumer.end_offsets(tps))
            begins: dict[TopicPartition, int] = dict(await consumer.beginning_offsets(tps))
            wanted = {
                tp: end if limit is None else min(end, begins[tp] + limit)
                for tp, end in ends.items()
            }
            open_tps = {tp for tp in tps if wanted[tp] > begins[tp]}
            bounded: set[TopicPartition] = set()
            while open_tps:
                batches = await consumer.getmany(*open_tps, timeout_ms=200)
                for tp in open_tps - bounded:
                    # Some brokers (Tansu) under-report ListOffsets; the high watermark
                    # of the first fetch is the true end at (nearly) the start.
                    highwater = consumer.highwater(tp)
                    if highwater is not None:
                        bounded.add(tp)
                        end = max(ends[tp], highwater)
                        wanted[tp] = end if limit is None else min(end, begins[tp] + limit)
                for tp, messages in batches.items():
                    for message in messages:
                        if message.offset < wanted[tp] and message.value is not None:
                            values.append(message.value)
                for tp in bounded & open_tps:
                    if await consumer.position(tp) >= wanted[tp]:
                        open_tps.discard(tp)
    except TimeoutError:
        raise ReplayError(f"reading {topic!r} took longer than {timeout_s}s") from None
    except ReplayError:
        raise
    except Exception as error:  # aiokafka connection errors
        raise ReplayError(f"cannot read {topic!r} from {bootstrap_servers}: {error}") from error
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    return values


async def read_topic(
    bootstrap_servers: str, topic: str, *, limit: int | None = None, timeout_s: float = 30.0
) -> tuple[list[ReplayRecord], int]:
    """Traffic records of ``topic`` (see ``read_topic_values``), oldest first, and how
    many messages were not parseable records.

    With ``limit``, at most ``limit`` records per partition are read and the oldest
    ``limit`` overall are kept.
    """
    values = await read_topic_values(bootstrap_servers, topic, limit=limit, timeout_s=timeout_s)
    records, skipped = _parse_all(values)
    return records[:limit], skipped


def record_from_exchange(
    request: pb.ScoreRequest, response: pb.ScoreResponse, *, threshold: float, ts: float
) -> dict[str, Any]:
    """A traffic record built client-side from a Score call made with ``echo_features``.

    For tests and benches that record traffic without the server's traffic log.
    """
    if not response.features:
        raise ValueError("the response carries no features: send echo_features=True")
    event_time_ms = (
        request.event_time.seconds * 1000 + request.event_time.nanos // 1_000_000
        if request.HasField("event_time")
        else None
    )
    return traffic_record(
        ts=ts,
        model=request.model,
        model_version=request.model_version or None,
        request_id=response.request_id,
        entity_ids=dict(request.entity_ids),
        request_features=dict(request.features),
        event_time_ms=event_time_ms,
        t_ms=event_time_ms if event_time_ms is not None else int(ts * 1000),
        features={f.name: f.value for f in response.features},
        score=response.score,
        version=response.model_version,
        route=_ROUTE_NAMES.get(response.route, "unspecified"),
        threshold=threshold,
        defaulted_features=list(response.defaulted_features),
        degraded_reasons=list(response.degraded_reasons),
        timings={"server_time_us": response.server_time_us},
    )


@dataclass(frozen=True)
class ReplayConfig:
    """One replay: where records come from, where they go, how fast, which features."""

    target: str = "127.0.0.1:50051"
    #: JSON-lines file of traffic records; exactly one of ``file`` / ``topic``.
    file: Path | None = None
    topic: str | None = None
    bootstrap_servers: str = "127.0.0.1:9092"
    #: Replay at most this many records (the oldest).
    limit: int | None = None
    #: Pin this version; ``None`` = the target's routing decides.
    version: str | None = None
    #: Speed-up of the recorded pace (1.0 = as recorded); ``None`` = as fast as possible.
    pace: float | None = 1.0
    features: FeatureMode = "frozen"
    #: Most calls in flight (max pace: the number of callers).
    concurrency: int = 64
    connections: int = 1
    deadline_ms: float | None = None
    #: Decision threshold for both sides; ``None`` = each record's recorded threshold.
    threshold: float | None = None
    #: Scores closer than this count as identical.
    score_tolerance: float = 1e-6
    read_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    #: TLS to the server (``--tls-ca`` ...); None = plaintext.
    tls: ClientTLS | None = None
    #: Reproduce each decision: its recorded version pinned, its recorded features sent,
    #: reasons asked for where they were recorded and their codes compared.
    reproduce: bool = False
    #: Token of ``features.allow_overrides`` (frozen features and recorded times).
    override_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            ((self.file is None) != (self.topic is None), "give exactly one of file / topic"),
            (self.limit is None or self.limit >= 1, "limit must be >= 1"),
            (self.pace is None or self.pace > 0, "pace must be > 0 (None = max)"),
            (self.features in ("frozen", "live"), "features must be 'frozen' or 'live'"),
            (self.concurrency >= 1 and self.connections >= 1, "concurrency/connections >= 1"),
            (self.deadline_ms is None or self.deadline_ms > 0, "deadline_ms must be > 0"),
            (self.threshold is None or 0 <= self.threshold <= 1, "threshold must be in [0, 1]"),
            (self.score_tolerance >= 0, "score_tolerance must be >= 0"),
            (
                not self.reproduce or (self.features == "frozen" and self.version is None),
                "reproduce sends the recorded features to the recorded version "
                "(features frozen, no version)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def source(self) -> str:
        """``file:<path>`` or ``kafka:<bootstrap>/<topic>``."""
        if self.file is not None:
            return f"file:{self.file}"
        return f"kafka:{self.bootstrap_servers}/{self.topic}"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values of every field."""
        data = asdict(self)
        data["file"] = None if self.file is None else str(self.file)
        data["tls"] = None if self.tls is None else {"mutual": self.tls.cert_file is not None}
        data["override_token"] = self.override_token is not None  # never the secret
        return data


@dataclass(frozen=True)
class ReplayReport:
    """Outcome of a replay; ``to_json`` documents the keys."""

    config: ReplayConfig
    records: int
    skipped_records: int
    ok: int
    errors: Mapping[str, int]
    agreed: int
    identical: int
    #: |target - recorded|: count, mean, p50, p90, p99, max; plus the signed mean.
    score_diff: Mapping[str, float]
    answered_by: Mapping[str, int]
    latency: LatencySummary
    late: int
    duration_s: float
    latency_hdr: str = ""
    environment: Mapping[str, Any] = field(default_factory=dict)
    #: Answers whose recorded reasons were compared, and how many had the same codes.
    reasons_compared: int = 0
    reasons_agreed: int = 0
    #: Answers with an identical score and (where recorded) the same reason codes.
    reproduced: int = 0
    #: Request ids of the first answers that were not reproduced.
    mismatched: tuple[str, ...] = ()

    @property
    def agreement_rate(self) -> float | None:
        """Share of OK answers with the recorded decision; ``None`` when nothing answered."""
        return self.agreed / self.ok if self.ok else None

    @property
    def throughput_rps(self) -> float:
        """OK answers per second of replay."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON document: schema, config, counts, agreement, score_diff, latency_us, ..."""
        return {
            "schema": REPORT_SCHEMA,
            "config": self.config.to_json(),
            "source": self.config.source,
            "records": self.records,
            "skipped_records": self.skipped_records,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "agreed": self.agreed,
            "agreement_rate": self.agreement_rate,
            "identical": self.identical,
            "score_diff": dict(self.score_diff),
            "answered_by": dict(sorted(self.answered_by.items())),
            "latency_us": self.latency.to_json(),
            "late": self.late,
            "duration_s": round(self.duration_s, 4),
            "throughput_rps": round(self.throughput_rps, 2),
            "latency_hdr": self.latency_hdr,
            "environment": dict(self.environment),
            "reasons_compared": self.reasons_compared,
            "reasons_agreed": self.reasons_agreed,
            "reproduced": self.reproduced,
            "mismatched": list(self.mismatched),
        }

    def format_text(self) -> str:
        """Human summary (latencies in microseconds)."""
        cfg = self.config
        pace = "max" if cfg.pace is None else f"{cfg.pace:g}x recorded"
        version = f"version {cfg.version} pinned" if cfg.version else "target routing"
        rate = self.agreement_rate
        d = self.score_diff
        lat = self.latency
        return "\n".join(
            [
                f"replay {self.records} records from {cfg.source} -> {cfg.target} ({version}, "
                f"features {cfg.features}, pace {pace})",
                f"ok={self.ok} errors={dict(self.errors) or 0} "
                f"skipped_records={self.skipped_records} answered_by={dict(self.answered_by)}",
                "agreement        "
                + ("n/a" if rate is None else f"{rate:.4%} ({self.agreed}/{self.ok})")
                + f", identical scores {self.identical} (|diff| <= {cfg.score_tolerance:g})",
                f"score |diff|     mean={d['mean_abs']:.6g} p50={d['p50_abs']:.6g} "
                f"p90={d['p90_abs']:.6g} p99={d['p99_abs']:.6g} max={d['max_abs']:.6g} "
                f"(signed mean {d['mean']:.6g})",
                f"latency us       p50={lat.p50_us} p90={lat.p90_us} p99={lat.p99_us} "
                f"p99.9={lat.p999_us} max={lat.max_us} (n={lat.count})",
                f"throughput       {self.throughput_rps:.1f} ok/s over {self.duration_s:.2f}s"
                f" (late sends: {self.late})",
                *(
                    [
                        f"reproduced       {self.reproduced}/{self.ok} (score within "
                        f"{cfg.score_tolerance:g} and same reason codes); reason codes equal "
                        f"{self.reasons_agreed}/{self.reasons_compared}"
                        + (
                            f"; first mismatches: {', '.join(self.mismatched)}"
                            if self.mismatched
                            else ""
                        )
                    ]
                    if cfg.reproduce
                    else []
                ),
            ]
        )


def _timestamp(ms: int) -> Timestamp:
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def build_request(record: ReplayRecord, config: ReplayConfig) -> pb.ScoreRequest:
    """The ``ScoreRequest`` replaying ``record`` under ``config``."""
    request = pb.ScoreRequest(
        model=record.model,
        model_version=record.version if config.reproduce else config.version or "",
        request_id=record.request_id,
        entity_ids=dict(record.entity_ids),
        explain=config.reproduce and record.reason_codes is not None,
    )
    if config.features == "frozen":
        request.features.update(record.features)
        request.event_time.CopyFrom(_timestamp(record.t_ms))
    else:
        request.features.update(record.request_features)
        if record.event_time_ms is not None:
            request.event_time.CopyFrom(_timestamp(record.event_time_ms))
    return request


class _Tally:
    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.agreed = 0
        self.identical = 0
        self.diffs = array("d")
        self.answered_by: Counter[str] = Counter()
        self.latency = LatencyHistogram()
        self.late = 0
        self.reasons_compared = 0
        self.reasons_agreed = 0
        self.reproduced = 0
        self.mismatched: list[str] = []
        self.metadata = override_metadata(config.override_token)

    def answered(self, record: ReplayRecord, response: pb.ScoreResponse, latency_ns: int) -> None:
        self.ok += 1
        self.latency.record_ns(latency_ns)
        self.answered_by[response.model_version] += 1
        threshold = record.threshold if self.config.threshold is None else self.config.threshold
        if (response.score >= threshold) == (record.score >= threshold):
            self.agreed += 1
        diff = response.score - record.score
        same_score = abs(diff) <= self.config.score_tolerance
        if same_score:
            self.identical += 1
        self.diffs.append(diff)
        if self.config.reproduce:
            same_reasons = True
            if record.reason_codes is not None:
                self.reasons_compared += 1
                same_reasons = tuple(r.code for r in response.reasons) == record.reason_codes
                self.reasons_agreed += same_reasons
            if same_score and same_reasons:
                self.reproduced += 1
            elif len(self.mismatched) < _MISMATCHES_KEPT:
                self.mismatched.append(record.request_id)

    def score_diff(self) -> dict[str, float]:
        if not self.diffs:
            keys = ("count", "mean_abs", "p50_abs", "p90_abs", "p99_abs", "max_abs", "mean")
            return dict.fromkeys(keys, 0.0)
        signed = np.frombuffer(self.diffs, dtype=np.float64)
        absolute = np.abs(signed)
        p50, p90, p99 = np.percentile(absolute, [50, 90, 99]).tolist()
        return {
            "count": float(absolute.size),
            "mean_abs": float(absolute.mean()),
            "p50_abs": float(p50),
            "p90_abs": float(p90),
            "p99_abs": float(p99),
            "max_abs": float(absolute.max()),
            "mean": float(signed.mean()),
        }


async def _call(
    stub: pb_grpc.ScoringAsyncStub,
    request: pb.ScoreRequest,
    record: ReplayRecord,
    tally: _Tally,
    deadline_s: float | None,
) -> None:
    started = time.perf_counter_ns()
    try:
        response: pb.ScoreResponse = await stub.Score(
            request, timeout=deadline_s, metadata=tally.metadata
        )
    except grpc.aio.AioRpcError as error:
        tally.errors[error.code().name] += 1
        return
    tally.answered(record, response, time.perf_counter_ns() - started)


async def _max_pace(
    work: Sequence[tuple[pb.ScoreRequest, ReplayRecord]],
    stubs: Sequence[pb_grpc.ScoringAsyncStub],
    tally: _Tally,
    deadline_s: float | None,
) -> None:
    items: Iterator[tuple[pb.ScoreRequest, ReplayRecord]] = iter(work)

    async def caller(stub: pb_grpc.ScoringAsyncStub) -> None:
        for request, record in items:  # shared iterator: each item goes to one caller
            await _call(stub, request, record, tally, deadline_s)

    count = min(tally.config.concurrency, len(work))
    await asyncio.gather(*(caller(stubs[i % len(stubs)]) for i in range(count)))


def _finished(
    tasks: set[asyncio.Task[None]], slots: asyncio.Semaphore
) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        slots.release()

    return done


async def _recorded_pace(
    work: Sequence[tuple[pb.ScoreRequest, ReplayRecord]],
    stubs: Sequence[pb_grpc.ScoringAsyncStub],
    tally: _Tally,
    deadline_s: float | None,
    pace: float,
) -> None:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(tally.config.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    first_ts = work[0][1].ts
    start = time.perf_counter_ns()
    for index, (request, record) in enumerate(work):
        due = start + int((record.ts - first_ts) / pace * 1e9)
        now = time.perf_counter_ns()
        if due > now:
            await asyncio.sleep((due - now) / 1e9)
        await slots.acquire()
        if time.perf_counter_ns() - due > _LATE_NS:
            tally.late += 1
        stub = stubs[index % len(stubs)]
        task = loop.create_task(_call(stub, request, record, tally, deadline_s))
        tasks.add(task)
        task.add_done_callback(_finished(tasks, slots))
    if tasks:
        await asyncio.gather(*tasks)


async def run_replay(
    config: ReplayConfig, records: Sequence[ReplayRecord] | None = None, *, skipped: int = 0
) -> ReplayReport:
    """Run one replay; ``records`` (oldest first) skips reading ``config``'s source.

    ``skipped`` is reported as the unparseable count when ``records`` is given.

    Raises ``ReplayError`` when there is nothing to replay or the target is unreachable.
    RPC failures during the replay are counted, not raised.
    """
    if records is None:
        records, skipped = await read_source(config)
    elif config.limit is not None:
        records = records[: config.limit]
    if not records:
        raise ReplayError(f"no records to replay from {config.source} ({skipped} unparseable)")
    work = [(build_request(record, config), record) for record in records]
    channels = [
        aio_channel(config.target, config.tls, distinct_connection(index))
        for index in range(config.connections)
    ]
    tally = _Tally(config)
    timeout = None if config.deadline_ms is None else config.deadline_ms / 1000
    try:
        try:
            async with asyncio.timeout(config.connect_timeout_s):
                await asyncio.gather(*(c.channel_ready() for c in channels))
        except TimeoutError:
            raise ReplayError(f"cannot connect to {config.target}") from None
        stubs = [pb_grpc.ScoringStub(c) for c in channels]
        started = time.perf_counter()
        if config.pace is None:
            await _max_pace(work, stubs, tally, timeout)
        else:
            await _recorded_pace(work, stubs, tally, timeout, config.pace)
        duration = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.close(None) for c in channels))
    return ReplayReport(
        config=config,
        records=len(records),
        skipped_records=skipped,
        ok=tally.ok,
        errors=dict(tally.errors),
        agreed=tally.agreed,
        identical=tally.identical,
        score_diff=tally.score_diff(),
        answered_by=dict(tally.answered_by),
        latency=tally.latency.summary(),
        late=tally.late,
        duration_s=duration,
        latency_hdr=tally.latency.encode(),
        environment={"event_loop": type(asyncio.get_running_loop()).__module__},
        reasons_compared=tally.reasons_compared,
        reasons_agreed=tally.reasons_agreed,
        reproduced=tally.reproduced,
        mismatched=tuple(tally.mismatched),
    )


def _pace(text: str) -> float | None:
    value = text.strip().lower()
    if value == "max":
        return None
    if value == "recorded":
        return 1.0
    try:
        pace = float(value.removesuffix("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"pace is 'recorded', 'max' or '<N>x', not {text!r}"
        ) from None
    if pace <= 0:
        raise argparse.ArgumentTypeError("pace must be > 0")
    return pace


def build_parser(default_bootstrap: str = "127.0.0.1:9092") -> argparse.ArgumentParser:
    """Arguments of ``streamscore replay``."""
    p = argparse.ArgumentParser(
        prog="streamscore replay",
        description="Replay recorded traffic (traffic log topic or JSON-lines file) "
        "against a server and compare with the recorded answers.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="JSON-lines file of traffic records")
    source.add_argument("--topic", help="Kafka topic of traffic records (read from the start)")
    p.add_argument("--bootstrap-servers", default=default_bootstrap)
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--limit", type=int, default=None, help="replay at most N (oldest) records")
    p.add_argument("--version", default=None, help="pin this version (default: its routing)")
    p.add_argument(
        "--pace",
        dest="pace_given",
        type=_pace,
        default=argparse.SUPPRESS,
        help="recorded (default; max with --reproduce), max, or <N>x (e.g. 2x)",
    )
    p.add_argument("--features", choices=("frozen", "live"), default="frozen")
    p.add_argument("--concurrency", type=int, default=64, help="most calls in flight")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--deadline-ms", type=float, default=None)
    p.add_argument("--threshold", type=float, default=None, help="default: recorded threshold")
    p.add_argument("--score-tolerance", type=float, default=1e-6)
    p.add_argument("--json-out", type=Path, default=None, help="write JSON here, not stdout")
    p.add_argument("--save", type=Path, default=None, help="also write the records read (JSONL)")
    p.add_argument(
        "--reproduce",
        action="store_true",
        help="reproduce each decision: recorded version pinned, recorded features, reason "
        "codes compared (implies --pace max unless given)",
    )
    add_tls_arguments(p)
    add_override_arguments(p)
    p.add_argument(
        "--fail-under",
        type=float,
        default=None,
        metavar="RATE",
        help="exit 3 when the agreement rate is below RATE (0..1)",
    )
    return p


def _chosen_pace(args: argparse.Namespace) -> float | None:
    if hasattr(args, "pace_given"):
        given: float | None = args.pace_given
        return given
    return None if args.reproduce else 1.0


def _config(args: argparse.Namespace) -> ReplayConfig:
    return ReplayConfig(
        target=args.target,
        file=args.file,
        topic=args.topic,
        bootstrap_servers=args.bootstrap_servers,
        limit=args.limit,
        version=args.version,
        pace=_chosen_pace(args),
        features=args.features,
        concurrency=args.concurrency,
        connections=args.connections,
        deadline_ms=args.deadline_ms,
        threshold=args.threshold,
        score_tolerance=args.score_tolerance,
        tls=tls_from_args(args),
        reproduce=args.reproduce,
        override_token=token_from_args(args),
    )


async def read_source(config: ReplayConfig) -> tuple[list[ReplayRecord], int]:
    """The records of ``config``'s file or topic and how many were unparseable;
    ``ReplayError`` when the file cannot be read."""
    if config.file is not None:
        try:
            return await asyncio.to_thread(read_file, config.file, config.limit)
        except OSError as error:
            raise ReplayError(f"cannot read {config.file}: {error}") from error
    assert config.topic is not None
    return await read_topic(
        config.bootstrap_servers,
        config.topic,
        limit=config.limit,
        timeout_s=config.read_timeout_s,
    )


async def _read_and_save(config: ReplayConfig, save: Path) -> tuple[list[ReplayRecord], int]:
    records, skipped = await read_source(config)
    save_records(records, save)
    return records, skipped


def save_records(records: Iterable[ReplayRecord], path: Path) -> None:
    """``records`` as JSON lines (``--save``): the record schema with the recorded
    reasons; ``ReplayError`` when the file cannot be written."""
    try:
        with path.open("w") as handle:
            for record in records:
                handle.write(json.dumps(_as_traffic(record), separators=(",", ":")) + "\n")
    except OSError as error:
        raise ReplayError(f"cannot write {path}: {error}") from error


def _as_traffic(record: ReplayRecord) -> dict[str, Any]:
    document = traffic_record(
        ts=record.ts,
        model=record.model,
        model_version=None,
        request_id=record.request_id,
        entity_ids=record.entity_ids,
        request_features=record.request_features,
        event_time_ms=record.event_time_ms,
        t_ms=record.t_ms,
        features=record.features,
        score=record.score,
        version=record.version,
        route=record.route,
        threshold=record.threshold,
        reasons_base_value=record.reasons_base_value,
    )
    if record.reasons is not None:
        document["reasons"] = [dict(reason) for reason in record.reasons]
    return document


def main_replay(
    argv: Sequence[str] | None = None, default_bootstrap: str = "127.0.0.1:9092"
) -> int:
    """``streamscore replay``: text summary on stderr, JSON on stdout (or ``--json-out``).

    Exit status: 0 done, 1 nothing answered or the replay could not run, 2 bad
    arguments, 3 agreement below ``--fail-under``.
    """
    parser = build_parser(default_bootstrap)
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except ValueError as error:
        parser.error(str(error))

    async def go() -> ReplayReport:
        if args.save is None:
            return await run_replay(config)
        records, skipped = await _read_and_save(config, args.save)
        return await run_replay(config, records, skipped=skipped)

    try:
        report = asyncio.run(go())
    except ReplayError as error:
        sys.stderr.write(f"streamscore replay: {error}\n")
        return 1
    sys.stderr.write(report.format_text() + "\n")
    document = json.dumps(report.to_json(), indent=2) + "\n"
    if args.json_out is None:
        sys.stdout.write(document)
    else:
        args.json_out.write_text(document)
    if report.ok == 0:
        return 1
    rate = report.agreement_rate
    if args.fail_under is not None and (rate is None or rate < args.fail_under):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main_replay())
