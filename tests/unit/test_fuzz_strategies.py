"""The fuzz suite's descriptor-built strategies and byte mutations (no server)."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench.resilience.fuzz import Case, all_rpcs, case_strategy
from bench.resilience.proto_strategies import FIELD_BUDGET_BYTES, _assign, message_strategy, mutate
from protos.inference import grpc_service_pb2 as v2


def test_every_rpc_of_every_service_is_fuzzed() -> None:
    paths = {rpc.path for rpc in all_rpcs()}
    assert {
        "/streamscore.v1.Scoring/Score",
        "/streamscore.v1.Scoring/ScoreStream",
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelConfig",
        "/inference.GRPCInferenceService/ServerMetadata",
        "/streamscore.v1.Admin/SetRouting",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    } <= paths


def test_cases_cover_every_origin_and_parse_or_not() -> None:
    seen: Counter[str] = Counter()

    @settings(
        max_examples=100,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case_strategy(all_rpcs()))
    def draw(case: Case) -> None:
        assert case.payloads
        for origin in case.origin.split("+"):
            seen[origin] += 1

    draw()
    assert set(seen) == {"generated", "mutated", "random"}


# Generate only: shrinking and explaining examples this large (5,000-element repeated
# fields, 64 KiB strings) made hypothesis pretty-print them, using gigabytes.
@seed(20261202)  # the same few draws every run: their size (and memory) is repeatable
@settings(
    max_examples=8,
    database=None,
    phases=[Phase.generate],
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(message_strategy(v2.ModelInferRequest.DESCRIPTOR))
def test_generated_infer_requests_serialize_and_round_trip(message: v2.ModelInferRequest) -> None:
    data = message.SerializeToString()
    parsed = v2.ModelInferRequest.FromString(data)
    # every byte was parsed back into fields (== on messages fails on NaN != NaN)
    assert parsed.ByteSize() == len(data)
    assert parsed.model_name == message.model_name and len(parsed.inputs) == len(message.inputs)


def test_mutations_change_the_bytes() -> None:
    data = v2.ModelInferRequest(model_name="lin").SerializeToString()
    assert mutate(data, [(3, 2, 0)]) == data[:2]
    assert mutate(data, [(1, 0, 0xFF)]) == b"\xff" + data
    assert len(mutate(data, [(5, 0, 3)])) == len(data) + 5


@given(
    st.binary(max_size=64),
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 99), st.integers(0, 999))),
)
def test_mutate_never_raises(data: bytes, ops: list[tuple[int, int, int]]) -> None:
    assert isinstance(mutate(data, ops), bytes)


def test_a_field_holds_at_most_its_budget() -> None:
    inner = v2.ModelInferRequest.InferInputTensor(name="x")
    inner.contents.bytes_contents.extend([b"b" * 65_536] * 50)  # ~3.3 MB each
    request = v2.ModelInferRequest()
    _assign(request, v2.ModelInferRequest.DESCRIPTOR.fields_by_name["inputs"], [inner] * 5_000)
    assert 0 < len(request.inputs) < 5_000
    assert request.ByteSize() <= FIELD_BUDGET_BYTES
    params = v2.ModelInferRequest.DESCRIPTOR.fields_by_name["parameters"]
    value = v2.InferParameter(string_param="s" * 65_536)
    _assign(request, params, {f"k{i}": value for i in range(2_000)})
    assert 0 < len(request.parameters) < 2_000
