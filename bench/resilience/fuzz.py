"""Fuzz every RPC of a live server: descriptor-built and byte-mutated messages.

Each case is one call (or one ScoreStream / Watch) to a ``streamscore serve``
subprocess: a message generated from the request type's descriptor
(``proto_strategies``), a valid message with its bytes damaged, or random bytes.
Admin calls carry the configured token (or a missing / wrong / huge one).
Expected: no INTERNAL or UNKNOWN status, every failure a status with a message, the
server answering a valid call afterwards, and its RSS within 10% of before (both
readings taken ``SETTLE_S`` after the traffic, past one ``server.memory_trim_interval_s``;
the reading right after the run is reported too).

    python -m bench.resilience.fuzz --cases 100000 --json-out bench/results/fuzz.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
from google.protobuf.descriptor import Descriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench.resilience.proto_strategies import message_strategy, mutate, mutation_ops
from protos.inference import grpc_service_pb2 as v2
from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import scoring_pb2 as pb

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Bearer token the fuzzed server is started with.
TOKEN = "fuzz-admin-token"
#: Model name and feature names of the linear test model the runner serves.
MODEL = "lin"
FEATURES = tuple(f"f{i}" for i in range(8))
#: Statuses that mean the server did not handle the input (a bug).
BAD_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
#: Per-call deadline: generous, a case that needs it is reported by its status.
CALL_TIMEOUT_S = 10.0

Kind = Literal["unary", "stream", "server_stream"]


@dataclass(frozen=True)
class Rpc:
    """One method of a served service."""

    path: str
    kind: Kind
    request: Descriptor
    admin: bool


@dataclass(frozen=True)
class Case:
    """One fuzz input: serialized request(s) for ``rpc`` and the call's metadata."""

    rpc: Rpc
    payloads: tuple[bytes, ...]
    metadata: tuple[tuple[str, str], ...]
    origin: str


@dataclass(frozen=True)
class Finding:
    """A case whose answer breaks the contract (INTERNAL/UNKNOWN or no message)."""

    path: str
    origin: str
    code: str
    details: str
    payloads_hex: tuple[str, ...]


@dataclass
class FuzzReport:
    """Counts by status and RPC, findings, RSS before/after and the final valid call."""

    cases: int = 0
    seconds: float = 0.0
    by_status: Counter[str] = field(default_factory=Counter)
    by_rpc: dict[str, Counter[str]] = field(default_factory=dict)
    by_origin: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    rss_after_immediate_kb: int = 0
    valid_after: bool = False

    @property
    def rss_growth(self) -> float:
        """RSS after / before - 1."""
        return self.rss_after_kb / self.rss_before_kb - 1 if self.rss_before_kb else 0.0

    def record(self, case: Case, code: grpc.StatusCode, details: str) -> None:
        """Count one answer; keep it as a finding when it breaks the contract."""
        self.cases += 1
        self.by_status[code.name] += 1
        self.by_rpc.setdefault(case.rpc.path, Counter())[code.name] += 1
        self.by_origin[case.origin] += 1
        if code in BAD_CODES or (code != grpc.StatusCode.OK and not details.strip()):
            self.findings.append(
                Finding(
                    case.rpc.path,
                    case.origin,
                    code.name,
                    details[:500],
                    tuple(p[:400].hex() for p in case.payloads),
                )
            )


def _methods(service: ServiceDescriptor, admin: bool) -> list[Rpc]:
    rpcs = []
    for method in service.methods:
        kind: Kind = (
            "stream"
            if method.client_streaming
            else "server_stream"
            if method.server_streaming
            else "unary"
        )
        rpcs.append(Rpc(f"/{service.full_name}/{method.name}", kind, method.input_type, admin))
    return rpcs


def all_rpcs() -> list[Rpc]:
    """Every RPC of Scoring, inference v2, Admin and Health."""
    return [
        *_methods(pb.DESCRIPTOR.services_by_name["Scoring"], admin=False),
        *_methods(v2.DESCRIPTOR.services_by_name["GRPCInferenceService"], admin=False),
        *_methods(apb.DESCRIPTOR.services_by_name["Admin"], admin=True),
        *_methods(health_pb2.DESCRIPTOR.services_by_name["Health"], admin=False),
    ]


