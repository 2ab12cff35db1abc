"""Drive a server with the official ``tritonclient[grpc]`` client; print the results as JSON.

Run in a subprocess by ``test_v2_protocol.py``: tritonclient and our generated
``protos.inference`` both register ``inference.*`` messages in protobuf's default
descriptor pool, so they cannot live in one process. This script imports nothing
from ``protos`` or ``server``.

    python -m tests.integration.triton_client_probe --url 127.0.0.1:PORT --model lin \
        --rows-json '[[0.1, ...], ...]' --request-id r-1 [--version 1]

Prints one JSON object: readiness, server/model metadata, model config, a raw
(``set_data_from_numpy``) inference with its echoed id and outputs, the same with
a requested-output subset, and the status of a few refused calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Json = dict[str, Any]

# tritonclient is imported inside ``probe`` only: importing it at module level would
# register its ``inference.*`` messages as soon as anything (e.g. a test collector)
# imports this module.


def _tensors(items: Sequence[Any]) -> list[Json]:
    return [
        {"name": str(t.name), "datatype": str(t.datatype), "shape": [int(d) for d in t.shape]}
        for t in items
    ]


def _config_tensors(items: Sequence[Any], data_types: Any) -> list[Json]:
    return [
        {
            "name": str(t.name),
            "data_type": str(data_types.Name(t.data_type)),
            "dims": [int(d) for d in t.dims],
            "reshape": [int(d) for d in t.reshape.shape] if t.HasField("reshape") else None,
        }
        for t in items
    ]


def _refusal(call: Callable[[], object], refused: type[Exception]) -> Json:
    """The status a call was refused with (``{"status": None}`` if it was not)."""
    try:
        call()
    except refused as error:
        failure: Any = error  # tritonclient's InferenceServerException
        return {"status": str(failure.status()), "message": str(failure.message())}
    return {"status": None, "message": ""}


def _infer(
    triton: Any,
    client: Any,
    model: str,
    version: str,
    rows: np.ndarray[Any, np.dtype[np.float32]],
    request_id: str,
    outputs: Sequence[str] | None,
) -> Json:
    tensor = triton.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # sends raw_input_contents
    requested = [triton.InferRequestedOutput(name) for name in outputs] if outputs else None
    result = client.infer(
        model, [tensor], model_version=version, outputs=requested, request_id=request_id
    )
    response = result.get_response()
    decoded: Json = {}
    for output in response.outputs:
        values = result.as_numpy(output.name)
        decoded[str(output.name)] = {
            "datatype": str(output.datatype),
            "shape": [int(d) for d in output.shape],
            "values": values.tolist(),
        }
    return {
        "id": str(response.id),
        "model_name": str(response.model_name),
        "model_version": str(response.model_version),
        "raw_output_count": len(response.raw_output_contents),
        "outputs": decoded,
    }


def probe(url: str, model: str, version: str, rows: list[list[float]], request_id: str) -> Json:
    """Run every call against ``url`` and collect the results."""
    import tritonclient.grpc as triton
    from tritonclient.grpc import model_config_pb2 as triton_config
    from tritonclient.utils import InferenceServerException as Refused

    data_types = triton_config.DataType
    client = triton.InferenceServerClient(url=url)
    try:
        array = np.asarray(rows, dtype=np.float32)
        server_meta = client.get_server_metadata()
        model_meta = client.get_model_metadata(model, model_version=version)
        config = client.get_model_config(model, model_version=version).config
        bad_width = np.zeros((1, array.shape[1] + 1), dtype=np.float32)
        return {
            "live": bool(client.is_server_live()),
            "ready": bool(client.is_server_ready()),
            "model_ready": bool(client.is_model_ready(model, model_version=version)),
            "model_ready_unknown": bool(client.is_model_ready("no-such-model")),
            "model_ready_unknown_version": bool(client.is_model_ready(model, "999")),
            "server_metadata": {
                "name": str(server_meta.name),
                "version": str(server_meta.version),
                "extensions": [str(e) for e in server_meta.extensions],
            },
            "model_metadata": {
                "name": str(model_meta.name),
                "versions": [str(v) for v in model_meta.versions],
                "platform": str(model_meta.platform),
                "inputs": _tensors(model_meta.inputs),
                "outputs": _tensors(model_meta.outputs),
            },
            "model_config": {
                "name": str(config.name),
                "max_batch_size": int(config.max_batch_size),
                "inputs": _config_tensors(config.input, data_types),
                "outputs": _config_tensors(config.output, data_types),
            },
            "infer": _infer(triton, client, model, version, array, request_id, None),
            "infer_subset": _infer(
                triton, client, model, version, array, f"{request_id}-subset", ["probabilities"]
            ),
            "refused": {
                "unknown_model": _refusal(
                    lambda: _infer(triton, client, "no-such-model", "", array, "x", None), Refused
                ),
                "bad_width": _refusal(
                    lambda: _infer(triton, client, model, version, bad_width, "x", None), Refused
                ),
                "metadata_unknown_model": _refusal(
                    lambda: client.get_model_metadata("no-such-model"), Refused
                ),
            },
        }
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, probe, print JSON on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="host:port of the gRPC server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default="", help="pin a version (default: champion)")
    parser.add_argument("--rows-json", required=True, help="[[f0..fF], ...] rows to infer")
    parser.add_argument("--request-id", default="probe-1")
    args = parser.parse_args(argv)
    result = probe(args.url, args.model, args.version, json.loads(args.rows_json), args.request_id)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
