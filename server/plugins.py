"""Commands other packages add to ``streamscore`` through the entry-point group
``streamscore.commands``.

An entry point's name is the command path joined with dots (``dev``,
``models.demo``) and its object is a :class:`PluginCommand`. The development tree
registers ``streamscore dev`` (``devstack``) and ``streamscore models demo``
(``demo``) this way, so the serving packages never import them: in an installation
without those packages (the Docker image ships only ``server``, ``feature_streams``
and ``protos``) the command is left out of ``--help`` and, when called, answers one
line with exit status 2.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "ENTRY_POINT_GROUP",
    "Plugin",
    "PluginCommand",
    "PluginUnavailable",
    "discover",
    "match",
]

ENTRY_POINT_GROUP = "streamscore.commands"


@dataclass(frozen=True)
class PluginCommand:
    """What a plugin entry point names: a one-line help and the command's body.

    ``run(argv, prog)`` gets the arguments after the command path and the program
    name to show in its own usage (``streamscore dev``); it returns the exit status.
    Keep the module holding it cheap to import: it is loaded to list ``--help``.
    """

    help: str
    run: Callable[[list[str], str], int]


class PluginUnavailable(Exception):
    """The plugin's module is not installed here (a development-tree command)."""


@dataclass(frozen=True)
class Plugin:
    """One registered command: its path (``("models", "demo")``) and entry point."""

    path: tuple[str, ...]
    entry_point: importlib.metadata.EntryPoint

    @property
    def prog(self) -> str:
        """``streamscore`` followed by the command path."""
        return " ".join(("streamscore", *self.path))

    def load(self) -> PluginCommand:
        """Import the command; :class:`PluginUnavailable` when its module is absent."""
        module = self.entry_point.module
        try:
            command = self.entry_point.load()
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if missing and (module == missing or module.startswith(missing + ".")):
                raise PluginUnavailable(
                    f"{self.prog} is part of the development tree, not this installation "
                    f"(module {missing!r} is not installed)"
                ) from error
            raise
        if not isinstance(command, PluginCommand):
            raise TypeError(
                f"entry point {self.entry_point.value!r} ({ENTRY_POINT_GROUP}) "
                f"is not a PluginCommand"
            )
        return command


def discover() -> tuple[Plugin, ...]:
    """Every command registered in :data:`ENTRY_POINT_GROUP`, by path (not loaded)."""
    found = {
        tuple(ep.name.split(".")): ep
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }
    return tuple(Plugin(path, ep) for path, ep in sorted(found.items()))


def match(plugins: Sequence[Plugin], argv: Sequence[str]) -> Plugin | None:
    """The plugin whose path starts ``argv`` (the longest such), if any."""
    hits = [p for p in plugins if tuple(argv[: len(p.path)]) == p.path]
    return max(hits, key=lambda p: len(p.path), default=None)
