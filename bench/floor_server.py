"""The floor: streamscore's gRPC APIs with handlers that do no work.

Same services as the real server (``streamscore.v1.Scoring`` Score/ScoreStream and
``inference.GRPCInferenceService``), same stack (grpc.aio on uvloop, N forked
processes sharing the port with ``grpc.so_reuseport``), but every handler answers a
constant: a score of 0.5 echoing ``request_id``, or an FP32 ``[N]`` output tensor
echoing ``id`` (raw if the request was raw). Its throughput is the ceiling the real
server is measured against, so the handlers stay the cheapest honest ones: no
logging, no metrics, no validation.

    taskset -c 0 python -m bench.floor_server --port 50051 [--processes 2]

Each serving process prints ``floor_server listening on HOST:PORT pid=PID`` on stdout
once it accepts connections; SIGTERM/SIGINT stop it gracefully (the parent of
``--processes N`` forwards them to its children).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator, Sequence
from types import FrameType
from typing import Any

import grpc
import grpc.aio

from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2
from protos.streamscore.v1 import scoring_pb2, scoring_pb2_grpc

FLOOR_SCORE = 0.5
FLOOR_VERSION = "floor"
OUTPUT_NAME = "score"
_RAW_SCORE = struct.pack("<f", FLOOR_SCORE)
_UNLIMITED = -1
READY_PREFIX = "floor_server listening on"

_Response = scoring_pb2.ScoreResponse
_InferResponse = grpc_service_pb2.ModelInferResponse


class FloorScoring(scoring_pb2_grpc.ScoringServicer):
    """Score/ScoreStream answering a constant score and echoing the request id."""

    async def Score(self, request: scoring_pb2.ScoreRequest, context: Any) -> _Response:
        return _Response(
            request_id=request.request_id,
            score=FLOOR_SCORE,
            model=request.model,
            model_version=request.model_version or FLOOR_VERSION,
            route=scoring_pb2.ROUTE_CHAMPION,
        )

    async def ScoreStream(
        self, request_iterator: AsyncIterator[scoring_pb2.ScoreRequest], context: Any
    ) -> AsyncIterator[_Response]:
        async for request in request_iterator:
            yield _Response(
                request_id=request.request_id,
                score=FLOOR_SCORE,
                model=request.model,
                model_version=request.model_version or FLOOR_VERSION,
                route=scoring_pb2.ROUTE_CHAMPION,
            )


class FloorInference(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol with an always-ready server and a constant FP32 output."""

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

    async def ModelMetadata(
        self, request: grpc_service_pb2.ModelMetadataRequest, context: Any
    ) -> grpc_service_pb2.ModelMetadataResponse:
        tensor = grpc_service_pb2.ModelMetadataResponse.TensorMetadata
        return grpc_service_pb2.ModelMetadataResponse(
            name=request.name,
            versions=[request.version or FLOOR_VERSION],
            platform="floor",
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1])],
        )

    async def ModelInfer(
        self, request: grpc_service_pb2.ModelInferRequest, context: Any
    ) -> _InferResponse:
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

    async def ModelConfig(
        self, request: grpc_service_pb2.ModelConfigRequest, context: Any
    ) -> grpc_service_pb2.ModelConfigResponse:
        config = model_config_pb2.ModelConfig(name=request.name, platform="floor")
        return grpc_service_pb2.ModelConfigResponse(config=config)


def build_server(host: str, port: int, *, reuse_port: bool) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with both floor services bound to ``host:port``; returns the port."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_send_message_length", _UNLIMITED),
            ("grpc.max_receive_message_length", _UNLIMITED),
        ]
    )
    scoring_pb2_grpc.add_ScoringServicer_to_server(FloorScoring(), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FloorInference(), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    return server, bound


async def serve(host: str, port: int, *, reuse_port: bool, grace_s: float = 1.0) -> None:
    """Serve until SIGTERM or SIGINT, then stop with ``grace_s`` for in-flight calls."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server, bound = build_server(host, port, reuse_port=reuse_port)
    await server.start()
    sys.stdout.write(f"{READY_PREFIX} {host}:{bound} pid={os.getpid()}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await server.stop(grace_s)


def run_process(host: str, port: int, reuse_port: bool) -> None:
    """Body of one serving process: uvloop + ``serve``."""
    import uvloop

    uvloop.run(serve(host, port, reuse_port=reuse_port))


def _run_forked(host: str, port: int, processes: int) -> int:
    # Fork every child before any gRPC server exists in this process (grpc issue #16001).
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(target=run_process, args=(host, port, True), name=f"floor-{i}")
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
        prog="python -m bench.floor_server", description="Empty-handler gRPC baseline server."
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--processes", type=int, default=1, help="forked processes (reuseport)")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    if args.processes == 1:
        run_process(args.host, args.port, reuse_port=False)
        return 0
    if args.port == 0:
        parser.error("--port 0 needs --processes 1 (the processes must share one port)")
    return _run_forked(args.host, args.port, args.processes)


if __name__ == "__main__":
    sys.exit(main())
