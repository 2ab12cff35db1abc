"""Who holds ``features.allow_overrides`` on the scoring port.

A caller with it may send store (batch or stream) features, which then win over the
store, and an ``event_time`` beyond ``server.limits.event_time_skew_s``: what a replay
of recorded traffic or a test needs, and what a fraudster's client must not do (send
``card_txn_count_1h: 0``). It is granted by one of ``server.overrides.tokens`` sent as
metadata ``x-streamscore-override-token`` (the replay tool's ``--override-token``), or by
an mTLS client certificate whose common name is in ``server.overrides.subjects``
(``server.overrides.allow_all``: every caller, for trusted networks and benches).
Without any configured, nobody holds it and nothing of the call is read.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Protocol

__all__ = ["OVERRIDE_TOKEN_METADATA", "OverridePermission"]

OVERRIDE_TOKEN_METADATA = "x-streamscore-override-token"
#: A presented token longer than this is refused without hashing it.
MAX_TOKEN_LENGTH = 512


class CallCredentials(Protocol):
    """What is read of a call (``grpc.aio.ServicerContext`` has both)."""

    def invocation_metadata(self) -> Iterable[tuple[str, str | bytes]] | None: ...

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token if isinstance(token, bytes) else token.encode()).digest()


class OverridePermission:
    """Decides, per call, whether the caller holds ``features.allow_overrides``."""

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        subjects: Iterable[str] = (),
        *,
        allow_all: bool = False,
    ) -> None:
        self._digests = tuple(_digest(secret) for secret in (tokens or {}).values() if secret)
        self._subjects = frozenset(subjects)
        self._allow_all = allow_all
        self.configured = bool(self._digests or self._subjects or allow_all)
        """False: nobody holds the permission (no call is inspected)."""

    def granted(self, call: CallCredentials) -> bool:
        """True when the call presents an override token or an allowed certificate (or
        ``allow_all``)."""
        if not self.configured:
            return False
        if self._allow_all:
            return True
        if self._digests:
            for key, value in call.invocation_metadata() or ():
                if key == OVERRIDE_TOKEN_METADATA and len(value) <= MAX_TOKEN_LENGTH:
                    presented = _digest(value)
                    found = False
                    for digest in self._digests:  # no early exit: timing says nothing
                        found |= hmac.compare_digest(presented, digest)
                    if found:
                        return True
        if self._subjects:
            names = call.auth_context().get("x509_common_name", ())
            return any(bytes(n).decode(errors="replace") in self._subjects for n in names)
        return False
