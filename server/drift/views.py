"""What a drift comparison shows: one window, and one version's windows (pure data)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from server.drift.bins import ColumnDrift


@dataclass(frozen=True, slots=True)
class WindowView:
    """One window's comparison: per column (score last) and the defaulted shares."""

    buckets: int
    rows: int
    columns: tuple[ColumnDrift, ...]
    defaulted_share: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class VersionView:
    """What ListModels and the CLI show for one version."""

    short: WindowView
    long: WindowView
    open_breaches: tuple[str, ...]
    bucket_s: int
