"""Guarded canary rollout: policy, window statistics, PSI and the decision. Pure.

No I/O, no clock, no event loop: callers pass the statistics they read and ``now``.
``server.rollout.stats`` collects and aggregates the statistics across processes;
``server.rollout.controller`` runs :func:`evaluate` periodically in one process and
applies the decision through the routing-state API.

A rollout walks the canary through ``policy.steps`` (e.g. 1% -> 5% -> 25% -> 50% ->
100%). The routing state stores, per endpoint, the rollout id, champion, canary,
policy, the current canary share and when that share took effect; the current step
is the index of that share in ``policy.steps`` (shares strictly increase, so the
index is unique).

**Windows.** Statistics are keyed by rollout id *and step*, so each step is judged
only on traffic served while it was current: a new step starts from zero, and
traffic of an earlier share (or of an earlier, aborted rollout) never leaks in.
Requests routed by a process that has not applied the new share yet still land in
the old step's window, so in-flight requests do not pollute the new one.

**Judgement** (:func:`evaluate`), each evaluation interval:

1. Hold until the canary has ``min_requests`` requests in the current window.
2. Reference = the champion's current window; if it has fewer than
   ``min_champion_requests`` (e.g. at a 100% step the champion gets no traffic),
   the champion summed over every step of this rollout so far. Hold if even that
   is too small.
3. Every guard is checked; any breach -> :class:`Rollback` listing every breach
   with its numbers. Breaches are checked as soon as step 1 allows, before the hold
   time is over, so a bad canary is pulled as early as the evidence allows.
4. No breach and the step's ``hold_s`` elapsed -> :class:`Advance` to the next
   step's share, or :class:`Promote` after the last step; otherwise :class:`Hold`.

**Guards.**

- Error rate: ``canary_rate / max(champion_rate, error_rate_floor)`` must not
  exceed ``max_error_rate_ratio``. The floor keeps an error-free champion from
  dividing by zero and sets the tolerance then: with floor 0.001 and ratio 2 a
  canary may err on at most 0.2% of requests while the champion errs on none.
- p99 latency: ``canary_p99 / max(champion_p99, latency_floor_s)``, quantiles
  interpolated inside fixed latency buckets (:data:`LATENCY_BOUNDS_S`, ~25% wide
  geometric buckets from 100 us to ~11 s). The floor ignores jitter far below
  anything a caller could notice.
- Score shift: population stability index over the fixed score bins
  (:data:`SCORE_CUTS` plus one bin for non-finite scores)::

      p_i = (a_i / A + eps) / (1 + B * eps)      canary   (a_i of A scores in bin i)
      q_i = (e_i / E + eps) / (1 + B * eps)      champion (e_i of E scores in bin i)
      PSI = sum_i (p_i - q_i) * ln(p_i / q_i)    over all B bins

  ``eps`` (``psi_epsilon``) smooths empty bins so the log stays finite; adding it
  to *proportions* (not counts) makes a bin empty on both sides contribute exactly
  0 whatever the sample sizes. PSI >= 0, symmetric; rule of thumb: < 0.1 stable,
  0.1-0.25 moderate shift, > 0.25 major shift. Sampling noise alone gives roughly
  ``(B - 1) * (1/A + 1/E)``, so keep ``min_requests`` well above
  ``B / max_psi`` (22 bins, max_psi 0.2 -> a few hundred requests at least).
  The bins are finer near 0 and 1 because fraud scores pile up there.

A ``max_*`` limit of ``inf`` disables that guard.

**In the routing state.** :func:`rollout_document` reads the ``rollout`` object the
routing state keeps beside an endpoint's canary; :func:`new_rollout` and
:func:`rollout_for_change` are the rule an admin routing change follows (a policy
with a canary starts a rollout at its first step; an active rollout continues only
with its canary unchanged).
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import InvalidInput
from server.manifest import MODEL_NAME_PATTERN
from server.routing.state import CanaryRequest, EndpointState, new_salt, parse_rollout

logger = logging.getLogger(__name__)

#: Upper bounds (seconds, inclusive) of the latency buckets; one overflow bucket follows.
LATENCY_BOUNDS_S: tuple[float, ...] = tuple(round(1e-4 * 1.25**i, 9) for i in range(53))
LATENCY_BUCKETS = len(LATENCY_BOUNDS_S) + 1

#: Interior cut points of the score bins on [0, 1]; bin ``i`` is ``[cut[i-1], cut[i])``.
SCORE_CUTS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5,
    0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999,
)  # fmt: skip
#: Score bins: ``len(SCORE_CUTS) + 1`` on [0, 1] plus a last one for NaN/inf scores.
SCORE_BINS = len(SCORE_CUTS) + 2
NON_FINITE_SCORE_BIN = SCORE_BINS - 1

FULL_SHARE_BP = 10_000
_ID_PATTERN = re.compile(MODEL_NAME_PATTERN)
_EMPTY_NUMBERS: Mapping[str, float] = MappingProxyType({})


def _no_numbers() -> Mapping[str, float]:
    return _EMPTY_NUMBERS


def latency_bucket(seconds: float) -> int:
    """Index of the latency bucket holding ``seconds`` (last index = overflow)."""
    return bisect_left(LATENCY_BOUNDS_S, seconds)


def score_bin(score: float) -> int:
    """Index of the score bin holding ``score``; below 0 / above 1 clamp to the ends."""
    if not math.isfinite(score):
        return NON_FINITE_SCORE_BIN
    return bisect_right(SCORE_CUTS, score)


# --------------------------------------------------------------------------- statistics


def _zeros(n: int) -> tuple[int, ...]:
    return (0,) * n


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Counts of one version over one window: requests, errors, latency and score histograms.

    ``latency`` has one count per :data:`LATENCY_BOUNDS_S` bucket plus overflow and
    covers every request (answered or failed); ``scores`` has :data:`SCORE_BINS`
    counts and covers answered requests only.
    """

    requests: int = 0
    errors: int = 0
    latency: tuple[int, ...] = field(default_factory=lambda: _zeros(LATENCY_BUCKETS))
    scores: tuple[int, ...] = field(default_factory=lambda: _zeros(SCORE_BINS))

    def __post_init__(self) -> None:
        if len(self.latency) != LATENCY_BUCKETS:
            raise ValueError(
                f"latency: expected {LATENCY_BUCKETS} buckets, got {len(self.latency)}"
            )
        if len(self.scores) != SCORE_BINS:
            raise ValueError(f"scores: expected {SCORE_BINS} bins, got {len(self.scores)}")

    def __add__(self, other: WindowStats) -> WindowStats:
        return WindowStats(
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            latency=tuple(a + b for a, b in zip(self.latency, other.latency, strict=True)),
            scores=tuple(a + b for a, b in zip(self.scores, other.scores, strict=True)),
        )

    @property
    def error_rate(self) -> float:
        """Errors / requests; 0 without requests."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def scored(self) -> int:
        """Requests with a score in the histogram."""
        return sum(self.scores)

    def latency_quantile(self, q: float) -> float:
        """The ``q`` quantile of latency (seconds), linear inside its bucket; 0 when empty.

        Past the last bound the last finite bound is returned (as Prometheus does).
        """
        total = sum(self.latency)
        if total == 0:
            return 0.0
        rank = q * total
        cumulative = 0
        for index, count in enumerate(self.latency):
            if count and cumulative + count >= rank:
                if index >= len(LATENCY_BOUNDS_S):
                    return LATENCY_BOUNDS_S[-1]
                lower = LATENCY_BOUNDS_S[index - 1] if index else 0.0
                upper = LATENCY_BOUNDS_S[index]
                return lower + (upper - lower) * max(rank - cumulative, 0.0) / count
            cumulative += count
        return LATENCY_BOUNDS_S[-1]


def psi(canary: tuple[int, ...], champion: tuple[int, ...], epsilon: float) -> float:
    """Population stability index of two histograms over the same bins (module docs)."""
    if len(canary) != len(champion):
        raise ValueError(f"bins differ: {len(canary)} vs {len(champion)}")
    a_total, e_total = sum(canary), sum(champion)
    if a_total == 0 or e_total == 0:
        raise ValueError("psi needs at least one count on each side")
    norm = 1.0 + len(canary) * epsilon
    total = 0.0
    for a, e in zip(canary, champion, strict=True):
        p = (a / a_total + epsilon) / norm
        q = (e / e_total + epsilon) / norm
        total += (p - q) * math.log(p / q)
    return total


# --------------------------------------------------------------------------- policy


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Finite = Annotated[float, Field(allow_inf_nan=False)]


class RolloutStep(_Frozen):
    """One step: the canary gets ``share_bp`` basis points of traffic for at least ``hold_s``."""

    share_bp: int = Field(ge=1, le=FULL_SHARE_BP, description="Canary share, basis points.")
    hold_s: Finite = Field(ge=0, description="Minimum time at this share before advancing.")


def _default_steps() -> tuple[RolloutStep, ...]:
    return tuple(RolloutStep(share_bp=bp, hold_s=300.0) for bp in (100, 500, 2500, 5000, 10_000))


class RolloutPolicy(_Frozen):
    """Guards and steps of a canary rollout; see the module docs for the formulas."""

    steps: tuple[RolloutStep, ...] = Field(
        default_factory=_default_steps,
        description="Strictly increasing canary shares; promotion follows the last.",
    )
    min_requests: int = Field(
        default=500, ge=1, description="Canary requests in the step before any judgement."
    )
    min_champion_requests: int = Field(
        default=500, ge=1, description="Champion requests needed as the reference."
    )
    max_error_rate_ratio: float = Field(
        default=2.0, gt=0, description="Most canary/champion error-rate ratio; inf disables."
    )
    error_rate_floor: Finite = Field(
        default=0.001, gt=0, le=1, description="Champion error rate used at least, in the ratio."
    )
    max_p99_latency_ratio: float = Field(
        default=1.5, gt=0, description="Most canary/champion p99 latency ratio; inf disables."
    )
    latency_floor_s: Finite = Field(
        default=0.001, gt=0, description="Champion p99 used at least, in the ratio (seconds)."
    )
    max_psi: float = Field(
        default=0.2, gt=0, description="Most score PSI of canary vs champion; inf disables."
    )
    psi_epsilon: Finite = Field(
        default=1e-4, gt=0, le=0.01, description="Smoothing added to each bin's proportion."
    )
    evaluation_interval_s: Finite = Field(
        default=10.0, gt=0, description="Time between two evaluations of the rollout."
    )

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: tuple[RolloutStep, ...]) -> tuple[RolloutStep, ...]:
        if not steps:
            raise ValueError("must list at least one step")
        for index in range(1, len(steps)):
            if steps[index].share_bp <= steps[index - 1].share_bp:
                raise ValueError(
                    f"steps[{index}].share_bp ({steps[index].share_bp}) must be greater than "
                    f"steps[{index - 1}].share_bp ({steps[index - 1].share_bp})"
                )
        if steps and steps[0].share_bp == FULL_SHARE_BP:
            raise ValueError(
                "steps[0].share_bp must be below 10000: the champion needs traffic "
                "to serve as the reference"
            )
        return steps

    def step_of(self, share_bp: int) -> int:
        """Index of the step with ``share_bp``; ``ValueError`` when no step has it."""
        for index, step in enumerate(self.steps):
            if step.share_bp == share_bp:
                return index
        shares = [s.share_bp for s in self.steps]
        raise ValueError(f"share_bp {share_bp} is not a step of the policy {shares}")


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class StepWindow:
    """Identity of the statistics window of one rollout step (the stats key parts)."""

    endpoint: str
    rollout_id: str
    step: int
    champion: str
    canary: str


@dataclass(frozen=True, slots=True)
class RolloutState:
    """An active rollout as the routing state holds it."""

    endpoint: str
    rollout_id: str
    champion: str
    canary: str
    policy: RolloutPolicy
    share_bp: int
    step_started_at: float

    def __post_init__(self) -> None:
        for name in ("endpoint", "rollout_id", "champion", "canary"):
            value = getattr(self, name)
            if not _ID_PATTERN.match(value):
                raise ValueError(f"{name} {value!r} must match {_ID_PATTERN.pattern}")
        if self.champion == self.canary:
            raise ValueError(f"canary {self.canary!r} is the champion")
        self.policy.step_of(self.share_bp)

    @property
    def step(self) -> int:
        """Index of the current step in ``policy.steps``."""
        return self.policy.step_of(self.share_bp)

    def window(self) -> StepWindow:
        """The statistics window of the current step."""
        return StepWindow(self.endpoint, self.rollout_id, self.step, self.champion, self.canary)


class RolloutDocument(_Frozen):
    """The ``rollout`` JSON object the routing state persists beside an endpoint's canary.

    The routing state owns the canary (version, ``share_bp``); this adds what the
    controller needs: the rollout id (stats keys), the policy and when the current
    share took effect. ``set_canary_share`` must store ``advanced(now)``.
    """

    id: str = Field(pattern=_ID_PATTERN.pattern, description="Unique per rollout.")
    policy: RolloutPolicy
    step_started_at: Finite = Field(ge=0, description="When the current share took effect.")

    def advanced(self, now: float) -> RolloutDocument:
        """The document after the share changed at ``now``."""
        return self.model_copy(update={"step_started_at": now})

    def state(self, endpoint: str, champion: str, canary: str, share_bp: int) -> RolloutState:
        """The rollout as the controller sees it; ``ValueError`` if the share is no step."""
        return RolloutState(
            endpoint, self.id, champion, canary, self.policy, share_bp, self.step_started_at
        )


@dataclass(frozen=True, slots=True)
class Observation:
    """What the controller read for one evaluation.

    ``champion_history`` sums the champion over every step of the rollout so far
    (current one included): the reference when the current window lacks traffic.
    """

    canary: WindowStats
    champion: WindowStats
    champion_history: WindowStats


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Breach:
    """A guard that tripped: its name, measured value, limit and a readable account."""

    check: str
    value: float
    limit: float
    message: str


@dataclass(frozen=True, slots=True)
class Hold:
    """Stay at the current step."""

    reason: str
    numbers: Mapping[str, float] = field(default_factory=_no_numbers)
    kind: ClassVar[str] = "hold"


@dataclass(frozen=True, slots=True)
class Advance:
    """Move the canary to the next step's share."""

    share_bp: int
    step: int
    reason: str
    numbers: Mapping[str, float] = field(default_factory=_no_numbers)
    kind: ClassVar[str] = "advance"


