"""Every input bounded: string lengths and map/repeated counts at decode (INVALID_ARGUMENT
naming the field and the limit), v2 outputs deduplicated, event_time within the
configured skew unless the caller holds ``features.allow_overrides``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as v2
from protos.streamscore.v1 import scoring_pb2 as pb
from tests.conftest import TEST_FEATURES
from tests.support.server import running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NOW_S = 1_800_000_000.0
WIDTH = len(TEST_FEATURES)


def _request(**kwargs: object) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        model="lin",
        features={name: 0.5 for name in TEST_FEATURES},
        **kwargs,  # type: ignore[arg-type]
    )


def _infer(**kwargs: object) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="lin", **kwargs)  # type: ignore[arg-type]
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, WIDTH])
    tensor.contents.fp32_contents.extend([0.5] * WIDTH)
    return request


def _many_features(r: pb.ScoreRequest) -> None:
    r.features.update({f"x{i}": 1.0 for i in range(1025)})


def _long_name_instead(r: pb.ScoreRequest) -> None:
    """Every column sent, but one under a long name (the request-only shape check)."""
    value = r.features.pop(TEST_FEATURES[0])
    r.features["f" * 200] = value


def _many_entities(r: pb.ScoreRequest) -> None:
    r.entity_ids.update({f"e{i}": "1" for i in range(33)})


SCORE_CASES: list[tuple[str, Callable[[pb.ScoreRequest], object], str]] = [
    ("request-id", lambda r: setattr(r, "request_id", "i" * 257), "request_id: 257 characters "),
    ("model", lambda r: setattr(r, "model", "m" * 129), "model: 129 characters"),
    ("version", lambda r: setattr(r, "model_version", "v" * 129), "model_version: 129"),
    ("feature-name", lambda r: r.features.__setitem__("f" * 200, 1.0), "features['fff"),
    ("feature-name-only", _long_name_instead, "features['fff"),
    ("features", _many_features, "features: 1033 entries exceed the limit of 1024"),
    ("entity-id", lambda r: r.entity_ids.__setitem__("card", "c" * 300), "entity_ids.card: 300"),
    ("entity-name", lambda r: r.entity_ids.__setitem__("e" * 129, "1"), "entity_ids['eee"),
    ("entities", _many_entities, "entity_ids: 33 entries exceed the limit of 32"),
]


@pytest.mark.parametrize(
    ("mutate", "needle"), [c[1:] for c in SCORE_CASES], ids=[c[0] for c in SCORE_CASES]
)
async def test_score_strings_and_maps_are_bounded(
    linear_repository: Path, mutate: Callable[[pb.ScoreRequest], object], needle: str
) -> None:
    request = _request()
    mutate(request)
    async with running_server(linear_repository) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.scoring.Score(request)
        stream = [a async for a in srv.scoring.ScoreStream(iter([request, _request()]))]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert needle in details and "(server.limits." in details, details
    assert len(details) < 300  # the offending value is never echoed whole
    failed, ok = stream
    assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert needle in failed.error.message
    assert len(failed.request_id) <= 256 and len(failed.model) <= 128  # echoed only truncated
    assert not ok.HasField("error")


def _many_outputs(r: v2.ModelInferRequest) -> None:
    for _ in range(65):
        r.outputs.add(name="label")


def _long_parameter(r: v2.ModelInferRequest) -> None:
    r.parameters["note"].string_param = "p" * 1025


def _many_parameters(r: v2.ModelInferRequest) -> None:
    for i in range(65):
        r.parameters[f"k{i}"].bool_param = True


def _many_inputs(r: v2.ModelInferRequest) -> None:
    for i in range(16):
        r.inputs.add(name=f"in{i}")


V2_CASES: list[tuple[str, Callable[[v2.ModelInferRequest], object], str]] = [
    ("id", lambda r: setattr(r, "id", "i" * 300), "id: 300 characters exceed the limit of 256"),
    ("model", lambda r: setattr(r, "model_name", "m" * 129), "model_name: 129"),
    ("outputs", _many_outputs, "outputs: 65 entries exceed the limit of 64"),
    ("output-name", lambda r: r.outputs.add(name="o" * 200), "outputs[0].name: 200"),
    ("input-name", lambda r: setattr(r.inputs[0], "name", "n" * 129), "inputs[0].name: 129"),
    ("inputs", _many_inputs, "inputs: 17 entries exceed the limit of 16"),
    ("parameter", _long_parameter, "parameters.note.string_param: 1025"),
    ("parameters", _many_parameters, "parameters: 65 entries exceed the limit of 64"),
]


@pytest.mark.parametrize(
    ("mutate", "needle"), [c[1:] for c in V2_CASES], ids=[c[0] for c in V2_CASES]
)
async def test_v2_strings_and_repeated_fields_are_bounded(
    linear_repository: Path, mutate: Callable[[v2.ModelInferRequest], object], needle: str
) -> None:
    request = _infer()
    mutate(request)
    async with running_server(linear_repository) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.inference.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert needle in details and "(server.limits." in details, details


async def test_v2_outputs_asked_twice_are_answered_once_and_unknown_ones_refused(
    linear_repository: Path,
) -> None:
    request = _infer()
    for name in ("label", "probabilities", "label", "label"):
        request.outputs.add(name=name)
    unknown = _infer()
    unknown.outputs.add(name="nope")
    async with running_server(linear_repository) as srv:
        response = await srv.inference.ModelInfer(request)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await srv.inference.ModelInfer(unknown)
    assert [o.name for o in response.outputs] == ["label", "probabilities"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outputs[0].name" in (caught.value.details() or "")


def _at(seconds: float) -> pb.ScoreRequest:
    request = _request()
    request.event_time.FromMilliseconds(int(seconds * 1000))
    return request


async def test_event_time_is_bounded_to_the_skew_unless_overrides_are_permitted(
    linear_repository: Path,
) -> None:
    async with running_server(
        linear_repository, ["server.limits.event_time_skew_s=60"], clock=lambda: NOW_S
    ) as srv:
        within = [await srv.scoring.Score(_at(NOW_S + d)) for d in (-59, 0, 59)]
        refused = []
        for delta in (-3600, 120):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await srv.scoring.Score(_at(NOW_S + delta))
            refused.append(caught.value)
        replayed = await srv.scoring.Score(_at(NOW_S - 86_400), metadata=srv.overrides)
        wrong_token = (("x-streamscore-override-token", "guess"),)
        with pytest.raises(grpc.aio.AioRpcError) as guessed:
            await srv.scoring.Score(_at(NOW_S - 86_400), metadata=wrong_token)

        async def items() -> AsyncIterator[pb.ScoreRequest]:
            yield _at(NOW_S - 86_400)

        streamed = [a async for a in srv.scoring.ScoreStream(items(), metadata=srv.overrides)]
    assert all(r.model == "lin" for r in within)
    for error in (*refused, guessed.value):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error.details() or ""
        assert "event_time" in details and "60 s" in details, details
        assert "features.allow_overrides" in details
    assert replayed.model == "lin" and not streamed[0].HasField("error")


async def test_v2_rows_count_against_the_queue_bound(linear_repository: Path) -> None:
    """max_queue_rows below a v2 call's rows: the call cannot be queued (RESOURCE_EXHAUSTED
    never, INVALID_ARGUMENT for a call larger than a batch) and settings refuse it."""
    from server.settings import SettingsError
    from tests.support.server import settings_for_test

    with pytest.raises(SettingsError, match="max_queue_rows"):
        settings_for_test(
            linear_repository,
            "models.defaults.max_batch_size=64",
            "models.defaults.max_queue_rows=32",
        )
    rows = np.zeros((8, WIDTH), np.float32)
    request = v2.ModelInferRequest(model_name="lin")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[8, WIDTH])
    tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    async with running_server(
        linear_repository, ["models.defaults.max_batch_size=8", "models.defaults.max_queue_rows=8"]
    ) as srv:
        response = await srv.inference.ModelInfer(request)
        loaded = srv.app.registry.get("lin", response.model_version)
    assert loaded.batcher.policy.max_queue_rows == 8
