"""The embedded stack (``python -m devstack.stack``, what ``streamscore dev`` runs) end to end.

Starts the whole stack as a subprocess in its own process group with a small
population, scores a card the producer has been sending with only entity ids and
request fields, and checks that its batch features come from Redis and its stream
features from the events the worker folded. Then sends SIGINT to the whole group, as
a terminal's Ctrl-C does, and checks the exit code and that every process it started
is gone. The same on ``--redis-cluster`` (3 primaries + 3 replicas, ``redis.mode=cluster``
for the worker, the batch loading and the server).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.synthetic import DEMO_FEATURES
from devstack.producer import TransactionSource, demo_population
from devstack.status import scrape_metrics
from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.routing.approval import REPORT_FILE
from tests.conftest import free_port
from tests.support.drift import write_reference_profile
from tests.support.model_factory import write_linear_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 7
CUSTOMERS = 2_000
MERCHANTS = 1_500
STARTUP_S = 45.0


@dataclass
class StackProcess:
    """The stack subprocess and the stdout lines read so far."""

    process: subprocess.Popen[str]
    stderr: Path
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def start_reader(self) -> threading.Thread:
        assert self.process.stdout is not None
        stdout = self.process.stdout

        def read() -> None:
            for line in stdout:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread

    def wait_for_line(self, matches: Callable[[str], bool], timeout_s: float) -> str:
        """The first line (read from now on) that ``matches``; fails on timeout or EOF."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no matching line after {timeout_s} s:\n{self.output()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"the stack exited ({self.process.poll()}):\n{self.output()}")
            self.lines.append(line)
            if matches(line):
                return line

    def output(self) -> str:
        err = self.stderr.read_text(errors="replace")[-3000:] if self.stderr.exists() else ""
        return "\n".join(self.lines) + "\n--- stderr (tail) ---\n" + err


