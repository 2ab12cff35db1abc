"""The admin API under mutual TLS: only certificates from the client CA get in, the
certificate's common name is the audit actor, and the allow-list is enforced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos.streamscore.v1 import admin_pb2 as apb
from protos.streamscore.v1 import admin_pb2_grpc as apb_grpc
from server.cli import main
from server.settings import SettingsError
from tests.support.admin import CREDENTIALS, TOKEN
from tests.support.certs import Issued, issue, make_ca
from tests.support.server import RunningServer, running_server, settings_for_test

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
Code = grpc.StatusCode


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    alice: Issued  # allowed
    bob: Issued  # signed by the CA, not on the allow-list
    mallory: Issued  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = make_ca(directory, "admin-ca"), make_ca(directory / "rogue", "rogue-ca")
    return Pki(
        ca,
        issue(ca, directory, "localhost", server=True),
        issue(ca, directory, "alice"),
        issue(ca, directory, "bob"),
        issue(rogue, directory / "rogue", "mallory"),
    )


def _tls_overrides(pki: Pki) -> list[str]:
    return [
        "server.admin_port=0",
        f"server.admin_token={TOKEN}",  # ignored under mTLS: certificates authenticate
        f"server.admin_tls.cert_file={pki.server.cert}",
        f"server.admin_tls.key_file={pki.server.key}",
        f"server.admin_tls.client_ca_file={pki.ca.cert}",
        "server.admin_tls.allowed_subjects=[alice]",
    ]


@pytest.fixture
async def srv(linear_repository: Path, pki: Pki) -> AsyncIterator[RunningServer]:
    async with running_server(linear_repository, _tls_overrides(pki)) as running:
        yield running


def _channel(srv: RunningServer, pki: Pki, client: Issued | None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{srv.app.admin_port}", credentials)


async def _list(channel: grpc.aio.Channel, **kwargs: object) -> tuple[Code, str]:
    try:
        await apb_grpc.AdminStub(channel).ListModels(
            apb.ListModelsRequest(),
            timeout=5,
            **kwargs,  # type: ignore[arg-type]
        )
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


async def test_only_allowed_client_certificates_get_in(srv: RunningServer, pki: Pki) -> None:
    async with _channel(srv, pki, pki.alice) as alice:
        assert await _list(alice) == (Code.OK, "")
    async with _channel(srv, pki, pki.bob) as bob:
        code, details = await _list(bob)
        assert code is Code.PERMISSION_DENIED and "'bob'" in details
    for client in (pki.mallory, None):  # wrong CA, no certificate: the handshake fails
        async with _channel(srv, pki, client) as channel:
            code, _ = await _list(channel)
            assert code is Code.UNAVAILABLE
    # A bearer token does not open a plaintext connection to the TLS port ...
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.app.admin_port}") as plain:
        code, _ = await _list(plain, metadata=CREDENTIALS)
        assert code is Code.UNAVAILABLE
    # ... and the scoring port no longer serves the admin API at all.
    code, _ = await _list(srv.channel, metadata=CREDENTIALS)
    assert code is Code.UNIMPLEMENTED


async def test_certificate_name_is_the_audit_actor_through_the_cli(
    srv: RunningServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", f"localhost:{srv.app.admin_port}"]
    tls = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.alice.cert)]
    tls += ["--tls-key", str(pki.alice.key)]
    argv = ["models", "route", "lin", "--champion", "1", *target, *tls, "--reason", "mtls"]
    assert await asyncio.to_thread(main, argv) == 0
    audit = ["models", "audit", "lin", "--json", *target, *tls]
    capsys.readouterr()
    assert await asyncio.to_thread(main, audit) == 0
    assert '"actor": "cert:alice"' in capsys.readouterr().out
    bob = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.bob.cert)]
    bob += ["--tls-key", str(pki.bob.key)]
    assert await asyncio.to_thread(main, ["models", "list", *target, *bob]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert main(["models", "list", *target, "--tls-ca", str(pki.ca.cert)]) == 2
    assert "server.admin_token: required" in capsys.readouterr().err  # no cert: a token
    half = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.alice.cert)]
    assert main(["models", "list", *target, *half]) == 2
    assert "give both or neither" in capsys.readouterr().err


def test_tls_settings_are_checked_at_load(linear_repository: Path, pki: Pki) -> None:
    overrides = [o for o in _tls_overrides(pki) if not o.startswith("server.admin_port")]
    with pytest.raises(SettingsError, match="admin_tls needs its own admin_port"):
        settings_for_test(linear_repository, *overrides)
    missing = [*_tls_overrides(pki), "server.admin_tls.key_file=/nonexistent/admin.key"]
    with pytest.raises(SettingsError, match=r"server\.admin_tls\.key_file"):
        settings_for_test(linear_repository, *missing)
