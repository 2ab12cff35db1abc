"""Reference servers for the hot path: streamscore's gRPC APIs with the least work.

Same services as the real server (``streamscore.v1.Scoring`` Score/ScoreStream and
``inference.GRPCInferenceService``), same stack (grpc.aio on uvloop, N forked
processes sharing the port with ``grpc.so_reuseport``), and one of two handlers:

* ``--handler empty`` (the gRPC floor): every call answers a constant, a score of 0.5
  echoing ``request_id``, or an FP32 ``[N]`` output tensor echoing ``id`` (raw if the
  request was raw). Nothing is decoded.
* ``--handler bare --model-dir models/fraud/1``: one ``session.run`` per request and
  nothing else: the row (v2 tensor, or Score's feature map in manifest order, NaN when
  absent) goes straight to ONNX Runtime and the outputs come straight back (v2: every
  output, or the requested ones, in the request's form; Score: the manifest's score
  column). No validation, batching, logging or metrics.

The product is measured against both (``bench.perf_bench``), so they stay the cheapest
honest ones. With ``--model-dir`` the v2 metadata (``ModelMetadata``, ``ModelConfig``)
describes that model's input and outputs, which is what ``perf_analyzer`` needs to
build requests; it also needs ``ServerMetadata`` and, with ``--async``, the echoed id.

    taskset -c 0 python -m bench.floor_server --port 50051 [--processes 2]
    taskset -c 0 python -m bench.floor_server --port 50051 --handler bare --model-dir models/fraud/1

Each serving process prints ``floor_server listening on HOST:PORT pid=PID`` on stdout
once it accepts connections; SIGTERM/SIGINT stop it gracefully (the parent of
``--processes N`` forwards them to its children).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt

from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2
from protos.streamscore.v1 import scoring_pb2, scoring_pb2_grpc
from server.manifest import MODEL_FILE, ModelManifest

FLOOR_SCORE = 0.5
FLOOR_VERSION = "floor"
OUTPUT_NAME = "score"
_RAW_SCORE = struct.pack("<f", FLOOR_SCORE)
_UNLIMITED = -1
READY_PREFIX = "floor_server listening on"
HANDLERS = ("empty", "bare")
#: ``max_batch_size`` the floor's ModelConfig reports (the product's default).
MAX_BATCH_SIZE = 64

Handler = Literal["empty", "bare"]
_Response = scoring_pb2.ScoreResponse
_InferResponse = grpc_service_pb2.ModelInferResponse
_TensorMetadata = grpc_service_pb2.ModelMetadataResponse.TensorMetadata

# manifest dtype -> (v2 datatype, Triton config DataType, contents field)
_V2_TYPES: dict[str, tuple[str, int, str]] = {
    "float32": ("FP32", model_config_pb2.TYPE_FP32, "fp32_contents"),
    "float64": ("FP64", model_config_pb2.TYPE_FP64, "fp64_contents"),
    "int64": ("INT64", model_config_pb2.TYPE_INT64, "int64_contents"),
    "int32": ("INT32", model_config_pb2.TYPE_INT32, "int_contents"),
}
_NUMPY_TO_V2 = {np.dtype(k): (name, field) for k, (name, _, field) in _V2_TYPES.items()}


@dataclass(frozen=True)
class ModelInfo:
    """What the v2 metadata says about the served model."""

    manifest: ModelManifest
    output_dims: dict[str, list[int]]  # non-batch dims per output, -1 when symbolic


class BareModel:
    """An ONNX Runtime session run once per request, as plainly as possible."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort

        self.manifest = ModelManifest.read(model_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(model_dir / MODEL_FILE), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.manifest.input.name
        self.output_names = [o.name for o in self.manifest.outputs]
        self.features = self.manifest.features
        self.width = len(self.features)
        self._score_position = self.output_names.index(self.manifest.score_output)
        self.output_dims = {
            o.name: [d if isinstance(d, int) else -1 for d in o.shape[1:]]
            for o in self.session.get_outputs()
        }

    def run(self, rows: npt.NDArray[np.float32], names: list[str]) -> list[npt.NDArray[Any]]:
        """``session.run`` of ``rows`` for the outputs ``names``."""
        return list(self.session.run(names, {self.input_name: rows}))

    def score(self, features: Any) -> float:
        """The score of one Score request's feature map (absent features are NaN)."""
        nan = math.nan
        row = np.array([[features.get(name, nan) for name in self.features]], dtype=np.float32)
        outputs = self.session.run(self.output_names, {self.input_name: row})
        value = outputs[self._score_position]
        return float(value[0, self.manifest.score_index] if value.ndim == 2 else value[0])


class FloorScoring(scoring_pb2_grpc.ScoringServicer):
    """Score/ScoreStream: a constant score (``model=None``) or one ``session.run`` each."""

    def __init__(self, model: BareModel | None = None) -> None:
        self._model = model

    def _answer(self, request: scoring_pb2.ScoreRequest) -> _Response:
        model = self._model
        return _Response(
            request_id=request.request_id,
            score=FLOOR_SCORE if model is None else model.score(request.features),
            model=request.model,
            model_version=request.model_version or FLOOR_VERSION,
            route=scoring_pb2.ROUTE_CHAMPION,
        )

    async def Score(self, request: scoring_pb2.ScoreRequest, context: Any) -> _Response:
        return self._answer(request)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[scoring_pb2.ScoreRequest], context: Any
    ) -> AsyncIterator[_Response]:
        async for request in request_iterator:
            yield self._answer(request)


