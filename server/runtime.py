"""ONNX Runtime session for one model version: checked load, run inline or on a thread.

``load_version`` refuses an artifact whose sha256 differs from its manifest or
whose graph does not match the manifest (input name, dtype, feature count,
output names). ``OnnxModel.run`` executes ``session.run``:

* ``execution="inline"`` runs on the event loop thread. For the demo-sized
  tree models a batch costs microseconds while a thread hand-off costs more
  than the model, so inline is the default (see bench/RESULTS.md).
* ``execution="thread"`` runs on the model's own single worker thread; ORT
  releases the GIL, so the loop keeps serving while a larger model computes. On
  Linux that thread runs ``worker_nice`` above the process's nice value, so when
  both share a core the scheduler favours the loop (accepting, refusing, answering)
  over ``session.run``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from server.errors import ModelLoadError
from server.manifest import MODEL_FILE, ModelManifest, sha256_of

logger = logging.getLogger(__name__)

Execution = Literal["inline", "thread"]

_ORT_TYPES = {
    "float32": "tensor(float)",
    "float64": "tensor(double)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
}


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """How a session is built and where it runs."""

    execution: Execution = "inline"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    #: Added to the worker thread's nice value (``execution="thread"``, Linux only).
    worker_nice: int = 0


class OnnxModel:
    """A loaded, verified ONNX model version."""

    def __init__(
        self, manifest: ModelManifest, session: ort.InferenceSession, options: RuntimeOptions
    ) -> None:
        self.manifest = manifest
        self.options = options
        self._session = session
        #: ``session.run`` without its Python wrapper, whose checks (every input fed, no
        #: foreign OrtValue, no WebGPU graph capture, CPU provider fallback) hold by
        #: construction here: one numpy input checked at load, CPU only. ~1 us per batch,
        #: a lone request's share. The public method when the binding is not there.
        self._run = _session_run(session)
        self._input_name = manifest.input.name
        self._output_names = [o.name for o in manifest.outputs]
        self.output_shapes: dict[str, list[int | str | None]] = {
            o.name: list(o.shape) for o in session.get_outputs()
        }
        self._executor: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"ort-{manifest.name}",
                initializer=lower_thread_priority,
                initargs=(options.worker_nice,),
            )
            if options.execution == "thread"
            else None
        )

    @property
    def key(self) -> str:
        """``name/version``."""
        return f"{self.manifest.name}/{self.manifest.version}"

    @property
    def inline(self) -> bool:
        """True when batches run on the event loop thread (``execution="inline"``)."""
        return self._executor is None

    def run_sync(self, rows: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
        """Run the session on ``rows`` ([N, F] float32); outputs keyed by name."""
        values = self._run(self._output_names, {self._input_name: rows}, None)
        return dict(zip(self._output_names, values, strict=True))

    async def run(self, rows: npt.NDArray[np.float32]) -> Mapping[str, npt.NDArray[Any]]:
        """Run inline or on the model's worker thread, per ``options.execution``."""
        if self._executor is None:
            return self.run_sync(rows)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_sync, rows)

    def close(self) -> None:
        """Release the worker thread (the session is freed with the object)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _session_run(session: ort.InferenceSession) -> Callable[..., list[Any]]:
    """The binding's ``run(output_names, feed, run_options)`` under ``session.run``."""
    run: Callable[..., list[Any]] | None = getattr(getattr(session, "_sess", None), "run", None)
    return run if callable(run) else session.run


def lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (Linux: nice is per
    thread, set through its native id; elsewhere that call would renice the whole
    process, so nothing is done)."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError as error:  # e.g. a seccomp profile without setpriority: keep serving
        logger.warning("could not lower the worker thread's priority: %s", error)


def load_version(version_dir: Path, options: RuntimeOptions) -> OnnxModel:
    """Verify and load ``version_dir``; raises ``ModelLoadError`` naming the problem."""
    where = str(version_dir)
    try:
        manifest = ModelManifest.read(version_dir)
    except FileNotFoundError as error:
        raise ModelLoadError(f"{where}: no manifest ({error.filename})") from error
    except ValueError as error:
        raise ModelLoadError(f"{where}: invalid manifest: {error}") from error
    if manifest.version != version_dir.name or manifest.name != version_dir.parent.name:
        raise ModelLoadError(
            f"{where}: manifest says {manifest.name}/{manifest.version}, "
            f"directory is {version_dir.parent.name}/{version_dir.name}"
        )
    model_path = version_dir / MODEL_FILE
    if not model_path.is_file():
        raise ModelLoadError(f"{where}: {MODEL_FILE} is missing")
    actual = sha256_of(model_path)
    if actual != manifest.sha256:
        raise ModelLoadError(f"{where}: sha256 mismatch: manifest {manifest.sha256}, file {actual}")
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = options.inter_op_threads
    session_options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(model_path), sess_options=session_options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # ORT raises its own exception types for bad graphs
        raise ModelLoadError(f"{where}: onnxruntime refused the model: {error}") from error
    check_graph_matches(manifest, session, where)
    return OnnxModel(manifest, session, options)


def check_graph_matches(manifest: ModelManifest, session: ort.InferenceSession, where: str) -> None:
    """Raise ``ModelLoadError`` when the graph's inputs/outputs differ from the manifest."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"{where}: graph has {len(inputs)} inputs, manifest expects 1")
    graph_input = inputs[0]
    if graph_input.name != manifest.input.name:
        raise ModelLoadError(
            f"{where}: graph input is {graph_input.name!r}, manifest says {manifest.input.name!r}"
        )
    if graph_input.type != _ORT_TYPES[manifest.input.dtype]:
        raise ModelLoadError(
            f"{where}: input {graph_input.name!r} is {graph_input.type}, "
            f"manifest says {manifest.input.dtype}"
        )
    shape = graph_input.shape
    width = shape[1] if len(shape) == 2 else None
    if len(shape) != 2 or (isinstance(width, int) and width != len(manifest.features)):
        raise ModelLoadError(
            f"{where}: input shape {shape} does not take {len(manifest.features)} features"
        )
    graph_outputs = {o.name: o.type for o in session.get_outputs()}
    for spec in manifest.outputs:
        if spec.name not in graph_outputs:
            raise ModelLoadError(
                f"{where}: manifest output {spec.name!r} not in graph outputs "
                f"{sorted(graph_outputs)}"
            )
        if graph_outputs[spec.name] != _ORT_TYPES[spec.dtype]:
            raise ModelLoadError(
                f"{where}: output {spec.name!r} is {graph_outputs[spec.name]}, "
                f"manifest says {spec.dtype}"
            )
