"""Model manifest: what a version in the model repository promises.

Layout: ``<repository>/<name>/<version>/model.onnx`` beside ``manifest.json``.
The manifest is the contract between the exporter and the server: the ordered
feature list (column order of the model's single ``[N, F]`` input), the tensor
names and dtypes, the file's sha256 and training metadata.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"

TensorDType = Literal["float32", "float64", "int64", "int32"]

MAX_MODEL_NAME_LENGTH = 128
"""Longest model name, version, endpoint or rollout id (a directory name: well under the
file systems' 255-byte limit, and the scoring API's ``server.limits.max_name_length``)."""
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
"""Model names, versions, endpoints and rollout ids: directory names in the model
repository (routing also refuses ``.`` and ``..``), so versions like ``1.2`` or
``2024-06-01`` are fine. Feature, group and entity names follow a stricter pattern,
``feature_streams.definitions.NAME_PATTERN`` (identifiers): they become ``:``-joined
Redis key parts, tile field names and Parquet/Spark column names, where ``.`` and
``-`` are not safe everywhere. Two kinds of name, two patterns, on purpose."""


class TensorSpec(BaseModel):
    """One named tensor of the ONNX graph."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    dtype: TensorDType


class TrainingInfo(BaseModel):
    """Provenance of the artifact: which data, which code, how good."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_snapshot: str = Field(description="Id of the training data snapshot.")
    code_commit: str = Field(description="Commit of the training code.")
    metrics: dict[str, float] = Field(default_factory=dict, description="e.g. auc, logloss.")
    created_at: datetime
    algorithm: str = ""


#: A plain file name inside the version directory (no path separators).
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ExplainerSpec(BaseModel):
    """The explainer artifact beside ``model.onnx`` (see ``server.explain``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["tree_shap"] = Field(description="Exact TreeSHAP over the graph's trees.")
    path: str = Field(pattern=FILE_NAME_PATTERN, description="File name in the version directory.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _in_version_dir(cls, value: str) -> str:
        if value in (".", "..", MODEL_FILE, MANIFEST_FILE):
            raise ValueError(f"explainer path {value!r} is not a separate file")
        return value


class ModelManifest(BaseModel):
    """Validated contents of ``manifest.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=MODEL_NAME_PATTERN)
    version: str = Field(min_length=1, pattern=MODEL_NAME_PATTERN)
    features: tuple[str, ...] = Field(min_length=1, description="Input columns, in order.")
    input: TensorSpec = Field(description="The single [N, len(features)] input tensor.")
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    score_output: str = Field(description="Output holding the score.")
    score_index: int = Field(
        default=1, ge=0, description="Column of a [N, K] score output (1 = P(positive))."
    )
    nan_allowed: frozenset[str] = Field(
        default_factory=frozenset, description="Features that may be NaN (missing)."
    )
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="Decision threshold.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training: TrainingInfo
    explainer: ExplainerSpec | None = Field(
        default=None, description="Reason codes need it; a model without one still serves."
    )
    purpose: str = Field(default="", description="What the model decides, for whom (model card).")
    limitations: tuple[str, ...] = Field(
        default=(), description="Known limitations and unsuitable uses (model card)."
    )
    submitted_by: str | None = Field(
        default=None,
        description="Who submitted the version (maker-checker: may not approve it); "
        "None = 'repository'.",
    )
    governance: dict[str, Any] | None = Field(
        default=None,
        description="Model risk metadata; its presence makes the model require approval "
        "unless governance.require_approval says otherwise.",
    )

    @field_validator("features")
    @classmethod
    def _unique_features(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        dupes = [f for f in value if f in seen or seen.add(f)]  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"duplicate feature names: {sorted(set(dupes))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        names = {o.name for o in self.outputs}
        if self.score_output not in names:
            raise ValueError(f"score_output {self.score_output!r} is not among outputs {names}")
        unknown = self.nan_allowed - set(self.features)
        if unknown:
            raise ValueError(f"nan_allowed names unknown features: {sorted(unknown)}")
        if self.input.dtype != "float32":
            # every row is assembled, validated and batched as float32
            raise ValueError(f"input.dtype must be float32, got {self.input.dtype!r}")
        return self

    @classmethod
    def read(cls, version_dir: Path) -> ModelManifest:
        """Parse ``version_dir/manifest.json``; raises ``ValueError`` naming the problem."""
        path = version_dir / MANIFEST_FILE
        return cls.model_validate(json.loads(path.read_text()))

    def write(self, version_dir: Path) -> Path:
        """Write ``manifest.json`` into ``version_dir`` and return its path."""
        path = version_dir / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