class FloorInference(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol with an always-ready server.

    ``model=None``: a constant FP32 ``[N]`` output. Otherwise one ``session.run`` per
    request. ``info`` (the model's manifest) makes the metadata describe its tensors.
    """

    def __init__(self, model: BareModel | None = None, info: ModelInfo | None = None) -> None:
        self._model = model
        self._info = info

    async def ServerLive(
        self, request: grpc_service_pb2.ServerLiveRequest, context: Any
    ) -> grpc_service_pb2.ServerLiveResponse:
        return grpc_service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: grpc_service_pb2.ServerReadyRequest, context: Any
    ) -> grpc_service_pb2.ServerReadyResponse:
        return grpc_service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: grpc_service_pb2.ModelReadyRequest, context: Any
    ) -> grpc_service_pb2.ModelReadyResponse:
        return grpc_service_pb2.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: grpc_service_pb2.ServerMetadataRequest, context: Any
    ) -> grpc_service_pb2.ServerMetadataResponse:
        return grpc_service_pb2.ServerMetadataResponse(name="streamscore-floor", version="0")

    def _outputs(self) -> list[tuple[str, str, list[int]]]:
        """(name, manifest dtype, non-batch dims) of what ModelInfer answers."""
        if self._model is None or self._info is None:
            return [(OUTPUT_NAME, "float32", [])]
        return [
            (o.name, o.dtype, self._info.output_dims[o.name]) for o in self._info.manifest.outputs
        ]

    async def ModelMetadata(
        self, request: grpc_service_pb2.ModelMetadataRequest, context: Any
    ) -> grpc_service_pb2.ModelMetadataResponse:
        response = grpc_service_pb2.ModelMetadataResponse(
            name=request.name, versions=[request.version or FLOOR_VERSION], platform="floor"
        )
        if self._info is not None:
            manifest = self._info.manifest
            response.inputs.append(
                _TensorMetadata(
                    name=manifest.input.name, datatype="FP32", shape=[-1, len(manifest.features)]
                )
            )
        for name, dtype, dims in self._outputs():
            response.outputs.append(
                _TensorMetadata(name=name, datatype=_V2_TYPES[dtype][0], shape=[-1, *dims])
            )
        return response

    async def ModelConfig(
        self, request: grpc_service_pb2.ModelConfigRequest, context: Any
    ) -> grpc_service_pb2.ModelConfigResponse:
        config = model_config_pb2.ModelConfig(name=request.name, platform="floor")
        if self._info is not None:
            config.max_batch_size = MAX_BATCH_SIZE
            manifest = self._info.manifest
            config.input.add(
                name=manifest.input.name,
                data_type=model_config_pb2.TYPE_FP32,
                dims=[len(manifest.features)],
            )
            for name, dtype, dims in self._outputs():
                output = config.output.add(
                    name=name, data_type=_V2_TYPES[dtype][1], dims=dims or [1]
                )
                if not dims:  # a [batch] output: Triton writes dims [1] with an empty reshape
                    output.reshape.SetInParent()
        return grpc_service_pb2.ModelConfigResponse(config=config)

    async def ModelInfer(
        self, request: grpc_service_pb2.ModelInferRequest, context: Any
    ) -> _InferResponse:
        if self._model is not None:
            return self._bare_infer(request, self._model)
        inputs = request.inputs
        rows = inputs[0].shape[0] if inputs and inputs[0].shape else 0
        response = _InferResponse(
            model_name=request.model_name,
            model_version=request.model_version or FLOOR_VERSION,
            id=request.id,
        )
        output = response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=[rows])
        if request.raw_input_contents:
            response.raw_output_contents.append(_RAW_SCORE * rows)
        else:
            output.contents.fp32_contents.extend([FLOOR_SCORE] * rows)
        return response

    @staticmethod
    def _bare_infer(
        request: grpc_service_pb2.ModelInferRequest, model: BareModel
    ) -> _InferResponse:
        tensor = request.inputs[0]
        raw = bool(request.raw_input_contents)
        if raw:
            rows = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
        else:
            rows = np.array(tensor.contents.fp32_contents, dtype=np.float32)
        rows = rows.reshape(-1, model.width)
        names = [o.name for o in request.outputs] or model.output_names
        response = _InferResponse(
            model_name=request.model_name,
            model_version=request.model_version or FLOOR_VERSION,
            id=request.id,
        )
        for name, value in zip(names, model.run(rows, names), strict=True):
            datatype, field = _NUMPY_TO_V2[value.dtype]
            output = response.outputs.add(name=name, datatype=datatype, shape=value.shape)
            if raw:
                response.raw_output_contents.append(
                    value.astype(value.dtype.newbyteorder("<")).tobytes()
                )
            else:
                getattr(output.contents, field).extend(value.ravel().tolist())
        return response


def build_server(
    host: str,
    port: int,
    *,
    reuse_port: bool,
    handler: Handler = "empty",
    model_dir: Path | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with both floor services bound to ``host:port``; returns the port.

    ``handler="bare"`` needs ``model_dir``; with ``"empty"`` it only shapes the metadata.
    """
    model: BareModel | None = None
    info: ModelInfo | None = None
    if model_dir is not None:
        loaded = BareModel(model_dir)
        info = ModelInfo(loaded.manifest, loaded.output_dims)
        model = loaded if handler == "bare" else None
    elif handler == "bare":
        raise ValueError("handler 'bare' needs model_dir")
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_send_message_length", _UNLIMITED),
            ("grpc.max_receive_message_length", _UNLIMITED),
        ]
    )
    scoring_pb2_grpc.add_ScoringServicer_to_server(FloorScoring(model), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        FloorInference(model, info), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    return server, bound


async def serve(
    host: str,
    port: int,
    *,
    reuse_port: bool,
    handler: Handler = "empty",
    model_dir: Path | None = None,
    grace_s: float = 1.0,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop with ``grace_s`` for in-flight calls."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server, bound = build_server(
        host, port, reuse_port=reuse_port, handler=handler, model_dir=model_dir
    )
    await server.start()
    sys.stdout.write(f"{READY_PREFIX} {host}:{bound} pid={os.getpid()}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await server.stop(grace_s)


def run_process(
    host: str,
    port: int,
    reuse_port: bool,
    handler: Handler = "empty",
    model_dir: Path | None = None,
) -> None:
    """Body of one serving process: uvloop + ``serve``."""
    import uvloop

    uvloop.run(serve(host, port, reuse_port=reuse_port, handler=handler, model_dir=model_dir))


def _run_forked(
    host: str, port: int, processes: int, handler: Handler, model_dir: Path | None
) -> int:
    # Fork every child before any gRPC server exists in this process (grpc issue #16001).
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(
            target=run_process, args=(host, port, True, handler, model_dir), name=f"floor-{i}"
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return 0 if all(child.exitcode == 0 for child in children) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor_server",
        description="Reference gRPC servers: empty handlers (the floor) or a bare session.run.",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--processes", type=int, default=1, help="forked processes (reuseport)")
    parser.add_argument("--handler", choices=HANDLERS, default="empty")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="model version directory (manifest.json + model.onnx); needed by --handler bare",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    if args.handler == "bare" and args.model_dir is None:
        parser.error("--handler bare needs --model-dir")
    if args.model_dir is not None:
        try:
            ModelManifest.read(args.model_dir)
        except (OSError, ValueError) as error:
            parser.error(f"--model-dir: {error}")
    if args.processes == 1:
        run_process(args.host, args.port, False, args.handler, args.model_dir)
        return 0
    if args.port == 0:
        parser.error("--port 0 needs --processes 1 (the processes must share one port)")
    return _run_forked(args.host, args.port, args.processes, args.handler, args.model_dir)


if __name__ == "__main__":
    sys.exit(main())
