"""Routing churn under load: promote, roll back, shift the canary, load and unload
versions while concurrent Score calls run. No call fails, and every answer comes
from a version that was routed (champion or canary) while that call was open."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from protos.streamscore.v1 import admin_pb2 as apb
from server.routing.store import FileRoutingStore
from tests.conftest import TEST_FEATURES
from tests.support.admin import CREDENTIALS, AdminServer, admin_server, score_request
from tests.support.model_factory import write_linear_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WORKERS = 16
CYCLES = 5


@dataclass(frozen=True)
class Change:
    """One admin call: when it was open, and what answered afterwards."""

    started: float
    ended: float
    answering: frozenset[str]


@dataclass(frozen=True)
class Answer:
    sent: float
    received: float
    version: str


def _answering(response: apb.ChangeResponse) -> frozenset[str]:
    routing = response.model.state.routing
    canary = {routing.canary.version} if routing.HasField("canary") else set()
    return frozenset({routing.champion, *canary})


async def _churn(admin: AdminServer, changes: list[Change]) -> None:
    stub, m = admin.stub, CREDENTIALS
    steps: list[Callable[[], Awaitable[apb.ChangeResponse]]] = [
        lambda: admin.route(canary="2", share_bp=1000),
        lambda: admin.route(canary="2", share_bp=5000),
        lambda: stub.Promote(apb.PromoteRequest(endpoint="lin", reason="churn"), metadata=m),
        lambda: stub.LoadVersion(apb.LoadVersionRequest(endpoint="lin", version="4"), metadata=m),
        lambda: admin.route(canary="4", share_bp=3000, shadows=["3"]),
        lambda: admin.route(canary="3", share_bp=8000),
        lambda: admin.route(),
        lambda: stub.UnloadVersion(
            apb.UnloadVersionRequest(endpoint="lin", version="4"), metadata=m
        ),
        lambda: stub.Rollback(apb.RollbackRequest(endpoint="lin"), metadata=m),
    ]
    loop = asyncio.get_running_loop()
    for _ in range(CYCLES):
        for step in steps:
            started = loop.time()
            response = await step()
            changes.append(Change(started, loop.time(), _answering(response)))
            await asyncio.sleep(0.005)  # pacing, so calls run under every state


async def _load(admin: AdminServer, stop: asyncio.Event, seed: int) -> tuple[list[Answer], int]:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    answers: list[Answer] = []
    failures = 0
    while not stop.is_set():
        card = f"card-{rng.randrange(100_000)}" if rng.random() < 0.9 else None
        sent = loop.time()
        try:
            response = await admin.srv.scoring.Score(score_request(card), timeout=10)
        except Exception:
            failures += 1
            continue
        answers.append(Answer(sent, loop.time(), response.model_version))
    return answers, failures


def _allowed(answer: Answer, initial: frozenset[str], changes: list[Change]) -> frozenset[str]:
    """Versions of every state that may have been in force while ``answer`` was open.

    State i (after change i) is in force no earlier than change i started and no
    later than change i+1 ended."""
    allowed: set[str] = set()
    states = [(float("-inf"), initial), *((c.started, c.answering) for c in changes)]
    for i, (since, answering) in enumerate(states):
        until = changes[i].ended if i < len(changes) else float("inf")
        if since <= answer.received and until >= answer.sent:
            allowed |= answering
    return frozenset(allowed)


async def test_churn_under_load_fails_no_call(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    for version in ("1", "2", "3", "4"):
        write_linear_model(repository, "lin", version, TEST_FEATURES, seed=int(version))
    overrides = ["models.per_model.lin.versions=[1, 2, 3]", "models.per_model.lin.champion=1"]
    async with admin_server(repository, overrides) as admin:
        initial = frozenset({(await admin.model()).state.routing.champion})
        assert initial == {"1"}
        stop = asyncio.Event()
        load = [asyncio.create_task(_load(admin, stop, seed)) for seed in range(WORKERS)]
        changes: list[Change] = []
        try:
            await _churn(admin, changes)
        finally:
            stop.set()
            results = await asyncio.gather(*load)
    answers = [a for batch, _ in results for a in batch]
    assert sum(failures for _, failures in results) == 0
    assert len(changes) == CYCLES * 9
    assert len(answers) > 300  # the load ran throughout
    assert {a.version for a in answers} == {"1", "2", "3", "4"}
    wrong = [
        (a, _allowed(a, initial, changes))
        for a in answers
        if a.version not in _allowed(a, initial, changes)
    ]
    assert wrong == []


async def test_routing_away_and_unloading_seen_at_once_fails_no_call(tmp_path: Path) -> None:
    """Another process's two changes (canary removed, then its version unloaded) reach
    this one in a single poll: it must route away before it unloads."""
    repository = tmp_path / "models"
    for version in ("1", "2"):
        write_linear_model(repository, "lin", version, TEST_FEATURES, seed=int(version))
    async with admin_server(repository, ["models.per_model.lin.champion=1"]) as admin:
        await admin.route(canary="2", share_bp=10_000)
        controller = admin.srv.app.routing
        assert controller is not None
        stop = asyncio.Event()
        load = [asyncio.create_task(_load(admin, stop, seed)) for seed in range(WORKERS)]
        try:
            store = FileRoutingStore(repository / ".routing.json")
            current = await store.read()
            endpoint = current.endpoints["lin"]
            jumped = current.with_endpoint(
                "lin", replace(endpoint, canary=None, loaded=("1",), revision=current.revision + 1)
            )
            assert await store.commit(current.revision, jumped, [])
            await asyncio.wait_for(controller.wait_applied(jumped.revision), 2)
        finally:
            stop.set()
            results = await asyncio.gather(*load)
        assert not admin.srv.app.registry.has("lin", "2")
    assert sum(failures for _, failures in results) == 0
    assert {a.version for batch, _ in results for a in batch} == {"1", "2"}
