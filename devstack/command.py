"""``streamscore dev``: the embedded stack as a ``streamscore`` plugin command.

Registered in ``pyproject.toml`` under the ``streamscore.commands`` entry points so
the serving package never imports ``devstack``; cheap to import (``--help`` loads
it), the stack itself is imported when the command runs.
"""

from __future__ import annotations

from server.plugins import PluginCommand

__all__ = ["DEV"]


def _run(argv: list[str], prog: str) -> int:
    from devstack.stack import main

    return main(argv, prog=prog)


DEV = PluginCommand(help="embedded stack: Redis, Kafka, worker, server, producer", run=_run)
