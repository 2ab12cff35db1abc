"""The pure feature modules must not drag in I/O, event loops or the server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("asyncio", "redis", "aiokafka", "grpc", "server")

PROBE = """
import json, sys
import feature_streams.definitions, feature_streams.windows
print(json.dumps(sorted(sys.modules)))
"""


def test_pure_modules_import_no_io_or_server_code() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = json.loads(result.stdout)
    assert "feature_streams.windows" in loaded
    offending = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert offending == []
