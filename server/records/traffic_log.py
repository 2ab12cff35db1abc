"""Traffic log: a sampled record of scored requests, written to Kafka off the hot path.

For each sampled request the pipeline calls ``TrafficLog.offer`` with the request,
the answer and the exact assembled row. On the request path that costs a hash of
the request id (sampling) and a non-blocking append to the bounded record sink;
building and encoding the JSON happen later on the sink's sender task. A full
buffer or an unreachable Kafka drops records (counted by the sink); serving never
waits for the log.

Sampling hashes the request id keyed by a server-side secret salt (``sample_salt``),
so a caller cannot choose ids that are always (or never) logged. With the same salt
every process, and a replay of the same ids, makes the same choice; without one,
each ``TrafficLog`` draws a random salt.

Record (``TRAFFIC_SCHEMA``, one JSON object per Kafka message, key = request id)::

    {"schema": "streamscore.traffic/1", "ts": <epoch s, float, when answered>,
     "request": {"model", "model_version", "request_id", "entity_ids", "features",
                 "event_time_ms"},                       # as the caller sent it
     "t_ms": <time the features were evaluated at>,
     "features": {"<name>": value, ...},                  # assembled row, model order
     "score", "model", "version", "route", "threshold",
     "defaulted_features": [...], "degraded_reasons": [...],
     "timings": {"pipeline_us": ...}}

Non-finite feature values (features whose manifest allows NaN) are written as the
JSON extension ``NaN``, which Python's ``json`` reads back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter

from server.records.kafka_sink import RecordSink

if TYPE_CHECKING:
    from server.scoring_types import ScoreInput, ScoreResult

__all__ = ["TRAFFIC_SCHEMA", "TrafficLog", "traffic_record"]

TRAFFIC_SCHEMA = "streamscore.traffic/1"
_HASH_SPACE = 1 << 64


def traffic_record(
    *,
    ts: float,
    model: str,
    model_version: str | None,
    request_id: str,
    entity_ids: Mapping[str, str],
    request_features: Mapping[str, float],
    event_time_ms: int | None,
    t_ms: int,
    features: Mapping[str, float],
    score: float,
    version: str,
    route: str,
    threshold: float,
    defaulted_features: Sequence[str] = (),
    degraded_reasons: Sequence[str] = (),
    timings: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """One traffic record as a JSON-ready dict (the documented schema)."""
    return {
        "schema": TRAFFIC_SCHEMA,
        "ts": ts,
        "request": {
            "model": model,
            "model_version": model_version or None,
            "request_id": request_id,
            "entity_ids": dict(entity_ids),
            "features": dict(request_features),
            "event_time_ms": event_time_ms,
        },
        "t_ms": t_ms,
        "features": dict(features),
        "score": score,
        "model": model,
        "version": version,
        "route": route,
        "threshold": threshold,
        "defaulted_features": list(defaulted_features),
        "degraded_reasons": list(degraded_reasons),
        "timings": dict(timings or {}),
    }


class TrafficLog:
    """Samples scored requests and hands their records to a ``RecordSink``."""

    def __init__(
        self,
        sink: RecordSink,
        topic: str,
        sample_rate: float,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        sample_salt: bytes | None = None,
    ) -> None:
        """``sample_rate`` in [0, 1] (0 = off, 1 = every request); ``sample_salt`` keys the
        id hash (a secret; random when None; blake2b takes up to 64 bytes)."""
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        self._sink = sink
        self._topic = topic
        self.sample_rate = sample_rate
        self._cutoff = int(sample_rate * _HASH_SPACE)
        self._clock = clock
        self._salt = sample_salt[:64] if sample_salt else os.urandom(32)
        self._sampled: Counter | None = (
            Counter(
                "streamscore_traffic_log_sampled",
                "Scored requests sampled into the traffic log (drops: record_sink_dropped).",
                registry=registry,
            )
            if registry is not None
            else None
        )

    def sampled(self, request_id: str) -> bool:
        """True when ``request_id`` falls in the sampled share of the salted id hash space."""
        if self._cutoff >= _HASH_SPACE:
            return True
        if self._cutoff <= 0:
            return False
        digest = hashlib.blake2b(request_id.encode(), digest_size=8, key=self._salt).digest()
        return int.from_bytes(digest, "big") < self._cutoff

    def offer(
        self,
        request: ScoreInput,
        result: ScoreResult,
        *,
        names: Sequence[str],
        row: npt.NDArray[np.float32],
        t_ms: int,
        threshold: float,
        timings: Mapping[str, int],
    ) -> bool:
        """Log one answered request if sampled; ``True`` when a record was queued.

        ``names``/``row`` are the answering version's feature names and the exact
        ``[1, F]`` row its model saw. Never blocks; never raises for a full buffer.
        """
        if not self.sampled(request.request_id):
            return False
        if self._sampled is not None:
            self._sampled.inc()
        encode = functools.partial(
            _encode, request, result, names, row, t_ms, threshold, timings, self._clock()
        )
        return self._sink.offer(self._topic, encode, request.request_id.encode())


def _encode(
    request: ScoreInput,
    result: ScoreResult,
    names: Sequence[str],
    row: npt.NDArray[np.float32],
    t_ms: int,
    threshold: float,
    timings: Mapping[str, int],
    ts: float,
) -> bytes:
    record = traffic_record(
        ts=ts,
        model=request.model,
        model_version=request.model_version,
        request_id=request.request_id,
        entity_ids=request.entity_ids,
        request_features=request.features,
        event_time_ms=request.event_time_ms,
        t_ms=t_ms,
        features=dict(zip(names, row.reshape(-1).tolist(), strict=True)),
        score=result.score,
        version=result.version,
        route=str(result.route.value),
        threshold=threshold,
        defaulted_features=result.defaulted_features,
        degraded_reasons=result.degraded_reasons,
        timings=timings,
    )
    return json.dumps(record, separators=(",", ":")).encode()
