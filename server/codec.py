"""Protobuf <-> pipeline types and numpy. The only module that touches messages' fields.

v2 tensors are decoded to numpy once, here, and encoded back in the form the
caller used: typed ``contents`` or ``raw_input_contents``.
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from protos.inference import grpc_service_pb2 as v2
from protos.inference import model_config_pb2 as v2config
from protos.streamscore.v1 import scoring_pb2 as pb
from server.errors import InvalidInput
from server.explain.reasons import Reason
from server.explain.service import Explained
from server.features import OVERRIDE_PERMISSION
from server.registry import LoadedVersion
from server.router import Route
from server.scoring_types import ScoreInput, ScoreResult
from server.settings import LimitsSettings

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


DEFAULT_LIMITS = LimitsSettings()
_LIMIT_KEY = "server.limits."


def _too_long(field: str, length: int, limit: int, key: str) -> InvalidInput:
    return InvalidInput(
        field, f"{length} characters exceed the limit of {limit} ({_LIMIT_KEY}{key})"
    )


def _too_many(field: str, count: int, limit: int, key: str) -> InvalidInput:
    return InvalidInput(field, f"{count} entries exceed the limit of {limit} ({_LIMIT_KEY}{key})")


def check_name(field: str, value: str, limits: LimitsSettings = DEFAULT_LIMITS) -> None:
    """A model/version/tensor name within ``max_name_length`` (else ``InvalidInput``)."""
    if len(value) > limits.max_name_length:
        raise _too_long(field, len(value), limits.max_name_length, "max_name_length")


def _check_keys(field: str, keys: Iterable[str], limit: int) -> None:
    """Every key of a map within ``limit`` characters; the message names the field and
    the start of the offending key (never the whole of it)."""
    for key in keys:
        if len(key) > limit:
            raise _too_long(f"{field}[{key[:32]!r}...]", len(key), limit, "max_name_length")


def check_score_request(request: pb.ScoreRequest, limits: LimitsSettings = DEFAULT_LIMITS) -> None:
    """Every string and map of a ``ScoreRequest`` within ``limits``: length checks, and
    one pass over the (few) entity ids. Feature names are not iterated here: a sent name
    is either one of the model's features (bounded by the definitions) or refused at
    assembly, where an unknown name over ``max_name_length`` gets this limit's error."""
    longest_id = limits.max_id_length
    if len(request.request_id) > longest_id:
        raise _too_long("request_id", len(request.request_id), longest_id, "max_id_length")
    names = limits.max_name_length
    if len(request.model) > names:
        raise _too_long("model", len(request.model), names, "max_name_length")
    if len(request.model_version) > names:
        raise _too_long("model_version", len(request.model_version), names, "max_name_length")
    features = request.features
    if len(features) > limits.max_features:
        raise _too_many("features", len(features), limits.max_features, "max_features")
    entity_ids = request.entity_ids
    if entity_ids:
        if len(entity_ids) > limits.max_entity_ids:
            raise _too_many("entity_ids", len(entity_ids), limits.max_entity_ids, "max_entity_ids")
        longest = limits.max_entity_id_length
        for name in entity_ids:  # (a upb map's items() is a Python-level view)
            entity_id = entity_ids[name]
            if len(name) > names:
                _check_keys("entity_ids", (name,), names)
            if len(entity_id) > longest:
                raise _too_long(
                    f"entity_ids.{name}", len(entity_id), longest, "max_entity_id_length"
                )


def _check_parameters(
    field: str, parameters: Mapping[str, v2.InferParameter], limits: LimitsSettings
) -> None:
    if not parameters:
        return
    if len(parameters) > limits.max_v2_parameters:
        raise _too_many(field, len(parameters), limits.max_v2_parameters, "max_v2_parameters")
    _check_keys(field, parameters, limits.max_name_length)
    longest = limits.max_string_parameter_length
    for key, parameter in parameters.items():
        if len(parameter.string_param) > longest:
            raise _too_long(
                f"{field}.{key}.string_param",
                len(parameter.string_param),
                longest,
                "max_string_parameter_length",
            )


def check_infer_request(
    request: v2.ModelInferRequest, limits: LimitsSettings = DEFAULT_LIMITS
) -> None:
    """Every string, map and repeated field of a v2 ``ModelInferRequest`` within
    ``limits`` (before the model is even looked up)."""
    if len(request.id) > limits.max_id_length:
        raise _too_long("id", len(request.id), limits.max_id_length, "max_id_length")
    longest = limits.max_name_length
    check_name("model_name", request.model_name, limits)
    check_name("model_version", request.model_version, limits)
    if request.parameters:
        _check_parameters("parameters", request.parameters, limits)
    inputs = request.inputs
    if len(inputs) > limits.max_v2_inputs:
        raise _too_many("inputs", len(inputs), limits.max_v2_inputs, "max_v2_inputs")
    for i, tensor in enumerate(inputs):
        # field names are formatted only for a failing check (no strings per call)
        if len(tensor.name) > longest:
            check_name(f"inputs[{i}].name", tensor.name, limits)
        if len(tensor.datatype) > longest:
            check_name(f"inputs[{i}].datatype", tensor.datatype, limits)
        if tensor.parameters:
            _check_parameters(f"inputs[{i}].parameters", tensor.parameters, limits)
    outputs = request.outputs
    if len(outputs) > limits.max_v2_outputs:
        raise _too_many("outputs", len(outputs), limits.max_v2_outputs, "max_v2_outputs")
    for i, output in enumerate(outputs):
        if len(output.name) > longest:
            check_name(f"outputs[{i}].name", output.name, limits)
        if output.parameters:
            _check_parameters(f"outputs[{i}].parameters", output.parameters, limits)


