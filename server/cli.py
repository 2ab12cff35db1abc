"""``streamscore`` command line: serve, dev, models.

streamscore serve [--config FILE] [--set key.path=value ...]
streamscore dev   [--config FILE] [--set ...]   demo models + server (embedded stack)*
streamscore models demo [--repository DIR] [--force]                              *
streamscore models validate NAME VERSION --holdout FILE [--segments COL,...]
streamscore models list|load|unload|route|promote|rollback|audit ...   admin API client
streamscore replay (--file F | --topic T) [--target H:P] [--version V] [--pace P] [--reproduce]
streamscore decisions show|reproduce REQUEST_ID [--since 2h] [--topic T] [--target H:P]
streamscore stream [--config FILE] [--set ...] [--metrics-port P] ...   (server/stream_cli.py)
streamscore features load|rollback|backfill ...
streamscore score-batch --model M --input SPINE --output OUT ...   (server/batch_scoring/)

* plugin commands of the development tree (``server.plugins``), absent from the image.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from feature_streams.definitions import DefinitionError, FeatureDefinitions, load_definitions
from server.logs import configure_logging
from server.plugins import Plugin, PluginUnavailable, discover, match
from server.settings import Settings, SettingsError, load_settings

# The admin client (gRPC), the stream worker (Kafka, Redis) and asyncio are imported by
# the commands that use them: the commands with their own parser below (score-batch:
# ~0.1-0.2 s of imports before its work) load none of them.

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("config/streamscore.yaml")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"YAML config file (default: {DEFAULT_CONFIG} when it exists)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one setting; repeatable; wins over file and env",
    )


def build_parser(plugins: Sequence[Plugin] | None = None) -> argparse.ArgumentParser:
    """The argument parser of every built-in subcommand, with the installed plugin
    commands listed (they parse their own arguments: :func:`main` hands them over)."""
    from server.admin.cli import add_admin_commands
    from server.stream_cli import add_stream_arguments

    parser = argparse.ArgumentParser(prog="streamscore", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model repository over gRPC")
    _add_config_args(serve)

    commands.add_parser("replay", help="replay recorded traffic against a server (see --help)")
    commands.add_parser(
        "decisions", help="show or reproduce one past decision (see --help)", add_help=False
    )
    commands.add_parser("score-batch", help="score a spine offline with a model (see --help)")

    stream = commands.add_parser("stream", help="run the stream-feature worker (Kafka -> Redis)")
    _add_config_args(stream)
    add_stream_arguments(stream)

    features = commands.add_parser("features", help="feature store tools")
    feature_commands = features.add_subparsers(dest="features_command", required=True)
    load = feature_commands.add_parser("load", help="load a batch group snapshot from a file")
    _add_config_args(load)
    load.add_argument("--group", required=True)
    load.add_argument("--input", type=Path, required=True, help="Parquet or CSV file")
    load.add_argument(
        "--allow-missing-columns", action="store_true", help="absent fields get defaults"
    )
    rollback = feature_commands.add_parser("rollback", help="make the previous snapshot active")
    _add_config_args(rollback)
    rollback.add_argument("--group", required=True)
    feature_commands.add_parser(
        "backfill", help="point-in-time training features for a spine (see --help)"
    )

    models = commands.add_parser("models", help="model repository tools")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    model_commands.add_parser("validate", help="validation report, model card (see --help)")
    add_admin_commands(model_commands, _add_config_args)
    groups = {(): commands, ("features",): feature_commands, ("models",): model_commands}
    for plugin in discover() if plugins is None else plugins:
        group = groups.get(plugin.path[:-1])
        try:
            command = plugin.load()
        except PluginUnavailable:
            continue  # not installed here: left out of --help
        if group is not None:
            group.add_parser(plugin.path[-1], help=f"{command.help} (see --help)", add_help=False)
    return parser


def _run_plugin(plugin: Plugin, argv: list[str]) -> int:
    try:
        command = plugin.load()
    except PluginUnavailable as error:
        sys.stderr.write(f"streamscore: {error}\n")
        return 2
    return command.run(argv[len(plugin.path) :], plugin.prog)


def _settings(args: argparse.Namespace) -> Settings:
    config: Path | None = args.config
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    return load_settings(config, os.environ, args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["features", "backfill"]:  # its own parser: feature_streams.backfill
        from feature_streams.backfill_cli import main_backfill

        return main_backfill(argv[2:])
    if argv[:2] == ["models", "validate"]:  # its own parser: server.governance.cli
        from server.governance.cli import main_validate

        return main_validate(argv[2:])

    if argv[:1] == ["score-batch"]:  # its own parser: server.batch_scoring.cli
        from server.batch_scoring.cli import main_score_batch

        return main_score_batch(argv[1:], own_process=True)
    if argv[:1] == ["replay"]:  # its own parser: server.clients.replay
        from server.clients.replay import main_replay

        bootstrap = os.environ.get("STREAMSCORE_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
        return main_replay(argv[1:], default_bootstrap=bootstrap)
    if argv[:1] == ["decisions"]:  # its own parser: server.clients.decisions
        from server.clients.decisions import main_decisions

        bootstrap = os.environ.get("STREAMSCORE_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
        return main_decisions(argv[1:], default_bootstrap=bootstrap)
    plugins = discover()
    plugin = match(plugins, argv)
    if plugin is not None:  # its own parser (dev: stack options + --config/--set)
        return _run_plugin(plugin, argv)
    args = build_parser(plugins).parse_args(argv)
    from redis.exceptions import RedisError

    from server.admin.cli import ADMIN_COMMANDS, run_admin_command

    try:
        if args.command == "models" and args.models_command in ADMIN_COMMANDS:
            return run_admin_command(args, _settings(args))
        settings = _settings(args)
        if args.command == "serve":
            from server.main import serve
            from server.transport import experiments_to_enable, restart_with_experiments

            missing = experiments_to_enable(settings.server.connections, os.environ)
            if missing:  # gRPC read GRPC_EXPERIMENTS at import: start again with them
                restart_with_experiments(missing)
            return serve(settings)
        configure_logging(settings.logging.level, settings.logging.json_format)
        if args.command == "stream":
            return _stream(settings, args)
        return _features(settings, args)
    except SettingsError as error:
        sys.stderr.write(f"streamscore: configuration error:\n{error}\n")
        return 2
    except DefinitionError as error:
        sys.stderr.write(f"streamscore: feature definitions: {error}\n")
        return 2
    except (RedisError, OSError) as error:  # a dependency is down or unreachable
        sys.stderr.write(f"streamscore: {error}\n")
        return 1


def _definitions(settings: Settings) -> FeatureDefinitions:
    path = settings.features.definitions_path
    if path is None:
        raise SettingsError(["features.definitions_path: required for this command"])
    return load_definitions(path)


def _stream(settings: Settings, args: argparse.Namespace) -> int:
    from server.stream_cli import run_stream, worker_config

    try:
        config = worker_config(settings, args)
    except ValueError as error:
        sys.stderr.write(f"streamscore stream: {error}\n")
        return 2
    return run_stream(config, _definitions(settings))


def _features(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from feature_streams.batch_load import BatchFileError, load_group_file, rollback_group
    from feature_streams.batch_store import SnapshotStateError

    try:
        if args.features_command == "load":
            report = asyncio.run(
                load_group_file(
                    settings.redis.url,
                    _definitions(settings),
                    args.group,
                    args.input,
                    allow_missing_columns=args.allow_missing_columns,
                )
            )
            logger.info(
                "snapshot loaded",
                extra={"group": report.group, "snapshot": report.snapshot_id, "rows": report.rows},
            )
        else:
            result = asyncio.run(rollback_group(settings.redis.url, args.group))
            logger.info("rolled back", extra={"group": args.group, "active": result.active})
    except DefinitionError:
        raise  # the definitions file, not the command's input: main() reports it
    except (BatchFileError, SnapshotStateError, ValueError) as error:
        sys.stderr.write(f"streamscore: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
