"""Plugin commands: discovered from entry points, dispatched by ``streamscore``, and a
clear one-line answer (exit 2) when the plugin's package is not installed."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from server import cli
from server.plugins import ENTRY_POINT_GROUP, Plugin, PluginUnavailable, discover, match


def _plugin(name: str, value: str) -> Plugin:
    return Plugin(tuple(name.split(".")), EntryPoint(name, value, ENTRY_POINT_GROUP))


def test_the_dev_tree_registers_dev_and_models_demo() -> None:
    paths = {plugin.path for plugin in discover()}
    assert {("dev",), ("models", "demo")} <= paths


def test_match_takes_the_command_path_prefix() -> None:
    plugins = [_plugin("dev", "devstack.command:DEV"), _plugin("models.demo", "demo.command:X")]
    assert match(plugins, ["models", "demo", "--force"]) is plugins[1]
    assert match(plugins, ["dev"]) is plugins[0]
    assert match(plugins, ["models", "list"]) is None
    assert match(plugins, []) is None


def test_a_missing_plugin_package_is_unavailable_not_a_traceback() -> None:
    plugin = _plugin("models.demo", "no_such_package_xyz.command:MODELS_DEMO")
    with pytest.raises(PluginUnavailable, match="streamscore models demo is part of the dev"):
        plugin.load()


def test_an_entry_point_that_is_not_a_command_is_refused() -> None:
    with pytest.raises(TypeError, match="not a PluginCommand"):
        _plugin("dev", "server.plugins:discover").load()


def test_streamscore_dispatches_dev_to_the_stack_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dev", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: streamscore dev")
    assert "--data-dir" in out


def test_streamscore_dispatches_models_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["models", "demo", "--help"])
    assert exited.value.code == 0
    assert "--repository" in capsys.readouterr().out


def test_help_lists_installed_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "embedded stack" in capsys.readouterr().out


def test_unavailable_plugin_answers_one_line_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = (_plugin("dev", "no_such_package_xyz.command:DEV"),)
    monkeypatch.setattr(cli, "discover", lambda: gone)
    assert cli.main(["dev", "--grpc-port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "streamscore dev is part of the development tree, not this installation" in err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "dev" not in capsys.readouterr().out.split("}")[0]
