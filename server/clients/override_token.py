"""The overrides permission on the client side (replay, decision reproduction, tests).

A replay sends recorded store features and recorded event times, which the server
accepts only from a caller holding ``features.allow_overrides`` (``server.overrides``).
The token is read from the environment (``STREAMSCORE_OVERRIDE_TOKEN``) or a file
(``--override-token-file``), never from the command line (argv is visible in ``ps``),
and sent as call metadata ``x-streamscore-override-token`` (use TLS off loopback).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from server.overrides import OVERRIDE_TOKEN_METADATA

__all__ = ["OVERRIDE_TOKEN_ENV", "add_override_arguments", "override_metadata", "token_from_args"]

OVERRIDE_TOKEN_ENV = "STREAMSCORE_OVERRIDE_TOKEN"


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """``--override-token-file`` (the env var ``STREAMSCORE_OVERRIDE_TOKEN`` also works)."""
    parser.add_argument(
        "--override-token-file",
        type=Path,
        default=None,
        help="file holding a server.overrides token (features.allow_overrides: send "
        f"recorded store features and event times); default: ${OVERRIDE_TOKEN_ENV}",
    )


def token_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The override token of ``--override-token-file``, else of the env var, else None."""
    path: Path | None = getattr(args, "override_token_file", None)
    if path is not None:
        return path.read_text().strip() or None
    return environ.get(OVERRIDE_TOKEN_ENV) or None


def override_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting ``token`` (empty without one)."""
    return () if not token else ((OVERRIDE_TOKEN_METADATA, token),)
