"""Server TLS credentials whose certificate files are re-read without a restart.

gRPC asks :meth:`ReloadingCertificates.fetch` for the certificate configuration on
every new TLS handshake (``grpc.dynamic_ssl_server_credentials``). ``fetch`` stats the
files (cheap) and, when one changed or :meth:`request_reload` was called (SIGHUP),
reads them again, checks the key matches the certificate, and hands gRPC the new
configuration; new connections get it, open connections keep the one they
negotiated. A half-written or mismatched pair is refused (logged, counted) and the
previous configuration stays in force until the files are whole again.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.settings import TLSSettings

logger = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True, slots=True)
class _Loaded:
    stamp: _Stamp
    configuration: grpc.ServerCertificateConfiguration


def _stamp_of(paths: tuple[Path, ...]) -> _Stamp:
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
    return tuple(stamps)


class CertificateError(Exception):
    """The certificate files cannot be used (unreadable, or the key does not match)."""


class ReloadingCertificates:
    """A listener's certificate, key and optional client CA, re-read when they change."""

    def __init__(
        self,
        settings: TLSSettings,
        *,
        listener: str,
        on_reload: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.listener = listener
        self._on_reload = on_reload
        self._paths = tuple(
            p for p in (settings.cert_file, settings.key_file, settings.client_ca_file) if p
        )
        self._lock = threading.Lock()
        self._forced = False
        self._current = self._load()

    @property
    def mutual(self) -> bool:
        """True when clients must present a certificate from ``client_ca_file``."""
        return self.settings.client_ca_file is not None

    def _load(self) -> _Loaded:
        stamp = _stamp_of(self._paths)
        s = self.settings
        try:
            key, chain = s.key_file.read_bytes(), s.cert_file.read_bytes()
            roots = s.client_ca_file.read_bytes() if s.client_ca_file else None
            # The same check OpenSSL does at handshake time, done once here, so a pair
            # caught mid-rotation is refused instead of failing every handshake.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(s.cert_file, s.key_file)
            if s.client_ca_file is not None:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(s.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(f"{self.listener} TLS files unusable: {exc}") from exc
        configuration = grpc.ssl_server_certificate_configuration(
            [(key, chain)], root_certificates=roots
        )
        return _Loaded(stamp, configuration)

    def request_reload(self) -> None:
        """Re-read the files on the next handshake even if they look unchanged (SIGHUP)."""
        self._forced = True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None (keep)."""
        with self._lock:
            if not self._forced and _stamp_of(self._paths) == self._current.stamp:
                return None
            self._forced = False
            try:
                loaded = self._load()
            except CertificateError as exc:
                logger.error("TLS reload refused, previous certificate kept: %s", exc)
                # Do not retry on every handshake until the files change again.
                self._current = _Loaded(_stamp_of(self._paths), self._current.configuration)
                self._report(ok=False)
                return None
            self._current = loaded
        logger.info("TLS certificate reloaded", extra={"listener": self.listener})
        self._report(ok=True)
        return loaded.configuration

    def _report(self, *, ok: bool) -> None:
        if self._on_reload is not None:
            self._on_reload(self.listener, ok)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that ask :meth:`fetch` on every new handshake."""
        # The stubs say the fetcher must return a configuration; gRPC documents None as
        # "keep the current one", which is what fetch returns while nothing changed.
        fetcher: Callable[[], grpc.ServerCertificateConfiguration] = self.fetch  # type: ignore[assignment]
        return grpc.dynamic_ssl_server_credentials(
            self._current.configuration,
            fetcher,
            require_client_authentication=self.mutual,
        )
