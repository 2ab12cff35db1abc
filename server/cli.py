"""``streamscore`` command line: serve, dev, models.

streamscore serve [--config FILE] [--set key.path=value ...]
streamscore dev   [--config FILE] [--set ...]   demo models + server (embedded stack)
streamscore models demo [--repository DIR] [--force]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from server.logs import configure_logging
from server.settings import Settings, SettingsError, load_settings

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="streamscore", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model repository over gRPC")
    _add_config_args(serve)

    dev = commands.add_parser("dev", help="build the demo models if absent, then serve them")
    _add_config_args(dev)

    models = commands.add_parser("models", help="model repository tools")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    demo = model_commands.add_parser("demo", help="train and export the demo fraud models")
    demo.add_argument("--repository", type=Path, default=Path("models"))
    demo.add_argument("--force", action="store_true", help="rebuild existing versions")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    config: Path | None = args.config
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    return load_settings(config, os.environ, args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "models":
            configure_logging("INFO", json=False)
            from server.demo.train import main_models_demo  # training deps are optional

            return main_models_demo(args.repository, args.force)
        settings = _settings(args)
        from server.main import serve

        if args.command == "dev":
            configure_logging(settings.logging.level, settings.logging.json_format)
            from server.demo.train import build_demo_repository

            build_demo_repository(settings.models.repository)
        return serve(settings)
    except SettingsError as error:
        sys.stderr.write(f"streamscore: configuration error:\n{error}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
