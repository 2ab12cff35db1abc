"""Admin API credentials: bearer tokens, or client certificates under mutual TLS.

Tokens (:class:`TokenAuthenticator`): a call carries ``authorization: Bearer
<token>`` metadata, matched in constant time against every configured token
(``server.admin_token``, named ``admin``, and the named ``server.admin_tokens``);
the matching token's name is the audit log's actor. With no token configured the
admin API is closed: every call is UNAUTHENTICATED.

Certificates (:class:`CertificateAuthenticator`, with ``server.admin_tls``): the TLS
handshake already refused any client without a certificate chaining to the client
CA; the certificate's common name is the actor (``cert:<CN>``), and when
``allowed_subjects`` is set a name outside it is PERMISSION_DENIED.

Roles (:func:`authorize`): every principal has roles; each Admin RPC needs one
(:data:`RPC_ROLES`): ``viewer`` reads, ``deployer`` loads and routes, ``approver``
approves and revokes, ``admin`` may do everything; any role may read. A token
without configured roles (``server.admin_token``, a bare ``server.admin_tokens``
entry) is ``admin``, as before roles existed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from server.errors import ScoringError, Status

BEARER = "bearer "

Role = Literal["viewer", "deployer", "approver", "admin"]
ADMIN: Role = "admin"
ADMIN_ROLES: frozenset[str] = frozenset({ADMIN})

#: The role each Admin RPC needs (``admin`` has every one; any role can read).
RPC_ROLES: Mapping[str, Role] = {
    "ListModels": "viewer",
    "ListAudit": "viewer",
    "LoadVersion": "deployer",
    "UnloadVersion": "deployer",
    "SetRouting": "deployer",
    "Promote": "deployer",
    "Rollback": "deployer",
    "Approve": "approver",
    "Revoke": "approver",
}


class Unauthenticated(ScoringError):
    """Missing or wrong credentials (the message never echoes what was sent)."""

    status = Status.UNAUTHENTICATED


class PermissionDenied(ScoringError):
    """Authenticated, but not allowed to call the admin API (or this RPC)."""

    status = Status.PERMISSION_DENIED


class CallCredentials(Protocol):
    """What an authenticator reads of a call (``grpc.aio.ServicerContext`` has both)."""

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None: ...

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


class Authenticator(Protocol):
    """Turns a call's credentials into a principal or raises a ScoringError."""

    def authenticate(self, call: CallCredentials) -> Principal: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call authenticated as, and its roles."""

    name: str
    roles: frozenset[str] = ADMIN_ROLES


def authorize(principal: Principal, method: str) -> None:
    """Raise ``PermissionDenied`` naming the role ``method`` needs if ``principal`` lacks it."""
    needed = RPC_ROLES[method]
    roles = principal.roles
    if ADMIN in roles or needed in roles or (needed == "viewer" and roles):
        return
    have = ", ".join(sorted(roles)) or "none"
    raise PermissionDenied(
        f"{method} needs role {needed!r} (or 'admin'); {principal.name!r} has: {have}"
    )


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuthenticator:
    """Checks bearer tokens; ``tokens`` maps a name to its secret, ``roles`` a name to
    its roles (a name without: admin)."""

    def __init__(
        self, tokens: Mapping[str, str], roles: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        self._digests = tuple((name, _digest(secret)) for name, secret in tokens.items() if secret)
        self._roles = {name: frozenset(r) for name, r in (roles or {}).items()}

    def authenticate(self, call: CallCredentials) -> Principal:
        """The principal of a call's bearer token; ``Unauthenticated`` otherwise."""
        return self.authenticate_metadata(call.invocation_metadata())

    def authenticate_metadata(
        self, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> Principal:
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
        return Principal(found, self._roles.get(found, ADMIN_ROLES))


CERT_ACTOR_PREFIX = "cert:"


class CertificateAuthenticator:
    """Client certificates verified by the TLS handshake; the common name is the actor.
    Roles: ``subject_roles`` by common name, else ``default_roles``."""

    def __init__(
        self,
        allowed_subjects: Iterable[str] = (),
        subject_roles: Mapping[str, Iterable[str]] | None = None,
        default_roles: Iterable[str] = (ADMIN,),
    ) -> None:
        self._allowed = frozenset(allowed_subjects)
        self._roles = {name: frozenset(r) for name, r in (subject_roles or {}).items()}
        self._default = frozenset(default_roles)

    def authenticate(self, call: CallCredentials) -> Principal:
        """``cert:<CN>`` of the verified client certificate."""
        context = call.auth_context()
        names = [bytes(n).decode(errors="replace") for n in context.get("x509_common_name", ())]
        if not names:
            # require_client_auth makes this unreachable over TLS; a plaintext port or a
            # certificate without a common name ends here.
            raise Unauthenticated("a client certificate with a common name is required")
        name = names[0]
        if self._allowed and name not in self._allowed:
            raise PermissionDenied(
                f"client certificate {name!r} is not in server.admin_tls.allowed_subjects"
            )
        return Principal(CERT_ACTOR_PREFIX + name, self._roles.get(name, self._default))
