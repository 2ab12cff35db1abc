"""``streamscore models list|load|unload|route|promote|rollback|approve|revoke|audit|drift``:
the admin API client (``drift NAME``: ListModels' drift of each loaded version).

The target is ``--target`` or the configured ``server.host`` and admin port (the
gRPC port unless ``server.admin_port`` is set); the bearer token is the
configured ``server.admin_token`` (set ``STREAMSCORE_SERVER__ADMIN_TOKEN``), sent
only over TLS (``--tls-ca``: the server's CA, for a port with ``server.tls``), to a
loopback target, or with ``--insecure``. Against an admin port with mutual TLS,
``--tls-cert/--tls-key`` (the client certificate, whose common name is the actor)
replace the token.
``route`` reads the endpoint's routing, changes only what its flags name, and
writes it back with ``expected_revision``, so a concurrent change is refused
(ABORTED) rather than overwritten.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message

from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from server.clients.channels import (
    ChannelSetupError,
    add_tls_arguments,
    check_token_transport,
    sync_channel,
    tls_from_args,
)
from server.router import BASIS_POINTS
from server.routing.approval import NOT_APPROVED
from server.settings import Settings, SettingsError

ADMIN_COMMANDS = (
    "list",
    "load",
    "unload",
    "route",
    "promote",
    "rollback",
    "approve",
    "revoke",
    "audit",
    "drift",
)

AddConfigArgs = Callable[[argparse.ArgumentParser], None]


def add_admin_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], add_config_args: AddConfigArgs
) -> None:
    """Add the admin subcommands to the ``models`` command group."""

    def command(name: str, help_text: str, *, reason: bool = True) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        add_config_args(parser)
        parser.add_argument("--target", help="host:port of the admin API (default: from config)")
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
        parser.add_argument("--json", action="store_true", help="print the answer as JSON")
        add_tls_arguments(parser, token=True)
        if reason:
            parser.add_argument("--reason", required=True, help="why (recorded in the audit log)")
        return parser

    listing = command("list", "list endpoints, versions, state and routing", reason=False)
    listing.add_argument("endpoint", nargs="?", default="")
    for name, help_text in (
        ("load", "load a version"),
        ("unload", "unload a version"),
        ("approve", "approve a version as its artifact and validation report are now"),
        ("revoke", "withdraw a version's approval"),
    ):
        parser = command(name, help_text)
        parser.add_argument("endpoint")
        parser.add_argument("version")
    route = command("route", "change an endpoint's champion, canary, shadows, rollout policy")
    route.add_argument("endpoint")
    route.add_argument("--champion", help="new champion version")
    route.add_argument("--canary", help="canary version")
    share = route.add_mutually_exclusive_group()
    share.add_argument("--share", type=float, help="canary share in percent (0-100)")
    share.add_argument("--share-bp", type=int, help="canary share in basis points (0-10000)")
    route.add_argument("--salt", help="hash salt of a new rollout (default: kept or random)")
    route.add_argument("--entity", help="entity id the canary hash is keyed on")
    route.add_argument("--no-canary", action="store_true", help="remove the canary")
    route.add_argument("--shadow", action="append", help="shadow version; repeatable")
    route.add_argument("--no-shadows", action="store_true", help="remove every shadow")
    route.add_argument("--rollout-json", help="rollout policy (JSON object; '' removes it)")
    for name, help_text in (
        ("promote", "make the canary the champion"),
        ("rollback", "make the previous champion the champion again"),
    ):
        command(name, help_text).add_argument("endpoint")
    drift = command("drift", "drift of each served version vs its reference", reason=False)
    drift.add_argument("endpoint")
    audit = command("audit", "show the audit log, newest first", reason=False)
    audit.add_argument("endpoint", nargs="?", default="")
    audit.add_argument("--limit", type=int, default=20)


def run_admin_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run one admin subcommand; 0 on success, 1 when the server refused."""
    server = settings.server
    target = args.target or f"{server.host}:{server.admin_port or server.port}"
    channel, metadata = _connect(args, settings, target)
    with channel:
        stub = apb_grpc.AdminStub(channel)

        def call(method: Callable[..., Any], request: Message) -> Any:
            result: Message = method(request, metadata=metadata, timeout=args.timeout)
            return result

        try:
            answer = _dispatch(args, stub, call)
        except grpc.RpcError as error:
            code = error.code().name if isinstance(error, grpc.Call) else "ERROR"
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            sys.stderr.write(f"streamscore: {code}: {details}\n")
            return 1
    if args.json:
        sys.stdout.write(MessageToJson(answer, preserving_proto_field_name=True) + "\n")
    elif isinstance(answer, apb.ListModelsResponse) and args.models_command == "drift":
        sys.stdout.write(format_drift(answer))
    elif isinstance(answer, apb.ListModelsResponse):
        sys.stdout.write(format_models(answer))
    elif isinstance(answer, apb.ListAuditResponse):
        sys.stdout.write(format_audit(answer))
    else:
        sys.stdout.write(format_models(apb.ListModelsResponse(models=[answer.model])))
    return 0


