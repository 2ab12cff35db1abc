"""``score-batch --reasons`` writes the Score answer's reason codes, row for row.

A server and ``score-batch --features online`` read the same Redis (batch profiles
loaded, stream features empty) for the same spine; every batch row's ``reasons`` (code,
text, contribution and the features behind each reason) must equal the reasons the
server answered for that row with ``explain`` set (contributions to 1e-12 relative:
TreeSHAP's sums vary in the last bits with the batch a row is explained in), and its
features and score the served ones. The demo tree models (with explainers) are
trained once for the module.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]
import pytest

from demo.synthetic import DEMO_FEATURES, make_population, sample_transactions
from feature_streams.batch_load import load_group_file
from feature_streams.definitions import load_definitions
from protos.streamscore.v1 import scoring_pb2 as pb
from server.batch_scoring.cli import main_score_batch
from tests.integration.test_reason_codes import FEATURES_YAML, demo_repo  # noqa: F401
from tests.integration.test_training_serving_consistency import profile_tables
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOP_N = 3


def _answer_reasons(answer: pb.ScoreResponse) -> list[dict[str, Any]]:
    return [
        {
            "code": r.code,
            "text": r.text,
            "contribution": r.contribution,
            "features": [
                {"name": f.name, "value": f.value, "contribution": f.contribution}
                for f in r.features
            ],
        }
        for r in answer.reasons
    ]


def _exact(reasons: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Codes, texts and the features behind them with their values, in order."""
    return [
        (r["code"], r["text"], [(f["name"], f["value"]) for f in r["features"]]) for r in reasons
    ]


def _contributions(reasons: list[dict[str, Any]]) -> list[float]:
    return [
        c for r in reasons for c in (r["contribution"], *(f["contribution"] for f in r["features"]))
    ]


async def test_batch_reasons_equal_the_online_answers(
    demo_repo: Path,  # noqa: F811
    redis_url: str,
    tmp_path: Path,
) -> None:
    definitions = load_definitions(FEATURES_YAML)
    population = make_population(np.random.default_rng(21), n_customers=60, n_merchants=20)
    for group, table in profile_tables(population, np.random.default_rng(22)).items():
        pq.write_table(table, path := tmp_path / f"{group}.parquet")
        await load_group_file(redis_url, definitions, group, path, progress=False)
    now_ms = int(time.time() * 1000)
    rows: list[dict[str, Any]] = [
        {
            "card_id": tx.card_id,
            "customer_id": tx.customer_id,
            "merchant_id": tx.merchant_id,
            "ts_ms": now_ms,
            **tx.request,
        }
        for tx in sample_transactions(np.random.default_rng(23), population, 80)
    ]
    pq.write_table(pa.Table.from_pylist(rows), spine := tmp_path / "spine.parquet")
    overrides = [
        f"features.definitions_path={FEATURES_YAML}",
        f"redis.url={redis_url}",
        f"models.per_model.fraud.reasons.top_n={TOP_N}",
        "features.fetch_timeout_s=10",
        "redis.socket_timeout_s=10",
    ]
    async with running_server(demo_repo, overrides) as srv:
        answers: list[pb.ScoreResponse] = await asyncio.gather(
            *(
                srv.scoring.Score(
                    pb.ScoreRequest(
                        model="fraud",
                        model_version="2",
                        entity_ids={
                            e: str(r[e]) for e in ("card_id", "customer_id", "merchant_id")
                        },
                        features={n: float(r[n]) for n in definitions.request_features},
                        explain=True,
                        echo_features=True,
                    ),
                    timeout=30,
                )
                for r in rows
            )
        )
    out = tmp_path / "scored.parquet"
    status = await asyncio.to_thread(  # --features online runs its own event loop
        main_score_batch,
        [
            *("--model", "fraud", "--version", "2", "--features", "online"),
            *("--input", str(spine), "--output", str(out)),
            *("--definitions", str(FEATURES_YAML)),
            *("--set", f"models.repository={demo_repo}", "--set", f"redis.url={redis_url}"),
            *("--set", f"models.per_model.fraud.reasons.top_n={TOP_N}"),
            *("--workers", "1", "--chunk-rows", "32", "--no-progress"),
            *("--with-features", "--reasons"),
        ],
    )
    assert status == 0
    batch = pq.read_table(out)
    assert batch.num_rows == len(rows)
    reasons = batch.column("reasons").to_pylist()
    scores = batch.column("score").to_pylist()
    codes = set()
    for i, answer in enumerate(answers):
        served = {f.name: f.value for f in answer.features}
        assert [batch.column(f"feature.{n}")[i].as_py() for n in DEMO_FEATURES] == [
            served[n] for n in DEMO_FEATURES
        ], f"row {i}: features differ"
        assert scores[i] == answer.score
        assert 1 <= len(answer.reasons) <= TOP_N
        want = _answer_reasons(answer)
        assert _exact(reasons[i]) == _exact(want), f"row {i}"
        # TreeSHAP sums differ in the last bits with the batch a row is explained in
        # (the server explains concurrent rows together): equal to ~1e-15 relative
        assert _contributions(reasons[i]) == pytest.approx(_contributions(want), rel=1e-12)
        codes |= {r["code"] for r in reasons[i]}
    # the catalogue's codes (features.yaml), not bare feature names; several seen
    assert codes <= {r.code for r in definitions.reasons.values()} and len(codes) >= 3
    assert not codes & set(DEMO_FEATURES)
