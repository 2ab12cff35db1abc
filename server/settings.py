"""The server's settings schema: typed, frozen, loaded once at start.

Sources, later wins (the generic loader is ``server.config_loader``)::

    built-in defaults  <  YAML file  <  STREAMSCORE_* env vars  <  --set key.path=value

``STREAMSCORE_MODELS__DEFAULTS__MAX_BATCH_SIZE=32`` is ``models.defaults.max_batch_size``.
Every problem is reported in one :class:`SettingsError` naming the dotted key and
where the value came from, never the value itself (values may be secrets); the
cross-field checks here raise ``KeyedError`` to name every key involved.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from server.config_loader import Issue, KeyedError, load_layers
from server.config_loader import SettingsError as SettingsError
from server.manifest import MODEL_NAME_PATTERN

ENV_PREFIX = "STREAMSCORE_"
MiB = 1024 * 1024

ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
Execution = Literal["inline", "thread"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
#: Admin roles: viewer reads; deployer loads and routes; approver approves; admin all.
AdminRole = Literal["viewer", "deployer", "approver", "admin"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _version_text(value: Any) -> Any:
    """YAML reads ``3`` as an int; versions are names, so accept ints as their text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list | tuple):
        return [_version_text(item) for item in value]
    return value


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (traffic never leaves the machine)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class TLSSettings(_Frozen):
    """TLS on a listener: the server's certificate and key, and optionally the CA whose
    client certificates are required (mutual TLS). The files are re-read when they
    change (checked on each new connection) or on SIGHUP; open connections are kept."""

    cert_file: FilePath = Field(description="Server certificate chain (PEM).")
    key_file: FilePath = Field(description="Server private key (PEM).")
    client_ca_file: FilePath | None = Field(
        default=None,
        description="CA bundle (PEM) a client certificate must chain to; set = mutual TLS "
        "(a client without such a certificate fails the handshake); null = server-side TLS.",
    )


class AdminTLSSettings(TLSSettings):
    """Mutual TLS on the admin port: the server's certificate, and the CA whose client
    certificates are accepted. The client certificate's common name is the caller."""

    client_ca_file: FilePath = Field(
        description="CA bundle (PEM) a client certificate must chain to; one is required."
    )
    allowed_subjects: tuple[str, ...] = Field(
        default=(),
        description="Client certificate common names allowed to call; empty = every "
        "certificate the CA signed.",
    )
    subject_roles: dict[str, tuple[AdminRole, ...]] = Field(
        default_factory=dict,
        description="Admin roles by client certificate common name (viewer, deployer, "
        "approver, admin).",
    )
    default_roles: tuple[AdminRole, ...] = Field(
        default=("admin",),
        description="Roles of a certificate not in subject_roles (admin: as before roles).",
    )


class AdminToken(_Frozen):
    """A named admin bearer token with its roles."""

    token: SecretStr = Field(description="The bearer token (prefer an env var).")
    roles: tuple[AdminRole, ...] = Field(
        min_length=1, description="viewer, deployer, approver and/or admin."
    )


def _require_order(model: BaseModel, high: str, low: str, *, strict: bool) -> None:
    """Refuse ``model`` unless field ``high`` is >= (``strict``: >) field ``low``; the
    message names both keys."""
    upper, lower = getattr(model, high), getattr(model, low)
    if upper < lower or (strict and upper == lower):
        relation = ">" if strict else ">="
        raise KeyedError([(f"{high} must be {relation} {low}", ((high,), (low,)))])


