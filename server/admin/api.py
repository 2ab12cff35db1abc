"""``streamscore.v1.Admin``: authenticate, decode, call the routing changes, encode.

Every method first checks the caller's credentials and then its role for that
method (``server.admin.auth``; a call refused for its role is audit-logged); the
scoring data plane has no path into here. Domain errors become their gRPC
status with the message naming the problem (``server.grpc_status``); anything else
is logged, INTERNAL.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from server.admin.auth import Authenticator, PermissionDenied, authorize
from server.drift.views import VersionView as DriftView
from server.drift.views import WindowView
from server.governance.profile import SCORE
from server.grpc_status import abort
from server.lineage import Lineage
from server.routing.changes import Actor, ApprovalView, ModelView, RoutingChanges
from server.routing.state import AuditEntry, CanaryRequest, EndpointState

#: The drift view of a served version (None: not monitored here).
DriftLookup = Callable[[str, str], DriftView | None]

SERVICE_NAME = apb.DESCRIPTOR.services_by_name["Admin"].full_name
DEFAULT_AUDIT_LIMIT = 100

_STATUS = {
    "loaded": apb.VERSION_STATUS_LOADED,
    "pending": apb.VERSION_STATUS_PENDING,
    "failed": apb.VERSION_STATUS_FAILED,
    "available": apb.VERSION_STATUS_AVAILABLE,
}

Context = grpc.aio.ServicerContext[object, object]
T = TypeVar("T")


class AdminService(apb_grpc.AdminServicer):
    """The admin servicer over one process's ``RoutingChanges``."""

    def __init__(
        self,
        changes: RoutingChanges,
        authenticator: Authenticator,
        drift: DriftLookup | None = None,
    ) -> None:
        self._changes = changes
        self._auth = authenticator
        self._drift = drift

    async def _call(
        self,
        context: Context,
        method: str,
        work: Callable[[Actor], Awaitable[T]],
        endpoint: str = "",
        reason: str = "",
    ) -> T:
        """Authenticate, check the role ``method`` needs, run ``work``; turn failures into
        the gRPC status (abort raises)."""
        try:
            principal = self._auth.authenticate(context)  # type: ignore[arg-type]
            actor = Actor(principal.name, context.peer() or "")
            try:
                authorize(principal, method)
            except PermissionDenied as denied:
                await self._changes.audit_refusal(endpoint, method, actor, reason, denied)
                raise
            return await work(actor)
        except Exception as error:
            await abort(context, error, "the admin API")

    async def _changed(self, endpoint: str) -> apb.ChangeResponse:
        state, views = await self._changes.list_models(endpoint)
        return apb.ChangeResponse(model=encode_model(views[0]), revision=state.revision)

    async def ListModels(
        self, request: apb.ListModelsRequest, context: Context
    ) -> apb.ListModelsResponse:
        async def work(actor: Actor) -> apb.ListModelsResponse:
            state, views = await self._changes.list_models(request.endpoint or None)
            models = [encode_model(v) for v in views]
            if self._drift is not None:
                for model in models:
                    for version in model.versions:
                        drift = self._drift(model.endpoint, version.version)
                        if drift is not None:
                            version.drift.CopyFrom(encode_drift(drift))
            return apb.ListModelsResponse(
                models=models,
                revision=state.revision,
                applied_revision=self._changes.sync.state.revision,
            )

        return await self._call(context, "ListModels", work, request.endpoint)

    async def LoadVersion(
        self, request: apb.LoadVersionRequest, context: Context
    ) -> apb.ChangeResponse:
        async def work(actor: Actor) -> apb.ChangeResponse:
            await self._changes.load_version(
                request.endpoint,
                request.version,
                actor,
                request.reason,
                request.expected_revision,
            )
            return await self._changed(request.endpoint)

        return await self._call(context, "LoadVersion", work, request.endpoint, request.reason)

    async def UnloadVersion(
        self, request: apb.UnloadVersionRequest, context: Context
    ) -> apb.ChangeResponse:
        async def work(actor: Actor) -> apb.ChangeResponse:
            await self._changes.unload_version(
                request.endpoint,
                request.version,
                actor,
                request.reason,
                request.expected_revision,
            )
            return await self._changed(request.endpoint)

        return await self._call(context, "UnloadVersion", work, request.endpoint, request.reason)

    async def SetRouting(
        self, request: apb.SetRoutingRequest, context: Context
    ) -> apb.ChangeResponse:
        async def work(actor: Actor) -> apb.ChangeResponse:
            routing = request.routing
            canary = None
            if routing.HasField("canary"):
                canary = CanaryRequest(
                    version=routing.canary.version,
                    share_bp=routing.canary.share_bp,
                    salt=routing.canary.salt or None,
                    entity=routing.canary.entity or None,
                )
            await self._changes.set_routing(
                request.endpoint,
                champion=routing.champion or None,
                canary=canary,
                shadows=tuple(routing.shadows),
                rollout=routing.rollout_json,
                actor=actor,
                reason=request.reason,
                expected_revision=request.expected_revision,
            )
            return await self._changed(request.endpoint)

        return await self._call(context, "SetRouting", work, request.endpoint, request.reason)

    async def Promote(self, request: apb.PromoteRequest, context: Context) -> apb.ChangeResponse:
        async def work(actor: Actor) -> apb.ChangeResponse:
            await self._changes.promote(
                request.endpoint, actor, request.reason, request.expected_revision
            )
            return await self._changed(request.endpoint)

        return await self._call(context, "Promote", work, request.endpoint, request.reason)

    async def Rollback(self, request: apb.RollbackRequest, context: Context) -> apb.ChangeResponse:
        async def work(actor: Actor) -> apb.ChangeResponse:
            await self._changes.rollback(
                request.endpoint, actor, request.reason, request.expected_revision
            )
            return await self._changed(request.endpoint)

        return await self._call(context, "Rollback", work, request.endpoint, request.reason)

    async def ListAudit(
        self, request: apb.ListAuditRequest, context: Context
    ) -> apb.ListAuditResponse:
        async def work(actor: Actor) -> apb.ListAuditResponse:
            entries = await self._changes.audit(
                request.endpoint or None, request.limit or DEFAULT_AUDIT_LIMIT
            )
            return apb.ListAuditResponse(entries=[encode_audit(e) for e in entries])

        return await self._call(context, "ListAudit", work, request.endpoint)

    async def Approve(self, request: apb.ApproveRequest, context: Context) -> apb.ChangeResponse:
        async def work(actor: Actor) -> apb.ChangeResponse:
            await self._changes.approve(request.endpoint, request.version, actor, request.reason)
            return await self._changed(request.endpoint)

        return await self._call(context, "Approve", work, request.endpoint, request.reason)

    async def Revoke(self, request: apb.RevokeRequest, context: Context) -> apb.ChangeResponse:
        async def work(actor: Actor) -> apb.ChangeResponse:
            await self._changes.revoke(request.endpoint, request.version, actor, request.reason)
            return await self._changed(request.endpoint)

        return await self._call(context, "Revoke", work, request.endpoint, request.reason)


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def encode_state(state: EndpointState) -> apb.EndpointState:
    """An ``EndpointState`` on the wire."""
    routing = apb.Routing(champion=state.champion, shadows=state.shadows)
    if state.canary is not None:
        routing.canary.CopyFrom(
            apb.Canary(
                version=state.canary.version,
                share_bp=state.canary.share_bp,
                salt=state.canary.salt,
                entity=state.canary.entity or "",
            )
        )
    if state.rollout is not None:
        routing.rollout_json = json.dumps(dict(state.rollout), sort_keys=True)
    return apb.EndpointState(
        loaded=state.loaded,
        routing=routing,
        previous_champion=state.previous_champion or "",
        revision=state.revision,
        updated_at=_timestamp(state.updated_at),
        updated_by=state.updated_by,
    )


