"""InferCodec: the prebuilt v2 response template gives the bytes a fresh build gives."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from protos.inference import grpc_service_pb2 as v2
from server.batcher import BatchPolicy
from server.codec import InferCodec
from server.errors import InvalidInput
from server.registry import LoadedVersion

WIDTH = 3


def fake_loaded(store_fed: bool = False) -> LoadedVersion:
    """Just the attributes InferCodec reads (no ONNX session needed); ``store_fed``:
    columns 1.. come from the feature store, column 0 is a request feature."""

    def check_rows(
        rows: npt.NDArray[np.float32], field: str, values: Iterable[float] | None = None
    ) -> None:
        if values is not None:
            flat = np.array(list(values), np.float32).reshape(rows.shape)
            assert np.array_equal(flat, rows, equal_nan=True)
        if not np.isfinite(rows).all():
            raise InvalidInput(field, "not finite")

    manifest = SimpleNamespace(
        input=SimpleNamespace(name="x", dtype="float32"),
        outputs=[SimpleNamespace(name="label"), SimpleNamespace(name="probabilities")],
    )
    return cast(
        LoadedVersion,
        SimpleNamespace(
            name="fraud",
            version="2",
            model=SimpleNamespace(manifest=manifest),
            layout=SimpleNamespace(
                width=WIDTH,
                check_rows=check_rows,
                names=tuple(f"c{i}" for i in range(WIDTH)),
                request_rules={"c0": None},
                uses_store=store_fed,
            ),
            batcher=SimpleNamespace(policy=BatchPolicy(max_batch_size=8)),
        ),
    )


def request(rows: npt.NDArray[np.float32], *, raw: bool, outputs: tuple[str, ...] = ()) -> Any:
    message = v2.ModelInferRequest(model_name="fraud", id="call-7")
    tensor = message.inputs.add(name="x", datatype="FP32", shape=rows.shape)
    if raw:
        message.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    for name in outputs:
        message.outputs.add(name=name)
    return message


def fresh(
    message: Any, outputs: dict[str, npt.NDArray[Any]], names: tuple[str, ...]
) -> v2.ModelInferResponse:
    """The response built field by field, as the codec did before templates."""
    response = v2.ModelInferResponse(model_name="fraud", model_version="2", id=message.id)
    types = {
        np.dtype(np.int64): ("INT64", "int64_contents"),
        np.dtype(np.float32): ("FP32", "fp32_contents"),
    }
    for name in names:
        value = outputs[name]
        datatype, field = types[value.dtype]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=value.shape)
        if message.raw_input_contents:
            response.raw_output_contents.append(
                value.astype(value.dtype.newbyteorder("<")).tobytes()
            )
        else:
            getattr(tensor.contents, field).extend(value.ravel().tolist())
    return response


def model_outputs(rows: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
    p = (rows[:, :1] / 10).astype(np.float32)
    return {
        "label": (rows[:, 0] > 1).astype(np.int64),
        "probabilities": np.concatenate([1 - p, p], axis=1),
    }


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("count", [1, 3, 1])  # 1 again: a reused template
@pytest.mark.parametrize("asked", [(), ("probabilities",), ("probabilities", "label")])
def test_template_response_has_the_bytes_of_a_fresh_build(
    raw: bool, count: int, asked: tuple[str, ...]
) -> None:
    codec = InferCodec(fake_loaded())
    for call in range(2):  # the second call is answered from the cached template
        base = np.arange(count * WIDTH, dtype=np.float32).reshape(count, WIDTH) + call
        rows = (base / 3).astype(np.float32)
        message = request(rows, raw=raw, outputs=asked)
        decoded = codec.decode(message)
        np.testing.assert_array_equal(decoded, rows)
        names = codec.requested_outputs(message)
        assert names == (asked or ("label", "probabilities"))
        outputs = model_outputs(decoded)
        got = codec.encode(message, outputs, names).SerializeToString()
        assert got == fresh(message, outputs, names).SerializeToString()


def test_decode_names_the_bad_field() -> None:
    codec = InferCodec(fake_loaded())
    rows = np.zeros((2, WIDTH), np.float32)
    bad = request(rows, raw=True)
    bad.inputs[0].shape[:] = [2, WIDTH + 1]
    with pytest.raises(InvalidInput) as shape_error:
        codec.decode(bad)
    assert shape_error.value.field == "inputs[0].shape"
    with pytest.raises(InvalidInput, match="max_batch_size 8"):
        codec.decode(request(np.zeros((9, WIDTH), np.float32), raw=True))
    with pytest.raises(InvalidInput) as output_error:
        codec.requested_outputs(request(rows, raw=True, outputs=("nope",)))
    assert output_error.value.field == "outputs[0].name"
    nan = rows.copy()
    nan[1, 2] = np.nan
    with pytest.raises(InvalidInput) as nan_error:
        codec.decode(request(nan, raw=False))
    assert nan_error.value.field == "inputs[0]"
    nan[1, 2] = np.inf
    with pytest.raises(InvalidInput) as inf_error:
        codec.decode(request(nan, raw=True))
    assert inf_error.value.field == "inputs[0]"


def test_outputs_asked_twice_are_answered_once() -> None:
    codec = InferCodec(fake_loaded())
    asked = request(np.zeros((1, WIDTH), np.float32), raw=False, outputs=("label",) * 3)
    assert codec.requested_outputs(asked) == ("label",)


def test_rows_of_a_store_fed_model_need_the_overrides_permission() -> None:
    codec = InferCodec(fake_loaded(store_fed=True))
    assert codec.store_features == tuple(f"c{i}" for i in range(1, WIDTH))
    with pytest.raises(InvalidInput, match=r"features\.allow_overrides"):
        codec.check_overrides(False)
    codec.check_overrides(True)
    InferCodec(fake_loaded()).check_overrides(False)  # request-only: every column is sendable
