"""The gRPC listeners' transport: channel arguments from the settings, plaintext or TLS ports.

Every bound of ``server.connections`` becomes a gRPC core channel argument of the
server: HTTP/2 ``max_concurrent_streams`` per connection, the keepalive policy
(server pings, and what client pings it tolerates), idle and age limits. The age
limit (GOAWAY after ``max_connection_age_s``, calls still open get the grace) makes a
long-lived client channel reconnect, and with ``server.processes > 1`` SO_REUSEPORT
hands the new connection to any process: see README "Every process busy". The
pending-call limits bound the calls gRPC core holds for a busy event loop: past them it
refuses new ones itself, the only refusal that costs the loop nothing: CANCELLED on the
default chttp2 transport, RESOURCE_EXHAUSTED on the promise-based one
(``http2_transport: promise``, a gRPC core experiment enabled through the environment
before gRPC is imported: :func:`experiments_to_enable`, :func:`restart_with_experiments`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, NoReturn

import grpc
from prometheus_client import CollectorRegistry, Counter

from server.settings import ConnectionSettings, ServerSettings, TLSSettings
from server.tls import ReloadingCertificates

_MS = 1000
#: The environment variable gRPC core reads its experiments from (once, at import).
EXPERIMENTS_VARIABLE = "GRPC_EXPERIMENTS"
#: gRPC core's experiment of the promise-based HTTP/2 server transport.
PROMISE_TRANSPORT_EXPERIMENT = "ph2_server"


def active_experiments(environ: Mapping[str, str]) -> frozenset[str]:
    """gRPC core experiments ``environ`` enables (``-name`` entries disable, so not listed)."""
    entries = (e.strip() for e in environ.get(EXPERIMENTS_VARIABLE, "").split(","))
    return frozenset(e for e in entries if e and not e.startswith("-"))


def experiments_to_enable(connections: ConnectionSettings, environ: Mapping[str, str]) -> list[str]:
    """Experiments ``connections`` needs that ``environ`` does not enable yet."""
    wanted = [PROMISE_TRANSPORT_EXPERIMENT] if connections.http2_transport == "promise" else []
    active = active_experiments(environ)
    return [name for name in wanted if name not in active]


def restart_with_experiments(
    missing: list[str], environ: MutableMapping[str, str] = os.environ
) -> NoReturn:
    """Replace this process (same PID, arguments and affinity) by one started with
    ``missing`` added to GRPC_EXPERIMENTS: gRPC has read the variable at import."""
    current = environ.get(EXPERIMENTS_VARIABLE, "")
    environ[EXPERIMENTS_VARIABLE] = ",".join(p for p in (current, *missing) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _ms(seconds: float) -> int:
    return max(1, round(seconds * _MS))


def server_options(server: ServerSettings) -> list[tuple[str, Any]]:
    """Channel arguments of a gRPC server from ``server`` (sizes, reuseport, connections)."""
    c = server.connections
    min_ping_ms = round(c.keepalive_min_ping_interval_s * _MS)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", server.max_receive_message_bytes),
        ("grpc.max_send_message_length", server.max_send_message_bytes),
        ("grpc.so_reuseport", 1 if server.processes > 1 else 0),
        ("grpc.max_concurrent_streams", c.max_concurrent_streams),
        ("grpc.keepalive_time_ms", _ms(c.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(c.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1 if c.keepalive_permit_without_calls else 0),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.server.max_pending_requests", c.pending_calls_soft_limit),
        ("grpc.server.max_pending_requests_hard_limit", c.pending_calls_hard_limit),
    ]
    if c.max_connection_idle_s is not None:
        options.append(("grpc.max_connection_idle_ms", _ms(c.max_connection_idle_s)))
    if c.max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", _ms(c.max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", _ms(c.max_connection_age_grace_s)))
    return options


class TLSReloadMetrics:
    """``streamscore_tls_reloads_total{listener, outcome}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._reloads = Counter(
            "streamscore_tls_reloads",
            "Certificate re-reads of a TLS listener, by outcome (ok: served to new "
            "connections; refused: unreadable or mismatched files, previous kept).",
            ("listener", "outcome"),
            registry=registry,
        )

    def observe(self, listener: str, ok: bool) -> None:
        """Count one reload attempt."""
        self._reloads.labels(listener, "ok" if ok else "refused").inc()


def bind(
    server: grpc.aio.Server,
    address: str,
    tls: TLSSettings | None,
    *,
    listener: str,
    metrics: TLSReloadMetrics,
) -> tuple[int, ReloadingCertificates | None]:
    """Bind ``address`` plaintext or with reloading TLS; the port (0 = failed) and certs."""
    if tls is None:
        return server.add_insecure_port(address), None
    certificates = ReloadingCertificates(tls, listener=listener, on_reload=metrics.observe)
    return server.add_secure_port(address, certificates.credentials()), certificates
