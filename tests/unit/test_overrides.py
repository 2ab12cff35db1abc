"""features.allow_overrides: who holds it (server) and how a tool presents it (client)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

from server.clients.override_token import (
    OVERRIDE_TOKEN_ENV,
    add_override_arguments,
    override_metadata,
    token_from_args,
)
from server.overrides import OVERRIDE_TOKEN_METADATA, OverridePermission
from server.settings import SettingsError, load_settings


class Call:
    def __init__(self, metadata: Sequence[tuple[str, str]] = (), cn: str | None = None) -> None:
        self.metadata = metadata
        self.cn = cn

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self.metadata

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return {} if self.cn is None else {"x509_common_name": [self.cn.encode()]}


def test_a_configured_token_or_subject_grants_the_permission() -> None:
    permission = OverridePermission({"replay": "s3cret"}, ["replayer"])
    assert permission.granted(Call([(OVERRIDE_TOKEN_METADATA, "s3cret")]))
    assert permission.granted(Call([("other", "x")], cn="replayer"))
    assert not permission.granted(Call([(OVERRIDE_TOKEN_METADATA, "guess")]))
    assert not permission.granted(Call([(OVERRIDE_TOKEN_METADATA, "s3cret" * 200)]))
    assert not permission.granted(Call([("authorization", "Bearer s3cret")]))
    assert not permission.granted(Call(cn="someone-else"))


def test_nobody_holds_it_when_nothing_is_configured() -> None:
    permission = OverridePermission()
    assert not permission.configured
    assert not permission.granted(Call([(OVERRIDE_TOKEN_METADATA, "")], cn="anyone"))
    assert OverridePermission(allow_all=True).granted(Call())


def test_tools_read_the_token_from_a_file_or_the_environment(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_override_arguments(parser)
    (path := tmp_path / "token").write_text("from-file\n")
    assert token_from_args(parser.parse_args(["--override-token-file", str(path)])) == "from-file"
    assert token_from_args(parser.parse_args([]), {OVERRIDE_TOKEN_ENV: "from-env"}) == "from-env"
    assert token_from_args(parser.parse_args([]), {}) is None
    assert override_metadata("t") == ((OVERRIDE_TOKEN_METADATA, "t"),)
    assert override_metadata(None) == ()


def test_override_tokens_on_a_plaintext_non_loopback_port_are_refused_at_load(
    tmp_path: Path,
) -> None:
    exposed = ["server.host=0.0.0.0", "server.overrides.tokens.replay=s3cret"]
    with pytest.raises(SettingsError) as refused:
        load_settings(None, {}, exposed)
    message = str(refused.value)
    assert "server.overrides.tokens: override tokens would cross the network in plaintext" in (
        message
    )
    assert "s3cret" not in message  # the secret itself is never echoed
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("pem")
    key.write_text("pem")
    tls = [f"server.tls.cert_file={cert}", f"server.tls.key_file={key}"]
    assert load_settings(None, {}, [*exposed, *tls]).server.overrides.tokens
    for loopback in ("127.0.0.1", "localhost", "[::1]"):
        load_settings(None, {}, [f"server.host={loopback}", "server.overrides.tokens.replay=s"])
    # Subjects and allow_all carry no secret: plaintext is allowed (subjects need mTLS).
    load_settings(None, {}, ["server.host=0.0.0.0", "server.overrides.allow_all=true"])
    load_settings(None, {}, ["server.host=0.0.0.0"])