@dataclass(frozen=True, slots=True)
class Promote:
    """Every step passed: the canary becomes the champion."""

    reason: str
    numbers: Mapping[str, float] = field(default_factory=_no_numbers)
    kind: ClassVar[str] = "promote"


@dataclass(frozen=True, slots=True)
class Rollback:
    """A guard tripped: the canary gets no more traffic."""

    breaches: tuple[Breach, ...]
    numbers: Mapping[str, float] = field(default_factory=_no_numbers)
    kind: ClassVar[str] = "rollback"

    @property
    def reason(self) -> str:
        """Every breach, with its numbers."""
        return "; ".join(b.message for b in self.breaches)


Decision = Hold | Advance | Promote | Rollback


def _pct(rate: float) -> str:
    return f"{rate * 100:.2f}%"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def evaluate(state: RolloutState, observed: Observation, now: float) -> Decision:
    """Decide what to do with ``state``'s canary given ``observed`` at time ``now``."""
    policy = state.policy
    step = state.step
    elapsed = now - state.step_started_at
    canary = observed.canary
    numbers: dict[str, float] = {
        "step": float(step),
        "share_bp": float(state.share_bp),
        "elapsed_s": round(elapsed, 3),
        "canary_requests": float(canary.requests),
        "canary_errors": float(canary.errors),
        "champion_requests": float(observed.champion.requests),
    }
    if canary.requests < policy.min_requests:
        return Hold(
            f"canary has {canary.requests} of {policy.min_requests} requests needed "
            f"at step {step} ({state.share_bp} bp)",
            MappingProxyType(numbers),
        )
    reference = observed.champion
    from_history = reference.requests < policy.min_champion_requests
    if from_history:
        reference = observed.champion_history
    numbers["reference_requests"] = float(reference.requests)
    numbers["reference_is_history"] = 1.0 if from_history else 0.0
    if reference.requests < policy.min_champion_requests:
        return Hold(
            f"champion has {reference.requests} of {policy.min_champion_requests} requests "
            "needed as the reference",
            MappingProxyType(numbers),
        )
    breaches = _check(policy, canary, reference, numbers)
    if breaches:
        return Rollback(breaches, MappingProxyType(numbers))
    hold_s = policy.steps[step].hold_s
    if elapsed < hold_s:
        return Hold(
            f"step {step} ({state.share_bp} bp) healthy; held {elapsed:.1f}s of {hold_s:g}s",
            MappingProxyType(numbers),
        )
    passed = (
        f"step {step} ({state.share_bp} bp) passed after {elapsed:.1f}s "
        f"with {canary.requests} canary requests"
    )
    if step + 1 < len(policy.steps):
        share = policy.steps[step + 1].share_bp
        return Advance(
            share, step + 1, f"{passed}; advancing to {share} bp", MappingProxyType(numbers)
        )
    return Promote(
        f"{passed}; every step passed, promoting {state.canary}", MappingProxyType(numbers)
    )


