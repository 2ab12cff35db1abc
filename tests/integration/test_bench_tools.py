"""The benchmark tools against real gRPC servers: the floor server in a subprocess and
small in-test grpc.aio servers (slow, erroring, out-of-order) for the load generator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis as sync_redis

from bench.callers import with_request_id
from bench.config import RESULT_KEYS, Api, LoadConfig, LoadResult
from bench.feature_bench import LiveWrites
from bench.floor_server import READY_PREFIX
from bench.loadgen import run_load
from bench.payloads import PayloadSpec, infer_pool, score_pool
from bench.pinning import taskset_available, taskset_prefix, usable_cpus
from feature_streams.definitions import load_definitions
from feature_streams.keys import VERSION_FIELD, tile_key
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from protos.streamscore.v1 import scoring_pb2, scoring_pb2_grpc
from server.clients.histogram import LatencySummary
from server.manifest import ModelManifest, TensorSpec, TrainingInfo

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
_PRINT_AFFINITY = "import os; print(sorted(os.sched_getaffinity(0)))"
LATENCY_KEYS = {"count", "min", "mean", "p50", "p90", "p99", "p99.9", "max"}


# --- helpers -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _read_ready_lines(proc: subprocess.Popen[bytes], count: int, timeout_s: float) -> list[str]:
    """Wait for ``count`` ready lines on the child's stdout (no sleeping: select on the pipe)."""
    assert proc.stdout is not None
    lines: list[str] = []
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while len(lines) < count:
            if not selector.select(timeout_s):
                raise TimeoutError(f"floor server not ready after {timeout_s}s: {lines}")
            line = proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"floor server exited early, rc={proc.wait()}")
            if line.startswith(READY_PREFIX):
                lines.append(line.strip())
    return lines


@contextlib.contextmanager
def _floor_process(
    *args: str, ready: int = 1
) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.floor_server", "--host", "127.0.0.1", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,  # unbuffered, so select() sees every line not yet read
    )
    try:
        yield proc, _read_ready_lines(proc, ready, timeout_s=20.0)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _assert_ordered(summary: LatencySummary) -> None:
    assert summary.count > 0
    assert 0 < summary.min_us <= summary.p50_us <= summary.p90_us <= summary.p99_us
    assert summary.p99_us <= summary.p999_us <= summary.max_us
    assert summary.min_us <= summary.mean_us <= summary.max_us


def _assert_clean(result: LoadResult) -> None:
    """Every call answered OK, and the counts agree. No throughput is asserted (that is a
    bench's job): how many calls fit in the window depends on the machine's load."""
    config = result.config
    assert result.errors == {}
    assert result.unfinished == 0
    if config.mode == "closed":
        # at most this many calls are in flight at once, so at most this many cross
        # either edge of the window (sent before it and answered in it, or the reverse)
        in_flight = config.concurrency * config.stream_window
        assert result.sent > in_flight  # the callers looped: each answer led to a new call
    else:
        # an open loop's calls in flight at an edge are those scheduled within the
        # slowest answer's latency before it (+1 each side for the partial interval)
        assert config.rate is not None
        in_flight = math.ceil(config.rate * result.latency.max_us / 1e6) + 2
    assert result.ok == result.sent
    assert result.throughput_rps == pytest.approx(result.window_ok / config.duration_s)
    assert abs(result.window_ok - result.ok) <= in_flight
    _assert_ordered(result.latency)


@pytest.fixture(scope="module")
def floor_target() -> Iterator[str]:
    """A floor server subprocess on a free port (always terminated afterwards)."""
    with _floor_process("--port", "0") as (_, lines):
        yield lines[0].split()[3]


# --- floor server + load generator ---------------------------------------------------


@pytest.mark.parametrize(
    ("api", "extra"),
    [
        ("score", {}),
        ("stream", {"stream_window": 3, "connections": 2}),
        ("v2", {"v2_rows": 4}),
        ("v2", {"v2_rows": 16, "v2_raw": True, "connections": 2}),
    ],
    ids=["score", "stream", "v2-typed", "v2-raw"],
)
async def test_closed_loop_against_floor(
    floor_target: str, api: Api, extra: dict[str, Any]
) -> None:
    config = LoadConfig(
        target=floor_target,
        api=api,
        concurrency=4,
        duration_s=0.5,
        warmup_s=0.1,
        **extra,
    )
    result = await run_load(config)
    _assert_clean(result)
    assert result.send_lag is None
    assert result.service_latency == result.latency
    rows = config.v2_rows if api == "v2" else 1
    assert result.rows_per_s == pytest.approx(result.throughput_rps * rows)