class RestartSettings(_Frozen):
    """How the parent of ``processes > 1`` restarts a crashed server process."""

    backoff_initial_s: float = Field(
        default=0.5, gt=0.0, description="Delay before the first restart of a crashed process."
    )
    backoff_max_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Cap of the doubling delay: a crash loop restarts at most this often "
        "(each crash logged).",
    )
    stable_after_s: float = Field(
        default=60.0,
        gt=0.0,
        description="A process that ran this long before crashing restarts after the "
        "initial delay again.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> RestartSettings:
        _require_order(self, "backoff_max_s", "backoff_initial_s", strict=False)
        return self


class ConnectionSettings(_Frozen):
    """Bounds on every gRPC connection of the scoring and admin listeners."""

    max_concurrent_streams: int = Field(
        default=4096,
        ge=1,
        description="Calls in flight on one connection; more wait on the client (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS). A client that opens more than this before it has "
        "read the server's SETTINGS frame gets the excess refused (RST_STREAM REFUSED_STREAM "
        "-> UNAVAILABLE), so keep it well above any caller's burst; the work itself is "
        "bounded by each version's queue.",
    )
    keepalive_time_s: float = Field(
        default=60.0, gt=0.0, description="The server pings an idle-transport client this often."
    )
    keepalive_timeout_s: float = Field(
        default=20.0, gt=0.0, description="A ping unanswered this long closes the connection."
    )
    keepalive_min_ping_interval_s: float = Field(
        default=10.0,
        ge=0.0,
        description="Client pings closer than this are strikes; too many close the "
        "connection (GOAWAY too_many_pings).",
    )
    keepalive_permit_without_calls: bool = Field(
        default=True, description="Accept client pings on a connection with no call open."
    )
    max_connection_idle_s: float | None = Field(
        default=300.0, gt=0.0, description="A connection without calls this long is closed."
    )
    max_connection_age_s: float | None = Field(
        default=30.0,
        gt=0.0,
        description="A connection older than this (+-10% jitter) gets GOAWAY: the client "
        "reconnects and SO_REUSEPORT may put it on another process; null = never.",
    )
    max_connection_age_grace_s: float = Field(
        default=10.0,
        ge=0.0,
        description="After max_connection_age, how long calls still open may finish.",
    )
    http2_transport: Literal["chttp2", "promise"] = Field(
        default="chttp2",
        description="gRPC core's HTTP/2 server transport. 'chttp2': the stable one; past "
        "the pending-call limits it refuses with CANCELLED. 'promise': the promise-based "
        "transport (gRPC core experiment ph2_server, experimental in grpcio 1.85), whose "
        "pending-call refusal answers RESOURCE_EXHAUSTED ('Too many pending requests for "
        "this server'), so callers can tell overload from cancellation. gRPC reads its "
        "experiments once, at import: `streamscore serve` restarts itself in place (same "
        "PID) with GRPC_EXPERIMENTS set; other entry points must have it in the "
        "environment. What it was tested for, and its known gaps: README 'Connections'.",
    )
    pending_calls_soft_limit: int = Field(
        default=1000,
        ge=0,
        description="Calls received but not yet taken by a handler (the event loop is "
        "behind) past which gRPC core refuses new calls at once, at random with a chance "
        "rising to 1 at pending_calls_hard_limit (random early drop). The refusal happens "
        "in gRPC core, below Python, so it costs the loop nothing; the caller sees "
        "CANCELLED (gRPC core's status for it, not settable). gRPC's defaults: 1000 / 3000 "
        "(seconds of backlog for a loop-bound process; bench/RESULTS.md, overload).",
    )
    pending_calls_hard_limit: int = Field(
        default=3000,
        ge=1,
        description="Pending calls (see pending_calls_soft_limit) past which every new call "
        "is refused by gRPC core at once.",
    )

    @model_validator(mode="after")
    def _pending_ordered(self) -> ConnectionSettings:
        _require_order(self, "pending_calls_hard_limit", "pending_calls_soft_limit", strict=True)
        return self


class LimitsSettings(_Frozen):
    """Bounds on every request field (checked once at decode: INVALID_ARGUMENT naming the
    field and the limit), on stream answers held unsent, and on caller-set event times."""

    max_id_length: int = Field(
        default=256, ge=1, description="Characters of request_id and a v2 request id."
    )
    max_name_length: int = Field(
        default=128,
        ge=1,
        description="Characters of a model, version, feature, entity, v2 tensor or parameter name.",
    )
    max_entity_id_length: int = Field(
        default=256, ge=1, description="Characters of one entity id (a Redis key part)."
    )
    max_string_parameter_length: int = Field(
        default=1024, ge=1, description="Characters of a v2 string parameter value."
    )
    max_features: int = Field(default=1024, ge=1, description="Entries of ScoreRequest.features.")
    max_entity_ids: int = Field(default=32, ge=1, description="Entries of ScoreRequest.entity_ids.")
    max_v2_inputs: int = Field(default=16, ge=1, description="Entries of a v2 request's inputs.")
    max_v2_outputs: int = Field(
        default=64, ge=1, description="Entries of a v2 request's outputs (duplicates count)."
    )
    max_v2_parameters: int = Field(
        default=64, ge=1, description="Entries of one v2 parameters map (request or tensor)."
    )
    stream_max_in_flight: int = Field(
        default=256, ge=1, description="Items of one ScoreStream scored or unsent at once."
    )
    stream_buffer_bytes: int = Field(
        default=1 * MiB,
        ge=1,
        description="Serialized answers one ScoreStream holds unsent; past it the stream "
        "stops reading until the client takes answers (one answer always fits).",
    )
    event_time_skew_s: float = Field(
        default=300.0,
        gt=0.0,
        description="How far ScoreRequest.event_time may lie from the server clock (past or "
        "future); recorded times beyond it need the overrides permission.",
    )


class OverrideSettings(_Frozen):
    """Who holds ``features.allow_overrides`` on the scoring port: may send store (batch
    or stream) features, which then win over the store, and an ``event_time`` beyond
    ``limits.event_time_skew_s`` (replays of recorded traffic, tests)."""

    tokens: dict[ModelName, SecretStr] = Field(
        default_factory=dict,
        description="Override tokens by name; a call sends one as metadata "
        "'x-streamscore-override-token' (prefer env vars); refused at start on a plaintext "
        "non-loopback port.",
    )
    subjects: tuple[str, ...] = Field(
        default=(),
        description="mTLS client certificate common names (server.tls.client_ca_file) "
        "holding the permission.",
    )
    allow_all: bool = Field(
        default=False,
        description="Every caller holds the permission (a trusted network, benches): "
        "store features and event times are taken from anyone.",
    )


class ServerSettings(_Frozen):
    """The gRPC listener and process layout."""

    host: str = Field(default="127.0.0.1", min_length=1, description="Address to bind.")
    port: int = Field(
        default=50051, ge=0, le=65535, description="gRPC port; 0 = OS picks (processes=1 only)."
    )
    metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="Prometheus /metrics port; 0 disables."
    )
    processes: int = Field(
        default=1, ge=1, le=256, description="Server processes sharing the port (SO_REUSEPORT)."
    )
    grace_period_s: float = Field(
        default=10.0, ge=0.0, description="On SIGTERM, time in-flight calls get to finish."
    )
    max_receive_message_bytes: int = Field(
        default=4 * MiB, ge=1, description="Largest request message accepted."
    )
    max_send_message_bytes: int = Field(
        default=4 * MiB, ge=1, description="Largest response message sent."
    )
    admin_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve the admin API on this port only; null = on the gRPC port; "
        "0 = OS picks (processes=1 only).",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the admin API (actor 'admin'); prefer the env var "
        "STREAMSCORE_SERVER__ADMIN_TOKEN. No token at all = every admin call UNAUTHENTICATED.",
    )
    admin_tokens: dict[ModelName, SecretStr | AdminToken] = Field(
        default_factory=dict,
        description="More admin bearer tokens by name (the audit log's actor): "
        "{token: ..., roles: [...]}, or a bare token (role admin, as before roles).",
    )
    admin_tls: AdminTLSSettings | None = Field(
        default=None,
        description="Mutual TLS on admin_port (required with it): a client certificate "
        "from client_ca_file authenticates the caller instead of a bearer token.",
    )
    tls: TLSSettings | None = Field(
        default=None,
        description="TLS (mutual with client_ca_file) on the gRPC port; null = plaintext.",
    )
    allow_plaintext_admin_tokens: bool = Field(
        default=False,
        description="Accept admin bearer tokens on a plaintext listener bound to a "
        "non-loopback host (tokens readable on the network); default: refused at start.",
    )
    connections: ConnectionSettings = Field(
        default_factory=ConnectionSettings, description="Per-connection limits."
    )
    limits: LimitsSettings = Field(
        default_factory=LimitsSettings, description="Bounds on request fields and streams."
    )
    overrides: OverrideSettings = Field(
        default_factory=OverrideSettings,
        description="Who may send store features and recorded event times.",
    )
    uvloop: bool = Field(default=True, description="Run each process's event loop on uvloop.")
    memory_trim_interval_s: float | None = Field(
        default=10.0,
        gt=0.0,
        description="Hand free C-heap pages back to the kernel this often (glibc "
        "malloc_trim, off the event loop): RSS follows the working set after large or "
        "hostile requests; null = never.",
    )
    restarts: RestartSettings = Field(
        default_factory=RestartSettings,
        description="Restart of crashed server processes (processes > 1).",
    )

    @model_validator(mode="after")
    def _ephemeral_port_single_process(self) -> ServerSettings:
        issues: list[Issue] = []
        if self.port == 0 and self.processes > 1:
            issues.append(
                (
                    "port 0 (OS-chosen) cannot be shared by several processes",
                    (("port",), ("processes",)),
                )
            )
        if self.admin_port == 0 and self.processes > 1:
            issues.append(
                (
                    "admin_port 0 (OS-chosen) cannot be shared by several processes",
                    (("admin_port",), ("processes",)),
                )
            )
        if self.admin_port and self.admin_port == self.port:
            issues.append(
                (
                    "admin_port must differ from port (null = serve admin on port)",
                    (("admin_port",), ("port",)),
                )
            )
        if self.admin_tls is not None and self.admin_port is None:
            issues.append(
                (
                    "admin_tls needs its own admin_port (on the gRPC port, server.tls "
                    "protects the admin API and bearer tokens authenticate)",
                    (("admin_tls",), ("admin_port",)),
                )
            )
        if self.admin_tokens_in_plaintext() and not self.allow_plaintext_admin_tokens:
            listener = ("admin_port",) if self.admin_port is not None else ("tls",)
            issues.append(
                (
                    f"admin bearer tokens would cross the network in plaintext on "
                    f"{self.host}: set server.tls (or admin_tls with admin_port), bind a "
                    "loopback host, or set allow_plaintext_admin_tokens: true",
                    (listener, ("host",), ("allow_plaintext_admin_tokens",)),
                )
            )
        if self.override_tokens_in_plaintext():
            issues.append(
                (
                    f"override tokens would cross the network in plaintext on {self.host}: "
                    "set server.tls (mutual TLS can grant the permission by subjects "
                    "instead) or bind a loopback host",
                    (("overrides", "tokens"), ("tls",), ("host",)),
                )
            )
        if issues:
            raise KeyedError(issues)
        return self

    def override_tokens_in_plaintext(self) -> bool:
        """True when override tokens are configured and the scoring port is plaintext on a
        non-loopback host (a bearer secret readable on the network)."""
        return bool(self.overrides.tokens) and self.tls is None and not is_loopback_host(self.host)

    def admin_tokens_in_plaintext(self) -> bool:
        """True when bearer tokens are configured, the admin API's listener is plaintext and
        it is bound to a non-loopback host."""
        if not self.admin_credentials():
            return False
        plaintext = self.admin_tls is None if self.admin_port is not None else self.tls is None
        return plaintext and not is_loopback_host(self.host)

    def admin_credentials(self) -> dict[str, str]:
        """Admin bearer tokens by name (``admin`` for ``admin_token``)."""
        tokens = {
            name: (item.token if isinstance(item, AdminToken) else item).get_secret_value()
            for name, item in self.admin_tokens.items()
        }
        if self.admin_token is not None:
            tokens["admin"] = self.admin_token.get_secret_value()
        return tokens

    def admin_roles(self) -> dict[str, tuple[AdminRole, ...]]:
        """Roles of each admin token by name (a bare token and ``admin_token``: admin)."""
        roles: dict[str, tuple[AdminRole, ...]] = {
            name: item.roles if isinstance(item, AdminToken) else ("admin",)
            for name, item in self.admin_tokens.items()
        }
        if self.admin_token is not None:
            roles["admin"] = ("admin",)
        return roles