def _connect(
    args: argparse.Namespace, settings: Settings, target: str
) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    """A channel to the admin API and the metadata every call carries."""
    try:
        tls = tls_from_args(args)
        if tls is not None and tls.cert_file is not None:  # the certificate authenticates
            return sync_channel(target, tls), ()
        token = settings.server.admin_token
        if token is None:
            raise SettingsError(
                [
                    "server.admin_token: required to call the admin API "
                    "(STREAMSCORE_SERVER__ADMIN_TOKEN), or --tls-ca/--tls-cert/--tls-key"
                ]
            )
        check_token_transport(target, tls, insecure=args.insecure)
    except ChannelSetupError as exc:
        raise SettingsError([str(exc)]) from None
    metadata = (("authorization", f"Bearer {token.get_secret_value()}"),)
    return sync_channel(target, tls), metadata


def _dispatch(
    args: argparse.Namespace,
    stub: apb_grpc.AdminStub,
    call: Callable[[Callable[..., Any], Message], Any],
) -> Any:
    command = args.models_command
    if command in ("list", "drift"):
        return call(stub.ListModels, apb.ListModelsRequest(endpoint=args.endpoint))
    if command == "audit":
        request = apb.ListAuditRequest(endpoint=args.endpoint, limit=args.limit)
        return call(stub.ListAudit, request)
    if command == "load":
        request_load = apb.LoadVersionRequest(
            endpoint=args.endpoint, version=args.version, reason=args.reason
        )
        return call(stub.LoadVersion, request_load)
    if command == "unload":
        request_unload = apb.UnloadVersionRequest(
            endpoint=args.endpoint, version=args.version, reason=args.reason
        )
        return call(stub.UnloadVersion, request_unload)
    if command == "approve":
        request_approve = apb.ApproveRequest(
            endpoint=args.endpoint, version=args.version, reason=args.reason
        )
        return call(stub.Approve, request_approve)
    if command == "revoke":
        request_revoke = apb.RevokeRequest(
            endpoint=args.endpoint, version=args.version, reason=args.reason
        )
        return call(stub.Revoke, request_revoke)
    if command == "promote":
        return call(stub.Promote, apb.PromoteRequest(endpoint=args.endpoint, reason=args.reason))
    if command == "rollback":
        return call(stub.Rollback, apb.RollbackRequest(endpoint=args.endpoint, reason=args.reason))
    listed = call(stub.ListModels, apb.ListModelsRequest(endpoint=args.endpoint))
    state = listed.models[0].state
    request_route = apb.SetRoutingRequest(
        endpoint=args.endpoint,
        routing=route_from_args(args, state.routing),
        reason=args.reason,
        expected_revision=state.revision,
    )
    return call(stub.SetRouting, request_route)


def route_from_args(args: argparse.Namespace, current: apb.Routing) -> apb.Routing:
    """``current`` with what the ``route`` flags change."""
    share_bp: int | None = args.share_bp
    if args.share is not None:
        share_bp = round(args.share * BASIS_POINTS / 100)
    # Changing the canary by hand ends a guarded rollout (only its controller moves it).
    canary_changed = (
        args.no_canary
        or (args.canary is not None and args.canary != current.canary.version)
        or (share_bp is not None and share_bp != current.canary.share_bp)
    )
    routing = apb.Routing(
        champion=args.champion or "",
        shadows=current.shadows,
        rollout_json="" if canary_changed else current.rollout_json,
    )
    if args.no_canary:
        pass
    elif args.canary or share_bp is not None or args.salt or args.entity:
        version = args.canary or current.canary.version
        if not version:
            raise SettingsError(["--canary: required (the endpoint has no canary yet)"])
        same = current.HasField("canary") and version == current.canary.version
        routing.canary.CopyFrom(
            apb.Canary(
                version=version,
                share_bp=share_bp if share_bp is not None else current.canary.share_bp,
                salt=args.salt or "",
                entity=args.entity or (current.canary.entity if same else ""),
            )
        )
    elif current.HasField("canary"):
        routing.canary.CopyFrom(current.canary)
    if args.no_shadows:
        del routing.shadows[:]
    elif args.shadow:
        del routing.shadows[:]
        routing.shadows.extend(args.shadow)
    if args.rollout_json is not None:
        routing.rollout_json = args.rollout_json
    return routing


