"""What the approval gate reads from the model repository, and the gate itself.

* **evidence** of a version: sha256 of its artifact (``model.onnx``) and of its
  validation report (``validation_report.json``, written by ``streamscore models
  validate``), hashed from the bytes on disk (cached per file by inode, size and
  mtime, so listing does not re-read unchanged files), and its manifest's
  ``submitted_by``.
* **required**: whether a model needs approvals: ``governance.require_approval``
  in the settings when it names the model, else whether any of its versions'
  manifests has a ``governance`` block.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

from server.manifest import MANIFEST_FILE, MODEL_FILE, sha256_of
from server.routing.approval import (
    REPORT_FILE,
    REPOSITORY_SUBMITTER,
    Evidence,
    Records,
    approval_problem,
    record_of,
)

logger = logging.getLogger(__name__)

_Stamp = tuple[int, int, int]


class ApprovalGate:
    """Reads evidence and answers whether a version may take traffic.

    ``configured(model)`` is the model's ``governance.require_approval`` setting
    (None = not configured: decided by its manifests).
    """

    def __init__(self, repository: Path, configured: Callable[[str], bool | None]) -> None:
        self._repository = repository
        self._configured = configured
        self._hashes: dict[Path, tuple[_Stamp, str]] = {}

    def required(self, model: str) -> bool:
        """True when ``model``'s versions need an approval to take traffic."""
        configured = self._configured(model)
        if configured is not None:
            return configured
        model_dir = self._repository / model
        try:
            version_dirs = [d for d in model_dir.iterdir() if d.is_dir()]
        except OSError:
            return False
        return any(_manifest(d).get("governance") is not None for d in version_dirs)

    async def required_async(self, model: str) -> bool:
        """``required`` off the event loop (it reads manifests)."""
        return await asyncio.to_thread(self.required, model)

    async def evidence(self, model: str, version: str) -> Evidence:
        """The version's files as they are now."""
        return await asyncio.to_thread(self._evidence, model, version)

    async def problem(self, model: str, version: str, records: Records) -> str | None:
        """Why ``model/version`` may not take traffic (None = it may)."""
        if not await self.required_async(model):
            return None
        evidence = await self.evidence(model, version)
        return approval_problem(record_of(records, model, version), evidence)

    def _evidence(self, model: str, version: str) -> Evidence:
        version_dir = self._repository / model / version
        submitter = _manifest(version_dir).get("submitted_by")
        return Evidence(
            artifact_sha256=self._hash(version_dir / MODEL_FILE),
            report_sha256=self._hash(version_dir / REPORT_FILE),
            submitter=str(submitter) if submitter else REPOSITORY_SUBMITTER,
        )

    def _hash(self, path: Path) -> str | None:
        try:
            stat = path.stat()
        except OSError:
            self._hashes.pop(path, None)
            return None
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._hashes.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            digest = sha256_of(path)
        except OSError:
            return None
        self._hashes[path] = (stamp, digest)
        return digest


def _manifest(version_dir: Path) -> dict[str, object]:
    """The raw manifest (empty when missing or unreadable: loading reports that)."""
    try:
        data = json.loads((version_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