class ReasonsSettings(_Frozen):
    """When a model's answers carry reason codes (needs the version's explainer)."""

    when: Literal["always", "on_request", "above_threshold"] = Field(
        default="on_request",
        description="'always': every answer; 'on_request': when ScoreRequest.explain is "
        "set; 'above_threshold': answers with score >= threshold (flag / decline) and "
        "those that ask. Asking a version without an explainer is FAILED_PRECONDITION.",
    )
    top_n: int = Field(
        default=4, ge=1, le=64, description="Most reasons per answer (toward adverse)."
    )
    max_queue_size: int = Field(
        default=1024,
        ge=1,
        description="Calls waiting for their explanation per version (a v2 call asking "
        "for reasons is one, whatever its rows; rows waiting are bounded by max_queue_rows); "
        "past it RESOURCE_EXHAUSTED, a v2 call refused whole before it is scored.",
    )
    inline_max_ms: float = Field(
        default=2.0,
        ge=0,
        description="A lone caller's one-row explanation runs on the event loop at once "
        "(no thread hop, no batcher wake-up) while the version's scoring batcher sees a "
        "lone caller and a row's measured cost is at most this; otherwise, and at 0, "
        "explanations are batched off the loop.",
    )


class ModelServing(_Frozen):
    """How one model's versions are loaded and micro-batched."""

    max_batch_size: int = Field(
        default=64, ge=1, le=4096, description="Most requests run in one session.run."
    )
    max_queue_size: int = Field(
        default=1024, ge=1, description="Requests waiting per version; past it RESOURCE_EXHAUSTED."
    )
    max_queue_rows: int = Field(
        default=16384,
        ge=1,
        description="Rows waiting per version (a v2 request of N rows counts N); past it "
        "RESOURCE_EXHAUSTED.",
    )
    max_queue_delay_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description="How long the first queued request may wait for a fuller batch; "
        "0 = run whatever is queued as soon as the runtime is free.",
    )
    max_queue_wait_ms: float | None = Field(
        default=None,
        ge=0.0,
        description="Wait a new request may expect in the queue (the rest of the running "
        "batch plus the full batches ahead of its own, at the p90 of recent batch times); "
        "past it RESOURCE_EXHAUSTED at once, so accepted latency stays within it plus one "
        "batch under overload. Set it from the model's batch time: 1.5x the mean time of a "
        "full batch (streamscore_inference_seconds) kept accepted p99 at 2x load within "
        "1.5x the p99 at 0.8x; below ~1 p90 batch it starves batches, at 2 batches the "
        "accepted p99 was 3.6-4.3x (bench/RESULTS.md); 0 or null = off (only the size "
        "bounds apply). Per model, 0 switches off a budget set in defaults (a field left "
        "out inherits it).",
    )
    execution: Execution = Field(
        default="inline",
        description="'inline': session.run on the event-loop thread (no thread hop; the loop "
        "blocks for one batch, fine at one process per core). 'thread': session.run on a "
        "worker thread (ORT releases the GIL), so the loop keeps accepting and decoding "
        "during a batch. Inline is the default: for the demo tree models a batch costs "
        "less than the thread hand-off (bench/RESULTS.md).",
    )
    intra_op_threads: int = Field(
        default=1, ge=0, description="ORT threads inside one operator; 0 = ORT default (all cores)."
    )
    worker_nice: int = Field(
        default=0,
        ge=0,
        le=19,
        description="With execution 'thread' (Linux; refused with 'inline', which has no "
        "worker thread): the worker thread's nice value above "
        "the process's, so on a shared core the event loop that accepts and refuses calls "
        "is scheduled before session.run (ORT's own intra-op threads keep the process's). "
        "Off by default: when accepting calls alone saturates the core, a niced worker "
        "starves and throughput collapses (bench/RESULTS.md, Overload).",
    )
    inter_op_threads: int = Field(
        default=1, ge=0, description="ORT threads across operators; 0 = ORT default."
    )
    versions: tuple[ModelName, ...] | None = Field(
        default=None, description="Versions to load; None = every version found."
    )
    champion: ModelName | None = Field(
        default=None, description="Version answering unpinned calls; None = highest number."
    )
    feature_failure_policy: Literal["degrade", "fail"] | None = Field(
        default=None,
        description="Redis unreachable: 'degrade' (defaults, response flagged) or 'fail' "
        "(UNAVAILABLE); None = redis.failure_policy.",
    )
    reasons: ReasonsSettings = Field(
        default_factory=ReasonsSettings, description="Reason codes: when and how many."
    )

    @field_validator("versions", "champion", mode="before")
    @classmethod
    def _versions_as_text(cls, value: Any) -> Any:
        return _version_text(value)

    @property
    def max_queue_wait_s(self) -> float | None:
        """The queue-wait budget in seconds; ``None`` when off (0 or null)."""
        return self.max_queue_wait_ms / 1e3 if self.max_queue_wait_ms else None

    @model_validator(mode="after")
    def _consistent(self) -> ModelServing:
        issues: list[Issue] = []
        if self.max_batch_size > self.max_queue_size:
            issues.append(
                (
                    f"max_batch_size ({self.max_batch_size}) must not exceed "
                    f"max_queue_size ({self.max_queue_size})",
                    (("max_batch_size",), ("max_queue_size",)),
                )
            )
        if self.max_batch_size > self.max_queue_rows:
            issues.append(
                (
                    f"max_batch_size ({self.max_batch_size}) must not exceed "
                    f"max_queue_rows ({self.max_queue_rows})",
                    (("max_batch_size",), ("max_queue_rows",)),
                )
            )
        if self.worker_nice and self.execution != "thread":
            issues.append(
                (
                    f"worker_nice ({self.worker_nice}) needs execution 'thread' (execution is "
                    f"{self.execution!r}: there is no worker thread to nice); set worker_nice 0 "
                    "or execution 'thread'",
                    (("worker_nice",), ("execution",)),
                )
            )
        if self.versions is not None and not self.versions:
            issues.append(("must list at least one version, or be null for all", (("versions",),)))
        if (
            self.champion is not None
            and self.versions is not None
            and self.champion not in self.versions
        ):
            issues.append(
                (
                    f"champion {self.champion!r} is not among versions {list(self.versions)}",
                    (("champion",), ("versions",)),
                )
            )
        if issues:
            raise KeyedError(issues)
        return self


