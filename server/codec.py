"""Protobuf <-> pipeline types and numpy. The only module that touches messages' fields.

v2 tensors are decoded to numpy once, here, and encoded back in the form the
caller used: typed ``contents`` or ``raw_input_contents``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from protos.inference import grpc_service_pb2 as v2
from protos.inference import model_config_pb2 as v2config
from protos.streamscore.v1 import scoring_pb2 as pb
from server.errors import InvalidInput
from server.explain.reasons import Reason
from server.registry import LoadedVersion
from server.router import Route
from server.scoring_types import ScoreInput, ScoreResult

ROUTES = {
    Route.CHAMPION: pb.ROUTE_CHAMPION,
    Route.CANARY: pb.ROUTE_CANARY,
    Route.PINNED: pb.ROUTE_PINNED,
}
# manifest dtype -> (v2 datatype, Triton config DataType, numpy dtype, contents field)
_DTYPES: Mapping[str, tuple[str, int, type[np.generic], str]] = {
    "float32": ("FP32", v2config.TYPE_FP32, np.float32, "fp32_contents"),
    "float64": ("FP64", v2config.TYPE_FP64, np.float64, "fp64_contents"),
    "int64": ("INT64", v2config.TYPE_INT64, np.int64, "int64_contents"),
    "int32": ("INT32", v2config.TYPE_INT32, np.int32, "int_contents"),
}
_NUMPY_TO_V2 = {np.dtype(np_type): (name, field) for name, _, np_type, field in _DTYPES.values()}


MAX_EVENT_TIME_S = 253_402_300_799
"""9999-12-31T23:59:59Z, the end of ``google.protobuf.Timestamp``'s valid range."""


def decode_score_request(request: pb.ScoreRequest) -> ScoreInput:
    """A ``ScoreRequest`` as pipeline input (feature validation happens at assembly)."""
    event_time_ms = None
    if request.HasField("event_time"):
        stamp = request.event_time
        if not 0 <= stamp.seconds <= MAX_EVENT_TIME_S or not 0 <= stamp.nanos < 1_000_000_000:
            raise InvalidInput(
                "event_time", "must lie between 1970-01-01 and 9999-12-31 (UTC), nanos < 1e9"
            )
        event_time_ms = stamp.seconds * 1000 + stamp.nanos // 1_000_000
    return ScoreInput(
        model=request.model,
        request_id=request.request_id or uuid.uuid4().hex,
        features=request.features,
        entity_ids=request.entity_ids,
        model_version=request.model_version or None,
        event_time_ms=event_time_ms,
        echo_features=request.echo_features,
        explain=request.explain,
    )


def encode_score_response(result: ScoreResult, server_time_us: int) -> pb.ScoreResponse:
    """A ``ScoreResult`` on the wire."""
    response = pb.ScoreResponse(
        request_id=result.request_id,
        score=result.score,
        model=result.model,
        model_version=result.version,
        route=ROUTES[result.route],
        defaulted_features=result.defaulted_features,
        server_time_us=server_time_us,
        degraded=bool(result.degraded_reasons),
        degraded_reasons=result.degraded_reasons,
        artifact_sha256=result.artifact_sha256,
        threshold=result.threshold,
        decision=result.decision,
    )
    if result.reasons is not None:
        response.reasons_base_value = result.reasons_base_value
        response.reasons.extend(encode_reason(r) for r in result.reasons)
    if result.freshness:
        response.freshness.extend(
            pb.FeatureFreshness(group=f.group, entity=f.entity, age_ms=f.age_ms)
            for f in result.freshness
        )
    if result.features:
        response.features.extend(pb.FeatureValue(name=n, value=v) for n, v in result.features)
    return response


def encode_reason(reason: Reason) -> pb.Reason:
    """One reason with the features behind it."""
    return pb.Reason(
        code=reason.code,
        text=reason.text,
        contribution=reason.contribution,
        features=[
            pb.ReasonFeature(name=f.name, value=f.value, contribution=f.contribution)
            for f in reason.features
        ],
    )


