"""features.allow_overrides: who holds it (server) and how a tool presents it (client)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from server.clients.override_token import (
    OVERRIDE_TOKEN_ENV,
    add_override_arguments,
    override_metadata,
    token_from_args,
)
from server.overrides import OVERRIDE_TOKEN_METADATA, OverridePermission


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
