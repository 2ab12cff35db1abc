"""One entity key: the same id in several raw spellings is one key for every writer,
and the server refuses every spelling but the canonical one, naming the entity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pytest

from feature_streams.backfill import BackfillError, backfill_table
from feature_streams.batch_load import iter_file_rows
from feature_streams.definitions import FeatureDefinitions, parse_definitions
from feature_streams.entity_keys import EntityKeyError, entity_key, key_problem
from feature_streams.events import MalformedEventError, validate_event
from feature_streams.windows import GroupPlan
from server.errors import InvalidInput
from server.features import FeatureLayout
from server.manifest import ModelManifest
from tests.support.model_factory import write_linear_model

REPO = Path(__file__).resolve().parents[2]
MIN = 60_000
T0 = 1_700_000_000_000

DEFS = """
version: 1
entities:
  card_id: {key_type: str}
  account_id: {key_type: int}
batch_groups:
  card_profile:
    entity: card_id
    fields: {card_limit: {dtype: float, default: 1.0}}
  account_profile:
    entity: account_id
    fields: {balance: {dtype: float, default: 0.0}}
stream_groups:
  card:
    topic: tx
    entity: card_id
    event_time_field: ts
    allowed_lateness: 10m
    tiles: [{size: 1m, max_window: 1h}]
    aggregations: [{name: card_n_1h, agg: count, window: 1h}]
  account:
    topic: tx
    entity: account_id
    event_time_field: ts
    allowed_lateness: 10m
    tiles: [{size: 1m, max_window: 1h}]
    aggregations: [{name: account_sum_1h, agg: sum, field: amount, window: 1h}]
