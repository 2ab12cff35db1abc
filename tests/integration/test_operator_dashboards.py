"""deploy/grafana/streamscore.json and deploy/prometheus/alerts.yaml: valid, and every
metric they query is one a running server or stream worker really exports (the
server serves a version with a reference profile, so its drift gauges are set)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devstack.services import KafkaBroker, free_port
from feature_streams.definitions import parse_definitions
from feature_streams.stream_job import StreamWorker, WorkerConfig
from feature_streams.topics import ensure_topics
from protos.streamscore.v1 import scoring_pb2 as pb
from tests.conftest import TEST_FEATURES
from tests.support.drift import write_reference_profile
from tests.support.model_factory import write_linear_model
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "streamscore.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
METRIC = re.compile(r"\bstreamscore_[a-z0-9_]+\b")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_operator_signals() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    text = json.dumps(alerts)
    for needed in (
        "streamscore:slow_request_ratio",  # SLO burn on p99
        "streamscore:error_ratio",  # SLO burn on errors
        "streamscore_feature_freshness_seconds_bucket",
        "streamscore_stream_consumer_lag",
        "streamscore_record_sink_dropped_total",
        "streamscore_degraded_answers_total",
        "streamscore_drift_psi",
        "streamscore_drift_score_psi",
        "streamscore_drift_defaulted_share",
    ):
        assert needed in text, needed
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("page", "ticket")
        assert alert["annotations"]["summary"]


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("requests", "latency", "batch size", "queue depth", "freshness", "lag",
                  "canary", "shadow", "degraded", "drift"):  # fmt: skip
        assert topic in titles, topic
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _sample_names(text: str) -> set[str]:
    """Every sample name the exposition can carry, per family type."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "stateset": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


async def _worker_exposition(kafka: KafkaBroker, redis_url: str) -> str:
    topic = f"dash-{uuid.uuid4().hex[:8]}"
    text = (ROOT / "features.yaml").read_text().replace("topic: transactions", f"topic: {topic}")
    await ensure_topics(kafka.bootstrap_servers, {topic: 2})
    config = WorkerConfig(
        bootstrap_servers=kafka.bootstrap_servers,
        redis_url=redis_url,
        group_id=f"dash-{uuid.uuid4().hex[:8]}",
        metrics_port=0,
    )
    async with StreamWorker(config, parse_definitions(text)) as worker:
        task = asyncio.create_task(worker.run())
        try:
            assert worker.metrics_port is not None
            return await asyncio.to_thread(_scrape, worker.metrics_port)
        finally:
            worker.request_stop()
            await task


async def test_every_queried_metric_is_exported(
    tmp_path: Path, redis_url: str, kafka: KafkaBroker
) -> None:
    overrides = [
        f"server.metrics_port={free_port()}",
        "routing.store=redis",  # the rollout controller and its metrics run with Redis
        f"redis.url={redis_url}",
        "drift.flush_interval_s=0.1",
        "drift.evaluate_interval_s=0.1",
    ]
    version_dir, weights, bias = write_linear_model(
        tmp_path / "models", "lin", "1", TEST_FEATURES, seed=1
    )
    write_reference_profile(version_dir, weights, bias, rows=2000)
    async with running_server(tmp_path / "models", overrides) as srv:
        await srv.scoring.Score(
            pb.ScoreRequest(model="lin", features={f: 0.5 for f in TEST_FEATURES}), timeout=5
        )
        drift = srv.app.drift
        assert drift is not None
        for _ in range(200):  # the first evaluation sets the drift gauges
            view = drift.view("lin", "1")
            if view is not None and view.short.rows:
                break
            await asyncio.sleep(0.05)
        server_text = await asyncio.to_thread(_scrape, srv.app.metrics_port)
        assert 'streamscore_drift_psi{feature="f0",model="lin",version="1"}' in server_text
    exported = _sample_names(server_text) | _sample_names(
        await _worker_exposition(kafka, redis_url)
    )
    assert (
        "streamscore_requests_total" in exported and "streamscore_stream_events_total" in exported
    )

    used: dict[str, set[str]] = {}
    for source, queries in (("dashboard", dashboard_queries()), ("alerts", alert_queries())):
        for query in queries:
            for name in METRIC.findall(query):
                used.setdefault(name, set()).add(source)
    assert len(used) > 20
    missing = {name: sorted(sources) for name, sources in used.items() if name not in exported}
    assert not missing, f"queried but not exported: {missing}"