def valid_score_request() -> pb.ScoreRequest:
    """A request the linear model answers."""
    values = np.linspace(-1, 1, len(FEATURES))
    return pb.ScoreRequest(
        model=MODEL, features={n: float(v) for n, v in zip(FEATURES, values, strict=True)}
    )


def valid_infer_request() -> v2.ModelInferRequest:
    """A v2 request with raw FP32 input of two rows."""
    request = v2.ModelInferRequest(model_name=MODEL, id="fuzz")
    request.inputs.add(name="features", datatype="FP32", shape=[2, len(FEATURES)])
    request.raw_input_contents.append(np.ones((2, len(FEATURES)), "<f4").tobytes())
    return request


def seed_messages() -> dict[str, Message]:
    """A valid (or at least well-formed, read-only) request per method name to mutate."""
    return {
        "Score": valid_score_request(),
        "ScoreStream": valid_score_request(),
        "ModelInfer": valid_infer_request(),
        "ModelMetadata": v2.ModelMetadataRequest(name=MODEL),
        "ModelConfig": v2.ModelConfigRequest(name=MODEL),
        "ModelReady": v2.ModelReadyRequest(name=MODEL),
        "ListModels": apb.ListModelsRequest(endpoint=MODEL),
        "ListAudit": apb.ListAuditRequest(endpoint=MODEL, limit=5),
        "Check": health_pb2.HealthCheckRequest(service=""),
        "Watch": health_pb2.HealthCheckRequest(service=""),
    }


def _metadata(admin: bool) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    good = (("authorization", f"Bearer {TOKEN}"),)
    if not admin:
        return st.just(())
    bad = st.sampled_from(
        [(), (("authorization", "Bearer wrong"),), (("authorization", "Bearer " + "x" * 6000),)]
    )
    return st.one_of(st.just(good), st.just(good), st.just(good), bad)


ORIGINS = frozenset({"generated", "mutated", "random"})


def case_strategy(
    rpcs: Sequence[Rpc], origins: frozenset[str] = ORIGINS
) -> st.SearchStrategy[Case]:
    """Cases over ``rpcs``: generated, mutated-valid and random-byte payloads."""
    seeds = seed_messages()
    per_rpc = []
    for rpc in rpcs:
        name = rpc.path.rsplit("/", 1)[1]
        generated: st.SearchStrategy[tuple[bytes, str]] = message_strategy(rpc.request).map(
            _serialized
        )
        base = seeds.get(name)
        base_bytes = base.SerializeToString() if base is not None else b""
        mutated: st.SearchStrategy[tuple[bytes, str]] = mutation_ops().map(
            functools.partial(_mutated, base_bytes)
        )
        raw: st.SearchStrategy[tuple[bytes, str]] = st.binary(max_size=512).map(_random)
        chosen = {"generated": generated, "mutated": mutated, "random": raw}
        one = st.one_of(
            *(chosen[o] for o in sorted(origins)), *([generated] * ("generated" in origins))
        )
        count = st.integers(1, 4) if rpc.kind == "stream" else st.just(1)
        per_rpc.append(
            st.builds(
                functools.partial(_case, rpc),
                count.flatmap(functools.partial(_lists_of, one)),
                _metadata(rpc.admin),
            )
        )
    return st.one_of(per_rpc)


def _mutated(base: bytes, ops: Any) -> tuple[bytes, str]:
    return mutate(base, ops), "mutated"


def _random(payload: bytes) -> tuple[bytes, str]:
    return payload, "random"


def _lists_of(
    one: st.SearchStrategy[tuple[bytes, str]], n: int
) -> st.SearchStrategy[list[tuple[bytes, str]]]:
    return st.lists(one, min_size=n, max_size=n)


def _serialized(message: Any) -> tuple[bytes, str]:
    return message.SerializeToString(), "generated"


def _case(rpc: Rpc, items: list[tuple[bytes, str]], metadata: Any) -> Case:
    return Case(rpc, tuple(p for p, _ in items), metadata, "+".join(sorted({o for _, o in items})))