"""

STR_SPELLINGS: tuple[object, ...] = ("c-1", " c-1", "c-1 ", "\tc-1\n")
INT_SPELLINGS: tuple[object, ...] = (42, "042", " 42 ", "42.0", 42.0, "+42")


@pytest.fixture
def defs() -> FeatureDefinitions:
    return parse_definitions(DEFS)


def test_the_rule() -> None:
    assert {entity_key("str", s) for s in STR_SPELLINGS} == {"c-1"}
    assert {entity_key("int", s) for s in INT_SPELLINGS} == {"42"}
    assert entity_key("str", "042") == "042"  # text keys keep leading zeros and case
    assert entity_key("str", " A b ") == "A b"
    assert entity_key("str", 7) == "7"
    assert entity_key("int", "-0") == "0"
    assert entity_key("int", "-007") == "-7"
    assert entity_key("int", "9" * 5000) == "9" * 5000  # no int() of untrusted text
    for bad in ("", "  ", True, None, 1.5, float("nan"), float("inf"), b"c-1", [1]):
        with pytest.raises(EntityKeyError):
            entity_key("str", bad)
    for bad in ("4.2e1", "1_000", "0x10", "42.5", "abc", "٤٢", "--4", "4 2"):
        with pytest.raises(EntityKeyError, match="is not an integer id"):
            entity_key("int", bad)


def test_only_canonical_keys_have_no_problem() -> None:
    assert key_problem("str", "c-1") is None
    assert key_problem("int", "42") is None
    assert key_problem("int", "-7") is None
    assert key_problem("str", " c-1") == "' c-1' is not a canonical str id (send 'c-1')"
    assert key_problem("int", "042") == "'042' is not a canonical int id (send '42')"
    assert key_problem("int", "x") == "'x' is not an integer id (key_type int)"
    assert key_problem("str", "") == "empty entity id (key_type str)"


def test_the_entity_keys_module_is_pure() -> None:
    probe = "import json, sys, feature_streams.entity_keys; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert [m for m in loaded if m.startswith("feature_streams.")] == [
        "feature_streams.entity_keys"
    ]
    assert not {"pydantic", "yaml", "asyncio", "redis", "server"} & set(loaded)


def test_event_keys_follow_the_entitys_rule(defs: FeatureDefinitions) -> None:
    card, account = GroupPlan.of(defs, "card"), GroupPlan.of(defs, "account")
    for s, n in zip(STR_SPELLINGS, INT_SPELLINGS, strict=False):
        event = {"card_id": s, "account_id": n, "ts": T0, "amount": 1.0}
        assert validate_event(card, event).key == "c-1"
        assert validate_event(account, event).key == "42"
    with pytest.raises(MalformedEventError) as caught:
        validate_event(account, {"card_id": "c-1", "account_id": "4.2e1", "ts": T0, "amount": 1})
    assert caught.value.field == "account_id"
    assert caught.value.group == "account"
    assert "'4.2e1' is not an integer id" in str(caught.value)
    with pytest.raises(MalformedEventError, match="empty entity id"):
        validate_event(card, {"card_id": "  ", "ts": T0})


def test_batch_files_key_every_spelling_alike(defs: FeatureDefinitions, tmp_path: Path) -> None:
    for i, (s, n) in enumerate(zip(STR_SPELLINGS, INT_SPELLINGS, strict=False)):
        cards = tmp_path / f"cards{i}.parquet"
        accounts = tmp_path / f"accounts{i}.csv"
        pq.write_table(pa.table({"card_id": [s], "card_limit": [2.0]}), cards)
        accounts.write_text(f"account_id,balance\n{n},3\n")
        assert [e for e, _ in iter_file_rows(defs, "card_profile", cards)] == ["c-1"]
        assert [e for e, _ in iter_file_rows(defs, "account_profile", accounts)] == ["42"]


def test_backfill_keys_spine_ids_and_event_keys_alike(defs: FeatureDefinitions) -> None:
    # events keyed in four spellings each, spine rows in four (other) spellings
    events = [
        {"card_id": s, "account_id": n, "ts": T0 + i * MIN, "amount": 1.0 + i}
        for i, (s, n) in enumerate(zip(STR_SPELLINGS, INT_SPELLINGS, strict=False))
    ]
    t = T0 + 10 * MIN
    spine = pa.table(
        {
            "card_id": ["\tc-1", "c-1", " c-1 ", "c-1\n"],
            "account_id": ["42", " 042", "42.0", "+42"],
            "ts_ms": [t] * 4,
        }
    )
    table, report = backfill_table(defs, events, spine, features=["card_n_1h", "account_sum_1h"])
    assert table.column("card_n_1h").to_pylist() == [4.0] * 4
    assert table.column("account_sum_1h").to_pylist() == [10.0] * 4
    assert report.defaulted_rows == {"card": 0, "account": 0}
    bad = pa.table({"account_id": ["42", "4.2e1"], "ts_ms": [t, t]})
    with pytest.raises(BackfillError, match=r"spine column 'account_id', row 2: '4.2e1'"):
        backfill_table(defs, events, bad, features=["account_sum_1h"])


def test_the_server_refuses_non_canonical_ids_naming_the_entity(
    defs: FeatureDefinitions, tmp_path: Path
) -> None:
    version_dir, _, _ = write_linear_model(
        tmp_path, "m", "1", ["card_limit", "balance", "card_n_1h", "account_sum_1h"]
    )
    manifest = ModelManifest.model_validate_json((version_dir / "manifest.json").read_text())
    layout = FeatureLayout.from_manifest(manifest, defs)
    prepared = layout.prepare({}, {"card_id": "c-1", "account_id": "42"}, T0)
    assert prepared.entity_ids == {"card_id": "c-1", "account_id": "42"}
    for entity, raw in [("card_id", s) for s in STR_SPELLINGS[1:]] + [
        ("account_id", n) for n in INT_SPELLINGS[1:] if isinstance(n, str)
    ]:
        with pytest.raises(InvalidInput) as caught:
            layout.prepare({}, {entity: str(raw)}, T0)
        assert caught.value.field == f"entity_ids.{entity}"
        assert "is not a canonical" in str(caught.value)
    with pytest.raises(InvalidInput) as caught:
        layout.prepare({}, {"account_id": ""}, T0)
    assert caught.value.field == "entity_ids.account_id"
    assert "empty entity id" in str(caught.value)