@contextlib.contextmanager
def _stack(tmp_path: Path, *args: str) -> Iterator[StackProcess]:
    stderr = tmp_path / "stack.stderr"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack.stack", *args],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # its own process group, like a terminal job
        )
    stack = StackProcess(process, stderr)
    reader = stack.start_reader()
    try:
        yield stack
    finally:
        if process.poll() is None:  # the test failed before stopping it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        reader.join(timeout=5)
        assert process.stdout is not None
        process.stdout.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_serving(target: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    pytest.fail(f"{target} not SERVING after {timeout_s} s")


def _dev_args(
    data_dir: Path,
    repository: Path,
    *,
    grpc_port: int,
    metrics_port: int,
    redis: Sequence[str] | None = None,
    extra: Sequence[str] = (),
    sets: Sequence[str] = (),
) -> tuple[str, ...]:
    """The ``streamscore dev`` arguments every test here passes: the small seeded
    population, a status line a second, no training, ``data_dir`` and the model
    ``repository``; ``redis`` (default: a free ``--redis-port``), then ``extra``
    arguments and ``--set`` ``sets``."""
    args = [
        "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port),
        *(("--redis-port", str(free_port())) if redis is None else redis),
        "--customers", str(CUSTOMERS),
        "--merchants", str(MERCHANTS),
        "--seed", str(SEED),
        *extra,
        "--status-interval", "1",
        "--no-train",
        "--data-dir", str(data_dir),
        "--set", f"models.repository={repository}",
    ]  # fmt: skip
    for setting in sets:
        args += ["--set", setting]
    return tuple(args)


def _primary_key_counts(seed_url: str) -> list[int]:
    """Keys held by each primary of the cluster seeded at ``seed_url``."""
    client = redis.RedisCluster.from_url(seed_url)
    try:
        primaries = client.get_primaries()  # type: ignore[no-untyped-call]
        return [int(client.dbsize(target_nodes=node)) for node in primaries]
    finally:
        client.close()


@pytest.mark.parametrize("cluster", [False, True], ids=["one-redis", "redis-cluster"])
def test_dev_stack_serves_stream_and_batch_features_and_stops_cleanly(
    tmp_path: Path, cluster: bool
) -> None:
    repository = tmp_path / "models"
    write_linear_model(repository, "fraud", "1", list(DEMO_FEATURES), seed=3, weight_scale=1e-3)
    grpc_port, metrics_port, redis_port = free_port(), free_port(), free_port()
    redis_args = ("--redis-cluster",) if cluster else ("--redis-port", str(redis_port))
    target = f"127.0.0.1:{grpc_port}"
    # The first transactions the producer sends (same population and seed).
    population = demo_population(SEED, CUSTOMERS, MERCHANTS)
    first = TransactionSource(population, SEED).next_event()

    args = _dev_args(
        tmp_path / "devstack",
        repository,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        redis=redis_args,
        extra=("--rate", "200"),
        # the answer's values are checked: a loaded machine must not degrade it (the
        # 50 ms fetch and 0.2 s socket defaults trip there, answering with defaults)
        sets=("features.fetch_timeout_s=5", "redis.socket_timeout_s=5"),
    )
    with _stack(tmp_path, *args) as stack:
        pids_line = stack.wait_for_line(lambda line: "pids" in line, STARTUP_S)
        pids = {name: int(pid) for name, pid in re.findall(r"(\w+)=(\d+)", pids_line)}
        redis_names = {f"redis{i}" for i in range(6)} if cluster else {"redis"}
        assert set(pids) == redis_names | {"broker", "worker", "server", "producer"}, pids_line
        if cluster:
            banner = "\n".join(stack.lines)
            found = re.search(r"redis +(redis://\S+) +\(cluster seed: 6 nodes", banner)
            assert found, stack.output()
            seed_url = found.group(1)
        else:
            assert f"redis://127.0.0.1:{redis_port}/0" in "\n".join(stack.lines)
        _wait_serving(target, 10.0)

        request = pb.ScoreRequest(
            model="fraud",
            entity_ids={
                "card_id": first.card_id,
                "customer_id": first.customer_id,
                "merchant_id": first.merchant_id,
            },
            features={
                name: first.request[name]
                for name in ("amount", "mcc", "channel", "is_international", "card_present")
            },
            echo_features=True,
        )
        deadline = time.monotonic() + 30.0
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ScoringStub(channel)
            while True:
                reply = stub.Score(request, timeout=2.0)
                echoed = {f.name: f.value for f in reply.features}
                if echoed["card_txn_count_5m"] >= 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert echoed["card_txn_count_5m"] >= 1, (echoed, stack.output())
        assert echoed["card_txn_count_24h"] >= echoed["card_txn_count_5m"]
        assert echoed["card_amount_sum_24h"] > 0
        assert echoed["card_seconds_since_last_txn"] < 120
        assert echoed["merchant_txn_count_1h"] >= 1
        assert 0.0 <= reply.score <= 1.0
        assert not reply.degraded
        for name, value in population.customer_features(first.customer_id).items():
            assert echoed[name] == pytest.approx(value), name
        for name, value in population.card_features(first.card_id).items():
            assert echoed[name] == pytest.approx(value), name
        assert echoed["amount"] == pytest.approx(first.request["amount"])
        if cluster:  # the features really live on the cluster, spread over its primaries
            counts = _primary_key_counts(seed_url)
            assert len(counts) == 3 and all(n > 0 for n in counts), counts

        status = stack.wait_for_line(
            lambda line: (
                "status |" in line
                and " 0.0 ev/s" not in line
                and "- ev/s" not in line
                and "freshness - s" not in line
            ),  # the worker's newest-event gauge is set
            20.0,
        )
        assert re.search(r"score \d+\.\d req/s", status), status
        assert re.search(r"stream \d+\.\d ev/s lag \d+", status), status
        assert re.search(r"freshness \d+\.\d\d s", status), status

        os.killpg(stack.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code = stack.process.wait(timeout=40)
        stack.wait_for_line(lambda line: line == "stopped.", 5.0)
        assert code == 0, stack.output()
        still_running = {name: pid for name, pid in pids.items() if _alive(pid)}
        assert not still_running, (still_running, stack.output())
        stopped = [f"  {name} stopped (exit code 0)" for name in ("producer", "server", "worker")]
        assert all(line in stack.lines for line in stopped), stack.output()
        order = [stack.lines.index(line) for line in stopped]
        assert order == sorted(order), "children stop in reverse start order"


@pytest.mark.timeout(150)
def test_dev_stack_scores_on_its_own_so_drift_shows_without_callers(tmp_path: Path) -> None:
    """By default the stack sends its own Score load (the producer's transactions through
    the gRPC port): with no caller at all, the drift gauges of the served version fill
    and the status line says how much of its traffic is built in."""
    repository = tmp_path / "models"
    version_dir, weights, bias = write_linear_model(
        repository, "fraud", "1", list(DEMO_FEATURES), seed=3, weight_scale=1e-3
    )
    write_reference_profile(version_dir, weights, bias, rows=2000)
    metrics_port = free_port()
    args = _dev_args(
        tmp_path / "devstack",
        repository,
        grpc_port=free_port(),
        metrics_port=metrics_port,
        sets=("drift.flush_interval_s=0.2", "drift.evaluate_interval_s=0.5"),
    )
    with _stack(tmp_path, *args) as stack:
        stack.wait_for_line(lambda line: "pids" in line, 2 * STARTUP_S)  # seen > 45 s at load 9
        banner = "\n".join(stack.lines)
        assert "built-in load    20 Score calls/s" in banner, banner
        status = stack.wait_for_line(
            lambda line: "status |" in line and re.search(r"fraud/1 [0-9.]+$", line) is not None,
            30.0,
        )
        assert "req/s (built-in 20/s)" in status, status
        deadline = time.monotonic() + 20.0
        while True:
            scraped = scrape_metrics(f"http://127.0.0.1:{metrics_port}/metrics") or {}
            rows = scraped.get(
                ("streamscore_drift_window_rows", (("model", "fraud"), ("version", "1"))), 0.0
            )
            if rows > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert rows > 0, stack.output()
        psi = scraped[("streamscore_drift_score_psi", (("model", "fraud"), ("version", "1")))]
        assert psi > 0, scraped  # the demo traffic is not the normal draws of the profile
        os.killpg(stack.process.pid, signal.SIGINT)
        assert stack.process.wait(timeout=40) == 0, stack.output()


_HOLD_SERVICES = """\
import sys, time
from devstack.services import kafka_broker, redis_server
with redis_server(die_with_parent=True) as redis, kafka_broker(die_with_parent=True) as broker:
    print(redis.process.pid, broker.process.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_services_of_a_killed_stack_do_not_outlive_it() -> None:
    """The dev stack's Redis and broker run in their own sessions (a terminal's Ctrl-C
    must not stop them before the worker commits), so a SIGKILLed stack could not stop
    them itself: they get SIGTERM from the kernel instead."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SERVICES], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        pids = [int(p) for p in holder.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), pids


def _run_printed(
    command: str, *, as_token_of: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """A command the banner printed, pasted into a shell (``as_token_of``: with that
    token file swapped in, i.e. run by someone else)."""
    if as_token_of is not None:
        command = re.sub(r"\$\(cat [^)]*\)", f"$(cat {as_token_of})", command, count=1)
    return subprocess.run(
        ["bash", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


def _fraud(target: str, token: str) -> apb.Model:
    with grpc.insecure_channel(target) as channel:
        listed = apb_grpc.AdminStub(channel).ListModels(
            apb.ListModelsRequest(endpoint="fraud"),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    (model,) = listed.models
    return model


@pytest.mark.timeout(180)
def test_dev_stack_gates_the_newest_version_until_a_second_person_approves(
    tmp_path: Path,
) -> None:
    """``streamscore dev`` serves the older demo version as the approved champion and
    holds the newest back; its banner's two commands (approve as ``risk``, canary as
    ``release``) start the canary, and neither works out of turn."""
    repository = tmp_path / "models"
    for version in ("1", "2"):
        write_linear_model(
            repository, "fraud", version, list(DEMO_FEATURES), seed=3 + int(version),
            weight_scale=1e-3,
        )  # fmt: skip
        report = {"auc": 0.9, "version": version}  # the evidence the approval is bound to
        (repository / "fraud" / version / REPORT_FILE).write_text(json.dumps(report))
    grpc_port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    data_dir = tmp_path / "devstack"
    population = demo_population(SEED, CUSTOMERS, MERCHANTS)

    args = _dev_args(data_dir, repository, grpc_port=grpc_port, metrics_port=metrics_port)
    with _stack(tmp_path, *args) as stack:
        stack.wait_for_line(lambda line: "pids" in line, STARTUP_S)
        approve = stack.wait_for_line(lambda line: " models approve fraud 2 " in line, 5.0)
        route = stack.wait_for_line(lambda line: " models route fraud --canary 2 " in line, 5.0)
        banner = "\n".join(stack.lines)
        assert "fraud/2 awaits approval (not approved: no approval" in banner, banner
        release = data_dir / "admin" / "release.token"
        risk = data_dir / "admin" / "risk.token"
        assert release.stat().st_mode & 0o077 == 0  # tokens readable by their owner only

        model = _fraud(target, risk.read_text())
        assert model.state.routing.champion == "1", model
        assert not model.state.routing.HasField("canary")
        (v2,) = [v for v in model.versions if v.version == "2"]
        assert v2.status == apb.VERSION_STATUS_LOADED
        assert v2.error.startswith("not approved: no approval"), v2

        refused = _run_printed(route.strip())  # the canary before the approval
        assert refused.returncode == 1, refused
        assert "FAILED_PRECONDITION" in refused.stderr and "not approved" in refused.stderr
        own = _run_printed(approve.strip(), as_token_of=release)  # release loaded it
        assert own.returncode == 1, own
        assert "PERMISSION_DENIED" in own.stderr
        assert "approver must differ from submitter" in own.stderr

        approved = _run_printed(approve.strip())
        assert approved.returncode == 0, approved
        started = _run_printed(route.strip())
        assert started.returncode == 0, started
        model = _fraud(target, release.read_text())
        assert (model.state.routing.canary.version, model.state.routing.canary.share_bp) == (
            "2",
            1000,
        ), model

        source = TransactionSource(population, SEED)
        routes = set()
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ScoringStub(channel)
            for _ in range(200):
                event = source.next_event()
                reply = stub.Score(event.score_request("fraud"), timeout=5.0)
                routes.add((reply.model_version, pb.Route.Name(reply.route)))
                if len(routes) == 2:
                    break
        assert routes == {("1", "ROUTE_CHAMPION"), ("2", "ROUTE_CANARY")}, routes

        os.killpg(stack.process.pid, signal.SIGINT)
        code = stack.process.wait(timeout=40)
        assert code == 0, stack.output()