def call(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, str]:
    """Send ``case`` and return the status code and details of the answer."""
    md = case.metadata or None
    try:
        if case.rpc.kind == "unary":
            channel.unary_unary(case.rpc.path, request_serializer=None, response_deserializer=None)(
                case.payloads[0], timeout=CALL_TIMEOUT_S, metadata=md
            )
        elif case.rpc.kind == "stream":
            answers = channel.stream_stream(
                case.rpc.path, request_serializer=None, response_deserializer=None
            )(iter(case.payloads), timeout=CALL_TIMEOUT_S, metadata=md)
            for _ in answers:
                pass
        else:  # Watch: the first answer is the status; the stream then stays open
            watch = channel.unary_stream(
                case.rpc.path, request_serializer=None, response_deserializer=None
            )(case.payloads[0], timeout=CALL_TIMEOUT_S, metadata=md)
            next(iter(watch))
            watch.cancel()  # type: ignore[no-untyped-call]
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def rss_kb(pid: int) -> int:
    """VmRSS of process ``pid`` in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_valid_call(channel: grpc.Channel) -> bool:
    """True when the server scores a valid request and v2 says it is live."""
    from protos.inference import grpc_service_pb2_grpc as v2_grpc
    from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc

    try:
        response = pb_grpc.ScoringStub(channel).Score(valid_score_request(), timeout=10)
        live = v2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            v2.ServerLiveRequest(), timeout=10
        )
    except grpc.RpcError:
        return False
    return bool(response.model_version) and live.live


@contextlib.contextmanager
def serve(
    repository: Path, log_path: Path, extra: Sequence[str] = (), argv_prefix: Sequence[str] = ()
) -> Iterator[tuple[int, str]]:
    """``python -m server.cli serve`` on a free port; yields (pid, target); stopped on exit.
    ``argv_prefix``: e.g. ``taskset -c 0`` (``exec``-style: the pid is the server's)."""
    port = free_port()
    sets = [
        f"server.port={port}",
        "server.metrics_port=0",
        f"models.repository={repository}",
        f"server.admin_token={TOKEN}",
        "features.definitions_path=null",
        "logging.json=false",
        *extra,
    ]
    argv = [*argv_prefix, sys.executable, "-m", "server.cli", "serve"]
    argv += [item for value in sets for item in ("--set", value)]
    with log_path.open("wb") as out:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=out)
    target = f"127.0.0.1:{port}"
    try:
        _wait_serving(process, target, log_path)
        yield process.pid, target
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_serving(process: subprocess.Popen[bytes], target: str, log_path: Path) -> None:
    from grpc_health.v1 import health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up:
            if process.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(grpc.RpcError):
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"server not serving after 120 s:\n{log_path.read_text()[-3000:]}")


def _warm_up(channel: grpc.Channel, rounds: int) -> None:
    """Valid calls on every RPC so RSS 'before' includes the steady working set."""
    seeds = seed_messages()
    for rpc in all_rpcs():
        message = seeds.get(rpc.path.rsplit("/", 1)[1])
        if message is None:
            continue
        md = (("authorization", f"Bearer {TOKEN}"),) if rpc.admin else ()
        for _ in range(rounds):
            call(channel, Case(rpc, (message.SerializeToString(),), md, "warmup"))


