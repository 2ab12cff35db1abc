"""NVIDIA perf_analyzer (Triton's external KServe-v2 load generator): fetch, run, parse.

The binary ships in the manylinux ``tritonclient`` 2.41.0 wheel; ``bench/get_perf_analyzer.sh``
unpacks it into a gitignored cache (default ``.cache/perf_analyzer``) with the CUDA runtime
library it links (even over gRPC only) and writes ``env.sh`` (``PA=...``, ``LD_LIBRARY_PATH``).
``ensure_perf_analyzer`` runs the script when that file is missing.

One run is one concurrency level, measured over ``trials`` windows of ``window_ms`` with
the stability check switched off (``-s`` huge): on a shared machine perf_analyzer's own
"stable" criterion may never be met, and the comparison is made by alternating servers
instead. Results come from its CSV (``-f``).
"""

from __future__ import annotations

import csv
import io
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
FETCH_SCRIPT = BENCH_DIR / "get_perf_analyzer.sh"
DEFAULT_CACHE = BENCH_DIR.parent / ".cache" / "perf_analyzer"
#: Allowed max/min spread of the windows, in percent: large enough to never abort.
_NO_STABILITY_CHECK = "100000"


@dataclass(frozen=True)
class PerfAnalyzer:
    """Where the binary is and the environment it needs."""

    binary: Path
    env: Mapping[str, str]


@dataclass(frozen=True)
class PaResult:
    """One perf_analyzer measurement (latencies in microseconds, client side)."""

    concurrency: int
    infer_per_s: float
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float


def read_env_file(path: Path) -> PerfAnalyzer:
    """Parse the ``export PA=... LD_LIBRARY_PATH=...`` line written by the fetch script."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if words[:1] == ["export"]:
            words = words[1:]
        for word in words:
            key, sep, value = word.partition("=")
            if sep:
                values[key] = value
    if "PA" not in values:
        raise ValueError(f"{path}: no PA=... in it")
    env = {"LD_LIBRARY_PATH": values.get("LD_LIBRARY_PATH", "")}
    return PerfAnalyzer(binary=Path(values["PA"]), env=env)


def ensure_perf_analyzer(cache_dir: Path = DEFAULT_CACHE, *, fetch: bool = True) -> PerfAnalyzer:
    """The cached perf_analyzer; runs ``get_perf_analyzer.sh`` first when it is missing
    (``fetch=False``: raise ``FileNotFoundError`` instead)."""
    env_file = cache_dir / "env.sh"
    if not env_file.is_file() or not read_env_file(env_file).binary.is_file():
        if not fetch:
            raise FileNotFoundError(f"perf_analyzer not installed in {cache_dir}")
        subprocess.run(["bash", str(FETCH_SCRIPT), str(cache_dir)], check=True)
    return read_env_file(env_file)


def command(
    pa: PerfAnalyzer,
    *,
    target: str,
    model: str,
    concurrency: int,
    csv_path: Path,
    window_ms: int = 2000,
    trials: int = 3,
    use_async: bool = True,
) -> list[str]:
    """perf_analyzer argv: v2 gRPC, batch size 1 (one row per request), one concurrency."""
    argv = [
        str(pa.binary), "-m", model, "-i", "grpc", "-u", target, "-b", "1",
        "--concurrency-range", str(concurrency), "-p", str(window_ms),
        "-r", str(max(trials, 3)), "-s", _NO_STABILITY_CHECK, "-f", str(csv_path),
    ]  # fmt: skip
    if use_async:
        argv.append("--async")
    return argv


def parse_csv(text: str) -> PaResult:
    """The single row of perf_analyzer's ``-f`` CSV."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if len(rows) != 1:
        raise ValueError(f"expected one perf_analyzer CSV row, got {len(rows)}")
    row = rows[0]
    try:
        return PaResult(
            concurrency=int(row["Concurrency"]),
            infer_per_s=float(row["Inferences/Second"]),
            p50_us=float(row["p50 latency"]),
            p90_us=float(row["p90 latency"]),
            p95_us=float(row["p95 latency"]),
            p99_us=float(row["p99 latency"]),
        )
    except KeyError as error:
        raise ValueError(f"perf_analyzer CSV lacks column {error}") from None


def run(
    argv: Sequence[str], pa: PerfAnalyzer, csv_path: Path, *, prefix: Sequence[str] = ()
) -> PaResult:
    """Run ``prefix + argv`` (e.g. taskset) and parse its CSV; raise on failure."""
    env = {**os.environ, **pa.env}
    csv_path.unlink(missing_ok=True)
    done = subprocess.run([*prefix, *argv], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not csv_path.is_file():
        tail = (done.stdout + done.stderr)[-1500:]
        raise RuntimeError(f"perf_analyzer failed (rc={done.returncode}): {tail}")
    return parse_csv(csv_path.read_text())
