"""``streamscore decisions show|reproduce``: one past decision, found in the records topic.

``show REQUEST_ID`` finds the decision record (``server.records.traffic_log``) by a
time-indexed offset lookup: the offsets at ``now - since`` of each partition
(``offsets_for_times``), the partition the producer's default partitioner (murmur2 of
the key, the request id) would choose read first, the others if it is not there (the
durable sink's default ``partition_by: round`` puts a record in its send round's
partition, the first key's). It prints the record readably: features with their
sources, reasons, lineage.

``reproduce REQUEST_ID --target HOST:PORT`` re-scores it: the recorded features sent
to the recorded version (pinned), reasons asked for where they were recorded, and
reports whether score and reason codes match.

Exit status: 0 found (and reproduced), 1 not found or could not run, 2 bad arguments,
3 reproduced with a different score or different reasons.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import grpc.aio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.clients.channels import ClientTLS, add_tls_arguments, aio_channel, tls_from_args
from server.clients.override_token import (
    add_override_arguments,
    override_metadata,
    token_from_args,
)
from server.clients.replay import ReplayConfig, ReplayError, build_request, parse_record

__all__ = [
    "DEFAULT_TOPIC",
    "Found",
    "Reproduction",
    "find_record",
    "format_record",
    "keyed_partition",
    "main_decisions",
    "parse_since",
    "reproduce",
]

DEFAULT_TOPIC = "streamscore.decisions"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``7d`` -> seconds; ``ValueError`` otherwise."""
    match = _DURATION.match(text.lower())
    if match is None:
        raise ValueError(f"a duration like 30m, 2h or 7d, not {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def keyed_partition(key: bytes, partitions: int) -> int:
    """The partition the Kafka default partitioner (Java's and aiokafka's) gives ``key``."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Found:
    """A decision record and where it was in the topic."""

    record: dict[str, Any]
    raw: bytes
    partition: int
    offset: int


async def find_record(
    bootstrap_servers: str,
    topic: str,
    request_id: str,
    since_ms: int,
    *,
    timeout_s: float = 30.0,
) -> Found | None:
    """The first record keyed ``request_id`` written at or after ``since_ms`` (epoch ms),
    or ``None``. ``ReplayError`` when the topic is missing or Kafka unreachable."""
    key = request_id.encode()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False
    )
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                raise ReplayError(f"topic {topic!r} does not exist on {bootstrap_servers}")
            ordered = sorted(partitions)
            first = keyed_partition(key, len(ordered))
            ordered.sort(key=lambda p: p != first)  # the keyed partition first
            for partition in ordered:
                found = await _search_partition(
                    consumer, TopicPartition(topic, partition), key, since_ms
                )
                if found is not None:
                    return found
            return None
    except TimeoutError:
        raise ReplayError(f"searching {topic!r} took longer than {timeout_s}s") from None
    except ReplayError:
        raise
    except Exception as error:  # aiokafka connection errors
        raise ReplayError(f"cannot read {topic!r} from {bootstrap_servers}: {error}") from error
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def _search_partition(
    consumer: AIOKafkaConsumer, tp: TopicPartition, key: bytes, since_ms: int
) -> Found | None:
    """Read ``tp`` from its offset at ``since_ms`` to its end (seen now) for ``key``."""
    consumer.assign([tp])
    start = (await consumer.offsets_for_times({tp: since_ms})).get(tp)
    if start is None or start.timestamp < 0:
        # nothing written there since then (Tansu answers offset 0 with timestamp -1)
        return None
    end = (await consumer.end_offsets([tp]))[tp]
    consumer.seek(tp, start.offset)
    while True:
        batches = await consumer.getmany(tp, timeout_ms=500)
        highwater = consumer.highwater(tp)
        if highwater is not None:
            end = max(end, highwater)  # some brokers under-report ListOffsets
        for message in batches.get(tp, []):
            if message.key == key and message.value is not None:
                return Found(json.loads(message.value), message.value, tp.partition, message.offset)
        if await consumer.position(tp) >= end and highwater is not None:
            return None


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")


def _number(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def format_record(found: Found) -> str:
    """A decision record, readably: answer, version and lineage, features with their
    sources, reasons, degraded flags, process and latency."""
    r = found.record
    request = r.get("request", {})
    lineage = r.get("lineage") or {}
    decision = r.get("decision", r["score"] >= r.get("threshold", 0.5))
    lines = [
        f"decision {r.get('request_id', request.get('request_id'))}  "
        f"(partition {found.partition}, offset {found.offset}; {r.get('schema')})",
        f"  answered    {_when(float(r['ts']))}  features at {_when(r['t_ms'] / 1000)}",
        f"  entity ids  {json.dumps(request.get('entity_ids', {}))}",
        f"  model       {r['model']} version {r['version']} (route {r['route']})",
        f"  score       {r['score']:.6g}  threshold {r.get('threshold')}  -> "
        + ("FLAGGED (score >= threshold)" if decision else "not flagged"),
        f"  artifact    sha256 {r.get('artifact_sha256') or '-'}",
        f"  lineage     data snapshot {lineage.get('data_snapshot', '-')}, code commit "
        f"{lineage.get('code_commit', '-')}, trained {lineage.get('created_at', '-')}"
        f" ({lineage.get('algorithm', '-')})",
        "  features:",
    ]
    sources = r.get("feature_sources", {})
    width = max((len(n) for n in r["features"]), default=0)
    for name, value in r["features"].items():
        lines.append(f"    {name:<{width}}  {_number(value):>12}  {sources.get(name, '?')}")
    for item in r.get("freshness", []):
        lines.append(
            f"  freshness   stream:{item['group']} entity {item['entity']}: {item['age_ms']} ms old"
        )
    reasons = r.get("reasons")
    if reasons is None:
        lines.append("  reasons     not computed")
    else:
        lines.append(f"  reasons     (base value {r.get('reasons_base_value', 0.0):.6g})")
        for rank, reason in enumerate(reasons, 1):
            behind = ", ".join(
                f"{f['name']}={_number(f['value'])} ({f['contribution']:+.4g})"
                for f in reason["features"]
            )
            lines.append(
                f"    {rank}. {reason['code']} {reason['contribution']:+.4g}  {reason['text']}"
                f"  [{behind}]"
            )
    lines.append(
        f"  degraded    {', '.join(r.get('degraded_reasons', [])) or 'no'}; defaulted: "
        f"{', '.join(r.get('defaulted_features', [])) or 'none'}"
    )
    process = r.get("process") or {}
    lines.append(
        f"  served by   pid {process.get('pid', '-')} (process {process.get('index', '-')}), "
        f"latency {r.get('latency_us', r.get('timings', {}).get('pipeline_us', '-'))} us"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class Reproduction:
    """A decision re-scored: recorded against now."""

    recorded_score: float
    score: float
    recorded_reasons: tuple[str, ...] | None
    reasons: tuple[str, ...]
    version: str
    tolerance: float

    @property
    def score_matches(self) -> bool:
        return abs(self.score - self.recorded_score) <= self.tolerance

    @property
    def reasons_match(self) -> bool:
        return self.recorded_reasons is None or self.reasons == self.recorded_reasons

    @property
    def matches(self) -> bool:
        return self.score_matches and self.reasons_match

    def format_text(self) -> str:
        """One line each for score and reasons, then the verdict."""
        recorded = "not recorded" if self.recorded_reasons is None else self.recorded_reasons
        return "\n".join(
            [
                f"version     {self.version} (pinned)",
                f"score       recorded {self.recorded_score:.9g}  now {self.score:.9g}  "
                f"diff {self.score - self.recorded_score:+.3g}  "
                + ("MATCH" if self.score_matches else "DIFFERENT"),
                f"reasons     recorded {recorded}  now {self.reasons}  "
                + ("MATCH" if self.reasons_match else "DIFFERENT"),
                "reproduced" if self.matches else "NOT reproduced",
            ]
        )


async def reproduce(
    record: dict[str, Any],
    target: str,
    *,
    tls: ClientTLS | None = None,
    tolerance: float = 1e-6,
    timeout_s: float = 10.0,
    override_token: str | None = None,
) -> Reproduction:
    """Re-score ``record`` on ``target`` (recorded features, recorded version pinned,
    reasons asked for when recorded). Recorded store features and times need the
    server's overrides permission: ``override_token`` is sent as call metadata.
    ``ReplayError`` when the call fails."""
    parsed = parse_record(json.dumps(record))
    request = build_request(
        parsed, ReplayConfig(target=target, topic="-", reproduce=True, pace=None)
    )
    channel = aio_channel(target, tls)
    try:
        stub = pb_grpc.ScoringStub(channel)
        response: pb.ScoreResponse = await stub.Score(
            request, timeout=timeout_s, metadata=override_metadata(override_token)
        )
    except grpc.aio.AioRpcError as error:
        raise ReplayError(f"{target} answered {error.code().name}: {error.details()}") from None
    finally:
        await channel.close(None)
    return Reproduction(
        recorded_score=parsed.score,
        score=response.score,
        recorded_reasons=parsed.reason_codes,
        reasons=tuple(r.code for r in response.reasons),
        version=response.model_version,
        tolerance=tolerance,
    )


def build_parser(default_bootstrap: str = "127.0.0.1:9092") -> argparse.ArgumentParser:
    """Arguments of ``streamscore decisions``."""
    p = argparse.ArgumentParser(
        prog="streamscore decisions",
        description="Find one past decision in the records topic; show or reproduce it.",
    )
    commands = p.add_subparsers(dest="action", required=True)
    for action, text in (
        ("show", "print the decision record"),
        ("reproduce", "re-score it pinned to its recorded version and compare"),
    ):
        sub = commands.add_parser(action, help=text)
        sub.add_argument("request_id")
        sub.add_argument("--since", default="2h", help="how far back to look (e.g. 30m, 2h, 7d)")
        sub.add_argument("--topic", default=DEFAULT_TOPIC)
        sub.add_argument("--bootstrap-servers", "--bootstrap", default=default_bootstrap)
        sub.add_argument("--timeout", type=float, default=30.0, help="seconds for the search")
        if action == "show":
            sub.add_argument("--json", action="store_true", help="print the raw record")
        else:
            sub.add_argument("--target", required=True, help="host:port of the server")
            sub.add_argument("--score-tolerance", type=float, default=1e-6)
            add_tls_arguments(sub)
            add_override_arguments(sub)
    return p


def main_decisions(
    argv: Sequence[str] | None = None, default_bootstrap: str = "127.0.0.1:9092"
) -> int:
    """``streamscore decisions show|reproduce`` (exit status: see the module doc)."""
    parser = build_parser(default_bootstrap)
    args = parser.parse_args(argv)
    try:
        since_s = parse_since(args.since)
    except ValueError as error:
        parser.error(f"--since: {error}")
    since = time.time() - since_s
    try:
        found = asyncio.run(
            find_record(
                args.bootstrap_servers,
                args.topic,
                args.request_id,
                int(since * 1000),
                timeout_s=args.timeout,
            )
        )
    except ReplayError as error:
        sys.stderr.write(f"streamscore decisions: {error}\n")
        return 1
    if found is None:
        sys.stdout.write(f"{args.request_id} not found in {args.topic} since {_when(since)}\n")
        return 1
    if args.action == "show":
        if args.json:
            sys.stdout.write(found.raw.decode() + "\n")
        else:
            sys.stdout.write(format_record(found) + "\n")
        return 0
    try:
        result = asyncio.run(
            reproduce(
                found.record,
                args.target,
                tls=tls_from_args(args),
                tolerance=args.score_tolerance,
                override_token=token_from_args(args),
            )
        )
    except (ReplayError, ValueError) as error:
        sys.stderr.write(f"streamscore decisions: {error}\n")
        return 1
    sys.stdout.write(format_record(found) + "\n" + result.format_text() + "\n")
    return 0 if result.matches else 3


if __name__ == "__main__":
    sys.exit(main_decisions())