def run_cases(
    target: str,
    cases: int,
    random_seed: int,
    rpcs: Sequence[Rpc] | None = None,
    origins: frozenset[str] = ORIGINS,
    progress: Callable[[FuzzReport], None] | None = None,
    progress_every: int = 1000,
) -> FuzzReport:
    """Send ``cases`` hypothesis-generated cases to ``target`` and count the answers;
    ``progress`` is called every ``progress_every`` cases."""
    report = FuzzReport()
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    started = time.monotonic()
    with grpc.insecure_channel(target, options=options) as channel:

        @seed(random_seed)
        @settings(
            max_examples=cases,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def one(data: st.DataObject) -> None:
            case = data.draw(strategy)
            report.record(case, *call(channel, case))
            if progress is not None and report.cases % progress_every == 0:
                report.seconds = time.monotonic() - started
                progress(report)

        strategy = case_strategy(rpcs or all_rpcs(), origins)
        one()
    report.seconds = time.monotonic() - started
    return report


#: Seconds to wait before each steady RSS reading: longer than the server's
#: ``server.memory_trim_interval_s`` (10 s), so both readings follow a trim.
SETTLE_S = 12.0


def fuzz_server(
    repository: Path, cases: int, random_seed: int, work: Path, settle_s: float = SETTLE_S
) -> FuzzReport:
    """Start a server on ``repository``, fuzz it, and measure RSS and a valid call after:
    RSS before (warmed up, settled), right after the run, and after settling."""
    with serve(repository, work / "server.log") as (pid, target):
        with grpc.insecure_channel(target) as channel:
            _warm_up(channel, 50)
        time.sleep(settle_s)
        before = rss_kb(pid)

        def progress(report: FuzzReport) -> None:
            log.info(
                "%d cases in %.0f s, RSS %.1f MiB, findings %d, %s",
                report.cases,
                report.seconds,
                rss_kb(pid) / 1024,
                len(report.findings),
                dict(report.by_status.most_common()),
            )

        report = run_cases(target, cases, random_seed, progress=progress)
        with grpc.insecure_channel(target) as channel:
            report.valid_after = answers_valid_call(channel)
            _warm_up(channel, 5)
        report.rss_before_kb = before
        report.rss_after_immediate_kb = rss_kb(pid)
        time.sleep(settle_s)
        report.rss_after_kb = rss_kb(pid)
    return report


def write_linear_repository(repository: Path) -> None:
    """The small linear test model ``lin`` version 1 (tests/support/model_factory)."""
    from tests.support.model_factory import write_linear_model  # dev-only helper

    write_linear_model(repository, MODEL, "1", list(FEATURES), seed=1)


def markdown(report: FuzzReport, command: str) -> str:
    """The RESULTS.md section of a run."""
    lines = [
        "```sh",
        command,
        "```",
        "",
        f"{report.cases:,} cases in {report.seconds:.0f} s; by origin: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(report.by_origin.items())),
        "",
        "| status | count |",
        "| --- | ---: |",
        *(f"| {code} | {count:,} |" for code, count in report.by_status.most_common()),
        "",
        f"INTERNAL/UNKNOWN or message-less answers: {len(report.findings)}; "
        f"valid call after the run: {'answered' if report.valid_after else 'FAILED'}; "
        f"RSS {report.rss_before_kb / 1024:.1f} MiB before, "
        f"{report.rss_after_immediate_kb / 1024:.1f} MiB right after the run, "
        f"{report.rss_after_kb / 1024:.1f} MiB {SETTLE_S:.0f} s later "
        f"({report.rss_growth:+.1%}).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repository", type=Path, help="models to serve (default: linear model)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:
        work = Path(scratch)
        repository = args.repository
        if repository is None:
            repository = work / "models"
            write_linear_repository(repository)
        report = fuzz_server(repository, args.cases, args.seed, work)
    command = "python -m bench.resilience.fuzz " + " ".join(sys.argv[1:] if argv is None else argv)
    sys.stdout.write(markdown(report, command) + "\n")
    for finding in report.findings[:20]:
        sys.stdout.write(json.dumps(asdict(finding)) + "\n")
    if args.json_out:
        payload = {
            "cases": report.cases,
            "seconds": report.seconds,
            "by_status": dict(report.by_status),
            "by_rpc": {path: dict(counts) for path, counts in report.by_rpc.items()},
            "by_origin": dict(report.by_origin),
            "findings": [asdict(f) for f in report.findings[:200]],
            "findings_total": len(report.findings),
            "rss_before_kb": report.rss_before_kb,
            "rss_after_kb": report.rss_after_kb,
            "rss_after_immediate_kb": report.rss_after_immediate_kb,
            "rss_growth": report.rss_growth,
            "valid_after": report.valid_after,
        }
        args.json_out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    ok = not report.findings and report.valid_after and abs(report.rss_growth) <= 0.10
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