async def test_open_loop_against_floor(floor_target: str) -> None:
    config = LoadConfig(target=floor_target, rate=200, duration_s=1.0, warmup_s=0.2)
    result = await run_load(config)
    _assert_clean(result)
    assert result.sent == pytest.approx(200, abs=2)
    assert result.skipped == 0
    assert result.send_lag is not None and result.send_lag.count == result.sent
    _assert_ordered(result.service_latency)
    # Latency counts from the intended send time, never later than the actual send.
    assert result.latency.p50_us >= result.service_latency.p50_us
    assert result.latency.max_us >= result.service_latency.max_us


def test_cli_writes_documented_json(floor_target: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--target", floor_target, "--api", "stream",
         "--concurrency", "2", "--duration", "0.3", "--warmup", "0.1", "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "throughput" in proc.stderr
    document = json.loads(out.read_text())
    assert tuple(document) == RESULT_KEYS
    assert set(document["latency_us"]) == LATENCY_KEYS
    assert document["service_latency_us"] == document["latency_us"]
    assert document["send_lag_us"] is None
    assert document["mode"] == "closed"
    assert document["ok"] > 0 and document["errors"] == {}
    datetime.fromisoformat(document["started_at"])
    # The config in the document reproduces the run.
    replay = LoadConfig.from_json(document["config"])
    assert replay.target == floor_target and replay.api == "stream" and replay.duration_s == 0.3


async def test_floor_answers_have_the_right_shape(floor_target: str) -> None:
    spec = PayloadSpec.demo()
    async with grpc.aio.insecure_channel(floor_target) as channel:
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        answer = await scoring.Score(scoring_pb2.ScoreRequest(model="fraud", request_id="x1"))
        assert (answer.request_id, answer.score, answer.model) == ("x1", 0.5, "fraud")
        requests = [scoring_pb2.ScoreRequest(model="fraud", request_id=rid) for rid in "ab"]
        stream = scoring.ScoreStream(iter(requests))
        assert [r.request_id async for r in stream] == ["a", "b"]

        inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        live = await inference.ServerLive(grpc_service_pb2.ServerLiveRequest())
        assert live.live
        for raw in (False, True):
            item = infer_pool(
                spec, model="fraud", model_version="", size=1, seed=0, rows=3, raw=raw
            )
            request = grpc_service_pb2.ModelInferRequest.FromString(item[0].payload)
            response = await inference.ModelInfer(request)
            (output,) = response.outputs
            assert response.id == "r0" and list(output.shape) == [3]
            if raw:
                assert [len(b) for b in response.raw_output_contents] == [3 * 4]
            else:
                assert list(output.contents.fp32_contents) == [0.5] * 3


async def test_unreachable_target_raises_connection_error() -> None:
    config = LoadConfig(target=f"127.0.0.1:{_free_port()}", duration_s=0.1, connect_timeout_s=0.3)
    with pytest.raises(ConnectionError, match="could not connect"):
        await run_load(config)


def test_floor_server_processes_share_port_and_stop_on_sigterm() -> None:
    port = _free_port()
    with _floor_process("--port", str(port), "--processes", "2", ready=2) as (proc, lines):
        pids = {int(line.rsplit("pid=", 1)[1]) for line in lines}
        assert len(pids) == 2 and proc.pid not in pids
        config = LoadConfig(
            target=f"127.0.0.1:{port}", concurrency=4, connections=4, duration_s=0.3, warmup_s=0
        )
        _assert_clean(asyncio.run(run_load(config)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- in-test server: slow, erroring, out of order, recording peers ---------------------


@dataclass
class _TestScoring(scoring_pb2_grpc.ScoringServicer):
    """model "slow" sleeps 50 ms, "bad" fails with INVALID_ARGUMENT; streams answer
    pairs of requests in reverse order."""

    peers: set[str] = field(default_factory=set)

    async def _delay(self, request: scoring_pb2.ScoreRequest) -> None:
        if request.model == "slow":
            await asyncio.sleep(0.05)

    async def Score(
        self, request: scoring_pb2.ScoreRequest, context: Any
    ) -> scoring_pb2.ScoreResponse:
        self.peers.add(context.peer())
        await self._delay(request)
        if request.model == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad model")
        return scoring_pb2.ScoreResponse(request_id=request.request_id, score=0.1)

    def _answer(self, request: scoring_pb2.ScoreRequest) -> scoring_pb2.ScoreResponse:
        if request.model == "bad":
            error = scoring_pb2.ScoreError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0])
            return scoring_pb2.ScoreResponse(request_id=request.request_id, error=error)
        return scoring_pb2.ScoreResponse(request_id=request.request_id, score=0.1)

    async def ScoreStream(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[scoring_pb2.ScoreResponse]:
        queue: asyncio.Queue[scoring_pb2.ScoreRequest | None] = asyncio.Queue()

        async def pump() -> None:
            async for request in request_iterator:
                await queue.put(request)
            await queue.put(None)

        pumping = asyncio.create_task(pump())
        try:
            while (first := await queue.get()) is not None:
                await self._delay(first)
                try:
                    second = await asyncio.wait_for(queue.get(), 0.02)
                except TimeoutError:
                    second = None
                if second is not None:
                    yield self._answer(second)
                yield self._answer(first)
                if second is None and pumping.done():
                    break
        finally:
            pumping.cancel()


@pytest.fixture
async def test_server() -> AsyncIterator[tuple[str, _TestScoring]]:
    servicer = _TestScoring()
    server = grpc.aio.server()
    scoring_pb2_grpc.add_ScoringServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


async def test_open_loop_latency_counts_from_intended_send_time(
    test_server: tuple[str, _TestScoring],
) -> None:
    """50 ms per request, one at a time, scheduled every 10 ms: each request waits for
    the previous ones, so latency from the intended time grows ~40 ms per request
    while the service time stays ~50 ms. A closed-loop measurement would hide this."""
    target, _ = test_server
    config = LoadConfig(
        target=target, model="slow", rate=100, max_outstanding=1, duration_s=1.0, warmup_s=0
    )
    result = await run_load(config)
    assert result.errors == {} and 8 <= result.ok <= 21
    assert result.service_latency.p50_us < 150_000
    assert result.latency.p50_us > 200_000
    assert result.latency.p99_us > 500_000
    assert result.skipped >= 100 - 21
    assert result.late >= result.ok - 2
    assert result.send_lag is not None and result.send_lag.max_us > 400_000


async def test_stream_matches_out_of_order_answers(test_server: tuple[str, _TestScoring]) -> None:
    target, _ = test_server
    config = LoadConfig(
        target=target, api="stream", stream_window=4, concurrency=2, duration_s=0.4, warmup_s=0.1
    )
    _assert_clean(await run_load(config))


@pytest.mark.parametrize("api", ["score", "stream"])
async def test_errors_counted_by_status_code(
    test_server: tuple[str, _TestScoring], api: Api
) -> None:
    target, _ = test_server
    bad = await run_load(
        LoadConfig(target=target, api=api, model="bad", duration_s=0.3, warmup_s=0)
    )
    assert bad.ok == 0 and bad.sent > 0
    assert bad.errors == {"INVALID_ARGUMENT": bad.sent}
    assert bad.latency.count == 0 and bad.latency_hdr == ""
    slow = await run_load(
        LoadConfig(target=target, api=api, model="slow", deadline_ms=10, duration_s=0.3, warmup_s=0)
    )
    assert slow.ok == 0 and slow.errors.get("DEADLINE_EXCEEDED", 0) >= 1


@pytest.mark.parametrize("connections", [1, 3])
async def test_connections_are_distinct_tcp_connections(
    test_server: tuple[str, _TestScoring], connections: int
) -> None:
    target, servicer = test_server
    config = LoadConfig(
        target=target, concurrency=6, connections=connections, duration_s=0.2, warmup_s=0
    )
    _assert_clean(await run_load(config))
    assert len(servicer.peers) == connections


# --- payloads and pinning (pure) --------------------------------------------------------


def _write_manifest(version_dir: Path, features: tuple[str, ...]) -> Path:
    version_dir.mkdir(parents=True)
    manifest = ModelManifest(
        name="fraud",
        version="7",
        features=features,
        input=TensorSpec(name="float_input", dtype="float32"),
        outputs=(TensorSpec(name="probabilities", dtype="float32"),),
        score_output="probabilities",
        sha256="0" * 64,
        training=TrainingInfo(data_snapshot="s", code_commit="c", created_at=datetime.now(UTC)),
    )
    return manifest.write(version_dir)


def test_payloads_follow_the_manifest(tmp_path: Path) -> None:
    features = ("amount", "mcc", "hour_of_day", "is_international", "txn_count_1h", "avg_90d")
    path = _write_manifest(tmp_path / "fraud" / "7", features)
    spec = PayloadSpec.from_manifest(path)
    assert spec == PayloadSpec.from_manifest(path.parent)
    assert spec.features == features and spec.input_name == "float_input"

    score = [scoring_pb2.ScoreRequest.FromString(i.payload) for i in score_pool(
        spec, model="fraud", model_version="7", size=50, seed=1)]  # fmt: skip
    assert all(set(r.features) == set(features) for r in score)
    assert len({r.request_id for r in score}) == 50
    assert all(1 <= r.features["amount"] <= 5000 for r in score)
    assert all(r.features["mcc"] == int(r.features["mcc"]) <= 9999 for r in score)
    assert all(0 <= r.features["hour_of_day"] <= 23 for r in score)
    assert all(r.features["is_international"] in (0.0, 1.0) for r in score)
    assert all(min(r.features.values()) >= 0 for r in score)
    assert set(score[0].entity_ids) == {"card_id", "customer_id"}

    for raw in (False, True):
        item = infer_pool(spec, model="fraud", model_version="7", size=3, seed=1, rows=5, raw=raw)[
            0
        ]
        request = grpc_service_pb2.ModelInferRequest.FromString(item.payload)
        (tensor,) = request.inputs
        assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("float_input", "FP32", [5, 6])
        if raw:
            assert [len(b) for b in request.raw_input_contents] == [5 * 6 * 4]
        else:
            assert len(tensor.contents.fp32_contents) == 5 * 6


def test_stream_request_id_is_replaced_in_serialised_request() -> None:
    payload = scoring_pb2.ScoreRequest(model="fraud", request_id="r1", features={"a": 1.0})
    parsed = scoring_pb2.ScoreRequest.FromString(
        with_request_id(payload.SerializeToString(), "12345")
    )
    assert parsed.request_id == "12345" and parsed.model == "fraud" and parsed.features["a"] == 1.0


@pytest.mark.skipif(not taskset_available(), reason="taskset not installed")
def test_taskset_prefix_pins_the_command() -> None:
    cpu = max(usable_cpus())
    assert taskset_prefix([cpu]) == ["taskset", "-c", str(cpu)]
    out = subprocess.run(
        [*taskset_prefix([cpu]), sys.executable, "-c", _PRINT_AFFINITY],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    assert out.stdout.strip() == f"[{cpu}]"
    with pytest.raises(ValueError):
        taskset_prefix("0;rm")


def test_live_writes_apply_new_events_that_raise_tile_versions(redis_url: str) -> None:
    """``feature_bench --score-write-rate``: the writer thread applies about the asked
    rate of new events "now", each changing its card's and its merchant's hash."""
    defs = load_definitions(REPO / "features.yaml")
    for _ in range(2):  # the bench runs one writer per scenario on the same hashes
        with LiveWrites(redis_url, defs, cards=5, events_per_s=200.0) as live:
            time.sleep(0.5)
        assert 40 <= live.events <= 150, live.events
        assert live.applied == 2 * live.events  # one card hash and one merchant hash each
    client = sync_redis.Redis.from_url(redis_url)
    try:
        cards = [
            client.hget(tile_key("card_activity", f"card_id-{n}"), VERSION_FIELD) for n in range(5)
        ]
        merchants = client.hget(tile_key("merchant_activity", "merchant_id-0"), VERSION_FIELD)
    finally:
        client.close()
    assert all(v is not None for v in cards) and merchants is not None
