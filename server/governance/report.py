"""The validation report file: sealed with its own sha256, bound to the artifact.

``validation_report.json`` holds the report body plus ``report_sha256``, the
sha256 of the body's canonical JSON (sorted keys, no whitespace). The body names
the artifact's sha256 and the sha256 of every file written beside it (model card,
plots, reference profile), so ``verify_report`` fails when the report, the
artifact or any of those files changed after validation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from server.manifest import MODEL_FILE, sha256_of

REPORT_FILE = "validation_report.json"
REPORT_FORMAT = 1


class ReportError(ValueError):
    """The report is missing, altered, or no longer matches its files."""


def canonical_sha256(body: dict[str, Any]) -> str:
    """sha256 of ``body`` as canonical JSON."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_report(version_dir: Path, body: dict[str, Any]) -> str:
    """Seal ``body`` and write it beside the version; returns the report's sha256."""
    if "report_sha256" in body:
        raise ValueError("report body must not carry report_sha256")
    digest = canonical_sha256(body)
    sealed = {**body, "report_sha256": digest}
    (version_dir / REPORT_FILE).write_text(
        json.dumps(sealed, indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
    return digest


def verify_report(version_dir: Path) -> dict[str, Any]:
    """The report of ``version_dir`` after checking its seal, artifact and files."""
    path = version_dir / REPORT_FILE
    try:
        sealed = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ReportError(f"{path}: no validation report") from error
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not JSON: {error}") from error
    if not isinstance(sealed, dict) or not isinstance(sealed.get("report_sha256"), str):
        raise ReportError(f"{path}: no report_sha256")
    body = {k: v for k, v in sealed.items() if k != "report_sha256"}
    if canonical_sha256(body) != sealed["report_sha256"]:
        raise ReportError(f"{path}: report_sha256 does not match its contents (altered)")
    artifact = sha256_of(version_dir / MODEL_FILE)
    if artifact != body["artifact"]["sha256"]:
        raise ReportError(
            f"{path}: validated artifact sha256 {body['artifact']['sha256']}, "
            f"{MODEL_FILE} is now {artifact}"
        )
    for name, digest in body.get("files", {}).items():
        file = version_dir / name
        if not file.is_file() or sha256_of(file) != digest:
            raise ReportError(f"{path}: {name} changed or missing since validation")
    return sealed