def _check(
    policy: RolloutPolicy,
    canary: WindowStats,
    reference: WindowStats,
    numbers: dict[str, float],
) -> tuple[Breach, ...]:
    breaches: list[Breach] = []
    canary_rate, champion_rate = canary.error_rate, reference.error_rate
    ratio = canary_rate / max(champion_rate, policy.error_rate_floor)
    numbers.update(
        canary_error_rate=canary_rate, champion_error_rate=champion_rate, error_rate_ratio=ratio
    )
    if ratio > policy.max_error_rate_ratio:
        breaches.append(
            Breach(
                "error_rate",
                ratio,
                policy.max_error_rate_ratio,
                f"error-rate ratio {ratio:.2f} > {policy.max_error_rate_ratio:.2f} "
                f"(canary {_pct(canary_rate)} of {canary.requests} requests, champion "
                f"{_pct(champion_rate)} of {reference.requests}, floor "
                f"{_pct(policy.error_rate_floor)})",
            )
        )
    canary_p99, champion_p99 = canary.latency_quantile(0.99), reference.latency_quantile(0.99)
    ratio = canary_p99 / max(champion_p99, policy.latency_floor_s)
    numbers.update(canary_p99_s=canary_p99, champion_p99_s=champion_p99, p99_latency_ratio=ratio)
    if ratio > policy.max_p99_latency_ratio:
        breaches.append(
            Breach(
                "p99_latency",
                ratio,
                policy.max_p99_latency_ratio,
                f"p99 latency ratio {ratio:.2f} > {policy.max_p99_latency_ratio:.2f} "
                f"(canary {_ms(canary_p99)}, champion {_ms(champion_p99)}, "
                f"floor {_ms(policy.latency_floor_s)})",
            )
        )
    if canary.scored and reference.scored:
        value = psi(canary.scores, reference.scores, policy.psi_epsilon)
        numbers.update(psi=value, canary_scored=canary.scored, champion_scored=reference.scored)
        if value > policy.max_psi:
            breaches.append(
                Breach(
                    "psi",
                    value,
                    policy.max_psi,
                    f"score PSI {value:.3f} > {policy.max_psi:.3f} (canary {canary.scored} "
                    f"scores, champion {reference.scored})",
                )
            )
    return tuple(breaches)


