"""Throwaway X.509 certificates for TLS tests, made with the ``openssl`` CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> Issued:
    """A self-signed CA valid for a day."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = Issued(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl("req", "-x509", *_EC_KEY, "-keyout", issued.key, "-out", issued.cert,
             "-days", "1", "-subj", f"/CN={name}")  # fmt: skip
    return issued


def issue(ca: Issued, directory: Path, common_name: str, *, server: bool = False) -> Issued:
    """A certificate for ``common_name`` signed by ``ca`` (a server one also names
    ``localhost`` and ``127.0.0.1``)."""
    stem = directory / common_name
    issued = Issued(stem.with_suffix(".pem"), stem.with_suffix(".key"))
    csr, extensions = stem.with_suffix(".csr"), stem.with_suffix(".ext")
    usage = "serverAuth" if server else "clientAuth"
    lines = [f"extendedKeyUsage={usage}"]
    if server:
        lines.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl("req", *_EC_KEY, "-keyout", issued.key, "-out", csr, "-subj", f"/CN={common_name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
             "-out", issued.cert, "-days", "1", "-extfile", extensions)  # fmt: skip
    return issued
