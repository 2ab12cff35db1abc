"""What the scoring pipeline takes and answers, free of protobuf and of the pipeline.

``ScoreInput`` is one decoded transaction, ``ScoreResult`` its answer. The codec,
the pipeline and the traffic log all speak these, so they live apart from each of
them (the traffic log records them; the pipeline hands them to the traffic log).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from server.router import Route

if TYPE_CHECKING:
    from server.explain.reasons import Reason
    from server.features import Freshness

__all__ = ["ScoreInput", "ScoreResult"]

_EMPTY: Mapping[str, str] = MappingProxyType({})


class ScoreInput(NamedTuple):
    """One transaction to score, decoded from the wire (a tuple: cheap on the hot path)."""

    model: str
    request_id: str
    features: Mapping[str, float]
    entity_ids: Mapping[str, str] = _EMPTY
    model_version: str | None = None
    event_time_ms: int | None = None
    echo_features: bool = False
    explain: bool = False
    #: The caller holds ``features.allow_overrides``: it may send store features and
    #: an ``event_time`` beyond the configured skew.
    overrides_allowed: bool = False


class ScoreResult(NamedTuple):
    """The answer to one ``ScoreInput``."""

    request_id: str
    score: float
    model: str
    version: str
    route: Route
    defaulted_features: tuple[str, ...] = ()
    features: tuple[tuple[str, float], ...] = ()
    freshness: tuple[Freshness, ...] = ()
    degraded_reasons: tuple[str, ...] = ()
    artifact_sha256: str = ""
    threshold: float = 0.0
    decision: bool = False
    reasons: tuple[Reason, ...] | None = None
    """Top reasons when computed (``None``: not computed; ``()``: none pushed up)."""
    reasons_base_value: float = 0.0