def decode_infer_rows(
    request: v2.ModelInferRequest, loaded: LoadedVersion
) -> npt.NDArray[np.float32]:
    """The ``[N, F]`` input of a v2 request, validated against the manifest."""
    manifest = loaded.model.manifest
    width = loaded.layout.width
    if len(request.inputs) != 1:
        raise InvalidInput(
            "inputs", f"expected exactly 1 input {manifest.input.name!r}, got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.name != manifest.input.name:
        raise InvalidInput(
            "inputs[0].name", f"unknown input {tensor.name!r}; expected {manifest.input.name!r}"
        )
    datatype = _DTYPES[manifest.input.dtype][0]
    if tensor.datatype != datatype:
        raise InvalidInput(
            "inputs[0].datatype", f"expected {datatype}, got {tensor.datatype or 'nothing'}"
        )
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[1] != width or shape[0] < 1:
        raise InvalidInput("inputs[0].shape", f"expected [N >= 1, {width}], got {shape}")
    max_rows = loaded.batcher.policy.max_batch_size
    if shape[0] > max_rows:
        raise InvalidInput(
            "inputs[0].shape", f"{shape[0]} rows exceed the model's max_batch_size {max_rows}"
        )
    count = shape[0] * width
    if request.raw_input_contents:
        if tensor.HasField("contents"):
            raise InvalidInput("raw_input_contents", "given together with inputs[0].contents")
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                "raw_input_contents", f"expected 1 entry, got {len(request.raw_input_contents)}"
            )
        raw = request.raw_input_contents[0]
        if len(raw) != count * 4:
            raise InvalidInput(
                "raw_input_contents[0]",
                f"{len(raw)} bytes do not hold shape {shape} of {datatype} ({count * 4} bytes)",
            )
        rows = np.frombuffer(raw, dtype="<f4").reshape(shape[0], width)
    else:
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise InvalidInput(
                "inputs[0].contents.fp32_contents",
                f"{len(values)} values do not fill shape {shape} ({count} values)",
            )
        rows = np.array(values, dtype=np.float32).reshape(shape[0], width)
    loaded.layout.check_rows(rows, "inputs[0]")
    return rows


def requested_outputs(request: v2.ModelInferRequest, loaded: LoadedVersion) -> list[str]:
    """Output names the caller asked for (all when none), validated."""
    known = [o.name for o in loaded.model.manifest.outputs]
    if not request.outputs:
        return known
    names = []
    for i, output in enumerate(request.outputs):
        if output.name not in known:
            raise InvalidInput(
                f"outputs[{i}].name", f"unknown output {output.name!r}; model has {known}"
            )
        names.append(output.name)
    return names


def encode_infer_response(
    request: v2.ModelInferRequest,
    loaded: LoadedVersion,
    outputs: Mapping[str, npt.NDArray[Any]],
    names: list[str],
) -> v2.ModelInferResponse:
    """Outputs in the caller's form: raw bytes if it sent raw, typed contents otherwise."""
    response = v2.ModelInferResponse(
        model_name=loaded.name, model_version=loaded.version, id=request.id
    )
    raw = bool(request.raw_input_contents)
    for name in names:
        value = outputs[name]
        datatype, field = _NUMPY_TO_V2[value.dtype]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=value.shape)
        if raw:
            little_endian = value.dtype.newbyteorder("<")
            response.raw_output_contents.append(
                np.ascontiguousarray(value, dtype=little_endian).tobytes()
            )
        else:
            getattr(tensor.contents, field).extend(value.ravel().tolist())
    return response


def tensor_metadata(
    loaded: LoadedVersion,
) -> tuple[
    list[v2.ModelMetadataResponse.TensorMetadata], list[v2.ModelMetadataResponse.TensorMetadata]
]:
    """v2 metadata of the input and outputs; the batch dimension is -1."""
    manifest = loaded.model.manifest
    inputs = [
        v2.ModelMetadataResponse.TensorMetadata(
            name=manifest.input.name,
            datatype=_DTYPES[manifest.input.dtype][0],
            shape=[-1, loaded.layout.width],
        )
    ]
    outputs = [
        v2.ModelMetadataResponse.TensorMetadata(
            name=o.name, datatype=_DTYPES[o.dtype][0], shape=[-1, *output_dims(loaded, o.name)]
        )
        for o in manifest.outputs
    ]
    return inputs, outputs


def output_dims(loaded: LoadedVersion, name: str) -> list[int]:
    """Non-batch dims of an output, read from the session's graph (-1 when symbolic)."""
    shape = loaded.model.output_shapes[name]
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


def model_config(loaded: LoadedVersion) -> v2config.ModelConfig:
    """Triton ``ModelConfig`` (dims exclude the batch dimension)."""
    manifest = loaded.model.manifest
    policy = loaded.batcher.policy
    config = v2config.ModelConfig(
        name=loaded.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=policy.max_batch_size,
        dynamic_batching=v2config.ModelDynamicBatching(
            max_queue_delay_microseconds=round(policy.max_queue_delay_s * 1e6)
        ),
    )
    config.input.add(
        name=manifest.input.name,
        data_type=_DTYPES[manifest.input.dtype][1],
        dims=[loaded.layout.width],
    )
    for o in manifest.outputs:
        dims = output_dims(loaded, o.name)
        output = config.output.add(name=o.name, data_type=_DTYPES[o.dtype][1], dims=dims or [1])
        if not dims:  # a [batch] output: Triton writes dims [1] with an empty reshape
            output.reshape.SetInParent()
    return config
