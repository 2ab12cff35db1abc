"""``streamscore models demo``: train and export the demo fraud models (plugin command).

Registered in ``pyproject.toml`` under the ``streamscore.commands`` entry points so
the serving package never imports ``demo``. The training code is imported when the
command runs: it needs the ``train`` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.logs import configure_logging
from server.plugins import PluginCommand

__all__ = ["MODELS_DEMO"]

_HELP = "train and export the demo fraud models"


def _run(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=_HELP)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--force", action="store_true", help="rebuild existing versions")
    args = parser.parse_args(argv)
    configure_logging("INFO", json=False)
    from demo.train import main_models_demo  # training deps are optional

    return main_models_demo(args.repository, args.force)


MODELS_DEMO = PluginCommand(help=_HELP, run=_run)
