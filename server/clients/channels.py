"""Client channels of the tools we ship (admin CLI, replay, bench): plaintext, TLS or mTLS.

Every tool takes the same flags: ``--tls-ca`` (the CA that signed the server; turns
TLS on), ``--tls-cert``/``--tls-key`` (a client certificate, for mutual TLS),
``--tls-server-name`` (check the server certificate against this name), and
``--insecure`` (allow a bearer token over plaintext to a non-loopback target).

A bearer token is secret: it is sent only over TLS, or over plaintext to a loopback
target (it never leaves the machine), or with ``--insecure``; anything else is
refused before connecting (:func:`check_token_transport`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.settings import is_loopback_host


class ChannelSetupError(ValueError):
    """Client TLS flags or the token policy refuse this connection (message names the flag)."""


@dataclass(frozen=True)
class ClientTLS:
    """PEM files of a TLS client: the server's CA and, for mutual TLS, a certificate + key."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel arguments TLS adds (the name override)."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def add_tls_arguments(parser: argparse.ArgumentParser, *, token: bool = False) -> None:
    """Add ``--tls-ca/--tls-cert/--tls-key/--tls-server-name`` (and ``--insecure`` for a
    tool that sends a bearer token) to ``parser``."""
    group = parser.add_argument_group("TLS (server.tls / server.admin_tls)")
    group.add_argument("--tls-ca", type=Path, help="CA bundle that signed the server (PEM)")
    group.add_argument("--tls-cert", type=Path, help="client certificate chain (PEM), mTLS")
    group.add_argument("--tls-key", type=Path, help="client private key (PEM), mTLS")
    group.add_argument("--tls-server-name", help="name to check the server certificate against")
    if not token:
        return
    group.add_argument(
        "--insecure",
        action="store_true",
        help="allow a bearer token over plaintext to a non-loopback target",
    )


def tls_from_args(
    args: argparse.Namespace, *, require_client_cert: bool = False
) -> ClientTLS | None:
    """The :class:`ClientTLS` the flags ask for, None for plaintext; checks the files exist."""
    ca: Path | None = args.tls_ca
    cert: Path | None = args.tls_cert
    key: Path | None = args.tls_key
    if require_client_cert and any((ca, cert, key)) and not all((ca, cert, key)):
        raise ChannelSetupError("--tls-ca, --tls-cert and --tls-key: give all three")
    if (cert is None) != (key is None):
        raise ChannelSetupError("--tls-cert and --tls-key: give both or neither")
    if ca is None:
        if cert is not None or args.tls_server_name:
            raise ChannelSetupError("--tls-ca: required with --tls-cert/--tls-server-name")
        return None
    for flag, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not path.is_file():
            raise ChannelSetupError(f"{flag}: no such file: {path}")
    return ClientTLS(ca, cert, key, args.tls_server_name)


def target_host(target: str) -> str:
    """The host of ``host:port``, ``[v6]:port`` or a gRPC URI (``dns:///h:p``, ``ipv4:h:p``)."""
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    target = target.rsplit("/", 1)[-1].split(",", 1)[0]
    if target.startswith("["):
        return target[1 : target.find("]")]
    host, sep, _ = target.rpartition(":")
    return host if sep else target


def check_token_transport(target: str, tls: ClientTLS | None, *, insecure: bool) -> None:
    """Refuse to send a bearer token over plaintext to a target off this machine."""
    if tls is not None or insecure or target.startswith("unix:"):
        return
    host = target_host(target)
    if not is_loopback_host(host):
        raise ChannelSetupError(
            f"--tls-ca: a bearer token is not sent over plaintext to {host!r}; "
            "use TLS (--tls-ca), or --insecure to send it anyway"
        )


def distinct_connection(index: int) -> list[tuple[str, Any]]:
    """Channel arguments that give channel ``index`` its own TCP connection (by default
    gRPC shares one connection among channels with identical arguments)."""
    return [("grpc.use_local_subchannel_pool", 1), ("grpc.streamscore_channel_index", index)]


def sync_channel(
    target: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel, TLS when ``tls`` is given."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(
    target: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel, TLS when ``tls`` is given."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])