# --------------------------------------------------------------------------- routing state


def rollout_document(state: EndpointState) -> RolloutDocument | None:
    """The endpoint's rollout, when it has a canary and a valid rollout document."""
    if state.canary is None or state.rollout is None:
        return None
    try:
        return RolloutDocument.model_validate(dict(state.rollout))
    except ValueError:
        logger.warning("ignoring an invalid rollout document", extra={"rollout": state.rollout})
        return None


def _path(loc: tuple[int | str, ...]) -> str:
    """A validation error location as ``steps[0].share_bp``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def new_rollout(policy_json: Mapping[str, object], share_bp: int, now: float) -> dict[str, object]:
    """A rollout document for a fresh canary at ``share_bp`` (the policy's first step)."""
    try:
        policy = RolloutPolicy.model_validate(dict(policy_json))
    except ValidationError as error:
        problems = [f"{_path(e['loc']) or '(policy)'}: {e['msg']}" for e in error.errors()]
        raise InvalidInput("rollout_json", "; ".join(problems)) from None
    first = policy.steps[0].share_bp
    if share_bp != first:
        raise InvalidInput(
            "canary.share_bp", f"{share_bp} must equal the rollout's first step ({first})"
        )
    return RolloutDocument(id=new_salt(), policy=policy, step_started_at=now).model_dump(
        mode="json"
    )


def rollout_for_change(
    current: EndpointState,
    canary: CanaryRequest | None,
    rollout: Mapping[str, Any] | str | None,
    now: float,
) -> Mapping[str, Any] | None:
    """The rollout document an admin routing change stores (``rollout`` as sent: a
    mapping, its JSON text, or None/'' for none).

    A rollout policy given with a canary starts a guarded rollout at its first step;
    the active rollout's own document (it has an ``id``) may only be kept with its
    canary unchanged, since the rollout controller alone moves its share.
    """
    value = parse_rollout(rollout) if isinstance(rollout, str) else rollout
    if value is None:
        return None
    if "id" in value:
        kept = current.canary
        unchanged = (
            current.rollout is not None
            and dict(value) == dict(current.rollout)
            and canary is not None
            and kept is not None
            and (canary.version, canary.share_bp) == (kept.version, kept.share_bp)
        )
        if not unchanged:
            raise InvalidInput(
                "rollout_json",
                "an active rollout continues only with its canary unchanged; to change "
                "the canary by hand, send an empty rollout_json (ends the rollout)",
            )
        return value
    if canary is None:
        raise InvalidInput("rollout_json", "a rollout policy needs a canary")
    return new_rollout(value, canary.share_bp, now)