def _doc(field: str) -> str | None:
    return ModelServing.model_fields[field].description


class ModelServingOverrides(_Frozen):
    """Per-model subset of :class:`ModelServing`; only the fields given apply."""

    max_batch_size: int | None = Field(default=None, description=_doc("max_batch_size"))
    max_queue_size: int | None = Field(default=None, description=_doc("max_queue_size"))
    max_queue_rows: int | None = Field(default=None, description=_doc("max_queue_rows"))
    max_queue_delay_ms: float | None = Field(default=None, description=_doc("max_queue_delay_ms"))
    max_queue_wait_ms: float | None = Field(default=None, description=_doc("max_queue_wait_ms"))
    execution: Execution | None = Field(default=None, description=_doc("execution"))
    intra_op_threads: int | None = Field(default=None, description=_doc("intra_op_threads"))
    worker_nice: int | None = Field(default=None, description=_doc("worker_nice"))
    inter_op_threads: int | None = Field(default=None, description=_doc("inter_op_threads"))
    versions: tuple[ModelName, ...] | None = Field(default=None, description=_doc("versions"))
    champion: ModelName | None = Field(default=None, description=_doc("champion"))
    feature_failure_policy: Literal["degrade", "fail"] | None = Field(
        default=None, description=_doc("feature_failure_policy")
    )
    reasons: ReasonsSettings | None = Field(default=None, description=_doc("reasons"))

    @field_validator("versions", "champion", mode="before")
    @classmethod
    def _versions_as_text(cls, value: Any) -> Any:
        return _version_text(value)

    def apply_to(self, defaults: ModelServing) -> ModelServing:
        """``defaults`` with the fields set here replaced, re-validated."""
        given = self.model_dump(include=self.model_fields_set)
        return ModelServing.model_validate({**defaults.model_dump(), **given})


