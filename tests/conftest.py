"""Shared fixtures: small test models and free ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.model_factory import write_linear_model

#: Feature names of the small test model (the demo models use 30 real names).
TEST_FEATURES = [f"f{i}" for i in range(8)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def linear_repository(tmp_path: Path) -> Path:
    """Repository with model ``lin`` versions 1 and 2 (different weights)."""
    repository = tmp_path / "models"
    write_linear_model(repository, "lin", "1", TEST_FEATURES, seed=1)
    write_linear_model(repository, "lin", "2", TEST_FEATURES, seed=2)
    return repository
