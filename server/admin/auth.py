"""Admin API credentials: bearer tokens from the settings, compared in constant time.

A call carries ``authorization: Bearer <token>`` metadata. The token is matched
against every configured token (``server.admin_token``, named ``admin``, and the
named ``server.admin_tokens``); the matching token's name is the audit log's actor.
With no token configured the admin API is closed: every call is UNAUTHENTICATED.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from server.errors import ScoringError

BEARER = "bearer "


class Unauthenticated(ScoringError):
    """Missing or wrong credentials (the message never echoes what was sent)."""

    code = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call authenticated as."""

    name: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuthenticator:
    """Checks bearer tokens; ``tokens`` maps a name to its secret."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._digests = tuple((name, _digest(secret)) for name, secret in tokens.items() if secret)

    @property
    def enabled(self) -> bool:
        """False when no token is configured (every call is refused)."""
        return bool(self._digests)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The principal of a call's metadata; ``Unauthenticated`` otherwise."""
        if not self._digests:
            raise Unauthenticated("the admin API is disabled: no server.admin_token is configured")
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        if not header or not header[: len(BEARER)].lower() == BEARER:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>'")
        presented = _digest(header[len(BEARER) :].strip())
        found: str | None = None
        for name, digest in self._digests:  # no early exit: time does not depend on which
            if hmac.compare_digest(presented, digest):
                found = name
        if found is None:
            raise Unauthenticated("invalid credentials")
        return Principal(found)