class ModelsSettings(_Frozen):
    """The model repository and how its models are served."""

    repository: Path = Field(
        default=Path("models"), description="Directory holding <name>/<version>/ folders."
    )
    defaults: ModelServing = Field(
        default_factory=ModelServing, description="Serving settings for every model."
    )
    per_model: dict[ModelName, ModelServingOverrides] = Field(
        default_factory=dict, description="Overrides by model name, any subset of fields."
    )

    @model_validator(mode="after")
    def _per_model_valid(self) -> ModelsSettings:
        issues: list[Issue] = []
        for name, overrides in self.per_model.items():
            try:
                overrides.apply_to(self.defaults)
            except ValidationError as exc:
                for error in exc.errors(include_url=False):
                    cause = error.get("ctx", {}).get("error")
                    if not isinstance(cause, KeyedError):
                        field = tuple(str(part) for part in error["loc"])
                        issues.append((error["msg"], (("per_model", name, *field),)))
                        continue
                    for message, keys in cause.issues:
                        where = [
                            ("per_model", name, *key)
                            if key[0] in overrides.model_fields_set
                            else ("defaults", *key)
                            for key in keys
                        ]
                        # the key shown first names the model: a per-model key leads
                        where.sort(key=lambda key: key[0] != "per_model")
                        issues.append((message, tuple(where)))
        if issues:
            raise KeyedError(issues)
        return self


