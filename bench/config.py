"""Configuration and result of one load-generator run (frozen, JSON-serialisable).

JSON result keys (``LoadResult.to_json``; ``RESULT_KEYS`` lists them):

- ``schema``: format id, ``"streamscore.bench.load/1"``.
- ``config``: every ``LoadConfig`` field, enough to rerun the same load.
- ``payload``: resolved ``features``, ``input_name`` and ``source`` (manifest path or "demo").
- ``mode``: ``"closed"`` (``concurrency`` callers) or ``"open"`` (fixed ``rate`` schedule).
- ``started_at``: UTC ISO time the measurement window opened.
- ``duration_s``: length of the measurement window (warmup excluded).
- ``sent``/``ok``: requests started (closed loop) or scheduled (open loop) in the window /
  of those, answered OK. Latencies describe exactly these ``ok`` requests.
- ``window_ok``: OK responses that arrived inside the window, whenever they were sent.
- ``errors``: failures by gRPC status code name; for streams also per-item ``error.code``,
  ``DEADLINE_EXCEEDED`` from the client-side per-item deadline and ``STREAM_ENDED`` for items
  left unanswered when a stream closed.
- ``late``: open loop, requests sent more than ``late_threshold_ms`` after their intended time.
- ``skipped``: open loop, requests scheduled in the window but never sent because
  ``max_outstanding`` stayed full until the end (these are the worst latencies: read them).
- ``unfinished``: requests still in flight when the drain timeout expired (cancelled).
- ``throughput_rps``: ``window_ok / duration_s`` (an overloaded open loop that fell behind
  its schedule sends mostly warmup-scheduled requests in the window: ``ok`` is then small
  while throughput stays true); ``rows_per_s`` multiplies by ``v2_rows`` for ``v2``.
- ``latency_us``: ``{count, min, mean, p50, p90, p99, p99.9, max}`` of OK responses; in open
  loop measured from the INTENDED send time, so client-side queueing is included.
- ``service_latency_us``: same, measured from the actual send (equals ``latency_us`` in closed
  loop).
- ``send_lag_us``: open loop, actual minus intended send time of every sent request; ``null`` in
  closed loop.
- ``latency_hdr``: base64 HdrHistogram of ``latency_us`` (merge runs with ``hdrh``).
- ``environment``: python/grpc versions, event loop, CPU affinity, host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.payloads import DEFAULT_ENTITIES, PayloadSpec
from server.clients.channels import ClientTLS
from server.clients.histogram import LatencySummary

Api = Literal["score", "stream", "v2"]
APIS: tuple[Api, ...] = ("score", "stream", "v2")
SCHEMA = "streamscore.bench.load/1"

RESULT_KEYS: tuple[str, ...] = (
    "schema",
    "config",
    "payload",
    "mode",
    "started_at",
    "duration_s",
    "sent",
    "ok",
    "window_ok",
    "errors",
    "late",
    "skipped",
    "unfinished",
    "throughput_rps",
    "rows_per_s",
    "latency_us",
    "service_latency_us",
    "send_lag_us",
    "latency_hdr",
    "environment",
)


@dataclass(frozen=True)
class LoadConfig:
    """One load run. ``rate`` set means open loop, otherwise closed loop."""

    target: str = "127.0.0.1:50051"
    #: ``score`` (unary Score), ``stream`` (ScoreStream) or ``v2`` (ModelInfer).
    api: Api = "score"
    model: str = "fraud"
    #: Pin a version; empty lets the server's router choose.
    model_version: str = ""
    #: Closed loop: number of callers, each with one request (or ``stream_window``) in flight.
    concurrency: int = 1
    #: Open loop: requests per second on a fixed schedule; ``None`` for closed loop.
    rate: float | None = None
    #: Open loop: cap on requests in flight; when full, sends wait and become late.
    max_outstanding: int = 1000
    duration_s: float = 10.0
    warmup_s: float = 2.0
    #: gRPC channels (TCP connections); requests/callers are spread round-robin over them.
    connections: int = 1
    #: ``stream``: requests in flight per stream (closed loop; open loop is bounded globally).
    stream_window: int = 1
    #: ``v2``: rows per ModelInfer request.
    v2_rows: int = 1
    #: ``v2``: send the tensor as ``raw_input_contents`` instead of ``fp32_contents``.
    v2_raw: bool = False
    #: Per-request deadline; ``None`` for none. Streams apply it per item on the client.
    deadline_ms: float | None = None
    #: ``manifest.json`` (or its version directory) giving the features; demo features if None.
    manifest: str | None = None
    #: ``score``/``stream``: features to send (default: all features of the payload spec).
    request_features: tuple[str, ...] | None = None
    entities: tuple[str, ...] = DEFAULT_ENTITIES
    #: Distinct ids per entity in the request pool.
    entity_cardinality: int = 10_000
    #: Pre-generated requests, reused cyclically.
    pool_size: int = 4096
    seed: int = 0
    #: After the window ends, how long in-flight requests may still finish.
    drain_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0
    #: Open loop: a send later than this after its intended time counts as ``late``.
    late_threshold_ms: float = 2.0
    #: TLS: the CA that signed the server (PEM path); None = plaintext.
    tls_ca: str | None = None
    #: Mutual TLS: client certificate chain and key (PEM paths).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.api in APIS, f"api must be one of {APIS}, got {self.api!r}"),
            (self.concurrency >= 1, "concurrency must be >= 1"),
            (self.rate is None or self.rate > 0, "rate must be > 0"),
            (self.max_outstanding >= 1, "max_outstanding must be >= 1"),
            (self.duration_s > 0, "duration_s must be > 0"),
            (self.warmup_s >= 0, "warmup_s must be >= 0"),
            (self.connections >= 1, "connections must be >= 1"),
            (self.stream_window >= 1, "stream_window must be >= 1"),
            (self.v2_rows >= 1, "v2_rows must be >= 1"),
            (self.deadline_ms is None or self.deadline_ms > 0, "deadline_ms must be > 0"),
            (self.entity_cardinality >= 1, "entity_cardinality must be >= 1"),
            (self.pool_size >= 1, "pool_size must be >= 1"),
            (self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0"),
            (self.connect_timeout_s > 0, "connect_timeout_s must be > 0"),
            (self.late_threshold_ms >= 0, "late_threshold_ms must be >= 0"),
            ((self.tls_cert is None) == (self.tls_key is None), "tls_cert/tls_key: both or none"),
            (self.tls_ca is not None or self.tls_cert is None, "tls_cert needs tls_ca"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def client_tls(self) -> ClientTLS | None:
        """The client TLS files, None for plaintext."""
        if self.tls_ca is None:
            return None
        return ClientTLS(
            Path(self.tls_ca),
            None if self.tls_cert is None else Path(self.tls_cert),
            None if self.tls_key is None else Path(self.tls_key),
            self.tls_server_name,
        )

    @property
    def mode(self) -> Literal["closed", "open"]:
        """``open`` when a rate is set, else ``closed``."""
        return "closed" if self.rate is None else "open"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoadConfig:
        """Inverse of ``to_json`` (e.g. a result's ``config``, to rerun the same load)."""
        fields: dict[str, Any] = {
            key: tuple(value) if isinstance(value, list) else value for key, value in data.items()
        }
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        """All fields as plain JSON values."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


@dataclass(frozen=True)
class LoadResult:
    """Measured outcome of a run; see the module docstring for the meaning of each field."""

    config: LoadConfig
    payload: PayloadSpec
    started_at: str
    duration_s: float
    sent: int
    ok: int
    window_ok: int
    errors: Mapping[str, int]
    late: int
    skipped: int
    unfinished: int
    latency: LatencySummary
    service_latency: LatencySummary
    send_lag: LatencySummary | None
    latency_hdr: str
    environment: Mapping[str, Any] = field(default_factory=dict)

    @property
    def throughput_rps(self) -> float:
        """OK responses that arrived in the measurement window, per second."""
        return self.window_ok / self.duration_s

    @property
    def rows_per_s(self) -> float:
        """Scored rows per second (``v2_rows`` per request for ``v2``, else 1)."""
        rows = self.config.v2_rows if self.config.api == "v2" else 1
        return self.throughput_rps * rows

    @property
    def error_count(self) -> int:
        """Total failed requests."""
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        """The documented JSON document (keys in ``RESULT_KEYS`` order)."""
        return {
            "schema": SCHEMA,
            "config": self.config.to_json(),
            "payload": {
                "features": list(self.payload.features),
                "input_name": self.payload.input_name,
                "source": self.payload.source,
            },
            "mode": self.config.mode,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "sent": self.sent,
            "ok": self.ok,
            "window_ok": self.window_ok,
            "errors": dict(sorted(self.errors.items())),
            "late": self.late,
            "skipped": self.skipped,
            "unfinished": self.unfinished,
            "throughput_rps": round(self.throughput_rps, 2),
            "rows_per_s": round(self.rows_per_s, 2),
            "latency_us": self.latency.to_json(),
            "service_latency_us": self.service_latency.to_json(),
            "send_lag_us": None if self.send_lag is None else self.send_lag.to_json(),
            "latency_hdr": self.latency_hdr,
            "environment": dict(self.environment),
        }
