"""Pre-generated request pools for the load generator.

Requests are built and serialised once, before the run, so the cost of making
them is never part of what is measured. Feature names come from a model
manifest (``models/<name>/<version>/manifest.json``); values are plausible random
numbers chosen by feature name (see ``feature_column``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from protos.inference import grpc_service_pb2
from protos.streamscore.v1 import scoring_pb2
from server.manifest import MANIFEST_FILE, ModelManifest

#: Request-time features of the demo fraud model, used when no manifest is given.
DEMO_FEATURES: tuple[str, ...] = (
    "amount",
    "mcc",
    "channel",
    "hour_of_day",
    "day_of_week",
    "is_international",
    "card_present",
    "distance_from_home_km",
)
DEFAULT_INPUT_NAME = "input"
DEFAULT_ENTITIES: tuple[str, ...] = ("card_id", "customer_id")

FloatArray = npt.NDArray[np.float64]

_INT_RANGES: dict[str, tuple[int, int]] = {
    "mcc": (0, 9999),
    "channel": (0, 2),
    "hour_of_day": (0, 23),
    "day_of_week": (0, 6),
}
_BINARY_P: dict[str, float] = {"is_international": 0.1, "card_present": 0.7}


@dataclass(frozen=True)
class PayloadSpec:
    """What a request carries: the model's ordered features and its v2 input name."""

    features: tuple[str, ...]
    input_name: str = DEFAULT_INPUT_NAME
    source: str = "demo"

    @classmethod
    def from_manifest(cls, path: Path) -> PayloadSpec:
        """Read a manifest given as its ``manifest.json`` path or its version directory."""
        version_dir = path.parent if path.name == MANIFEST_FILE else path
        manifest = ModelManifest.read(version_dir)
        return cls(manifest.features, manifest.input.name, str(version_dir / MANIFEST_FILE))

    @classmethod
    def demo(cls) -> PayloadSpec:
        """The demo request features, for use without a manifest (e.g. the floor server)."""
        return cls(DEMO_FEATURES)


@dataclass(frozen=True)
class PoolItem:
    """One pre-serialised request and the id it carries (echoed by the server)."""

    payload: bytes
    request_id: str


def feature_column(name: str, rng: np.random.Generator, size: int) -> FloatArray:
    """``size`` plausible random values for a feature, chosen by its name (all >= 0)."""
    if name == "amount":
        return np.clip(rng.lognormal(3.5, 1.2, size), 1.0, 5000.0).round(2)
    if name in _INT_RANGES:
        low, high = _INT_RANGES[name]
        return rng.integers(low, high, size, endpoint=True).astype(np.float64)
    if name in _BINARY_P:
        return (rng.random(size) < _BINARY_P[name]).astype(np.float64)
    if name == "distance_from_home_km":
        return np.clip(rng.exponential(20.0, size), 0.0, 500.0).round(3)
    if name.startswith(("is_", "has_")):
        return (rng.random(size) < 0.2).astype(np.float64)
    if "count" in name or name.startswith(("n_", "num_")):
        return rng.integers(0, 50, size, endpoint=True).astype(np.float64)
    return rng.uniform(0.0, 100.0, size).round(4)


def feature_matrix(names: tuple[str, ...], rng: np.random.Generator, rows: int) -> FloatArray:
    """A ``[rows, len(names)]`` float64 matrix of plausible values, columns in ``names`` order."""
    return np.column_stack([feature_column(name, rng, rows) for name in names])


def _entity_ids(
    entities: tuple[str, ...], cardinality: int, rng: np.random.Generator, size: int
) -> list[dict[str, str]]:
    ids = rng.integers(0, cardinality, (size, len(entities))).tolist()
    return [
        {entity: f"{entity}-{n}" for entity, n in zip(entities, row, strict=True)} for row in ids
    ]


def score_pool(
    spec: PayloadSpec,
    *,
    model: str,
    model_version: str,
    size: int,
    seed: int,
    request_features: tuple[str, ...] | None = None,
    entities: tuple[str, ...] = DEFAULT_ENTITIES,
    entity_cardinality: int = 10_000,
) -> list[PoolItem]:
    """Serialised ``ScoreRequest``s with unique request ids ``r0..r<size-1>``.

    ``request_features`` limits the features sent (default: all of ``spec.features``).
    """
    rng = np.random.default_rng(seed)
    names = spec.features if request_features is None else request_features
    values: list[list[float]] = feature_matrix(names, rng, size).tolist()
    entity_ids = _entity_ids(entities, entity_cardinality, rng, size)
    items: list[PoolItem] = []
    for index, (row, ids) in enumerate(zip(values, entity_ids, strict=True)):
        request_id = f"r{index}"
        request = scoring_pb2.ScoreRequest(
            model=model,
            model_version=model_version,
            request_id=request_id,
            entity_ids=ids,
            features=dict(zip(names, row, strict=True)),
        )
        items.append(PoolItem(request.SerializeToString(), request_id))
    return items


def infer_pool(
    spec: PayloadSpec,
    *,
    model: str,
    model_version: str,
    size: int,
    seed: int,
    rows: int,
    raw: bool,
) -> list[PoolItem]:
    """Serialised v2 ``ModelInferRequest``s with one FP32 ``[rows, F]`` input.

    With ``raw`` the tensor goes in ``raw_input_contents`` (little-endian float32),
    otherwise in ``contents.fp32_contents``.
    """
    rng = np.random.default_rng(seed)
    width = len(spec.features)
    tensors = feature_matrix(spec.features, rng, size * rows).astype("<f4").reshape(size, -1)
    items: list[PoolItem] = []
    for index in range(size):
        request_id = f"r{index}"
        tensor = grpc_service_pb2.ModelInferRequest.InferInputTensor(
            name=spec.input_name, datatype="FP32", shape=[rows, width]
        )
        request = grpc_service_pb2.ModelInferRequest(
            model_name=model, model_version=model_version, id=request_id
        )
        if raw:
            request.raw_input_contents.append(tensors[index].tobytes())
        else:
            contents: Any = tensor.contents.fp32_contents
            contents.extend(tensors[index].tolist())
        request.inputs.append(tensor)
        items.append(PoolItem(request.SerializeToString(), request_id))
    return items
