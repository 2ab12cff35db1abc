"""Which gRPC core experiments ``server.connections`` needs, read from an environment."""

from __future__ import annotations

import pytest

from server.settings import ConnectionSettings, SettingsError, load_settings
from server.transport import active_experiments, experiments_to_enable


def _connections(transport: str) -> ConnectionSettings:
    overrides = [f"server.connections.http2_transport={transport}"]
    return load_settings(None, {}, overrides).server.connections


def test_experiments_are_the_comma_list_without_disabled_entries() -> None:
    assert active_experiments({}) == frozenset()
    env = {"GRPC_EXPERIMENTS": " ph2_server, -tcp_rcv_lowat,,event_engine_client "}
    assert active_experiments(env) == {"ph2_server", "event_engine_client"}


def test_the_promise_transport_needs_ph2_server_once() -> None:
    promise = _connections("promise")
    assert experiments_to_enable(promise, {}) == ["ph2_server"]
    assert experiments_to_enable(promise, {"GRPC_EXPERIMENTS": "other"}) == ["ph2_server"]
    assert experiments_to_enable(promise, {"GRPC_EXPERIMENTS": "-ph2_server"}) == ["ph2_server"]
    assert experiments_to_enable(promise, {"GRPC_EXPERIMENTS": "other,ph2_server"}) == []


def test_the_default_transport_needs_nothing() -> None:
    default = load_settings(None, {}, []).server.connections
    assert default.http2_transport == "chttp2"
    assert experiments_to_enable(default, {}) == []


def test_an_unknown_transport_is_a_configuration_error_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="http2_transport"):
        load_settings(None, {}, ["server.connections.http2_transport=quic"])
