"""gRPC servicers: decode, call the pipeline, encode, map errors to status.

No business logic lives here: ``server.codec`` converts messages and
``server.pipeline`` does the work. Failures become gRPC statuses in
``server.grpc_status`` (a ``ScoringError`` its own status and message, anything else
logged and INTERNAL), so the process never dies from a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server import codec
from server.answer_buffer import AnswerBuffer
from server.errors import ScoringError
from server.executor import JobResult
from server.grpc_status import abort, status_of
from server.lineage import Lineage
from server.metrics import UNKNOWN_MODEL, ApiMetrics, Metrics
from server.overrides import OverridePermission
from server.pipeline import ScoringPipeline
from server.registry import LoadedVersion, ModelRegistry
from server.scoring_types import ScoreResult
from server.settings import LimitsSettings

SERVER_NAME = "streamscore"
SERVER_VERSION = "0.1.0"

T = TypeVar("T")


def deadline_of(context: grpc.aio.ServicerContext[object, object]) -> float | None:
    """The call's deadline as an absolute ``loop.time()``, if it has one."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


def request_labels(registry: ModelRegistry, model: str, version: str) -> tuple[str, str]:
    """Metric labels of a request: only served models and loaded versions, so a
    client cannot grow the label set with names of its own."""
    if not registry.serves(model):
        return UNKNOWN_MODEL, "-"
    return model, version if version and registry.has(model, version) else "-"


async def _answer(
    context: grpc.aio.ServicerContext[object, object], work: Callable[[], Awaitable[T]]
) -> T:
    """Run a metadata call; turn its failure into the gRPC status (abort raises)."""
    try:
        return await work()
    except Exception as error:
        await abort(context, error, "a metadata call")


