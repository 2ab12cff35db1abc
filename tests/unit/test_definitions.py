"""The feature definition file: the demo file loads, bad files name the key path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from feature_streams.definitions import (
    AggKind,
    DefinitionError,
    FeatureSource,
    UndefinedFeaturesError,
    format_duration,
    load_definitions,
    parse_definitions,
    parse_duration,
    resolve_features,
)
from feature_streams.windows import GroupPlan

FEATURES_YAML = Path(__file__).resolve().parents[2] / "features.yaml"

DEMO_FEATURES = (
    "amount",
    "mcc",
    "channel",
    "hour_of_day",
    "day_of_week",
    "is_international",
    "card_present",
    "distance_from_home_km",
    "customer_age_years",
    "account_tenure_days",
    "credit_limit",
    "avg_amount_90d",
    "std_amount_90d",
    "txn_count_90d",
    "chargebacks_365d",
    "bureau_risk_score",
    "home_country_risk",
    "card_age_days",
    "preapproved_limit",
    "card_txn_count_5m",
    "card_txn_count_1h",
    "card_txn_count_24h",
    "card_amount_sum_1h",
    "card_amount_sum_24h",
    "card_amount_max_24h",
    "card_amount_mean_24h",
    "card_seconds_since_last_txn",
    "card_last_amount",
    "card_intl_count_24h",
    "merchant_txn_count_1h",
)

BASE: dict[str, Any] = {
    "entities": {"card_id": {"key_type": "str"}, "customer_id": {}},
    "batch_groups": {
        "profile": {
            "entity": "customer_id",
            "fields": {"age": {"dtype": "float", "default": 40.0}},
        }
    },
    "stream_groups": {
        "card_activity": {
            "topic": "transactions",
            "entity": "card_id",
            "event_time_field": "event_time_ms",
            "allowed_lateness": "5m",
            "tiles": [{"size": "1m", "max_window": "1h"}, {"size": "1h", "max_window": "7d"}],
            "aggregations": [
                {"name": "n_5m", "agg": "count", "window": "5m"},
                {"name": "sum_1h", "agg": "sum", "field": "amount", "window": "1h"},
                {"name": "max_24h", "agg": "max", "field": "amount", "window": "24h", "default": 0},
            ],
        }
    },
    "request_features": {"amount": {"dtype": "float", "gt": 0, "default": 1.0}},
}


def problems(raw: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(DefinitionError) as info:
        parse_definitions(yaml.safe_dump(raw), source="test.yaml")
    assert "test.yaml" in str(info.value)
    return info.value.problems


DELETE = object()


def edited(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base`` (default BASE) with the value at a dotted path (``[i]`` for
    list items) replaced, or removed when ``value`` is DELETE."""
    raw = copy.deepcopy(BASE if base is None else base)
    parts = path.replace("[", ".").replace("]", "").split(".")
    node: Any = raw
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(parts[-1]) if isinstance(node, list) else parts[-1]
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return raw


def test_demo_file_loads_and_resolves_the_30_demo_features() -> None:
    defs = load_definitions(FEATURES_YAML)
    resolved = resolve_features(defs, DEMO_FEATURES)
    assert [r.name for r in resolved.refs] == list(DEMO_FEATURES)
    sources = {r.name: (r.source, r.group, r.entity) for r in resolved.refs}
    assert sources["amount"] == (FeatureSource.REQUEST, None, None)
    assert sources["credit_limit"] == (FeatureSource.BATCH, "customer_profile", "customer_id")
    assert sources["card_age_days"] == (FeatureSource.BATCH, "card_profile", "card_id")
    assert sources["card_intl_count_24h"] == (FeatureSource.STREAM, "card_activity", "card_id")
    assert sources["merchant_txn_count_1h"] == (
        FeatureSource.STREAM,
        "merchant_activity",
        "merchant_id",
    )
    assert resolved.batch_groups == ("customer_profile", "card_profile")
    assert resolved.stream_groups == ("card_activity", "merchant_activity")
    # Every feature the file defines is one the demo model takes, and every one has a
    # default that is valid for it.
    for group in defs.stream_groups.values():
        GroupPlan.build(group)
    for req in defs.request_features.values():
        assert req.violation(req.default) is None