class LoggingSettings(_Frozen):
    """Log level and format (see ``server.logs``)."""

    level: LogLevel = Field(default="INFO", description="Root log level.")
    json_format: bool = Field(
        default=True, alias="json", description="JSON lines on stderr; false = plain text."
    )

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class RedisSettings(_Frozen):
    """Connection to the feature store."""

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        pattern=r"^(redis|rediss|unix)://",
        description="redis://, rediss:// or unix:// URL (on a cluster: any node, the seed).",
    )
    mode: Literal["standalone", "cluster", "auto"] = Field(
        default="auto",
        description="'standalone' (one Redis), 'cluster' (Redis Cluster) or 'auto' "
        "(detected); a set mode that disagrees with the server exits 2 at start.",
    )
    pool_max_connections: int = Field(
        default=64, ge=1, description="Connections in this process's pool."
    )
    socket_timeout_s: float = Field(
        default=0.2,
        gt=0.0,
        description="Per-command socket timeout (the server raises it to "
        "features.fetch_timeout_s when that is longer).",
    )
    failure_policy: Literal["degrade", "fail"] = Field(
        default="degrade",
        description="Redis down: 'degrade' scores with default features and flags the "
        "response; 'fail' answers UNAVAILABLE.",
    )


class KafkaSettings(_Frozen):
    """The event stream the feature worker consumes."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", min_length=1, description="Comma-separated host:port list."
    )
    events_topic: str = Field(
        default="transactions", min_length=1, description="Topic of transaction events."
    )
    group_id: str = Field(
        default="streamscore-features", min_length=1, description="Consumer group of the workers."
    )
    fetch_max_wait_ms: int = Field(
        default=10, ge=0, description="Longest a fetch waits for data (latency vs batching)."
    )


class FeaturesSettings(_Frozen):
    """Where the feature definitions live."""

    definitions_path: Path | None = Field(
        default=None,
        description="The declarative feature definition file; null = no feature store "
        "(every model feature must be sent with the request).",
    )
    fetch_timeout_s: float = Field(
        default=0.05, gt=0.0, description="Budget of one micro-batch's Redis round trip."
    )
    retry_interval_s: float = Field(
        default=0.5,
        gt=0.0,
        description="How long the Redis circuit breaker stays open (answers served without "
        "Redis) before one micro-batch probes it again.",
    )
    breaker_failures: int = Field(
        default=5,
        ge=1,
        description="Failed micro-batch fetches (within breaker_window_s, no success between) "
        "that open the Redis circuit breaker; before that only the failed batch degrades.",
    )
    breaker_window_s: float = Field(
        default=1.0, gt=0.0, description="Window in which breaker_failures are counted."
    )
    snapshot_refresh_s: float = Field(
        default=0.5, gt=0.0, description="How often the active batch snapshots are re-read."
    )
    batch_cache_entries: int = Field(
        default=100_000,
        ge=0,
        description="Batch-snapshot rows (one entity of one group) kept in process by "
        "snapshot id, so repeated entities are not read again until the pointer flips; "
        "0 = none kept (every micro-batch reads its rows).",
    )
    batch_cache_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Estimated bytes the kept batch-snapshot rows may take (least recently "
        "used dropped first).",
    )
    tile_cache_entries: int = Field(
        default=100_000,
        ge=0,
        description="Stream tile hashes (one entity of one group) kept in process by their "
        "version field: for a kept hash the micro-batch's round trip reads only its version "
        "and Kafka offset fields, and a changed hash is read whole in a second round trip "
        "(standalone Redis; a cluster reads every hash). 0 = none kept. A stream worker of "
        "an older release (no version raise) still moves an offset with every apply, so "
        "mixed-release rollouts never serve a kept hash it changed.",
    )
    tile_cache_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=0,
        description="Estimated bytes the kept tile hashes may take (least recently used "
        "dropped first).",
    )


class GovernanceSettings(_Frozen):
    """Model governance: which models need an approved version to take traffic."""

    require_approval: dict[ModelName, bool] = Field(
        default_factory=dict,
        description="Per model: true = a version needs an approval before champion or canary "
        "traffic. A model not listed requires it when a manifest of it has a governance block.",
    )

    def required(self, model: str) -> bool | None:
        """The configured requirement of ``model`` (None = decided by its manifests)."""
        return self.require_approval.get(model)


class DriftThresholds(_Frozen):
    """When a monitored column of a model counts as drifted (per short window)."""

    psi: float = Field(
        default=0.2, gt=0.0, description="PSI above which a feature (or the score) drifted."
    )
    js: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Jensen-Shannon divergence (base 2) above which a categorical feature drifted.",
    )
    defaulted_share: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Share of answers with a feature served as its default above which it drifted.",
    )
    consecutive: int = Field(
        default=3,
        ge=1,
        description="Closed windows in a row over a threshold before one drift event is sent.",
    )
    min_rows: int = Field(
        default=100, ge=1, description="Rows a window needs before it is judged at all."
    )


class DriftSettings(_Frozen):
    """Drift monitoring of every served version against its reference profile."""

    enabled: bool = Field(
        default=True,
        description="Fold served features and scores into the reference bins (needs Redis "
        "and the version's reference_profile.json; without either, off for that version).",
    )
    bucket_s: int = Field(
        default=60, ge=1, le=3600, description="Width of one count bucket (windows are buckets)."
    )
    short_window_buckets: int = Field(
        default=5, ge=1, description="Buckets of the short window (gauges, breach checks)."
    )
    long_window_buckets: int = Field(
        default=60, ge=1, description="Buckets of the long window (ListModels, CLI)."
    )
    flush_interval_s: float = Field(
        default=1.0, gt=0.0, le=60.0, description="How often counts are folded and sent to Redis."
    )
    evaluate_interval_s: float = Field(
        default=5.0, gt=0.0, description="How often windows are read back, compared and exported."
    )
    grace_s: float = Field(
        default=3.0,
        ge=0.0,
        description="How long after a bucket closes it is judged, then read once and kept "
        "(late flushes land first): at least flush_interval_s, with a margin for the write.",
    )
    topic: str = Field(
        default="streamscore-drift", min_length=1, description="Kafka topic of drift events."
    )
    key_ttl_s: int = Field(
        default=2 * 24 * 3600, ge=60, description="Lifetime of the count buckets in Redis."
    )
    defaults: DriftThresholds = Field(
        default_factory=DriftThresholds, description="Thresholds of every model."
    )
    per_model: dict[ModelName, DriftThresholds] = Field(
        default_factory=dict, description="Thresholds of one model (replaces the defaults)."
    )

    @model_validator(mode="after")
    def _windows(self) -> DriftSettings:
        issues: list[Issue] = []
        if self.long_window_buckets < self.short_window_buckets:
            issues.append(
                (
                    f"long_window_buckets ({self.long_window_buckets}) must be >= "
                    f"short_window_buckets ({self.short_window_buckets})",
                    (("long_window_buckets",), ("short_window_buckets",)),
                )
            )
        if self.grace_s < self.flush_interval_s:
            # a bucket's last rows are flushed up to flush_interval_s after it closes; one
            # judged (read once, then kept) before that would miss them for good
            issues.append(
                (
                    f"grace_s ({self.grace_s:g}) must be >= flush_interval_s "
                    f"({self.flush_interval_s:g}): a bucket is read for good grace_s after it "
                    "closes, and its last flush may come flush_interval_s after",
                    (("grace_s",), ("flush_interval_s",)),
                )
            )
        if issues:
            raise KeyedError(issues)
        return self

    def thresholds(self, model: str) -> DriftThresholds:
        """Thresholds of ``model``."""
        return self.per_model.get(model, self.defaults)


class RoutingSettings(_Frozen):
    """Where the routing state (champion, canary, shadows) and its audit log persist."""

    store: Literal["auto", "redis", "file"] = Field(
        default="auto",
        description="'redis' (every process and replica shares it), 'file' (one machine), "
        "'auto' = redis when features.definitions_path is set, else file.",
    )
    redis_key: str = Field(
        default="streamscore:{routing}",
        min_length=1,
        description="Hash holding the state (shares a hash tag with audit_key on a cluster).",
    )
    audit_key: str = Field(
        default="streamscore:{routing}:audit",
        min_length=1,
        description="Stream holding the audit log (same Redis Cluster slot as redis_key).",
    )
    audit_max_len: int = Field(
        default=100_000, ge=100, description="Audit entries kept in Redis (approximately)."
    )
    file_path: Path | None = Field(
        default=None,
        description="File store's state file; null = <models.repository>/.routing.json "
        "(audit log and lock beside it).",
    )
    audit_max_bytes: int = Field(
        default=64 * MiB,
        ge=4096,
        description="File store: the audit log is rotated past this size (one previous "
        "generation kept, <stem>.audit.1.jsonl), so it holds at most about twice this.",
    )
    poll_interval_s: float = Field(
        default=0.2,
        gt=0.0,
        le=0.5,
        description="How often each process checks the state's revision (changes apply "
        "within about this long).",
    )
    canary_entity: ModelName = Field(
        default="card_id",
        description="Entity id whose stable hash makes the canary sticky; requests without "
        "it go to the champion.",
    )

    def state_file(self, repository: Path) -> Path:
        """The file store's path."""
        return self.file_path or repository / ".routing.json"