class ScoringService(pb_grpc.ScoringServicer):
    """``streamscore.v1.Scoring``."""

    def __init__(
        self,
        pipeline: ScoringPipeline,
        registry: ModelRegistry,
        metrics: Metrics,
        limits: LimitsSettings = codec.DEFAULT_LIMITS,
        overrides: OverridePermission | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._registry = registry
        self._metrics = metrics
        self._limits = limits
        self._overrides = overrides or OverridePermission()
        self._unary = metrics.api("score")
        self._stream = metrics.api("stream")

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ScoreResponse:
        """Score one transaction."""
        started = time.perf_counter()
        metrics = self._unary
        metrics.in_flight += 1
        try:
            item = codec.decode_score_request(
                request, self._limits, overrides_allowed=self._overrides.granted(context)
            )
            result = await self._pipeline.score(item, deadline_of(context))
            response = self._encode(result, started, metrics)
        except Exception as error:
            code, message = status_of(error, "Score")
            self._count_failure(metrics, request, code)
            await context.abort(code, message)
        finally:
            metrics.in_flight -= 1
            metrics.observe_latency(self._model_label(request.model), time.perf_counter() - started)
        return response

    async def ScoreStream(
        self,
        request_iterator: AsyncIterator[pb.ScoreRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.ScoreResponse]:
        """Score a stream; answers come back as they finish, failed items carry ``error``.

        One reader task feeds the items straight into the batchers (no task per item)
        and each answer is encoded in its job's completion callback, so items read
        together are scored together and written by this one generator.
        """
        limits = self._limits
        buffer: AnswerBuffer[pb.ScoreResponse] = AnswerBuffer(
            limits.stream_max_in_flight, limits.stream_buffer_bytes
        )
        overrides_allowed = self._overrides.granted(context)
        queued: set[asyncio.Future[JobResult]] = set()
        prune_at = 2 * limits.stream_max_in_flight
        deadline = deadline_of(context)
        metrics = self._stream
        counts = [0, 0]  # items read, items answered

        def answer(
            request: pb.ScoreRequest, started: float, outcome: ScoreResult | Exception
        ) -> None:
            counts[1] += 1
            metrics.in_flight -= 1
            if isinstance(outcome, ScoreResult):
                response = self._encode(outcome, started, metrics)
            else:
                code, message = status_of(outcome, "a ScoreStream item")
                self._count_failure(metrics, request, code)
                response = _error_response(request, code, message, limits)
            metrics.observe_latency(self._model_label(request.model), time.perf_counter() - started)
            buffer.put(response, response.ByteSize())

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    await buffer.admit()
                    started = time.perf_counter()
                    counts[0] += 1
                    metrics.in_flight += 1
                    try:
                        item = codec.decode_score_request(
                            request, limits, overrides_allowed=overrides_allowed
                        )
                    except Exception as error:
                        answer(request, started, error)
                        continue
                    future = self._pipeline.score_later(
                        item, deadline, functools.partial(answer, request, started)
                    )
                    if future is not None:
                        # no done callback per item to discard it: the finished ones
                        # are pruned when the set doubles past the in-flight bound
                        queued.add(future)
                        if len(queued) > prune_at:
                            queued.difference_update([f for f in queued if f.done()])
            finally:
                buffer.close()  # reading ended: the rest are answers in flight

        reader = asyncio.create_task(read_all())
        try:
            while taken := await buffer.take_all():
                for response, size in taken:
                    yield response
                    # Room frees once its answer is taken by the transport, so a client
                    # that stops reading stops the reads too (HTTP/2 flow control pushes
                    # back) instead of answers piling up here (bounded in items and bytes).
                    buffer.sent(size)
            try:
                await reader
            except Exception as error:  # the reader failed: end now, with its status
                # (undecodable bytes arrive as server.request_decoding's InvalidInput)
                await abort(context, error, "the ScoreStream request reader")
        finally:
            reader.cancel()
            for future in list(queued):
                future.cancel()  # the batcher skips a cancelled job
            metrics.in_flight -= counts[0] - counts[1]
            counts[1] = counts[0]
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def _encode(self, result: ScoreResult, started: float, metrics: ApiMetrics) -> pb.ScoreResponse:
        if result.freshness or result.degraded_reasons:
            self._metrics.observe_features(result.freshness, result.degraded_reasons)
        metrics.count(result.model, result.version, result.route.value, "OK")
        elapsed_us = int((time.perf_counter() - started) * 1e6)
        return codec.encode_score_response(result, elapsed_us)

    def _model_label(self, model: str) -> str:
        return model if self._registry.serves(model) else UNKNOWN_MODEL

    def _count_failure(
        self, metrics: ApiMetrics, request: pb.ScoreRequest, code: grpc.StatusCode
    ) -> None:
        model, version = request_labels(self._registry, request.model, request.model_version)
        metrics.count(model, version, "-", code.name)


def _error_response(
    request: pb.ScoreRequest, code: grpc.StatusCode, message: str, limits: LimitsSettings
) -> pb.ScoreResponse:
    """A failed stream item's answer; its ids echoed only up to their limits."""
    return pb.ScoreResponse(
        request_id=request.request_id[: limits.max_id_length],
        model=request.model[: limits.max_name_length],
        error=pb.ScoreError(code=code.value[0], message=message),
    )


class InferenceService(v2_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol (KServe v2) data plane plus Triton's ModelConfig."""

    def __init__(
        self,
        pipeline: ScoringPipeline,
        registry: ModelRegistry,
        metrics: Metrics,
        is_ready: Callable[[], bool],
        limits: LimitsSettings = codec.DEFAULT_LIMITS,
        overrides: OverridePermission | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._registry = registry
        self._limits = limits
        self._overrides = overrides or OverridePermission()
        self._v2 = metrics.api("v2")
        self._is_ready = is_ready
        self._codecs: dict[tuple[str, str], codec.InferCodec] = {}

    def _codec(self, loaded: LoadedVersion) -> codec.InferCodec:
        """The prebuilt v2 codec of ``loaded`` (rebuilt when the version is reloaded)."""
        key = (loaded.name, loaded.version)
        infer_codec = self._codecs.get(key)
        if infer_codec is None or infer_codec.loaded is not loaded:
            infer_codec = self._codecs[key] = codec.InferCodec(loaded)
        return infer_codec

    async def ServerLive(
        self, request: v2.ServerLiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: v2.ServerReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(
        self, request: v2.ModelReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> v2.ModelReadyResponse:
        try:
            codec.check_name("name", request.name, self._limits)
            codec.check_name("version", request.version, self._limits)
            self._pipeline.choose(request.name, request.version or None)
        except ScoringError:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=self._is_ready())

    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_configuration"]
        )

    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> v2.ModelMetadataResponse:
        async def work() -> v2.ModelMetadataResponse:
            codec.check_name("name", request.name, self._limits)
            codec.check_name("version", request.version, self._limits)
            loaded, _ = self._pipeline.choose(request.name, request.version or None)
            inputs, outputs = codec.tensor_metadata(loaded)
            return v2.ModelMetadataResponse(
                name=loaded.name,
                versions=self._registry.versions(loaded.name),
                platform="onnxruntime_onnx",
                inputs=inputs,
                outputs=outputs,
                lineage=Lineage.of(
                    loaded.model.manifest, explainer=loaded.reasons is not None
                ).as_strings(),
            )

        return await _answer(context, work)

    async def ModelConfig(
        self, request: v2.ModelConfigRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> v2.ModelConfigResponse:
        async def work() -> v2.ModelConfigResponse:
            codec.check_name("name", request.name, self._limits)
            codec.check_name("version", request.version, self._limits)
            loaded, _ = self._pipeline.choose(request.name, request.version or None)
            return v2.ModelConfigResponse(config=codec.model_config(loaded))

        return await _answer(context, work)

    async def ModelInfer(
        self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> v2.ModelInferResponse:
        started = time.perf_counter()
        metrics = self._v2
        metrics.in_flight += 1
        model, version = request.model_name, "-"
        loaded: LoadedVersion | None = None
        try:
            codec.check_infer_request(request, self._limits)
            loaded, decision = self._pipeline.choose(
                request.model_name, request.model_version or None
            )
            version = loaded.version  # chosen: a served model and a loaded version
            infer_codec = self._codec(loaded)
            if infer_codec.store_features:
                infer_codec.check_overrides(self._overrides.granted(context))
            rows = infer_codec.decode(request)
            names = infer_codec.requested_outputs(request)
            result = await self._pipeline.infer(
                loaded,
                rows,
                deadline_of(context),
                decision=decision,
                request_id=request.id,
                explain=codec.reasons_asked(request),
            )
            response = infer_codec.encode(request, result.outputs, names)
            if result.explained is not None:
                response.parameters[codec.REASONS_PARAMETER].string_param = codec.reasons_parameter(
                    result.explained
                )
        except Exception as error:
            code, message = status_of(error, "ModelInfer")
            if loaded is None:  # labels only from served names (see request_labels)
                model, version = request_labels(
                    self._registry, request.model_name, request.model_version
                )
            metrics.count(model, version, "-", code.name)
            await context.abort(code, message)
        finally:
            metrics.in_flight -= 1
            metrics.observe_latency(model, time.perf_counter() - started)
        metrics.count(model, version, decision.route.value, "OK")
        return response
