"""Rollout policy, window statistics, PSI and the decision function (pure)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from server.rollout.policy import (
    LATENCY_BOUNDS_S,
    LATENCY_BUCKETS,
    NON_FINITE_SCORE_BIN,
    SCORE_BINS,
    SCORE_CUTS,
    Advance,
    Hold,
    Observation,
    Promote,
    Rollback,
    RolloutDocument,
    RolloutPolicy,
    RolloutState,
    RolloutStep,
    StepWindow,
    WindowStats,
    evaluate,
    latency_bucket,
    psi,
    score_bin,
)

T0 = 1_700_000_000.0


def stats_of(latencies: Sequence[float], scores: Sequence[float], errors: int = 0) -> WindowStats:
    """Stats of ``len(latencies)`` requests: the first ``errors`` failed, the rest scored."""
    latency = [0] * LATENCY_BUCKETS
    for value in latencies:
        latency[latency_bucket(value)] += 1
    binned = [0] * SCORE_BINS
    for value in scores:
        binned[score_bin(value)] += 1
    return WindowStats(len(latencies), errors, tuple(latency), tuple(binned))


def traffic(
    rng: random.Random,
    n: int,
    *,
    error_rate: float = 0.0,
    latency_s: float = 0.002,
    score_shift: float = 0.0,
) -> WindowStats:
    """``n`` synthetic requests: lognormal latency around ``latency_s``, beta-ish scores."""
    errors = sum(1 for _ in range(n) if rng.random() < error_rate)
    latencies = [latency_s * rng.lognormvariate(0, 0.3) for _ in range(n)]
    scores = [min(1.0, rng.betavariate(1, 12) + score_shift) for _ in range(n - errors)]
    return stats_of(latencies, scores, errors)


POLICY = RolloutPolicy(
    steps=(
        RolloutStep(share_bp=100, hold_s=60),
        RolloutStep(share_bp=2500, hold_s=60),
        RolloutStep(share_bp=10_000, hold_s=60),
    ),
    min_requests=400,
    min_champion_requests=400,
    max_error_rate_ratio=2.0,
    error_rate_floor=0.001,
    max_p99_latency_ratio=1.5,
    latency_floor_s=0.001,
    max_psi=0.2,
)


def state_at(share_bp: int, policy: RolloutPolicy = POLICY) -> RolloutState:
    return RolloutState(
        endpoint="fraud",
        rollout_id="r1",
        champion="1",
        canary="2",
        policy=policy,
        share_bp=share_bp,
        step_started_at=T0,
    )


def observe(canary: WindowStats, champion: WindowStats) -> Observation:
    return Observation(canary=canary, champion=champion, champion_history=champion)


# ----------------------------------------------------------------- buckets and stats


def test_latency_buckets_have_inclusive_upper_bounds_and_an_overflow() -> None:
    assert latency_bucket(0.0) == 0
    assert latency_bucket(LATENCY_BOUNDS_S[0]) == 0
    assert latency_bucket(LATENCY_BOUNDS_S[0] * 1.0001) == 1
    assert latency_bucket(LATENCY_BOUNDS_S[-1]) == LATENCY_BUCKETS - 2
    assert latency_bucket(1e6) == LATENCY_BUCKETS - 1
    assert LATENCY_BOUNDS_S[-1] > 10.0
    assert all(b > a for a, b in itertools.pairwise(LATENCY_BOUNDS_S))


def test_score_bins_clamp_and_keep_non_finite_apart() -> None:
    assert score_bin(0.0) == 0
    assert score_bin(-3.0) == 0
    assert score_bin(SCORE_CUTS[0]) == 1
    assert score_bin(0.5) == score_bin(0.55)
    assert score_bin(1.0) == score_bin(7.0) == NON_FINITE_SCORE_BIN - 1
    assert score_bin(math.nan) == score_bin(math.inf) == NON_FINITE_SCORE_BIN


def test_window_stats_add_and_validate() -> None:
    a = stats_of([0.001, 0.002], [0.1], errors=1)
    b = stats_of([0.004], [0.9])
    total = a + b
    assert (total.requests, total.errors, total.scored) == (3, 1, 2)
    assert sum(total.latency) == 3
    assert total.error_rate == pytest.approx(1 / 3)
    assert WindowStats().error_rate == 0.0
    with pytest.raises(ValueError, match="latency"):
        WindowStats(latency=(1, 2))
    with pytest.raises(ValueError, match="scores"):
        WindowStats(scores=(1,))


def test_latency_quantile_interpolates_inside_the_bucket() -> None:
    assert WindowStats().latency_quantile(0.99) == 0.0
    index = latency_bucket(0.005)
    lower, upper = LATENCY_BOUNDS_S[index - 1], LATENCY_BOUNDS_S[index]
    stats = stats_of([0.005] * 100, [])
    assert stats.latency_quantile(0.5) == pytest.approx(lower + (upper - lower) * 0.5)
    assert stats.latency_quantile(1.0) == pytest.approx(upper)
    assert stats_of([1e6] * 10, []).latency_quantile(0.99) == LATENCY_BOUNDS_S[-1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=1e-5, max_value=5.0), min_size=1, max_size=300),
    st.sampled_from([0.5, 0.9, 0.99]),
)
def test_latency_quantile_lands_in_the_bucket_of_the_true_quantile(
    samples: list[float], q: float
) -> None:
    ordered = sorted(samples)
    true = ordered[max(math.ceil(q * len(ordered)) - 1, 0)]
    index = latency_bucket(true)
    lower = LATENCY_BOUNDS_S[index - 1] if index else 0.0
    upper = LATENCY_BOUNDS_S[index]
    estimate = stats_of(samples, []).latency_quantile(q)
    assert lower - 1e-12 <= estimate <= upper + 1e-12


# ----------------------------------------------------------------- PSI


def test_psi_matches_the_documented_formula() -> None:
    eps = 1e-4
    canary, champion = (30, 70, 0), (60, 40, 0)
    norm = 1 + 3 * eps
    p = [(0.3 + eps) / norm, (0.7 + eps) / norm, eps / norm]
    q = [(0.6 + eps) / norm, (0.4 + eps) / norm, eps / norm]
    expected = sum((pi - qi) * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert psi(canary, champion, eps) == pytest.approx(expected, rel=1e-12)
    assert psi(canary, champion, eps) == pytest.approx(psi(champion, canary, eps))


def test_psi_of_equal_proportions_is_zero_whatever_the_sample_sizes() -> None:
    assert psi((10, 20, 0, 0), (1000, 2000, 0, 0), 1e-4) == pytest.approx(0.0, abs=1e-15)


def test_psi_needs_matching_non_empty_histograms() -> None:
    with pytest.raises(ValueError, match="bins"):
        psi((1, 2), (1, 2, 3), 1e-4)
    with pytest.raises(ValueError, match="at least one"):
        psi((0, 0), (1, 2), 1e-4)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 1000), min_size=SCORE_BINS, max_size=SCORE_BINS).filter(any),
    st.lists(st.integers(0, 1000), min_size=SCORE_BINS, max_size=SCORE_BINS).filter(any),
)
def test_psi_is_non_negative_and_finite(a: list[int], b: list[int]) -> None:
    value = psi(tuple(a), tuple(b), 1e-4)
    assert value >= 0.0
    assert math.isfinite(value)


# ----------------------------------------------------------------- policy model


def test_policy_defaults_follow_the_issue_example() -> None:
    policy = RolloutPolicy()
    assert [s.share_bp for s in policy.steps] == [100, 500, 2500, 5000, 10_000]
    assert policy.step_of(2500) == 2
    with pytest.raises(ValueError, match="share_bp 42"):
        policy.step_of(42)


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"steps": []}, "steps", "at least one step"),
        (
            {"steps": [{"share_bp": 500, "hold_s": 1}, {"share_bp": 500, "hold_s": 1}]},
            "steps",
            "steps[1].share_bp (500) must be greater than steps[0].share_bp (500)",
        ),
        ({"steps": [{"share_bp": 10_000, "hold_s": 1}]}, "steps", "steps[0].share_bp"),
        ({"steps": [{"share_bp": 0, "hold_s": 1}]}, "steps.0.share_bp", "greater than"),
        ({"steps": [{"share_bp": 100, "hold_s": -1}]}, "steps.0.hold_s", "greater than"),
        ({"min_requests": 0}, "min_requests", "greater than"),
        ({"max_error_rate_ratio": 0}, "max_error_rate_ratio", "greater than"),
        ({"error_rate_floor": 0}, "error_rate_floor", "greater than"),
        ({"error_rate_floor": math.inf}, "error_rate_floor", "finite"),
        ({"max_psi": math.nan}, "max_psi", "greater than"),
        ({"evaluation_interval_s": 0}, "evaluation_interval_s", "greater than"),
        ({"max_psy": 0.1}, "max_psy", "Extra inputs"),
    ],
)
def test_policy_errors_name_the_field(data: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        RolloutPolicy.model_validate(data)
    errors = info.value.errors()
    assert [".".join(str(p) for p in e["loc"]) for e in errors] == [field]
    assert words in errors[0]["msg"]


def test_policy_is_frozen_and_round_trips_through_json() -> None:
    with pytest.raises(ValidationError):
        POLICY.max_psi = 1.0  # type: ignore[misc]
    assert RolloutPolicy.model_validate_json(POLICY.model_dump_json()) == POLICY


def test_rollout_state_derives_its_step_and_window() -> None:
    state = state_at(2500)
    assert state.step == 1
    assert state.window() == StepWindow("fraud", "r1", 1, "1", "2")
    with pytest.raises(ValueError, match="share_bp 300 is not a step"):
        state_at(300)
    with pytest.raises(ValueError, match="is the champion"):
        RolloutState("fraud", "r1", "1", "1", POLICY, 100, T0)
    with pytest.raises(ValueError, match="rollout_id"):
        RolloutState("fraud", "r 1", "1", "2", POLICY, 100, T0)


def test_rollout_document_is_the_persisted_json_of_a_rollout() -> None:
    stored = RolloutDocument(id="r1", policy=POLICY, step_started_at=T0).model_dump(mode="json")
    document = RolloutDocument.model_validate(stored)  # as read back from the routing state
    assert document.state("fraud", "1", "2", 2500) == RolloutState(
        "fraud", "r1", "1", "2", POLICY, 2500, T0
    )
    assert document.advanced(T0 + 5).state("fraud", "1", "2", 100).step_started_at == T0 + 5
    with pytest.raises(ValidationError) as info:
        RolloutDocument.model_validate({**stored, "id": "r 1"})
    assert [e["loc"] for e in info.value.errors()] == [("id",)]
    with pytest.raises(ValidationError) as info:
        RolloutDocument.model_validate({**stored, "policy": {"max_psi": -1}})
    assert [e["loc"] for e in info.value.errors()] == [("policy", "max_psi")]


# ----------------------------------------------------------------- decisions


def test_no_judgement_before_min_requests_even_for_a_terrible_canary() -> None:
    rng = random.Random(1)
    canary = traffic(rng, 399, error_rate=0.9)
    decision = evaluate(state_at(100), observe(canary, traffic(rng, 5000)), T0 + 1000)
    assert isinstance(decision, Hold)
    assert "399 of 400" in decision.reason


def test_erroring_canary_is_rolled_back_with_the_numbers() -> None:
    rng = random.Random(2)
    champion = traffic(rng, 20_000, error_rate=0.01)
    canary = traffic(rng, 2000, error_rate=0.05)
    decision = evaluate(state_at(100), observe(canary, champion), T0 + 5)
    assert isinstance(decision, Rollback)
    assert [b.check for b in decision.breaches] == ["error_rate"]
    ratio = decision.numbers["error_rate_ratio"]
    assert ratio == pytest.approx(canary.error_rate / champion.error_rate)
    assert ratio > 3.5
    assert f"error-rate ratio {ratio:.2f} > 2.00" in decision.reason
    assert f"of {canary.requests} requests" in decision.reason
    assert decision.numbers["canary_errors"] == canary.errors


def test_error_floor_sets_the_tolerance_when_the_champion_never_errs() -> None:
    champion = stats_of([0.002] * 10_000, [0.1] * 10_000)
    ok = stats_of([0.002] * 1000, [0.1] * 998, errors=2)  # 0.2% = 2 x floor
    assert isinstance(evaluate(state_at(100), observe(ok, champion), T0), Hold)
    bad = stats_of([0.002] * 1000, [0.1] * 997, errors=3)  # 0.3% = 3 x floor
    decision = evaluate(state_at(100), observe(bad, champion), T0)
    assert isinstance(decision, Rollback)
    assert decision.numbers["error_rate_ratio"] == pytest.approx(3.0)


def test_slow_canary_is_rolled_back_on_p99() -> None:
    rng = random.Random(4)
    champion = traffic(rng, 10_000, latency_s=0.002)
    canary = traffic(rng, 1000, latency_s=0.006)
    decision = evaluate(state_at(100), observe(canary, champion), T0)
    assert isinstance(decision, Rollback)
    assert [b.check for b in decision.breaches] == ["p99_latency"]
    assert decision.numbers["p99_latency_ratio"] > 2.0
    assert "p99 latency ratio" in decision.reason


def test_latency_floor_ignores_sub_millisecond_jitter() -> None:
    champion = stats_of([0.0001] * 1000, [0.1] * 1000)
    canary = stats_of([0.0008] * 1000, [0.1] * 1000)  # 8x slower, still under 1 ms
    decision = evaluate(state_at(100), observe(canary, champion), T0)
    assert isinstance(decision, Hold)


def test_shifted_scores_are_rolled_back_on_psi() -> None:
    rng = random.Random(5)
    champion = traffic(rng, 10_000)
    canary = traffic(rng, 1000, score_shift=0.15)
    decision = evaluate(state_at(100), observe(canary, champion), T0)
    assert isinstance(decision, Rollback)
    assert [b.check for b in decision.breaches] == ["psi"]
    assert decision.numbers["psi"] > 0.2
    assert f"score PSI {decision.numbers['psi']:.3f} > 0.200" in decision.reason


def test_every_breach_is_reported() -> None:
    rng = random.Random(6)
    champion = traffic(rng, 10_000, error_rate=0.01)
    canary = traffic(rng, 1000, error_rate=0.2, latency_s=0.02, score_shift=0.3)
    decision = evaluate(state_at(100), observe(canary, champion), T0)
    assert isinstance(decision, Rollback)
    assert [b.check for b in decision.breaches] == ["error_rate", "p99_latency", "psi"]
    assert decision.reason.count(";") == 2


def test_disabled_guard_never_trips() -> None:
    rng = random.Random(7)
    policy = POLICY.model_copy(update={"max_psi": math.inf})
    champion = traffic(rng, 10_000)
    canary = traffic(rng, 1000, score_shift=0.3)
    assert isinstance(evaluate(state_at(100, policy), observe(canary, champion), T0), Hold)


def test_healthy_canary_holds_then_advances_then_promotes() -> None:
    rng = random.Random(8)
    champion = traffic(rng, 10_000)
    canary = traffic(rng, 1000)
    held = evaluate(state_at(100), observe(canary, champion), T0 + 59.9)
    assert isinstance(held, Hold)
    assert "held 59.9s of 60s" in held.reason
    assert held.numbers["psi"] < 0.1
    advanced = evaluate(state_at(100), observe(canary, champion), T0 + 60)
    assert isinstance(advanced, Advance)
    assert (advanced.share_bp, advanced.step) == (2500, 1)
    assert "advancing to 2500 bp" in advanced.reason
    last = evaluate(state_at(2500), observe(canary, champion), T0 + 60)
    assert isinstance(last, Advance)
    assert last.share_bp == 10_000
    history = Observation(canary, WindowStats(), champion)
    promoted = evaluate(state_at(10_000), history, T0 + 61)
    assert isinstance(promoted, Promote)
    assert "promoting 2" in promoted.reason
    assert promoted.numbers["reference_is_history"] == 1.0


def test_reference_falls_back_to_history_and_holds_without_any() -> None:
    rng = random.Random(9)
    canary = traffic(rng, 1000, error_rate=0.05)
    thin = traffic(rng, 100, error_rate=0.05)
    history = thin + traffic(rng, 5000, error_rate=0.05)
    decision = evaluate(state_at(2500), Observation(canary, thin, history), T0 + 100)
    assert isinstance(decision, Advance)
    assert decision.numbers["reference_requests"] == history.requests
    starved = evaluate(state_at(2500), Observation(canary, thin, thin), T0 + 100)
    assert isinstance(starved, Hold)
    assert "champion has 100 of 400" in starved.reason


def test_a_bad_policy_is_named_field_by_field() -> None:
    from server.errors import InvalidInput
    from server.rollout.policy import new_rollout

    with pytest.raises(InvalidInput) as caught:
        new_rollout({"steps": [{"share_bp": 0, "hold_s": 1}], "max_psi": -1}, 100, 1.0)
    message = str(caught.value)
    assert message.startswith("rollout_json: ")
    assert "steps[0].share_bp: " in message and "max_psi: " in message
    assert "\n" not in message and "pydantic.dev" not in message
