"""In-process CPU cost of one Score / v2 ModelInfer call through the product's handler.

No gRPC transport: the servicer's registered handler (request decoding included) is
awaited in a loop on uvloop with a stand-in call context, one call at a time (the lone
caller: the batcher idle), with the app built as ``bench.perf_bench`` starts it (demo
``fraud`` model, features sent, default settings). What it measures is the product's own
Python per request, the part the gRPC floor does not pay; the transport's cost is
``bench.perf_bench``'s business. Use it for A/B of a hot-path change (run both sides
alternately, as the bench does); it is no substitute for the end-to-end ratios.

    python -m bench.handler_cost --calls 20000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

from bench.floor_server import BareModel, FloorInference, FloorScoring
from bench.payloads import PayloadSpec, infer_pool, score_pool
from protos.inference import grpc_service_pb2 as v2
from protos.streamscore.v1 import scoring_pb2 as pb
from server.app import AppContext
from server.grpc_api import InferenceService, ScoringService
from server.request_decoding import _unary_request
from server.settings import load_settings

Handler = Callable[[bytes, Any], Awaitable[Any]]


class _Context:
    """The parts of ``grpc.aio.ServicerContext`` the handlers read: no deadline, no
    metadata; ``abort`` raises."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    async def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"aborted: {code} {details}")


def _settings(repository: Path, version: str, extra: Sequence[str]) -> Any:
    overrides = [
        "server.port=0",
        "server.metrics_port=0",
        f"models.repository={repository}",
        f"models.per_model.fraud.champion={version}",
        "logging.level=WARNING",
        "features.definitions_path=null",
        f"routing.file_path={tempfile.mkdtemp(prefix='handler-cost-')}/routing.json",
        *extra,
    ]
    return load_settings(None, {}, overrides)


async def _time_calls(handler: Handler, payloads: list[bytes], calls: int) -> float:
    """CPU microseconds (the loop thread's) per call over ``calls`` sequential calls."""
    context = _Context()
    n = len(payloads)
    started = time.thread_time()
    for i in range(calls):
        await handler(payloads[i % n], context)
    return (time.thread_time() - started) / calls * 1e6


async def measure(
    repository: Path, version: str, calls: int, repeats: int, extra: Sequence[str]
) -> dict[str, list[float]]:
    """us per call of each API, ``repeats`` times, APIs alternating."""
    settings = _settings(repository, version, extra)
    async with AppContext(settings) as app:
        limits = settings.server.limits
        scoring = ScoringService(app.pipeline, app.registry, app.metrics, limits)
        inference = InferenceService(
            app.pipeline, app.registry, app.metrics, is_ready=lambda: True, limits=limits
        )
        spec = PayloadSpec.from_manifest(repository / "fraud" / version)
        handlers: dict[str, tuple[Handler, list[bytes]]] = {
            "score": (
                _unary_request(scoring.Score, pb.ScoreRequest.FromString, "score", False),
                [p.payload for p in score_pool(spec, model="fraud", model_version="",
                                               size=512, seed=1)],
            ),
            "v2 raw": (
                _unary_request(inference.ModelInfer, v2.ModelInferRequest.FromString, "v2", False),
                [p.payload for p in infer_pool(spec, model="fraud", model_version="", size=512,
                                               seed=1, rows=1, raw=True)],
            ),
        }  # fmt: skip
        bare = BareModel(repository / "fraud" / version)
        handlers["bare score"] = (
            _unary_request(FloorScoring(bare).Score, pb.ScoreRequest.FromString, "score", False),
            handlers["score"][1],
        )
        handlers["bare v2 raw"] = (
            _unary_request(FloorInference(bare).ModelInfer, v2.ModelInferRequest.FromString,
                           "v2", False),
            handlers["v2 raw"][1],
        )  # fmt: skip
        for handler, payloads in handlers.values():
            await _time_calls(handler, payloads, calls // 4)  # warm up
        results: dict[str, list[float]] = {name: [] for name in handlers}
        for _ in range(repeats):
            for name, (handler, payloads) in handlers.items():
                results[name].append(await _time_calls(handler, payloads, calls))
        return results


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: prints JSON (``us per call`` lists and medians)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.handler_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--version", default="2")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", dest="settings", action="append", default=[])
    args = parser.parse_args(argv)
    results = uvloop.run(
        measure(args.repository, args.version, args.calls, args.repeats, args.settings)
    )
    median = {name: statistics.median(values) for name, values in results.items()}
    document = {
        "us_per_call": results,
        "median_us": median,
        "product_over_bare": {
            name: median[name] / median[f"bare {name}"] for name in ("score", "v2 raw")
        },
    }
    json.dump(document, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