def test_demo_stream_group_shape() -> None:
    card = load_definitions(FEATURES_YAML).stream_groups["card_activity"]
    assert card.key == "card_id" and card.topic == "transactions"
    tiles = {a.name: card.tile_for(a) for a in card.aggregations}
    assert tiles["card_txn_count_5m"] == tiles["card_amount_sum_1h"] == 60_000
    assert tiles["card_txn_count_24h"] == 3_600_000
    assert tiles["card_last_amount"] == tiles["card_seconds_since_last_txn"] == 86_400_000
    intl = next(a for a in card.aggregations if a.name == "card_intl_count_24h")
    assert intl.agg is AggKind.COUNT and intl.where == {"is_international": 1}
    since = next(a for a in card.aggregations if a.agg is AggKind.TIME_SINCE_LAST)
    assert since.window_ms == 7 * 86_400_000 and since.default == 604_800.0


def test_undefined_names_are_all_reported() -> None:
    defs = load_definitions(FEATURES_YAML)
    with pytest.raises(UndefinedFeaturesError) as info:
        resolve_features(defs, ["amount", "nope_1", "credit_limit", "nope_2", "nope_1"])
    assert info.value.names == ("nope_1", "nope_2")
    assert "nope_1" in str(info.value) and "nope_2" in str(info.value)


def test_bad_duration_names_the_key_path() -> None:
    raw = edited("stream_groups.card_activity.aggregations[2].window", "5x")
    (problem,) = problems(raw)
    assert problem.startswith(
        "stream_groups.card_activity.aggregations[2].window: '5x' is not a duration"
    )
    (problem,) = problems(edited("stream_groups.card_activity.allowed_lateness", 300))
    assert problem.startswith("stream_groups.card_activity.allowed_lateness: 300 is not a")


def test_unknown_aggregation() -> None:
    raw = edited("stream_groups.card_activity.aggregations[1].agg", "median")
    (problem,) = problems(raw)
    assert problem.startswith("stream_groups.card_activity.aggregations[1].agg: 'median'")
    assert "time_since_last" in problem


def test_window_must_be_a_multiple_of_its_tile() -> None:
    raw = edited("stream_groups.card_activity.aggregations[0].window", "90s")
    assert problems(raw) == (
        "stream_groups.card_activity.aggregations[0].window: 90s is not a multiple of its "
        "tile size 1m",
    )
    raw = edited("stream_groups.card_activity.aggregations[0].window", "8d")
    (problem,) = problems(raw)
    assert problem.startswith("stream_groups.card_activity.aggregations[0].window: window 8d")
    agg = {"name": "n", "agg": "count", "window": "1h", "tile": "5m"}
    raw = edited("stream_groups.card_activity.aggregations[0]", agg)
    assert problems(raw) == (
        "stream_groups.card_activity.aggregations[0].tile: 5m is not one of the group's tiles",
    )


def test_duplicate_feature_names_across_groups() -> None:
    raw = edited("stream_groups.card_activity.aggregations[0].name", "age")
    assert problems(raw) == (
        "stream_groups.card_activity.aggregations[0].name: feature 'age' is already defined "
        "at batch_groups.profile.fields.age",
    )
    raw = edited("batch_groups.profile.fields.amount", {"dtype": "float", "default": 0.0})
    assert problems(raw) == (
        "batch_groups.profile.fields.amount: feature 'amount' is already defined at "
        "request_features.amount",
    )


def test_unknown_entity() -> None:
    raw = edited("stream_groups.card_activity.entity", "merchant_id")
    raw = edited("batch_groups.profile.entity", "account_id", base=raw)
    assert set(problems(raw)) == {
        "stream_groups.card_activity.entity: unknown entity 'merchant_id'",
        "batch_groups.profile.entity: unknown entity 'account_id'",
    }


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "stream_groups.card_activity.aggregations[1].field",
            DELETE,
            "stream_groups.card_activity.aggregations[1].field: required for sum",
        ),
        (
            "stream_groups.card_activity.aggregations[0].field",
            "amount",
            "stream_groups.card_activity.aggregations[0].field: count takes no field",
        ),
        (
            "stream_groups.card_activity.aggregations[2].default",
            DELETE,
            "stream_groups.card_activity.aggregations[2].default: required for max",
        ),
        (
            "stream_groups.card_activity.aggregations[0].colour",
            "red",
            "stream_groups.card_activity.aggregations[0].colour: unknown key",
        ),
        (
            "stream_groups.card_activity.topic",
            "",
            "stream_groups.card_activity.topic: '': String should have at least 1 character",
        ),
        (
            "request_features.amount.default",
            0.0,
            "request_features.amount.default: amount: 0.0 is not > 0.0",
        ),
        (
            "batch_groups.profile.fields.age.dtype",
            "int",
            "batch_groups.profile.fields.age.default: 40.0 is not an int",
        ),
        (
            "stream_groups.card_activity.aggregations[0].where",
            {"flag": [1]},
            "stream_groups.card_activity.aggregations[0].where.flag: [1] is not a bool, int "
            "or string",
        ),
    ],
)
def test_field_level_problems(path: str, value: Any, expected: str) -> None:
    assert problems(edited(path, value)) == (expected,)


