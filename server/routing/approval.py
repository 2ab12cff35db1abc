"""Approvals of model versions and the gate routing passes through. Pure.

A version's :class:`VersionRecord` (persisted with the routing state, see
``server.routing.store``) holds who loaded it (``loaded_by``) and its
:class:`Approval`: who approved it, why, and the sha256 of the artifact and of the
validation report it was approved on. :func:`approval_problem` compares a record
with the :class:`Evidence` on disk now: a changed artifact or report, or an
approver who is also a submitter, voids the approval.

:func:`exposure` and :func:`newly_exposed` define the gate's trigger: a change that
raises a version's share (makes it champion, or raises its canary share above what
it had) needs that version approved when its model requires approval
(``server.routing.changes``). Shadows are no exposure: they never answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from server.errors import ScoringError, Status
from server.governance.report import REPORT_FILE as REPORT_FILE
from server.router import BASIS_POINTS

#: The submitter of a version that was in the repository when it was first served
#: and whose manifest names no ``submitted_by``.
REPOSITORY_SUBMITTER = "repository"
#: How ListModels starts the error of a version not served for want of approval.
NOT_APPROVED = "not approved: "


class ApprovalRequired(ScoringError):
    """A change would expose a version whose model requires approval and it has none."""

    status = Status.FAILED_PRECONDITION


class SelfApproval(ScoringError):
    """Maker-checker: the approver loaded or submitted the version."""

    status = Status.PERMISSION_DENIED


@dataclass(frozen=True, slots=True)
class Approval:
    """An approval of one version, bound to the files it was given on."""

    approver: str
    time: float
    reason: str
    artifact_sha256: str
    report_sha256: str


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """Governance facts of one version: who loaded it, and its approval."""

    loaded_by: tuple[str, ...] = ()
    approval: Approval | None = None

    def with_loader(self, actor: str) -> VersionRecord:
        """This record with ``actor`` among the loaders."""
        if actor in self.loaded_by:
            return self
        return replace(self, loaded_by=(*self.loaded_by, actor))


#: endpoint -> version -> record.
Records = Mapping[str, Mapping[str, VersionRecord]]


@dataclass(frozen=True, slots=True)
class Evidence:
    """What is on disk for a version now (None = file missing)."""

    artifact_sha256: str | None
    report_sha256: str | None
    #: ``submitted_by`` of the manifest, else :data:`REPOSITORY_SUBMITTER`.
    submitter: str = REPOSITORY_SUBMITTER


def record_of(records: Records, endpoint: str, version: str) -> VersionRecord:
    """The record of ``endpoint/version`` (empty if none)."""
    return records.get(endpoint, {}).get(version) or VersionRecord()


def with_record(
    records: Records, endpoint: str, version: str, record: VersionRecord
) -> dict[str, Mapping[str, VersionRecord]]:
    """A copy of ``records`` with ``endpoint/version`` replaced."""
    versions = {**records.get(endpoint, {}), version: record}
    return {**records, endpoint: MappingProxyType(versions)}


def makers(record: VersionRecord, evidence: Evidence) -> tuple[str, ...]:
    """Everyone who submitted or loaded the version (none of them may approve it)."""
    return (evidence.submitter, *(a for a in record.loaded_by if a != evidence.submitter))


def approval_problem(record: VersionRecord, evidence: Evidence) -> str | None:
    """Why the version is not approved now (None = approved)."""
    if evidence.artifact_sha256 is None:
        return "its artifact is missing"
    if evidence.report_sha256 is None:
        return f"no validation report ({REPORT_FILE}): run 'streamscore models validate' first"
    approval = record.approval
    if approval is None:
        return "no approval: run 'streamscore models approve' (by someone other than its submitter)"
    if approval.approver in makers(record, evidence):
        return f"approval void: approver {approval.approver!r} also submitted or loaded it"
    if approval.artifact_sha256 != evidence.artifact_sha256:
        return (
            "approval void: the artifact changed since it was approved "
            f"(approved sha256 {approval.artifact_sha256[:12]}, now "
            f"{evidence.artifact_sha256[:12]})"
        )
    if approval.report_sha256 != evidence.report_sha256:
        return (
            f"approval void: the validation report changed since it was approved "
            f"(approved sha256 {approval.report_sha256[:12]}, now {evidence.report_sha256[:12]})"
        )
    return None


def exposure(champion: str | None, canary: tuple[str, int] | None) -> dict[str, int]:
    """Share of traffic each version answers, in basis points (shadows answer none)."""
    shares: dict[str, int] = {}
    if champion:
        shares[champion] = BASIS_POINTS
    if canary is not None and canary[1] > 0:
        shares[canary[0]] = max(shares.get(canary[0], 0), canary[1])
    return shares


def newly_exposed(before: Mapping[str, int], after: Mapping[str, int]) -> list[str]:
    """Versions whose share grows from ``before`` to ``after``."""
    return sorted(v for v, share in after.items() if share > before.get(v, 0))


# ----------------------------------------------------------------------- JSON


def records_to_dict(records: Records) -> dict[str, Any]:
    """JSON-ready form of ``records``."""
    return {
        endpoint: {
            version: {
                "loaded_by": list(record.loaded_by),
                "approval": (
                    {
                        "approver": record.approval.approver,
                        "time": record.approval.time,
                        "reason": record.approval.reason,
                        "artifact_sha256": record.approval.artifact_sha256,
                        "report_sha256": record.approval.report_sha256,
                    }
                    if record.approval is not None
                    else None
                ),
            }
            for version, record in sorted(versions.items())
        }
        for endpoint, versions in sorted(records.items())
    }


def records_from_dict(data: Mapping[str, Any] | None) -> Records:
    """Inverse of ``records_to_dict``."""
    out: dict[str, Mapping[str, VersionRecord]] = {}
    for endpoint, versions in (data or {}).items():
        parsed = {}
        for version, item in versions.items():
            approval = item.get("approval")
            parsed[str(version)] = VersionRecord(
                loaded_by=tuple(str(a) for a in item.get("loaded_by", ())),
                approval=(
                    Approval(
                        approver=str(approval["approver"]),
                        time=float(approval["time"]),
                        reason=str(approval.get("reason", "")),
                        artifact_sha256=str(approval["artifact_sha256"]),
                        report_sha256=str(approval["report_sha256"]),
                    )
                    if approval
                    else None
                ),
            )
        out[str(endpoint)] = MappingProxyType(parsed)
    return MappingProxyType(out)
