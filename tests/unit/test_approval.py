"""Approval records and role checks (pure)."""

from __future__ import annotations

import pytest

from server.admin.auth import RPC_ROLES, PermissionDenied, Principal, authorize
from server.routing.approval import (
    Approval,
    Evidence,
    VersionRecord,
    approval_problem,
    exposure,
    newly_exposed,
    records_from_dict,
    records_to_dict,
)

A, R = "a" * 64, "b" * 64
APPROVED = VersionRecord(("alice",), Approval("bob", 1.0, "ok", A, R))


def test_approval_is_bound_to_both_hashes_and_to_a_checker() -> None:
    assert approval_problem(APPROVED, Evidence(A, R)) is None
    assert "artifact changed" in (approval_problem(APPROVED, Evidence("c" * 64, R)) or "")
    assert "report changed" in (approval_problem(APPROVED, Evidence(A, "c" * 64)) or "")
    assert "no validation report" in (approval_problem(APPROVED, Evidence(A, None)) or "")
    assert "no approval" in (approval_problem(VersionRecord(), Evidence(A, R)) or "")
    assert "also submitted" in (approval_problem(APPROVED, Evidence(A, R, "bob")) or "")


def test_records_round_trip() -> None:
    records = {"fraud": {"3": APPROVED, "4": VersionRecord(("ci",))}}
    assert records_from_dict(records_to_dict(records)) == records


def test_exposure_counts_champion_and_positive_canary_only() -> None:
    before = exposure("1", ("2", 0))
    assert before == {"1": 10000}
    assert newly_exposed(before, exposure("1", ("2", 500))) == ["2"]
    assert newly_exposed(exposure("1", ("2", 500)), exposure("2", None)) == ["2"]
    assert newly_exposed(exposure("1", ("2", 500)), exposure("1", ("2", 100))) == []


@pytest.mark.parametrize("method", sorted(RPC_ROLES))
def test_every_rpc_needs_its_role(method: str) -> None:
    needed = RPC_ROLES[method]
    authorize(Principal("root"), method)  # admin by default
    authorize(Principal("p", frozenset({needed})), method)
    for role in ("viewer", "deployer", "approver"):
        principal = Principal("p", frozenset({role}))
        if role == needed or needed == "viewer":
            authorize(principal, method)
        else:
            with pytest.raises(PermissionDenied, match=f"needs role '{needed}'"):
                authorize(principal, method)