def decode_score_request(
    request: pb.ScoreRequest,
    limits: LimitsSettings = DEFAULT_LIMITS,
    *,
    overrides_allowed: bool = False,
) -> ScoreInput:
    """A ``ScoreRequest`` as pipeline input, within ``limits`` (feature validation and
    the overrides permission are applied at assembly)."""
    check_score_request(request, limits)
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
        overrides_allowed=overrides_allowed,
    )


def encode_score_response(result: ScoreResult, server_time_us: int) -> pb.ScoreResponse:
    """A ``ScoreResult`` on the wire."""
    response = pb.ScoreResponse(
        request_id=result.request_id,
        score=result.score,
        model=result.model,
        model_version=result.version,
        route=ROUTES[result.route],
        server_time_us=server_time_us,
        artifact_sha256=result.artifact_sha256,
        threshold=result.threshold,
        decision=result.decision,
    )
    # the usual answer has none of these: set only when present (each costs per call)
    if result.defaulted_features:
        response.defaulted_features.extend(result.defaulted_features)
    if result.degraded_reasons:
        response.degraded = True
        response.degraded_reasons.extend(result.degraded_reasons)
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


REASONS_PARAMETER = "reasons"
"""v2 request parameter asking for every row's reasons (``bool_param``), and the
response parameter carrying them (``string_param``, JSON)."""


def reasons_asked(request: v2.ModelInferRequest) -> bool:
    """Whether a v2 request asks for reasons (``parameters["reasons"].bool_param``)."""
    parameter = request.parameters.get(REASONS_PARAMETER)
    if parameter is None:
        return False
    kind = parameter.WhichOneof("parameter_choice")
    if kind != "bool_param":
        raise InvalidInput(
            f"parameters.{REASONS_PARAMETER}", f"expected bool_param, got {kind or 'nothing'}"
        )
    return parameter.bool_param


def reasons_parameter(explained: Iterable[Explained]) -> str:
    """The response's ``reasons`` parameter: a JSON array, one object per row, in row
    order, with the Score response's fields: ``reasons`` (code, text, contribution,
    features behind it with value and contribution) and ``reasons_base_value``. Strict
    JSON: a number that is not finite (a missing feature value is NaN) is ``null``."""
    return json.dumps(
        [
            {
                "reasons": [
                    {
                        "code": reason.code,
                        "text": reason.text,
                        "contribution": _finite(reason.contribution),
                        "features": [
                            {
                                "name": f.name,
                                "value": _finite(f.value),
                                "contribution": _finite(f.contribution),
                            }
                            for f in reason.features
                        ],
                    }
                    for reason in row.reasons
                ],
                "reasons_base_value": _finite(row.base_value),
            }
            for row in explained
        ],
        separators=(",", ":"),
        allow_nan=False,  # every number went through _finite: a miss here is a bug, loud
    )


def _finite(value: float) -> float | None:
    """``value`` as a JSON number, ``None`` (``null``) when it is NaN or infinite."""
    return value if math.isfinite(value) else None


#: Response templates one ``InferCodec`` keeps (output choice x batch shapes) at most.
MAX_TEMPLATES = 256


