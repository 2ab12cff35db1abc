"""The decision record: one record per scored request, written to Kafka off the hot path.

(The traffic log grown into the decision record: one path, one topic.) For each
sampled request (default: every one) the pipeline calls ``TrafficLog.offer`` with the
request, the answer, the exact assembled row and where its store values came from.
On the request path that costs a hash of the request id (sampling, skipped at 100%)
and a non-blocking append to the record sink; building and encoding the JSON
(feature sources, lineage, reasons) happen later on the sink's sender task. The
best-effort sink drops records when its buffer is full or Kafka is away (counted); the
durable sink (``traffic_log.delivery: durable``) spills them instead.

Sampling hashes the request id keyed by a server-side secret salt (``sample_salt``),
so a caller cannot choose ids that are always (or never) logged. With the same salt
every process, and a replay of the same ids, makes the same choice; without one,
each ``TrafficLog`` draws a random salt.

Record (``DECISION_SCHEMA``, one JSON object per Kafka message, key = request id)::

    {"schema": "streamscore.decision/1", "ts": <epoch s, float, when answered>,
     "request_id": "...",
     "request": {"model", "model_version", "request_id", "entity_ids", "features",
                 "event_time_ms"},                       # as the caller sent it
     "t_ms": <time the features were evaluated at>,
     "features": {"<name>": value, ...},                  # assembled row, model order
     "feature_sources": {"<name>": "request" | "default" | "snapshot:<group>/<id>"
                                   | "stream:<group>", ...},
     "freshness": [{"group", "entity", "age_ms"}, ...],   # stream groups read
     "score", "model", "version", "route", "threshold", "decision": <score >= threshold>,
     "artifact_sha256", "lineage": {"data_snapshot", "code_commit", "created_at",
                                    "algorithm", "explainer_sha256"},
     "reasons": null | [{"code", "text", "contribution",
                         "features": [{"name", "value", "contribution"}]}],
     "reasons_base_value",
     "defaulted_features": [...], "degraded_reasons": [...],
     "process": {"pid", "index"}, "latency_us": <pipeline time>,
     "timings": {"pipeline_us": ...}}

Records of the former ``streamscore.traffic/1`` schema (the same without the decision
fields) are still read by ``streamscore replay``. Non-finite feature values (features
whose manifest allows NaN) are written as the JSON extension ``NaN``, which Python's
``json`` reads back. The bytes come from :mod:`server.records.decision_json`; what a
version's records share (lineage, all-``request`` sources) is encoded once per version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt
import orjson
from prometheus_client import CollectorRegistry

from server.loop_metrics import LoopCounter, LoopCounterFamily
from server.records.decision_json import VersionParts, encode_record, lineage_json, reasons_json
from server.records.kafka_sink import RecordSink
from server.scoring_types import RowFeatures

if TYPE_CHECKING:
    from feature_streams.read_plan import FetchPlan, FetchRow
    from server.explain.reasons import Reason
    from server.lineage import Lineage
    from server.scoring_types import ScoreInput, ScoreResult

__all__ = [
    "DECISION_SCHEMA",
    "RECORD_SCHEMAS",
    "TRAFFIC_SCHEMA",
    "TrafficLog",
    "reasons_json",
    "traffic_record",
]

DECISION_SCHEMA = "streamscore.decision/1"
TRAFFIC_SCHEMA = "streamscore.traffic/1"
"""The former schema (no decision fields), still readable by replay."""
RECORD_SCHEMAS = frozenset({DECISION_SCHEMA, TRAFFIC_SCHEMA})
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
    feature_sources: Mapping[str, str] | None = None,
    freshness: Sequence[Mapping[str, Any]] = (),
    artifact_sha256: str = "",
    lineage: Lineage | None = None,
    reasons: Sequence[Reason] | None = None,
    reasons_base_value: float = 0.0,
    process: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """One decision record as a JSON-ready dict (the documented schema); the inputs are
    copied, so the record shares no mutable object with the caller."""
    return _record(
        ts=ts,
        model=model,
        model_version=model_version,
        request_id=request_id,
        entity_ids=dict(entity_ids),
        request_features=dict(request_features),
        event_time_ms=event_time_ms,
        t_ms=t_ms,
        features=dict(features),
        feature_sources=dict(feature_sources or {}),
        freshness=[dict(f) for f in freshness],
        score=score,
        version=version,
        route=route,
        threshold=threshold,
        artifact_sha256=artifact_sha256,
        lineage=lineage_json(lineage),
        reasons=None if reasons is None else reasons_json(reasons),
        reasons_base_value=reasons_base_value,
        defaulted_features=list(defaulted_features),
        degraded_reasons=list(degraded_reasons),
        process=dict(process or {}),
        timings=dict(timings or {}),
    )


def _record(
    *,
    ts: float,
    model: str,
    model_version: str | None,
    request_id: str,
    entity_ids: dict[str, str],
    request_features: dict[str, float],
    event_time_ms: int | None,
    t_ms: int,
    features: dict[str, float],
    feature_sources: Any,
    freshness: list[Any],
    score: float,
    version: str,
    route: str,
    threshold: float,
    artifact_sha256: str,
    lineage: Any,
    reasons: Any,
    reasons_base_value: float,
    defaulted_features: Sequence[str],
    degraded_reasons: Sequence[str],
    process: Mapping[str, int],
    timings: dict[str, int],
) -> dict[str, Any]:
    """The record's layout, the one place it is written: every value already JSON-ready
    (``lineage``, ``reasons`` and ``feature_sources`` in their JSON form), used as given."""
    return {
        "schema": DECISION_SCHEMA,
        "ts": ts,
        "request_id": request_id,
        "request": {
            "model": model,
            "model_version": model_version or None,
            "request_id": request_id,
            "entity_ids": entity_ids,
            "features": request_features,
            "event_time_ms": event_time_ms,
        },
        "t_ms": t_ms,
        "features": features,
        "feature_sources": feature_sources,
        "freshness": freshness,
        "score": score,
        "model": model,
        "version": version,
        "route": route,
        "threshold": threshold,
        "decision": score >= threshold,
        "artifact_sha256": artifact_sha256,
        "lineage": lineage,
        "reasons": reasons,
        "reasons_base_value": reasons_base_value,
        "defaulted_features": defaulted_features,
        "degraded_reasons": degraded_reasons,
        "process": process,
        "latency_us": timings.get("pipeline_us"),
        "timings": timings,
    }


def feature_sources(
    names: Sequence[str], fetched: FetchRow | None, plan: FetchPlan | None
) -> dict[str, str]:
    """Where each column's value came from: the plan's store sources, else ``request``
    (sent) or ``default``; every column ``request`` when there was no fetch row."""
    if fetched is None:
        return dict.fromkeys(names, "request")
    store = plan.sources(fetched) if plan is not None and plan.uses_store else {}
    sent = fetched.sent.tolist()  # python bools: numpy scalar access per column is slow
    return {
        name: store.get(name) or ("request" if was_sent else "default")
        for name, was_sent in zip(names, sent, strict=True)
    }


def _sources_value(
    parts: VersionParts, fetched: FetchRow | None, plan: FetchPlan | None
) -> dict[str, str] | orjson.Fragment:
    """The record's ``feature_sources`` (the version's shared encoded one when every
    value was sent)."""
    if fetched is None:
        return parts.all_request_sources
    # a list scan: numpy's all() has a few us of call overhead on a short row
    if not (plan is not None and plan.uses_store) and False not in fetched.sent.tolist():
        return parts.all_request_sources
    return feature_sources(parts.names, fetched, plan)


#: Versions whose shared record parts a ``TrafficLog`` keeps (a few are loaded at once).
_MAX_VERSIONS = 64


class TrafficLog:
    """Samples scored requests and hands their decision records to a ``RecordSink``."""

    def __init__(
        self,
        sink: RecordSink,
        topic: str,
        sample_rate: float,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        sample_salt: bytes | None = None,
        process_index: int = 0,
    ) -> None:
        """``sample_rate`` in [0, 1] (0 = off, 1 = every request); ``sample_salt`` keys the
        id hash (a secret; random when None; blake2b takes up to 64 bytes);
        ``process_index`` is this server process's index (recorded with its pid)."""
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        self._sink = sink
        self._topic = topic
        self.sample_rate = sample_rate
        self._cutoff = int(sample_rate * _HASH_SPACE)
        self._clock = clock
        self._salt = sample_salt[:64] if sample_salt else os.urandom(32)
        self._process = {"pid": os.getpid(), "index": process_index}
        #: Shared record parts per (model, version, sha256); built on the sender task.
        self._parts: dict[tuple[str, str, str], VersionParts] = {}
        #: Lock-free (the request path runs on the event loop): prometheus_client's
        #: counter takes a mutex per increment.
        self._sampled: LoopCounter | None = (
            LoopCounterFamily(
                "streamscore_traffic_log_sampled",
                "Scored requests sampled into the decision record (drops: record_sink_dropped).",
                (),
                registry,
            ).labels()
            if registry is not None
            else None
        )

    @property
    def topic(self) -> str:
        """The records topic."""
        return self._topic

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
        fetched: FetchRow | None = None,
        plan: FetchPlan | None = None,
        lineage: Callable[[], Lineage] | None = None,
    ) -> bool:
        """Record one answered request if sampled; ``True`` when a record was queued.

        ``names``/``row`` are the answering version's feature names and the exact
        ``[1, F]`` row its model saw; ``fetched``/``plan`` say where its values came
        from (None: every value was sent); ``lineage`` gives the version's lineage
        (called off the request path). Never blocks; never raises for a full buffer.
        """
        if not self.sampled(request.request_id):
            return False
        if self._sampled is not None:
            self._sampled.inc()
        encode = functools.partial(
            self._encode,
            _Pending(
                request,
                result,
                names,
                row,
                t_ms,
                threshold,
                timings,
                self._clock(),
                fetched,
                plan,
                lineage,
            ),
        )
        return self._sink.offer(self._topic, encode, request.request_id.encode())

    def _version_parts(self, pending: _Pending) -> VersionParts:
        """The answering version's shared parts (built once per version and manifest)."""
        result = pending.result
        key = (pending.request.model, result.version, result.artifact_sha256)
        parts = self._parts.get(key)
        if parts is None or parts.names is not pending.names:  # new, or the version reloaded
            if len(self._parts) >= _MAX_VERSIONS:
                self._parts.clear()
            lineage = None if pending.lineage is None else pending.lineage()
            parts = self._parts[key] = VersionParts.build(pending.names, lineage)
        return parts

    def _encode(self, pending: _Pending) -> bytes:
        """The record's JSON (on the sink's sender task): :func:`traffic_record`'s layout
        without its defensive copies (the request's mappings are copied only when they
        are not plain dicts), with the version's shared parts as fragments."""
        request, result = pending.request, pending.result
        parts = self._version_parts(pending)
        reasons = result.reasons
        record = _record(
            ts=pending.ts,
            model=request.model,
            model_version=request.model_version,
            request_id=request.request_id,
            entity_ids=_plain(request.entity_ids),
            request_features=_plain(request.features),
            event_time_ms=request.event_time_ms,
            t_ms=pending.t_ms,
            features=dict(zip(parts.names, pending.row.tolist()[0], strict=True)),
            feature_sources=_sources_value(parts, pending.fetched, pending.plan),
            freshness=[f._asdict() for f in result.freshness],
            score=result.score,
            version=result.version,
            route=result.route.value,
            threshold=pending.threshold,
            artifact_sha256=result.artifact_sha256,
            lineage=parts.lineage,
            reasons=None if reasons is None else reasons_json(reasons),
            reasons_base_value=result.reasons_base_value,
            defaulted_features=result.defaulted_features,
            degraded_reasons=result.degraded_reasons,
            process=self._process,
            timings=_plain(pending.timings),
        )
        return encode_record(record, parts)


def _plain(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` as a ``dict`` (itself when it is one: the encoders take only dicts;
    a v2 row's ``RowFeatures`` builds its own, without a lookup per name).

    Otherwise a comprehension: ``dict()`` of a protobuf map (a request's features) goes
    through the ``Mapping`` ABC's Python-level key iteration, ~30% slower for 30 entries."""
    if type(mapping) is dict:
        return mapping
    if type(mapping) is RowFeatures:
        return mapping.as_dict()
    return {k: mapping[k] for k in mapping}


class _Pending(NamedTuple):
    """What the sender task needs to build one record (no work done on the request path)."""

    request: ScoreInput
    result: ScoreResult
    names: Sequence[str]
    row: npt.NDArray[np.float32]
    t_ms: int
    threshold: float
    timings: Mapping[str, int]
    ts: float
    fetched: FetchRow | None
    plan: FetchPlan | None
    lineage: Callable[[], Lineage] | None
