"""The hot-path bench: the floor server's empty and bare handlers answer correctly, and
``bench.perf_bench`` parses its arguments, computes its ratios and (when perf_analyzer is
installed) runs end to end for a tiny duration. Nothing here asserts on timing."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import numpy as np
import pytest

from bench import perf_analyzer
from bench.floor_server import FLOOR_SCORE, MAX_BATCH_SIZE, Handler, build_server
from bench.perf_bench import (
    GOALS,
    BenchConfig,
    Measurement,
    base_goals,
    build_parser,
    compute_ratios,
    config_from_args,
    medians,
    run_bench,
    server_order,
)
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.streamscore.v1 import scoring_pb2, scoring_pb2_grpc
from tests.conftest import TEST_FEATURES
from tests.support.model_factory import linear_scores, write_linear_model

pytestmark = pytest.mark.integration


@pytest.fixture
def model_dir(tmp_path: Path) -> tuple[Path, np.ndarray, float]:
    return write_linear_model(tmp_path / "models", "lin", "1", TEST_FEATURES, seed=3)


async def _serve(handler: Handler, model_dir: Path | None) -> tuple[grpc.aio.Server, str]:
    server, port = build_server(
        "127.0.0.1", 0, reuse_port=False, handler=handler, model_dir=model_dir
    )
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def bare(
    model_dir: tuple[Path, np.ndarray, float],
) -> AsyncIterator[grpc.aio.Channel]:
    server, target = await _serve("bare", model_dir[0])
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            yield channel
    finally:
        await server.stop(None)


def _infer_request(rows: np.ndarray, *, raw: bool) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="lin", id="req-7")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    if raw:
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
async def test_bare_v2_runs_the_model_and_echoes_the_id(
    bare: grpc.aio.Channel, model_dir: tuple[Path, np.ndarray, float], raw: bool
) -> None:
    _, weights, bias = model_dir
    rows = np.random.default_rng(0).normal(size=(3, len(TEST_FEATURES))).astype(np.float32)
    stub = v2_grpc.GRPCInferenceServiceStub(bare)
    response = await stub.ModelInfer(_infer_request(rows, raw=raw))
    assert response.id == "req-7"
    assert [o.name for o in response.outputs] == ["label", "probabilities"]
    probabilities = response.outputs[1]
    assert list(probabilities.shape) == [3, 2] and probabilities.datatype == "FP32"
    if raw:
        values = np.frombuffer(response.raw_output_contents[1], dtype="<f4").reshape(3, 2)
    else:
        values = np.array(probabilities.contents.fp32_contents).reshape(3, 2)
    np.testing.assert_allclose(values[:, 1], linear_scores(rows, weights, bias), rtol=1e-5)

    # The caller's requested outputs only.
    request = _infer_request(rows, raw=raw)
    request.outputs.add(name="label")
    only = await stub.ModelInfer(request)
    assert [o.name for o in only.outputs] == ["label"] and only.outputs[0].datatype == "INT64"


async def test_bare_score_and_stream_score_the_features_in_manifest_order(
    bare: grpc.aio.Channel, model_dir: tuple[Path, np.ndarray, float]
) -> None:
    _, weights, bias = model_dir
    row = (np.arange(len(TEST_FEATURES)) / 10).astype(np.float32)
    features = dict(zip(TEST_FEATURES, row.tolist(), strict=True))
    expected = float(linear_scores(row.reshape(1, -1), weights, bias)[0])
    stub = scoring_pb2_grpc.ScoringStub(bare)
    answer = await stub.Score(
        scoring_pb2.ScoreRequest(model="lin", request_id="s1", features=features)
    )
    assert answer.request_id == "s1" and answer.score == pytest.approx(expected, rel=1e-5)

    requests = [
        scoring_pb2.ScoreRequest(model="lin", request_id=f"s{i}", features=features)
        for i in range(3)
    ]
    answers = [r async for r in stub.ScoreStream(iter(requests))]
    assert [a.request_id for a in answers] == ["s0", "s1", "s2"]
    assert all(a.score == pytest.approx(expected, rel=1e-5) for a in answers)

    # An absent feature goes in as NaN (the bare handler does no validation).
    partial = await stub.Score(scoring_pb2.ScoreRequest(model="lin", features={"f0": 1.0}))
    assert math.isnan(partial.score)


@pytest.mark.parametrize("handler", ["empty", "bare"])
async def test_metadata_describes_the_model_for_perf_analyzer(
    model_dir: tuple[Path, np.ndarray, float], handler: Handler
) -> None:
    server, target = await _serve(handler, model_dir[0])
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerMetadata(v2.ServerMetadataRequest())).name
            meta = await stub.ModelMetadata(v2.ModelMetadataRequest(name="lin"))
            (tensor,) = meta.inputs
            assert (tensor.name, tensor.datatype) == ("features", "FP32")
            assert list(tensor.shape) == [-1, len(TEST_FEATURES)]
            config = (await stub.ModelConfig(v2.ModelConfigRequest(name="lin"))).config
            assert config.max_batch_size == MAX_BATCH_SIZE
            assert list(config.input[0].dims) == [len(TEST_FEATURES)]
            assert [o.name for o in config.output] == [o.name for o in meta.outputs]
            rows = np.ones((2, len(TEST_FEATURES)), dtype=np.float32)
            response = await stub.ModelInfer(_infer_request(rows, raw=False))
            assert response.id == "req-7"
            if handler == "empty":
                assert list(response.outputs[0].contents.fp32_contents) == [FLOOR_SCORE] * 2
    finally:
        await server.stop(None)


def test_bare_handler_needs_a_model() -> None:
    with pytest.raises(ValueError, match="model_dir"):
        build_server("127.0.0.1", 0, reuse_port=False, handler="bare")


# --- perf_bench: arguments and results (pure) ------------------------------------------


def _m(r: int, server: str, workload: str, throughput: float, p50: float) -> Measurement:
    return Measurement(r, server, workload, throughput, p50, p50 * 2)


def test_ratios_are_per_round_then_median() -> None:
    measurements = []
    for r, (ours, bare, empty) in enumerate([(100, 80, 50), (110, 100, 60), (90, 60, 70)]):
        measurements += [
            _m(r, "streamscore", "v2 c1", 0, ours),
            _m(r, "bare", "v2 c1", 0, bare),
            _m(r, "streamscore", "v2 c16", 1000 - r, 0),
            _m(r, "empty", "v2 c16", 1000 + empty, 0),
        ]
    ratios = {ratio.name: ratio for ratio in compute_ratios(measurements)}
    p50 = ratios["v2 c1 p50 streamscore/bare"]
    assert p50.per_round == pytest.approx([1.25, 1.1, 1.5])
    assert p50.median == pytest.approx(1.25) and p50.met is False
    floor = ratios["v2 c16 throughput streamscore/empty"]
    assert floor.median == pytest.approx(999 / 1060) and floor.met is True
    # A goal with no measurements in any round has no median and no verdict.
    stream = ratios["stream 1x64 / unary c64 throughput, streamscore"]
    assert stream.per_round == [] and stream.median is None and stream.met is None
    assert len(ratios) == len(GOALS)

    table = {(row["server"], row["workload"]): row for row in medians(measurements)}
    assert table[("bare", "v2 c1")]["p50_us"] == 80 and table[("bare", "v2 c1")]["rounds"] == 3


def test_servers_alternate_across_rounds() -> None:
    orders = [server_order(r) for r in range(3)]
    assert {order[0] for order in orders} == {"streamscore", "empty", "bare"}
    assert all(sorted(order) == sorted(orders[0]) for order in orders)


def test_arguments_map_onto_the_config_and_bad_ones_are_named() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["--rounds", "2", "--servers", "empty,bare", "--workloads", "v2 c1", "--pa-sync",
         "--set", "models.defaults.max_batch_size=1"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.rounds, config.servers, config.workloads) == (2, ("empty", "bare"), ("v2 c1",))
    assert config.pa_async is False
    assert config.server_settings == ("models.defaults.max_batch_size=1",)
    for bad, field in [(["--servers", "triton"], "--servers"), (["--rounds", "0"], "--rounds"),
                       (["--workloads", "v2 c2"], "--workloads")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            config_from_args(parser.parse_args(bad))


def test_base_server_runs_another_source_tree_and_gets_its_own_ratios(tmp_path: Path) -> None:
    parser = build_parser()
    config = config_from_args(
        parser.parse_args(["--servers", "streamscore,base,bare", "--base", str(tmp_path)])
    )
    assert config.base == tmp_path and "base" in config.servers
    for bad in (["--servers", "base,bare"], ["--base", str(tmp_path)]):  # one without the other
        with pytest.raises(ValueError, match="--base"):
            config_from_args(parser.parse_args(bad))
    measurements = [
        _m(0, "streamscore", "v2 c1", 0, 110),
        _m(0, "base", "v2 c1", 0, 150),
        _m(0, "bare", "v2 c1", 0, 100),
    ]
    ratios = {r.name: r for r in compute_ratios(measurements, base_goals(GOALS))}
    assert ratios["[base] v2 c1 p50 streamscore/bare"].per_round == pytest.approx([1.5])
    assert len(ratios) == len(GOALS)


def test_perf_analyzer_env_file_and_csv_are_parsed(tmp_path: Path) -> None:
    env = tmp_path / "env.sh"
    env.write_text("export PA=/opt/pa/perf_analyzer LD_LIBRARY_PATH=/opt/cuda/lib\n")
    pa = perf_analyzer.read_env_file(env)
    assert (
        pa.binary == Path("/opt/pa/perf_analyzer") and pa.env["LD_LIBRARY_PATH"] == "/opt/cuda/lib"
    )
    argv = perf_analyzer.command(
        pa, target="127.0.0.1:1", model="fraud", concurrency=16, csv_path=tmp_path / "o.csv"
    )
    assert argv[argv.index("--concurrency-range") + 1] == "16" and "--async" in argv
    result = perf_analyzer.parse_csv(
        "Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,"
        "p95 latency,p99 latency\n16,906.67,9,3,16009,24605,26718,29936\n"
    )
    assert (result.concurrency, result.infer_per_s, result.p50_us, result.p99_us) == (
        16, 906.67, 16009.0, 29936.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="one perf_analyzer CSV row"):
        perf_analyzer.parse_csv("Concurrency\n")


# --- perf_bench end to end (tiny; skipped without perf_analyzer) -----------------------


def _installed_perf_analyzer() -> perf_analyzer.PerfAnalyzer | None:
    try:
        return perf_analyzer.ensure_perf_analyzer(fetch=False)
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.skipif(
    _installed_perf_analyzer() is None,
    reason="perf_analyzer not in .cache/perf_analyzer (run bench/get_perf_analyzer.sh)",
)
def test_perf_bench_runs_all_servers_for_a_tiny_duration(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_linear_model(repository, "lin", "1", TEST_FEATURES, seed=3)
    config = BenchConfig(
        repository=repository,
        model="lin",
        rounds=1,
        workloads=("v2 c1", "score c1"),
        pa_window_ms=200,
        loadgen_duration_s=0.3,
        loadgen_warmup_s=0.1,
    )
    document = run_bench(config)
    json.dumps(document)  # the document is JSON as written
    got = {(m["server"], m["workload"]) for m in document["measurements"]}
    assert got == {(s, w) for s in ("streamscore", "empty", "bare") for w in config.workloads}
    assert all(m["throughput"] > 0 and m["errors"] == 0 for m in document["measurements"])
    ratios = {r["name"]: r for r in document["ratios"]}
    assert len(ratios["v2 c1 p50 streamscore/bare"]["per_round"]) == 1
    assert len(ratios["score c1 p50 streamscore/bare"]["per_round"]) == 1


def test_main_rejects_bad_arguments_with_the_option_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.perf_bench import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--servers", "triton"])
    assert exit_info.value.code == 2
    assert "--servers" in capsys.readouterr().err
    assert isinstance(build_parser(), argparse.ArgumentParser)


def test_profile_top_folds_collapsed_stacks() -> None:
    from bench.profile_top import format_top, parse_collapsed

    stacks = [
        "main (a.py:1);serve (b.py:5);run (c.py:9) 6",
        "main (a.py:1);serve (b.py:7);encode (d.py:2) 3",
        "main (a.py:1);serve (b.py:5) 1",
        "garbage line",
    ]
    profile = parse_collapsed(stacks)
    assert profile.total == 10
    assert profile.self_samples["run (c.py:9)"] == 6
    assert profile.inclusive["main (a.py:1)"] == 10
    merged = parse_collapsed(stacks, keep_lines=False)
    assert merged.inclusive["serve (b.py)"] == 10 and merged.self_samples["serve (b.py)"] == 1
    assert "60.0   run (c.py:9)" in format_top(profile, 3)