class ShadowSettings(_Frozen):
    """Shadow scoring. Which versions shadow an endpoint is routing state (admin API)."""

    records_topic: str | None = Field(
        default="streamscore-shadow",
        description="Kafka topic of shadow comparison records; null = metrics only.",
    )
    max_queue_size: int = Field(
        default=256, ge=1, description="Shadow requests waiting per shadow version; past it shed."
    )
    max_batch_size: int = Field(default=64, ge=1, le=4096, description="Rows per shadow run.")
    busy_queue_depth: int = Field(
        default=32,
        ge=1,
        description="Live requests waiting in the micro-batch queues from which shadows are "
        "shed (live traffic first).",
    )


class TrafficLogSettings(_Frozen):
    """The decision record: one record per scored request (features with their sources,
    version and lineage, score, decision, reasons) to Kafka, keyed by request id."""

    sample_rate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of requests recorded: 1 = every decision (default), 0 = off.",
    )
    topic: str = Field(
        default="streamscore.decisions", min_length=1, description="Kafka topic of the records."
    )
    delivery: Literal["best_effort", "durable"] = Field(
        default="best_effort",
        description="best_effort: the shared sink (drops when Kafka is away); durable: acks=all, "
        "spill to records.durable.spill_dir, drops only past the spill budget.",
    )
    sample_salt: SecretStr | None = Field(
        default=None,
        description="Secret keying the request-id sampling hash (same in every process for the "
        "same choice); null = random per process. Set it from env or a file, not argv.",
    )


