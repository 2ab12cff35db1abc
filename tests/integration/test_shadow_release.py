"""Unloading a shadowed version drops its shadow lane: its task ends and the runner keeps
no reference to the version (so its ONNX Runtime session can go)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from protos.streamscore.v1 import scoring_pb2 as pb
from server.routing.changes import Actor
from tests.conftest import TEST_FEATURES
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_unloading_a_shadowed_version_drops_its_lane(linear_repository: Path) -> None:
    async with running_server(linear_repository, ["shadow.records_topic=null"]) as srv:
        app = srv.app
        changes, shadows = app.routing_changes, app.shadows
        assert changes is not None and shadows is not None
        actor = Actor("test")
        await changes.set_routing(
            "lin", champion=None, canary=None, shadows=("1",), rollout=None, actor=actor, reason="t"
        )
        for i in range(5):
            request = pb.ScoreRequest(model="lin", features=dict.fromkeys(TEST_FEATURES, i / 5))
            assert (await srv.scoring.Score(request)).model_version == "2"
        assert shadows.lanes() == [("lin", "1")]
        lane = shadows._lanes[("lin", "1")]  # white box: the lane's task and its version
        task = lane.task
        assert task is not None and not task.done()
        released = weakref.ref(lane)  # the lane holds the version and its model
        del lane

        await changes.set_routing(
            "lin", champion=None, canary=None, shadows=(), rollout=None, actor=actor, reason="t"
        )
        await changes.unload_version("lin", "1", actor, "no longer shadowed")
        assert not app.registry.has("lin", "1")
        assert shadows.lanes() == []
        assert task.done() and not task.cancelled()  # drained and ended, not killed
        gc.collect()
        assert released() is None  # neither runner nor task holds the lane (and version)
        # The live path keeps answering.
        request = pb.ScoreRequest(model="lin", features=dict.fromkeys(TEST_FEATURES, 0.1))
        assert (await srv.scoring.Score(request)).model_version == "2"
