"""A lone caller's row explained at once on the loop: when it is, and what it answers.

A small random tree ensemble (the engines' test harness) behind a real
:class:`VersionReasons`; the wiring in the server is tested end to end in
``tests/integration/test_reason_codes.py``.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from server.errors import DeadlineExceeded, InferenceFailed
from server.explain.explainer import TreeExplainer
from server.explain.reasons import ReasonCatalogue, ReasonSpec
from server.explain.service import ReasonPolicy, VersionReasons
from server.explain.treeshap import PathTable
from tests.unit.test_treeshap_engines import INTERVAL_MODES, random_ensemble, rows_on_the_grid

pytestmark = pytest.mark.timeout(30)


def reasons(policy: ReasonPolicy) -> VersionReasons:
    ensemble, covers = random_ensemble(11, INTERVAL_MODES)
    features = tuple(f"f{i}" for i in range(ensemble.n_features))
    explainer = TreeExplainer("m", "1", features, ensemble, PathTable.build(ensemble, covers))
    catalogue = ReasonCatalogue.build(
        [ReasonSpec(code=f, text=f, features=(f,)) for f in features], features
    )
    return VersionReasons(explainer, catalogue, policy)


def spy_threads(version: VersionReasons, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per explain_now call: True when it ran on the loop's (main) thread."""
    calls: list[bool] = []
    explain_now = version.explain_now

    def spy(x: np.ndarray) -> list:  # type: ignore[type-arg]
        calls.append(threading.current_thread() is threading.main_thread())
        return explain_now(x)

    monkeypatch.setattr(version, "explain_now", spy)
    return calls


async def test_inline_only_when_asked_measured_and_within_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = reasons(ReasonPolicy(when="always", inline_max_s=10.0))
    calls = spy_threads(version, monkeypatch)
    version.start()
    x = rows_on_the_grid(4, n=4).astype(np.float32)
    try:
        batched = await version.explain(x[:1], None, loop_idle=True)
        assert calls == [False] and 0 < version.row_seconds < 10.0  # first one measured
        inline = await version.explain(x[:1], None, loop_idle=True)
        assert calls == [False, True]
        assert inline == batched  # same reasons either way
        await version.explain(x[:1], None)  # the caller does not vouch for the loop
        assert calls == [False, True, False]
        version.row_seconds = 11.0  # over the budget
        await version.explain(x[:1], None, loop_idle=True)
        assert calls[-1] is False
    finally:
        await version.close()


async def test_inline_is_off_at_a_zero_budget_and_while_rows_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    off = reasons(ReasonPolicy(inline_max_s=0.0))
    off.row_seconds = 1e-6
    calls = spy_threads(off, monkeypatch)
    x = rows_on_the_grid(4, n=8).astype(np.float32)
    off.start()
    try:
        await off.explain(x[:1], None, loop_idle=True)
        assert calls == [False]
    finally:
        await off.close()
    busy = reasons(ReasonPolicy(inline_max_s=10.0))
    busy.row_seconds = 1e-6
    calls = spy_threads(busy, monkeypatch)
    busy.start()
    try:
        queued = [asyncio.ensure_future(busy.explain(x[i : i + 1], None)) for i in range(4)]
        await asyncio.sleep(0)  # queued in the batcher: the next row joins them
        await busy.explain(x[4:5], None, loop_idle=True)
        await asyncio.gather(*queued)
        assert not any(calls)
    finally:
        await busy.close()


async def test_inline_deadline_and_failure_are_errors_like_the_batched_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = reasons(ReasonPolicy(inline_max_s=10.0))
    version.row_seconds = 1e-6
    version.start()
    x = rows_on_the_grid(4, n=1).astype(np.float32)
    try:
        past = asyncio.get_running_loop().time() - 1.0
        with pytest.raises(DeadlineExceeded):
            await version.explain(x, past, loop_idle=True)

        def broken(_: np.ndarray) -> list:  # type: ignore[type-arg]
            raise RuntimeError("boom")

        monkeypatch.setattr(version, "explain_now", broken)
        with pytest.raises(InferenceFailed, match="boom"):
            await version.explain(x, None, loop_idle=True)
    finally:
        await version.close()


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="inline_max_ms"):
        ReasonPolicy(inline_max_s=-1.0)