class DurableRecordsSettings(_Frozen):
    """The durable sink (``traffic_log.delivery: durable``): memory and spill bounds."""

    spill_dir: Path | None = Field(
        default=None,
        description="Spill directory (one subdirectory per server process); required for "
        "durable delivery. Records left there are sent at the next start.",
    )
    max_buffered_bytes: int = Field(
        default=8 << 20, ge=1024, description="Record bytes held in memory; past it they spill."
    )
    spill_max_bytes: int = Field(
        default=1 << 30, ge=1 << 16, description="Spill budget; past it records are dropped."
    )
    spill_segment_bytes: int = Field(default=16 << 20, ge=1 << 12, description="Segment size.")
    max_request_size: int = Field(
        default=1 << 20,
        ge=1 << 12,
        description="The broker's largest request: bigger records are truncated or dropped.",
    )
    retry_interval_s: float = Field(
        default=1.0, gt=0.0, description="After a Kafka failure, how long until the next try."
    )
    partition_by: Literal["key", "round"] = Field(
        default="round",
        description="round: a send round's records share one partition (one record batch per "
        "round; a decision record's key, its request id, needs no order); key: each record in "
        "its key's partition (Kafka's default partitioner).",
    )


class RecordsSettings(_Frozen):
    """The bounded Kafka sink shadow records and the traffic log share (kafka.bootstrap_servers)."""

    max_buffered: int = Field(
        default=10_000, ge=1, description="Records held for Kafka; past it they are dropped."
    )
    retry_interval_s: float = Field(
        default=2.0, gt=0.0, description="After a Kafka failure, how long records are dropped."
    )
    durable: DurableRecordsSettings = Field(
        default_factory=DurableRecordsSettings,
        description="The durable sink (traffic_log.delivery: durable).",
    )


class Settings(_Frozen):
    """Everything the server reads at start; immutable afterwards."""

    server: ServerSettings = Field(default_factory=ServerSettings, description="gRPC listener.")
    models: ModelsSettings = Field(
        default_factory=ModelsSettings, description="Model repository and serving."
    )
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Feature store.")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Event stream.")
    features: FeaturesSettings = Field(
        default_factory=FeaturesSettings, description="Feature definitions."
    )
    routing: RoutingSettings = Field(
        default_factory=RoutingSettings, description="Routing state store."
    )
    governance: GovernanceSettings = Field(
        default_factory=GovernanceSettings, description="Approval gate."
    )
    shadow: ShadowSettings = Field(default_factory=ShadowSettings, description="Shadow scoring.")
    traffic_log: TrafficLogSettings = Field(
        default_factory=TrafficLogSettings, description="Traffic log."
    )
    records: RecordsSettings = Field(
        default_factory=RecordsSettings, description="Kafka sink of side records."
    )
    drift: DriftSettings = Field(
        default_factory=DriftSettings, description="Drift monitoring against reference profiles."
    )

    @model_validator(mode="after")
    def _durable_needs_a_spill_dir(self) -> Settings:
        if self.traffic_log.delivery == "durable" and self.records.durable.spill_dir is None:
            raise KeyedError(
                [
                    (
                        "traffic_log.delivery durable needs records.durable.spill_dir",
                        (("records", "durable", "spill_dir"), ("traffic_log", "delivery")),
                    )
                ]
            )
        return self

    def routing_store(self) -> Literal["redis", "file"]:
        """The routing store in use (``auto`` resolved)."""
        if self.routing.store == "auto":
            return "redis" if self.features.definitions_path is not None else "file"
        return self.routing.store

    def serving_for(self, model_name: str) -> ModelServing:
        """Serving settings of ``model_name``: its per-model overrides onto the defaults."""
        overrides = self.models.per_model.get(model_name)
        if overrides is None:
            return self.models.defaults
        return overrides.apply_to(self.models.defaults)


# --------------------------------------------------------------------------- loading


def load_settings(
    config_path: Path | None, env: Mapping[str, str], overrides: Sequence[str]
) -> Settings:
    """Build the settings from defaults < ``config_path`` < ``STREAMSCORE_*`` entries of
    ``env`` < ``overrides`` (``--set`` values, ``key.path=value``).

    Raises :class:`SettingsError` listing every bad key with its source.
    """
    return load_layers(Settings, config_path, env, overrides, env_prefix=ENV_PREFIX)
