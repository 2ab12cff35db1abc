"""A version's lineage: which artifact, trained on which data by which code, and
whether it can explain itself. Read from its manifest; pure."""

from __future__ import annotations

from dataclasses import dataclass

from server.manifest import ModelManifest


@dataclass(frozen=True, slots=True)
class Lineage:
    """Training lineage and explainer presence of one version."""

    artifact_sha256: str
    data_snapshot: str
    code_commit: str
    created_at: str
    algorithm: str
    explainer: bool
    """True when the version has an explainer (loaded and checked, for a loaded version;
    named by its manifest, for one only on disk)."""
    explainer_sha256: str = ""

    @classmethod
    def of(cls, manifest: ModelManifest, explainer: bool | None = None) -> Lineage:
        """From ``manifest``; ``explainer`` overrides "the manifest names one"."""
        spec = manifest.explainer
        return cls(
            artifact_sha256=manifest.sha256,
            data_snapshot=manifest.training.data_snapshot,
            code_commit=manifest.training.code_commit,
            created_at=manifest.training.created_at.isoformat(),
            algorithm=manifest.training.algorithm,
            explainer=spec is not None if explainer is None else explainer,
            explainer_sha256=spec.sha256 if spec is not None else "",
        )

    def as_strings(self) -> dict[str, str]:
        """Every field as text (v2 metadata's string map)."""
        return {
            "artifact_sha256": self.artifact_sha256,
            "data_snapshot": self.data_snapshot,
            "code_commit": self.code_commit,
            "created_at": self.created_at,
            "algorithm": self.algorithm,
            "explainer": "true" if self.explainer else "false",
            "explainer_sha256": self.explainer_sha256,
        }