def _when(stamp: Any) -> str:
    return datetime.fromtimestamp(stamp.ToNanoseconds() / 1e9, UTC).isoformat(timespec="seconds")


def format_models(response: apb.ListModelsResponse) -> str:
    """Human-readable endpoints, routing and versions."""
    lines = []
    for model in response.models:
        state = model.state
        routing = state.routing
        if model.HasField("state"):
            canary = (
                f"{routing.canary.version} at {routing.canary.share_bp / 100:.2f}%"
                if routing.HasField("canary")
                else "-"
            )
            lines.append(
                f"{model.endpoint}  champion {routing.champion}  canary {canary}  "
                f"shadows {','.join(routing.shadows) or '-'}  "
                f"previous {state.previous_champion or '-'}  revision {state.revision} "
                f"({_when(state.updated_at)} by {state.updated_by})"
            )
        elif model.versions and all(v.error.startswith(NOT_APPROVED) for v in model.versions):
            lines.append(f"{model.endpoint}  (not served: no approved version)")
        else:
            lines.append(f"{model.endpoint}  (not served)")
        for version in model.versions:
            status = apb.VersionStatus.Name(version.status).removeprefix("VERSION_STATUS_")
            roles = ",".join(version.roles)
            error = f"  {version.error}" if version.error else ""
            approval = "" if version.error else _approval_text(version.approval)
            lines.append(f"  {version.version:<12} {status.lower():<10} {roles}{error}{approval}")
    return "\n".join(lines) + "\n"


def _approval_text(approval: apb.VersionApproval) -> str:
    if approval.problem and approval.required:  # routed before it lost its approval
        return f"  answering without a valid approval (no more share): {approval.problem}"
    if approval.approved_by and not approval.problem:
        return f"  approved by {approval.approved_by} ({_when(approval.approved_at)})"
    return ""


def format_audit(response: apb.ListAuditResponse) -> str:
    """Human-readable audit entries."""
    lines = []
    for entry in response.entries:
        before = entry.before.routing.champion if entry.HasField("before") else "-"
        after = entry.after.routing.champion if entry.HasField("after") else "-"
        outcome = entry.outcome if not entry.error else f"{entry.outcome} ({entry.error})"
        lines.append(
            f"{_when(entry.time)}  {entry.endpoint}  {entry.action}  by {entry.actor} "
            f"[{entry.peer}]  champion {before} -> {after}  {outcome}  {entry.reason!r}"
        )
    return "\n".join(lines) + ("\n" if lines else "")


def format_drift(response: apb.ListModelsResponse) -> str:
    """Per served version: both windows' score PSI and every feature's PSI/JS/defaulted."""
    lines = []
    for model in response.models:
        for version in model.versions:
            drift = version.drift
            if not drift.monitored:
                lines.append(f"{model.endpoint}/{version.version}  not monitored here")
                continue
            breaching = ",".join(drift.breaching) or "-"
            lines.append(f"{model.endpoint}/{version.version}  breaching {breaching}")
            short, long = drift.short_window, drift.long_window
            lines.append(
                f"  score psi  {short.score_psi:8.4f} ({short.window_s}s, {short.rows} rows)"
                f"  {long.score_psi:8.4f} ({long.window_s}s, {long.rows} rows)"
            )
            lines.append(f"  {'feature':<24} {'psi':>8} {'psi long':>9} {'js':>8} {'defaulted':>9}")
            long_psi = {f.feature: f.psi for f in long.features}
            for feature in short.features:
                js = f"{feature.js:8.4f}" if feature.HasField("js") else f"{'-':>8}"
                lines.append(
                    f"  {feature.feature:<24} {feature.psi:8.4f} "
                    f"{long_psi.get(feature.feature, 0.0):9.4f} {js} {feature.defaulted_share:9.2%}"
                )
    return "\n".join(lines) + "\n"