def test_missing_key_and_every_problem_at_once() -> None:
    raw = edited("stream_groups.card_activity.topic", DELETE)
    raw = edited("stream_groups.card_activity.aggregations[0].window", "soon", base=raw)
    assert problems(raw) == (
        "stream_groups.card_activity.topic: required key is missing",
        "stream_groups.card_activity.aggregations[0].window: 'soon' is not a duration "
        "(use e.g. 500ms, 30s, 5m, 1h, 7d)",
    )


def test_duplicate_yaml_keys_are_refused() -> None:
    text = yaml.safe_dump(BASE) + "request_features: {}\n"
    with pytest.raises(DefinitionError, match="duplicate key 'request_features'"):
        parse_definitions(text)


def test_unreadable_or_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match="cannot read"):
        load_definitions(tmp_path / "missing.yaml")
    with pytest.raises(DefinitionError, match="expected a mapping"):
        parse_definitions("- 1\n- 2\n")
    with pytest.raises(DefinitionError, match="not valid YAML"):
        parse_definitions("a: [1\n")


def test_models_are_frozen() -> None:
    defs = parse_definitions(yaml.safe_dump(BASE))
    group = defs.stream_groups["card_activity"]
    with pytest.raises(ValidationError):
        group.topic = "other"  # type: ignore[misc]
    assert group.name == "card_activity" and group.key == "card_id"
    assert defs.batch_groups["profile"].fields["age"].name == "age"


def test_durations() -> None:
    assert parse_duration("5m") == 300_000
    assert parse_duration("250ms") == 250
    assert parse_duration("7d") == 604_800_000
    for bad in ("5", "0s", "-1m", "1w", "1.5h"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    assert [format_duration(ms) for ms in (300_000, 3_600_000, 90_000, 250, 86_400_000)] == [
        "5m",
        "1h",
        "90s",
        "250ms",
        "1d",
    ]


def test_request_feature_ranges() -> None:
    defs = load_definitions(FEATURES_YAML)
    amount, mcc = defs.request_features["amount"], defs.request_features["mcc"]
    assert amount.violation(0.01) is None
    assert amount.violation(0.0) == "amount: 0.0 is not > 0.0"
    assert amount.violation(float("nan")) == "amount: NaN is not allowed"
    assert amount.violation(float("inf")) == "amount: inf is not finite"
    assert mcc.violation(10_000) == "mcc: 10000 is not <= 9999.0"
    assert mcc.violation(5411.5) == "mcc: 5411.5 is not an integer"


# --- reason codes ----------------------------------------------------------------------


def test_demo_reasons_cover_every_demo_feature_once() -> None:
    defs = load_definitions(FEATURES_YAML)
    covered = [f for reason in defs.reasons.values() for f in reason.features]
    assert sorted(covered) == sorted(DEMO_FEATURES)
    assert all(reason.text and reason.code == code for code, reason in defs.reasons.items())
    shared = [r for r in defs.reasons.values() if len(r.features) > 1]
    assert shared  # correlated features share a code


def test_reasons_parse_with_code_from_key() -> None:
    raw = edited(
        "reasons", {"VEL": {"text": "Many recent transactions", "features": ["n_5m", "sum_1h"]}}
    )
    defs = parse_definitions(yaml.safe_dump(raw))
    assert defs.reasons["VEL"].code == "VEL"
    assert defs.reasons["VEL"].features == ("n_5m", "sum_1h")


def test_reasons_naming_unknown_features_are_refused_naming_them() -> None:
    raw = edited("reasons", {"X1": {"text": "t", "features": ["amount", "nope", "gone"]}})
    assert problems(raw) == ("reasons.X1.features: unknown features ['nope', 'gone']",)


def test_a_feature_in_two_reasons_is_refused() -> None:
    raw = edited(
        "reasons",
        {
            "A": {"text": "a", "features": ["amount", "n_5m"]},
            "B": {"text": "b", "features": ["n_5m"]},
        },
    )
    assert problems(raw) == ("reasons.B.features: 'n_5m' is already in reason 'A'",)


def test_reason_shape_errors_name_the_key() -> None:
    bad = problems(edited("reasons", {"A": {"text": "", "features": []}}))
    assert any(p.startswith("reasons.A.text") for p in bad)
    assert any(p.startswith("reasons.A.features") for p in bad)
    assert problems(edited("reasons", {"A": {"code": "B", "text": "t", "features": ["amount"]}}))
