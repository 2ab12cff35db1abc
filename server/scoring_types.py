"""What the scoring pipeline takes and answers, free of protobuf and of the pipeline.

``ScoreInput`` is one decoded transaction, ``ScoreResult`` its answer. The codec,
the pipeline and the traffic log all speak these, so they live apart from each of
them (the traffic log records them; the pipeline hands them to the traffic log).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from server.router import Route

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from server.explain.reasons import Reason
    from server.features import Freshness

__all__ = ["RowFeatures", "ScoreInput", "ScoreResult"]

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


class RowFeatures(Mapping[str, float]):
    """One input row's values by feature name (what a Score call sending every feature
    carries), built into a dict only when first read: a v2 row's decision record reads
    it on the sink's sender task, after the answer left, not on the request path."""

    __slots__ = ("_names", "_row", "_values")

    def __init__(self, names: Sequence[str], row: npt.NDArray[np.float32]) -> None:
        """``row``: the ``[F]`` values in ``names`` order (not copied: never mutated)."""
        self._names = names
        self._row = row
        self._values: dict[str, float] | None = None

    def as_dict(self) -> dict[str, float]:
        """The values as a dict (built once, then kept)."""
        if self._values is None:
            self._values = dict(zip(self._names, self._row.tolist(), strict=True))
        return self._values

    def __getitem__(self, name: str) -> float:
        return self.as_dict()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self._names)
