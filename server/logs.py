"""Process-wide logging: JSON lines (or plain text) on stderr.

One JSON object per line::

    {"ts": "2025-01-01T12:00:00.123456Z", "level": "INFO", "logger": "server.registry",
     "msg": "loaded", "pid": 4242, "model": "fraud", "version": "3"}

Fields passed with ``logger.info(..., extra={...})`` are added as they are (values that are
not JSON types are written with ``str``); an extra that collides with a core field is written
as ``extra_<name>``. Exceptions go to ``exc_info`` as the formatted traceback string.
"""

from __future__ import annotations

import json as jsonlib
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_CORE = ("ts", "level", "logger", "msg", "pid", "exc_info", "stack_info")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


def _utc_iso(created: float) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="microseconds")[:-6] + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, pid, extras, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line of JSON."""
        out: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in _extras(record).items():
            out[f"extra_{key}" if key in _CORE else key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <msg> key=value ...`` for humans at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO8601 UTC, like the JSON format."""
        return _utc_iso(record.created)

    def format(self, record: logging.LogRecord) -> str:
        """The standard line with the record's extras appended as ``key=value``."""
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        head, sep, tail = line.partition("\n")  # keep extras on the message line
        pairs = " ".join(f"{key}={value}" for key, value in extras.items())
        return f"{head} {pairs}{sep}{tail}"


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (so redirection/capture works)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def configure_logging(level: str, json: bool) -> None:
    """Install the stderr handler on the root logger at ``level`` (e.g. ``"INFO"``).

    ``json`` picks JSON lines or plain text. Calling again replaces the handler installed
    by an earlier call (never adds a second); other handlers on the root are left alone.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