class InferCodec:
    """v2 ``ModelInfer`` decode/encode for one loaded version, constants prebuilt.

    The checks of a request against the manifest compare against values computed
    once here, and a response starts from a serialized template holding everything
    but the call's id and the output values (model, version, output names, datatypes
    and shapes), keyed by the outputs asked for and their shapes.
    """

    def __init__(self, loaded: LoadedVersion) -> None:
        self.loaded = loaded
        manifest = loaded.model.manifest
        self._layout = loaded.layout
        self._input_name = manifest.input.name
        self._datatype = _DTYPES[manifest.input.dtype][0]
        self._width = loaded.layout.width
        self._max_rows = loaded.batcher.policy.max_batch_size
        self._outputs = tuple(o.name for o in manifest.outputs)
        self._templates: dict[tuple[object, ...], bytes] = {}
        layout = loaded.layout
        #: Input columns the feature store fills on the Score path: a v2 row carries
        #: them too, so v2 inference needs the overrides permission when there are any.
        self.store_features = (
            tuple(n for n in layout.names if n not in layout.request_rules)
            if layout.uses_store
            else ()
        )

    def check_overrides(self, allowed: bool) -> None:
        """Refuse v2 rows of a store-fed model from a caller without the permission."""
        if self.store_features and not allowed:
            shown = ", ".join(self.store_features[:5])
            more = ", ..." if len(self.store_features) > 5 else ""
            raise InvalidInput(
                "inputs[0]",
                f"rows carry store features ({shown}{more}) of a store-fed model; "
                f"v2 inference on it needs permission {OVERRIDE_PERMISSION}",
            )

    def decode(self, request: v2.ModelInferRequest) -> npt.NDArray[np.float32]:
        """The ``[N, F]`` input of a v2 request, validated against the manifest."""
        inputs = request.inputs
        if len(inputs) != 1:
            raise InvalidInput(
                "inputs", f"expected exactly 1 input {self._input_name!r}, got {len(inputs)}"
            )
        tensor = inputs[0]
        if tensor.name != self._input_name:
            raise InvalidInput(
                "inputs[0].name", f"unknown input {tensor.name!r}; expected {self._input_name!r}"
            )
        datatype = self._datatype
        if tensor.datatype != datatype:
            raise InvalidInput(
                "inputs[0].datatype", f"expected {datatype}, got {tensor.datatype or 'nothing'}"
            )
        shape = list(tensor.shape)
        width = self._width
        if len(shape) != 2 or shape[1] != width or shape[0] < 1:
            raise InvalidInput("inputs[0].shape", f"expected [N >= 1, {width}], got {shape}")
        if shape[0] > self._max_rows:
            raise InvalidInput(
                "inputs[0].shape",
                f"{shape[0]} rows exceed the model's max_batch_size {self._max_rows}",
            )
        count = shape[0] * width
        raw_contents = request.raw_input_contents
        if raw_contents:
            if tensor.HasField("contents"):
                raise InvalidInput("raw_input_contents", "given together with inputs[0].contents")
            if len(raw_contents) != 1:
                raise InvalidInput(
                    "raw_input_contents", f"expected 1 entry, got {len(raw_contents)}"
                )
            raw = raw_contents[0]
            if len(raw) != count * 4:
                raise InvalidInput(
                    "raw_input_contents[0]",
                    f"{len(raw)} bytes do not hold shape {shape} of {datatype} ({count * 4} bytes)",
                )
            rows = np.frombuffer(raw, dtype="<f4").reshape(shape[0], width)
            # the check sums the wire bytes' floats without a numpy call (native order)
            values: Iterable[float] | None = (
                memoryview(raw).cast("f") if _NATIVE_IS_LITTLE else None
            )
        else:
            values = tensor.contents.fp32_contents  # Python floats, float32 on the wire
            if len(values) != count:
                raise InvalidInput(
                    "inputs[0].contents.fp32_contents",
                    f"{len(values)} values do not fill shape {shape} ({count} values)",
                )
            rows = np.array(values, dtype=np.float32).reshape(shape[0], width)
        self._layout.check_rows(rows, "inputs[0]", values)
        return rows

    def requested_outputs(self, request: v2.ModelInferRequest) -> tuple[str, ...]:
        """Output names the caller asked for (all when none), validated; a name asked
        for more than once is answered once."""
        if not request.outputs:
            return self._outputs
        names: dict[str, None] = {}  # asked-for order, each name once
        for i, output in enumerate(request.outputs):
            if output.name not in self._outputs:
                raise InvalidInput(
                    f"outputs[{i}].name",
                    f"unknown output {output.name!r}; model has {list(self._outputs)}",
                )
            names[output.name] = None
        return tuple(names)

    def encode(
        self,
        request: v2.ModelInferRequest,
        outputs: Mapping[str, npt.NDArray[Any]],
        names: tuple[str, ...],
    ) -> v2.ModelInferResponse:
        """Outputs in the caller's form: raw bytes if it sent raw, typed contents otherwise."""
        values = [outputs[name] for name in names]
        key = (names, *(v.shape for v in values), *(v.dtype for v in values))
        template = self._templates.get(key)
        if template is None:
            template = self._template(names, values)
            if len(self._templates) >= MAX_TEMPLATES:
                self._templates.clear()
            self._templates[key] = template
        response = v2.ModelInferResponse.FromString(template)
        response.id = request.id
        if request.raw_input_contents:
            response.raw_output_contents.extend(map(_little_endian_bytes, values))
        else:
            for tensor, value in zip(response.outputs, values, strict=True):
                field = _NUMPY_TO_V2[value.dtype][1]
                getattr(tensor.contents, field).extend(value.ravel().tolist())
        return response

    def _template(self, names: tuple[str, ...], values: list[npt.NDArray[Any]]) -> bytes:
        response = v2.ModelInferResponse(
            model_name=self.loaded.name, model_version=self.loaded.version
        )
        for name, value in zip(names, values, strict=True):
            datatype = _NUMPY_TO_V2[value.dtype][0]
            response.outputs.add(name=name, datatype=datatype, shape=value.shape)
        return response.SerializeToString()


def _little_endian_bytes(value: npt.NDArray[Any]) -> bytes:
    """``value``'s elements as little-endian bytes in C order (v2 raw contents)."""
    if _NATIVE_IS_LITTLE and value.dtype.isnative:
        return value.tobytes()  # C order by default: the common case needs no copy first
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()


_NATIVE_IS_LITTLE = sys.byteorder == "little"


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