def encode_approval(view: ApprovalView) -> apb.VersionApproval:
    """An ``ApprovalView`` on the wire."""
    message = apb.VersionApproval(
        required=view.required, problem=view.problem, submitters=view.submitters
    )
    approval = view.record.approval
    if approval is not None:
        message.approved_by = approval.approver
        message.approved_at.CopyFrom(_timestamp(approval.time))
        message.reason = approval.reason
        message.artifact_sha256 = approval.artifact_sha256
        message.report_sha256 = approval.report_sha256
    return message


def encode_lineage(lineage: Lineage) -> apb.Lineage:
    """A version's ``Lineage`` on the wire."""
    return apb.Lineage(
        artifact_sha256=lineage.artifact_sha256,
        data_snapshot=lineage.data_snapshot,
        code_commit=lineage.code_commit,
        created_at=lineage.created_at,
        algorithm=lineage.algorithm,
        explainer=lineage.explainer,
        explainer_sha256=lineage.explainer_sha256,
    )


def encode_model(view: ModelView) -> apb.Model:
    """A ``ModelView`` on the wire."""
    model = apb.Model(endpoint=view.endpoint)
    for v in view.versions:
        version = model.versions.add(
            version=v.version, status=_STATUS[v.status], roles=v.roles, error=v.error
        )
        if v.lineage is not None:
            version.lineage.CopyFrom(encode_lineage(v.lineage))
        if v.approval is not None:
            version.approval.CopyFrom(encode_approval(v.approval))
    if view.state is not None:
        model.state.CopyFrom(encode_state(view.state))
    return model


def encode_audit(entry: AuditEntry) -> apb.AuditEntry:
    """An ``AuditEntry`` on the wire."""
    message = apb.AuditEntry(
        id=entry.id,
        time=_timestamp(entry.time),
        actor=entry.actor,
        peer=entry.peer,
        endpoint=entry.endpoint,
        action=entry.action,
        reason=entry.reason,
        outcome=entry.outcome,
        error=entry.error,
        revision=entry.revision,
        detail_json=json.dumps(dict(entry.detail), sort_keys=True) if entry.detail else "",
    )
    if entry.before is not None:
        message.before.CopyFrom(encode_state(entry.before))
    if entry.after is not None:
        message.after.CopyFrom(encode_state(entry.after))
    return message


def encode_drift(view: DriftView) -> apb.VersionDrift:
    """A version's drift windows and open breaches."""
    return apb.VersionDrift(
        monitored=True,
        short_window=_window(view.short, view.bucket_s),
        long_window=_window(view.long, view.bucket_s),
        breaching=list(view.open_breaches),
    )


def _window(window: WindowView, bucket_s: int) -> apb.DriftWindow:
    out = apb.DriftWindow(window_s=window.buckets * bucket_s, rows=window.rows)
    for column in window.columns:
        if column.name == SCORE:
            out.score_psi = column.psi
            continue
        feature = out.features.add(
            feature=column.name,
            psi=column.psi,
            defaulted_share=window.defaulted_share.get(column.name, 0.0),
            nan_share=column.nan_share,
        )
        if column.js is not None:
            feature.js = column.js
    return out
