"""TLS and mutual TLS on the scoring port: handshakes, plaintext refused, certificates
rotated without a restart (new connections get the new one, open ones keep working),
bearer tokens only over TLS or loopback."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos.streamscore.v1 import scoring_pb2 as pb
from protos.streamscore.v1 import scoring_pb2_grpc as pb_grpc
from server.cli import main
from server.settings import SettingsError
from tests.conftest import TEST_FEATURES
from tests.support.admin import TOKEN
from tests.support.certs import Issued, issue, make_ca
from tests.support.server import RunningServer, running_server, settings_for_test

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
Code = grpc.StatusCode


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    next_ca: Issued  # the CA of the rotated server certificate
    next_server: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "scoring-ca")
    next_ca = make_ca(directory / "next", "next-ca")
    return Pki(
        ca,
        issue(ca, directory, "localhost", server=True),
        issue(ca, directory, "caller"),
        next_ca,
        issue(next_ca, directory / "next", "localhost", server=True),
    )


def _served(directory: Path, source: Issued) -> Issued:
    """Copies of ``source`` at fixed paths the server is configured with."""
    directory.mkdir(parents=True, exist_ok=True)
    served = Issued(directory / "tls.crt", directory / "tls.key")
    _replace(served, source)
    return served


def _replace(served: Issued, source: Issued) -> None:
    """Atomically swap the served files for ``source`` (how a secret mount rotates)."""
    for src, dst in ((source.key, served.key), (source.cert, served.cert)):
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _tls(served: Issued, client_ca: Path | None = None) -> list[str]:
    overrides = [f"server.tls.cert_file={served.cert}", f"server.tls.key_file={served.key}"]
    if client_ca is not None:
        overrides.append(f"server.tls.client_ca_file={client_ca}")
    return overrides


def _secure(
    port: int, ca: Path, client: Issued | None = None, *, index: int = 0
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.test_channel", index)]
    return grpc.aio.secure_channel(f"localhost:{port}", credentials, options=options)


async def _score(channel: grpc.aio.Channel) -> Code:
    request = pb.ScoreRequest(model="lin", features={f: 0.5 for f in TEST_FEATURES})
    try:
        await pb_grpc.ScoringStub(channel).Score(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return Code.OK


async def test_tls_handshake_works_and_plaintext_is_refused(
    linear_repository: Path, pki: Pki, tmp_path: Path
) -> None:
    served = _served(tmp_path / "tls", pki.server)
    async with running_server(linear_repository, _tls(served)) as srv:
        async with _secure(srv.app.port, pki.ca.cert) as channel:
            assert await _score(channel) is Code.OK
        assert await _score(srv.channel) is Code.UNAVAILABLE  # the plaintext test channel
        async with _secure(srv.app.port, pki.next_ca.cert) as wrong_ca:
            assert await _score(wrong_ca) is Code.UNAVAILABLE


async def test_mutual_tls_refuses_a_client_without_certificate(
    linear_repository: Path, pki: Pki, tmp_path: Path
) -> None:
    served = _served(tmp_path / "tls", pki.server)
    async with running_server(linear_repository, _tls(served, pki.ca.cert)) as srv:
        async with _secure(srv.app.port, pki.ca.cert, pki.client) as with_cert:
            assert await _score(with_cert) is Code.OK
        async with _secure(srv.app.port, pki.ca.cert, index=1) as without_cert:
            assert await _score(without_cert) is Code.UNAVAILABLE


async def _wait_reloaded(srv: RunningServer, outcome: str) -> None:
    while True:
        value = srv.app.metrics.registry.get_sample_value(
            "streamscore_tls_reloads_total", {"listener": "grpc", "outcome": outcome}
        )
        if value:
            return
        await asyncio.sleep(0.05)


async def test_rotated_certificate_serves_new_connections_and_keeps_open_ones(
    linear_repository: Path, pki: Pki, tmp_path: Path
) -> None:
    served = _served(tmp_path / "tls", pki.server)
    overrides = [*_tls(served), "server.connections.max_connection_age_s=null"]
    async with running_server(linear_repository, overrides) as srv:
        port = srv.app.port
        old = _secure(port, pki.ca.cert, index=1)
        assert await _score(old) is Code.OK
        _replace(served, pki.next_server)
        # The first handshake after the change re-reads the files and uses the new pair.
        async with _secure(port, pki.next_ca.cert, index=2) as rotated:
            assert await _score(rotated) is Code.OK
        await _wait_reloaded(srv, "ok")
        async with _secure(port, pki.ca.cert, index=3) as stale:
            assert await _score(stale) is Code.UNAVAILABLE  # old CA no longer matches
        for _ in range(20):  # the connection opened before the rotation keeps working
            assert await _score(old) is Code.OK
        assert old.get_state() is grpc.ChannelConnectivity.READY
        await old.close(None)


async def test_half_rotated_pair_is_refused_and_previous_kept(
    linear_repository: Path, pki: Pki, tmp_path: Path
) -> None:
    served = _served(tmp_path / "tls", pki.server)
    async with running_server(linear_repository, _tls(served)) as srv:
        shutil.copyfile(pki.next_server.cert, served.cert)  # new cert, old key: mismatched
        async with _secure(srv.app.port, pki.ca.cert, index=1) as channel:
            assert await _score(channel) is Code.OK
        await _wait_reloaded(srv, "refused")
        shutil.copyfile(pki.next_server.key, served.key)  # rotation completed
        async with _secure(srv.app.port, pki.next_ca.cert, index=2) as channel:
            assert await _score(channel) is Code.OK
        # SIGHUP (reload_tls) re-reads even unchanged files; the pair stays served.
        srv.app.reload_tls()
        async with _secure(srv.app.port, pki.next_ca.cert, index=3) as channel:
            assert await _score(channel) is Code.OK


async def test_admin_token_over_tls_through_the_cli(
    linear_repository: Path,
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = _served(tmp_path / "tls", pki.server)
    overrides = [*_tls(served), f"server.admin_token={TOKEN}"]
    monkeypatch.setenv("STREAMSCORE_SERVER__ADMIN_TOKEN", TOKEN)
    async with running_server(linear_repository, overrides) as srv:
        target = ["--target", f"localhost:{srv.app.port}"]
        argv = ["models", "list", *target, "--tls-ca", str(pki.ca.cert)]
        assert await asyncio.to_thread(main, argv) == 0
        assert "lin" in capsys.readouterr().out
        # Plaintext to this TLS port fails the connection, never leaks the token in clear.
        assert await asyncio.to_thread(main, ["models", "list", *target]) == 1
    # A token is not sent in plaintext to a host off this machine without --insecure.
    remote = ["models", "list", "--target", "192.0.2.1:50051", "--timeout", "0.2"]
    assert main(remote) == 2
    assert "--insecure" in capsys.readouterr().err
    assert main([*remote, "--insecure"]) == 1  # allowed: it tried (TEST-NET, unreachable)


def test_plaintext_admin_tokens_off_loopback_are_refused_at_load(
    linear_repository: Path, pki: Pki
) -> None:
    no_override_tokens = "server.overrides.tokens={}"  # refused on their own (test_overrides)
    exposed = ["server.host=0.0.0.0", f"server.admin_token={TOKEN}", no_override_tokens]
    with pytest.raises(SettingsError, match=r"server\.tls: admin bearer tokens would cross"):
        settings_for_test(linear_repository, *exposed)
    settings_for_test(linear_repository, *exposed, "server.allow_plaintext_admin_tokens=true")
    settings_for_test(
        linear_repository,
        *exposed,
        f"server.tls.cert_file={pki.server.cert}",
        f"server.tls.key_file={pki.server.key}",
    )
    # no token: nothing to leak
    settings_for_test(linear_repository, "server.host=0.0.0.0", no_override_tokens)
